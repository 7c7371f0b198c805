"""A backlog of small updates through alertgate and through a naive forwarder, on the same workload and run.

    python -m bench.drain [--updates 60] [--spread 3] [--limits 5/1,20/6] [--time-factor 60]
                          [--margin 0.1] [--seed 1] [--timeout 120] [--plot bench/results/drain.png]

alertgate exists to do better than calling MDE directly with a retry policy, so issue 6 asks for both on
one workload: `--updates` one-alert updates arriving evenly over `--spread` seconds, against the MDE
emulator enforcing `--limits` (time-scaled stand-ins for MDE's 10/60,500/3600: `--time-factor 60` means
one second here stands for a minute). Figures per system: upstream calls, 429s, updates lost, updates
applied more than once, the time from the first arrival until every update was applied, and that time
over the theoretical minimum (the configured windows without any margin, each call as early as the
windows and its arrival allow: `minimum_schedule`). Also the peak resident memory of the development
host's process during alertgate's drain (issue 6: at most 200 MB), and a PNG of upstream calls over time.

- alertgate: each update is a `POST /api/alerts/batchUpdate` with its own Idempotency-Key to a
  development host whose settings match the emulator's limits (`DEFENDER_RATE_LIMITS`), with a small
  safety margin, `SYNC_MAX_WAIT_SECONDS` 0.5 and a queue polling interval of at most 0.5 s, so that the
  deferred updates drain from the chunks queue at the scaled pace. The PATCH channel is off and every
  update has its own comment, so this measures one call per update at the budget; coalescing and PATCH
  are bench.throughput's.
- The naive forwarder: what a Logic App's HTTP action does with MDE directly. One call per update; on
  408, 429 or 5xx up to 4 retries with the Logic Apps default policy ("exponential interval", interval
  7.5 s, minimum 5 s, maximum 45 s: as Microsoft documents the ranges, retry n waits a uniformly drawn
  time between max(interval * 2^(n-2), 5 s) (for the first retry max(0, 5 s)) and min(interval *
  2^(n-1), 45 s)), those intervals divided by `--time-factor`, and never sooner than the answer's
  Retry-After (which the emulator already gives in its scaled seconds). After the 4th retry fails the
  update is lost.

The emulator is reset between the two runs. Everything is bounded by `--timeout` per run, and every
service is stopped at the end whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import random
import re
import statistics
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import Stack, alert_id, fetch_token, header, memory_kib
from bench.reference import minimum_schedule as minimum_schedule
from devhost.services import REPO_ROOT
from emulators.control import EmulatorControl, max_calls_in_any_window
from shared.settings import RateWindow, parse_rate_limits

DEFAULT_PLOT = REPO_ROOT / "bench" / "results" / "drain.png"
TARGET_RATIO = 1.15
TARGET_RSS_MB = 200.0
MAX_UPDATES = 2000
RETRIED_STATUSES = {408, 429, 500, 502, 503, 504}
LOGIC_APPS_RETRIES = 4
LOGIC_APPS_INTERVAL, LOGIC_APPS_MIN, LOGIC_APPS_MAX = 7.5, 5.0, 45.0
TIMEOUT = aiohttp.ClientTimeout(total=30)


def body_for(n: int) -> dict[str, Any]:
    """Update n: its own comment, so no two are identical and each is one call (coalescing, which would
    carry many in one call, is bench.throughput's subject; this one measures draining at the budget)."""
    return {
        "alertIds": [alert_id(n)],
        "status": "Resolved",
        "classification": "FalsePositive",
        "comment": f"bench.drain update {n}",
    }


# minimum_schedule lives in bench.reference (pure, shared with bench.throughput's reference scheduler);
# the import above re-exports it for bench.sweep_race.


def idle_budget(calls: list[float], arrivals: list[float], windows: tuple[RateWindow, ...]) -> list[float]:
    """For each call, how long after the earliest moment the windows allowed it (given the calls before
    it and the arrivals) it was made: time the budget sat free while an update waited. Spent-but-unused
    grants are invisible at the emulator, so their cost shows here too."""
    ordered, pending = sorted(calls), sorted(arrivals)
    late: list[float] = []
    for k, made in enumerate(ordered):
        earliest = pending[k] if k < len(pending) else 0.0
        for window in windows:
            if k >= window.calls:
                earliest = max(earliest, ordered[k - window.calls] + window.seconds)
        late.append(made - earliest)
    return late


def logic_apps_interval(retry: int, rng: random.Random, time_factor: float) -> float:
    """Logic Apps' default exponential retry interval for retry 1..4, divided by the time factor."""
    low = LOGIC_APPS_MIN if retry == 1 else max(LOGIC_APPS_INTERVAL * 2 ** (retry - 2), LOGIC_APPS_MIN)
    high = min(LOGIC_APPS_INTERVAL * 2 ** (retry - 1), LOGIC_APPS_MAX)
    return rng.uniform(low, max(low, high)) / time_factor


@dataclass
class Outcome:
    """One system's run, with times relative to the first arrival (seconds)."""

    name: str
    calls: list[dict[str, Any]] = field(default_factory=list)
    first_arrival: float = 0.0
    answers: Counter[int] = field(default_factory=Counter)
    operation_states: Counter[str] = field(default_factory=Counter)
    peak_rss_kib: int = 0
    hwm_kib: int = 0
    worker: Counter[str] = field(default_factory=Counter)  # chunks-queue invocations by outcome
    stale_grants: list[float] = field(default_factory=list)  # when grants were given up as too old
    first_arrival_wall: float = 0.0  # the first arrival on the wall clock, to place host log lines

    def times(self, status: int | None = None) -> list[float]:
        return sorted(
            c["time"] - self.first_arrival for c in self.calls if status is None or c["status"] == status
        )

    def applied(self) -> Counter[str]:
        """How many times each alert was applied (answered 200)."""
        counts: Counter[str] = Counter()
        for call in self.calls:
            if call["status"] == 200:
                counts.update(call_ids(call))
        return counts


def call_ids(call: dict[str, Any]) -> list[str]:
    """The alerts an emulator call named (its record's `alertIds`, the body's for an older emulator)."""
    recorded = call.get("alertIds")
    if isinstance(recorded, list):
        return [a for a in recorded if isinstance(a, str)]
    document = call.get("json")
    ids = document.get("alertIds") if isinstance(document, dict) else None
    return [a for a in ids if isinstance(a, str)] if isinstance(ids, list) else []


def read_host_log(outcome: Outcome, text: str) -> None:
    """What the host's log says about the drain: how each chunks-queue message ended (`finished`,
    `deferred`, ...) and when grants were given up before their call because they had grown too old (log
    lines carry the host's local wall-clock time to the millisecond)."""
    outcome.worker.update(re.findall(r"chunk message \S+: (\S+)", text))
    for stamp in re.findall(r"^(\S+ \S+) INFO \S+ chunk \S+: grant too old", text, re.MULTILINE):
        seconds, _, millis = stamp.partition(",")
        wall = time.mktime(time.strptime(seconds, "%Y-%m-%d %H:%M:%S")) + int(millis or 0) / 1000
        outcome.stale_grants.append(wall - outcome.first_arrival_wall)


async def wait_until_applied(ctl: EmulatorControl, ids: set[str], deadline: float) -> list[dict[str, Any]]:
    """Poll the emulator's call record until every id was answered 200 or the deadline passes."""
    while True:
        calls = await ctl.calls()
        done = {a for c in calls if c["status"] == 200 for a in call_ids(c)}
        if ids <= done or time.monotonic() >= deadline:
            return calls
        await asyncio.sleep(0.2)


async def sample_rss(pid: int, outcome: Outcome, stop: asyncio.Event) -> None:
    """Resident memory of the host process every 100 ms until told to stop (plus its peak, VmHWM)."""
    while True:
        values = memory_kib(pid)
        outcome.peak_rss_kib = max(outcome.peak_rss_kib, values.get("VmRSS", 0))
        outcome.hwm_kib = max(outcome.hwm_kib, values.get("VmHWM", 0))
        if stop.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.1)


