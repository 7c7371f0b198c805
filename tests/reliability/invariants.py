"""The promises every reliability case is judged by, checked from the outside after the case ran.

alertgate promises (README, docs/contracts.md §1 and §3) that whatever goes wrong upstream or in its own processes:

1. **Nothing is lost.** Every accepted operation ends within a bound, each chunk Succeeded or, when the
   call's outcome is unknown and the chunk carries a comment, OutcomeUnknown with a record saying so;
   every alert of a Succeeded chunk shows the update at MDE.
2. **Nothing is sent twice without a record saying so.** MDE never sees more calls for a chunk than the
   chunk's record counts attempts; an alert is applied more than once only in a chunk without a comment
   (setting the same values again is harmless) whose record shows the retry (attempts > 1); a comment
   never appears twice (MDE appends comments) unless the operator chose RESEND_UNKNOWN_WITH_COMMENT; and
   MDE receives nothing for an alert that no accepted chunk holds.
3. **The limits hold.** MDE never answers 429 except where a case scripted one; no window-long
   interval holds more calls than its limit, for every configured window (the emulator is configured
   with the same windows, so an overshoot would also show as an unscripted 429); and after a scripted
   429 nobody calls before its Retry-After has passed.

The judge is what the MDE emulator recorded (calls, their arrival times, each alert's applied updates
and comments) and what a caller polling `GET /api/operations/{id}` sees; never alertgate's own tables,
so a bug that corrupts them cannot hide itself. Every problem found is collected and reported at once,
with the emulator's call timeline, so a failing case explains itself.

Cases give every request its own alert ids, so the emulator's per-alert record belongs to exactly one
chunk. One call may carry several chunks (coalescing, docs/contracts.md §7): then it carries each of
them whole, with their one identical body; a PATCH call carries one one-alert piece.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from emulators.control import EmulatorControl, max_calls_in_any_window
from tests.integration.helpers import eventually

ENUM_AND_TEXT_FIELDS = ("status", "assignedTo", "classification", "determination")
RETRY_AFTER_TOLERANCE = 0.5  # a call granted before the 429 was recorded may still arrive this late
POLL_SECONDS = 0.2


@dataclass(frozen=True)
class Window:
    """One rate window: at most `calls` calls in any `seconds`-long interval."""

    calls: int
    seconds: float


def parse_windows(text: str) -> list[Window]:
    """`"4/1,12/5"` → windows, the DEFENDER_RATE_LIMITS format (the test's own reading of it)."""
    windows = []
    for part in text.split(","):
        calls, _, seconds = part.strip().partition("/")
        windows.append(Window(int(calls), float(seconds)))
    return windows


@dataclass(frozen=True)
class Sent:
    """One request a case got accepted: the body in canonical spelling and how to follow it.

    `answer` is the status of the first answer the caller got, or None if its connection died with the
    instance (the operation id then came from a retry with the same Idempotency-Key).
    """

    body: dict[str, Any]
    operation_id: str
    answer: int | None = None

    @property
    def alert_ids(self) -> list[str]:
        return list(dict.fromkeys(self.body["alertIds"]))

    @property
    def comment(self) -> str | None:
        value = self.body.get("comment")
        return value if isinstance(value, str) else None


@dataclass
class Verdict:
    """What the checks saw, kept for case-specific assertions after the shared ones passed."""

    resources: dict[str, dict[str, Any]] = field(default_factory=dict)  # operation id → resource
    calls: list[dict[str, Any]] = field(default_factory=list)  # the emulator calls of this case's alerts
    alerts: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def chunks(self) -> list[dict[str, Any]]:
        return [chunk for resource in self.resources.values() for chunk in resource.get("chunks", [])]


async def operation_when_done(
    http: aiohttp.ClientSession, base_url: str, operation_id: str, within: float
) -> tuple[int, dict[str, Any]] | None:
    """Poll the operation as a Logic App would until it is no longer 202; None if it did not end in time.

    A terminal operation answers with the resource itself (200, or the 4xx/5xx a synchronous call would
    have got); a transport error or a problem+json 5xx while polling (storage briefly unreachable) is
    polled through, as a caller's retry policy would, within the same bound.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    url = f"{base_url}/api/operations/{operation_id}"
    for _ in range(int(within / POLL_SECONDS) + 1):
        try:
            async with http.get(url) as response:
                body = await response.json(content_type=None)
                if (
                    response.status != 202
                    and isinstance(body, dict)
                    and body.get("operationId") == operation_id
                ):
                    return response.status, body  # the resource itself, terminal (200, 422, 502, 504...)
        except (aiohttp.ClientError, ValueError):
            pass
        if loop.time() > deadline:
            return None
        await asyncio.sleep(POLL_SECONDS)
    return None


def call_ids(call: dict[str, Any]) -> list[str]:
    """The alerts a call named: the record's `alertIds` (the body's for batchUpdate, the path's for
    PATCH), or the body's for an emulator that records no such field."""
    recorded = call.get("alertIds")
    if isinstance(recorded, list):
        return [i for i in recorded if isinstance(i, str)]
    document = call.get("json")
    ids = document.get("alertIds") if isinstance(document, dict) else None
    return [i for i in ids if isinstance(i, str)] if isinstance(ids, list) else []


