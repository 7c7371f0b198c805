"""One tenant blocked by a 429 must not slow another: tenant B's drain alone and beside a blocked tenant A.

    python -m bench.tenants [--runs 3] [--a-updates 40] [--b-updates 20] [--spread 1] [--limits 5/2,20/20]
                            [--retry-after 3] [--block-after 3] [--no-control] [--margin 0.1]
                            [--timeout 90] [--out bench/results/tenants.txt]

alertgate serves several Entra tenants from one deployment (docs/contracts.md §8): each has its own
budget rows, order, keys and ledger partition, but they share the process, the storage account and the
chunks queue. The issue asks: "tenant A keeps a backlog of 40 updates draining at its limit, then gets a
429 with Retry-After 30 s (scaled). Meanwhile tenant B drains 20 updates as fast as when it is alone."

- One development host serves two customer tenants (`DEFENDER_TENANTS`: `tenant-a`, `tenant-b`, fixed
  GUIDs), whose tokens come from the emulators' Entra endpoint (client assertion: the identity emulator's
  token for api://AzureADTokenExchange; `AZURE_AUTHORITY_HOST` and `SSL_CERT_FILE` point the host there).
  Each request is a `POST /api/tenants/{tenant}/alerts/batchUpdate` of one alert with its own comment and
  its own Idempotency-Key, so every update is one call at the budget (coalescing is bench.throughput's).
- Limits `--limits` (5/2,20/20) on batchUpdate, on the emulator (which keeps a budget per tenant) and in
  alertgate (each tenant's `rateLimits`). PATCH is off (`DEFENDER_PATCH_RATE_LIMITS=off`): at its scaled
  limits (50/2,60/20) A's 40 one-alert updates would all go by PATCH within its minute, and there would be
  no backlog draining at A's limit. `RATE_LIMIT_SAFETY_MARGIN_SECONDS` `--margin`, `SYNC_MAX_WAIT_SECONDS`
  0.5, queue `maxPollingInterval` 0.5 s (as bench.drain).
- Phases, alternating, `--runs` (3) times each; every phase has a new host (new tables, so new budget
  rows, and new queues) and a reset emulator (calls, faults, every tenant's alerts and windows):
  - "B alone": `--b-updates` (20) updates for B arriving evenly over `--spread` (1) s;
  - "A blocked + B": the same arrivals for B and, over the same interval, `--a-updates` (40) for A. A's
    call number `--block-after` + 1 (the 4th) is answered 429 with `Retry-After: --retry-after` (3 s), a
    fault the emulator gives only to A's tenant (queued before the phase: `--block-after` pass-through
    faults for A, then the 429, so it lands on that call however the calls interleave). The phase waits
    until A has drained too;
  - "A + B, no 429" (a control; `--no-control` leaves it out): the same load without the 429, until B
    has drained. It tells what A's load alone costs B (one process on a 2-core machine takes both
    tenants' requests), apart from A's block.
- Figures, per phase and tenant, from the emulator's call records (each carries the `tenantId` of its
  token): calls, 429s (the scripted one apart from the limiter's), updates applied, lost, applied more
  than once, B's first call, drain time (the first planned arrival to the emulator's receive time of the
  call that applied the tenant's last update; the emulator's clock is the machine's monotonic clock, as
  ours), the most admitted calls in any window of each limit, alertgate's answer times to the callers;
  calls whose `tenantId` is not the tenant whose route sent the update; alerts found in another tenant's
  emulator state. Then B's drain with A blocked over B's drain alone (medians, and each pair) against the
  1.1x target, A's calls during its block, and the grants alertgate gave up as too old (its log).

Retry-After: the emulator's header is whole seconds, at least 1 (as MDE's), so the issue's 30 s at time
factor 1/60 (0.5 s) cannot be said. It would block nothing either: A's own short window already keeps A
from calling for about 2 s after each 5 calls. `--retry-after` 3 blocks A for one and a half of its short
windows (at 1/60, three minutes), so A's next calls come later than its budget alone would allow while B
drains. Everything is bounded by `--timeout` per phase; every service is stopped at the end whatever
happens. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import Stack, alert_id, header, write_output
from bench.drain import idle_budget
from bench.reference import minimum_schedule
from devhost.services import REPO_ROOT
from emulators import APP_CLIENT_ID
from emulators.control import EmulatorControl, max_calls_in_any_window
from shared.settings import RateWindow, parse_rate_limits

DEFAULT_OUT = REPO_ROOT / "bench" / "results" / "tenants.txt"
TARGET_RATIO = 1.1
MAX_UPDATES = 500
MAX_RUNS = 10
CALLER_RETRIES = 5  # a 409 or 503 (or no answer) is re-sent with the same key, as a careful caller would
POLL_SECONDS = 0.25
TIMEOUT = aiohttp.ClientTimeout(total=30)


@dataclass(frozen=True)
class Tenant:
    name: str  # its name in DEFENDER_TENANTS and the route
    label: str  # A or B, in the output
    tenant_id: str
    base: int  # its alerts are alert_id(base + n): no two tenants share an alert

    def alerts(self, count: int) -> list[str]:
        return [alert_id(self.base + n) for n in range(count)]


TENANT_A = Tenant("tenant-a", "A", "a0000000-0000-4000-8000-00000000000a", 10_000)
TENANT_B = Tenant("tenant-b", "B", "b0000000-0000-4000-8000-00000000000b", 20_000)


def offsets(count: int, spread: float) -> list[float]:
    """`count` arrivals evenly over `spread` seconds, the first at 0."""
    return [n * spread / count for n in range(count)]


def body_for(tenant: Tenant, n: int) -> dict[str, Any]:
    """Update n of a tenant: one alert, its own comment (so no two updates can share a call)."""
    return {
        "alertIds": [alert_id(tenant.base + n)],
        "status": "Resolved",
        "classification": "FalsePositive",
        "comment": f"bench.tenants {tenant.label} update {n}",
    }


def fault_script(tenant_id: str, after: int, retry_after: float) -> list[dict[str, Any]]:
    """The faults that answer the tenant's call number `after` + 1 with 429 and `Retry-After`: `after`
    pass-through faults (no delay, applied normally), then the 429, all for that tenant only. The
    emulator's FIFO hands a tenant's faults to that tenant's admitted calls in order, so the 429 lands on
    exactly that call however the calls interleave with other tenants'."""
    passing = [{"delaySeconds": 0, "apply": True, "tenantId": tenant_id} for _ in range(after)]
    return [*passing, {"status": 429, "retryAfter": retry_after, "tenantId": tenant_id}]


