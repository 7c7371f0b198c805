"""Storage queue clients: the internal chunks queue, the inbound requests queue, and their depths.

Messages are base64-encoded, as the Functions host's default `messageEncoding` expects (docs/contracts.md §2).
A message's visibility delay is how the chunks worker waits (for budget, for an earlier update of the
same alert, for a retry's back-off) without holding an instance or burning dequeue attempts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from azure.core.credentials_async import AsyncTokenCredential
    from azure.storage.queue.aio import QueueClient

    from shared.settings import StorageSettings

log = logging.getLogger(__name__)

MAX_VISIBILITY_DELAY = 7 * 24 * 3600 - 1  # Storage's limit for a message's initial invisibility


def queue_client(storage: StorageSettings, credential: AsyncTokenCredential | None, name: str) -> QueueClient:
    from azure.storage.queue import TextBase64DecodePolicy, TextBase64EncodePolicy
    from azure.storage.queue.aio import QueueClient

    policies: dict[str, Any] = {
        "message_encode_policy": TextBase64EncodePolicy(),
        "message_decode_policy": TextBase64DecodePolicy(),
    }
    from shared.storage import client_options

    policies.update(client_options())
    if storage.connection_string:
        return QueueClient.from_connection_string(storage.connection_string, name, **policies)
    assert storage.queue_service_uri is not None and credential is not None  # settings guarantee both
    return QueueClient(storage.queue_service_uri, name, credential=credential, **policies)


class Queues:
    """The queues alertgate writes to, created once per process."""

    def __init__(
        self,
        chunks: QueueClient,
        requests: QueueClient,
        chunks_poison: QueueClient,
        tenant: str | None = None,
        requests_poison: QueueClient | None = None,
    ) -> None:
        self.chunks = chunks
        self.requests = requests
        self.chunks_poison = chunks_poison
        # only read (its depth, for telemetry): the host moves messages there and a trigger empties it
        self.requests_poison = requests_poison
        self.tenant = tenant  # named in the chunk messages sent through this view; None: the home tenant

    def for_tenant(self, name: str | None) -> Queues:
        """The same queues, sending chunk messages that name a customer tenant (None: the home tenant,
        whose messages keep the form they had before tenants existed)."""
        return Queues(
            self.chunks, self.requests, self.chunks_poison, tenant=name, requests_poison=self.requests_poison
        )

    def all(self) -> list[QueueClient]:
        poison = [self.requests_poison] if self.requests_poison is not None else []
        return [self.chunks, self.requests, self.chunks_poison, *poison]

    async def ensure_exist(self) -> None:
        from azure.core.exceptions import ResourceExistsError

        async def create(client: QueueClient) -> None:
            with contextlib.suppress(ResourceExistsError):
                await client.create_queue()

        await asyncio.gather(*(create(q) for q in self.all()))

    async def send_chunk(self, chunk_id: str, token: str, delay: float) -> None:
        message = {"chunk": chunk_id, "token": token}
        if self.tenant is not None:
            message["tenant"] = self.tenant
        body = json.dumps(message)
        await _send(self.chunks, body, delay)

    async def resend_request(self, content: str, delay: float) -> None:
        await _send(self.requests, content, delay)

    async def depths(self) -> dict[str, int]:
        async def depth(client: QueueClient) -> int:
            properties = await client.get_queue_properties()
            return int(properties.approximate_message_count or 0)

        counts = await asyncio.gather(*(depth(q) for q in self.all()))
        return {q.queue_name: n for q, n in zip(self.all(), counts, strict=True)}

    async def close(self) -> None:
        await asyncio.gather(*(q.close() for q in self.all()))


async def _send(client: QueueClient, content: str, delay: float) -> None:
    """Send with the storage seam's retries. A retry after a lost answer may leave a duplicate message;
    that is safe: two workers holding the same chunk race for its conditional Sending mark and one of
    them finds it taken, and an inbound request is deduplicated by its idempotency key."""
    from shared.storage import with_retries

    async def send() -> None:
        await client.send_message(content, visibility_timeout=_delay(delay))

    await with_retries(f"send to queue {client.queue_name}", send)


def visible_after(seconds: float) -> float:
    """When a message sent with this delay becomes visible, in seconds from now: Storage counts whole
    seconds, so a tenth of a second is a second (what a chunk's message is due at must say so)."""
    return float(_delay(seconds) or 0)


def _delay(seconds: float) -> int | None:
    """Whole seconds (Storage's unit), rounded up so a message never comes back early."""
    if seconds <= 0:
        return None
    return min(MAX_VISIBILITY_DELAY, int(-(-seconds // 1)))
