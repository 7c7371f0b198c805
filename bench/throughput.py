"""How fast alertgate drains three realistic bursts under MDE's two call budgets, against the exact minimum.

    python -m bench.throughput [--workload a|b|c|all] [--k 200] [--incidents 60]
                               [--batch-limits 5/2,20/20] [--patch-limits 50/2,60/20] [--no-patch]
                               [--margin 0.1] [--time-factor 60] [--timeout 120] [--seed 1]
                               [--plot bench/results/throughput.png] [--out bench/results/throughput.txt]

MDE counts calls, not alerts (docs/contracts.md §7): batchUpdate allows 10 calls a minute and 500 an
hour per app and tenant, PATCH /api/alerts/{id} 100 a minute and 1,500 an hour of its own. A gateway that
makes one call per request is capped at 10 requests a minute whatever MDE could take; coalescing
identical updates and sending small ones by PATCH is what lifts that cap. This benchmark measures how
close alertgate comes to the best any gateway could do.

Workloads, each request a `POST /api/alerts/batchUpdate` body with its own Idempotency-Key:
- (a) a script looping over alerts: `--k` one-alert requests arriving evenly over 2 s, each for a
  different alert, all with the same fields and comment;
- (b) a Microsoft Sentinel closure storm: `--incidents` incidents of 1, 1, 2, 3 alerts (repeating; 60
  incidents are 105 alerts) arriving evenly over 3 s, each closing its incident's alerts as Resolved /
  FalsePositive / Other with its own comment (`Microsoft Sentinel incident #n closed as FalsePositive`).
  They are sent as batchUpdate bodies with the incident's alert ids (what a playbook calling the
  batchUpdate route sends), not through `/api/sentinel/incidents`;
- (c) both, interleaved (each with its own spread), plus 20 alerts of their own that an analyst first
  sets InProgress (comment "taking a look", the same for all) and 0.3 s later Resolved with a comment of
  their own. A caller sends an update of an alert only once the previous update of that alert was
  answered (so "last accepted" is certain); the delays that causes are printed.

Limits are time-scaled stand-ins (the short window for MDE's minute, the long one for its hour; one
second here stands for `--time-factor` seconds, which divides the Logic Apps retry intervals of the
naive forwarder). The MDE emulator enforces `--batch-limits` on batchUpdate and `--patch-limits` on
PATCH; alertgate gets the same as DEFENDER_RATE_LIMITS and DEFENDER_PATCH_RATE_LIMITS, with
RATE_LIMIT_SAFETY_MARGIN_SECONDS `--margin`, SYNC_MAX_WAIT_SECONDS 0.5 and a queue polling interval of at
most 0.5 s (as bench.drain). `--no-patch` turns PATCH off everywhere (DEFENDER_PATCH_RATE_LIMITS=off, no
PATCH limits on the emulator, no PATCH in the minimum): for a tree whose emulator has no PATCH yet.

Per workload and system (alertgate through a development host; the naive forwarder, one direct
batchUpdate call per request with the Logic Apps default retry policy as in bench.drain), from the
emulator's call records and final alert state: calls and 429s per channel, updates lost (accepted, never
applied) or applied twice, alerts with a comment twice, alerts whose last applied update is not their
last accepted one, and the time from the first arrival to the last answer 200 that applied an update.
References for the same arrivals and windows (bench.reference): the theoretical minimum (exact, or
stated as bounds when not proven) and one batchUpdate call per request. The emulator is reset before
every run and each alertgate run has a host with tables and queues of its own. Every run is bounded by
`--timeout`; every service is stopped at the end whatever happens. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import aiohttp

from bench.common import Stack, alert_id, emulator_options, header, write_output
from bench.drain import TIMEOUT, _cumulative, direct_to_mde, limit_envelope, send_like_logic_apps
from bench.reference import BATCH, PATCH, Drain, Update, minimum_drain, one_call_per_request
from devhost.services import REPO_ROOT
from emulators.control import EmulatorControl, max_calls_in_any_window
from shared.settings import RateWindow, parse_rate_limits

DEFAULT_PLOT = REPO_ROOT / "bench" / "results" / "throughput.png"
DEFAULT_OUT = REPO_ROOT / "bench" / "results" / "throughput.txt"
FIELDS = ("status", "classification", "determination", "assignedTo", "comment")
CHANNELS = (BATCH, PATCH)
SCRIPT_SPREAD, INCIDENT_SPREAD = 2.0, 3.0
INCIDENT_SIZES = (1, 1, 2, 3)
PAIRS, PAIR_GAP = 20, 0.3
# Alert numbers of each part (`alert_id(n)`), far apart so no two parts share an alert.
SCRIPT_BASE, INCIDENT_BASE, PAIR_BASE = 0, 100_000, 200_000
TARGET_RATIO, TARGET_SPEEDUP = 1.3, 10.0
TARGET = {"k": 200, "incidents": 60, "batch": "5/2,20/20", "patch": "50/2,60/20"}
CALLER_RETRIES = 5  # a 409 or 503 from alertgate is re-sent with the same key, as a careful caller would
MAX_REQUESTS = 2000
POLL_SECONDS = 0.25

Key = tuple[Any, ...]


# --- workloads ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """One caller's request: its planned arrival (seconds after the first), its batchUpdate body, and
    the request on one of its alerts whose answer it waits for (`after`)."""

    offset: float
    body: dict[str, Any]
    part: str
    after: int | None = None

    @property
    def alerts(self) -> tuple[str, ...]:
        return tuple(self.body["alertIds"])

    @property
    def key(self) -> Key:
        """The outbound update: what an identical request must match to share a call."""
        return tuple(self.body.get(name) for name in FIELDS)


def script_requests(k: int) -> list[Request]:
    body = {"status": "Resolved", "classification": "FalsePositive", "determination": "Other"}
    comment = "Closed by the alert clean-up script"
    return [
        Request(
            n * SCRIPT_SPREAD / k,
            {"alertIds": [alert_id(SCRIPT_BASE + n)], **body, "comment": comment},
            "script",
        )
        for n in range(k)
    ]


def incident_requests(incidents: int) -> list[Request]:
    requests, next_alert = [], INCIDENT_BASE
    for n in range(incidents):
        size = INCIDENT_SIZES[n % len(INCIDENT_SIZES)]
        ids = [alert_id(next_alert + i) for i in range(size)]
        next_alert += size
        body = {
            "alertIds": ids,
            "status": "Resolved",
            "classification": "FalsePositive",
            "determination": "Other",
            "comment": f"Microsoft Sentinel incident #{n + 1} closed as FalsePositive",
        }
        requests.append(Request(n * INCIDENT_SPREAD / incidents, body, "incident"))
    return requests


def pair_requests() -> list[Request]:
    """InProgress then Resolved on each of PAIRS alerts, the first evenly over the incidents' spread
    less the gap, so the last Resolved arrives with the last incident."""
    requests = []
    for n in range(PAIRS):
        ids = [alert_id(PAIR_BASE + n)]
        start = n * (INCIDENT_SPREAD - PAIR_GAP) / PAIRS
        requests.append(
            Request(start, {"alertIds": ids, "status": "InProgress", "comment": "taking a look"}, "look")
        )
        resolve = {
            "alertIds": ids,
            "status": "Resolved",
            "classification": "InformationalExpectedActivity",
            "comment": f"Alert {n + 1} looked at: expected activity, resolved",
        }
        requests.append(Request(start + PAIR_GAP, resolve, "resolve"))
    return requests


def workload(name: str, k: int, incidents: int) -> list[Request]:
    """The workload's requests in arrival order (ties: script, incidents, pairs), each waiting for the
    answer to the previous request on any of its alerts."""
    parts = {
        "a": script_requests(k),
        "b": incident_requests(incidents),
        "c": [*script_requests(k), *incident_requests(incidents), *pair_requests()],
    }[name]
    ordered = sorted(parts, key=lambda r: r.offset)
    last: dict[str, int] = {}
    requests = []
    for n, request in enumerate(ordered):
        before = [last[a] for a in request.alerts if a in last]
        requests.append(Request(request.offset, request.body, request.part, max(before, default=None)))
        last.update(dict.fromkeys(request.alerts, n))
    return requests


def describe(name: str, requests: list[Request]) -> str:
    alerts = len({a for r in requests for a in r.alerts})
    parts = Counter(r.part for r in requests)
    text = {
        "a": f"{parts['script']} one-alert requests over {SCRIPT_SPREAD:g} s, all one update (a script)",
        "b": f"{parts['incident']} Sentinel incidents of 1-3 alerts over {INCIDENT_SPREAD:g} s, each its own comment",
        "c": f"(a) and (b) interleaved, plus {parts['look']} alerts set InProgress ('taking a look') and "
        f"{PAIR_GAP:g} s later Resolved with a comment of their own",
    }[name]
    return f"workload ({name}): {text}; {len(requests)} requests, {alerts} alerts, {len(set(r.key for r in requests))} distinct updates"


# --- runs -------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One system's run of one workload; times are seconds after the first planned arrival."""

    system: str
    first_arrival: float = 0.0  # on the monotonic clock, which the emulator's records share
    answers: Counter[int] = field(default_factory=Counter)  # what callers were answered
    accepted: list[bool] = field(default_factory=list)
    sent: list[float] = field(default_factory=list)  # when each request went out (nan: never)
    answered: list[float] = field(default_factory=list)  # when each got its last answer (alertgate only)
    resends: int = 0
    calls: list[dict[str, Any]] = field(default_factory=list)  # the emulator's call records
    alerts: dict[str, dict[str, Any]] = field(default_factory=dict)  # the emulator's final alert state
    timed_out: bool = False