def call_alerts(call: dict[str, Any]) -> list[str]:
    ids = call.get("alertIds")
    return [a for a in ids if isinstance(a, str)] if isinstance(ids, list) else []


@dataclass
class Figures:
    """One tenant's side of one phase, from the emulator's call records (times from the first arrival)."""

    calls: int = 0
    ok: int = 0
    limiter_429: int = 0  # refused by the emulator's rate limiter: alertgate overran the budget
    scripted_429: int = 0  # the injected block
    other: int = 0
    applied: int = 0
    lost: int = 0
    twice: int = 0
    first_call: float | None = None
    # The most any call came after the earliest moment its arrival and the tenant's own windows (with
    # alertgate's margin) allowed, given the tenant's earlier calls: time lost to anything but its budget.
    late_max: float | None = None
    drain: float | None = None  # None: some update was never applied
    busiest: tuple[int, ...] = ()  # most admitted calls in any window, per limit
    block_at: float | None = None  # when the scripted 429 was received
    in_block: list[float] = field(default_factory=list)  # calls received during the block, s after the 429
    resumed: float | None = None  # the first call received once the block was over


def tally(
    calls: list[dict[str, Any]],
    tenant_id: str,
    alerts: list[str],
    first_arrival: float,
    windows: tuple[RateWindow, ...],
    block_seconds: float = 0.0,
) -> Figures:
    """The tenant's calls (by the `tenantId` of their token) and what they applied of `alerts`.

    An update counts as applied when a call of this tenant answered 200 carried its alert; its time is
    the first such call's. The drain is the latest of those times over the tenant's alerts. A scripted
    429 (a record with a `fault`) blocks the tenant for `block_seconds`: the calls received meanwhile are
    listed (a call already under way when the 429 was answered cannot be helped)."""
    mine = sorted((c for c in calls if c.get("tenantId") == tenant_id), key=lambda c: float(c["time"]))
    times = [float(c["time"]) - first_arrival for c in mine]
    figures = Figures(calls=len(mine), first_call=times[0] if times else None)
    applied_at: dict[str, list[float]] = {}
    wanted = set(alerts)
    for call, at in zip(mine, times, strict=True):
        status = call.get("status")
        if status == 200:
            figures.ok += 1
            for alert in call_alerts(call):
                if alert in wanted:
                    applied_at.setdefault(alert, []).append(at)
        elif status == 429 and call.get("fault"):
            figures.scripted_429 += 1
            if figures.block_at is None:
                figures.block_at = at
        elif status == 429:
            figures.limiter_429 += 1
        else:
            figures.other += 1
    if figures.block_at is not None:
        end = figures.block_at + block_seconds
        figures.in_block = [t - figures.block_at for t in times if figures.block_at < t < end]
        figures.resumed = next((t for t in times if t >= end), None)
    figures.applied = len(applied_at)
    figures.lost = len(wanted) - figures.applied
    figures.twice = sum(1 for times in applied_at.values() if len(times) > 1)
    if alerts and figures.lost == 0:
        figures.drain = max(min(times) for times in applied_at.values())
    admitted = [float(c["time"]) for c in mine if c.get("admitted")]
    figures.busiest = tuple(max_calls_in_any_window(admitted, w.seconds) for w in windows)
    return figures


