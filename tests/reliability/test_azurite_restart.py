"""Azurite stopped gracefully and started again while a backlog drains (issue 6, part 2).

Table and Queue Storage going away for a few seconds is the failure a Functions app meets most: a
storage front end restarts, a network path blips. alertgate keeps everything that matters there (the
budget, the ledger and its outbox, the idempotency keys, the chunks queue), so while storage is away it
can neither spend budget nor record an outcome. It must ride the outage out: a worker whose storage call
fails leaves its message to the host's retries, a chunk whose message went missing is re-queued by the
sweep, a send whose outcome could not be recorded is resolved by the outcome-unknown rule; and since
every call needs a grant written to the budget first, no call may go out while the budget is unreadable.

The case: Azurite keeps its data on disk (`--location`) on ports fixed for the test; a backlog of
single-alert updates (every other one with a comment) drains under a time-scaled budget of 5 calls a
second (the emulator enforces the same window); once MDE has seen a few calls, Azurite gets SIGTERM (it
writes its data out and exits), stays away for OUTAGE_SECONDS while callers keep posting, and comes back
on the same ports with the same data. Then every accepted operation, those of the callers that posted
into the outage included (they retry with their Idempotency-Key, as a playbook's retry policy would),
must end by the invariants of tests/reliability/invariants.py: Succeeded, or OutcomeUnknown with a
record; nothing lost; nothing applied twice without a record saying so; the window held.

The sweep runs every second with a 2 s grace, so what the outage orphaned is found within seconds.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from devhost.services import Service, start_devhost
from emulators.control import EmulatorControl
from tests.integration.helpers import eventually, new_ids, post
from tests.reliability import invariants
from tests.reliability.conftest import DiskAzurite, app_env
from tests.reliability.invariants import Sent

BATCH = "/api/alerts/batchUpdate"
ASYNC = {"Prefer": "respond-async"}
LIMITS = "5/1"
SETTINGS = {
    "DEFENDER_RATE_LIMITS": LIMITS,
    "RATE_LIMIT_SAFETY_MARGIN_SECONDS": "0.2",
    "DEFENDER_HTTP_TIMEOUT_SECONDS": "2",
    "SYNC_MAX_WAIT_SECONDS": "2",
    "SWEEP_SCHEDULE": "*/1 * * * * *",
    "SWEEP_GRACE_SECONDS": "2",
}
BACKLOG = 40  # eight seconds of budget: the outage lands in the middle of the drain
CALLS_BEFORE_STOP = 8
OUTAGE_SECONDS = 4.0
DURING_OUTAGE = 4  # requests posted while storage is away (half deferred, half synchronous)


def update(ids: list[str], comment: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"alertIds": ids, "status": "Resolved", "classification": "TruePositive"}
    if comment is not None:
        body["comment"] = comment
    return body


async def until_accepted(
    http: aiohttp.ClientSession, url: str, body: dict[str, Any], headers: dict[str, str], within: float
) -> tuple[int | None, str]:
    """POST with the same Idempotency-Key until the answer names an operation, as a caller's retry
    policy would (bounded in time and count); returns the answer's status (None for 409, "in progress")
    and the operation id."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    last: Any = None
    for _ in range(int(within) + 1):
        try:
            status, _, document = await post(http, url, body, headers)
            last = (status, document)
            if isinstance(document, dict) and "operationId" in document and status != 500:
                return (None if status == 409 else status), str(document["operationId"])
        except aiohttp.ClientError as exc:
            last = exc
        if loop.time() > deadline:
            break
        await asyncio.sleep(1.0)
    raise AssertionError(f"not accepted within {within}s; last answer {last}")


@pytest.mark.full
async def test_azurite_restarted_during_a_drain(
    disk_azurite: DiskAzurite,
    emulators: Service,
    ctl: EmulatorControl,
    http: aiohttp.ClientSession,
    own_hosts: list[Service],
    tmp_path: Path,
) -> None:
    """Storage goes away mid-drain and comes back: everything accepted ends, by the same invariants."""
    env = app_env(disk_azurite.connection_string, emulators, **SETTINGS)
    host = await asyncio.to_thread(start_devhost, tmp_path / "host-logs", env, name="devhost-azurite-restart")
    own_hosts.append(host)
    url = host.urls["base"] + BATCH
    await ctl.configure(rateLimits=LIMITS)
    run = uuid.uuid4().hex[:8]
    backlog = [
        (update(new_ids(1), f"restart {run} #{n}" if n % 2 == 0 else None), f"restart-{run}-{n}")
        for n in range(BACKLOG)
    ]
    answers = await asyncio.gather(*(post(http, url, b, {**ASYNC, "Idempotency-Key": k}) for b, k in backlog))
    sent = []
    for (body, _), (status, _, document) in zip(backlog, answers, strict=True):
        assert status == 202, (status, document)
        sent.append(Sent(body, document["operationId"], status))

    async def draining() -> bool:
        return len(await ctl.calls()) >= CALLS_BEFORE_STOP

    await eventually(draining, 15.0, f"{CALLS_BEFORE_STOP} calls at MDE before the outage", every=0.1)
    stopped = await asyncio.to_thread(disk_azurite.stop)
    assert stopped == 0, "Azurite did not stop gracefully"
    calls_at_stop = len(await ctl.calls())
    assert calls_at_stop < BACKLOG, "precondition: the outage lands mid-drain"

    # Callers keep posting into the outage: whatever they are answered, a retry with the key must work.
    late = [
        (update(new_ids(1), f"restart {run} late #{n}" if n % 2 == 0 else None), f"restart-{run}-late-{n}")
        for n in range(DURING_OUTAGE)
    ]
    late_headers = [{**(ASYNC if n % 2 else {}), "Idempotency-Key": key} for n, (_, key) in enumerate(late)]
    late_tasks = [
        asyncio.create_task(until_accepted(http, url, body, headers, within=60.0))
        for (body, _), headers in zip(late, late_headers, strict=True)
    ]
    await asyncio.sleep(OUTAGE_SECONDS)
    await asyncio.to_thread(disk_azurite.start)

    for (body, _), (answer, operation_id) in zip(late, await asyncio.gather(*late_tasks), strict=True):
        sent.append(Sent(body, operation_id, answer))
    await invariants.check(
        ctl, http, host.urls["base"], sent, windows=invariants.parse_windows(LIMITS), within=60.0
    )
    assert host.alive(), "the host died with its storage"
