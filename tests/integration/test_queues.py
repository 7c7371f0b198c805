"""The inbound requests queue and the poison queues, against Azurite and the development host."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from azure.storage.queue import TextBase64DecodePolicy, TextBase64EncodePolicy
from azure.storage.queue.aio import QueueClient

from devhost.services import Service
from emulators.control import EmulatorControl
from shared.queue_handlers import operation_id_for_message
from tests.conftest import HostPool
from tests.integration.helpers import new_ids, post, wait_for_operation

FAST_POLL = {"AzureFunctionsJobHost__extensions__queues__maxPollingInterval": "00:00:00.300"}


class AppQueues:
    def __init__(self, connection_string: str, env: dict[str, str]) -> None:
        policies: dict[str, Any] = {
            "message_encode_policy": TextBase64EncodePolicy(),
            "message_decode_policy": TextBase64DecodePolicy(),
        }
        self.requests = QueueClient.from_connection_string(
            connection_string, env["REQUESTS_QUEUE"], **policies
        )
        self.requests_poison = QueueClient.from_connection_string(
            connection_string, env["REQUESTS_QUEUE"] + "-poison", **policies
        )
        self.chunks_poison = QueueClient.from_connection_string(
            connection_string, env["CHUNKS_QUEUE"] + "-poison", **policies
        )

    async def put(self, document: Any) -> str:
        sent = await self.requests.send_message(json.dumps(document))
        return str(sent.id)

    async def close(self) -> None:
        await asyncio.gather(self.requests.close(), self.requests_poison.close(), self.chunks_poison.close())


@pytest.fixture
async def app(hosts: HostPool, azurite: Service) -> AsyncIterator[tuple[Service, AppQueues]]:
    host, env = hosts.fresh(**FAST_POLL)
    queues = AppQueues(azurite.urls["connection_string"], env)
    yield host, queues
    await queues.close()
    host.stop()


async def wait_until(predicate: Any, within: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.2)


async def test_a_queued_request_is_sent_once_and_its_repeat_is_a_replay(app, ctl: EmulatorControl) -> None:
    _, queues = app
    message = {
        "alertIds": new_ids(2),
        "Status": "resolved",
        "comment": "from a service",
        "idempotencyKey": "q-1",
    }
    await queues.put(message)

    async def one_call() -> bool:
        return len(await ctl.calls()) == 1

    await wait_until(one_call)
    (call,) = await ctl.calls()
    assert json.loads(call["body"]) == {
        "alertIds": message["alertIds"],
        "status": "Resolved",
        "comment": "from a service",
    }
    await queues.put(message)  # delivered again: a replay, nothing sent
    await asyncio.sleep(2.0)
    properties = await queues.requests.get_queue_properties()
    assert properties.approximate_message_count == 0
    assert len(await ctl.calls()) == 1


async def test_an_invalid_message_becomes_a_failed_operation(app, ctl: EmulatorControl, http) -> None:
    host, queues = app
    message_id = await queues.put({"alertIds": ["not-an-alert"], "status": "Closed", "idempotencyKey": "q-2"})
    operation_id = operation_id_for_message(message_id)
    url = f"{host.urls['base']}/api/operations/{operation_id}"

    async def recorded() -> bool:
        async with http.get(url) as response:
            return bool(response.status != 404)

    await wait_until(recorded)
    async with http.get(url) as response:
        assert response.status == 400
        assert response.headers["Content-Type"].startswith("application/json")
        resource = await response.json()
    assert resource["status"] == "Failed" and resource["source"] == "queue"
    assert {e["field"] for e in resource["errors"]} == {"alertIds[0]", "status"}
    assert resource["caller"]["messageId"] == message_id
    await asyncio.sleep(1.0)
    assert (await queues.requests_poison.get_queue_properties()).approximate_message_count == 0
    assert await ctl.calls() == []
    log = host.log_path.read_text()
    assert message_id in log and operation_id in log  # one line names both


async def test_a_key_in_progress_elsewhere_waits_then_replays(app, ctl: EmulatorControl, http) -> None:
    host, queues = app
    body = {"alertIds": new_ids(1), "status": "Resolved"}
    await ctl.add_faults([{"delaySeconds": 2.0, "apply": True}])
    first = asyncio.create_task(
        post(http, f"{host.urls['base']}/api/alerts/batchUpdate", body, {"Idempotency-Key": "shared-key"})
    )
    await asyncio.sleep(0.5)
    await queues.put({**body, "idempotencyKey": "shared-key"})
    assert (await first)[0] == 200
    await asyncio.sleep(7.0)  # the queued copy was re-enqueued with a delay, then found completed
    assert len(await ctl.calls()) == 1
    assert (await queues.requests.get_queue_properties()).approximate_message_count == 0
    assert "re-enqueued" in host.log_path.read_text()


async def test_a_poisoned_chunk_becomes_failed(
    hosts: HostPool, azurite: Service, ctl: EmulatorControl, http
) -> None:
    host, env = hosts.fresh(DEFENDER_RATE_LIMITS="1/60", SYNC_MAX_WAIT_SECONDS="0", **FAST_POLL)
    queues = AppQueues(azurite.urls["connection_string"], env)
    try:
        base = f"{host.urls['base']}/api/alerts/batchUpdate"
        assert (await post(http, base, {"alertIds": new_ids(1), "status": "New"}))[
            0
        ] == 200  # spends the budget
        status, headers, body = await post(http, base, {"alertIds": new_ids(1), "status": "Resolved"})
        assert status == 202
        chunk_id = body["chunks"][0]["chunkId"]
        await queues.chunks_poison.send_message(json.dumps({"chunk": chunk_id, "token": "whatever"}))
        final, resource = await wait_for_operation(http, headers["Location"], within=15)
        assert final == 502 and resource["status"] == "Failed"
        assert resource["chunks"][0]["lastError"]["code"] == "PoisonMessage"
        assert len(await ctl.calls()) == 1
    finally:
        await queues.close()
        host.stop()
