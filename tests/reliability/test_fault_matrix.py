"""The fault matrix: every upstream fault kind × comment or not × synchronous or deferred path, and a
worker killed between send and record across the ways the interrupted call can end, each case judged
by the same invariants (tests/reliability/invariants.py: nothing lost, nothing sent twice without a
record saying so, the limits held).

tests/integration/test_faults.py and test_recovery.py prove one shape of each behaviour in detail; this
module runs the shapes against each other, with a small backlog under a binding budget so that retries,
deferrals, the shared 429 block and the sweep interleave as they would in production. Each case sends
several requests at once (their own alert ids, an Idempotency-Key each) to a real development host
against Azurite and the MDE emulator, scripts two faults at the emulator (the first and third call
it admits), and only then looks at the outcome from the outside.

Host and emulator use the same rate windows (4 calls a second, 12 in 5 s), so an overshoot by alertgate
would also show as an unscripted 429. Upstream calls time out after 1 s (2 s on the kill cases, so the
kill lands while the call is held), the sweep runs every second with a 1 s grace.

A last case slows one storage read down while a chunk finishes, the exact form of an interleaving the
matrix met by chance: an operation polled between its two chunk reads.

The fast subset (in the README's test command) is a handful of cases across both paths, both comment
choices, a retryable status, a timeout, a reset, a 429, a kill and the slow read; `scripts/reliability.sh`
runs all.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from devhost.services import Service, start_devhost
from emulators.control import EmulatorControl
from tests.conftest import HostPool
from tests.integration.helpers import eventually, new_ids, post
from tests.reliability import invariants
from tests.reliability.conftest import SlowQueryProxy, app_env
from tests.reliability.invariants import Sent

BATCH = "/api/alerts/batchUpdate"
ASYNC = {"Prefer": "respond-async"}
LIMITS = "4/1,12/5"
WINDOWS = invariants.parse_windows(LIMITS)
MATRIX = {
    "AzureFunctionsJobHost__extensions__queues__maxPollingInterval": "00:00:00.500",
    "DEFENDER_HTTP_TIMEOUT_SECONDS": "1",
    "DEFENDER_RATE_LIMITS": LIMITS,
    "RATE_LIMIT_SAFETY_MARGIN_SECONDS": "0.2",
    "SYNC_MAX_WAIT_SECONDS": "2",
    "SWEEP_SCHEDULE": "*/1 * * * * *",
    "SWEEP_GRACE_SECONDS": "1",
}
KILL = {**MATRIX, "DEFENDER_HTTP_TIMEOUT_SECONDS": "2"}
REQUESTS_PER_CASE = 6  # more than the 4-a-second window: some wait for budget, some are deferred
IDS_PER_REQUEST = 2
FULL = pytest.mark.full


@dataclass(frozen=True)
class FaultKind:
    """A way MDE misbehaves, as an emulator fault; `unknown` when the call was sent and no answer came."""

    name: str
    fault: dict[str, Any]
    unknown: bool


FAULTS = [
    FaultKind("429", {"status": 429, "retryAfter": 2}, unknown=False),
    FaultKind("500", {"status": 500}, unknown=False),
    FaultKind("503", {"status": 503}, unknown=False),
    FaultKind("timeout-applied", {"delaySeconds": 2, "apply": True}, unknown=True),
    FaultKind("timeout-not-applied", {"delaySeconds": 2, "apply": False}, unknown=True),
    FaultKind("reset-applied", {"reset": True, "apply": True}, unknown=True),
    FaultKind("reset-not-applied", {"reset": True, "apply": False}, unknown=True),
]

# How a case's requests reach MDE (docs/contracts.md §7):
# - "distinct": batchUpdate only; with a comment every request's differs, so each call is one chunk
#   (without one the updates are identical and coalesce anyway);
# - "identical": batchUpdate only, every request with the same comment: calls carry several chunks;
# - "patch": the PATCH channel on too, with the same windows at both ends: requests that find
#   batchUpdate's budget spent go out as one PATCH per alert.
SHAPES = ("distinct", "identical", "patch")
PATCH = {"DEFENDER_PATCH_RATE_LIMITS": LIMITS}

# (fault, path, comment, resend, shape): the fast subset, in the README's test command.
FAST_CASES = {
    ("500", "sync", True, False, "distinct"),
    ("timeout-applied", "async", True, False, "distinct"),
    ("reset-applied", "sync", False, False, "distinct"),
    ("429", "async", False, False, "distinct"),
    ("503", "async", True, False, "identical"),
    ("reset-applied", "sync", True, False, "patch"),
    ("429", "async", True, False, "patch"),
}


def matrix_cases() -> list[Any]:
    """Every fault × path × comment × shape; for the unknown-outcome faults with a comment, also with the
    operator's RESEND_UNKNOWN_WITH_COMMENT (the one setting that allows a comment twice)."""
    cases = []
    for kind in FAULTS:
        for path in ("sync", "async"):
            for comment in (True, False):
                for shape in SHAPES:
                    if shape == "identical" and not comment:
                        continue  # without a comment "distinct" requests are identical already
                    resends = (False, True) if kind.unknown and comment and shape == "distinct" else (False,)
                    for resend in resends:
                        key = (kind.name, path, comment, resend, shape)
                        label = f"{kind.name}-{path}-{'comment' if comment else 'no-comment'}-{shape}"
                        label += "-resend" if resend else ""
                        marks = () if key in FAST_CASES else (FULL,)
                        cases.append(pytest.param(kind, path, comment, resend, shape, id=label, marks=marks))
    return cases


