"""Crash recovery end to end: an instance is killed (SIGKILL) with a call to MDE in flight, and another
instance of the same app (same tables and queues) takes over.

docs/contracts.md §3: a chunk is marked Sending before its call (the outbox), so a crash between send and record
leaves a trace, and the sweep resolves it by the "outcome unknown" rule of §1 on the queue path and on the
synchronous path alike: a chunk with a comment ends OutcomeUnknown (504) and is never re-sent, one
without a comment is re-sent with the same values. Nothing accepted is lost.

The emulator holds the call (a delay fault), so the kill lands exactly between send and record; the
hosts sweep every second with a short grace, so the sweep's lease (call timeout + grace) is 3 s.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from typing import Any

import aiohttp
import pytest
from azure.data.tables.aio import TableServiceClient

from devhost.services import Service
from emulators.control import EmulatorControl, max_calls_in_any_window
from tests.conftest import HostPool
from tests.integration.helpers import eventually, new_ids, post, wait_for_operation

BATCH = "/api/alerts/batchUpdate"
ASYNC = {"Prefer": "respond-async"}
RECOVERY = {
    "SWEEP_SCHEDULE": "*/1 * * * * *",
    "SWEEP_GRACE_SECONDS": "1",
    "DEFENDER_HTTP_TIMEOUT_SECONDS": "2",
    "AzureFunctionsJobHost__extensions__queues__maxPollingInterval": "00:00:00.500",
}
COMMENT = "Closed by the SOC playbook"


async def call_in_flight(ctl: EmulatorControl, within: float = 10.0) -> dict[str, Any]:
    """The call the emulator is holding (recorded, no status yet), as soon as there is one."""
    held: list[dict[str, Any]] = []

    async def probe() -> bool:
        held[:] = [c for c in await ctl.calls() if c["status"] is None]
        return bool(held)

    await eventually(probe, within, "a call held in flight at the emulator")
    return held[0]


async def finished_call(ctl: EmulatorControl, seq: int, within: float = 10.0) -> dict[str, Any]:
    """The call `seq` once the emulator has finished it (a held call applies after its delay)."""

    async def probe() -> bool:
        return any(c["seq"] == seq and c["status"] is not None for c in await ctl.calls())

    await eventually(probe, within, f"call {seq} finished at the emulator")
    return next(c for c in await ctl.calls() if c["seq"] == seq)


async def retry_as_told(
    http: aiohttp.ClientSession, url: str, body: dict[str, Any], key: str, within: float
) -> tuple[int, dict[str, str], Any]:
    """POST with the same Idempotency-Key as a well-behaved caller does: while the answer is 409 (in
    progress), wait its Retry-After and try again, for at most `within` seconds; returns the last answer."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        status, headers, document = await post(http, url, body, {"Idempotency-Key": key})
        if status != 409:
            return status, headers, document
        assert document["operationId"] and int(headers["Retry-After"]) >= 1, (headers, document)
        wait = min(float(headers["Retry-After"]), deadline - loop.time())
        if wait <= 0:
            return status, headers, document
        await asyncio.sleep(wait)


def update(ids: list[str], with_comment: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"alertIds": ids, "status": "Resolved", "classification": "FalsePositive"}
    if with_comment:
        body["comment"] = COMMENT
    return body


async def kill_and_replace(
    hosts: HostPool, ctl: EmulatorControl, dying: Service, env: dict[str, str], held: dict[str, Any]
) -> tuple[Service, list[dict[str, Any]]]:
    """SIGKILL the instance (no clean-up runs, as in a crash) and start another with the same settings.

    Also returns the emulator's calls as they were at the kill, before the new instance could add any,
    after checking that the kill landed between send and record: the held call was still in flight."""
    await asyncio.to_thread(dying.kill)
    assert not dying.alive()
    at_kill = await ctl.calls()
    assert [c["seq"] for c in at_kill if c["status"] is None] == [held["seq"]], (
        "precondition: one call in flight"
    )
    return await asyncio.to_thread(hosts.start, env), at_kill


