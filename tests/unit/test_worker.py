"""The chunks worker, the sweep and the poison handler over the real ledger and budget on in-memory
tables (MDE, tokens and queues faked; a manual clock that asyncio.sleep moves on)."""

from __future__ import annotations

import pytest

from shared.ledger import Chunk, ChunkResult, Ledger, PendingState
from shared.sender import MARK_LEAD_SECONDS
from tests.unit.upstream_fakes import (
    ID1,
    ID2,
    START,
    ManualClock,
    Rig,
    answer,
    build,
    too_large,
)

COMMENT = {"status": "Resolved", "comment": "closed by the SOC"}


async def queued(rig: Rig, *ids: str, fields: dict[str, str] | None = None) -> Chunk:
    """A chunk accepted and handed to the queue: its message is the last one sent."""
    [chunk] = await rig.accept(*ids, fields=fields)
    assert await rig.sender.schedule(chunk, 0.0)
    stored = await rig.pending(chunk)
    assert stored is not None and stored.msg_token == rig.queues.chunks[-1].token
    return stored


async def in_flight(rig: Rig, *ids: str, fields: dict[str, str] | None = None) -> Chunk:
    """A queued chunk marked Sending now, as a sender does just before its call."""
    chunk = await queued(rig, *ids, fields=fields)
    sending = await rig.ledger.update_pending(
        chunk, state=PendingState.SENDING, sending_since=rig.clock(), attempts=1
    )
    assert sending is not None
    return sending


# --- on_message -----------------------------------------------------------------------------------------


async def test_a_message_sends_its_chunk_after_the_mark_lead(clock: ManualClock) -> None:
    rig = build(clock)
    chunk = await queued(rig, ID1)

    assert await rig.worker.on_message(chunk.chunk_id, chunk.msg_token) == "finished"

    [call] = rig.calls
    assert call.alert_ids == (ID1,) and call.at == pytest.approx(START + MARK_LEAD_SECONDS, abs=0.01)
    assert await rig.budget_log() == [pytest.approx(START + MARK_LEAD_SECONDS)]
    done = await rig.finished(chunk)
    assert done is not None and done.state == ChunkResult.SUCCEEDED
    assert len(rig.queues.chunks) == 1  # nothing re-queued


async def test_a_message_whose_chunk_is_denied_budget_re_queues_it_with_a_new_token(
    clock: ManualClock,
) -> None:
    rig = build(clock, env={"DEFENDER_RATE_LIMITS": "1/60"})
    assert await rig.limiter.acquire(0.0)
    chunk = await queued(rig, ID1)

    assert await rig.worker.on_message(chunk.chunk_id, chunk.msg_token) == "deferred"

    assert rig.calls == []
    requeued = rig.queues.chunks[-1]
    assert requeued.chunk_id == chunk.chunk_id and requeued.token != chunk.msg_token
    # The denial's wait counts from the end of the lead the worker asks for.
    assert requeued.delay == pytest.approx(rig.sender.requeue_delay(60.0 - MARK_LEAD_SECONDS), abs=0.01)
    stored = await rig.pending(chunk)
    assert stored is not None and stored.msg_token == requeued.token


async def test_a_message_whose_chunk_is_split_queues_every_piece(clock: ManualClock) -> None:
    rig = build(clock, script=[too_large(1)])
    chunk = await queued(rig, ID1, ID2)

    assert await rig.worker.on_message(chunk.chunk_id, chunk.msg_token) == "split"

    pieces = await rig.ledger.all_pending()
    assert [p.alert_ids for p in pieces] == [(ID1,), (ID2,)]
    assert [(s.chunk_id, s.token, s.delay) for s in rig.queues.chunks[1:]] == [
        (p.chunk_id, p.msg_token, 0.0) for p in pieces
    ]


async def test_a_message_for_a_chunk_that_is_gone_does_nothing(clock: ManualClock) -> None:
    rig = build(clock)
    chunk = await queued(rig, ID1)
    assert await rig.worker.on_message(chunk.chunk_id, chunk.msg_token) == "finished"

    assert await rig.worker.on_message(chunk.chunk_id, chunk.msg_token) == "gone"
    assert await rig.worker.on_message("000000000999", "whatever") == "gone"

    assert len(rig.calls) == 1 and len(rig.queues.chunks) == 1


async def test_a_message_whose_token_is_not_the_chunk_s_is_a_stale_duplicate(clock: ManualClock) -> None:
    rig = build(clock)
    old = await queued(rig, ID1)
    assert await rig.sender.schedule(old, 5.0)  # a newer message replaces it

    assert await rig.worker.on_message(old.chunk_id, old.msg_token) == "stale-message"

    assert rig.calls == [] and len(rig.queues.chunks) == 2
    stored = await rig.pending(old)
    assert stored is not None and stored.msg_token == rig.queues.chunks[-1].token
    assert (stored.state, stored.attempts) == (PendingState.PENDING, 0)


