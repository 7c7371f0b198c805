"""Storage unreachable: alertgate keeps its state in Table and Queue storage, so while storage is away it
can accept nothing. A caller gets a 503 problem+json with Retry-After (its retry policy rides the outage
out), never a bare 500, and nothing reaches MDE. tests/reliability/test_azurite_restart.py covers an
outage in the middle of a drain."""

from __future__ import annotations

import aiohttp

from devhost.services import AzuritePorts, Service, azurite_connection_string, free_port
from emulators.control import EmulatorControl
from tests.conftest import HostPool
from tests.integration.helpers import new_ids, post


async def test_a_request_while_storage_is_unreachable_gets_503_with_retry_after(
    hosts: HostPool, ctl: EmulatorControl, http: aiohttp.ClientSession, own_hosts: list[Service]
) -> None:
    nowhere = azurite_connection_string(AzuritePorts(queue=free_port(), table=free_port()))  # nothing listens
    host, _ = hosts.fresh(AzureWebJobsStorage=nowhere)
    own_hosts.append(host)

    status, headers, problem = await post(
        http, host.urls["base"] + "/api/alerts/batchUpdate", {"alertIds": new_ids(1), "status": "Resolved"}
    )

    assert status == 503, problem
    assert headers["Content-Type"].startswith("application/problem+json")
    assert int(headers["Retry-After"]) >= 1
    assert problem["type"].endswith("/storage-unavailable") and problem["incident"]
    assert "same Idempotency-Key is safe" in problem["detail"]
    assert await ctl.calls() == []
