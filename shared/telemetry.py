"""alertgate's metrics and events for operators (docs/telemetry.md), through the OpenTelemetry API only.

In Azure the Functions host's OpenTelemetry mode has the Python worker configure the Azure Monitor SDK;
alertgate never configures a provider itself, it asks the API's global ones (or the ones a test hands
in). Without a configured SDK every instrument is a no-op, which is what the local run and most tests get.

Why the figures are kept here and not in log lines: the host's default mode drops `extra=` fields, and
Azure's own queue metric is account-wide and hourly, so budget and backlog must come from alertgate.

Instruments are created once per process (`Telemetry`); each tenant's services get a `TenantTelemetry`
that adds the `tenant` attribute. `EndWatcher` turns the ends the ledger records into the chunk counter
and, once an operation's last chunk has ended, the operation's event. Finding that out needs reads, so
it runs beside the request, never in front of its answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ParamSpec

if TYPE_CHECKING:
    from opentelemetry._logs import LoggerProvider
    from opentelemetry.metrics import MeterProvider

    from shared.channels.base import CallResult
    from shared.ledger import Chunk, Ledger, Operation
    from shared.ratelimit import BudgetSnapshot

log = logging.getLogger(__name__)

SCOPE = "alertgate"
OPERATION_ENDED = "alertgate.operation.ended"
# The attribute that makes the Azure Monitor exporter write a log record to customEvents under this name.
CUSTOM_EVENT_NAME = "microsoft.custom_event.name"
NO_CHANNEL = "none"
NO_CODE = "none"
# How long closing the runtime waits for the operation-end checks still running.
DRAIN_SECONDS = 5.0
# How long recorded ends gather before their operations are checked (EndWatcher), how many checks run
# at once (a burst of reads would slow the requests beside them), and how many operations accepted here
# it remembers, so that the check of one ended in this process reads nothing.
CHECK_DELAY_SECONDS = 0.5
CHECKS_AT_ONCE = 4
REMEMBERED_OPERATIONS = 4096


P = ParamSpec("P")


def never_raises(record: Callable[P, None]) -> Callable[P, None]:
    """A figure is recorded beside the work it describes, often between MDE's answer and the write that
    keeps it: an exception there would leave a known outcome for the sweep to call unknown. So a failing
    instrument or exporter is logged and the work goes on."""

    @functools.wraps(record)
    def guarded(*args: P.args, **kwargs: P.kwargs) -> None:
        try:
            record(*args, **kwargs)
        except Exception:
            log.warning("telemetry: %s failed; the work it describes goes on", record.__name__, exc_info=True)

    return guarded


def call_outcome(result: CallResult) -> tuple[str, int | None]:
    """A call's `outcome` attribute (docs/telemetry.md), and its HTTP status when MDE answered."""
    from shared.channels.base import CallKind

    if not result.sent:
        return "not_sent", None
    if result.kind is CallKind.OUTCOME_UNKNOWN:
        return "no_answer", None
    status = 200 if result.kind is CallKind.OK else (result.error.http_status if result.error else None)
    if status is None:
        return "no_answer", None
    if status in (200, 429):
        return str(status), status
    return ("5xx" if status >= 500 else "4xx"), status