def tid_mismatches(calls: list[dict[str, Any]], owner: dict[str, str]) -> int:
    """Calls that named an alert of one tenant but carried a token of another (or none that was valid)."""
    wrong = 0
    for call in calls:
        owners = {owner[a] for a in call_alerts(call) if a in owner}
        if owners and owners != {call.get("tenantId")}:
            wrong += 1
    return wrong


def median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


ALONE, BLOCKED, CONTROL = "B alone", "A blocked + B", "A + B, no 429"


@dataclass
class Phase:
    name: str  # ALONE, BLOCKED or CONTROL
    run: int
    awaited: set[str]  # the tenants (labels) whose every update the phase waited for
    figures: dict[str, Figures] = field(default_factory=dict)  # by tenant label
    answer_times: dict[str, list[float]] = field(default_factory=dict)  # alertgate's, per request
    calls: int = 0
    mismatches: int = 0
    misplaced: int = 0  # alerts in the emulator state of a tenant that did not send them
    answers: Counter[int] = field(default_factory=Counter)  # what alertgate answered callers
    b_calls_in_block: int = 0  # B's calls answered 200 while A was blocked
    timed_out: bool = False
    stale_grants: int = 0  # grants given up as too old when their call would start (the host's log)
    # For diagnosis: the emulator's call records and the first planned arrival on their clock.
    records: list[dict[str, Any]] = field(default_factory=list)
    start: float = 0.0