async def check_resolution(
    ctl: EmulatorControl,
    resource: dict[str, Any],
    final: int,
    ids: list[str],
    held: dict[str, Any],
    with_comment: bool,
) -> None:
    """The outcome-unknown rule as applied to a crash: OutcomeUnknown and never re-sent with a comment,
    re-sent once with the same values (and Succeeded) without one."""
    (chunk,) = resource["chunks"]
    await finished_call(ctl, held["seq"])  # the held call has landed: the alert shows everything now
    if with_comment:
        assert final == 504 and resource["status"] == "Failed", resource
        assert chunk["status"] == "OutcomeUnknown" and chunk["lastError"]["code"] == "OutcomeUnknown"
        await asyncio.sleep(1.5)  # longer than a first retry's back-off: a blind re-send would show by now
        calls = await ctl.calls()
        assert [c["seq"] for c in calls] == [held["seq"]], "a chunk with a comment was sent again"
        alert = await ctl.alert(ids[0])
        assert alert is not None and alert["comments"] == [COMMENT]
        return
    assert final == 200 and resource["status"] == "Succeeded" and chunk["status"] == "Succeeded", resource
    calls = await ctl.calls()
    assert len(calls) == 2 and calls[1]["status"] == 200
    assert calls[1]["json"] == held["json"] == update(ids, False)  # the same values, re-sent
    assert chunk["attempts"] == 2
    for alert_id in ids:
        alert = await ctl.alert(alert_id)
        assert alert is not None and alert["status"] == "Resolved" and alert["comments"] == []


@pytest.mark.parametrize("with_comment", [True, False], ids=["comment", "no-comment"])
async def test_worker_killed_between_send_and_record_on_the_queue_path(
    hosts: HostPool,
    ctl: EmulatorControl,
    http: aiohttp.ClientSession,
    own_hosts: list[Service],
    with_comment: bool,
) -> None:
    """The queue worker dies while MDE holds its call; its message stays invisible (the host's 10-minute
    lease), so only the sweep of the next instance can resolve the Sending chunk it left."""
    first, env = await asyncio.to_thread(hosts.fresh, **RECOVERY)
    own_hosts.append(first)
    ids = new_ids(2)
    await ctl.add_faults([{"delaySeconds": 4, "apply": True}])
    status, _headers, body = await post(http, first.urls["base"] + BATCH, update(ids, with_comment), ASYNC)
    assert status == 202, body
    held = await call_in_flight(ctl)
    second, at_kill = await kill_and_replace(hosts, ctl, first, env, held)
    own_hosts.append(second)
    assert len(at_kill) == 1

    location = f"{second.urls['base']}/api/operations/{body['operationId']}"
    final, resource = await wait_for_operation(http, location, within=20)
    await check_resolution(ctl, resource, final, ids, held, with_comment)


