"""Connection faults between alertgate and its storage, ridden out by the storage seam (shared.storage).

In Azure the path from a Functions instance to its storage account closes idle connections (the load
balancer), forgets idle flows (a NAT or firewall: the next request on them is never answered), and now
and then loses an answer after the request was applied. Azurite on loopback does none of that, so these
cases put devhost.faultproxy between the app and Azurite's Table and Queue endpoints and judge the
outcome from the outside, by the same promises as the rest of the suite (tests/reliability/invariants.py:
nothing lost, nothing sent twice without a record, the limits held), plus what a caller must never see
here: an operation that does not end Succeeded (no MDE fault is scripted, so nothing may end
OutcomeUnknown or Failed), a bare 500, or a request that hangs (every exchange is bounded by
REQUEST_TIMEOUT seconds; longer counts as a hang).

1. **Idle connections** (`test_idle_connections`): requests paced about PACE seconds apart (GAPS), so
   the app's pooled connections go idle between them; the proxy closes (`idle-close`) or black-holes (`blackhole`) every
   connection idle for IDLE seconds.
2. **Lost answers** (`test_lost_answers`): requests from several callers at once; the proxy applies each
   Table and Queue request of the app and, with probability p (seeded), throws its answer away and
   resets the connection; the first claim, accept, mark, grant and finish are always among them. Callers
   behave as a playbook's retry policy: on 503, 500, 409 "in progress" (with its Retry-After) or a
   broken connection, the same request again with the same Idempotency-Key, with bounded back-off.

Each has a small variant, part of the README's test command, and a full one (`full`, run by
scripts/reliability.sh or with ALERTGATE_FULL=1). The module is marked `storage_faults`, to select it
alone:

    .venv/bin/python -m pytest -m storage_faults tests/reliability/test_storage_faults.py
    ALERTGATE_FULL=1 .venv/bin/python -m pytest -m storage_faults tests/reliability/test_storage_faults.py

A failing case lists every problem with its evidence: the caller's exchanges that went wrong (status or
error, duration), the operations that did not end Succeeded, and for each request the faults that hit
its own storage writes (matched by idempotency key, operation id and chunk id).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest

from devhost.faultproxy import FaultEvent, FaultPlan, FaultProxy, start_faultproxy
from devhost.services import Service, start_devhost
from emulators.control import EmulatorControl
from shared.idempotency import IdempotencyKey, KeyKind
from tests.integration.helpers import new_ids, post
from tests.reliability import invariants
from tests.reliability.conftest import app_env
from tests.reliability.invariants import Sent

pytestmark = pytest.mark.storage_faults

BATCH = "/api/alerts/batchUpdate"
ASYNC = {"Prefer": "respond-async"}
LIMITS = "20/1"
WINDOWS = invariants.parse_windows(LIMITS)
SETTINGS = {
    "DEFENDER_RATE_LIMITS": LIMITS,
    "RATE_LIMIT_SAFETY_MARGIN_SECONDS": "0.2",
    "DEFENDER_HTTP_TIMEOUT_SECONDS": "2",
    "SYNC_MAX_WAIT_SECONDS": "2",
    "SWEEP_SCHEDULE": "*/1 * * * * *",
    "SWEEP_GRACE_SECONDS": "2",
}
REQUEST_TIMEOUT = 30.0  # one exchange waiting longer than this for an answer is a hang
CALLER_SECONDS = 45.0  # how long a caller keeps re-sending one request (then its last try still runs out)
MAX_TRIES = 8
SETTLE_SECONDS = 45.0  # how long every accepted operation has to end once the callers are done
IDLE = 0.5
PACE = 0.7  # the mean gap between requests: the connections a request used are mostly idle by the next
# The gaps (seeded): most longer than IDLE, some within the proxy's idle check of it, where a request may
# meet a connection as it is being closed (the race every client of a load balancer meets now and then).
GAPS = (0.5, 0.52, 0.6, 0.7, 0.8, 0.9, 0.88)
TARGET_WRITES = frozenset({"claim", "accept", "mark", "grant", "finish"})


# --- what the callers saw -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Exchange:
    """One HTTP exchange with the app: when it started (s after the case began), what, how it ended."""

    at: float
    method: str
    path: str
    key: str | None
    status: int | None
    error: str | None
    seconds: float

    @property
    def hung(self) -> bool:
        return self.seconds >= REQUEST_TIMEOUT or "Timeout" in (self.error or "")

    def describe(self) -> str:
        outcome = str(self.status) if self.status is not None else self.error
        key = f" key={self.key}" if self.key else ""
        return f"t={self.at:6.1f}s {self.method} {self.path}{key} -> {outcome} after {self.seconds:.1f}s"


@dataclass
class Recorder:
    """Every exchange of the case's client session (the callers' POSTs and every poll), via a trace."""

    started: float = field(default_factory=time.monotonic)
    exchanges: list[Exchange] = field(default_factory=list)

    def trace(self) -> aiohttp.TraceConfig:
        config = aiohttp.TraceConfig()

        async def on_start(
            _: aiohttp.ClientSession, ctx: SimpleNamespace, params: aiohttp.TraceRequestStartParams
        ) -> None:
            ctx.begun = time.monotonic()

        async def on_end(
            _: aiohttp.ClientSession, ctx: SimpleNamespace, params: aiohttp.TraceRequestEndParams
        ) -> None:
            self._add(ctx, params.method, params.url, params.headers, params.response.status, None)

        async def on_error(
            _: aiohttp.ClientSession, ctx: SimpleNamespace, params: aiohttp.TraceRequestExceptionParams
        ) -> None:
            error = f"{type(params.exception).__name__}: {str(params.exception)[:120]}"
            self._add(ctx, params.method, params.url, params.headers, None, error)

        config.on_request_start.append(on_start)
        config.on_request_end.append(on_end)
        config.on_request_exception.append(on_error)
        return config

    def _add(
        self, ctx: SimpleNamespace, method: str, url: Any, headers: Any, status: int | None, error: str | None
    ) -> None:
        begun = float(getattr(ctx, "begun", time.monotonic()))
        self.exchanges.append(
            Exchange(
                begun - self.started,
                method,
                str(url.path),
                headers.get("Idempotency-Key"),
                status,
                error,
                time.monotonic() - begun,
            )
        )


@dataclass(frozen=True)
class Request:
    body: dict[str, Any]
    key: str
    respond_async: bool


@dataclass
class Outcome:
    request: Request
    operation_id: str | None = None
    answer: int | None = None  # the status that named the operation (None: only a 409 "in progress" did)
    refused: list[str] = field(default_factory=list)  # answers that are neither acceptance nor retryable


def backlog(case: str, n: int) -> list[Request]:
    """Every other request carries a (unique) comment, so a duplicate shows; half are deferred."""
    run = uuid.uuid4().hex[:8]
    requests = []
    for i in range(n):
        body: dict[str, Any] = {
            "alertIds": new_ids(1 + i % 2),
            "status": "Resolved",
            "classification": "FalsePositive",
            "determination": "NotMalicious",
        }
        if i % 2 == 0:
            body["comment"] = f"{case} {run} #{i}"
        requests.append(Request(body, f"faults-{run}-{i}", respond_async=(i // 2) % 2 == 1))
    return requests


async def submit(http: aiohttp.ClientSession, url: str, request: Request) -> Outcome:
    """POST as a playbook's retry policy would, bounded in tries and time (see the module docstring)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + CALLER_SECONDS
    headers = {"Idempotency-Key": request.key, **(ASYNC if request.respond_async else {})}
    outcome = Outcome(request)
    for attempt in range(MAX_TRIES):
        retry_after = 0.0
        try:
            status, answer_headers, document = await post(http, url, request.body, headers)
        except (aiohttp.ClientError, TimeoutError):
            status, answer_headers, document = None, {}, None
        except ValueError:  # a body that is not JSON (a bare 500 has none)
            status, answer_headers, document = 500, {}, None
        named = document.get("operationId") if isinstance(document, dict) else None
        if named and status in (200, 202, 502, 504):
            outcome.operation_id, outcome.answer = str(named), status
            return outcome
        if status == 409 and named:
            outcome.operation_id = str(named)  # in progress: someone holds the key; ask again later
        elif status not in (None, 500, 503):
            outcome.refused.append(f"{status} {json.dumps(document)[:300]}")
            return outcome
        retry_after = float(answer_headers.get("Retry-After", 0) or 0)
        delay = min(4.0, max(0.5 * 2**attempt, retry_after))
        if loop.time() + delay > deadline:
            break
        await asyncio.sleep(delay)
    return outcome