def update(ids: list[str], comment: str | None, assignee: str = "secops") -> dict[str, Any]:
    """A playbook's closing update, in canonical spelling (what MDE must receive)."""
    body: dict[str, Any] = {
        "alertIds": ids,
        "status": "Resolved",
        "assignedTo": f"{assignee}@contoso.example",
        "classification": "FalsePositive",
        "determination": "NotMalicious",
    }
    if comment is not None:
        body["comment"] = comment
    return body


async def submit(
    http: aiohttp.ClientSession, url: str, body: dict[str, Any], headers: dict[str, str]
) -> tuple[int, dict[str, Any]]:
    """POST as a playbook's retry policy would: a 500 problem (storage hiccup, no operation named) is
    re-sent with the same Idempotency-Key, which its detail says is safe, up to 3 times, 0.5 s apart.

    Why: after ≥ 5 s without traffic, Azurite (Node's keep-alive timeout) has closed connections that
    the app's storage client still pools; a burst of requests can then meet "Server disconnected" on the
    key's insert and answer 500 before anything was accepted. That is not what a case studies."""
    for attempt in range(4):
        status, _, document = await post(http, url, body, headers)
        document = document if isinstance(document, dict) else {"body": document}
        if status != 500 or "operationId" in document or attempt == 3:
            return status, document
        await asyncio.sleep(0.5)
    raise AssertionError("unreachable")


def backlog(case: str, with_comment: bool, *, same_comment: bool = False) -> list[tuple[dict[str, Any], str]]:
    """The case's requests with their Idempotency-Keys. Every request has its own comment and assignee, so
    a duplicate shows and no two updates are identical (each call carries one chunk, as the faults'
    order assumes), unless `same_comment`: then all are identical and may share calls."""
    run = uuid.uuid4().hex[:8]

    def comment(n: int) -> str | None:
        if not with_comment:
            return None
        return f"{case} run {run}" if same_comment else f"{case} request {n} run {run}"

    return [
        (
            update(new_ids(IDS_PER_REQUEST), comment(n), "secops" if same_comment else f"analyst{n}"),
            f"reliability-{run}-{n}",
        )
        for n in range(REQUESTS_PER_CASE)
    ]