@pytest.mark.parametrize("with_comment", [True, False], ids=["comment", "no-comment"])
async def test_http_request_killed_between_send_and_record_on_the_synchronous_path(
    hosts: HostPool,
    ctl: EmulatorControl,
    http: aiohttp.ClientSession,
    own_hosts: list[Service],
    with_comment: bool,
) -> None:
    """The instance answering a plain POST dies while MDE holds the call. No queue message exists, so
    the outbox and the sweep alone must resolve the chunk. The caller, whose POST failed, retries with its
    Idempotency-Key: once the operation has ended, nothing is processing the first request any more, so
    the retry gets the operation's answer (504 or 200) naming it (operationId, Location), marked
    Idempotent-Replayed, and nothing is forwarded again (docs/contracts.md §1 idempotency, §3 keys)."""
    first, env = await asyncio.to_thread(hosts.fresh, **RECOVERY)
    own_hosts.append(first)
    ids, key = new_ids(2), f"playbook-run-{uuid.uuid4()}"
    body = update(ids, with_comment)
    await ctl.add_faults([{"delaySeconds": 4, "apply": True}])
    request = asyncio.create_task(post(http, first.urls["base"] + BATCH, body, {"Idempotency-Key": key}))
    held = await call_in_flight(ctl)
    assert held["json"] == body
    second, at_kill = await kill_and_replace(hosts, ctl, first, env, held)
    own_hosts.append(second)
    assert len(at_kill) == 1
    with pytest.raises(aiohttp.ClientError):
        await request  # the caller's POST died with the instance

    # The caller retries with the same key, as a playbook's retry policy would. Before the sweep has
    # resolved the send, "in progress" (409) is a fair answer; whatever it is, it names the operation.
    _, _, early = await post(http, second.urls["base"] + BATCH, body, {"Idempotency-Key": key})
    assert isinstance(early, dict) and "operationId" in early, early
    operation_id = early["operationId"]
    location = f"{second.urls['base']}/api/operations/{operation_id}"
    final, resource = await wait_for_operation(http, location, within=20)
    await check_resolution(ctl, resource, final, ids, held, with_comment)
    calls_before = len(await ctl.calls())

    # Once the operation has ended, nothing processes the first request any more. The caller keeps
    # retrying as told (a 409 names the operation and says when to come back); soon after the end it
    # gets the operation's outcome, naming it, marked a replay, and nothing is forwarded again.
    answer = await retry_as_told(http, second.urls["base"] + BATCH, body, key, within=10.0)
    status, headers, document = answer
    assert len(await ctl.calls()) == calls_before, "a retry with the same key was forwarded again"
    assert status == final, f"10 s after the operation ended ({resource['status']}) a retry got {answer}"
    operation_status = (
        document["operationStatus"] if status >= 400 else document["status"]
    )  # a problem's is HTTP's
    assert document["operationId"] == operation_id and operation_status == resource["status"], document
    assert headers.get("Location", "").endswith(f"/api/operations/{operation_id}"), headers
    assert headers.get("Idempotent-Replayed") == "true", headers


async def test_nothing_accepted_is_lost_when_an_instance_dies_mid_backlog(
    hosts: HostPool, ctl: EmulatorControl, http: aiohttp.ClientSession, own_hosts: list[Service]
) -> None:
    """An instance draining a backlog under the budget dies with some chunks sent, one held in flight (its
    message kept invisible by the dead host) and the rest pending; the next instance finishes it all.
    Every alert reaches MDE, the shared budget holds across the crash (the emulator enforces the same
    limit, so an overshoot shows as a 429), and the only double delivery allowed is the re-send of a
    chunk without a comment after an unknown outcome."""
    settings = {
        **RECOVERY,
        "DEFENDER_RATE_LIMITS": "5/1",
        "RATE_LIMIT_SAFETY_MARGIN_SECONDS": "0.2",
        # One message at a time per instance: while the held call is in flight no other chunk of the
        # dying instance can be between its Sending mark and its call, so every accepted alert reaches MDE.
        "AzureFunctionsJobHost__extensions__queues__batchSize": "1",
    }
    first, env = await asyncio.to_thread(hosts.fresh, **settings)
    own_hosts.append(first)
    await ctl.configure(rateLimits="5/1")  # any overshoot by alertgate shows as an emulator 429
    # The first budget's worth of calls: four pass, the fifth is held, so the kill lands between a send
    # and its record while the other workers wait for budget (the next grant is a second away).
    await ctl.add_faults([{"delaySeconds": 0}] * 4 + [{"delaySeconds": 3, "apply": True}])
    # Each request its own assignee: no two updates are identical, so each goes in a call of its own
    # (coalescing, docs/contracts.md §7, would otherwise put the backlog in a few calls).
    requests = [
        {**update(new_ids(1), n % 2 == 0), "assignedTo": f"analyst{n}@contoso.example"} for n in range(20)
    ]
    answers = await asyncio.gather(*(post(http, first.urls["base"] + BATCH, r, ASYNC) for r in requests))
    assert all(a[0] == 202 for a in answers), answers
    held = await call_in_flight(ctl)
    second, at_kill = await kill_and_replace(hosts, ctl, first, env, held)
    own_hosts.append(second)
    assert len(at_kill) == 5, "precondition: four calls made, the fifth in flight"

    operations = [f"{second.urls['base']}/api/operations/{body['operationId']}" for _, _, body in answers]
    finals = await asyncio.gather(*(wait_for_operation(http, loc, within=60) for loc in operations))
    await finished_call(ctl, held["seq"])
    calls = await ctl.calls()
    held_alert = held["json"]["alertIds"][0]
    for request, (code, resource) in zip(requests, finals, strict=True):
        (alert_id,) = request["alertIds"]
        (chunk,) = resource["chunks"]
        alert = await ctl.alert(alert_id)
        assert alert is not None, f"{alert_id} never reached MDE: {resource}"
        deliveries = len(alert["updateSeqs"])
        with_comment = "comment" in request
        if code == 200:
            assert resource["status"] == "Succeeded" and chunk["status"] == "Succeeded", resource
        else:  # only a send whose outcome nobody recorded may end unresolved, and only with a comment
            assert code == 504 and chunk["status"] == "OutcomeUnknown" and with_comment, resource
            assert chunk["lastError"]["code"] == "OutcomeUnknown"
        assert deliveries >= 1, f"{alert_id} was never applied: {resource}"
        assert deliveries == 1 or not with_comment, f"{alert_id}, with a comment, was applied twice"
        assert alert["comments"] == ([COMMENT] if with_comment else [])
        if alert_id == held_alert:  # the call the crash interrupted was resolved by the rule
            assert code == (504 if with_comment else 200) and deliveries == (1 if with_comment else 2)

    statuses = Counter(c["status"] for c in calls)
    timeline = [(c["seq"], c["status"], round(c["time"] - calls[0]["time"], 3)) for c in calls]
    assert set(statuses) == {200}, f"MDE refused calls {dict(statuses)}: (seq, status, arrival s) {timeline}"
    assert max_calls_in_any_window([c["time"] for c in calls if c["admitted"]], 1.0) <= 5


