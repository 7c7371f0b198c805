"""How the shared rate limiter behaves as more instances compete for one budget.

    python -m bench.limiter_contention [--seconds 6] [--windows 20/2] [--margin 0.05]

Starts its own Azurite on loopback (in memory, logs in a temporary directory) and, for 1, 2, 4, 8 and 16
concurrent acquirers, each with its own RateLimiter and TableClient as separate Functions instances
would have, acquires with `max_wait` until the time is up. It prints, per run: grants, Table round trips
per grant (1 is the uncontended ideal; more means 412s and re-reads), the time from calling `acquire`
to its grant (p50 and p99, so budget waits included), and the most grants seen in any window-long
interval against the window's limit (never above it, or the limiter is wrong). Everything is bounded in
time and Azurite is stopped at the end, whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from uuid import uuid4

from azure.data.tables.aio import TableClient, TableServiceClient

from devhost.services import start_azurite
from emulators.control import max_calls_in_any_window
from shared.errors import LimiterContentionError
from shared.ratelimit import Grant, RateLimiter
from shared.settings import RateWindow, parse_rate_limits
from shared.storage import StateTable

ACQUIRER_COUNTS = (1, 2, 4, 8, 16)
MAX_ACQUIRES_PER_ACQUIRER = 100_000  # a bound in count as well as in time


@dataclass
class Run:
    acquirers: int
    grant_times: list[float]
    latencies: list[float]
    operations: int
    contention_errors: int


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))]


async def run_once(
    connection_string: str, acquirers: int, windows: tuple[RateWindow, ...], margin: float, seconds: float
) -> Run:
    """One table, `acquirers` limiters on their own clients, all acquiring until `seconds` have passed."""
    name = f"bench{uuid4().hex[:12]}"
    async with TableServiceClient.from_connection_string(connection_string) as service:
        await service.create_table(name)
        clients = [TableClient.from_connection_string(connection_string, name) for _ in range(acquirers)]
        limiters = [RateLimiter(StateTable(client), windows, margin) for client in clients]
        run = Run(acquirers, [], [], 0, 0)
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds

        async def acquirer(limiter: RateLimiter) -> None:
            for _ in range(MAX_ACQUIRES_PER_ACQUIRER):
                began = loop.time()
                if began >= end:
                    return
                try:
                    outcome = await limiter.acquire(max_wait=end - began)
                except LimiterContentionError:
                    run.contention_errors += 1
                    continue
                if not isinstance(outcome, Grant):
                    return  # the next grant would come after the time is up
                run.latencies.append(loop.time() - began)
                run.grant_times.append(outcome.at)

        try:
            # The contention grace (5 s) plus slack bounds a run even if Azurite stalls.
            await asyncio.wait_for(asyncio.gather(*(acquirer(lim) for lim in limiters)), seconds + 15)
        finally:
            run.operations = sum(lim.table_operations for lim in limiters)
            for client in clients:
                await client.close()
            await service.delete_table(name)
    return run


def report(runs: list[Run], windows: tuple[RateWindow, ...], margin: float, seconds: float) -> str:
    limits = ", ".join(str(w) for w in windows)
    header = (
        f"{'acquirers':>9} {'grants':>6} {'ops/grant':>9} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'max in any window (limit)':>26} {'412 give-ups':>12}"
    )
    lines = [
        f"windows {limits} (calls/seconds), margin {margin:g} s, {seconds:g} s per run, Azurite on loopback",
        header,
        "-" * len(header),
    ]
    for run in runs:
        grants = len(run.grant_times)
        per_grant = run.operations / grants if grants else math.nan
        most = ", ".join(
            f"{max_calls_in_any_window(run.grant_times, w.seconds)} ({w.calls})" for w in windows
        )
        lines.append(
            f"{run.acquirers:>9} {grants:>6} {per_grant:>9.2f} {percentile(run.latencies, 0.5) * 1000:>8.1f} "
            f"{percentile(run.latencies, 0.99) * 1000:>8.1f} {most:>26} {run.contention_errors:>12}"
        )
    return "\n".join(lines)


async def bench(
    connection_string: str, windows: tuple[RateWindow, ...], margin: float, seconds: float
) -> None:
    runs = []
    for acquirers in ACQUIRER_COUNTS:
        runs.append(await run_once(connection_string, acquirers, windows, margin, seconds))
    print(report(runs, windows, margin, seconds), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.limiter_contention", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--seconds", type=float, default=6.0, help="length of each run (default 6)")
    parser.add_argument(
        "--windows",
        type=parse_rate_limits,
        default=parse_rate_limits("20/2"),
        help="calls/seconds,... (20/2)",
    )
    parser.add_argument("--margin", type=float, default=0.05, help="safety margin in seconds (default 0.05)")
    args = parser.parse_args(argv)
    if not (math.isfinite(args.seconds) and 0 < args.seconds <= 600):
        parser.error("--seconds must be more than 0 and at most 600")
    with tempfile.TemporaryDirectory(prefix="limiter-bench-") as logs:
        began = time.monotonic()
        azurite = start_azurite(Path(logs))
        try:
            asyncio.run(bench(azurite.urls["connection_string"], args.windows, args.margin, args.seconds))
        finally:
            azurite.stop()
        print(f"total {time.monotonic() - began:.1f} s", flush=True)


if __name__ == "__main__":
    main()
