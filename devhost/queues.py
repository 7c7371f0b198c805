"""Queue triggers with the real host's semantics, against Azurite or any Storage account.

What is reproduced (Storage Queues extension 5.x, which extension bundle 4.x ships):

- Polling: right after a batch was found, poll again at once; while the queue is empty, back off
  exponentially from 100 ms up to `maxPollingInterval`.
- Batches: fetch `batchSize` messages whenever the messages still running drop to `newBatchThreshold`,
  so at most batchSize + newBatchThreshold run at once per function (the documented limit).
- A received message stays invisible for 10 minutes while it runs, renewed at half that.
- Bodies are decoded per `messageEncoding`. A body that is not valid base64 never reaches the function:
  the extension's MessageDecodingFailed handler moves it straight to the poison queue (it would fail
  identically on every attempt), and so does devhost.
- Success deletes the message. Failure with `dequeueCount >= maxDequeueCount` copies the original text
  to `<queue>-poison` (created on demand) and deletes the original; an earlier failure makes the message
  visible again after `visibilityTimeout`.

Storage errors (Azurite restarting, say) are logged and retried with the same back-off; a message whose
settling failed simply reappears when its invisibility ends, which is the at-least-once delivery the real
host gives too.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import enum
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from azure.core.exceptions import AzureError, ResourceExistsError, ResourceNotFoundError
from azure.functions import queue as queue_binding  # the worker's QueueMessage (with dequeue_count etc.)
from azure.storage.queue import QueueMessage
from azure.storage.queue.aio import QueueClient

from devhost.config import (
    QueueOptions,
    resolve_setting_refs,
    storage_connection_string,
    validate_queue_name,
)
from devhost.host import FunctionSpec, InFlight, Invoker

log = logging.getLogger("devhost.queues")

LEASE_SECONDS = 600  # the host's invisibility for a message being processed (10 minutes)
MIN_POLL_SECONDS = 0.1
MAX_MESSAGES_PER_RECEIVE = 32  # Storage's own limit for one Get Messages call


class Outcome(enum.Enum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    UNDECODABLE = "undecodable"


def decode_body(content: str, encoding: str) -> bytes:
    """The bytes the function sees. Raises ValueError for a body that is not valid base64 (when expected).

    Whitespace is ignored, as .NET's Convert.FromBase64String ignores it; anything else outside the
    base64 alphabet, or wrong padding, is an error.
    """
    if encoding == "none":
        return content.encode("utf-8")
    compact = "".join(content.split())
    try:
        return base64.b64decode(compact, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"not valid base64: {exc}") from exc


@dataclass(frozen=True)
class QueueBinding:
    """A queue trigger with its setting references resolved."""

    spec: FunctionSpec
    queue_name: str
    connection_name: str
    connection_string: str

    @classmethod
    def resolve(cls, spec: FunctionSpec, environ: Mapping[str, str]) -> QueueBinding:
        where = f"function {spec.name}"
        raw_name = str(getattr(spec.trigger, "queue_name", "") or "")
        queue_name = validate_queue_name(resolve_setting_refs(raw_name, environ, where=where), where=where)
        connection = str(getattr(spec.trigger, "connection", "") or "") or "AzureWebJobsStorage"
        return cls(spec, queue_name, connection, storage_connection_string(connection, environ, where=where))

    def describe(self) -> str:
        return f"{self.spec.name}: queueTrigger queue={self.queue_name} (connection {self.connection_name})"


class _Lease:
    """The current pop receipt of a running message; the lock keeps renewal and settling from racing."""

    def __init__(self, message: QueueMessage) -> None:
        self.message_id: str = message.id
        self.pop_receipt: str = str(message.pop_receipt)
        self.lock = asyncio.Lock()


def _short(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {first[0] if first else ''}"


async def _stopped_within(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep up to `seconds`, returning early (True) when stop is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
    return stop.is_set()


class QueueListener:
    """Polls one queue for one function and settles every message as the real host does."""

    def __init__(
        self,
        binding: QueueBinding,
        options: QueueOptions,
        invoke: Invoker,
        inflight: InFlight,
        *,
        lease_seconds: int = LEASE_SECONDS,
    ) -> None:
        self.binding = binding
        self._options = options
        self._invoke = invoke
        self._inflight = inflight
        self._lease_seconds = lease_seconds
        self._client = self._queue_client(binding.queue_name)
        self._poison = self._queue_client(f"{binding.queue_name}-poison")
        self._queue_ready = False
        self._poison_ready = False
        self._running = 0
        self._capacity = asyncio.Condition()

    def _queue_client(self, name: str) -> QueueClient:
        """No encode/decode policy: devhost reads and copies the raw message text itself.

        Modest retries (these keywords configure the async client's own ExponentialRetry): the SDK
        default, 15 s before the first retry, would stall polling and shutdown for a minute while
        Azurite restarts, and the poll loop retries anyway.
        """
        return QueueClient.from_connection_string(
            self.binding.connection_string,
            name,
            initial_backoff=1,
            increment_base=2,
            retry_total=2,
            random_jitter_range=1,
        )

    async def close(self) -> None:
        await self._client.close()
        await self._poison.close()

    # --- polling ---------------------------------------------------------------------------------

    async def prepare(self, seconds: float) -> bool:
        """Create the queue before the host reports ready, so that "listening" means "queues exist".

        Bounded: with Storage unreachable the host still starts, and `run` keeps trying.
        """
        try:
            self._queue_ready = await asyncio.wait_for(self._ensure_queue(self._client), seconds)
        except TimeoutError:
            log.warning(
                "queue %s: not reachable within %.0f s; will keep trying", self.binding.queue_name, seconds
            )
        return self._queue_ready

    async def run(self, stop: asyncio.Event) -> None:
        """Poll until stop is set; messages already received are left to finish (they are tracked)."""
        delay = MIN_POLL_SECONDS
        while not stop.is_set():
            if not self._queue_ready:
                self._queue_ready = await self._ensure_queue(self._client)
            messages = await self._receive() if self._queue_ready else None
            if messages is None:
                self._queue_ready = False
            for message in messages or []:
                self._start(message)
            if messages:
                delay = MIN_POLL_SECONDS
                await self._wait_for_capacity()
                continue
            if await _stopped_within(stop, delay):
                break
            delay = min(delay * 2, self._options.max_polling_interval)

    async def _ensure_queue(self, client: QueueClient) -> bool:
        try:
            await client.create_queue()
        except ResourceExistsError:
            pass
        except AzureError as exc:
            log.warning("queue %s: cannot create or reach it: %s (retrying)", client.queue_name, _short(exc))
            return False
        return True

    async def _receive(self) -> list[QueueMessage] | None:
        """One Get Messages call (None when Storage failed); each message invisible for the lease."""
        count = min(self._options.batch_size, MAX_MESSAGES_PER_RECEIVE)
        pages = self._client.receive_messages(
            messages_per_page=count, visibility_timeout=self._lease_seconds
        ).by_page()
        try:
            async for page in pages:
                return [message async for message in page]
        except ResourceNotFoundError:
            log.warning("queue %s: not found; creating it again", self.binding.queue_name)
            return None
        except AzureError as exc:
            log.warning("queue %s: receive failed: %s (retrying)", self.binding.queue_name, _short(exc))
            return None
        return []

    async def _wait_for_capacity(self) -> None:
        """Fetch again only when what still runs has dropped to newBatchThreshold."""
        async with self._capacity:
            await self._capacity.wait_for(lambda: self._running <= self._options.new_batch_threshold)

    def _start(self, message: QueueMessage) -> None:
        self._running += 1
        self._inflight.spawn(self._handle(message), name=f"{self.binding.spec.name}:{message.id}")

    async def _finished(self) -> None:
        async with self._capacity:
            self._running -= 1
            self._capacity.notify_all()

    # --- one message -----------------------------------------------------------------------------

    async def _handle(self, message: QueueMessage) -> None:
        lease = _Lease(message)
        renewal = asyncio.get_running_loop().create_task(self._keep_invisible(lease))
        try:
            outcome = await self._execute(message)
            async with lease.lock:
                renewal.cancel()
            await self._settle(message, lease, outcome)
        finally:
            renewal.cancel()
            await self._finished()

    async def _keep_invisible(self, lease: _Lease) -> None:
        """Renew the invisibility at half the lease, for invocations that run long."""
        while True:
            await asyncio.sleep(self._lease_seconds / 2)
            async with lease.lock:
                try:
                    updated = await self._client.update_message(
                        lease.message_id,
                        pop_receipt=lease.pop_receipt,
                        visibility_timeout=self._lease_seconds,
                    )
                except AzureError as exc:
                    log.warning("message %s: cannot renew its lease: %s", lease.message_id, _short(exc))
                    continue
                lease.pop_receipt = str(updated.pop_receipt)

    async def _execute(self, message: QueueMessage) -> Outcome:
        try:
            body = decode_body(str(message.content or ""), self._options.message_encoding)
        except ValueError as exc:
            log.warning(
                "queue %s: message %s cannot be decoded as %s (%s); moving it to the poison queue",
                self.binding.queue_name,
                message.id,
                self._options.message_encoding,
                exc,
            )
            return Outcome.UNDECODABLE
        trigger_value = queue_binding.QueueMessage(  # type: ignore[no-untyped-call]
            id=message.id,
            body=body,
            dequeue_count=message.dequeue_count,
            expiration_time=message.expires_on,
            insertion_time=message.inserted_on,
            time_next_visible=message.next_visible_on,
            pop_receipt=message.pop_receipt,
        )
        reason = f"New queue message detected on '{self.binding.queue_name}'."
        try:
            await self._invoke(self.binding.spec, trigger_value, reason)
        except Exception:
            return Outcome.FAILED  # the Invoker logged the traceback
        return Outcome.SUCCEEDED

    async def _settle(self, message: QueueMessage, lease: _Lease, outcome: Outcome) -> None:
        dequeue_count = int(message.dequeue_count or 0)
        try:
            if outcome is Outcome.SUCCEEDED:
                await self._client.delete_message(lease.message_id, pop_receipt=lease.pop_receipt)
            elif outcome is Outcome.UNDECODABLE:
                await self._to_poison(message, lease)
            elif dequeue_count >= self._options.max_dequeue_count:
                log.warning(
                    "Message has reached MaxDequeueCount of %d. Moving message to queue '%s-poison'.",
                    self._options.max_dequeue_count,
                    self.binding.queue_name,
                )
                await self._to_poison(message, lease)
            else:
                await self._client.update_message(
                    lease.message_id,
                    pop_receipt=lease.pop_receipt,
                    visibility_timeout=int(self._options.visibility_timeout),
                )
        except AzureError as exc:
            log.warning(
                "message %s: could not be settled (%s): %s; it reappears when its invisibility ends",
                message.id,
                outcome.value,
                _short(exc),
            )

    async def _to_poison(self, message: QueueMessage, lease: _Lease) -> None:
        """Copy the original text (still encoded, as the host's poison client does), then delete."""
        if not self._poison_ready:
            self._poison_ready = await self._ensure_queue(self._poison)
        await self._poison.send_message(str(message.content or ""))
        await self._client.delete_message(lease.message_id, pop_receipt=lease.pop_receipt)