@pytest.mark.parametrize(("kind", "path", "with_comment", "resend", "shape"), matrix_cases())
async def test_fault(
    hosts: HostPool,
    ctl: EmulatorControl,
    http: aiohttp.ClientSession,
    kind: FaultKind,
    path: str,
    with_comment: bool,
    resend: bool,
    shape: str,
) -> None:
    """MDE misbehaves on the first and third call it admits (the first only, for identical updates that
    share calls); everything accepted still ends by the rules.

    Beyond the invariants: both scripted faults were consumed, and exactly the two chunks that met an
    unknown outcome end OutcomeUnknown when they carry a comment and the operator did not choose the
    re-send; with the re-send, their comment shows twice (the documented price of that choice). A
    faulted call that carried several chunks (shape "identical") ends each of them so.
    """
    settings = {**MATRIX, "RESEND_UNKNOWN_WITH_COMMENT": "true"} if resend else MATRIX
    settings = {**settings, **PATCH} if shape == "patch" else settings
    base = await asyncio.to_thread(hosts.get, **settings)
    await ctl.configure(rateLimits=LIMITS, patchRateLimits=LIMITS)
    # Identical updates share calls, so a case may make only two: then only the first is faulted.
    faults = [kind.fault] if shape == "identical" else [kind.fault, {"delaySeconds": 0}, kind.fault]
    await ctl.add_faults(faults)
    requests = backlog(f"{kind.name}/{path}/{shape}", with_comment, same_comment=shape == "identical")
    headers = ASYNC if path == "async" else {}
    answers = await asyncio.gather(
        *(
            submit(http, base.urls["base"] + BATCH, body, {**headers, "Idempotency-Key": key})
            for body, key in requests
        )
    )
    sent = [
        Sent(body, doc["operationId"], code)
        for (body, _), (code, doc) in zip(requests, answers, strict=True)
        if "operationId" in doc
    ]
    odd = [(code, doc) for code, doc in answers if code not in (200, 202, 504) or "operationId" not in doc]

    verdict = await invariants.check(
        ctl, http, base.urls["base"], sent, windows=WINDOWS, resend_unknown_with_comment=resend
    )
    assert not odd, f"answers that are not an accepted request's: {odd}"
    assert await ctl.pending_faults() == [], "precondition: both scripted faults were met"
    unknown = [c for c in verdict.chunks() if c["status"] == "OutcomeUnknown"]
    expected = 2 if kind.unknown and with_comment and not resend else 0
    if shape == "identical" and expected:
        assert len(unknown) >= 1, unknown  # the faulted call ends all its members so
    else:
        assert len(unknown) == expected, unknown
    if resend and kind.fault.get("apply"):
        twice = [a for a, alert in verdict.alerts.items() if alert and len(alert["comments"]) == 2]
        assert len(twice) == 2 * IDS_PER_REQUEST, verdict.alerts


# --- a worker killed between send and record --------------------------------------------------------


@dataclass(frozen=True)
class HeldCall:
    """How the call the dead instance left in flight ends at MDE (the instance never learns it)."""

    name: str
    fault: dict[str, Any]
    applied: bool


HELD = [
    HeldCall("applied", {"delaySeconds": 4, "apply": True}, applied=True),
    HeldCall("not-applied", {"delaySeconds": 4, "apply": False}, applied=False),
    HeldCall("then-503", {"delaySeconds": 4, "status": 503}, applied=False),
]
FAST_KILLS = {("applied", "async", True)}


def kill_cases() -> list[Any]:
    cases = []
    for held in HELD:
        for path in ("sync", "async"):
            for comment in (True, False):
                marks = () if (held.name, path, comment) in FAST_KILLS else (FULL,)
                label = f"{held.name}-{path}-{'comment' if comment else 'no-comment'}"
                cases.append(pytest.param(held, path, comment, id=label, marks=marks))
    return cases


async def call_in_flight(ctl: EmulatorControl, ours: set[str], within: float = 10.0) -> dict[str, Any]:
    """The case's call the emulator is holding (recorded, no answer yet), as soon as there is one."""
    held: list[dict[str, Any]] = []

    async def probe() -> bool:
        held[:] = [
            c
            for c in await ctl.calls()
            if c["status"] is None and not c["aborted"] and set(invariants.call_ids(c)) & ours
        ]
        return bool(held)

    await eventually(probe, within, "a call held in flight at the emulator")
    return held[0]


