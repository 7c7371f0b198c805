"""In-memory stand-ins for what lies upstream of alertgate's state: MDE (a scripted channel), the token
provider, the queues, and a manual clock; and `build`, which wires one tenant's real services (Ledger,
IdempotencyStore, RateLimiter, BatchLimit, Sender, Worker, Intake) over MemoryTables the way
shared.tenants.build_tenant does over Table Storage. Only MDE, tokens and queues are faked.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import pytest

from shared.channels.base import CallKind, CallResult, UpstreamError
from shared.channels.batch_update import BUDGET_ROW_KEY, BatchLimit, classify_batch_update
from shared.channels.patch import BUDGET_ROW_KEY as PATCH_ROW_KEY
from shared.idempotency import IdempotencyStore
from shared.intake import Intake
from shared.ledger import AcceptPlan, Chunk, Ledger, OrderView, new_operation_id
from shared.ratelimit import RateLimiter, parse_log
from shared.sender import Sender
from shared.settings import Settings, load_settings
from shared.telemetry import EndWatcher, Telemetry
from shared.worker import Worker
from tests.fakes import MemoryTable

if TYPE_CHECKING:
    from azure.data.tables import TableEntity

    from shared.queues import Queues
    from shared.storage import Entity, Operation
    from shared.tokens import TokenProvider

START = 1_700_000_000.0
ID1, ID2, ID3, ID4 = (f"da63739979405027358{n}_76070737{n}" for n in range(1, 5))

BASE_ENV = {
    "AzureWebJobsStorage": "UseDevelopmentStorage=true",
    "DEFENDER_RATE_LIMITS": "1000/1",
    "RATE_LIMIT_SAFETY_MARGIN_SECONDS": "0",
    "DEFENDER_PATCH_RATE_LIMITS": "off",  # a test that wants the PATCH channel sets its limits
}


def settings_for(**overrides: str) -> Settings:
    return load_settings({**BASE_ENV, **overrides})


# --- time ------------------------------------------------------------------------------------------------


class ManualClock:
    """Epoch seconds that move only when told to (or when a virtual sleep passes)."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


_real_sleep = asyncio.sleep


def install_virtual_sleep(monkeypatch: pytest.MonkeyPatch, clock: ManualClock) -> list[float]:
    """asyncio.sleep moves `clock` on instead of waiting (it still yields to the loop once).

    Settings alone cannot make every wait ~0: the worker always reserves MARK_LEAD_SECONDS ahead (as
    does a retry after a stale grant), a reserved slot is slept for, and a storage retry pauses
    PERSIST_RETRY_SECONDS; in real time those would cost the unit run seconds. For a test module's
    fixture only (monkeypatch undoes it). Returns the sleeps asked for, in order."""
    slept: list[float] = []

    async def sleep(delay: float, result: Any = None) -> Any:
        if delay > 0:
            slept.append(delay)
            clock.advance(delay)
        await _real_sleep(0)
        return result

    monkeypatch.setattr(asyncio, "sleep", sleep)
    return slept


# --- MDE -------------------------------------------------------------------------------------------------


OK = CallResult(CallKind.OK)


def answer(
    status: int,
    code: str | None = None,
    message: str = "",
    *,
    target: str | None = None,
    retry_after: float | None = None,
) -> CallResult:
    """MDE's HTTP answer with its error body, classified by the batchUpdate channel's own rules."""
    body = {"error": {"code": code, "message": message or f"HTTP {status}", "target": target}}
    header = None if retry_after is None else f"{retry_after:g}"
    return classify_batch_update(status, header, json.dumps(body))


def too_large(allowed: int | None) -> CallResult:
    """400 MaximumBatchSizeExceeded, saying how many ids MDE allows (or not)."""
    said = f" allowed: {allowed}" if allowed is not None else ""
    return answer(400, "MaximumBatchSizeExceeded", f"Maximum batch size exceeded.{said}")


def unknown(*, timed_out: bool = False) -> CallResult:
    """Sent, no answer: the request may have been applied."""
    error = UpstreamError(None, "OutcomeUnknown", "The request was sent but no answer came.")
    return CallResult(CallKind.OUTCOME_UNKNOWN, error, timed_out=timed_out)


def not_sent(*, timed_out: bool = False) -> CallResult:
    return CallResult(
        CallKind.RETRYABLE, UpstreamError(None, "NotSent", "not sent"), timed_out=timed_out, sent=False
    )


@dataclass(frozen=True)
class Call:
    alert_ids: tuple[str, ...]
    fields: dict[str, str]
    token: str
    at: float


Scripted = CallResult | Callable[[], CallResult]