async def test_a_chunk_in_flight_elsewhere_is_looked_at_again_after_the_lease(clock: ManualClock) -> None:
    rig = build(clock)
    sending = await in_flight(rig, ID1)
    clock.advance(5.0)

    assert await rig.worker.on_message(sending.chunk_id, sending.msg_token) == "in-flight-elsewhere"

    assert rig.calls == []
    again = rig.queues.chunks[-1]
    assert (again.chunk_id, again.token) == (sending.chunk_id, sending.msg_token)
    assert again.delay == pytest.approx(rig.sender.sending_lease - 5.0)
    stored = await rig.pending(sending)
    assert stored is not None and stored.etag == sending.etag  # left alone: its sender records the outcome


async def test_a_stale_send_with_a_comment_is_resolved_as_outcome_unknown(clock: ManualClock) -> None:
    rig = build(clock)
    sending = await in_flight(rig, ID1, fields=COMMENT)
    clock.advance(rig.sender.sending_lease + 1)

    assert await rig.worker.on_message(sending.chunk_id, sending.msg_token) == "stale-send-resolved"

    assert rig.calls == [] and len(rig.queues.chunks) == 1
    done = await rig.finished(sending)
    assert done is not None and (done.state, done.answer_status) == (ChunkResult.OUTCOME_UNKNOWN, 504)
    assert await rig.pending(sending) is None


async def test_a_stale_send_without_a_comment_goes_back_to_pending_and_is_re_queued(
    clock: ManualClock,
) -> None:
    rig = build(clock)
    sending = await in_flight(rig, ID1)
    clock.advance(rig.sender.sending_lease + 1)

    assert await rig.worker.on_message(sending.chunk_id, sending.msg_token) == "deferred"

    assert rig.calls == []  # not before its back-off
    stored = await rig.pending(sending)
    assert stored is not None and (stored.state, stored.sending_since) == (PendingState.PENDING, 0.0)
    assert stored.last_error is not None and stored.last_error["code"] == "OutcomeUnknown"
    requeued = rig.queues.chunks[-1]
    assert requeued.token == stored.msg_token
    assert requeued.delay == pytest.approx(stored.not_before - clock())


# --- sweep --------------------------------------------------------------------------------------------------


async def test_the_sweep_settles_a_chunk_finished_in_place(clock: ManualClock) -> None:
    rig = build(clock)
    [chunk] = await rig.accept(ID1)
    await rig.sender.attempt(chunk, max_wait=0.0, answer_for=lambda c: "kept")
    assert await rig.finished(chunk) is None

    assert await rig.worker.sweep() == {"staleSends": 0, "requeued": 0, "settled": 1}

    done = await rig.finished(chunk)
    assert done is not None and (done.state, done.answer) == (ChunkResult.SUCCEEDED, "kept")
    assert await rig.ledger.all_pending() == []
    assert len(rig.calls) == 1


async def test_the_sweep_resolves_a_stale_sending_mark(clock: ManualClock) -> None:
    rig = build(clock)
    sending = await in_flight(rig, ID1)
    fresh = await in_flight(rig, ID2)  # marked later: still within its lease
    clock.advance(rig.sender.sending_lease + 1)
    assert await rig.ledger.update_pending(fresh, sending_since=clock() - 1) is not None

    assert await rig.worker.sweep() == {"staleSends": 1, "requeued": 0, "settled": 0}

    stored = await rig.pending(sending)
    assert stored is not None and stored.state == PendingState.PENDING
    assert stored.last_error is not None and stored.last_error["code"] == "OutcomeUnknown"
    assert rig.queues.chunks[-1].token == stored.msg_token  # its next try is queued
    other = await rig.pending(fresh)
    assert other is not None and other.state == PendingState.SENDING
    assert rig.calls == []


async def test_the_sweep_resolves_a_stale_send_with_a_comment_as_outcome_unknown(clock: ManualClock) -> None:
    rig = build(clock)
    sending = await in_flight(rig, ID1, fields=COMMENT)
    clock.advance(rig.sender.sending_lease + 1)

    assert (await rig.worker.sweep())["staleSends"] == 1

    done = await rig.finished(sending)
    assert done is not None and (done.state, done.answer_status) == (ChunkResult.OUTCOME_UNKNOWN, 504)
    assert len(rig.queues.chunks) == 1 and rig.calls == []


