"""Upstream faults end to end: what alertgate does when MDE fails, refuses, throttles or never answers.

Every case runs the real app in development hosts against the MDE emulator, scripts the fault at the
emulator, and judges alertgate by what the emulator recorded (calls, their times, the alerts' state) and by
what a caller polling GET /api/operations sees (docs/contracts.md §1: retries, "Outcome unknown", the answer codes).

Hosts poll their queues at most every 0.5 s instead of host.json's 2 s, so retries show up quickly; every
wait is bounded in time.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import aiohttp
import pytest

from devhost.services import Service
from emulators.control import EmulatorControl
from tests.conftest import HostPool
from tests.integration.helpers import eventually, new_ids, post, sent_bodies, wait_for_operation

BATCH = "/api/alerts/batchUpdate"
ASYNC = {"Prefer": "respond-async"}
FAST = {"AzureFunctionsJobHost__extensions__queues__maxPollingInterval": "00:00:00.500"}
TIMEOUT = {**FAST, "DEFENDER_HTTP_TIMEOUT_SECONDS": "1"}


async def settled_calls(ctl: EmulatorControl, count: int, within: float = 10.0) -> list[dict[str, Any]]:
    """The emulator's calls once there are `count` of them and none is still held in a delay."""

    async def settled() -> bool:
        calls = await ctl.calls()
        return len(calls) >= count and all(c["status"] is not None for c in calls)

    await eventually(settled, within, f"{count} finished calls at the emulator")
    return await ctl.calls()


async def get_json(http: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, str], Any]:
    async with http.get(url) as response:
        return response.status, dict(response.headers), await response.json(content_type=None)


def update(ids: list[str], comment: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"alertIds": ids, "status": "Resolved"}
    if comment is not None:
        body["comment"] = comment
    return body


async def test_two_5xx_then_ok_is_applied_once_after_three_attempts(
    hosts: HostPool, ctl: EmulatorControl, http: aiohttp.ClientSession
) -> None:
    """5xx answers are retried with back-off, and a retry that succeeds is the only call that applied
    anything: the comment appears exactly once, and the operation counts every attempt."""
    ids, comment = new_ids(1), f"Closed by playbook run {uuid.uuid4()}"
    await ctl.add_faults([{"status": 500}, {"status": 500}])
    status, headers, body = await post(http, hosts.url(BATCH, **FAST), update(ids, comment))
    assert status == 202, body  # the first call failed within the request: the chunk was deferred
    final, resource = await wait_for_operation(http, headers["Location"], within=20)
    assert final == 200 and resource["status"] == "Succeeded", resource
    calls = await ctl.calls()
    assert [c["status"] for c in calls] == [500, 500, 200]
    assert all(b == update(ids, comment) for b in sent_bodies(calls))  # the same values each time
    assert resource["chunks"][0]["attempts"] == 3
    alert = await ctl.alert(ids[0])
    assert alert is not None and alert["comments"] == [comment] and alert["status"] == "Resolved"


RETRY_AFTER = 8


async def test_a_429_retry_after_holds_back_every_instance(
    hosts: HostPool, ctl: EmulatorControl, http: aiohttp.ClientSession, own_hosts: list[Service]
) -> None:
    """A 429 told to one instance blocks all of them (docs/contracts.md §3): requests for other alerts sent through a
    second instance right after it are deferred, and nobody calls MDE before Retry-After has passed."""
    first, env = await asyncio.to_thread(hosts.fresh, **FAST)
    own_hosts.append(first)
    second = await asyncio.to_thread(hosts.start, env)
    own_hosts.append(second)
    # Retry-After long enough that the second instance is surely asked inside the block on a busy machine
    await ctl.add_faults([{"status": 429, "retryAfter": RETRY_AFTER}])

    status, headers, body = await post(http, first.urls["base"] + BATCH, update(new_ids(1), None))
    assert status == 202, body
    (refused,) = await ctl.calls()
    assert refused["status"] == 429
    others = [update(new_ids(1), f"other request {n}") for n in range(3)]
    answers = await asyncio.gather(*(post(http, second.urls["base"] + BATCH, o) for o in others))
    sent_at = time.monotonic()
    assert sent_at - refused["time"] < RETRY_AFTER - 2, "precondition: the second was asked inside the block"
    for other_status, _, other_body in answers:
        assert other_status == 202, other_body  # deferred: the block is shared, not per instance
        assert other_body["chunks"][0]["attempts"] == 0

    locations = [headers["Location"], *(h["Location"] for _, h, _ in answers)]
    finals = await asyncio.gather(
        *(wait_for_operation(http, loc, within=RETRY_AFTER + 30) for loc in locations)
    )
    assert all(code == 200 and r["status"] == "Succeeded" for code, r in finals), finals
    calls = await ctl.calls()
    assert [c["status"] for c in calls] == [429, 200, 200, 200, 200]
    early = [c for c in calls[1:] if c["time"] < refused["time"] + RETRY_AFTER - 0.05]
    assert early == [], f"called MDE within Retry-After of the 429: {early}"