async def run_phase(
    stack: Stack,
    host_url: str,
    phase: Phase,
    work: list[tuple[Tenant, int]],
    block: list[dict[str, Any]] | None,
    args: argparse.Namespace,
) -> Phase:
    """Send each tenant's updates at their planned times, then wait until every update of the awaited
    tenants is applied (or --timeout)."""
    loop = asyncio.get_running_loop()
    owner = {a: t.tenant_id for t, count in work for a in t.alerts(count)}
    awaited = {a for t, count in work if t.label in phase.awaited for a in t.alerts(count)}
    urls = stack.emulators.urls
    async with (
        EmulatorControl(urls["mde"], urls["identity_base"]) as ctl,
        aiohttp.ClientSession(timeout=TIMEOUT) as session,
    ):
        # The runtime and each tenant's token (health fetches them) before the clock starts; the budget
        # check may fail here, as the tables are created by the first request.
        async with session.get(f"{host_url}/api/health") as response:
            health = await response.json(content_type=None)
        for tenant, _ in work:
            check = health.get("tenants", {}).get(tenant.name, {}).get("checks", {}).get("token", {})
            if not check.get("ok"):
                raise RuntimeError(f"{tenant.name} got no token in the host: {json.dumps(check)[:600]}")
        await ctl.reset()
        if block:
            await ctl.add_faults(block)
        start = loop.time() + 0.3
        deadline = start + args.timeout
        tag = uuid.uuid4().hex[:8]

        async def send(tenant: Tenant, n: int, offset: float) -> None:
            await asyncio.sleep(max(0.0, start + offset - loop.time()))
            sent = loop.time()
            url = f"{host_url}/api/tenants/{tenant.name}/alerts/batchUpdate"
            headers = {"Idempotency-Key": f"tenants-{tag}-{tenant.label}-{n}"}
            for attempt in range(CALLER_RETRIES + 1):
                try:
                    async with session.post(url, json=body_for(tenant, n), headers=headers) as response:
                        await response.read()
                        status = response.status
                        retry_after = float(response.headers.get("Retry-After", "1") or 1)
                except (aiohttp.ClientError, TimeoutError):
                    status, retry_after = 0, 1.0
                if status in (0, 409, 503) and attempt < CALLER_RETRIES:
                    await asyncio.sleep(min(retry_after, 2.0))
                    continue
                phase.answers[status] += 1
                phase.answer_times.setdefault(tenant.label, []).append(loop.time() - sent)
                return

        sends = [send(t, n, o) for t, count in work for n, o in enumerate(offsets(count, args.spread))]
        try:
            await asyncio.wait_for(asyncio.gather(*sends), max(1.0, deadline - loop.time()))
        except TimeoutError:
            phase.timed_out = True
        while True:
            calls = await ctl.calls()
            done = {a for c in calls if c.get("status") == 200 for a in call_alerts(c) if a in awaited}
            if len(done) == len(awaited) or loop.time() >= deadline:
                break
            await asyncio.sleep(POLL_SECONDS)
        phase.timed_out = phase.timed_out or len(done) < len(awaited)
        for tenant, count in work:
            figures = tally(
                calls, tenant.tenant_id, tenant.alerts(count), start, args.limits, args.retry_after
            )
            admitted = [
                float(c["time"]) - start
                for c in calls
                if c.get("tenantId") == tenant.tenant_id and c.get("admitted")
            ]
            widened = tuple(RateWindow(w.calls, w.seconds + args.margin) for w in args.limits)
            late = idle_budget(admitted, offsets(count, args.spread), widened)
            figures.late_max = max(late) if late else None
            phase.figures[tenant.label] = figures
            state = await ctl.alerts(tenant.tenant_id)
            phase.misplaced += sum(1 for a in state if owner.get(a) != tenant.tenant_id)
        phase.misplaced += len(await ctl.alerts())  # the home tenant's: nothing was sent there
        phase.calls, phase.records, phase.start = len(calls), calls, start
        phase.mismatches = tid_mismatches(calls, owner)
        a = phase.figures.get("A")
        if a is not None and a.block_at is not None:
            until = a.block_at + args.retry_after
            phase.b_calls_in_block = sum(
                1
                for c in calls
                if c.get("tenantId") == TENANT_B.tenant_id
                and c.get("status") == 200
                and a.block_at <= float(c["time"]) - start <= until
            )
    return phase


# --- report -------------------------------------------------------------------------------------------


def seconds(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f}"


COLUMNS = (
    f"{'run':>3}  {'phase':<13}  {'t':>1}  {'calls':>5}  {'200s':>4}  {'429s':<7}  {'other':>5}  "
    f"{'applied':>7}  {'lost':>4}  {'twice':>5}  {'1st call':>8}  {'late max':>8}  {'drain':>6}  "
    f"{'busiest':>11}  "
    f"{'answer p50/max':>14}  {'tid wrong':>9}  {'misplaced':>9}"
)


def phase_rows(phase: Phase, windows: tuple[RateWindow, ...]) -> list[str]:
    rows = []
    for label, f in phase.figures.items():
        awaited = label in phase.awaited
        busiest = " ".join(f"{n}/{w.calls}" for n, w in zip(f.busiest, windows, strict=True))
        answers = phase.answer_times.get(label, [])
        answer = f"{median(answers):.2f}/{max(answers):.2f}" if answers else "-"
        rows.append(
            f"{phase.run:>3}  {phase.name:<13}  {label:>1}  {f.calls:>5}  {f.ok:>4}  "
            f"{f.scripted_429:>3}+{f.limiter_429:<3}  {f.other:>5}  "
            f"{f.applied if awaited else '-':>7}  {f.lost if awaited else '-':>4}  {f.twice:>5}  "
            f"{seconds(f.first_call):>8}  {seconds(f.late_max):>8}  {seconds(f.drain) if awaited else '-':>6}  "
            f"{busiest:>11}  "
            f"{answer:>14}  {phase.mismatches:>9}  {phase.misplaced:>9}"
        )
    return rows