# --- the case ------------------------------------------------------------------------------------------


@dataclass
class StorageCase:
    """A development host of the app whose storage is reached through a fault proxy."""

    proxy: FaultProxy
    host: Service
    http: aiohttp.ClientSession
    recorder: Recorder
    ctl: EmulatorControl

    @property
    def url(self) -> str:
        return self.host.urls["base"] + BATCH


@pytest.fixture
async def storage_case(
    azurite: Service,
    emulators: Service,
    ctl: EmulatorControl,
    own_hosts: list[Service],
    tmp_path: Path,
) -> AsyncIterator[StorageCase]:
    proxy = await start_faultproxy(azurite.urls["connection_string"])
    recorder = Recorder()
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=REQUEST_TIMEOUT)
    http = aiohttp.ClientSession(timeout=timeout, trace_configs=[recorder.trace()])
    try:
        env = app_env(proxy.connection_string, emulators, **SETTINGS)
        host = await asyncio.to_thread(start_devhost, tmp_path / "logs", env, name="devhost-storage-faults")
        own_hosts.append(host)
        await ctl.configure(rateLimits=LIMITS)
        # Warm up without faults: the runtime built, its tables and queues created, a token cached.
        async with http.get(f"{host.urls['base']}/api/operations/{uuid.uuid4()}") as response:
            assert response.status == 404, await response.text()
        yield StorageCase(proxy, host, http, recorder, ctl)
    finally:
        await http.close()
        await asyncio.to_thread(_stop_all, own_hosts)  # before the proxy, so no host waits on a dead flow
        await proxy.close()