async def settled_calls(ctl: EmulatorControl, ours: set[str], within: float) -> list[dict[str, Any]]:
    """This case's calls once none of them is still held in flight by a delay (its effect is final)."""
    calls: list[dict[str, Any]] = []

    async def settled() -> bool:
        calls[:] = [c for c in await ctl.calls() if set(call_ids(c)) & ours]
        return all(c["status"] is not None or c["aborted"] for c in calls)

    await eventually(settled, within, "every call of the case finished at the emulator", every=POLL_SECONDS)
    return calls


def timeline(calls: list[dict[str, Any]]) -> str:
    """The calls as lines a person can read: arrival (s from the first), status, fault, ids."""
    if not calls:
        return "  (no calls)"
    start = min(c["time"] for c in calls)
    lines = []
    for c in sorted(calls, key=lambda c: c["time"]):
        status = "reset" if c["aborted"] else c["status"]
        fault = f" fault={json.dumps(c['fault'])}" if c["fault"] is not None else ""
        comment = " +comment" if isinstance(c.get("json"), dict) and "comment" in c["json"] else ""
        lines.append(
            f"  seq={c['seq']} t={c['time'] - start:7.3f} {status} ids={call_ids(c)}{comment}{fault} "
            f"code={c['errorCode']}"
        )
    return "\n".join(lines)


async def check(
    ctl: EmulatorControl,
    http: aiohttp.ClientSession,
    base_url: str,
    sent: list[Sent],
    *,
    windows: list[Window],
    resend_unknown_with_comment: bool = False,
    within: float = 40.0,
    refused: frozenset[str] = frozenset(),
) -> Verdict:
    """Wait for every operation to end (bounded), then check the three promises; assert none is broken.

    `base_url` is a live instance of the app (after a kill, the one that took over). `refused` names
    operations whose alert MDE does not know: they, and only they, end Failed (422, NotFound).
    """
    verdict = Verdict()
    problems = verdict.problems
    ours = {alert_id for s in sent for alert_id in s.alert_ids}
    assert len(ours) == sum(len(s.alert_ids) for s in sent), "cases give every request its own alert ids"

    # 1. Every accepted operation ends within the bound.
    finals = await asyncio.gather(
        *(operation_when_done(http, base_url, s.operation_id, within) for s in sent)
    )
    for s, final in zip(sent, finals, strict=True):
        if final is None:
            problems.append(f"operation {s.operation_id} did not end within {within}s (lost?)")
            continue
        code, resource = final
        verdict.resources[s.operation_id] = resource
        if s.operation_id in refused:
            _check_refused(s, code, resource, problems)
        else:
            _check_operation(s, code, resource, resend_unknown_with_comment, problems)

    verdict.calls = await settled_calls(ctl, ours, within=15.0)
    verdict.alerts = dict(
        zip(sorted(ours), await asyncio.gather(*(ctl.alert(a) for a in sorted(ours))), strict=True)
    )
    for s in sent:
        ended = verdict.resources.get(s.operation_id)
        if ended is not None:
            _check_delivery(s, ended, verdict, resend_unknown_with_comment)
    _check_unrecorded(verdict)
    _check_limits(verdict, windows, refusals=bool(refused))

    if problems:
        documents = json.dumps(verdict.resources, indent=1)[:6000]
        raise AssertionError(
            f"{len(problems)} broken promise(s):\n- "
            + "\n- ".join(problems)
            + f"\nemulator calls:\n{timeline(verdict.calls)}\noperations:\n{documents}"
        )
    return verdict