def listed(values: list[float | None]) -> str:
    """`6.51, 6.99, never (median 6.75 s)`: every run's value, and the median of those known."""
    shown = ", ".join(seconds(v) for v in values)
    known = [v for v in values if v is not None]
    return f"{shown} (median {median(known):.2f} s)" if known else shown


def block_text(figures: Figures, retry_after: float) -> str:
    """When A's 429 came, the calls of A received during its block (s after the 429), and when A resumed."""
    during = ", ".join(f"+{t:.2f}" for t in figures.in_block) or "none"
    return (
        f"429 at {seconds(figures.block_at)} s, A's calls during the next {retry_after:g} s: {during}, "
        f"resumed at {seconds(figures.resumed)} s"
    )


def report(phases: list[Phase], args: argparse.Namespace) -> list[str]:
    windows: tuple[RateWindow, ...] = args.limits
    limit_names = " ".join(str(w) for w in windows)
    lines = [
        "",
        "per phase and tenant (t: tenant; times in s from the first arrival, at the emulator; 429s: "
        "scripted+limiter's; late max: the most a call came after the earliest its arrival and the "
        "tenant's own windows (with the margin) allowed, given its earlier calls; busiest: most admitted "
        f"calls in any window of {limit_names} / its limit; answer: alertgate's answer time to the "
        "caller, s; tid wrong: calls whose token's tenant is not "
        "their route's; misplaced: alerts in another tenant's emulator state; '-': A's drain is not "
        f"awaited in '{CONTROL}'):",
        COLUMNS,
    ]
    for phase in phases:
        lines += phase_rows(phase, windows)
    by_name = {name: [p for p in phases if p.name == name] for name in (ALONE, BLOCKED, CONTROL)}
    b_alone = [p.figures["B"].drain for p in by_name[ALONE]]
    b_blocked = [p.figures["B"].drain for p in by_name[BLOCKED]]
    b_control = [p.figures["B"].drain for p in by_name[CONTROL]]
    a_drain = [p.figures["A"].drain for p in by_name[BLOCKED]]
    minimum = minimum_schedule(offsets(args.b_updates, args.spread), windows)[-1]
    firsts = {name: [p.figures["B"].first_call for p in ps] for name, ps in by_name.items() if ps}
    lines += [
        "",
        f"B's drain alone:               {listed(b_alone)}; theoretical minimum {minimum:.2f} s "
        "(windows without margin or latency)",
        f"B's drain with A blocked:      {listed(b_blocked)}",
    ]
    if b_control:
        lines.append(f"B's drain with A, no 429:      {listed(b_control)}")
    lates = {name: [p.figures["B"].late_max for p in ps] for name, ps in by_name.items() if ps}
    lines += [
        f"A's drain (blocked once):      {listed(a_drain)}",
        "B's first call:                "
        + "; ".join(f"{name} {', '.join(seconds(v) for v in values)}" for name, values in firsts.items()),
        "B's latest call vs its own windows (late max): "
        + "; ".join(f"{name} {', '.join(seconds(v) for v in values)}" for name, values in lates.items()),
    ]
    pairs = [f"{w / a:.3f}x" if a and w else "-" for a, w in zip(b_alone, b_blocked, strict=True)]
    lines += [
        f"B with A blocked / B alone, run by run: {', '.join(pairs)}",
        *(
            f"A's block, run {p.run}: {block_text(p.figures['A'], args.retry_after)}; B's calls answered "
            f"200 during it: {p.b_calls_in_block}"
            for p in by_name[BLOCKED]
        ),
        "grants given up as too old when their call would start (host log, both tenants), run by run: "
        + "; ".join(
            f"{name} {', '.join(str(p.stale_grants) for p in ps)}" for name, ps in by_name.items() if ps
        ),
        f"alertgate's answers to callers: {dict(sorted(sum((p.answers for p in phases), Counter()).items()))}",
        "",
    ]
    known_alone = [v for v in b_alone if v is not None]
    known_blocked = [v for v in b_blocked if v is not None]
    complete = len(known_alone) == len(b_alone) and len(known_blocked) == len(b_blocked)
    ratio = median(known_blocked) / median(known_alone) if known_alone and known_blocked else math.nan
    verdict = "PASS" if complete and ratio <= TARGET_RATIO else "FAIL"
    control = (
        f"; without the 429 {median([v for v in b_control if v is not None]) / median(known_alone):.3f}x"
        if b_control and known_alone and all(v is not None for v in b_control)
        else ""
    )
    lines.append(
        f"target B's drain with A blocked within {TARGET_RATIO}x of B's drain alone (medians): {verdict} "
        f"({ratio:.3f}x{control}" + ("" if complete else "; some update of B was never applied") + ")"
    )
    calls = sum(p.calls for p in phases)
    wrong = sum(p.mismatches for p in phases)
    misplaced = sum(p.misplaced for p in phases)
    lines.append(
        f"target every call carries a token of its route's tenant: "
        f"{'PASS' if wrong == 0 and misplaced == 0 else 'FAIL'} ({wrong} of {calls} calls with another "
        f"tenant's tid; {misplaced} alerts in another tenant's state)"
    )
    figures = [f for p in phases for f in p.figures.values()]
    over = sum(1 for f in figures for n, w in zip(f.busiest, windows, strict=True) if n > w.calls)
    limited = sum(f.limiter_429 for f in figures)
    most = {
        label: " ".join(
            f"{max(f.busiest[i] for p in phases for t, f in p.figures.items() if t == label)}/{w.calls}"
            for i, w in enumerate(windows)
        )
        for label in ("A", "B")
    }
    lines.append(
        f"target limits hold per tenant: {'PASS' if over == 0 and limited == 0 else 'FAIL'} (most admitted "
        f"calls in any window of {limit_names}: A {most['A']}, B {most['B']}; {limited} 429s from the "
        "emulator's limiter, the scripted ones aside)"
    )
    lost = sum(f.lost for p in phases for label, f in p.figures.items() if label in p.awaited)
    twice = sum(f.twice for f in figures)
    lines.append(
        f"target every update applied exactly once: {'PASS' if lost == 0 and twice == 0 else 'FAIL'} "
        f"({lost} lost, {twice} applied more than once)"
    )
    return lines