def _stop_all(hosts: list[Service]) -> None:
    for host in hosts:
        host.stop()


async def judge(case: StorageCase, outcomes: list[Outcome], what: str) -> None:
    """Every promise of the suite plus this module's (module docstring); one failure listing them all."""
    recorder, started = case.recorder, time.monotonic()
    sent = [Sent(o.request.body, o.operation_id, o.answer) for o in outcomes if o.operation_id]
    problems: list[str] = []
    for o in outcomes:
        if o.operation_id is None or o.refused:
            tries = [e.describe() for e in recorder.exchanges if e.key == o.request.key]
            problems.append(
                f"request {o.request.key} was never accepted (refused: {o.refused}); its tries: {tries}"
            )
    resources: dict[str, dict[str, Any]] = {}
    try:
        verdict = await invariants.check(
            case.ctl, case.http, case.host.urls["base"], sent, windows=WINDOWS, within=SETTLE_SECONDS
        )
        resources = verdict.resources
    except AssertionError as broken:  # its operations dump is left out: the lines below say more
        problems.append(f"invariants: {str(broken).split(chr(10) + 'operations:')[0][:5000]}")
    faults_then = list(case.proxy.faults)
    case.proxy.set_plan(FaultPlan())  # read the outcome without faults
    if not resources:
        resources = await _read_operations(case, [s.operation_id for s in sent])
    key_of = {o.operation_id: o.request.key for o in outcomes if o.operation_id}
    for operation_id, resource in resources.items():
        statuses = Counter(c["status"] for c in resource.get("chunks", []))
        if resource.get("status") != "Succeeded" or set(statuses) != {"Succeeded"}:
            chunks = [
                {k: c.get(k) for k in ("chunkId", "status", "attempts", "lastError")}
                for c in resource.get("chunks", [])
                if c["status"] != "Succeeded"
            ]
            problems.append(
                f"request {key_of.get(operation_id)} (operation {operation_id}) ended "
                f"{resource.get('status')} with chunks {dict(statuses)}: {chunks}"
            )
    bare = [e.describe() for e in recorder.exchanges if e.status == 500]
    if bare:
        problems.append(f"{len(bare)} bare 500 answer(s): {bare[:20]}")
    hung = [e.describe() for e in recorder.exchanges if e.hung]
    if hung:
        problems.append(f"{len(hung)} exchange(s) hung (no answer within {REQUEST_TIMEOUT:g}s): {hung[:20]}")
    if problems:
        attribution = _faults_by_request(faults_then, outcomes, resources)
        statuses = Counter(
            f"{e.method} {'operations' if '/operations/' in e.path else 'batchUpdate'} "
            f"{e.status if e.status is not None else (e.error or '').split(':')[0]}"
            for e in recorder.exchanges
        )
        raise AssertionError(
            f"{what}: {len(problems)} problem(s)\n- "
            + "\n- ".join(problems)
            + f"\nexchanges by outcome: {dict(statuses)}"
            + "\nPOST answers that did not accept (the caller re-sent):\n  "
            + ("\n  ".join(e.describe() for e in recorder.exchanges if _retried(e)) or "(none)")
            + f"\nfaults by kind and op: {dict(Counter((f.kind, _op(f)) for f in faults_then))}"
            + "\nfaults that hit each request's own storage operations:\n"
            + ("\n".join(attribution) or "  (none attributable)")
            + f"\n(judged in {time.monotonic() - started:.1f}s)"
        )