async def test_http_request_killed_while_waiting_for_budget_leaves_no_false_unknown(
    hosts: HostPool,
    ctl: EmulatorControl,
    http: aiohttp.ClientSession,
    own_hosts: list[Service],
    azurite: Service,
) -> None:
    """A synchronous request is accepted with its chunk already marked Sending (the short cut of
    Ledger.look_ahead), then finds the budget spent. It gives the mark back before it waits, so an
    instance killed while waiting leaves a Pending chunk: the next instance sends it (once, comment and
    all) instead of reporting OutcomeUnknown for a call that never happened."""
    settings = {**RECOVERY, "DEFENDER_RATE_LIMITS": "1/4", "SYNC_MAX_WAIT_SECONDS": "6"}
    first, env = await asyncio.to_thread(hosts.fresh, **settings)
    own_hosts.append(first)
    url = first.urls["base"] + BATCH
    status, _, warm = await post(
        http, url, update(new_ids(1), False)
    )  # spends the budget, caches the counter
    assert status == 200, warm
    ids = new_ids(1)
    request = asyncio.create_task(post(http, url, update(ids, True)))

    service = TableServiceClient.from_connection_string(azurite.urls["connection_string"])
    async with service, service.get_table_client(f"{env['TABLE_PREFIX']}Operations") as table:
        states: list[tuple[str, int]] = []

        async def waiting_pending() -> bool:
            query = "RowKey ge 'p-' and RowKey lt 'p.'"
            states[:] = [
                (e["State"], e["Attempts"])
                async for e in table.query_entities(query)
                if json.loads(e["AlertIds"]) == ids
            ]
            return states == [("Pending", 0)]

        await eventually(waiting_pending, 3.0, "the chunk given back as Pending while its request waits")
    await asyncio.to_thread(first.kill)
    with pytest.raises(aiohttp.ClientError):
        await request
    assert [c for c in await ctl.calls() if c["json"]["alertIds"] == ids] == []
    second = await asyncio.to_thread(hosts.start, env)
    own_hosts.append(second)

    async def delivered() -> bool:
        return any(c["json"]["alertIds"] == ids and c["status"] == 200 for c in await ctl.calls())

    await eventually(delivered, 30.0, "the chunk sent by the next instance")
    calls = [c for c in await ctl.calls() if c["json"]["alertIds"] == ids]
    assert len(calls) == 1 and calls[0]["json"] == update(ids, True)
    alert = await ctl.alert(ids[0])
    assert alert is not None and alert["comments"] == [COMMENT]