class Telemetry:
    """The process's instruments (one set, whatever the number of tenants)."""

    def __init__(
        self, meter_provider: MeterProvider | None = None, logger_provider: LoggerProvider | None = None
    ) -> None:
        from opentelemetry import _logs, metrics

        meter = metrics.get_meter(SCOPE, meter_provider=meter_provider)
        self.calls = meter.create_counter(
            "alertgate.mde.calls", unit="{call}", description="HTTP calls to MDE, by outcome"
        )
        self.forbidden = meter.create_counter(
            "alertgate.mde.forbidden",
            unit="{call}",
            description="Calls MDE answered 403: a missing permission",
        )
        self.members = meter.create_histogram(
            "alertgate.mde.call.members",
            unit="{chunk}",
            description="Chunks carried by each call sent to MDE (more than 1: a coalesced call)",
            explicit_bucket_boundaries_advisory=[1, 2, 5, 10, 20, 50, 100],
        )
        self.chunks_ended = meter.create_counter(
            "alertgate.chunks.ended", unit="{chunk}", description="Chunks that ended, by result"
        )
        self.poison = meter.create_counter(
            "alertgate.poison.messages", unit="{message}", description="Messages handled from a poison queue"
        )
        self.budget_used = meter.create_gauge(
            "alertgate.budget.used", unit="{call}", description="Calls admitted in the window ending now"
        )
        self.budget_remaining = meter.create_gauge(
            "alertgate.budget.remaining", unit="{call}", description="Calls the window still admits"
        )
        self.pending = meter.create_gauge(
            "alertgate.backlog.pending", unit="{chunk}", description="Chunks accepted and not yet ended"
        )
        self.oldest_age = meter.create_gauge(
            "alertgate.backlog.oldest_age", unit="s", description="Age of the oldest chunk not yet ended"
        )
        self.queue_depth = meter.create_gauge(
            "alertgate.queue.depth", unit="{message}", description="Approximate messages in each queue"
        )
        self.events = _logs.get_logger(SCOPE, logger_provider=logger_provider)

    def tenant(self, name: str) -> TenantTelemetry:
        return TenantTelemetry(self, name)

    @never_raises
    def queue_depths(self, depths: dict[str, int]) -> None:
        for queue, depth in depths.items():
            self.queue_depth.set(depth, {"queue": queue})


@dataclass(frozen=True)
class TenantTelemetry:
    """The instruments as one tenant's services use them: every figure carries its `tenant`."""

    telemetry: Telemetry
    tenant: str

    @never_raises
    def call(self, channel: str, result: CallResult, members: int) -> None:
        outcome, status = call_outcome(result)
        code = (result.error.code if result.error else None) or NO_CODE
        attributes = {"tenant": self.tenant, "channel": channel}
        self.telemetry.calls.add(1, {**attributes, "outcome": outcome, "error_code": code})
        if status == 403:
            self.telemetry.forbidden.add(1, attributes)
        if outcome != "not_sent":
            self.telemetry.members.record(members, attributes)

    @never_raises
    def chunks_ended(self, chunks: Iterable[Chunk]) -> None:
        for (channel, result), count in Counter(
            (c.channel or NO_CHANNEL, str(c.state)) for c in chunks
        ).items():
            self.telemetry.chunks_ended.add(
                count, {"tenant": self.tenant, "channel": channel, "result": result}
            )

    @never_raises
    def poison(self, queue: str) -> None:
        self.telemetry.poison.add(1, {"tenant": self.tenant, "queue": queue})

    @never_raises
    def budget(self, channel: str, snapshot: BudgetSnapshot) -> None:
        for window in snapshot.windows:
            attributes: dict[str, str | int] = {
                "tenant": self.tenant,
                "channel": channel,
                "window": f"{window.seconds:g}",
                "limit": window.calls,
            }
            self.telemetry.budget_used.set(window.used, attributes)
            self.telemetry.budget_remaining.set(window.remaining, attributes)

    @never_raises
    def backlog(self, unfinished: Sequence[Chunk], now: float) -> None:
        attributes = {"tenant": self.tenant}
        self.telemetry.pending.set(len(unfinished), attributes)
        oldest = min((c.created_at for c in unfinished), default=now)
        self.telemetry.oldest_age.set(max(0.0, now - oldest), attributes)

    @never_raises
    def operation_ended(self, operation: Operation, chunks: Sequence[Chunk]) -> None:
        """The one event of an operation's end (docs/telemetry.md), with what a SOC asks of it."""
        from opentelemetry._logs import SeverityNumber

        from shared.operations import status_of, worst_error

        status = status_of(operation, list(chunks))
        worst = worst_error(list(chunks)) if chunks else (operation.errors[0] if operation.errors else None)
        code = (worst or {}).get("code") or (
            None if status.status == "Succeeded" else str(status.http_status)
        )
        ended_at = max((c.finished_at for c in chunks), default=operation.created_at)
        attributes: dict[str, Any] = {
            CUSTOM_EVENT_NAME: OPERATION_ENDED,
            "operationId": operation.operation_id,
            "tenant": self.tenant,
            "source": operation.source,
            "status": status.status,
            "alertCount": operation.alert_count,
            "chunkResults": json.dumps(dict(Counter(str(c.state) for c in chunks)), sort_keys=True),
            "errorCode": code or NO_CODE,
            "callerKind": str(operation.caller.get("authentication") or "functionKey"),
            "durationSeconds": round(max(0.0, ended_at - operation.created_at), 3),
        }
        self.telemetry.events.emit(
            body=f"operation {operation.operation_id} {status.status}",
            severity_number=SeverityNumber.INFO if status.status == "Succeeded" else SeverityNumber.WARN,
            attributes=attributes,
        )