def channel_of(record: dict[str, Any]) -> str:
    """batchUpdate or PATCH: the record's `api` once the emulator names it, else its method."""
    api = record.get("api")
    if api in CHANNELS:
        return str(api)
    return PATCH if record.get("method") == "PATCH" else BATCH


def record_alerts(record: dict[str, Any]) -> list[str]:
    if channel_of(record) == PATCH:
        return [unquote(str(record.get("path", "")).rstrip("/").rsplit("/", 1)[-1])]
    body = record.get("json")
    ids = body.get("alertIds") if isinstance(body, dict) else None
    return [str(i) for i in ids] if isinstance(ids, list) else []


def record_key(record: dict[str, Any]) -> Key | None:
    body = record.get("json")
    return tuple(body.get(name) for name in FIELDS) if isinstance(body, dict) else None


def applied_history(calls: list[dict[str, Any]]) -> dict[str, list[tuple[int, float, Key | None]]]:
    """Per alert, every update MDE applied to it (answered 200), in the order applied: (seq, time, key)."""
    history: dict[str, list[tuple[int, float, Key | None]]] = {}
    for record in sorted(calls, key=lambda r: int(r["seq"])):
        if record.get("status") == 200:
            for alert in record_alerts(record):
                history.setdefault(alert, []).append(
                    (int(record["seq"]), float(record["time"]), record_key(record))
                )
    return history


