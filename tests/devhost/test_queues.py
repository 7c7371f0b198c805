"""Queue triggers against Azurite with the real host's semantics: decode, delete, retry, poison, batches.

host.json values come from app-setting overrides (`AzureFunctionsJobHost__...`), the real host's way of
overriding host.json, because `start_devhost` passes an environment and no flags.
"""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Any

import pytest
from azure.core.exceptions import ResourceNotFoundError
from azure.data.tables.aio import TableClient
from azure.functions.decorators.queue import QueueTrigger
from azure.storage.queue import BinaryBase64EncodePolicy, TextBase64EncodePolicy
from azure.storage.queue.aio import QueueClient

from devhost.config import QueueOptions
from devhost.host import FunctionSpec, InFlight, Invoker
from devhost.queues import QueueBinding, QueueListener
from devhost.services import Service
from tests.devhost.conftest import SampleHost, eventually, rows

MAX_DEQUEUE = 3
HOST_SETTINGS = {
    "AzureFunctionsJobHost__extensions__queues__maxDequeueCount": str(MAX_DEQUEUE),
    "AzureFunctionsJobHost__extensions__queues__visibilityTimeout": "00:00:00",
    "AzureFunctionsJobHost__extensions__queues__maxPollingInterval": "00:00:01",
    "AzureFunctionsJobHost__extensions__queues__batchSize": "8",
}


def client(host: SampleHost, name: str, policy: Any = None) -> QueueClient:
    return QueueClient.from_connection_string(host.connection_string, name, message_encode_policy=policy)


@pytest.fixture
async def text_queue(sample_host: SampleHost) -> AsyncIterator[QueueClient]:
    """The app's queue, sending as the app's own code does (the SDK's base64 encode policy)."""
    async with client(sample_host, sample_host.queue, TextBase64EncodePolicy()) as queue:
        yield queue


async def poison_contents(host: SampleHost) -> list[str]:
    async with client(host, f"{host.queue}-poison") as poison:
        try:
            return [str(m.content) for m in await poison.peek_messages(max_messages=32)]
        except ResourceNotFoundError:
            return []


async def deliveries(table: TableClient, message_id: str) -> list[dict[str, Any]]:
    return sorted(
        (r for r in await rows(table, "queue") if r["message_id"] == message_id),
        key=lambda r: int(r["dequeue_count"]),
    )


def _deliveries_of(table: TableClient, message_id: str) -> Callable[[], Awaitable[list[dict[str, Any]]]]:
    return lambda: deliveries(table, message_id)


async def test_messages_are_decoded_delivered_once_and_deleted(
    sample_host: SampleHost, text_queue: QueueClient, records: TableClient
) -> None:
    text = f"hello-{uuid.uuid4()} ✓"
    sent_text = await text_queue.send_message(text)
    async with client(sample_host, sample_host.queue, BinaryBase64EncodePolicy()) as binary:
        sent_binary = await binary.send_message("binary ✓".encode())

    for message_id, body in ((sent_text.id, text), (sent_binary.id, "binary ✓")):
        got = await eventually(_deliveries_of(records, message_id), bool, within=5)
        assert [(r["body"], r["dequeue_count"]) for r in got] == [(body, 1)]
        assert datetime.fromisoformat(got[0]["inserted"]) is not None

    async def depth() -> int:
        return int((await text_queue.get_queue_properties()).approximate_message_count or 0)

    assert await eventually(depth, lambda n: n == 0, within=5) == 0


async def test_failing_message_is_retried_then_poisoned_exactly_once(
    sample_host: SampleHost, text_queue: QueueClient, records: TableClient
) -> None:
    sent = await text_queue.send_message("fail")
    got = await eventually(lambda: deliveries(records, sent.id), lambda r: len(r) >= MAX_DEQUEUE, within=8)
    original = base64.b64encode(b"fail").decode()
    await eventually(lambda: poison_contents(sample_host), lambda c: original in c, within=5)
    await asyncio.sleep(1.5)  # one more polling interval: nothing may be retried or poisoned again
    assert [r["dequeue_count"] for r in await deliveries(records, sent.id)] == [1, 2, 3]
    assert (await poison_contents(sample_host)).count(original) == 1
    assert len(got) == MAX_DEQUEUE


async def test_undecodable_message_goes_to_poison_without_invocation(
    sample_host: SampleHost, records: TableClient
) -> None:
    raw = f"not base64 {uuid.uuid4()}!"
    async with client(sample_host, sample_host.queue) as plain:
        sent = await plain.send_message(raw)
    await eventually(lambda: poison_contents(sample_host), lambda c: raw in c, within=5)
    assert await deliveries(records, sent.id) == []


async def test_a_batch_runs_concurrently(text_queue: QueueClient, records: TableClient) -> None:
    sent = [await text_queue.send_message("sleep:1") for _ in range(4)]

    async def finished() -> list[dict[str, Any]]:
        return [r for s in sent for r in await deliveries(records, s.id)]

    got = await eventually(finished, lambda r: len(r) == len(sent), within=8)
    starts = [datetime.fromisoformat(r["started"]) for r in got]
    ends = [datetime.fromisoformat(r["finished"]) for r in got]
    assert max(starts) < min(ends), "the four one-second invocations did not overlap"


async def test_long_invocation_keeps_its_message_invisible(azurite: Service) -> None:
    """With a 1 s lease renewed every 0.5 s, a 2.5 s invocation is not delivered a second time."""
    connection = azurite.urls["connection_string"]
    name = f"lease-{uuid.uuid4().hex[:8]}"
    calls: list[int] = []

    async def slow(msg: Any) -> None:
        calls.append(int(msg.dequeue_count))
        await asyncio.sleep(2.5)

    trigger = QueueTrigger(name="msg", queue_name=name, connection="AzureWebJobsStorage")
    binding = QueueBinding(
        FunctionSpec("slow", trigger, slow, "msg", False), name, "AzureWebJobsStorage", connection
    )
    inflight = InFlight()
    options = QueueOptions(max_polling_interval=0.2)
    listener = QueueListener(binding, options, Invoker(inflight, "."), inflight, lease_seconds=1)
    stop = asyncio.Event()
    polling = asyncio.create_task(listener.run(stop))
    try:
        async with QueueClient.from_connection_string(connection, name) as queue:
            await eventually(lambda: _exists(queue), bool, within=5)
            await queue.send_message("eA==")
            await eventually(lambda: _count(queue), lambda n: n == 0, within=8, interval=0.2)
        assert calls == [1]
    finally:
        stop.set()
        await asyncio.wait_for(polling, 5)
        await inflight.drain(5)
        await listener.close()


async def _exists(queue: QueueClient) -> bool:
    try:
        await queue.get_queue_properties()
    except ResourceNotFoundError:
        return False
    return True


async def _count(queue: QueueClient) -> int:
    return int((await queue.get_queue_properties()).approximate_message_count or 0)
