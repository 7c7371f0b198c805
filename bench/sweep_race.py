"""What a small backlog costs the chunks-queue worker, and how often the sweep races a waiting worker.

    python -m bench.sweep_race [--runs 3] [--updates 8] [--limits 2/1] [--margin 0.05] [--grace 2]
                               [--timeout 90]

The figures behind two tests of tests/integration/test_shared_state.py, which assert only what must hold
on any machine (every chunk finished once, delivered once, the windows held); how efficiently that
happens depends on how busy the machine is, so it is measured here:

- `backlog` (test_a_backlog_waits_for_its_reserved_slots_in_process): `--updates` one-alert updates sent
  at once with `Prefer: respond-async` to a host with `--limits` (on the emulator too) and margin
  `--margin`, no sweep during the run. Each queued chunk should reserve its slot and wait for it in
  process: one `finished` invocation per chunk, no `deferred` (back to the queue) and no grant given up
  as too old (older than half the margin when its call would start).
- `sweep` (test_a_worker_waiting_for_its_slot_is_not_taken_for_a_lost_message): the same with the sweep
  every second and SWEEP_GRACE_SECONDS `--grace`. The sweep re-queues a Pending chunk whose message is
  `--grace` overdue; a worker waits for its slot at most half the grace, so on an idle machine no chunk
  is re-queued while its worker waits. When one is, the worker's Sending mark fails (`lost`, its grant
  given back and its slot unused) and the re-queued message sends the chunk instead.

Per run and scenario it prints the chunks-queue invocations by outcome (`finished`, `deferred`, `lost`,
`stale-message`, `gone`, ...), the sweep's re-queues, grants given up as too old, upstream calls and
429s, and the drain time (first POST to the last update applied at the emulator) against the minimum
the windows allow. Each run has a development host with tables and queues of its own; the emulator is
reset between runs. Every wait is bounded by `--timeout`, and every service is stopped at the end.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import math
import re
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import aiohttp

from bench.common import Stack, alert_id, header
from bench.drain import minimum_schedule
from emulators.control import EmulatorControl, max_calls_in_any_window
from shared.settings import RateWindow, parse_rate_limits

MAX_RUNS = 50
MAX_UPDATES = 200
EVERY_SECOND = "*/1 * * * * *"
TIMEOUT = aiohttp.ClientTimeout(total=30)
POLL_SECONDS = 0.2


@dataclass
class Result:
    scenario: str
    run: int
    worker: Counter[str] = field(default_factory=Counter)  # chunks-queue invocations by outcome
    requeued: int = 0  # chunks the sweep re-queued as overdue
    stale_grants: int = 0  # grants given up as too old when the call would start
    calls: int = 0
    answered_429: int = 0
    applied_twice: int = 0
    not_applied: int = 0
    most_in_window: list[int] = field(default_factory=list)
    operations: Counter[str] = field(default_factory=Counter)
    drain_seconds: float = math.nan


def read_host_log(result: Result, text: str) -> None:
    result.worker.update(re.findall(r"chunk message \S+: (\S+)", text))
    for counts in re.findall(r"sweep resolved (\{[^}]*\})", text):
        result.requeued += int(ast.literal_eval(counts).get("requeued", 0))
    result.stale_grants = len(re.findall(r"chunk \S+: grant too old", text))


async def operation_status(session: aiohttp.ClientSession, location: str) -> str | None:
    """The operation's status once it has ended, None while it runs."""
    async with session.get(location) as response:
        document = await response.json(content_type=None)
        if response.status == 202:
            return None
        return str(document.get("status")) if isinstance(document, dict) else str(response.status)