async def run_alertgate(stack: Stack, base_url: str, pid: int, offsets: list[float], bound: float) -> Outcome:
    outcome = Outcome("alertgate")
    ids = {alert_id(n) for n in range(len(offsets))}
    loop = asyncio.get_running_loop()
    operations: list[str] = []
    async with (
        EmulatorControl(stack.mde_url, stack.emulators.urls["identity_base"]) as ctl,
        aiohttp.ClientSession(timeout=TIMEOUT) as session,
    ):
        # Build the host's runtime (token, tables, queues) before the clock starts: no call to MDE.
        async with session.get(f"{base_url}/api/health") as response:
            await response.read()
        await ctl.reset()
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample_rss(pid, outcome, stop))
        start = loop.time() + 0.2
        outcome.first_arrival = start + offsets[0]
        outcome.first_arrival_wall = time.time() + (outcome.first_arrival - loop.time())

        async def arrive(n: int, offset: float) -> None:
            await asyncio.sleep(max(0.0, start + offset - loop.time()))
            headers = {"Idempotency-Key": f"drain-{uuid.uuid4()}"}
            url = f"{base_url}/api/alerts/batchUpdate"
            async with session.post(url, json=body_for(n), headers=headers) as response:
                outcome.answers[response.status] += 1
                document = await response.json(content_type=None)
            if isinstance(document, dict) and document.get("operationId"):
                operations.append(str(document["operationId"]))

        try:
            await asyncio.wait_for(
                asyncio.gather(*(arrive(n, offset) for n, offset in enumerate(offsets))), bound
            )
            outcome.calls = await wait_until_applied(ctl, ids, time.monotonic() + bound)
        finally:
            stop.set()
            await sampler
        for operation in operations:
            async with session.get(f"{base_url}/api/operations/{operation}") as response:
                document = await response.json(content_type=None)
                outcome.operation_states[str(document.get("status"))] += 1
    return outcome


