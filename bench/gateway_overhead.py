"""What alertgate adds to one synchronous batchUpdate: latency over a direct MDE call, and Table round trips.

    python -m bench.gateway_overhead [--requests 300] [--warmup 20] [--trace-requests 40]

Issue 6 asks for an overhead of at most 25 ms at p50 and 80 ms at p99 over calling MDE directly, with at
most 6 sequential Table Storage round trips, on a 2-core machine with Azurite. Two phases, each with its
own Azurite, emulators and development host on loopback:

1. Latency. Sequential one-alert `POST /api/alerts/batchUpdate` requests through the development host
   (a distinct Idempotency-Key and alert id each) and the same body sent straight to the MDE emulator
   with a bearer token fetched once from the identity emulator, interleaved one for one (the order
   alternating) so that both see the same machine. Limits are raised to 500/1 (batchUpdate) and 2000/1
   (PATCH) on the host and the emulator, so the budget never makes a request wait: what is left is the
   gateway's own work. With both channels free, alertgate sends a one-alert update that nothing pending shares by
   PATCH (docs/contracts.md §7, "When both channels are free"); the direct call is batchUpdate.
   Azurite runs without its debug log here, since writing it slows every Table request.
2. Round trips. The same POSTs against an Azurite started with `--debug`, with a marker request to
   Azurite between POSTs so its request log splits per POST. Each request's client-side start comes
   from its `x-ms-client-request-id` (azure-core makes it a time-based UUID1 when it sends), its end
   from Azurite's log; a request that started before the previous one ended was sent side by side with
   it, so "sequential rounds" counts requests that had to wait for each other.

Everything is bounded: request counts are capped, every HTTP call has a timeout, and every service is
stopped at the end whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import re
import statistics
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from bench.common import Stack, alert_id, fetch_token, header, percentile
from devhost.services import AZURITE_ACCOUNT, LOOPBACK

LIMITS = "500/1"  # batchUpdate
# PATCH four times batchUpdate's rate, as MDE's own limits are three times (1500 against 500 an hour): a
# one-alert update nothing pending shares then goes by PATCH (docs/contracts.md §7), as it would in Azure
PATCH_LIMITS = "2000/1"
HOST_SETTINGS = {
    "DEFENDER_RATE_LIMITS": LIMITS,
    "DEFENDER_PATCH_RATE_LIMITS": PATCH_LIMITS,
    "DERIVED_KEY_TTL_SECONDS": "0",
}
TARGET_P50_MS = 25.0
TARGET_P99_MS = 80.0
TARGET_ROUNDS = 6
MAX_REQUESTS = 5000
MARKER_TABLE = "benchmarker"
TIMEOUT = aiohttp.ClientTimeout(total=30)


def body_for(n: int) -> dict[str, Any]:
    """A valid one-alert body in MDE's exact spelling, so the direct call sends the same thing."""
    return {
        "alertIds": [alert_id(n)],
        "status": "Resolved",
        "classification": "FalsePositive",
        "determination": "NotMalicious",
        "assignedTo": "bench@contoso.example",
    }


# --- phase 1: latency ---------------------------------------------------------------------------------


@dataclass
class Latencies:
    gateway: list[float] = field(default_factory=list)
    direct: list[float] = field(default_factory=list)
    gateway_statuses: Counter[int] = field(default_factory=Counter)
    direct_statuses: Counter[int] = field(default_factory=Counter)


async def timed_post(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], headers: dict[str, str]
) -> tuple[float, int]:
    """Seconds from sending to the whole answer read, and its status."""
    began = time.perf_counter()
    async with session.post(url, json=body, headers=headers) as response:
        await response.read()
        status = response.status
    return time.perf_counter() - began, status


async def measure_latency(stack: Stack, base_url: str, requests: int, warmup: int) -> Latencies:
    """Alternate gateway and direct calls (gateway first on even turns) so drift hits both alike."""
    gateway_url = f"{base_url}/api/alerts/batchUpdate"
    direct_url = f"{stack.mde_url}/api/alerts/batchUpdate"
    result = Latencies()
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        token = await fetch_token(
            session, stack.emulators.urls["identity"], stack.emulators.urls["identity_header"]
        )
        direct_headers = {"Authorization": f"Bearer {token}"}
        for turn in range(warmup + requests):
            calls = [
                ("gateway", gateway_url, {"Idempotency-Key": f"bench-{uuid.uuid4()}"}, 2 * turn),
                ("direct", direct_url, direct_headers, 2 * turn + 1),
            ]
            if turn % 2:
                calls.reverse()
            for kind, url, headers, n in calls:
                seconds, status = await timed_post(session, url, body_for(n), headers)
                if turn < warmup:
                    continue
                if kind == "gateway":
                    result.gateway.append(seconds)
                    result.gateway_statuses[status] += 1
                else:
                    result.direct.append(seconds)
                    result.direct_statuses[status] += 1
    return result