def _check_operation(s: Sent, code: int, resource: dict[str, Any], resend: bool, problems: list[str]) -> None:
    """Nothing lost: terminal chunks that hold exactly the request's alerts, each Succeeded or, only
    where the rule allows it, OutcomeUnknown with its record; the answers agree with the chunks."""
    op = s.operation_id
    chunks = resource.get("chunks", [])
    held = [a for c in chunks for a in c["alertIds"]]
    if sorted(held) != sorted(s.alert_ids) or resource.get("alertCount") != len(s.alert_ids):
        problems.append(f"operation {op}: chunks hold {held}, the request asked for {s.alert_ids}")
    for chunk in chunks:
        status, error = chunk["status"], chunk.get("lastError") or {}
        where = f"operation {op} chunk {chunk.get('chunkId')}"
        if status == "Succeeded":
            continue
        if status == "OutcomeUnknown":
            if s.comment is None or resend:
                problems.append(
                    f"{where}: OutcomeUnknown although it may be re-sent (no comment or resend on)"
                )
            if error.get("code") != "OutcomeUnknown":
                problems.append(f"{where}: OutcomeUnknown without an OutcomeUnknown record: {error}")
            continue
        problems.append(f"{where}: ended {status} ({error}); nothing in the case should fail a chunk")
    statuses = {c["status"] for c in chunks}
    succeeded = statuses == {"Succeeded"}
    if (resource.get("status") == "Succeeded") != succeeded or (code == 200) != succeeded:
        problems.append(
            f"operation {op}: status {resource.get('status')} / HTTP {code} but chunks {statuses}"
        )
    if s.answer == 200 and not succeeded:
        problems.append(f"operation {op}: the caller was answered 200 but the chunks ended {statuses}")
    if s.answer == 504 and "OutcomeUnknown" not in statuses:
        problems.append(f"operation {op}: the caller was answered 504 but no chunk is OutcomeUnknown")


def _check_refused(s: Sent, code: int, resource: dict[str, Any], problems: list[str]) -> None:
    """An operation whose alert MDE refuses ends Failed with MDE's 404, answered 422."""
    codes = {(c["status"], (c.get("lastError") or {}).get("code")) for c in resource.get("chunks", [])}
    if code != 422 or resource.get("status") != "Failed" or codes != {("Failed", "NotFound")}:
        problems.append(f"operation {s.operation_id}: refused alert, but HTTP {code}, chunks {codes}")