async def send_like_logic_apps(
    session: aiohttp.ClientSession,
    url: str,
    body: dict[str, Any],
    headers: dict[str, str],
    rng: random.Random,
    time_factor: float,
    answers: Counter[int],
) -> int:
    """One update as a Logic App's HTTP action sends it: on 408, 429 or 5xx up to 4 retries at the
    default policy's intervals (`logic_apps_interval`), never sooner than Retry-After. Every answer is
    counted in `answers`; returns the last status (a retried status after the 4th retry: the update
    is lost)."""
    for attempt in range(LOGIC_APPS_RETRIES + 1):
        async with session.post(url, json=body, headers=headers) as response:
            await response.read()
            status = response.status
            retry_after = float(response.headers.get("Retry-After", "0") or 0)
        answers[status] += 1
        if status not in RETRIED_STATUSES or attempt == LOGIC_APPS_RETRIES:
            return status
        await asyncio.sleep(max(logic_apps_interval(attempt + 1, rng, time_factor), retry_after))
    raise AssertionError("unreachable: the last attempt returns")


@contextlib.asynccontextmanager
async def direct_to_mde(
    stack: Stack,
) -> AsyncIterator[tuple[EmulatorControl, aiohttp.ClientSession, dict[str, str]]]:
    """What a naive forwarder needs: the emulator reset, a session and its own bearer token's headers."""
    async with (
        EmulatorControl(stack.mde_url, stack.emulators.urls["identity_base"]) as ctl,
        aiohttp.ClientSession(timeout=TIMEOUT) as session,
    ):
        await ctl.reset()
        token = await fetch_token(
            session, stack.emulators.urls["identity"], stack.emulators.urls["identity_header"]
        )
        yield ctl, session, {"Authorization": f"Bearer {token}"}


async def run_naive(
    stack: Stack, offsets: list[float], time_factor: float, seed: int, bound: float
) -> Outcome:
    outcome = Outcome("naive forwarder")
    rng = random.Random(seed)
    ids = {alert_id(n) for n in range(len(offsets))}
    loop = asyncio.get_running_loop()
    url = f"{stack.mde_url}/api/alerts/batchUpdate"
    async with direct_to_mde(stack) as (ctl, session, headers):
        start = loop.time() + 0.2
        outcome.first_arrival = start + offsets[0]

        async def arrive(n: int, offset: float) -> None:
            await asyncio.sleep(max(0.0, start + offset - loop.time()))
            await send_like_logic_apps(session, url, body_for(n), headers, rng, time_factor, outcome.answers)

        await asyncio.wait_for(
            asyncio.gather(*(arrive(n, offset) for n, offset in enumerate(offsets))), bound
        )
        outcome.calls = await wait_until_applied(ctl, ids, time.monotonic())
    return outcome


# --- report -----------------------------------------------------------------------------------------