class EndWatcher:
    """Hears every chunk end the ledger records: counts it, and emits its operation's event if that was
    the operation's last chunk.

    The ledger calls `ended` right after the write, synchronously. Telling whether the operation ended
    needs reads (the operation, and the entries of one with several chunks), so the ends are gathered
    and checked together CHECK_DELAY_SECONDS later: never in front of a caller's answer, and one check
    per operation however many of its chunks ended meanwhile (a coalesced call ends up to 100 at once).
    Every end is checked by a read made after its own write, so the last one to end always sees every
    chunk ended: the event is emitted at least once (twice only if two processes' ends race).

    Operations accepted by this process are remembered (the most recent REMEMBERED_OPERATIONS), so the
    usual case, a one-chunk operation accepted and ended here, costs no read at all.
    """

    def __init__(self, ledger: Ledger, telemetry: TenantTelemetry) -> None:
        self.ledger = ledger
        self.telemetry = telemetry
        self._waiting: dict[str, list[Chunk]] = {}
        self._flusher: asyncio.Task[None] | None = None
        self._sleeping = False
        self._accepted: OrderedDict[str, Operation] = OrderedDict()
        self._checks = asyncio.Semaphore(CHECKS_AT_ONCE)

    @never_raises
    def accepted(self, operation: Operation) -> None:
        self._accepted[operation.operation_id] = operation
        while len(self._accepted) > REMEMBERED_OPERATIONS:
            self._accepted.popitem(last=False)

    @never_raises
    def ended(self, chunks: Sequence[Chunk]) -> None:
        self.telemetry.chunks_ended(chunks)
        for chunk in chunks:
            self._waiting.setdefault(chunk.operation_id, []).append(chunk)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_later())

    @never_raises
    def invalid(self, operation: Operation) -> None:
        """An operation recorded Failed with no chunks (an inbound message refused): it ends as it starts."""
        self.telemetry.operation_ended(operation, [])

    async def _flush_later(self) -> None:
        self._sleeping = True
        try:
            await asyncio.sleep(CHECK_DELAY_SECONDS)
        finally:
            self._sleeping = False
        await self._flush()

    async def _flush(self) -> None:
        while self._waiting:  # ends recorded during a flush are checked by the same task
            batch, self._waiting = self._waiting, {}
            await asyncio.gather(*(self._check(operation_id, ends) for operation_id, ends in batch.items()))

    async def _check(self, operation_id: str, ends: list[Chunk]) -> None:
        async with self._checks:
            await self._check_one(operation_id, ends)

    async def _check_one(self, operation_id: str, ends: list[Chunk]) -> None:
        try:
            operation = self._accepted.get(operation_id) or await self.ledger.operation(operation_id)
            if operation is None:
                return
            only = ends[0]
            if operation.first_seq == operation.last_seq and len(ends) == 1 and "-" not in only.chunk_id:
                chunks: Sequence[Chunk] = ends  # its only chunk, never split: no need to read the rest
            else:
                chunks = await self.ledger.chunks_of(operation)
            from shared.operations import status_of

            if status_of(operation, list(chunks)).terminal:
                self._accepted.pop(operation_id, None)
                self.telemetry.operation_ended(operation, chunks)
        except Exception:  # telemetry never fails the work it describes
            log.warning("operation %s: could not tell whether it ended", operation_id, exc_info=True)

    async def drain(self) -> None:
        """Check what is waiting now, for a few seconds at most (the process is closing, or a test looks)."""
        flusher = self._flusher
        if flusher is not None and not flusher.done() and self._sleeping:
            flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flusher
        elif flusher is not None and not flusher.done():
            await asyncio.wait([flusher], timeout=DRAIN_SECONDS)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(DRAIN_SECONDS):
                await self._flush()