def piece_counts(requests: list[Request], accepted: list[bool], calls: list[dict[str, Any]]) -> list[int]:
    """For each request, how many times its update reached every one of its alerts (the least over its
    alerts): 0 lost, 1 once, 2+ more than once; -1 for a request that was not accepted. Identical
    accepted requests on one alert share what was applied."""
    applied: Counter[tuple[str, Key | None]] = Counter()
    for alert, history in applied_history(calls).items():
        applied.update((alert, key) for _, _, key in history)
    wanted: Counter[tuple[str, Key]] = Counter()
    for request, ok in zip(requests, accepted, strict=True):
        if ok:
            wanted.update((alert, request.key) for alert in request.alerts)
    counts = []
    for request, ok in zip(requests, accepted, strict=True):
        pieces = [(alert, request.key) for alert in request.alerts]
        counts.append(min(applied[piece] // wanted[piece] for piece in pieces) if ok else -1)
    return counts


def all_applied(requests: list[Request], accepted: list[bool], calls: list[dict[str, Any]]) -> bool:
    return all(count != 0 for count in piece_counts(requests, accepted, calls))


async def drive(
    requests: list[Request], send: Callable[[int, Request], Awaitable[None]], start: float, run: Run
) -> None:
    """Send each request at its planned time, and not before the request it waits for was answered."""
    loop = asyncio.get_running_loop()
    answered = [asyncio.Event() for _ in requests]
    run.sent = [math.nan] * len(requests)

    async def one(n: int, request: Request) -> None:
        try:
            await asyncio.sleep(max(0.0, start + request.offset - loop.time()))
            if request.after is not None:
                await answered[request.after].wait()
            run.sent[n] = loop.time() - start
            await send(n, request)
        finally:
            answered[n].set()

    await asyncio.gather(*(one(n, r) for n, r in enumerate(requests)))


def parse_json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


async def run_alertgate(stack: Stack, base_url: str, requests: list[Request], tag: str, bound: float) -> Run:
    run = Run("alertgate", accepted=[False] * len(requests), answered=[math.nan] * len(requests))
    loop = asyncio.get_running_loop()
    url = f"{base_url}/api/alerts/batchUpdate"
    async with (
        EmulatorControl(stack.mde_url, stack.emulators.urls["identity_base"]) as ctl,
        aiohttp.ClientSession(timeout=TIMEOUT) as session,
    ):
        async with session.get(f"{base_url}/api/health") as response:  # token, tables, queues first
            await response.read()
        await ctl.reset()

        async def send(n: int, request: Request) -> None:
            headers = {"Idempotency-Key": f"tput-{tag}-{n}"}
            for attempt in range(CALLER_RETRIES + 1):
                try:
                    async with session.post(url, json=request.body, headers=headers) as response:
                        text = await response.text()
                        status = response.status
                        retry_after = float(response.headers.get("Retry-After", "1") or 1)
                except (aiohttp.ClientError, TimeoutError):
                    status, text, retry_after = 0, "", 1.0  # no answer: the same key again is safe
                document = parse_json(text)
                if status in (0, 409, 503) and attempt < CALLER_RETRIES:
                    run.resends += 1
                    await asyncio.sleep(min(retry_after, 2.0))
                    continue
                run.answers[status] += 1
                run.answered[n] = loop.time() - run.first_arrival
                run.accepted[n] = (
                    status in (200, 202) and isinstance(document, dict) and "operationId" in document
                )
                return

        start = loop.time() + 0.2
        run.first_arrival = start
        deadline = start + bound
        try:
            await asyncio.wait_for(drive(requests, send, start, run), max(1.0, deadline - loop.time()))
        except TimeoutError:
            run.timed_out = True
        while True:
            run.calls = await ctl.calls()
            if all_applied(requests, run.accepted, run.calls) or loop.time() >= deadline:
                break
            await asyncio.sleep(POLL_SECONDS)
        run.timed_out = run.timed_out or not all_applied(requests, run.accepted, run.calls)
        run.alerts = await ctl.alerts()
    return run


async def run_naive(
    stack: Stack, requests: list[Request], time_factor: float, seed: int, bound: float
) -> Run:
    """The naive forwarder: every request is one direct batchUpdate call with Logic Apps' retry policy
    (`bench.drain.send_like_logic_apps`); a request is accepted as soon as it is sent."""
    run = Run("naive forwarder", accepted=[True] * len(requests))
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    url = f"{stack.mde_url}/api/alerts/batchUpdate"
    async with direct_to_mde(stack) as (ctl, session, headers):

        async def send(n: int, request: Request) -> None:
            await send_like_logic_apps(session, url, request.body, headers, rng, time_factor, run.answers)

        start = loop.time() + 0.2
        run.first_arrival = start
        try:
            await asyncio.wait_for(drive(requests, send, start, run), bound)
        except TimeoutError:
            run.timed_out = True
        run.calls = await ctl.calls()
        run.alerts = await ctl.alerts()
    return run


# --- figures ----------------------------------------------------------------------------------------------


@dataclass
class Figures:
    """What one run shows, computed from the emulator's records and state."""

    calls: Counter[str]
    rejected: Counter[str]  # answered 429, per channel
    other: int  # answered neither 200 nor 429
    accepted: int
    applied: int
    lost: int
    twice: int
    comment_twice: int  # alerts with some comment more than once
    own_comment_wrong: int  # (request, alert) whose own comment is not there exactly once
    last_wrong: int  # alerts whose final state is not their last accepted update ...
    overtaken: int  # ... of which that update was applied, but another after it (order broken)
    alerts: int
    drain: float | None  # first arrival to the last 200 that applied an update; None if any lost
    last_ok: float  # the last 200 that applied an update, lost or not
    busiest: dict[str, int]  # per "channel window": the most admitted calls in any window-long interval
    last_answered: float  # when the last request got its answer (a 202 once accepted); nan if not kept


def figures(run: Run, requests: list[Request], limits: dict[str, tuple[RateWindow, ...]]) -> Figures:
    counts = piece_counts(requests, run.accepted, run.calls)
    wrong = last_wrong(run, requests)
    history = applied_history(run.calls)
    done = [
        float(c["time"]) - run.first_arrival for c in run.calls if c.get("status") == 200 and record_alerts(c)
    ]
    calls = Counter(channel_of(c) for c in run.calls)
    rejected = Counter(channel_of(c) for c in run.calls if c.get("status") == 429)
    other = sum(1 for c in run.calls if c.get("status") not in (200, 429))
    lost = sum(1 for n in counts if n == 0)
    return Figures(
        calls=calls,
        rejected=rejected,
        other=other,
        accepted=sum(run.accepted),
        applied=sum(1 for n in counts if n >= 1),
        lost=lost,
        twice=sum(1 for n in counts if n >= 2),
        comment_twice=sum(
            1
            for state in run.alerts.values()
            if any(v > 1 for v in Counter(state.get("comments") or []).values())
        ),
        own_comment_wrong=own_comment_wrong(run, requests),
        last_wrong=len(wrong),
        overtaken=sum(1 for alert, key in wrong.items() if key in {k for _, _, k in history.get(alert, [])}),
        alerts=len({a for r, ok in zip(requests, run.accepted, strict=True) if ok for a in r.alerts}),
        drain=max(done) if done and lost == 0 else None,
        last_ok=max(done, default=math.nan),
        busiest=busiest(run, limits),
        last_answered=max((a for a in run.answered if not math.isnan(a)), default=math.nan),
    )


def own_comment_wrong(run: Run, requests: list[Request]) -> int:
    wrong = 0
    for request, ok in zip(requests, run.accepted, strict=True):
        comment = request.body.get("comment")
        if ok and comment is not None:
            for alert in request.alerts:
                wrong += (run.alerts.get(alert, {}).get("comments") or []).count(comment) != 1
    return wrong


def last_wrong(run: Run, requests: list[Request]) -> dict[str, Key]:
    """Alerts whose final state at the emulator differs from their last accepted request (a field it
    sets has another value, its comment is not the last, or the alert was never updated), each with
    that request's update."""
    last: dict[str, Request] = {}
    for request, ok in zip(requests, run.accepted, strict=True):
        if ok:
            last.update(dict.fromkeys(request.alerts, request))
    wrong: dict[str, Key] = {}
    for alert, request in last.items():
        state = run.alerts.get(alert) or {}
        fields_ok = all(state.get(name) == request.body[name] for name in FIELDS[:-1] if name in request.body)
        comments = state.get("comments") or []
        comment = request.body.get("comment")
        if not state or not fields_ok or (comment is not None and (not comments or comments[-1] != comment)):
            wrong[alert] = request.key
    return wrong


def busiest(run: Run, limits: dict[str, tuple[RateWindow, ...]]) -> dict[str, int]:
    """Per channel and window, the most admitted calls in any window-long interval (key `channel w`)."""
    shown: dict[str, int] = {}
    for channel, windows in limits.items():
        admitted = [float(c["time"]) for c in run.calls if c.get("admitted") and channel_of(c) == channel]
        for window in windows:
            shown[f"{channel} {window}"] = max_calls_in_any_window(admitted, window.seconds)
    return shown


def minimum_text(drain: Drain) -> str:
    calls = f"{len(drain.calls_on(BATCH))} batchUpdate + {len(drain.calls_on(PATCH))} PATCH calls"
    if drain.exact:
        return f"{drain.makespan:.2f} s (exact, {drain.method}; {calls})"
    return f"between {drain.lower_bound:.2f} and {drain.makespan:.2f} s (not proven; the bound, {drain.lower_bound:.2f} s, is used)"


def seconds(value: float | None, lost: int) -> str:
    return f"{value:.2f} s" if value is not None else f"never ({lost} lost)"


def ratio(numerator: float | None, denominator: float | None) -> str:
    if numerator is None or denominator is None or denominator <= 0:
        return "-"
    return f"{numerator / denominator:.2f}x"


def table(
    runs: list[Run],
    figs: list[Figures],
    minimum: float,
    single: float,
    limits: dict[str, tuple[RateWindow, ...]],
    total: int,
) -> list[str]:
    rows: list[tuple[str, list[str]]] = []
    for channel in limits:
        rows.append((f"calls, {channel}", [str(f.calls.get(channel, 0)) for f in figs]))
    for channel in limits:
        rows.append((f"  answered 429, {channel}", [str(f.rejected.get(channel, 0)) for f in figs]))
    rows += [
        ("  answered neither 200 nor 429", [str(f.other) for f in figs]),
        (f"requests accepted (of {total})", [str(f.accepted) for f in figs]),
        ("updates applied", [str(f.applied) for f in figs]),
        ("updates lost (accepted, never applied)", [str(f.lost) for f in figs]),
        ("updates applied more than once", [str(f.twice) for f in figs]),
        ("alerts with a comment more than once", [str(f.comment_twice) for f in figs]),
        ("(request, alert) without its comment exactly once", [str(f.own_comment_wrong) for f in figs]),
        (
            "alerts whose last update is not the last accepted",
            [f"{f.last_wrong} of {f.alerts}" for f in figs],
        ),
        ("time until every update applied", [seconds(f.drain, f.lost) for f in figs]),
        ("  last update applied at", [f"{f.last_ok:.2f} s" for f in figs]),
        (
            "  last request answered at (a 202 once accepted)",
            ["-" if math.isnan(f.last_answered) else f"{f.last_answered:.2f} s" for f in figs],
        ),
        ("  over the theoretical minimum", [ratio(f.drain, minimum) for f in figs]),
        ("  one call per request over it", [ratio(single, f.drain) for f in figs]),
    ]
    for name in figs[0].busiest:
        channel, _, window = name.partition(" ")
        rows.append(
            (
                f"most admitted {channel} calls in {window.split('/')[1]} s (limit {window.split('/')[0]})",
                [str(f.busiest[name]) for f in figs],
            )
        )
    width = max(len(label) for label, _ in rows)
    cols = [max(len(r.system), *(len(values[n]) for _, values in rows)) for n, r in enumerate(runs)]
    lines = [
        f"{'':<{width}}  " + "  ".join(f"{r.system:>{c}}" for r, c in zip(runs, cols, strict=True)),
        "-" * (width + 2 + sum(c + 2 for c in cols)),
    ]
    for label, values in rows:
        lines.append(
            f"{label:<{width}}  " + "  ".join(f"{v:>{c}}" for v, c in zip(values, cols, strict=True))
        )
    return lines


def targets(name: str, gate: Figures, minimum: float, single: float, config: dict[str, Any]) -> list[str]:
    """The must-show targets of this workload, PASS or FAIL, with what decided it."""
    differs = [
        f"{k} {config[k]} (target {v})"
        for k, v in TARGET.items()
        if name in config["applies"][k] and config[k] != v
    ]
    note = f" [not the target's configuration: {', '.join(differs)}]" if differs else ""
    zero429 = sum(gate.rejected.values()) == 0
    within = gate.drain is not None and gate.drain <= TARGET_RATIO * minimum
    lines = []
    if name == "a":
        once = gate.lost == 0 and gate.twice == 0 and gate.own_comment_wrong == 0
        faster = gate.drain is not None and gate.drain > 0 and single / gate.drain >= TARGET_SPEEDUP
        verdict = once and zero429 and within and faster
        lines.append(
            f"target (a): every update applied exactly once with its comment exactly once, zero 429s, drain <= "
            f"{TARGET_RATIO}x the minimum and >= {TARGET_SPEEDUP:g}x sooner than one call per request: "
            f"{'PASS' if verdict else 'FAIL'} (lost {gate.lost}, twice {gate.twice}, comment not once "
            f"{gate.own_comment_wrong}, 429s {sum(gate.rejected.values())}, {ratio(gate.drain, minimum)} the "
            f"minimum, {ratio(single, gate.drain)} sooner){note}"
        )
    elif name == "b":
        verdict = zero429 and gate.own_comment_wrong == 0 and gate.lost == 0 and within
        lines.append(
            f"target (b): zero 429s on either API, each alert's own comment exactly once, drain <= {TARGET_RATIO}x "
            f"the minimum: {'PASS' if verdict else 'FAIL'} (429s {dict(gate.rejected) or 0}, comment not once "
            f"{gate.own_comment_wrong}, lost {gate.lost}, {ratio(gate.drain, minimum)} the minimum){note}"
        )
    else:
        verdict = gate.last_wrong == 0 and gate.alerts > 0
        lines.append(
            f"target (c): every alert's last applied update is its last accepted one: "
            f"{'PASS' if verdict else 'FAIL'} ({gate.last_wrong} of {gate.alerts} alerts differ: {gate.overtaken} "
            f"overtaken by an earlier update, {gate.last_wrong - gate.overtaken} without their last update){note}"
        )
    return lines


def waits(run: Run, requests: list[Request]) -> str:
    """Requests that follow an earlier one on their alert go only once it was answered: how late that
    made them against the planned arrivals the minimum assumes, and how many never went."""
    following = [(s, r) for s, r in zip(run.sent, requests, strict=True) if r.after is not None]
    late = [s - r.offset for s, r in following if not math.isnan(s)]
    return (
        f"{run.system}: {len(following)} requests follow an earlier one on their alert (sent once it was "
        f"answered): at most {max(late, default=0.0):.2f} s after their planned arrival; "
        f"{len(following) - len(late)} not sent within --timeout"
    )


def report(
    name: str,
    requests: list[Request],
    runs: list[Run],
    minimum: Drain,
    single: Drain,
    limits: dict[str, tuple[RateWindow, ...]],
    config: dict[str, Any],
) -> tuple[list[str], list[Figures]]:
    figs = [figures(run, requests, limits) for run in runs]
    best = minimum.makespan if minimum.exact else minimum.lower_bound
    gate = runs[0]
    lines = [
        "",
        describe(name, requests),
        f"theoretical minimum from the first arrival: {minimum_text(minimum)}",
        f"one batchUpdate call per request: {single.makespan:.2f} s ({len(single.calls)} calls)",
        "",
        *table(runs, figs, best, single.makespan, limits, len(requests)),
        "",
        f"alertgate's answers to callers: {dict(sorted(gate.answers.items()))}; re-sent after 409/503/no answer: "
        f"{gate.resends}; never sent within --timeout: {sum(1 for s in gate.sent if math.isnan(s))}",
        f"naive forwarder's answers from MDE, retries included: {dict(sorted(runs[1].answers.items()))}",
        *(waits(run, requests) for run in runs if any(r.after is not None for r in requests)),
        *(
            f"{run.system}: run ended by --timeout before every update was applied"
            for run in runs
            if run.timed_out
        ),
        *targets(name, figs[0], best, single.makespan, config),
    ]
    return lines, figs


# --- plot -------------------------------------------------------------------------------------------------


def plot(
    panels: list[tuple[str, Run, Drain, list[Request]]],
    limits: dict[str, tuple[RateWindow, ...]],
    path: Path,
    title: str,
) -> None:
    """Per workload, cumulative upstream calls of each channel over time (alertgate's, 429s marked; the
    minimum's schedule) against each channel's limit line (the most calls its windows admit from t = 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {BATCH: "tab:blue", PATCH: "tab:orange"}
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 4.2 * len(panels)), dpi=110, squeeze=False)
    for axis, (name, run, minimum, requests) in zip(axes[:, 0], panels, strict=True):
        mine = {
            ch: sorted(float(c["time"]) - run.first_arrival for c in run.calls if channel_of(c) == ch)
            for ch in limits
        }
        best = {ch: sorted(c.time - requests[0].offset for c in minimum.calls_on(ch)) for ch in limits}
        end = (
            max([1.0, *(t for ts in mine.values() for t in ts), *(t for ts in best.values() for t in ts)])
            * 1.05
            + 0.5
        )
        top = 1
        for channel, windows in limits.items():
            color = colors[channel]
            env_t, env_n = limit_envelope(windows, end)
            if env_t:
                axis.step([0.0, *env_t, end], [0, *env_n, env_n[-1]], where="post", color=color, lw=1, ls="--",
                          label=f"{channel} limit {','.join(map(str, windows))}, from t=0")  # fmt: skip
            axis.step(*_cumulative(best[channel], end), where="post", color=color, lw=4, alpha=0.25,
                      label=f"{channel}: the minimum's calls ({len(best[channel])})")  # fmt: skip
            axis.step(*_cumulative(mine[channel], end), where="post", color=color, lw=1.8,
                      label=f"{channel}: alertgate's calls ({len(mine[channel])})")  # fmt: skip
            rejected = sorted(
                float(c["time"]) - run.first_arrival
                for c in run.calls
                if channel_of(c) == channel and c.get("status") == 429
            )
            if rejected:
                axis.plot(rejected, [sum(1 for t in mine[channel] if t <= r) for r in rejected], "x", color=color, ms=5,
                          label=f"{channel}: answered 429 ({len(rejected)})")  # fmt: skip
            top = max(top, len(mine[channel]), len(best[channel]))
        last = max(r.offset for r in requests) - requests[0].offset
        axis.axvspan(0, last, color="grey", alpha=0.12, label=f"requests arriving ({len(requests)})")
        axis.set_xlim(0, end)
        axis.set_ylim(0, top * 1.15 + 1)
        axis.set_title(f"workload ({name}): {len(requests)} requests", fontsize=10)
        axis.set_ylabel("upstream calls, cumulative")
        axis.grid(True, alpha=0.3)
        axis.legend(loc="lower right", fontsize=7)
    axes[-1, 0].set_xlabel("seconds since the first arrival (time-scaled)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# --- main -------------------------------------------------------------------------------------------------


def limits_text(windows: tuple[RateWindow, ...]) -> str:
    return ",".join(str(w) for w in windows)


def run(args: argparse.Namespace, argv: list[str]) -> list[str]:
    began = time.monotonic()
    patch_on = not args.no_patch
    limits = {BATCH: args.batch_limits, **({PATCH: args.patch_limits} if patch_on else {})}
    batch, patch = limits_text(args.batch_limits), limits_text(args.patch_limits)
    names = ["a", "b", "c"] if args.workload == "all" else [args.workload]
    config = {
        "k": args.k,
        "incidents": args.incidents,
        "batch": batch,
        "patch": patch if patch_on else "off",
        "applies": {"k": "a", "incidents": "b", "batch": "ab", "patch": "ab"},
    }
    lines = [
        f"$ .venv/bin/python -m bench.throughput {' '.join(argv)}".rstrip(),
        header(
            "bench.throughput: three bursts through alertgate and a naive forwarder under both MDE budgets"
        ),
        f"limits (calls/seconds) on the emulator and in alertgate: batchUpdate {batch}; PATCH "
        + (
            patch
            if patch_on
            else "off (--no-patch: DEFENDER_PATCH_RATE_LIMITS=off, no PATCH limits on the "
            "emulator, no PATCH in the minimum)"
        )
        + f"; time factor 1/{args.time_factor:g} (the naive forwarder's Logic Apps intervals are divided by it)",
        f"alertgate: RATE_LIMIT_SAFETY_MARGIN_SECONDS {args.margin:g}, SYNC_MAX_WAIT_SECONDS 0.5, queue "
        "maxPollingInterval 0.5 s; times are from the first planned arrival, at the emulator",
    ]
    print("\n".join(lines), flush=True)
    settings = {
        "DEFENDER_RATE_LIMITS": batch,
        "DEFENDER_PATCH_RATE_LIMITS": patch if patch_on else "off",
        "RATE_LIMIT_SAFETY_MARGIN_SECONDS": f"{args.margin:g}",
        "SYNC_MAX_WAIT_SECONDS": "0.5",
        "AzureFunctionsJobHost__extensions__queues__maxPollingInterval": "00:00:00.500",
        "DERIVED_KEY_TTL_SECONDS": "0",
    }
    panels = []
    with Stack(emulator_rate_limits=batch, emulator_patch_rate_limits=patch if patch_on else None) as stack:
        for name in names:
            requests = workload(name, args.k, args.incidents)
            updates = [Update(r.offset, r.alerts, r.key) for r in requests]
            minimum = minimum_drain(updates, args.batch_limits, args.patch_limits if patch_on else None)
            single = one_call_per_request(updates, args.batch_limits)
            host = stack.start_host(settings)
            try:
                tag = f"{name}-{time.time_ns()}"
                gate = asyncio.run(run_alertgate(stack, host.urls["base"], requests, tag, args.timeout))
            finally:
                stack.stop_host(host)
            naive = asyncio.run(run_naive(stack, requests, args.time_factor, args.seed, args.timeout))
            section, _ = report(name, requests, [gate, naive], minimum, single, limits, config)
            print("\n".join(section), flush=True)
            lines += section
            panels.append((name, gate, minimum, requests))
    title = f"batchUpdate {batch}, PATCH {patch if patch_on else 'off'} (time-scaled)"
    plot(panels, limits, args.plot, title)
    shown = args.plot.relative_to(REPO_ROOT) if args.plot.is_relative_to(REPO_ROOT) else args.plot
    tail = ["", f"plot: {shown}", f"total {time.monotonic() - began:.1f} s"]
    print("\n".join(tail), flush=True)
    return [*lines, *tail]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--workload", choices=["a", "b", "c", "all"], default="all", help="which workload (all)"
    )
    parser.add_argument("--k", type=int, default=200, help="(a) one-alert requests (200)")
    parser.add_argument("--incidents", type=int, default=60, help="(b) Sentinel incidents (60)")
    parser.add_argument("--batch-limits", type=parse_rate_limits, default=parse_rate_limits("5/2,20/20"),
                        help="batchUpdate calls/seconds windows, emulator and alertgate (5/2,20/20)")  # fmt: skip
    parser.add_argument("--patch-limits", type=parse_rate_limits, default=parse_rate_limits("50/2,60/20"),
                        help="PATCH calls/seconds windows, emulator and alertgate (50/2,60/20)")  # fmt: skip
    parser.add_argument(
        "--no-patch", action="store_true", help="PATCH off everywhere (an emulator without PATCH)"
    )
    parser.add_argument("--margin", type=float, default=0.1, help="RATE_LIMIT_SAFETY_MARGIN_SECONDS (0.1)")
    parser.add_argument("--time-factor", type=float, default=60.0,
                        help="real seconds one second here stands for; divides the Logic Apps intervals (60)")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=120.0, help="bound on each run, seconds (120)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the naive forwarder's retry jitter (1)")
    parser.add_argument(
        "--plot", type=Path, default=DEFAULT_PLOT, help="PNG to write (bench/results/throughput.png)"
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="text to write (bench/results/throughput.txt)"
    )
    args = parser.parse_args(argv)
    if not 1 <= args.k <= MAX_REQUESTS or not 1 <= args.incidents <= MAX_REQUESTS:
        parser.error(f"--k and --incidents must be 1 to {MAX_REQUESTS}")
    for name in ("time_factor", "timeout"):
        value = getattr(args, name)
        if not (math.isfinite(value) and 0 < value <= 600):
            parser.error(f"--{name.replace('_', '-')} must be more than 0 and at most 600")
    if not (math.isfinite(args.margin) and 0 <= args.margin <= 10):
        parser.error("--margin must be 0 to 10")
    if not args.no_patch and "--patch-rate-limits" not in emulator_options():
        parser.error(
            "this tree's MDE emulator has no PATCH (no --patch-rate-limits option): run with --no-patch"
        )
    args.plot, args.out = args.plot.resolve(), args.out.resolve()
    write_output(run(args, argv), args.out)


if __name__ == "__main__":
    main()