async def test_the_sweep_re_queues_a_pending_chunk_whose_message_is_overdue(clock: ManualClock) -> None:
    rig = build(clock)
    overdue = await queued(rig, ID1)
    backing_off = await queued(rig, ID2)
    assert await rig.ledger.update_pending(backing_off, not_before=START + 200.0) is not None
    clock.advance(rig.settings.sweep_grace_seconds + 1)
    on_time = await queued(rig, "da637399794050273589_760707379")

    assert await rig.worker.sweep() == {"staleSends": 0, "requeued": 2, "settled": 0}

    by_chunk = {s.chunk_id: s for s in rig.queues.chunks[3:]}
    assert set(by_chunk) == {overdue.chunk_id, backing_off.chunk_id}
    assert by_chunk[overdue.chunk_id].delay == 0.0
    assert by_chunk[backing_off.chunk_id].delay == pytest.approx(START + 200.0 - clock())
    for chunk_id, sent in by_chunk.items():
        stored = await rig.pending(chunk_id)
        assert stored is not None and stored.msg_token == sent.token
    assert (await rig.pending(on_time)) == on_time  # not overdue: untouched
    assert rig.calls == []


# --- poison ---------------------------------------------------------------------------------------------------


async def test_a_poisoned_message_finishes_its_chunk_failed(clock: ManualClock) -> None:
    rig = build(clock)
    chunk = await queued(rig, ID1)

    assert await rig.worker.on_poison(chunk.chunk_id) is True

    done = await rig.finished(chunk)
    assert done is not None and (done.state, done.answer_status) == (ChunkResult.FAILED, 502)
    assert done.last_error is not None and done.last_error["code"] == "PoisonMessage"
    assert await rig.pending(chunk) is None and rig.calls == []


async def test_a_poisoned_message_keeps_the_chunk_s_last_error(clock: ManualClock) -> None:
    rig = build(clock, script=[answer(503, "ServiceUnavailable")])
    chunk = await queued(rig, ID1)
    assert await rig.worker.on_message(chunk.chunk_id, chunk.msg_token) == "deferred"

    assert await rig.worker.on_poison(chunk.chunk_id) is True

    done = await rig.finished(chunk)
    assert done is not None and done.state == ChunkResult.FAILED
    assert done.last_error is not None and done.last_error["code"] == "ServiceUnavailable"


async def test_a_poisoned_message_leaves_a_chunk_in_flight_to_its_sender(clock: ManualClock) -> None:
    rig = build(clock)
    sending = await in_flight(rig, ID1)
    clock.advance(3.0)

    assert await rig.worker.on_poison(sending.chunk_id) is False

    stored = await rig.pending(sending)
    assert stored is not None and stored.etag == sending.etag and stored.state == PendingState.SENDING
    again = rig.queues.chunks[-1]
    assert (again.chunk_id, again.token) == (sending.chunk_id, sending.msg_token)
    assert again.delay == pytest.approx(rig.sender.sending_lease - 3.0)
    assert await rig.finished(sending) is None


async def test_a_poisoned_message_of_a_stale_send_resolves_it_as_outcome_unknown(clock: ManualClock) -> None:
    rig = build(clock)
    sending = await in_flight(rig, ID1, fields=COMMENT)
    clock.advance(rig.sender.sending_lease + 1)  # its sender died mid-call; its message kept failing

    await rig.worker.on_poison(sending.chunk_id)

    done = await rig.finished(sending)
    assert done is not None and (done.state, done.answer_status) == (ChunkResult.OUTCOME_UNKNOWN, 504)


async def test_a_poisoned_message_of_a_chunk_that_is_gone_does_nothing(clock: ManualClock) -> None:
    rig = build(clock)

    assert await rig.worker.on_poison("000000000999") is False
    assert rig.queues.chunks == []


async def test_the_sweep_leaves_an_overdue_chunk_someone_else_just_took(clock: ManualClock) -> None:
    rig = build(clock)
    chunk = await queued(rig, ID1)
    clock.advance(rig.settings.sweep_grace_seconds + 1)

    async def its_worker_takes_it() -> None:
        theirs = Ledger(rig.operations.inner, clock)
        current = await theirs.pending_chunk(chunk.chunk_id)
        assert current is not None
        assert await theirs.update_pending(current, state=PendingState.SENDING, sending_since=clock())

    rig.operations.before("replace", its_worker_takes_it)

    assert await rig.worker.sweep() == {"staleSends": 0, "requeued": 0, "settled": 0}

    assert len(rig.queues.chunks) == 1
    stored = await rig.pending(chunk)
    assert stored is not None and stored.state == PendingState.SENDING