# --- main ---------------------------------------------------------------------------------------------


def host_settings(stack: Stack, args: argparse.Namespace) -> dict[str, str]:
    limits = ",".join(str(w) for w in args.limits)
    tenants = {
        t.name: {"tenantId": t.tenant_id, "rateLimits": limits, "patchRateLimits": "off"}
        for t in (TENANT_A, TENANT_B)
    }
    return {
        "DEFENDER_TENANTS": json.dumps(tenants),
        "DEFENDER_APP_CLIENT_ID": APP_CLIENT_ID,
        # Customer tenants' tokens come from the emulators' Entra endpoint (https, self-signed).
        "AZURE_AUTHORITY_HOST": stack.emulators.urls["entra"],
        "SSL_CERT_FILE": stack.emulators.urls["entra_cert"],
        "DEFENDER_RATE_LIMITS": limits,
        "DEFENDER_PATCH_RATE_LIMITS": "off",
        "RATE_LIMIT_SAFETY_MARGIN_SECONDS": f"{args.margin:g}",
        "SYNC_MAX_WAIT_SECONDS": "0.5",
        "AzureFunctionsJobHost__extensions__queues__maxPollingInterval": "00:00:00.500",
        "DERIVED_KEY_TTL_SECONDS": "0",
    }


def run(args: argparse.Namespace, argv: list[str]) -> list[str]:
    began = time.monotonic()
    limits = ",".join(str(w) for w in args.limits)
    lines = [
        f"$ .venv/bin/python -m bench.tenants {' '.join(argv)}".rstrip(),
        header("bench.tenants: tenant B's drain alone and beside tenant A blocked by a 429"),
        f"workload: B {args.b_updates} one-alert updates, A {args.a_updates} (in the phases with A), "
        f"each tenant's arriving evenly over {args.spread:g} s; each update its own alert, comment and key",
        f"limits {limits} (calls/seconds) on batchUpdate for each tenant, on the emulator and in alertgate; "
        "PATCH off; RATE_LIMIT_SAFETY_MARGIN_SECONDS "
        f"{args.margin:g}, SYNC_MAX_WAIT_SECONDS 0.5, queue maxPollingInterval 0.5 s",
        f"'{BLOCKED}': A's call {args.block_after + 1} is answered 429 with Retry-After {args.retry_after:g} s "
        f"(for A's tenant only); '{CONTROL}': the same load without the 429, until B drained"
        + ("" if args.control else " (left out: --no-control)"),
        f"phases alternate, {args.runs} runs each; each phase has a new host (new tables and queues) and a "
        "reset emulator",
    ]
    print("\n".join(lines), flush=True)
    block = fault_script(TENANT_A.tenant_id, args.block_after, args.retry_after)
    both = [(TENANT_A, args.a_updates), (TENANT_B, args.b_updates)]
    plan: list[tuple[str, list[tuple[Tenant, int]], list[dict[str, Any]] | None, set[str]]] = [
        (ALONE, [(TENANT_B, args.b_updates)], None, {"B"}),
        (BLOCKED, both, block, {"A", "B"}),
    ]
    if args.control:
        plan.append((CONTROL, both, None, {"B"}))
    phases: list[Phase] = []
    print(f"\n{COLUMNS}", flush=True)
    with Stack(emulator_rate_limits=limits) as stack:
        settings = host_settings(stack, args)
        for n in range(1, args.runs + 1):
            for name, work, faults, awaited in plan:
                host = stack.start_host(settings)
                try:
                    phase = asyncio.run(
                        run_phase(stack, host.urls["base"], Phase(name, n, awaited), work, faults, args)
                    )
                finally:
                    stack.stop_host(host)
                phase.stale_grants = host.log_path.read_text(errors="replace").count("grant too old")
                if phase.timed_out:
                    print(f"run {n} {name}: ended by --timeout before every update was applied", flush=True)
                print("\n".join(phase_rows(phase, args.limits)), flush=True)
                phases.append(phase)
    section = report(phases, args)
    tail = ["", f"total {time.monotonic() - began:.1f} s"]
    print("\n".join([*section, *tail]), flush=True)
    return [*lines, *section, *tail]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m bench.tenants", description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs of each phase, alternating (3)")
    parser.add_argument("--a-updates", type=int, default=40, help="tenant A's updates (40)")
    parser.add_argument("--b-updates", type=int, default=20, help="tenant B's updates (20)")
    parser.add_argument(
        "--spread", type=float, default=1.0, help="seconds over which each tenant's arrive (1)"
    )
    parser.add_argument("--limits", type=parse_rate_limits, default=parse_rate_limits("5/2,20/20"),
                        help="batchUpdate calls/seconds windows per tenant, emulator and alertgate (5/2,20/20)")  # fmt: skip
    parser.add_argument(
        "--retry-after", type=int, default=3, help="Retry-After of A's 429, whole seconds (3)"
    )
    parser.add_argument("--block-after", type=int, default=3, help="A's calls before its 429 (3)")
    parser.add_argument(
        "--no-control",
        dest="control",
        action="store_false",
        help=f"leave out the phase '{CONTROL}' (A's load without its 429, until B drained)",
    )
    parser.add_argument("--margin", type=float, default=0.1, help="RATE_LIMIT_SAFETY_MARGIN_SECONDS (0.1)")
    parser.add_argument("--timeout", type=float, default=90.0, help="bound on each phase, seconds (90)")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="text to write (bench/results/tenants.txt)"
    )
    args = parser.parse_args(argv)
    if not 1 <= args.runs <= MAX_RUNS:
        parser.error(f"--runs must be 1 to {MAX_RUNS}")
    if not (1 <= args.a_updates <= MAX_UPDATES and 1 <= args.b_updates <= MAX_UPDATES):
        parser.error(f"--a-updates and --b-updates must be 1 to {MAX_UPDATES}")
    if not 0 <= args.block_after < args.a_updates:
        parser.error("--block-after must be 0 to --a-updates - 1")
    if not 1 <= args.retry_after <= 60:
        parser.error("--retry-after must be 1 to 60 (whole seconds, as the header)")
    for name in ("spread", "timeout"):
        value = getattr(args, name)
        if not (math.isfinite(value) and 0 < value <= 600):
            parser.error(f"--{name} must be more than 0 and at most 600")
    if not (math.isfinite(args.margin) and 0 <= args.margin <= 10):
        parser.error("--margin must be 0 to 10")
    args.out = args.out.resolve()
    write_output(run(args, argv), args.out)


if __name__ == "__main__":
    main()