def latency_report(lat: Latencies, requests: int, warmup: int) -> list[str]:
    def row(name: str, values: list[float]) -> str:
        ms = [v * 1000 for v in values]
        return (
            f"{name:<34} {percentile(ms, 0.5):>7.1f} {percentile(ms, 0.9):>7.1f} "
            f"{percentile(ms, 0.99):>7.1f} {statistics.fmean(ms):>7.1f} {max(ms):>7.1f}"
        )

    p50 = (percentile(lat.gateway, 0.5) - percentile(lat.direct, 0.5)) * 1000
    p90 = (percentile(lat.gateway, 0.9) - percentile(lat.direct, 0.9)) * 1000
    p99 = (percentile(lat.gateway, 0.99) - percentile(lat.direct, 0.99)) * 1000
    mean = (statistics.fmean(lat.gateway) - statistics.fmean(lat.direct)) * 1000
    head = f"{'':<34} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} {'mean ms':>7} {'max ms':>7}"
    lines = [
        "",
        f"Phase 1: latency, {requests} sequential one-alert POSTs each way after {warmup} warm-up each,",
        f"interleaved; limits {LIMITS} (batchUpdate) and {PATCH_LIMITS} (PATCH) on host and emulator; "
        "Azurite in memory, no debug log",
        head,
        "-" * len(head),
        row("alertgate (development host)", lat.gateway),
        row("MDE emulator, direct", lat.direct),
        f"{'overhead (alertgate - direct)':<34} {p50:>7.1f} {p90:>7.1f} {p99:>7.1f} {mean:>7.1f} {'':>7}",
        f"answers: alertgate {dict(sorted(lat.gateway_statuses.items()))}, "
        f"direct {dict(sorted(lat.direct_statuses.items()))}",
        verdict(f"p50 overhead <= {TARGET_P50_MS:g} ms", p50, TARGET_P50_MS, "ms"),
        verdict(f"p99 overhead <= {TARGET_P99_MS:g} ms", p99, TARGET_P99_MS, "ms"),
    ]
    return lines


def verdict(target: str, value: float, limit: float, unit: str) -> str:
    if value <= limit:
        return f"target {target}: met ({value:.1f} {unit})"
    return f"target {target}: MISSED by {value - limit:.1f} {unit} ({value:.1f} {unit}, {value / limit:.2f}x)"


# --- phase 2: Table round trips from Azurite's debug log -----------------------------------------------

_START = re.compile(
    r"^(?P<ts>\S+) (?P<id>[0-9a-f-]{36}) info: (?P<service>Table|Queue)StorageContextMiddleware: "
    r"RequestMethod=(?P<method>\S+) RequestURL=(?P<url>\S+) RequestHeaders:(?P<headers>\{.*\}) ClientIP="
)
_OPERATION = re.compile(r"^\S+ (?P<id>[0-9a-f-]{36}) info: DispatchMiddleware: Operation=(?P<op>\S+)")
_END = re.compile(
    r"^(?P<ts>\S+) (?P<id>[0-9a-f-]{36}) info: EndMiddleware: End response\. "
    r"TotalTimeInMS=(?P<ms>\d+) StatusCode=(?P<status>\d+)"
)
_UUID1_EPOCH = 0x01B21DD213814000  # 1582-10-15 to 1970-01-01 in 100 ns ticks


def _iso(ts: str) -> float:
    """Azurite's `2026-11-27T14:29:48.684Z` as epoch seconds (its clock is the machine's)."""
    seconds, _, fraction = ts.rstrip("Z").partition(".")
    whole = time.mktime(time.strptime(seconds, "%Y-%m-%dT%H:%M:%S")) - time.timezone
    return whole + float("0." + (fraction or "0"))


@dataclass
class TableRequest:
    service: str
    method: str
    url: str
    sent: float  # client side: the time in its UUID1 x-ms-client-request-id (else Azurite's start)
    received: float  # Azurite's start of serving it (epoch seconds, millisecond resolution)
    start_line: int  # where Azurite logged its start and its end: the server's own order of events
    end_line: int = 1 << 62
    operation: str = "?"
    status: int = 0
    azurite_ms: int = 0

    def label(self, prefix: str) -> str:
        """`QueryEntitiesWithPartitionAndRowKey Budget(…) 200`: the operation, the table (without the
        host's prefix) and which entity, with digits elided so that equal steps compare equal."""
        path = self.url.split(f"/{AZURITE_ACCOUNT}/", 1)[-1].split("?", 1)[0]
        table, _, keys = path.partition("(")
        table = table.removeprefix(prefix) or table
        entity = ""
        if keys:
            row = re.search(r"RowKey='([^']*)'", keys)
            entity = f"[{re.sub(r'[0-9a-f]{6,}|[0-9]+', '…', row.group(1))}]" if row else ""
        op = self.operation.removeprefix("Table_")
        if table == "$batch":
            return f"{op} (entity group transaction) {self.status}"
        return f"{op} {table}{entity} {self.status}"