async def test_permanent_400_on_the_deferred_path_is_422_with_mdes_error(
    hosts: HostPool, ctl: EmulatorControl, http: aiohttp.ClientSession
) -> None:
    """A 400 is not retried; the polling caller gets 422 (what a synchronous call would have got) with
    the operation Failed and MDE's code, message and correlation id (target) for Microsoft support."""
    message = "The alert cannot be updated in its current state"
    await ctl.add_faults([{"status": 400, "code": "InvalidInput", "message": message}])
    status, headers, body = await post(http, hosts.url(BATCH, **FAST), update(new_ids(2), None), ASYNC)
    assert status == 202 and body["status"] == "Queued", body  # nothing tried within the request
    final, _ = await wait_for_operation(http, headers["Location"], within=15)
    assert final == 422
    code, response_headers, resource = await get_json(http, headers["Location"])
    assert code == 422 and response_headers["Content-Type"].startswith("application/json")
    assert resource["status"] == "Failed"
    error = resource["chunks"][0]["lastError"]
    assert error["httpStatus"] == 400 and error["code"] == "InvalidInput" and error["message"] == message
    assert isinstance(error["target"], str) and uuid.UUID(error["target"])  # MDE's correlation id
    calls = await ctl.calls()
    assert [c["status"] for c in calls] == [400]  # never retried


@pytest.mark.parametrize(
    ("comment", "resend", "apply", "expected"),
    [
        pytest.param("Closed as benign", "false", True, 504, id="comment-not-resent"),
        pytest.param(None, "false", False, 200, id="no-comment-resent"),
        pytest.param("Closed as benign", "true", True, 200, id="comment-resent-when-operator-chose-so"),
    ],
)
async def test_upstream_timeout_on_the_deferred_path(
    hosts: HostPool,
    ctl: EmulatorControl,
    http: aiohttp.ClientSession,
    comment: str | None,
    resend: str,
    apply: bool,
    expected: int,
) -> None:
    """A call that was sent and timed out may have been applied. Re-sending the same values is harmless,
    so a chunk without a comment is retried; a comment would appear twice, so such a chunk ends
    OutcomeUnknown (504) and MDE never sees it again, unless RESEND_UNKNOWN_WITH_COMMENT chose the re-send."""
    ids = new_ids(1)
    await ctl.add_faults([{"delaySeconds": 2.5, "apply": apply}])
    url = hosts.url(BATCH, **TIMEOUT, RESEND_UNKNOWN_WITH_COMMENT=resend)
    status, headers, body = await post(http, url, update(ids, comment), ASYNC)
    assert status == 202, body
    final, resource = await wait_for_operation(http, headers["Location"], within=20)
    assert final == expected, resource
    chunk = resource["chunks"][0]
    if expected == 504:
        assert resource["status"] == "Failed" and chunk["status"] == "OutcomeUnknown", resource
        assert chunk["attempts"] == 1 and chunk["lastError"]["code"] == "OutcomeUnknown"
        (held,) = await settled_calls(ctl, 1)  # the held call has landed by now
        await asyncio.sleep(2.0)  # longer than any retry back-off would have been: still one call
        assert len(await ctl.calls()) == 1
        alert = await ctl.alert(ids[0])
        assert alert is not None and alert["comments"] == [comment] and alert["updateSeqs"] == [held["seq"]]
        return
    assert resource["status"] == "Succeeded" and chunk["attempts"] == 2, resource
    calls = await settled_calls(ctl, 2)
    assert len(calls) == 2 and sent_bodies(calls) == [update(ids, comment)] * 2  # the same values again
    alert = await ctl.alert(ids[0])
    assert alert is not None and alert["status"] == "Resolved"
    if comment is not None:  # the operator's choice has its price: both calls landed, the comment twice
        assert alert["comments"] == [comment, comment]


async def test_max_attempts_ends_the_retries_with_502(
    hosts: HostPool, ctl: EmulatorControl, http: aiohttp.ClientSession
) -> None:
    """Retries are bounded by MAX_ATTEMPTS: after the last one the chunk is Failed with its last error and
    the polling caller gets 502, instead of an operation that never ends."""
    await ctl.add_faults([{"status": 500}, {"status": 500}])
    url = hosts.url(BATCH, **FAST, MAX_ATTEMPTS="2")
    status, headers, body = await post(http, url, update(new_ids(1), "Reviewed"))
    assert status == 202, body
    final, resource = await wait_for_operation(http, headers["Location"], within=15)
    assert final == 502 and resource["status"] == "Failed", resource
    chunk = resource["chunks"][0]
    assert chunk["status"] == "Failed" and chunk["attempts"] == 2
    assert chunk["lastError"]["httpStatus"] == 500 and chunk["lastError"]["code"] == "InternalServerError"
    assert [c["status"] for c in await ctl.calls()] == [500, 500]