def summary(
    outcome: Outcome, updates: int, minimum: float, windows: tuple[RateWindow, ...]
) -> dict[str, str]:
    applied = outcome.applied()
    lost = updates - len(applied)
    statuses = Counter(c["status"] for c in outcome.calls)
    done = outcome.times(200)
    last = done[-1] if done else math.nan
    admitted = [c["time"] for c in outcome.calls if c["admitted"]]
    return {
        "upstream calls": str(len(outcome.calls)),
        "  answered 200": str(statuses.get(200, 0)),
        "  answered 429": str(statuses.get(429, 0)),
        "  other answers": str(sum(v for k, v in statuses.items() if k not in (200, 429))),
        "updates applied": str(len(applied)),
        "updates lost": str(lost),
        "updates applied more than once": str(sum(1 for v in applied.values() if v > 1)),
        "time until every update applied": f"{last:.2f} s" if lost == 0 else f"never ({lost} lost)",
        "  last update applied at": f"{last:.2f} s",
        "  over the theoretical minimum": f"{last / minimum:.3f}x" if lost == 0 else "-",
        "most admitted calls in any window": ", ".join(
            f"{max_calls_in_any_window(admitted, w.seconds)} of {w.calls} in {w.seconds:g} s" for w in windows
        ),
    }


def report(
    outcomes: list[Outcome],
    updates: int,
    spread: float,
    windows: tuple[RateWindow, ...],
    time_factor: float,
    margin: float,
    arrivals: list[float],
    schedule: list[float],
) -> list[str]:
    minimum = schedule[-1]
    first = min(arrivals)
    widened = tuple(RateWindow(w.calls, w.seconds + margin) for w in windows)
    with_margin = minimum_schedule(arrivals, widened)[-1] - first
    limits = ",".join(f"{w.calls}/{w.seconds:g}" for w in windows)
    tables = [summary(o, updates, minimum, windows) for o in outcomes]
    width = max(len(k) for k in tables[0])
    cols = [max(len(o.name), *(len(t[k]) for k in t)) for o, t in zip(outcomes, tables, strict=True)]
    lines = [
        f"workload: {updates} one-alert updates arriving evenly over {spread:g} s "
        f"(one every {spread / updates * 1000:.0f} ms)",
        f"limits {limits} (calls/seconds) on the emulator and in alertgate; time factor 1/{time_factor:g} "
        f"(1 s here stands for {time_factor:g} s; the naive forwarder's Logic Apps intervals are divided "
        f"by {time_factor:g})",
        f"alertgate: RATE_LIMIT_SAFETY_MARGIN_SECONDS {margin:g}, SYNC_MAX_WAIT_SECONDS 0.5, "
        "queue maxPollingInterval 0.5 s",
        f"theoretical minimum: {minimum:.2f} s from the first arrival to the last update applied "
        "(the windows without margin)",
        f"the same with alertgate's margin added to every window: {with_margin:.2f} s "
        f"({with_margin / minimum:.3f}x): what the margin alone costs",
        "times are from the first arrival, at the emulator",
        "",
        f"{'':<{width}}  " + "  ".join(f"{o.name:>{c}}" for o, c in zip(outcomes, cols, strict=True)),
        "-" * (width + 2 + sum(c + 2 for c in cols)),
    ]
    for key in tables[0]:
        lines.append(
            f"{key:<{width}}  " + "  ".join(f"{t[key]:>{c}}" for t, c in zip(tables, cols, strict=True))
        )
    gate = outcomes[0]
    applied = gate.times(200)
    lags = ", ".join(
        f"{k}: {applied[k - 1] - schedule[k - 1]:+.2f}"
        for k in sorted({*range(10, len(applied) + 1, 10), len(applied)})
        if k <= len(schedule)
    )
    idle = idle_budget(gate.times(), [a - first for a in arrivals], widened)
    lines += [
        f"alertgate's n-th update applied vs the theoretical minimum's, seconds late: {lags}",
        "alertgate's calls vs the earliest its own windows (with margin) allowed after its earlier calls: "
        f"median {statistics.median(idle):.2f} s late, max {max(idle):.2f} s (call {idle.index(max(idle)) + 1}), "
        f"{sum(1 for v in idle if v > 0.5)} of {len(idle)} calls more than 0.5 s late"
        if idle
        else "alertgate made no calls",
        f"alertgate's chunks-queue invocations by outcome: {dict(sorted(gate.worker.items()))}; "
        "grants given up as too old when the call would start (no call; given back to the budget): "
        f"{len(gate.stale_grants)}"
        + (f", at {', '.join(f'{t:.2f}' for t in gate.stale_grants)} s" if gate.stale_grants else ""),
        f"alertgate's answers to callers: {dict(sorted(gate.answers.items()))}; operations at the end: "
        f"{dict(sorted(gate.operation_states.items()))}",
        f"naive forwarder's answers from MDE, retries included: {dict(sorted(outcomes[1].answers.items()))}",
        f"peak resident memory of the development host's process during alertgate's drain: "
        f"{gate.peak_rss_kib / 1024:.1f} MiB sampled every 100 ms (VmHWM, the peak since it started: "
        f"{gate.hwm_kib / 1024:.1f} MiB = {gate.hwm_kib * 1.024 / 1000:.1f} MB)",
        "",
    ]
    gate_table = tables[0]
    naive_table = tables[1]
    zero = gate_table["  answered 429"] == "0" and gate_table["updates lost"] == "0"
    both = naive_table["  answered 429"] != "0" and naive_table["updates lost"] != "0"
    lines.append(
        "target zero upstream 429s and zero lost updates for alertgate where the naive forwarder shows "
        f"both: {'met' if zero and both else 'MISSED'} (alertgate {gate_table['  answered 429']} 429s, "
        f"{gate_table['updates lost']} lost; naive {naive_table['  answered 429']} 429s, "
        f"{naive_table['updates lost']} lost)"
    )
    done = gate.times(200)
    if gate_table["updates lost"] == "0" and done:
        ratio = done[-1] / minimum
        lines.append(
            f"target alertgate's drain within {TARGET_RATIO}x of the theoretical minimum: "
            + (
                f"met ({ratio:.3f}x)"
                if ratio <= TARGET_RATIO
                else f"MISSED by {(ratio - TARGET_RATIO) * minimum:.2f} s ({ratio:.3f}x)"
            )
        )
    else:
        lines.append("target alertgate's drain within 1.15x of the theoretical minimum: MISSED (not drained)")
    rss_mb = gate.hwm_kib * 1.024 / 1000
    lines.append(
        f"target peak resident memory of the host <= {TARGET_RSS_MB:g} MB: "
        + (
            f"met ({rss_mb:.1f} MB)"
            if rss_mb <= TARGET_RSS_MB
            else f"MISSED by {rss_mb - TARGET_RSS_MB:.1f} MB ({rss_mb:.1f} MB)"
        )
    )
    return lines