def _check_delivery(s: Sent, resource: dict[str, Any], verdict: Verdict, resend: bool) -> None:
    """Applied where it must be, never more often than the record admits."""
    problems = verdict.problems
    expected = {name: s.body[name] for name in ENUM_AND_TEXT_FIELDS if name in s.body}
    canonical = {"alertIds": None, **expected, **({"comment": s.comment} if s.comment else {})}
    for chunk in resource.get("chunks", []):
        ids = set(chunk["alertIds"])
        where = f"operation {s.operation_id} chunk {chunk.get('chunkId')}"
        calls = [c for c in verdict.calls if set(call_ids(c)) & ids]
        if len(calls) > chunk["attempts"]:
            problems.append(
                f"{where}: MDE got {len(calls)} calls, the record counts {chunk['attempts']} attempts"
            )
        for call in calls:
            body = call.get("json")
            patch = call.get("api") == "patch"
            wanted = {k: v for k, v in canonical.items() if k != "alertIds"} if patch else canonical
            if not isinstance(body, dict) or not ids <= set(call_ids(call)):
                problems.append(
                    f"{where}: call seq={call['seq']} carried {call_ids(call)}, not all the chunk's ids"
                )
            elif (body if patch else {**body, "alertIds": None}) != wanted or list(body) != list(wanted):
                problems.append(f"{where}: call seq={call['seq']} sent {body}, not the canonical {wanted}")
        for alert_id in sorted(ids):
            alert = verdict.alerts.get(alert_id)
            applied = len(alert["updateSeqs"]) if alert else 0
            comments = alert["comments"] if alert else []
            if chunk["status"] == "Succeeded":
                state = {name: alert.get(name) for name in expected} if alert else None
                if applied < 1 or state != expected:
                    problems.append(f"{where}: {alert_id} Succeeded but MDE shows {alert}")
                if s.comment is not None and s.comment not in comments:
                    problems.append(f"{where}: {alert_id} Succeeded but its comment never reached MDE")
            if applied > 1:
                if s.comment is not None and not resend:
                    problems.append(f"{where}: {alert_id}, with a comment, was applied {applied} times")
                if chunk["attempts"] < 2:
                    problems.append(f"{where}: {alert_id} applied {applied} times, record says 1 attempt")
            if s.comment is not None and not resend and comments.count(s.comment) > 1:
                problems.append(f"{where}: {alert_id} shows its comment {comments.count(s.comment)} times")


def _check_unrecorded(verdict: Verdict) -> None:
    """Every call for the case's alerts carries whole recorded chunks and nothing else (one chunk, or the
    members of a coalesced call)."""
    recorded = [frozenset(chunk["alertIds"]) for chunk in verdict.chunks()]
    for call in verdict.calls:
        ids = frozenset(call_ids(call))
        touched = [chunk for chunk in recorded if chunk & ids]
        whole = all(chunk <= ids for chunk in touched)
        if not whole or frozenset().union(*touched) != ids:
            verdict.problems.append(
                f"call seq={call['seq']} for {sorted(ids)} is not made of whole recorded chunks"
            )


def _check_limits(verdict: Verdict, windows: list[Window], *, refusals: bool = False) -> None:
    """No unscripted 429; no window over its limit; scripted Retry-Afters honoured by every instance."""
    calls, problems = verdict.calls, verdict.problems
    unscripted = [c["seq"] for c in calls if c["status"] == 429 and c["fault"] is None]
    if unscripted:
        problems.append(f"MDE answered 429 to calls {unscripted} that no fault scripted (the budget broke)")
    for api in sorted({str(c.get("api", "batchUpdate")) for c in calls}):  # each API has its own budget
        times = [c["time"] for c in calls if c.get("api", "batchUpdate") == api]
        for window in windows:
            most = max_calls_in_any_window(times, window.seconds)
            if most > window.calls:
                problems.append(f"{most} {api} calls within {window.seconds:g}s; the limit is {window.calls}")
    for refused in (c for c in calls if c["status"] == 429 and c["fault"] is not None):
        until = refused["time"] + float(refused["fault"].get("retryAfter", 1))
        early = [  # a 429 blocks its own channel (docs/contracts.md §7)
            c["seq"]
            for c in calls
            if refused["time"] + RETRY_AFTER_TOLERANCE < c["time"] < until - 0.05
            and c.get("api") == refused.get("api")
        ]
        if early:
            problems.append(f"calls {early} came within the Retry-After of 429 seq={refused['seq']}")
    statuses = Counter("reset" if c["aborted"] else c["status"] for c in calls)
    allowed = (200, 429, 500, 502, 503, 504, "reset", *((404,) if refusals else ()))
    if any(status not in allowed for status in statuses):
        problems.append(f"MDE answered something no case scripts: {dict(statuses)}")