def _retried(exchange: Exchange) -> bool:
    return exchange.method == "POST" and exchange.status not in (200, 202, 502, 504)


def _op(fault: FaultEvent) -> str:
    return fault.request.op if fault.request is not None else "(no request)"


async def _read_operations(case: StorageCase, operation_ids: list[str]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for operation_id in operation_ids:
        try:
            async with case.http.get(f"{case.host.urls['base']}/api/operations/{operation_id}") as response:
                document = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError):
            continue
        if isinstance(document, dict) and document.get("operationId") == operation_id:
            found[operation_id] = document
    return found


def _faults_by_request(
    faults: list[FaultEvent], outcomes: list[Outcome], resources: dict[str, dict[str, Any]]
) -> list[str]:
    """Each request's faults: its key's partition (claim, complete), its operation's row (accept), its
    chunks' rows (mark, finish, update-pending); budget and queue faults belong to no one request."""
    owner: dict[str, str] = {}
    for o in outcomes:
        owner[IdempotencyKey(KeyKind.EXPLICIT, o.request.key).partition_key] = o.request.key
        if o.operation_id:
            owner[f"o-{o.operation_id}"] = o.request.key
    for operation_id, resource in resources.items():
        key = owner.get(f"o-{operation_id}")
        for chunk in resource.get("chunks", []):
            if key:
                owner[f"p-{chunk['chunkId']}"] = owner[f"r-{chunk['chunkId']}"] = key
    lines: dict[str, list[str]] = {}
    for fault in faults:
        request = fault.request
        keys = request.keys if request is not None else ()
        hits = {owner.get(pk) or owner.get(rk) for pk, rk in keys} - {None}
        name = ", ".join(sorted(h for h in hits if h)) or "(shared: budget, queue or unmatched)"
        status = f" (Azurite answered {fault.upstream_status})" if fault.upstream_status is not None else ""
        lines.setdefault(name, []).append(f"{fault.kind} {_op(fault)}{status}")
    return [f"  {name}: {', '.join(items)}" for name, items in sorted(lines.items())]