async def run_once(
    stack: Stack, base_url: str, result: Result, updates: int, windows: tuple[RateWindow, ...], bound: float
) -> None:
    limits = ",".join(f"{w.calls}/{w.seconds:g}" for w in windows)
    ids = [alert_id(n) for n in range(updates)]  # the emulator is reset before each run
    async with (
        EmulatorControl(stack.mde_url, stack.emulators.urls["identity_base"]) as ctl,
        aiohttp.ClientSession(timeout=TIMEOUT) as session,
    ):
        # Build the host's runtime (token, tables, queues) before the clock starts: no call to MDE.
        async with session.get(f"{base_url}/api/health") as response:
            await response.read()
        await ctl.reset()
        await ctl.configure(rateLimits=limits)
        started = time.monotonic()  # the emulator's clock is the machine's monotonic clock too

        async def post(alert: str) -> str:
            headers = {"Prefer": "respond-async", "Idempotency-Key": f"sweep-race-{uuid.uuid4()}"}
            body = {"alertIds": [alert], "status": "Resolved"}
            async with session.post(f"{base_url}/api/alerts/batchUpdate", json=body, headers=headers) as r:
                await r.read()
                return r.headers["Location"]

        locations = await asyncio.wait_for(asyncio.gather(*(post(a) for a in ids)), bound)
        deadline = time.monotonic() + bound
        ended: dict[str, str] = {}
        while len(ended) < len(locations) and time.monotonic() < deadline:
            for location in locations:
                if location not in ended:
                    status = await operation_status(session, location)
                    if status is not None:
                        ended[location] = status
            await asyncio.sleep(POLL_SECONDS)
        result.operations.update(ended.values())
        result.operations["still running"] += len(locations) - len(ended)
        calls = await ctl.calls()
    result.calls = len(calls)
    result.answered_429 = sum(1 for c in calls if c["status"] == 429)
    applied = Counter(a for c in calls if c["status"] == 200 and c.get("json") for a in c["json"]["alertIds"])
    result.applied_twice = sum(1 for a in ids if applied[a] > 1)
    result.not_applied = sum(1 for a in ids if applied[a] == 0)
    times = sorted(c["time"] for c in calls if c["status"] == 200)
    result.most_in_window = [max_calls_in_any_window(times, w.seconds) if times else 0 for w in windows]
    if times and result.not_applied == 0:
        result.drain_seconds = times[-1] - started