def limit_envelope(windows: tuple[RateWindow, ...], until: float) -> tuple[list[float], list[int]]:
    """The most calls the windows admit by each time, had every call been waiting from time 0."""
    times = [t for t in minimum_schedule([0.0] * MAX_UPDATES, windows) if t <= until]
    return times, list(range(1, len(times) + 1))


def _cumulative(times: list[float], end: float) -> tuple[list[float], list[int]]:
    return [0.0, *times, end], [0, *range(1, len(times) + 1), len(times)]


def plot(
    outcomes: list[Outcome],
    offsets: list[float],
    schedule: list[float],
    windows: tuple[RateWindow, ...],
    path: Path,
    title: str,
) -> None:
    """Cumulative upstream calls over time for both systems (top: every call, 429s marked; bottom: the
    calls that applied an update, against the limit lines and the theoretical minimum). Two panels,
    because the naive forwarder's retries would squash the comparison with the limits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    end = max([*schedule, *(t for o in outcomes for t in o.times())]) + 1.0
    colors = {"alertgate": "tab:blue", "naive forwarder": "tab:red"}
    limits = ",".join(f"{w.calls}/{w.seconds:g}" for w in windows)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 9), dpi=110, sharex=True)

    for outcome in outcomes:
        color = colors.get(outcome.name, "tab:green")
        every = outcome.times()
        top.step(*_cumulative(every, end), where="post", color=color, lw=1.5,
                 label=f"{outcome.name}: upstream calls ({len(every)})")  # fmt: skip
        rejected = outcome.times(429)
        if rejected:
            heights = [sum(1 for t in every if t <= r) for r in rejected]
            top.plot(
                rejected,
                heights,
                "x",
                color=color,
                ms=4,
                label=f"{outcome.name}: answered 429 ({len(rejected)})",
            )
    top.set_ylabel("upstream calls, cumulative")
    top.set_title(title)

    first = offsets[0]
    env_t, env_n = limit_envelope(windows, end)
    bottom.step([0.0, *env_t, end], [0, *env_n, env_n[-1]], where="post", color="black", lw=1, ls="--",
                label=f"limit: most calls {limits} admits, counted from t=0")  # fmt: skip
    bottom.step(*_cumulative(schedule, end), where="post", color="black", lw=3, alpha=0.3,
                label="theoretical minimum for these arrivals (no margin)")  # fmt: skip
    for axis in (top, bottom):
        axis.step(*_cumulative([o - first for o in offsets], end), where="post", color="grey", lw=1, ls=":",
                  label="updates arrived")  # fmt: skip
    for outcome in outcomes:
        ok = outcome.times(200)
        bottom.step(*_cumulative(ok, end), where="post", color=colors.get(outcome.name, "tab:green"), lw=2,
                    label=f"{outcome.name}: calls that applied an update ({len(ok)})")  # fmt: skip
    bottom.set_ylim(0, len(offsets) * 1.25)
    bottom.set_ylabel("updates applied (upstream 200s), cumulative")
    bottom.set_xlabel("seconds since the first arrival (time-scaled)")
    for axis in (top, bottom):
        axis.set_xlim(0, end)
        axis.grid(True, alpha=0.3)
        axis.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# --- main -------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> None:
    began = time.monotonic()
    windows: tuple[RateWindow, ...] = args.limits
    limits = ",".join(f"{w.calls}/{w.seconds:g}" for w in windows)
    offsets = [n * args.spread / args.updates for n in range(args.updates)]
    schedule = [t - offsets[0] for t in minimum_schedule(offsets, windows)]
    print(header("bench.drain: a backlog through alertgate and through a naive forwarder"), flush=True)
    settings = {
        "DEFENDER_RATE_LIMITS": limits,
        "RATE_LIMIT_SAFETY_MARGIN_SECONDS": f"{args.margin:g}",
        "SYNC_MAX_WAIT_SECONDS": "0.5",
        "AzureFunctionsJobHost__extensions__queues__maxPollingInterval": "00:00:00.500",
        "DERIVED_KEY_TTL_SECONDS": "0",
        "DEFENDER_PATCH_RATE_LIMITS": "off",  # one channel at scaled limits (both: bench.throughput)
    }
    with Stack(emulator_rate_limits=limits) as stack:
        host = stack.start_host(settings)
        gate = asyncio.run(run_alertgate(stack, host.urls["base"], host.proc.pid, offsets, args.timeout))
        stack.stop_host(host)
        read_host_log(gate, host.log_path.read_text(errors="replace"))
        naive = asyncio.run(run_naive(stack, offsets, args.time_factor, args.seed, args.timeout))
    outcomes = [gate, naive]
    print(
        "\n".join(
            report(
                outcomes, args.updates, args.spread, windows, args.time_factor, args.margin, offsets, schedule
            )
        )
    )
    title = (
        f"{args.updates} updates over {args.spread:g} s, limits {limits} (time factor 1/{args.time_factor:g})"
    )
    plot(outcomes, offsets, schedule, windows, args.plot, title)
    shown = args.plot.relative_to(REPO_ROOT) if args.plot.is_relative_to(REPO_ROOT) else args.plot
    print(f"plot: {shown}")
    print(f"total {time.monotonic() - began:.1f} s", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.drain", description=__doc__.split("\n")[0])
    parser.add_argument("--updates", type=int, default=60, help="one-alert updates (60)")
    parser.add_argument("--spread", type=float, default=3.0, help="seconds over which they arrive (3)")
    parser.add_argument("--limits", type=parse_rate_limits, default=parse_rate_limits("5/1,20/6"),
                        help="calls/seconds windows on the emulator and alertgate (5/1,20/6)")  # fmt: skip
    parser.add_argument("--time-factor", type=float, default=60.0,
                        help="real seconds one second here stands for; divides the Logic Apps intervals (60)")  # fmt: skip
    parser.add_argument("--margin", type=float, default=0.1, help="RATE_LIMIT_SAFETY_MARGIN_SECONDS (0.1)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the naive forwarder's retry jitter (1)")
    parser.add_argument("--timeout", type=float, default=120.0, help="bound on each run, seconds (120)")
    parser.add_argument(
        "--plot", type=Path, default=DEFAULT_PLOT, help="PNG to write (bench/results/drain.png)"
    )
    args = parser.parse_args(argv)
    if not 1 <= args.updates <= MAX_UPDATES:
        parser.error(f"--updates must be 1 to {MAX_UPDATES}")
    for name in ("spread", "time_factor", "timeout"):
        value = getattr(args, name)
        if not (math.isfinite(value) and 0 < value <= 600):
            parser.error(f"--{name.replace('_', '-')} must be more than 0 and at most 600")
    if not (math.isfinite(args.margin) and 0 <= args.margin <= 10):
        parser.error("--margin must be 0 to 10")
    args.plot = args.plot.resolve()
    run(args)


if __name__ == "__main__":
    main()