# --- 1. idle connections ------------------------------------------------------------------------------


@dataclass(frozen=True)
class IdleSize:
    requests: int
    min_faults: int


IDLE_SIZES = [
    pytest.param(IdleSize(requests=8, min_faults=3), id="small"),
    pytest.param(IdleSize(requests=50, min_faults=20), id="full", marks=pytest.mark.full),
]


@pytest.mark.parametrize("size", IDLE_SIZES)
@pytest.mark.parametrize("kind", ["idle-close", "blackhole"])
async def test_idle_connections(storage_case: StorageCase, kind: str, size: IdleSize) -> None:
    """Requests PACE seconds apart; every app connection idle for IDLE seconds is closed (idle-close) or
    silently dropped (blackhole). Every request is accepted, every operation ends Succeeded, no answer is a
    bare 500, nothing hangs."""
    case = storage_case
    plan = FaultPlan(idle_close_after=IDLE) if kind == "idle-close" else FaultPlan(blackhole_after=IDLE)
    case.proxy.clear()
    case.proxy.set_plan(plan)
    requests = backlog(f"idle {kind}", size.requests)

    gaps = random.Random(size.requests).choices(GAPS, k=size.requests)
    starts = [sum(gaps[:n]) for n in range(size.requests)]

    async def paced(start: float, request: Request) -> Outcome:
        await asyncio.sleep(start)  # open loop: a slow or hung request does not delay the next
        return await submit(case.http, case.url, request)

    outcomes = await asyncio.gather(*(paced(t, r) for t, r in zip(starts, requests, strict=True)))
    faults = case.proxy.faults_of(kind)
    assert len(faults) >= size.min_faults, (
        f"precondition: at least {size.min_faults} {kind} faults, got {len(faults)}: {case.proxy.fault_ops()}"
    )
    await judge(case, outcomes, f"{kind} after {IDLE:g}s idle, {size.requests} requests {PACE:g}s apart")


# --- 2. lost answers -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DropSize:
    requests: int
    callers: int
    probability: float
    min_drops: int


DROP_SIZES = [
    pytest.param(DropSize(requests=24, callers=6, probability=0.05, min_drops=5), id="small"),
    pytest.param(
        DropSize(requests=300, callers=12, probability=0.02, min_drops=10), id="full", marks=pytest.mark.full
    ),
]


@pytest.mark.parametrize("size", DROP_SIZES)
async def test_lost_answers(storage_case: StorageCase, size: DropSize) -> None:
    """Answers of applied Table and Queue requests lost with probability p, and always the first claim,
    accept, mark, grant and finish's; callers re-send with their Idempotency-Key. Every request is accepted
    once, every operation ends Succeeded (no OutcomeUnknown), no comment twice, no window over its limit,
    no bare 500, nothing hangs."""
    case = storage_case
    case.proxy.clear()
    case.proxy.set_plan(FaultPlan(drop_probability=size.probability, drop_once=TARGET_WRITES, seed=20240601))
    requests = backlog("lost answers", size.requests)
    queue: asyncio.Queue[Request] = asyncio.Queue()
    for request in requests:
        queue.put_nowait(request)
    outcomes: list[Outcome] = []

    async def caller() -> None:
        while not queue.empty():
            outcomes.append(await submit(case.http, case.url, queue.get_nowait()))

    await asyncio.gather(*(caller() for _ in range(size.callers)))
    drops = case.proxy.faults_of("drop")
    spread = {f.request.op for f in drops if f.request is not None}
    assert len(drops) >= size.min_drops and spread >= TARGET_WRITES, (
        f"precondition: at least {size.min_drops} drops over {sorted(TARGET_WRITES)}, got "
        f"{len(drops)}: {case.proxy.fault_ops('drop')}"
    )
    await judge(case, outcomes, f"answers lost with p={size.probability:g}, {size.requests} requests")
