"""Throughput at MDE's real ceiling, end to end (docs/contracts.md §7): coalescing, the PATCH channel and a
Retry-After that tells the truth, in development hosts against the MDE emulator and Azurite.

Each case spends or sets the budget so that what it checks has to happen (requests wait together, or
PATCH is sooner), then judges by what the emulator recorded: calls per API, the alerts' comments (each
exactly once), and what a caller sees on the operation resource (`channel`, `callId`). Waits are bounded;
no assertion depends on the machine being idle (budgets of several seconds leave room for a busy one).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import aiohttp

from emulators.control import EmulatorControl
from tests.conftest import HostPool
from tests.integration.helpers import new_ids, post, wait_for_operation

BATCH = "/api/alerts/batchUpdate"
ASYNC = {"Prefer": "respond-async"}
FAST = {"AzureFunctionsJobHost__extensions__queues__maxPollingInterval": "00:00:00.500"}


def close(ids: list[str], comment: str) -> dict[str, Any]:
    return {"alertIds": ids, "status": "Resolved", "classification": "FalsePositive", "comment": comment}


async def spend_batch_budget(http: aiohttp.ClientSession, base: str) -> list[str]:
    """One request that takes the only batchUpdate call of the window: more alerts than PATCH_MAX_ALERTS,
    so PATCH cannot take it even with both channels free. Returns its alert ids."""
    ids = new_ids(11)
    status, _, body = await post(http, base + BATCH, close(ids, "spends the budget"))
    assert status == 200, body
    return ids


async def own_calls(ctl: EmulatorControl, api: str, *alert_sets: list[str]) -> list[dict[str, Any]]:
    """The calls of `api` carrying this test's alerts: a pooled host of an earlier test may still send
    what it deferred to the shared emulator (under load one did, in the middle of another test)."""
    mine = {a for ids in alert_sets for a in ids}
    return [c for c in await ctl.calls(api) if mine & set(c["alertIds"])]


async def comments_once(ctl: EmulatorControl, expected: dict[str, str]) -> None:
    """Each alert carries exactly its own comment, once."""
    for alert_id, comment in expected.items():
        state = await ctl.alert(alert_id)
        assert state is not None and state["comments"] == [comment], (alert_id, state)


async def test_identical_waiting_updates_share_one_call(
    hosts: HostPool, ctl: EmulatorControl, http: aiohttp.ClientSession
) -> None:
    base = hosts.get(**FAST, DEFENDER_RATE_LIMITS="1/6").urls["base"]
    spent = await spend_batch_budget(http, base)
    comment = f"closed by a script {uuid.uuid4()}"
    ids = new_ids(5)
    answers = await asyncio.gather(*(post(http, base + BATCH, close([a], comment), ASYNC) for a in ids))
    assert [status for status, _, _ in answers] == [202] * 5

    resources = [await wait_for_operation(http, headers["Location"], within=40) for _, headers, _ in answers]

    assert {status for status, _ in resources} == {200}
    calls = await own_calls(ctl, "batchUpdate", spent, ids)
    assert len(calls) == 2, [c["alertIds"] for c in calls]  # the budget's call, then one for all five
    assert sorted(calls[1]["alertIds"]) == sorted(ids) and calls[1]["status"] == 200
    chunks = [resource["chunks"][0] for _, resource in resources]
    assert {(c["channel"], c["status"]) for c in chunks} == {("batchUpdate", "Succeeded")}
    assert len({c["callId"] for c in chunks}) == 1
    await comments_once(ctl, dict.fromkeys(ids, comment))


async def test_one_refused_alert_fails_only_its_own_request(
    hosts: HostPool, ctl: EmulatorControl, http: aiohttp.ClientSession
) -> None:
    base = hosts.get(**FAST, DEFENDER_RATE_LIMITS="1/4").urls["base"]
    await spend_batch_budget(http, base)
    comment = f"closed by a script {uuid.uuid4()}"
    good, bad = new_ids(3), new_ids(1)
    await ctl.configure(unknown_ids=bad)
    bodies = [close([good[0]], comment), close(bad, comment), close(good[1:], comment)]
    answers = []
    for body in bodies:  # accepted in this order
        answers.append(await post(http, base + BATCH, body, ASYNC))

    results = [await wait_for_operation(http, headers["Location"], within=40) for _, headers, _ in answers]

    assert [status for status, _ in results] == [200, 422, 200]
    refused = results[1][1]["chunks"][0]
    assert refused["status"] == "Failed" and refused["lastError"]["code"] == "NotFound"
    calls = await own_calls(ctl, "batchUpdate", good, bad)
    assert [c["status"] for c in calls] == [404, 200]
    assert sorted(calls[0]["alertIds"]) == sorted([*good, *bad])  # coalesced, then refused
    assert sorted(calls[1]["alertIds"]) == sorted(good)  # the others again, together
    await comments_once(ctl, dict.fromkeys(good, comment))
    assert await ctl.alert(bad[0]) is None


async def test_a_lone_update_goes_by_patch_when_batch_update_is_spent(
    hosts: HostPool, ctl: EmulatorControl, http: aiohttp.ClientSession
) -> None:
    base = hosts.get(**FAST, DEFENDER_RATE_LIMITS="1/30", DEFENDER_PATCH_RATE_LIMITS="5/30").urls["base"]
    spent = await spend_batch_budget(http, base)
    ids, comment = new_ids(2), f"Sentinel incident #{uuid.uuid4()}"

    status, headers, body = await post(http, base + BATCH, close(ids, comment))

    assert status == 200, body
    assert [c["alertIds"] for c in await own_calls(ctl, "patch", ids)] == [[ids[0]], [ids[1]]]
    assert len(await own_calls(ctl, "batchUpdate", spent, ids)) == 1  # only the call that spent the budget
    _, resource = await wait_for_operation(http, headers["Location"])
    assert [(c["alertIds"], c["channel"], c["status"]) for c in resource["chunks"]] == [
        ([ids[0]], "patch", "Succeeded"),
        ([ids[1]], "patch", "Succeeded"),
    ]
    await comments_once(ctl, dict.fromkeys(ids, comment))
    async with http.get(base + "/api/health") as response:
        health = await response.json()
    channels = health["checks"]["budget"]["channels"]
    assert channels["patch"]["windows"][0]["used"] == 2
    assert channels["batchUpdate"]["windows"][0]["used"] == 1


async def test_respond_async_done_at_once_says_retry_after_one_second(
    hosts: HostPool, ctl: EmulatorControl, http: aiohttp.ClientSession
) -> None:
    base = hosts.get(**FAST).urls["base"]

    status, headers, body = await post(http, base + BATCH, close(new_ids(1), "quick"), ASYNC)

    assert status == 202, body
    assert int(headers["Retry-After"]) <= 2
    final, _ = await wait_for_operation(http, headers["Location"], within=20)
    assert final == 200


async def test_a_deferred_request_s_retry_after_is_when_its_update_goes_out(
    hosts: HostPool, ctl: EmulatorControl, http: aiohttp.ClientSession
) -> None:
    base = hosts.get(**FAST, DEFENDER_RATE_LIMITS="1/20").urls["base"]
    await spend_batch_budget(http, base)
    ids = new_ids(1)
    asked = time.monotonic()

    status, headers, body = await post(http, base + BATCH, close(ids, "waits for the budget"))

    assert status == 202, body
    said = int(headers["Retry-After"])
    final, _ = await wait_for_operation(http, headers["Location"], within=40)
    assert final == 200
    [call] = [c for c in await ctl.calls("batchUpdate") if c["alertIds"] == ids]
    took = call["time"] - asked  # the emulator's clock is this machine's monotonic clock
    assert abs(said - took) <= 0.25 * took, (said, took)


async def test_with_both_channels_free_small_distinct_updates_go_by_patch_and_larger_ones_by_batch_update(
    hosts: HostPool, ctl: EmulatorControl, http: aiohttp.ClientSession
) -> None:
    """docs/contracts.md §7, "When both channels are free": below the exchange rate (3 here: 15/30
    against 5/30) a Sentinel-like update goes by PATCH, one alert on the fast path, two split into
    pieces; three alerts, or an update identical to one pending, keep batchUpdate."""
    base = hosts.get(**FAST, DEFENDER_RATE_LIMITS="5/30", DEFENDER_PATCH_RATE_LIMITS="15/30").urls["base"]
    one, two, three = new_ids(1), new_ids(2), new_ids(3)
    tag = uuid.uuid4()

    for ids in (one, two, three):
        status, _, body = await post(http, base + BATCH, close(ids, f"incident {tag} {len(ids)}"))
        assert status == 200, body

    assert sorted(c["alertIds"][0] for c in await own_calls(ctl, "patch", one, two, three)) == sorted(
        [*one, *two]
    )
    assert [sorted(c["alertIds"]) for c in await own_calls(ctl, "batchUpdate", one, two, three)] == [
        sorted(three)
    ]
    await comments_once(ctl, {a: f"incident {tag} {len(ids)}" for ids in (one, two, three) for a in ids})