class FakeChannel:
    """The Channel protocol over a script: each call returns the next scripted result (OK once it runs
    out) and is recorded. Its limiter is real, and its split policy is batchUpdate's (a real BatchLimit
    over the budget table: a smaller allowance is remembered for every instance)."""

    name = "fake"

    def __init__(
        self,
        limiter: RateLimiter,
        batch_limit: BatchLimit | None,
        clock: Callable[[], float],
        name: str = "fake",
    ) -> None:
        self.name = name
        self.limiter = limiter
        self.batch_limit = batch_limit
        self.script: list[Scripted] = []
        self.calls: list[Call] = []
        self._clock = clock

    def then(self, *results: Scripted) -> FakeChannel:
        self.script.extend(results)
        return self

    async def max_alerts(self) -> int:
        return 1 if self.batch_limit is None else await self.batch_limit.refresh()

    async def learn_limit(self, result: CallResult, attempted: int) -> int | None:
        if self.batch_limit is None or result.kind is not CallKind.BATCH_TOO_LARGE or attempted <= 1:
            return None
        return await self.batch_limit.learn(result.allowed_batch_size, attempted)

    async def send(self, alert_ids: tuple[str, ...], fields: Mapping[str, str], token: str) -> CallResult:
        self.calls.append(Call(tuple(alert_ids), dict(fields), token, self._clock()))
        if not self.script:
            return OK
        step = self.script.pop(0)
        return step() if callable(step) else step


class TokenError(Exception):
    """What the identity endpoint raises when it cannot issue a token."""


class FakeTokens:
    """token() and refresh(rejected) from scripts; a script entry that is an exception is raised."""

    def __init__(
        self, token: str | Exception = "token-1", fresh: Sequence[str | Exception] = ("token-2",)
    ) -> None:
        self.current = token
        self.fresh = list(fresh)
        self.token_calls = 0
        self.rejected: list[str | None] = []
        self.on_token: Callable[[int], None] | None = None

    async def token(self) -> str:
        self.token_calls += 1
        if self.on_token is not None:
            self.on_token(self.token_calls)
        if isinstance(self.current, Exception):
            raise self.current
        return self.current

    async def refresh(self, rejected: str | None = None) -> str:
        self.rejected.append(rejected)
        if not self.fresh:
            raise TokenError("no fresh token scripted")
        nxt = self.fresh.pop(0)
        if isinstance(nxt, Exception):
            raise nxt
        self.current = nxt
        return nxt

    async def close(self) -> None:
        pass


@dataclass(frozen=True)
class Sent:
    chunk_id: str
    token: str
    delay: float


class FakeQueues:
    """send_chunk and resend_request, recorded."""

    def __init__(self) -> None:
        self.chunks: list[Sent] = []
        self.requests: list[tuple[str, float]] = []

    async def send_chunk(self, chunk_id: str, token: str, delay: float) -> None:
        self.chunks.append(Sent(chunk_id, token, delay))

    async def resend_request(self, content: str, delay: float) -> None:
        self.requests.append((content, delay))


# --- storage -----------------------------------------------------------------------------------------------


class TappedStore:
    """A StateStore in front of a MemoryTable, for interleavings: `before(method, hook)` runs `hook`
    once, just before a later call of that method reaches the table (another instance's write landing
    between this one's read and write). Faults are the table's own (`inner.fail_next`)."""

    def __init__(self, inner: MemoryTable) -> None:
        self.inner = inner
        self.hooks: dict[str, list[tuple[int, Callable[[], Awaitable[None]]]]] = {}
        self.counts: Counter[str] = Counter()

    def before(self, method: str, hook: Callable[[], Awaitable[None]], *, skip: int = 0) -> None:
        """Run `hook` once, before the call of `method` that comes after `skip` more calls of it."""
        self.hooks.setdefault(method, []).append((skip, hook))

    async def _enter(self, method: str) -> None:
        self.counts[method] += 1
        due = [hook for skip, hook in self.hooks.get(method, []) if skip == 0]
        self.hooks[method] = [(skip - 1, hook) for skip, hook in self.hooks.get(method, []) if skip > 0]
        for hook in due:
            await hook()

    @property
    def name(self) -> str:
        return self.inner.name

    async def get(self, partition_key: str, row_key: str) -> TableEntity | None:
        await self._enter("get")
        return await self.inner.get(partition_key, row_key)

    async def query(
        self, query: str, parameters: dict[str, Any], select: list[str] | None = None
    ) -> list[TableEntity]:
        await self._enter("query")
        return await self.inner.query(query, parameters, select)

    async def insert(self, entity: Entity) -> str | None:
        await self._enter("insert")
        return await self.inner.insert(entity)

    async def replace(self, entity: Entity, etag: str | None) -> str | None:
        await self._enter("replace")
        return await self.inner.replace(entity, etag)

    async def delete(self, partition_key: str, row_key: str, etag: str | None = None) -> bool:
        await self._enter("delete")
        return await self.inner.delete(partition_key, row_key, etag)

    async def transact(
        self, operations: Sequence[Operation], sent: Callable[[], None] | None = None
    ) -> list[str | None] | None:
        await self._enter("transact")
        return await self.inner.transact(operations, sent)


# --- one tenant, wired ---------------------------------------------------------------------------------------