@pytest.mark.parametrize(("held", "path", "with_comment"), kill_cases())
async def test_killed_between_send_and_record(
    hosts: HostPool,
    ctl: EmulatorControl,
    http: aiohttp.ClientSession,
    own_hosts: list[Service],
    held: HeldCall,
    path: str,
    with_comment: bool,
) -> None:
    """An instance is SIGKILLed while MDE holds one of its calls, with other requests of a small backlog
    accepted, sent or waiting around it; a second instance of the same app takes over.

    On the synchronous path the callers' POSTs die with the instance; as a playbook would, each caller
    re-sends with its Idempotency-Key to the new instance and learns its operation from that answer
    (the operation's outcome, a replay, or 409 "in progress" naming it). Beyond the invariants, the
    interrupted chunk is resolved by the outcome-unknown rule: OutcomeUnknown with a comment, re-sent
    (attempts ≥ 2) and Succeeded without one, whatever the held call did at MDE.
    """
    first, env = await asyncio.to_thread(hosts.fresh, **KILL)
    own_hosts.append(first)
    await ctl.configure(rateLimits=LIMITS)
    await ctl.add_faults([held.fault])
    requests = backlog(f"kill/{held.name}/{path}", with_comment)[:3]
    ours = {a for body, _ in requests for a in body["alertIds"]}
    url = first.urls["base"] + BATCH
    headers = ASYNC if path == "async" else {}
    posts = [
        asyncio.create_task(submit(http, url, body, {**headers, "Idempotency-Key": key}))
        for body, key in requests
    ]
    if path == "async":
        await asyncio.gather(*posts)  # 202 at once; the worker sends
    in_flight = await call_in_flight(ctl, ours)
    await asyncio.to_thread(first.kill)
    at_kill = [c for c in await ctl.calls() if set(invariants.call_ids(c)) & ours]
    pending_at_kill = [c["seq"] for c in at_kill if c["status"] is None and not c["aborted"]]
    assert pending_at_kill == [in_flight["seq"]], "precondition: the kill landed while one call was held"
    second = await asyncio.to_thread(hosts.start, env)
    own_hosts.append(second)

    outcomes = await asyncio.gather(*posts, return_exceptions=True)
    sent, odd = [], []
    for (body, key), outcome in zip(requests, outcomes, strict=True):
        if isinstance(outcome, BaseException):  # the POST died with the instance: ask the new one
            assert path == "sync" and isinstance(outcome, aiohttp.ClientError), outcome
            status, document = await submit(http, second.urls["base"] + BATCH, body, {"Idempotency-Key": key})
            answer = None if status == 409 else status  # 409 "in progress" names the operation
        else:
            status, document = outcome
            answer = status
            if status not in (200, 202, 504):
                odd.append((status, document))
        if "operationId" in document:
            sent.append(Sent(body, document["operationId"], answer))
        else:
            odd.append((status, document))

    verdict = await invariants.check(ctl, http, second.urls["base"], sent, windows=WINDOWS)
    assert not odd, f"answers that are not an accepted request's: {odd}"
    held_ids = set(invariants.call_ids(in_flight))  # one chunk, or the members of a coalesced call
    interrupted = [c for c in verdict.chunks() if set(c["alertIds"]) <= held_ids]
    assert interrupted and {a for c in interrupted for a in c["alertIds"]} == held_ids, verdict.resources
    for chunk in interrupted:
        if with_comment:
            assert chunk["status"] == "OutcomeUnknown", chunk
        else:
            assert chunk["status"] == "Succeeded" and chunk["attempts"] >= 2, chunk
    held_alert = verdict.alerts[invariants.call_ids(in_flight)[0]]
    if held.applied:
        assert held_alert is not None and in_flight["seq"] in held_alert["updateSeqs"], held_alert


# --- a coalesced call refused for one member -----------------------------------------------------------


@pytest.mark.parametrize("path", ["sync", "async"])
async def test_coalesced_call_refused_for_one_member(
    hosts: HostPool, ctl: EmulatorControl, http: aiohttp.ClientSession, path: str
) -> None:
    """A backlog of identical updates (one shared comment) coalesces; MDE refuses the call that carries
    the one alert it does not know (404 naming it). Only that request fails (422); every other ends
    Succeeded with its comment once, and every call is made of whole recorded chunks (docs/contracts.md
    §7). A fault on the first admitted call (503) puts a coalesced call's members back with back-off
    on top."""
    base = await asyncio.to_thread(hosts.get, **MATRIX)
    requests = backlog(f"refused/{path}", True, same_comment=True)
    refused_ids = requests[2][0]["alertIds"][:1]
    await ctl.configure(rateLimits=LIMITS, unknownIds=refused_ids)
    await ctl.add_faults([{"status": 503}])
    headers = ASYNC if path == "async" else {}
    answers = await asyncio.gather(
        *(
            submit(http, base.urls["base"] + BATCH, body, {**headers, "Idempotency-Key": key})
            for body, key in requests
        )
    )
    sent = [
        Sent(body, doc["operationId"], code) for (body, _), (code, doc) in zip(requests, answers, strict=True)
    ]

    verdict = await invariants.check(
        ctl, http, base.urls["base"], sent, windows=WINDOWS, refused=frozenset({sent[2].operation_id})
    )

    refusals = [c for c in verdict.calls if c["status"] == 404]
    assert refusals and all(set(refused_ids) <= set(invariants.call_ids(c)) for c in refusals)
    assert max(len(invariants.call_ids(c)) for c in verdict.calls) > IDS_PER_REQUEST, (
        "precondition: some call carried several requests' chunks"
    )
    assert await ctl.pending_faults() == []