def parse_debug_log(text: str) -> list[TableRequest]:
    """Every request Azurite logged, in the order it started serving them."""
    requests: dict[str, TableRequest] = {}
    for number, line in enumerate(text.splitlines()):
        if (match := _START.match(line)) is not None:
            received = sent = _iso(match["ts"])
            with_id = json.loads(match["headers"]).get("x-ms-client-request-id", "")
            try:
                client_id = uuid.UUID(with_id)
                if client_id.version == 1:
                    sent = (client_id.time - _UUID1_EPOCH) / 1e7
            except ValueError:
                pass
            requests[match["id"]] = TableRequest(
                match["service"], match["method"], match["url"], sent, received, number
            )
        elif (match := _OPERATION.match(line)) is not None and match["id"] in requests:
            requests[match["id"]].operation = match["op"]
        elif (match := _END.match(line)) is not None and match["id"] in requests:
            request = requests[match["id"]]
            request.end_line = number
            request.status = int(match["status"])
            request.azurite_ms = int(match["ms"])
    return list(requests.values())


def side_by_side(earlier: TableRequest, later: TableRequest) -> bool:
    """Was `later` sent without waiting for `earlier`'s answer? Yes if Azurite began serving it before it
    had finished `earlier` (its log is the server's own order of events), or if the client made it
    before Azurite had even received `earlier`. Log timestamps alone cannot tell: Azurite stamps a
    line when it writes it, which can be a millisecond after the answer left."""
    return later.start_line < earlier.end_line or later.sent < earlier.received


def rounds(requests: list[TableRequest]) -> list[list[TableRequest]]:
    """Group the requests of one POST into round trips: in the order the client made them, a request
    sent side by side with a member of the current group joins it; otherwise it had to wait for an
    answer and starts the next round trip."""
    groups: list[list[TableRequest]] = []
    for request in sorted(requests, key=lambda r: r.sent):
        if groups and any(side_by_side(member, request) for member in groups[-1]):
            groups[-1].append(request)
        else:
            groups.append([request])
    return groups


@dataclass
class PostTrace:
    table: list[TableRequest]
    status: int = 0
    sent: float = 0.0
    answered: float = 0.0


async def trace_posts(stack: Stack, base_url: str, posts: int, warmup: int) -> list[tuple[int, float, float]]:
    """Send warm-up POSTs, then `posts` POSTs each preceded by a marker request to Azurite (and one
    marker after the last); returns (status, sent, answered) of the traced POSTs."""
    marker_base = f"http://{LOOPBACK}:{stack.azurite.urls['table_port']}/{AZURITE_ACCOUNT}/{MARKER_TABLE}"
    gateway_url = f"{base_url}/api/alerts/batchUpdate"
    answers: list[tuple[int, float, float]] = []
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        for n in range(warmup + posts):
            if n >= warmup:
                async with session.get(f"{marker_base}(PartitionKey='m',RowKey='{n}')") as marker:
                    await marker.read()
            sent = time.time()
            headers = {"Idempotency-Key": f"trace-{uuid.uuid4()}"}
            async with session.post(gateway_url, json=body_for(100_000 + n), headers=headers) as response:
                await response.read()
                if n >= warmup:
                    answers.append((response.status, sent, time.time()))
        async with session.get(f"{marker_base}(PartitionKey='m',RowKey='end')") as marker:
            await marker.read()
    return answers


def split_by_markers(
    requests: list[TableRequest], answers: list[tuple[int, float, float]]
) -> list[PostTrace]:
    traces: list[PostTrace] = []
    current: PostTrace | None = None
    for request in requests:
        if f"/{MARKER_TABLE}(" in request.url:
            if current is not None:
                traces.append(current)
            current = PostTrace([])
        elif current is not None and request.service == "Table":
            current.table.append(request)
    for trace, (status, sent, answered) in zip(traces, answers, strict=False):
        trace.status, trace.sent, trace.answered = status, sent, answered
    return traces