@dataclass
class Rig:
    """One tenant's real services over in-memory tables, with MDE, tokens and queues faked."""

    clock: ManualClock
    settings: Settings
    keys_table: TappedStore
    operations: TappedStore
    budget: TappedStore
    limiter: RateLimiter
    batch_limit: BatchLimit
    channel: FakeChannel
    tokens: FakeTokens
    queues: FakeQueues
    ledger: Ledger
    keys: IdempotencyStore
    sender: Sender
    worker: Worker
    intake: Intake
    patch: FakeChannel | None = None  # the PATCH channel, when DEFENDER_PATCH_RATE_LIMITS is set

    @property
    def calls(self) -> list[Call]:
        return self.channel.calls

    async def budget_log(self, row_key: str = BUDGET_ROW_KEY) -> list[float]:
        """The shared budget's log of grants and reserved slots (epoch seconds), as stored."""
        entity = self.budget.inner.peek("mde", row_key)
        return [ms / 1000 for ms in parse_log(str(entity.get("Log") or ""))] if entity is not None else []

    def blocked_until(self, row_key: str = BUDGET_ROW_KEY) -> float:
        entity = self.budget.inner.peek("mde", row_key)
        value = entity.get("BlockedUntil") if entity is not None else None
        return int(getattr(value, "value", value) or 0) / 1000

    async def accept(
        self,
        *ids: str,
        fields: Mapping[str, str] | None = None,
        chunks: int = 1,
        operation_id: str = "",
        view: OrderView | None = None,
    ) -> list[Chunk]:
        """Accept an operation straight into the ledger, as a request taken in would be: its chunks,
        Pending (the first marked Sending with a `view` that found the order clear)."""
        fields = dict(fields or {"status": "Resolved"})
        ids = ids or (ID1,)
        size = -(-len(ids) // chunks)
        plan = AcceptPlan(
            operation_id or new_operation_id(),
            "http",
            {},
            [(tuple(ids[i : i + size]), fields) for i in range(0, len(ids), size)],
            "digest",
        )
        _, accepted = await self.ledger.accept(plan, view)
        return accepted

    async def pending(self, chunk: Chunk | str) -> Chunk | None:
        return await self.ledger.pending_chunk(chunk if isinstance(chunk, str) else chunk.chunk_id)

    async def finished(self, chunk: Chunk | str) -> Chunk | None:
        return await self.ledger.finished_chunk(chunk if isinstance(chunk, str) else chunk.chunk_id)

    async def stored(self, chunk: Chunk) -> Chunk:
        """The chunk's p- entry as stored (also when it ended in place)."""
        entity = self.operations.inner.peek(self.ledger.partition, chunk.pending_key)
        assert entity is not None, f"chunk {chunk.chunk_id} has no pending entry"
        return Chunk.from_entity(entity)


def build(
    clock: ManualClock | None = None,
    *,
    env: Mapping[str, str] | None = None,
    limiter_clock: Callable[[], float] | None = None,
    tokens: FakeTokens | None = None,
    script: Iterable[Scripted] = (),
    telemetry: Telemetry | None = None,
) -> Rig:
    """Wire a tenant like shared.tenants.build_tenant (home names: budget partition `mde`, ledger
    partition `ledger`, no key space), every part on `clock` (the limiter on `limiter_clock` if given)."""
    clock = clock or ManualClock()
    settings = settings_for(**dict(env or {}))
    keys_table, operations, budget = (TappedStore(MemoryTable()) for _ in range(3))
    limiter = RateLimiter(
        budget,
        settings.defender_rate_limits,
        settings.rate_limit_safety_margin_seconds,
        partition_key="mde",
        row_key=BUDGET_ROW_KEY,
        clock=limiter_clock or clock,
    )
    batch_limit = BatchLimit(settings.defender_max_alerts_per_call, budget, partition_key="mde")
    channel = FakeChannel(limiter, batch_limit, clock).then(*script)
    patch = None
    if settings.defender_patch_rate_limits is not None:
        patch_limiter = RateLimiter(
            budget,
            settings.defender_patch_rate_limits,
            settings.rate_limit_safety_margin_seconds,
            partition_key="mde",
            row_key=PATCH_ROW_KEY,
            clock=limiter_clock or clock,
        )
        patch = FakeChannel(patch_limiter, None, clock, name="patch")
    tokens = tokens or FakeTokens()
    queues = FakeQueues()
    ledger = Ledger(operations, clock)
    keys = IdempotencyStore(
        keys_table,
        explicit_ttl=settings.idempotency_ttl_seconds,
        derived_ttl=settings.derived_key_ttl_seconds,
        claim_lease=settings.sync_max_wait_seconds
        + 2 * settings.defender_http_timeout_seconds
        + settings.sweep_grace_seconds,
        clock=clock,
    )
    figures = telemetry.tenant("home") if telemetry is not None else None
    if figures is not None:  # as build_tenant wires it
        ledger.watcher = EndWatcher(ledger, figures)
    sender = Sender(
        settings,
        ledger,
        channel,
        cast("TokenProvider", tokens),
        cast("Queues", queues),
        clock=clock,
        patch=patch,
        telemetry=figures,
    )
    worker = Worker(sender, clock)
    intake = Intake(settings, keys, ledger, sender, clock)
    return Rig(
        clock, settings, keys_table, operations, budget, limiter, batch_limit, channel, tokens, queues,
        ledger, keys, sender, worker, intake, patch,
    )  # fmt: skip
