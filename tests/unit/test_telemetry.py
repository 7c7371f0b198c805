"""The figures of docs/telemetry.md, read back with the OpenTelemetry SDK's in-memory metric reader and log
exporter (the real SDK; the tenant's services are real over in-memory tables, MDE's answers scripted)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest

from shared.channels.base import CallKind, CallResult
from shared.ledger import ChunkResult, Ledger
from shared.ratelimit import BudgetSnapshot, WindowState
from shared.sender import AttemptKind
from shared.telemetry import (
    CHECK_DELAY_SECONDS,
    CUSTOM_EVENT_NAME,
    OPERATION_ENDED,
    EndWatcher,
    call_outcome,
)
from tests.otel import Otel, attrs
from tests.unit.upstream_fakes import ID1, ID2, ManualClock, answer, build, not_sent, unknown

ID3 = "da637551227677560813_-961444813"


@pytest.fixture
def otel() -> Iterator[Otel]:
    recorded = Otel()
    yield recorded
    recorded.shutdown()


@pytest.mark.parametrize(
    ("result", "outcome"),
    [
        (CallResult(CallKind.OK), "200"),
        (answer(429, "TooManyRequests", retry_after=1.0), "429"),
        (answer(403, "Forbidden"), "4xx"),
        (answer(404, "NotFound"), "4xx"),
        (answer(400, "InvalidRequestBody"), "4xx"),
        (answer(503, "ServiceUnavailable"), "5xx"),
        (unknown(timed_out=True), "no_answer"),
        (not_sent(), "not_sent"),
    ],
)
def test_each_answer_has_its_outcome(result: CallResult, outcome: str) -> None:
    assert call_outcome(result)[0] == outcome


async def test_a_run_with_a_429_a_403_and_a_poison_message_gives_exact_figures(
    clock: ManualClock, otel: Otel
) -> None:
    rig = build(
        clock,
        telemetry=otel.telemetry,
        script=[answer(429, "TooManyRequests", retry_after=5.0), answer(403, "Forbidden", "no role")],
    )
    [first] = await rig.accept(ID1)
    deferred = await rig.sender.attempt(first, max_wait=0.0)  # 429
    assert deferred.kind is AttemptKind.DEFERRED
    [forbidden] = await rig.accept(ID2, fields={"status": "InProgress"})  # not identical: not coalesced
    clock.advance(deferred.delay + 1)
    assert (await rig.sender.attempt(forbidden, max_wait=60.0)).kind is AttemptKind.FINISHED  # 403
    again = await rig.pending(first)
    assert again is not None
    assert (await rig.sender.attempt(again, max_wait=60.0)).kind is AttemptKind.FINISHED  # 200
    [poisoned] = await rig.accept(ID3, fields={"status": "New"})
    assert await rig.worker.on_poison(poisoned.chunk_id)
    assert rig.ledger.watcher is not None
    await rig.ledger.watcher.drain()  # type: ignore[attr-defined]

    calls = otel.named("alertgate.mde.calls")
    assert calls == {
        attrs(tenant="home", channel="fake", outcome="429", error_code="TooManyRequests"): 1,
        attrs(tenant="home", channel="fake", outcome="4xx", error_code="Forbidden"): 1,
        attrs(tenant="home", channel="fake", outcome="200", error_code="none"): 1,
    }
    assert otel.named("alertgate.mde.forbidden") == {attrs(tenant="home", channel="fake"): 1}
    assert otel.named("alertgate.mde.call.members") == {attrs(tenant="home", channel="fake"): (3, 3)}
    assert otel.named("alertgate.chunks.ended") == {
        attrs(tenant="home", channel="fake", result="Succeeded"): 1,
        attrs(tenant="home", channel="fake", result="Failed"): 1,
        attrs(tenant="home", channel="none", result="Failed"): 1,  # poisoned before any call
    }
    assert otel.named("alertgate.poison.messages") == {attrs(tenant="home", queue="chunks"): 1}

    events = {e["operationId"]: e for e in otel.events()}
    assert set(events) == {first.operation_id, forbidden.operation_id, poisoned.operation_id}
    assert all(e[CUSTOM_EVENT_NAME] == OPERATION_ENDED and e["tenant"] == "home" for e in events.values())
    assert events[first.operation_id]["status"] == "Succeeded"
    assert events[first.operation_id]["errorCode"] == "none"
    assert json.loads(events[first.operation_id]["chunkResults"]) == {"Succeeded": 1}
    assert (events[forbidden.operation_id]["status"], events[forbidden.operation_id]["errorCode"]) == (
        "Failed",
        "Forbidden",
    )
    assert events[poisoned.operation_id]["errorCode"] == "PoisonMessage"
    done = await rig.finished(first)
    assert done is not None
    assert events[first.operation_id]["durationSeconds"] == pytest.approx(done.finished_at - first.created_at)
    assert done.finished_at - first.created_at >= deferred.delay  # it waited out the 429
    assert {e["alertCount"] for e in events.values()} == {1}
    assert {e["callerKind"] for e in events.values()} == {"functionKey"}


async def test_an_operation_of_several_chunks_ends_once_its_last_chunk_ends(
    clock: ManualClock, otel: Otel
) -> None:
    rig = build(clock, telemetry=otel.telemetry)
    first, second = await rig.accept(ID1, ID2, chunks=2)
    assert await rig.worker.on_poison(first.chunk_id)  # the first ends Failed, the second still pending
    await rig.ledger.watcher.drain()  # type: ignore[union-attr]
    assert otel.events() == []

    clock.advance(10)
    assert (await rig.sender.attempt(second, max_wait=60.0)).kind is AttemptKind.FINISHED  # 200
    await rig.ledger.watcher.drain()  # type: ignore[union-attr]

    [event] = otel.events()
    assert (event["operationId"], event["status"], event["alertCount"]) == (
        first.operation_id,
        "PartiallySucceeded",
        2,
    )
    assert json.loads(event["chunkResults"]) == {"Failed": 1, "Succeeded": 1}
    assert event["errorCode"] == "PoisonMessage"
    assert otel.named("alertgate.chunks.ended") == {
        attrs(tenant="home", channel="none", result="Failed"): 1,
        attrs(tenant="home", channel="fake", result="Succeeded"): 1,
    }


async def test_a_coalesced_call_counts_its_members_and_ends_its_operations_once(
    clock: ManualClock, otel: Otel
) -> None:
    rig = build(clock, telemetry=otel.telemetry, script=[answer(403, "Forbidden")])
    first, _ = await rig.accept(ID1, ID2, chunks=2)  # identical updates: one call carries both

    assert (await rig.sender.attempt(first, max_wait=60.0)).kind is AttemptKind.FINISHED
    await rig.ledger.watcher.drain()  # type: ignore[union-attr]

    assert len(rig.calls) == 1
    assert otel.named("alertgate.mde.call.members") == {attrs(tenant="home", channel="fake"): (1, 2)}
    assert otel.named("alertgate.mde.forbidden") == {attrs(tenant="home", channel="fake"): 1}
    assert otel.named("alertgate.chunks.ended") == {attrs(tenant="home", channel="fake", result="Failed"): 2}
    [event] = otel.events()
    assert (event["status"], json.loads(event["chunkResults"])) == ("Failed", {"Failed": 2})


async def test_a_second_finish_of_the_same_chunk_counts_nothing(clock: ManualClock, otel: Otel) -> None:
    rig = build(clock, telemetry=otel.telemetry)
    [chunk] = await rig.accept(ID1)
    await rig.ledger.finish(chunk, ChunkResult.SUCCEEDED, 200, None)
    await rig.ledger.finish(chunk, ChunkResult.FAILED, 502, None)  # judged against the recorded end
    await rig.ledger.watcher.drain()  # type: ignore[union-attr]

    assert otel.named("alertgate.chunks.ended") == {
        attrs(tenant="home", channel="none", result="Succeeded"): 1
    }
    assert [e["status"] for e in otel.events()] == ["Succeeded"]


async def test_an_invalid_inbound_message_ends_its_operation_at_once(clock: ManualClock, otel: Otel) -> None:
    rig = build(clock, telemetry=otel.telemetry)
    errors = [{"field": "status", "message": "must be one of ..."}]
    operation = await rig.ledger.record_invalid(
        "op-invalid", "queue", {"authentication": "queue"}, errors, 400
    )

    [event] = otel.events()
    assert (event["operationId"], event["status"], event["source"]) == (
        operation.operation_id,
        "Failed",
        "queue",
    )
    assert (event["callerKind"], event["alertCount"], event["errorCode"]) == ("queue", 0, "400")


def test_budget_gauges_per_window_and_queue_depths(otel: Otel) -> None:
    figures = otel.telemetry.tenant("contoso")
    snapshot = BudgetSnapshot(
        [WindowState(calls=10, seconds=60.0, used=7, remaining=3), WindowState(500, 3600.0, 42, 458)], None
    )
    figures.budget("batchUpdate", snapshot)
    otel.telemetry.queue_depths({"alert-update-chunks": 4, "alert-update-chunks-poison": 1})

    assert otel.named("alertgate.budget.used") == {
        attrs(tenant="contoso", channel="batchUpdate", window="60", limit=10): 7,
        attrs(tenant="contoso", channel="batchUpdate", window="3600", limit=500): 42,
    }
    assert (
        otel.named("alertgate.budget.remaining")[
            attrs(tenant="contoso", channel="batchUpdate", window="60", limit=10)
        ]
        == 3
    )
    assert otel.named("alertgate.queue.depth") == {
        attrs(queue="alert-update-chunks"): 4,
        attrs(queue="alert-update-chunks-poison"): 1,
    }


async def test_backlog_counts_what_has_not_ended_and_its_oldest_age(clock: ManualClock, otel: Otel) -> None:
    rig = build(clock, telemetry=otel.telemetry)
    [old] = await rig.accept(ID1)
    clock.advance(90)
    await rig.accept(ID2)
    [done] = await rig.accept(ID3)
    await rig.ledger.finish(done, ChunkResult.SUCCEEDED, 200, None, in_place=True)
    clock.advance(30)

    unfinished = [c for c in await rig.ledger.all_pending() if not c.finished]
    otel.telemetry.tenant("home").backlog(unfinished, clock())

    assert otel.named("alertgate.backlog.pending") == {attrs(tenant="home"): 2}
    assert otel.named("alertgate.backlog.oldest_age") == {attrs(tenant="home"): pytest.approx(120.0)}
    assert old.created_at == pytest.approx(clock() - 120)


async def test_ends_gather_and_each_operation_is_checked_once_after_the_delay(
    clock: ManualClock, otel: Otel
) -> None:
    rig = build(clock, telemetry=otel.telemetry)
    first, second = await rig.accept(ID1, ID2, chunks=2)
    reads = sum(rig.operations.counts.values())
    await rig.ledger.finish(first, ChunkResult.SUCCEEDED, 200, None)
    await rig.ledger.finish(second, ChunkResult.SUCCEEDED, 200, None)
    writes = sum(rig.operations.counts.values()) - reads
    assert otel.events() == []  # nothing emitted in front of the writes

    await asyncio.sleep(CHECK_DELAY_SECONDS)  # (virtual) the gathered ends are checked
    for _ in range(20):
        await asyncio.sleep(0)

    [event] = otel.events()
    assert (event["status"], json.loads(event["chunkResults"])) == ("Succeeded", {"Succeeded": 2})
    # accepted here, so the operation itself is not read; its entries are, once for both ends (p-, r-)
    assert sum(rig.operations.counts.values()) - reads - writes == 2


async def test_an_operation_accepted_by_another_instance_is_read_once(clock: ManualClock, otel: Otel) -> None:
    rig = build(clock, telemetry=otel.telemetry)
    [chunk] = await rig.accept(ID1)
    other = Ledger(rig.operations, clock)  # another instance: it never saw the operation accepted
    other.watcher = EndWatcher(other, otel.telemetry.tenant("home"))
    gets = rig.operations.counts["get"]

    await other.finish(chunk, ChunkResult.SUCCEEDED, 200, None)
    await other.watcher.drain()

    assert rig.operations.counts["get"] == gets + 1
    [event] = otel.events()
    assert (event["operationId"], event["status"]) == (chunk.operation_id, "Succeeded")


async def test_a_one_chunk_operation_accepted_and_ended_here_costs_no_read(
    clock: ManualClock, otel: Otel
) -> None:
    rig = build(clock, telemetry=otel.telemetry)
    [chunk] = await rig.accept(ID1)
    before = sum(rig.operations.counts.values())

    await rig.ledger.finish(chunk, ChunkResult.SUCCEEDED, 200, None)
    after_write = sum(rig.operations.counts.values())
    await rig.ledger.watcher.drain()  # type: ignore[union-attr]

    assert sum(rig.operations.counts.values()) == after_write > before
    assert [e["status"] for e in otel.events()] == ["Succeeded"]


class Broken:
    """An instrument whose exporter or SDK fails on every use."""

    def add(self, *_: Any, **__: Any) -> None:
        raise RuntimeError("exporter down")

    record = set = emit = add


async def test_a_failing_instrument_never_turns_mde_s_answer_into_an_unknown_outcome(
    clock: ManualClock, otel: Otel
) -> None:
    broken = Broken()
    for name in ("calls", "members", "forbidden", "chunks_ended", "events"):
        setattr(otel.telemetry, name, broken)
    rig = build(clock, telemetry=otel.telemetry)
    [chunk] = await rig.accept(ID1)

    attempt = await rig.sender.attempt(chunk, max_wait=60.0)
    await rig.ledger.watcher.drain()  # type: ignore[union-attr]

    assert attempt.kind is AttemptKind.FINISHED and len(rig.calls) == 1
    done = await rig.finished(chunk)
    assert done is not None and done.state == ChunkResult.SUCCEEDED  # MDE's 200 is kept
