"""Shared state across instances: the call budget, idempotency keys, per-alert order, operations.

Limits are scaled down in time (DEFENDER_RATE_LIMITS=5/1,20/4) and the emulator enforces the same
windows, so an instance that overspent would show as an emulator 429.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections import Counter
from typing import Any

import aiohttp

from devhost.services import Service
from emulators.control import EmulatorControl, max_calls_in_any_window
from tests.conftest import HostPool
from tests.integration.helpers import new_ids, post, sent_bodies, wait_for_operation

LIMITS = "5/1,20/4"
WINDOWS = ((5, 1.0), (20, 4.0))
SCALED = {
    "DEFENDER_RATE_LIMITS": LIMITS,
    "RATE_LIMIT_SAFETY_MARGIN_SECONDS": "0.3",
    "SYNC_MAX_WAIT_SECONDS": "0.5",
    "AzureFunctionsJobHost__extensions__queues__maxPollingInterval": "00:00:00.500",
}
ASYNC = {"Prefer": "respond-async"}
# A margin small enough that the 2-a-second cases below keep slots close together and wait for them in
# process, yet large enough for a busy 2-core machine: a call may leave up to half the margin after its
# slot (the grant's age limit), and the other half covers the trip to the emulator. At 0.05 s that trip
# had 25 ms, and one CI run saw a call stamped late enough to make the next window's call a 429.
TIGHT_MARGIN = "0.2"


def one(alert_id: str, status: str) -> dict[str, Any]:
    """One alert's update, assigned to an analyst of its own: no two are identical, so each is a call of
    its own, as these cases count them (coalescing is tested in test_throughput.py)."""
    return {"alertIds": [alert_id], "status": status, "assignedTo": f"analyst-{alert_id}@contoso.example"}


async def drain(
    http: aiohttp.ClientSession, locations: list[str], within: float
) -> list[tuple[int, dict[str, Any]]]:
    return await asyncio.gather(*(wait_for_operation(http, loc, within=within) for loc in locations))


def assert_within_limits(calls: list[dict[str, Any]]) -> None:
    times = sorted(c["time"] for c in calls)
    for limit, seconds in WINDOWS:
        relative = [round(t - times[0], 3) for t in times]
        assert max_calls_in_any_window(times, seconds) <= limit, (limit, seconds, relative)
    assert [c for c in calls if c["status"] == 429] == []


async def burst(http: aiohttp.ClientSession, base: str, count: int) -> tuple[list[str], list[str]]:
    """`count` concurrent requests, each for its own alert; returns the alert ids and the Locations."""
    ids = new_ids(count)
    answers = await asyncio.gather(
        *(post(http, base + "/api/alerts/batchUpdate", one(a, "Resolved")) for a in ids)
    )
    statuses = Counter(status for status, _, _ in answers)
    assert set(statuses) <= {200, 202}, statuses
    assert all(headers.get("Location") for _, headers, _ in answers)
    return ids, [headers["Location"] for _, headers, _ in answers]


async def assert_each_delivered_once(ctl: EmulatorControl, ids: list[str]) -> None:
    calls = await ctl.calls()
    assert_within_limits(calls)
    delivered = Counter(a for c in calls if c["status"] == 200 for a in json.loads(c["body"])["alertIds"])
    assert {a: delivered[a] for a in ids} == dict.fromkeys(ids, 1)


async def test_burst_stays_within_the_budget(hosts: HostPool, ctl: EmulatorControl, http) -> None:
    await ctl.configure(rateLimits=LIMITS)
    host, _ = hosts.fresh(**SCALED)
    ids, locations = await burst(http, host.urls["base"], 60)
    results = await drain(http, locations, within=60)
    assert {status for status, _ in results} == {200}
    assert {body["status"] for _, body in results} == {"Succeeded"}
    await assert_each_delivered_once(ctl, ids)


async def test_scale_out_shares_one_budget(hosts: HostPool, ctl: EmulatorControl, http) -> None:
    await ctl.configure(rateLimits=LIMITS)
    host, env = hosts.fresh(**SCALED)
    workers: list[Service] = [hosts.start(env) for _ in range(3)]
    ids, locations = await burst(http, host.urls["base"], 60)
    results = await drain(http, locations, within=60)
    assert {body["status"] for _, body in results} == {"Succeeded"}
    await assert_each_delivered_once(ctl, ids)
    for worker in workers:
        worker.stop()


async def test_a_backlog_waits_for_its_reserved_slots_in_process(
    hosts: HostPool, ctl: EmulatorControl, http, own_hosts: list[Service]
) -> None:
    """Queued chunks reserve their slot in the shared log when their message comes and wait for it in
    process (it is within WORKER_BUDGET_WAIT_SECONDS), instead of going back to the queue each time
    another chunk got the budget first: every message is handled once, and the windows hold."""
    await ctl.configure(rateLimits="2/1")
    settings = {**SCALED, "DEFENDER_RATE_LIMITS": "2/1", "RATE_LIMIT_SAFETY_MARGIN_SECONDS": TIGHT_MARGIN}
    host, _ = hosts.fresh(**settings)
    own_hosts.append(host)
    ids = new_ids(8)
    url = host.urls["base"] + "/api/alerts/batchUpdate"
    answers = await asyncio.gather(*(post(http, url, one(a, "Resolved"), ASYNC) for a in ids))
    assert {status for status, _, _ in answers} == {202}
    results = await drain(http, [headers["Location"] for _, headers, _ in answers], within=30)
    assert {body["status"] for _, body in results} == {"Succeeded"}

    calls = await ctl.calls()
    assert [c for c in calls if c["status"] != 200] == []
    assert max_calls_in_any_window(sorted(c["time"] for c in calls), 1.0) <= 2
    assert Counter(a for c in calls for a in json.loads(c["body"])["alertIds"]) == dict.fromkeys(ids, 1)
    outcomes = re.findall(r"chunk message \S+: (\S+)", host.log_path.read_text())
    assert Counter(outcomes) == {"finished": len(ids)}


async def test_a_worker_waiting_for_its_slot_is_not_taken_for_a_lost_message(
    hosts: HostPool, ctl: EmulatorControl, http, own_hosts: list[Service]
) -> None:
    """With a short SWEEP_GRACE_SECONDS the sweep re-queues a Pending chunk soon after its message was
    due, while workers wait in process for their reserved slots (at most half the grace). Whatever the
    sweep and the workers race to (a worker whose chunk the sweep re-queued finds its Sending mark
    refused: `lost`, its grant given back), every chunk is finished once, by one message, delivered once,
    and the windows hold.

    How often that race is lost depends on how fast the machine is, so it is a figure, not an assertion
    here: `python -m bench.sweep_race` prints it (none on an idle machine)."""
    await ctl.configure(rateLimits="2/1")
    settings = {
        **SCALED,
        "DEFENDER_RATE_LIMITS": "2/1",
        "RATE_LIMIT_SAFETY_MARGIN_SECONDS": TIGHT_MARGIN,
        "SWEEP_SCHEDULE": "*/1 * * * * *",
        "SWEEP_GRACE_SECONDS": "2",
    }
    host, _ = hosts.fresh(**settings)
    own_hosts.append(host)
    ids = new_ids(8)
    url = host.urls["base"] + "/api/alerts/batchUpdate"
    answers = await asyncio.gather(*(post(http, url, one(a, "Resolved"), ASYNC) for a in ids))
    results = await drain(http, [headers["Location"] for _, headers, _ in answers], within=90)
    assert {body["status"] for _, body in results} == {"Succeeded"}
    assert all(chunk["attempts"] == 1 for _, body in results for chunk in body["chunks"]), results
    await assert_each_delivered_once(ctl, ids)
    outcomes = Counter(re.findall(r"chunk message \S+: (\S+)", host.log_path.read_text()))
    assert outcomes["finished"] == len(ids), outcomes


# --- idempotency -----------------------------------------------------------------------------------


async def test_replay_returns_the_first_answer(hosts: HostPool, ctl: EmulatorControl, http) -> None:
    url = hosts.url("/api/alerts/batchUpdate")
    body = {"alertIds": new_ids(2), "status": "Resolved", "comment": "closed by playbook"}
    first = await post(http, url, body, {"Idempotency-Key": "replay-1"})
    again = await post(http, url, body, {"Idempotency-Key": "replay-1"})
    assert first[0] == again[0] == 200
    assert again[2] == first[2]
    assert again[1]["Idempotent-Replayed"] == "true" and "Idempotent-Replayed" not in first[1]
    assert again[1]["Location"] == first[1]["Location"]
    assert len(await ctl.calls()) == 1


async def test_replay_of_a_202_has_the_same_location(hosts: HostPool, ctl: EmulatorControl, http) -> None:
    url = hosts.url("/api/alerts/batchUpdate")
    body = {"alertIds": new_ids(1), "status": "InProgress"}
    first = await post(http, url, body, {"Idempotency-Key": "replay-202", **ASYNC})
    again = await post(http, url, body, {"Idempotency-Key": "replay-202"})
    assert first[0] == again[0] == 202
    assert again[1]["Location"] == first[1]["Location"] and again[2] == first[2]
    await wait_for_operation(http, first[1]["Location"])
    assert len(await ctl.calls()) == 1


async def test_same_key_different_body_is_422(hosts: HostPool, ctl: EmulatorControl, http) -> None:
    url = hosts.url("/api/alerts/batchUpdate")
    alert = new_ids(1)
    assert (await post(http, url, {"alertIds": alert, "status": "New"}, {"Idempotency-Key": "k-422"}))[
        0
    ] == 200
    status, headers, problem = await post(
        http, url, {"alertIds": alert, "status": "Resolved"}, {"Idempotency-Key": "k-422"}
    )
    assert status == 422 and headers["Content-Type"].startswith("application/problem+json")
    assert [e["field"] for e in problem["errors"]] == ["Idempotency-Key"]
    assert len(await ctl.calls()) == 1


async def test_replay_while_in_progress_is_409(hosts: HostPool, ctl: EmulatorControl, http) -> None:
    url = hosts.url("/api/alerts/batchUpdate")
    await ctl.add_faults([{"delaySeconds": 1.5, "apply": True}])
    body = {"alertIds": new_ids(1), "status": "Resolved"}
    first = asyncio.create_task(post(http, url, body, {"Idempotency-Key": "slow-1"}))
    await asyncio.sleep(0.5)
    status, headers, problem = await post(http, url, body, {"Idempotency-Key": "slow-1"})
    assert status == 409 and int(headers["Retry-After"]) >= 1
    assert problem["operationId"]
    assert (await first)[0] == 200
    assert len(await ctl.calls()) == 1


async def test_twenty_concurrent_requests_with_one_key_make_one_call(
    hosts: HostPool, ctl: EmulatorControl, http
) -> None:
    url = hosts.url("/api/alerts/batchUpdate")
    body = {"alertIds": new_ids(3), "status": "Resolved", "comment": "once"}
    answers = await asyncio.gather(
        *(post(http, url, body, {"Idempotency-Key": "storm-1"}) for _ in range(20))
    )
    statuses = Counter(status for status, _, _ in answers)
    assert set(statuses) <= {200, 409}, statuses
    assert statuses[200] >= 1
    assert len({b["operationId"] for s, _, b in answers}) == 1
    assert len(await ctl.calls()) == 1


async def test_unkeyed_repeats_inside_the_derived_window_send_once(
    hosts: HostPool, ctl: EmulatorControl, http
) -> None:
    url = hosts.url("/api/alerts/batchUpdate", DERIVED_KEY_TTL_SECONDS="600")
    body = {"alertIds": new_ids(2), "status": "Resolved"}
    answers = [await post(http, url, body) for _ in range(4)]
    assert [s for s, _, _ in answers] == [200] * 4
    assert [h.get("Idempotent-Replayed") for _, h, _ in answers] == [None, "true", "true", "true"]
    assert len(await ctl.calls()) == 1


async def test_a_derived_key_never_swallows_a_change_back(
    hosts: HostPool, ctl: EmulatorControl, http
) -> None:
    url = hosts.url("/api/alerts/batchUpdate", DERIVED_KEY_TTL_SECONDS="600")
    alert = new_ids(1)
    a = {"alertIds": alert, "status": "InProgress", "assignedTo": "a@contoso.com"}
    b = {"alertIds": alert, "status": "Resolved"}
    for body in (a, b, a):
        assert (await post(http, url, body))[0] == 200
    assert [json.loads(c["body"])["status"] for c in await ctl.calls()] == [
        "InProgress",
        "Resolved",
        "InProgress",
    ]
    assert (await ctl.alert(alert[0]) or {})["status"] == "InProgress"


# --- per-alert order -------------------------------------------------------------------------------


async def test_updates_of_one_alert_are_applied_in_acceptance_order(
    hosts: HostPool, ctl: EmulatorControl, http
) -> None:
    """Deferred updates of the same alert (InProgress, then Resolved) for several alerts at once: the queue
    is not FIFO and the worker runs many messages at once, yet every alert must end Resolved."""
    await ctl.configure(rateLimits="3/1")
    url = hosts.url(
        "/api/alerts/batchUpdate",
        DEFENDER_RATE_LIMITS="3/1",
        RATE_LIMIT_SAFETY_MARGIN_SECONDS="0.1",
        SYNC_MAX_WAIT_SECONDS="0",
    )
    for _run in range(3):
        alerts = new_ids(4)
        first = [await post(http, url, one(a, "InProgress"), ASYNC) for a in alerts]
        second = [await post(http, url, one(a, "Resolved"), ASYNC) for a in alerts]
        results = await drain(http, [h["Location"] for _, h, _ in first + second], within=30)
        assert {s for s, _ in results} == {200}
        for alert in alerts:
            assert (await ctl.alert(alert) or {})["status"] == "Resolved", alert
        order = [
            (b["alertIds"][0], b["status"])
            for b in sent_bodies(await ctl.calls())
            if b["alertIds"][0] in alerts
        ]
        for alert in alerts:
            assert [s for a, s in order if a == alert] == ["InProgress", "Resolved"]


# --- operations ------------------------------------------------------------------------------------


async def test_operation_resource(hosts: HostPool, ctl: EmulatorControl, http) -> None:
    base = hosts.url("")
    alerts = new_ids(2)
    status, headers, body = await post(
        http,
        f"{base}/api/alerts/batchUpdate?code=secret%2Fkey",
        {"alertIds": alerts, "comment": "x"},
        ASYNC,
    )
    assert status == 202
    assert headers["Location"] == f"{base}/api/operations/{body['operationId']}?code=secret%2Fkey"
    final, resource = await wait_for_operation(http, headers["Location"])
    assert final == 200
    assert resource["operationId"] == body["operationId"] and resource["status"] == "Succeeded"
    assert resource["source"] == "http" and resource["alertCount"] == 2
    assert resource["caller"] == {"authentication": "functionKey"}
    assert resource["chunks"][0]["alertIds"] == alerts and resource["chunks"][0]["status"] == "Succeeded"
    assert resource["createdAt"].endswith("Z") and resource["updatedAt"] >= resource["createdAt"]


async def test_function_key_caller_is_recorded(hosts: HostPool, ctl: EmulatorControl, http) -> None:
    _, headers, _ = await post(
        http, hosts.url("/api/alerts/batchUpdate"), {"alertIds": new_ids(1), "status": "New"}
    )
    _, resource = await wait_for_operation(http, headers["Location"])
    assert resource["caller"] == {"authentication": "functionKey"}


PRINCIPAL = {
    "X-MS-CLIENT-PRINCIPAL-NAME": "playbook@contoso.com",
    "X-MS-CLIENT-PRINCIPAL-ID": "oid-1",
    "X-MS-CLIENT-PRINCIPAL-IDP": "aad",
    "X-MS-CLIENT-PRINCIPAL": "eyJhdXRoX3R5cCI6ImFhZCJ9",  # {"auth_typ":"aad"}
}


async def test_forged_principal_headers_are_ignored_without_app_service_authentication(
    hosts: HostPool, ctl: EmulatorControl, http
) -> None:
    """Without App Service authentication nothing strips X-MS-CLIENT-PRINCIPAL-*: any caller with the
    function key could write them, so the operation records the function key, not the forged name."""
    status, headers, body = await post(
        http, hosts.url("/api/alerts/batchUpdate"), {"alertIds": new_ids(1), "status": "New"}, PRINCIPAL
    )
    assert status == 200 and "caller" not in body
    _, resource = await wait_for_operation(http, headers["Location"])
    assert resource["caller"] == {"authentication": "functionKey"}


async def test_principal_headers_are_the_caller_with_app_service_authentication(
    hosts: HostPool, ctl: EmulatorControl, http
) -> None:
    """With it on (App Service sets WEBSITE_AUTH_ENABLED=True, and the headers are its own), they are."""
    url = hosts.url("/api/alerts/batchUpdate", WEBSITE_AUTH_ENABLED="True")
    _, headers, _ = await post(http, url, {"alertIds": new_ids(1), "status": "New"}, PRINCIPAL)
    _, resource = await wait_for_operation(http, headers["Location"])
    assert resource["caller"] == {
        "authentication": "entra",
        "principalName": "playbook@contoso.com",
        "principalId": "oid-1",
        "identityProvider": "aad",
    }
    _, headers, _ = await post(http, url, {"alertIds": new_ids(1), "status": "New"})
    _, resource = await wait_for_operation(http, headers["Location"])
    assert resource["caller"] == {"authentication": "functionKey"}, "no principal: the function key"


async def test_unknown_or_malformed_operation_is_404(hosts: HostPool, http) -> None:
    for operation_id in ("00000000-0000-4000-8000-000000000000", "not-an-id"):
        async with http.get(hosts.url(f"/api/operations/{operation_id}")) as response:
            assert response.status == 404
            assert response.headers["Content-Type"].startswith("application/problem+json")


async def test_health_reports_the_budget_left(hosts: HostPool, ctl: EmulatorControl, http) -> None:
    url = hosts.url("/api/alerts/batchUpdate", DEFENDER_RATE_LIMITS="4/30,9/60")
    await post(http, url, {"alertIds": new_ids(1), "status": "New"})
    async with http.get(url.replace("/alerts/batchUpdate", "/health")) as response:
        checks = (await response.json())["checks"]
    assert [(w["calls"], w["used"], w["remaining"]) for w in checks["budget"]["windows"]] == [
        (4, 1, 3),
        (9, 1, 8),
    ]