def trace_report(traces: list[PostTrace], prefix: str, warmup: int) -> list[str]:
    counts = [len(t.table) for t in traces]
    grouped = [rounds(t.table) for t in traces]
    depth = [len(g) for g in grouped]
    per_request = [float(r.azurite_ms) for t in traces for r in t.table]
    # Client-side: from one round trip's first send to the next one's (the answer, the SDK's and the
    # app's work in between), and the POST's time before its first and after its last Table request.
    gaps = [(b[0].sent - a[0].sent) * 1000 for g in grouped for a, b in itertools.pairwise(g)]
    before = [(t.table[0].sent - t.sent) * 1000 for t in traces if t.table]
    after = [(t.answered - max(r.sent for r in t.table)) * 1000 for t in traces if t.table]
    whole = [(t.answered - t.sent) * 1000 for t in traces]

    def row(name: str, values: list[int]) -> str:
        return f"{name:<42} {min(values):>5} {statistics.median(values):>7g} {max(values):>5}"

    def ms(name: str, values: list[float]) -> str:
        if not values:  # no POST's requests could be told apart in the log
            return f"{name:<58} {'n/a':>6}"
        return f"{name:<58} {statistics.median(values):>6.1f}"

    head = f"{'per POST':<42} {'min':>5} {'median':>7} {'max':>5}"
    lines = [
        "",
        f"Phase 2: Table Storage requests, {len(traces)} POSTs after {warmup} warm-up, from Azurite's --debug log",
        head,
        "-" * len(head),
        row("Table requests", counts),
        row("sequential Table round trips", depth),
        f"answers: {dict(sorted(Counter(t.status for t in traces).items()))}",
        verdict(
            f"at most {TARGET_ROUNDS} sequential round trips",
            float(statistics.median(depth)),
            TARGET_ROUNDS,
            "round trips (median)",
        ),
        "where a POST's time goes (medians, ms; Azurite writing its debug log is slower than in phase 1):",
        ms("  whole POST, as the client saw it", whole),
        ms("  POST sent -> its first Table request sent", before),
        ms("  one round trip's send -> the next one's (client side)", gaps),
        ms("  Azurite's own time for one Table request", per_request),
        ms("  last Table request sent -> POST answered", after),
    ]
    sequences = Counter(
        tuple(" ‖ ".join(r.label(prefix) for r in group) for group in groups) for groups in grouped
    )
    for sequence, seen in sequences.most_common(3):
        lines.append(f"request sequence seen in {seen} of {len(traces)} POSTs (‖ = sent side by side):")
        lines += [f"  {i}. {step}" for i, step in enumerate(sequence, 1)]
    return lines


# --- main -------------------------------------------------------------------------------------------


def run(requests: int, warmup: int, trace_requests: int) -> None:
    began = time.monotonic()
    print(
        header("bench.gateway_overhead: the synchronous path's overhead over a direct MDE call"), flush=True
    )
    with Stack(emulator_rate_limits=LIMITS, emulator_patch_rate_limits=PATCH_LIMITS) as stack:
        host = stack.start_host(HOST_SETTINGS)
        latencies = asyncio.run(measure_latency(stack, host.urls["base"], requests, warmup))
    print("\n".join(latency_report(latencies, requests, warmup)), flush=True)

    with Stack(
        emulator_rate_limits=LIMITS, emulator_patch_rate_limits=PATCH_LIMITS, azurite_debug=True
    ) as stack:
        host = stack.start_host(HOST_SETTINGS)
        answers = asyncio.run(trace_posts(stack, host.urls["base"], trace_requests, warmup=5))
        time.sleep(0.5)  # Azurite writes its log asynchronously
        prefix = host.urls["table_prefix"]
        traces = split_by_markers(parse_debug_log(stack.debug_log.read_text(errors="replace")), answers)
    print("\n".join(trace_report(traces, prefix, warmup=5)), flush=True)
    print(f"\ntotal {time.monotonic() - began:.1f} s", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gateway_overhead", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--requests", type=int, default=300, help="measured requests each way (300)")
    parser.add_argument("--warmup", type=int, default=20, help="unmeasured requests each way first (20)")
    parser.add_argument("--trace-requests", type=int, default=40, help="POSTs traced in Azurite's log (40)")
    args = parser.parse_args(argv)
    for name in ("requests", "trace_requests"):
        if not 1 <= getattr(args, name) <= MAX_REQUESTS:
            parser.error(f"--{name.replace('_', '-')} must be 1 to {MAX_REQUESTS}")
    if not 0 <= args.warmup <= MAX_REQUESTS:
        parser.error(f"--warmup must be 0 to {MAX_REQUESTS}")
    run(args.requests, args.warmup, args.trace_requests)


if __name__ == "__main__":
    main()