def report(results: list[Result], windows: tuple[RateWindow, ...], minimum: float) -> list[str]:
    outcomes = sorted({k for r in results for k in r.worker} - {"finished", "deferred", "lost"})
    head = (
        f"{'scenario':<9} {'run':>3} {'finished':>8} {'deferred':>8} {'lost':>5} {'other outcomes':<28} "
        f"{'requeued':>8} {'stale':>5} {'calls':>5} {'429':>4} {'twice':>5} {'missing':>7} "
        f"{'most/window':>11} {'drain s':>7} {'x min':>6}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        other = ", ".join(f"{k} {r.worker[k]}" for k in outcomes if r.worker[k]) or "-"
        most = "/".join(str(m) for m in r.most_in_window)
        ratio = r.drain_seconds / minimum if minimum > 0 else math.nan
        lines.append(
            f"{r.scenario:<9} {r.run:>3} {r.worker['finished']:>8} {r.worker['deferred']:>8} "
            f"{r.worker['lost']:>5} {other:<28} {r.requeued:>8} {r.stale_grants:>5} {r.calls:>5} "
            f"{r.answered_429:>4} {r.applied_twice:>5} {r.not_applied:>7} {most:>11} "
            f"{r.drain_seconds:>7.2f} {ratio:>6.2f}"
        )
    limits = ", ".join(f"{w.calls} in {w.seconds:g} s" for w in windows)
    lines += [
        "",
        "finished/deferred/lost/other: chunks-queue invocations by outcome (ideal: finished = updates, "
        "nothing else)",
        "requeued: chunks the sweep re-queued as overdue; stale: grants given up as too old before the call",
        f"twice/missing: updates applied more than once / never (must be 0); most/window: most calls in any "
        f"window (limits {limits}); 429 must be 0",
        f"drain s: first POST to the last update applied; x min: over the minimum the windows allow "
        f"({minimum:.2f} s)",
    ]
    for scenario in dict.fromkeys(r.scenario for r in results):
        mine = [r for r in results if r.scenario == scenario]
        total = sum((r.worker for r in mine), Counter[str]())
        lines.append(
            f"{scenario}: {len(mine)} runs, invocations {dict(sorted(total.items()))}, "
            f"sweep re-queues {sum(r.requeued for r in mine)}, operations "
            f"{dict(sorted(sum((r.operations for r in mine), Counter[str]()).items()))}"
        )
    return lines


def run(args: argparse.Namespace) -> None:
    began = time.monotonic()
    windows: tuple[RateWindow, ...] = args.limits
    limits = ",".join(f"{w.calls}/{w.seconds:g}" for w in windows)
    minimum = minimum_schedule([0.0] * args.updates, windows)[-1]
    print(header("bench.sweep_race: a backlog in the chunks queue, without and with a racing sweep"))
    print(
        f"{args.updates} one-alert updates at once (Prefer: respond-async); limits {limits} on the emulator "
        f"and in alertgate; RATE_LIMIT_SAFETY_MARGIN_SECONDS {args.margin:g}; queue maxPollingInterval "
        f"0.5 s; scenario sweep: SWEEP_SCHEDULE every second, SWEEP_GRACE_SECONDS {args.grace:g}",
        flush=True,
    )
    base = {
        "DEFENDER_RATE_LIMITS": limits,
        "RATE_LIMIT_SAFETY_MARGIN_SECONDS": f"{args.margin:g}",
        "SYNC_MAX_WAIT_SECONDS": "0.5",
        "AzureFunctionsJobHost__extensions__queues__maxPollingInterval": "00:00:00.500",
        "DERIVED_KEY_TTL_SECONDS": "0",
    }
    scenarios = {
        "backlog": base,
        "sweep": {**base, "SWEEP_SCHEDULE": EVERY_SECOND, "SWEEP_GRACE_SECONDS": f"{args.grace:g}"},
    }
    results: list[Result] = []
    with Stack(emulator_rate_limits=limits) as stack:
        for number in range(1, args.runs + 1):
            for scenario, settings in scenarios.items():
                result = Result(scenario, number)
                host = stack.start_host(settings, name=f"devhost-{scenario}")
                try:
                    asyncio.run(
                        run_once(stack, host.urls["base"], result, args.updates, windows, args.timeout)
                    )
                finally:
                    stack.stop_host(host)
                read_host_log(result, host.log_path.read_text(errors="replace"))
                results.append(result)
    print("\n".join(report(results, windows, minimum)))
    print(f"total {time.monotonic() - began:.1f} s", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.sweep_race", description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs of each scenario (3)")
    parser.add_argument("--updates", type=int, default=8, help="one-alert updates per run (8)")
    parser.add_argument("--limits", type=parse_rate_limits, default=parse_rate_limits("2/1"),
                        help="calls/seconds windows on the emulator and alertgate (2/1)")  # fmt: skip
    parser.add_argument("--margin", type=float, default=0.05, help="RATE_LIMIT_SAFETY_MARGIN_SECONDS (0.05)")
    parser.add_argument("--grace", type=float, default=2.0, help="SWEEP_GRACE_SECONDS of the sweep run (2)")
    parser.add_argument("--timeout", type=float, default=90.0, help="bound on each run, seconds (90)")
    args = parser.parse_args(argv)
    if not 1 <= args.runs <= MAX_RUNS:
        parser.error(f"--runs must be 1 to {MAX_RUNS}")
    if not 1 <= args.updates <= MAX_UPDATES:
        parser.error(f"--updates must be 1 to {MAX_UPDATES}")
    if not (math.isfinite(args.margin) and 0 <= args.margin <= 10):
        parser.error("--margin must be 0 to 10")
    for name in ("grace", "timeout"):
        value = getattr(args, name)
        if not (math.isfinite(value) and 0 < value <= 600):
            parser.error(f"--{name} must be more than 0 and at most 600")
    run(args)


if __name__ == "__main__":
    main()