# --- a slow storage read while a chunk finishes -----------------------------------------------------


async def test_operation_polled_while_its_chunk_finishes(
    azurite: Service,
    emulators: Service,
    ctl: EmulatorControl,
    http: aiohttp.ClientSession,
    own_hosts: list[Service],
    tmp_path: Path,
) -> None:
    """A poller never gets a terminal answer that the operation's outcome contradicts.

    The full matrix caught this once in a few thousand polls (an operation answered Failed with no
    chunks while its only chunk Succeeded); this case makes the interleaving exact. GET
    /api/operations/{id} reads the operation's pending and its finished chunks; the storage read of the
    pending ones is slowed by 1 s (SlowQueryProxy) and MDE holds the chunk's call for 2 s, so the chunk
    finishes while some polls are between their two reads. A Logic App stops polling at the first
    answer that is not 202, so an early terminal answer is the caller's outcome: a 502 Failed here
    fails the playbook run of an update that was applied, and a playbook that re-submits it sends the
    update and its comment again.
    """
    table = azurite.urls["table"]  # http://127.0.0.1:PORT/devstoreaccount1
    origin, account = table.rsplit("/", 1)
    async with SlowQueryProxy(origin, hold="RowKey ge 'p-0", delay=1.0) as proxy:
        storage = azurite.urls["connection_string"].replace(table, f"{proxy.url}/{account}")
        env = app_env(storage, emulators, **{**MATRIX, "DEFENDER_HTTP_TIMEOUT_SECONDS": "5"})
        host = await asyncio.to_thread(start_devhost, tmp_path / "logs", env, name="devhost-slow-read")
        own_hosts.append(host)
        await ctl.add_faults([{"delaySeconds": 2, "apply": True}])
        body = update(new_ids(1), f"slow read {uuid.uuid4().hex[:8]}")
        status, _, document = await post(
            http, host.urls["base"] + BATCH, body, {**ASYNC, "Idempotency-Key": f"slow-{uuid.uuid4()}"}
        )
        assert status == 202, document
        location = f"{host.urls['base']}/api/operations/{document['operationId']}"
        loop = asyncio.get_running_loop()
        answers: list[tuple[float, int, dict[str, Any]]] = []

        async def poll() -> None:
            async with http.get(location) as response:
                answers.append((loop.time(), response.status, await response.json(content_type=None)))

        polls = []
        for _ in range(100):  # a poll every 0.1 s, each taking a second, until one ends (10 s at most)
            polls.append(asyncio.create_task(poll()))
            await asyncio.sleep(0.1)
            if any(code != 202 for _, code, _ in answers):
                break
        await asyncio.gather(*polls)
        assert proxy.held > 0, "precondition: the reads of pending chunks were slowed"
        verdict = await invariants.check(
            ctl, http, host.urls["base"], [Sent(body, document["operationId"], 202)], windows=WINDOWS
        )
        await asyncio.to_thread(host.stop)

    (final,) = verdict.resources.values()
    ended = [
        (round(at - answers[0][0], 2), code, doc["status"], len(doc["chunks"]))
        for at, code, doc in answers
        if code != 202
    ]
    assert final["status"] == "Succeeded", final
    assert ended and all(answer[1:] == (200, "Succeeded", 1) for answer in ended), (
        f"terminal answers (s after the first poll, HTTP, status, chunks) while the operation Succeeded: {ended}"
    )
