"""Sender.attempt, step by step, over the real ledger, budget and batch limit on in-memory tables.

MDE, the token provider and the queues are scripted fakes (tests/unit/upstream_fakes.py) and time is a
manual clock that asyncio.sleep moves on (a reserved slot, the Sending mark's lead and a storage retry's
pause take no real time). Every test checks what the attempt returned and what it left behind: the
ledger's rows, the calls MDE got, the budget's log.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from shared.channels.base import TOKEN_UNAVAILABLE, CallResult
from shared.channels.batch_update import BatchLimit
from shared.errors import StorageUnavailable
from shared.ledger import ChunkResult, Ledger, PendingState
from shared.ratelimit import Denial, Grant
from shared.sender import (
    ORDER_WAIT_SECONDS,
    ROLE_HINT,
    STALE_GRANT_RETRIES,
    STALE_GRANT_RETRY_SECONDS,
    TOKEN_RETRY_SECONDS,
    AttemptKind,
)
from tests.unit.upstream_fakes import (
    ID1,
    ID2,
    ID3,
    ID4,
    OK,
    START,
    FakeTokens,
    ManualClock,
    Rig,
    TokenError,
    answer,
    build,
    not_sent,
    too_large,
    unknown,
)

COMMENT = {"status": "Resolved", "comment": "closed by the SOC"}


async def spend_budget(rig: Rig) -> Grant:
    grant = await rig.limiter.acquire(0.0)
    assert isinstance(grant, Grant)
    return grant


# --- the budget ---------------------------------------------------------------------------------------


async def test_a_grant_now_sends_at_once_and_records_succeeded(clock: ManualClock) -> None:
    rig = build(clock)
    [chunk] = await rig.accept(ID1, ID2)

    attempt = await rig.sender.attempt(chunk, max_wait=0.0)

    assert attempt.kind is AttemptKind.FINISHED and attempt.chunk.state == ChunkResult.SUCCEEDED
    assert [(c.alert_ids, c.fields, c.token) for c in rig.calls] == [
        ((ID1, ID2), {"status": "Resolved"}, "token-1")
    ]
    done = await rig.finished(chunk)
    assert done is not None and done.state == ChunkResult.SUCCEEDED
    assert (done.answer_status, done.attempts, done.last_error) == (200, 1, None)
    assert await rig.pending(chunk) is None
    assert await rig.budget_log() == [START]
    assert clock() == START  # nothing waited


async def test_a_reserved_slot_is_waited_for_and_used_when_it_comes(clock: ManualClock) -> None:
    rig = build(clock, env={"DEFENDER_RATE_LIMITS": "1/10"})
    await spend_budget(rig)
    [chunk] = await rig.accept(ID1)

    attempt = await rig.sender.attempt(chunk, max_wait=20.0)

    assert attempt.kind is AttemptKind.FINISHED and attempt.chunk.state == ChunkResult.SUCCEEDED
    [call] = rig.calls
    assert START + 10 <= call.at < START + 10.01  # at the slot, not before
    assert await rig.budget_log() == [START + 10]  # the reserved slot (the log keeps one per call allowed)


async def test_budget_denied_defers_the_chunk_until_just_before_it_frees_up(clock: ManualClock) -> None:
    rig = build(clock, env={"DEFENDER_RATE_LIMITS": "1/60"})
    await spend_budget(rig)
    [chunk] = await rig.accept(ID1)

    attempt = await rig.sender.attempt(chunk, max_wait=0.0)

    assert attempt.kind is AttemptKind.DEFERRED
    assert attempt.delay == pytest.approx(60 - rig.sender.worker_wait / 2)
    assert rig.calls == []
    stored = await rig.pending(chunk)
    assert stored is not None and (stored.state, stored.attempts) == (PendingState.PENDING, 0)
    assert await rig.budget_log() == [START]  # nothing reserved


async def test_an_earlier_pending_update_of_an_alert_blocks_and_its_grant_goes_back(
    clock: ManualClock,
) -> None:
    rig = build(clock)
    [earlier] = await rig.accept(ID1)
    [later] = await rig.accept(ID2, ID1, fields={"status": "InProgress"})

    attempt = await rig.sender.attempt(later, max_wait=5.0)

    assert attempt.kind is AttemptKind.DEFERRED and attempt.delay == ORDER_WAIT_SECONDS
    assert rig.calls == []
    assert await rig.budget_log() == []  # the grant asked for beside the order check was released
    stored = await rig.pending(later)
    assert stored is not None and (stored.state, stored.attempts) == (PendingState.PENDING, 0)
    assert await rig.pending(earlier) is not None


async def test_a_chunk_accepted_marked_sending_with_a_held_grant_is_sent_at_once(clock: ManualClock) -> None:
    rig = build(clock)
    await rig.accept(ID3)  # the accept counter is now cached, so the order can be read ahead
    view = await rig.ledger.look_ahead([ID1])
    assert view is not None and not view.blocked
    [chunk] = await rig.accept(ID1, view=view)
    assert (chunk.state, chunk.attempts) == (PendingState.SENDING, 1)
    held = await spend_budget(rig)

    attempt = await rig.sender.attempt(chunk, max_wait=0.0, held=held)

    assert attempt.kind is AttemptKind.FINISHED and attempt.chunk.state == ChunkResult.SUCCEEDED
    assert [c.alert_ids for c in rig.calls] == [(ID1,)]
    assert await rig.budget_log() == [held.at]  # the held grant, no second one
    done = await rig.finished(chunk)
    assert done is not None and done.attempts == 1


async def test_a_held_denial_gives_the_sending_mark_back_before_deferring(clock: ManualClock) -> None:
    rig = build(clock)
    await rig.accept(ID3, fields={"status": "New"})  # another update: nothing for this one to ride with
    [chunk] = await rig.accept(ID1, view=await rig.ledger.look_ahead([ID1]))
    assert chunk.state == PendingState.SENDING

    attempt = await rig.sender.attempt(chunk, max_wait=0.0, held=Denial(30.0))

    assert attempt.kind is AttemptKind.DEFERRED
    assert attempt.delay == pytest.approx(rig.sender.requeue_delay(30.0))
    assert rig.calls == []
    stored = await rig.pending(chunk)
    assert stored is not None
    assert (stored.state, stored.attempts, stored.sending_since) == (PendingState.PENDING, 0, 0.0)
    assert await rig.budget_log() == []


async def test_a_stale_grant_is_released_and_retried_in_process_then_deferred(clock: ManualClock) -> None:
    # The limiter's clock runs a second behind the sender's: every grant looks a second old, older than
    # half the safety margin allows.
    rig = build(clock, env={"RATE_LIMIT_SAFETY_MARGIN_SECONDS": "1"}, limiter_clock=lambda: clock() - 1.0)
    [chunk] = await rig.accept(ID1)

    attempt = await rig.sender.attempt(chunk, max_wait=0.0)

    assert attempt.kind is AttemptKind.DEFERRED and attempt.delay == STALE_GRANT_RETRY_SECONDS
    assert rig.tokens.token_calls == 1 + STALE_GRANT_RETRIES  # one round per grant
    assert rig.calls == []
    assert await rig.budget_log() == []  # every stale grant was given back
    stored = await rig.pending(chunk)
    assert stored is not None
    assert (stored.state, stored.attempts, stored.sending_since) == (PendingState.PENDING, 0, 0.0)


async def test_after_a_stale_grant_a_fresh_one_is_used_in_the_same_attempt(clock: ManualClock) -> None:
    skew = [1.0]
    rig = build(clock, env={"RATE_LIMIT_SAFETY_MARGIN_SECONDS": "1"}, limiter_clock=lambda: clock() - skew[0])
    rig.tokens.on_token = lambda n: skew.__setitem__(0, 1.0 if n == 1 else 0.0)  # stale only the first time
    [chunk] = await rig.accept(ID1)

    attempt = await rig.sender.attempt(chunk, max_wait=0.0)

    assert attempt.kind is AttemptKind.FINISHED and attempt.chunk.state == ChunkResult.SUCCEEDED
    assert len(rig.calls) == 1 and rig.tokens.token_calls == 2
    [slot] = await rig.budget_log()  # the stale grant went back; the second, reserved with the lead, stays
    assert rig.calls[0].at >= slot
    done = await rig.finished(chunk)
    assert done is not None and done.attempts == 1


async def test_a_429_block_that_comes_while_waiting_for_the_slot_cancels_the_call(clock: ManualClock) -> None:
    rig = build(clock, env={"DEFENDER_RATE_LIMITS": "1/10"})
    await spend_budget(rig)
    [chunk] = await rig.accept(ID1)

    async def another_instance_got_a_429() -> None:
        await rig.limiter.block(60.0)

    rig.operations.before("replace", another_instance_got_a_429)  # as the chunk is marked Sending

    attempt = await rig.sender.attempt(chunk, max_wait=20.0)

    assert attempt.kind is AttemptKind.DEFERRED and attempt.delay > 0
    assert rig.calls == []
    stored = await rig.pending(chunk)
    assert stored is not None and (stored.state, stored.attempts) == (PendingState.PENDING, 0)


# --- before the budget ----------------------------------------------------------------------------------


async def test_a_chunk_in_its_back_off_is_deferred_for_the_rest_of_it(clock: ManualClock) -> None:
    rig = build(clock)
    [accepted] = await rig.accept(ID1)
    chunk = await rig.ledger.update_pending(accepted, not_before=START + 7.5)
    assert chunk is not None

    attempt = await rig.sender.attempt(chunk, max_wait=0.0)

    assert attempt.kind is AttemptKind.DEFERRED and attempt.delay == pytest.approx(7.5)
    assert rig.calls == [] and await rig.budget_log() == []


async def test_a_chunk_larger_than_the_learned_limit_is_split_before_any_call(clock: ManualClock) -> None:
    rig = build(clock)
    [chunk] = await rig.accept(ID1, ID2, ID3)
    await rig.batch_limit.learn(2, 3)

    attempt = await rig.sender.attempt(chunk, max_wait=0.0)

    assert attempt.kind is AttemptKind.SPLIT
    assert [p.alert_ids for p in attempt.pieces] == [(ID1, ID2), (ID3,)]
    assert rig.calls == [] and await rig.budget_log() == []
    assert await rig.pending(chunk) is None
    assert [c.alert_ids for c in await rig.ledger.all_pending()] == [(ID1, ID2), (ID3,)]


async def test_no_token_defers_without_a_call_or_budget(clock: ManualClock) -> None:
    rig = build(clock, tokens=FakeTokens(TokenError("identity endpoint down")))
    [chunk] = await rig.accept(ID1)

    attempt = await rig.sender.attempt(chunk, max_wait=0.0)

    assert attempt.kind is AttemptKind.DEFERRED and attempt.delay >= TOKEN_RETRY_SECONDS
    assert rig.calls == [] and await rig.budget_log() == []
    stored = await rig.pending(chunk)
    assert stored is not None and stored.last_error is not None
    assert stored.last_error["code"] == TOKEN_UNAVAILABLE
    assert stored.attempts == 0 and stored.not_before == pytest.approx(START + attempt.delay)


async def test_no_token_gives_an_accepted_sending_mark_back(clock: ManualClock) -> None:
    rig = build(clock, tokens=FakeTokens(TokenError("identity endpoint down")))
    await rig.accept(ID3)
    [chunk] = await rig.accept(ID1, view=await rig.ledger.look_ahead([ID1]))
    held = await spend_budget(rig)

    attempt = await rig.sender.attempt(chunk, max_wait=0.0, held=held)

    assert attempt.kind is AttemptKind.DEFERRED and attempt.delay >= TOKEN_RETRY_SECONDS
    assert rig.calls == []
    stored = await rig.pending(chunk)
    assert stored is not None
    assert (stored.state, stored.attempts, stored.sending_since) == (PendingState.PENDING, 0, 0.0)


async def test_ownership_lost_before_the_mark_makes_no_call_and_gives_the_grant_back(
    clock: ManualClock,
) -> None:
    rig = build(clock)
    [read] = await rig.accept(ID1)
    theirs = await rig.ledger.update_pending(read, msg_token="someone-else")  # between our read and mark
    assert theirs is not None

    attempt = await rig.sender.attempt(read, max_wait=0.0)

    assert attempt.kind is AttemptKind.LOST
    assert rig.calls == []
    assert await rig.budget_log() == []
    stored = await rig.pending(read)
    assert stored is not None
    assert (stored.state, stored.msg_token, stored.attempts) == (PendingState.PENDING, "someone-else", 0)


async def test_ownership_lost_before_a_split_leaves_the_chunk_to_its_new_owner(clock: ManualClock) -> None:
    rig = build(clock)
    [read] = await rig.accept(ID1, ID2)
    assert await rig.ledger.update_pending(read, msg_token="someone-else") is not None
    await rig.batch_limit.learn(1, 2)

    attempt = await rig.sender.attempt(read, max_wait=0.0)

    assert attempt.kind is AttemptKind.LOST and rig.calls == []
    [stored] = await rig.ledger.all_pending()
    assert (stored.chunk_id, stored.alert_ids) == (read.chunk_id, (ID1, ID2))


# --- MDE's answers ------------------------------------------------------------------------------------------


async def test_a_401_is_retried_once_at_once_with_a_token_fetched_fresh(clock: ManualClock) -> None:
    rig = build(clock, script=[answer(401, "Unauthorized")])
    [chunk] = await rig.accept(ID1)

    attempt = await rig.sender.attempt(chunk, max_wait=0.0)

    assert attempt.kind is AttemptKind.FINISHED and attempt.chunk.state == ChunkResult.SUCCEEDED
    assert [c.token for c in rig.calls] == ["token-1", "token-2"]
    assert rig.tokens.rejected == ["token-1"]
    assert len(await rig.budget_log()) == 2  # the 401 spent budget too


async def test_a_second_401_fails_the_chunk_with_the_role_hint(clock: ManualClock) -> None:
    rig = build(clock, script=[answer(401, "Unauthorized"), answer(401, "Unauthorized", "no role")])
    [chunk] = await rig.accept(ID1)

    attempt = await rig.sender.attempt(chunk, max_wait=0.0)

    assert attempt.kind is AttemptKind.FINISHED
    assert [c.token for c in rig.calls] == ["token-1", "token-2"]
    done = await rig.finished(chunk)
    assert done is not None and (done.state, done.answer_status) == (ChunkResult.FAILED, 502)
    assert done.last_error is not None and ROLE_HINT in done.last_error["message"]
    assert done.last_error["message"].startswith("no role")


async def test_after_a_401_the_retry_goes_now_or_not_at_all(clock: ManualClock) -> None:
    rig = build(clock, env={"DEFENDER_RATE_LIMITS": "1/60"}, script=[answer(401, "Unauthorized")])
    [chunk] = await rig.accept(ID1)

    attempt = await rig.sender.attempt(chunk, max_wait=100.0)

    assert attempt.kind is AttemptKind.DEFERRED
    assert attempt.delay == pytest.approx(rig.sender.requeue_delay(60.0))
    assert [c.token for c in rig.calls] == ["token-1"]
    stored = await rig.pending(chunk)
    assert stored is not None and stored.fresh_token and stored.state == PendingState.PENDING


async def test_no_fresh_token_after_a_401_defers_as_token_unavailable(clock: ManualClock) -> None:
    tokens = FakeTokens(fresh=[TokenError("identity endpoint down")])
    rig = build(clock, tokens=tokens, script=[answer(401, "Unauthorized")])
    [chunk] = await rig.accept(ID1)

    attempt = await rig.sender.attempt(chunk, max_wait=0.0)

    assert attempt.kind is AttemptKind.DEFERRED and attempt.delay >= TOKEN_RETRY_SECONDS
    assert len(rig.calls) == 1 and tokens.rejected == ["token-1"]
    stored = await rig.pending(chunk)
    assert stored is not None and stored.fresh_token
    assert stored.last_error is not None and stored.last_error["code"] == TOKEN_UNAVAILABLE


async def test_a_403_fails_the_chunk_with_the_role_hint_without_a_refresh(clock: ManualClock) -> None:
    rig = build(clock, script=[answer(403, "Forbidden", "Insufficient privileges")])
    [chunk] = await rig.accept(ID1)

    attempt = await rig.sender.attempt(chunk, max_wait=0.0)

    assert attempt.kind is AttemptKind.FINISHED and len(rig.calls) == 1 and rig.tokens.rejected == []
    done = await rig.finished(chunk)
    assert done is not None and (done.state, done.answer_status) == (ChunkResult.FAILED, 502)
    assert done.last_error is not None and ROLE_HINT in done.last_error["message"]
    assert done.last_error["httpStatus"] == 403


@pytest.mark.parametrize(
    ("status", "code"), [(404, "NotFound"), (400, "InvalidRequestBody"), (409, "Conflict")]
)
async def test_other_4xx_fail_the_chunk_with_422_and_mde_s_code(
    clock: ManualClock, status: int, code: str
) -> None:
    rig = build(clock, script=[answer(status, code, "nope", target="req-42")])
    [chunk] = await rig.accept(ID1)

    attempt = await rig.sender.attempt(chunk, max_wait=0.0)

    assert attempt.kind is AttemptKind.FINISHED and len(rig.calls) == 1
    done = await rig.finished(chunk)
    assert done is not None and (done.state, done.answer_status) == (ChunkResult.FAILED, 422)
    assert done.last_error == {"httpStatus": status, "code": code, "message": "nope", "target": "req-42"}


async def test_a_429_blocks_the_budget_for_retry_after_and_defers(clock: ManualClock) -> None:
    rig = build(clock, script=[answer(429, "TooManyRequests", retry_after=30.0)])
    [chunk] = await rig.accept(ID1)

    attempt = await rig.sender.attempt(chunk, max_wait=0.0)

    assert attempt.kind is AttemptKind.DEFERRED and attempt.delay >= 30.0
    snapshot = await rig.limiter.snapshot()
    assert snapshot.blocked_until == pytest.approx(START + 30.0)
    later = await rig.limiter.reserve(0.0)
    assert isinstance(later, Denial) and later.wait_seconds == pytest.approx(30.0)
    stored = await rig.pending(chunk)
    assert stored is not None and stored.last_error is not None and stored.last_error["httpStatus"] == 429
    assert stored.not_before == pytest.approx(START + attempt.delay)


async def test_a_5xx_defers_with_back_off_and_records_the_error(clock: ManualClock) -> None:
    rig = build(clock, script=[answer(503, "ServiceUnavailable")])
    [chunk] = await rig.accept(ID1)

    attempt = await rig.sender.attempt(chunk, max_wait=0.0)

    assert attempt.kind is AttemptKind.DEFERRED and 0.5 <= attempt.delay <= 1.5  # 1 s ± 50 %
    stored = await rig.pending(chunk)
    assert stored is not None
    assert (stored.state, stored.attempts, stored.sending_since) == (PendingState.PENDING, 1, 0.0)
    assert stored.not_before == pytest.approx(START + attempt.delay)
    assert stored.last_error is not None and stored.last_error["code"] == "ServiceUnavailable"
    assert (await rig.limiter.snapshot()).blocked_until is None  # only a 429 blocks the budget


async def test_a_5xx_at_the_last_attempt_fails_the_chunk_with_502(clock: ManualClock) -> None:
    rig = build(clock, env={"MAX_ATTEMPTS": "2"}, script=[answer(500), answer(503, "ServiceUnavailable")])
    [chunk] = await rig.accept(ID1)
    first = await rig.sender.attempt(chunk, max_wait=0.0)
    assert first.kind is AttemptKind.DEFERRED
    clock.advance(first.delay)

    attempt = await rig.sender.attempt(first.chunk, max_wait=0.0)

    assert attempt.kind is AttemptKind.FINISHED and len(rig.calls) == 2
    done = await rig.finished(chunk)
    assert done is not None and (done.state, done.answer_status, done.attempts) == (
        ChunkResult.FAILED,
        502,
        2,
    )
    assert done.last_error is not None and done.last_error["code"] == "ServiceUnavailable"


async def test_a_retry_once_the_operation_is_older_than_the_key_ttl_fails_the_chunk(
    clock: ManualClock,
) -> None:
    rig = build(clock, env={"IDEMPOTENCY_TTL_SECONDS": "100"}, script=[answer(503)])
    [chunk] = await rig.accept(ID1)
    clock.advance(101)

    attempt = await rig.sender.attempt(chunk, max_wait=0.0)

    assert attempt.kind is AttemptKind.FINISHED
    done = await rig.finished(chunk)
    assert done is not None and (done.state, done.answer_status, done.attempts) == (
        ChunkResult.FAILED,
        502,
        1,
    )


@pytest.mark.parametrize(
    "result", [not_sent(timed_out=True), unknown(timed_out=True)], ids=["not-sent", "sent"]
)
async def test_a_timeout_at_the_last_attempt_fails_the_chunk_with_504(
    clock: ManualClock, result: CallResult
) -> None:
    rig = build(clock, env={"MAX_ATTEMPTS": "1"}, script=[result])
    [chunk] = await rig.accept(ID1)  # no comment: an unknown outcome is retried like a 5xx

    attempt = await rig.sender.attempt(chunk, max_wait=0.0)

    assert attempt.kind is AttemptKind.FINISHED and len(rig.calls) == 1
    done = await rig.finished(chunk)
    assert done is not None and (done.state, done.answer_status) == (ChunkResult.FAILED, 504)


async def test_a_failure_without_a_timeout_at_the_last_attempt_is_502_not_504(clock: ManualClock) -> None:
    rig = build(clock, env={"MAX_ATTEMPTS": "1"}, script=[not_sent()])
    [chunk] = await rig.accept(ID1)

    await rig.sender.attempt(chunk, max_wait=0.0)

    done = await rig.finished(chunk)
    assert done is not None and (done.state, done.answer_status) == (ChunkResult.FAILED, 502)


async def test_an_unknown_outcome_with_a_comment_is_504_and_never_sent_again(clock: ManualClock) -> None:
    rig = build(clock, script=[unknown()])
    [chunk] = await rig.accept(ID1, fields=COMMENT)

    attempt = await rig.sender.attempt(chunk, max_wait=0.0)

    assert attempt.kind is AttemptKind.FINISHED
    done = await rig.finished(chunk)
    assert done is not None and (done.state, done.answer_status) == (ChunkResult.OUTCOME_UNKNOWN, 504)
    assert done.last_error is not None and done.last_error["code"] == "OutcomeUnknown"
    # Neither a message for it nor the sweep sends it again.
    assert await rig.worker.on_message(chunk.chunk_id, chunk.msg_token) == "gone"
    clock.advance(3600)
    assert await rig.worker.sweep() == {"staleSends": 0, "requeued": 0, "settled": 0}
    assert len(rig.calls) == 1


async def test_an_unknown_outcome_without_a_comment_is_retried(clock: ManualClock) -> None:
    rig = build(clock, script=[unknown()])
    [chunk] = await rig.accept(ID1)

    attempt = await rig.sender.attempt(chunk, max_wait=0.0)

    assert attempt.kind is AttemptKind.DEFERRED
    clock.advance(attempt.delay)
    again = await rig.sender.attempt(attempt.chunk, max_wait=0.0)
    assert again.kind is AttemptKind.FINISHED and again.chunk.state == ChunkResult.SUCCEEDED
    assert len(rig.calls) == 2


async def test_an_unknown_outcome_with_a_comment_is_retried_when_the_operator_says_so(
    clock: ManualClock,
) -> None:
    rig = build(clock, env={"RESEND_UNKNOWN_WITH_COMMENT": "true"}, script=[unknown()])
    [chunk] = await rig.accept(ID1, fields=COMMENT)

    attempt = await rig.sender.attempt(chunk, max_wait=0.0)

    assert attempt.kind is AttemptKind.DEFERRED
    stored = await rig.pending(chunk)
    assert stored is not None and stored.state == PendingState.PENDING
    assert stored.last_error is not None and stored.last_error["code"] == "OutcomeUnknown"


async def test_maximum_batch_size_exceeded_splits_by_the_learned_size_and_remembers_it(
    clock: ManualClock,
) -> None:
    rig = build(clock, script=[too_large(2)])
    [chunk] = await rig.accept(ID1, ID2, ID3, ID4)

    attempt = await rig.sender.attempt(chunk, max_wait=0.0)

    assert attempt.kind is AttemptKind.SPLIT and len(rig.calls) == 1
    assert [p.alert_ids for p in attempt.pieces] == [(ID1, ID2), (ID3, ID4)]
    assert await rig.pending(chunk) is None
    assert [p.chunk_id for p in await rig.ledger.all_pending()] == [p.chunk_id for p in attempt.pieces]
    assert rig.batch_limit.current == 2
    other_instance = BatchLimit(500, rig.budget, partition_key="mde")
    assert await other_instance.refresh() == 2
    for piece in attempt.pieces:
        sent = await rig.sender.attempt(piece, max_wait=0.0)
        assert sent.kind is AttemptKind.FINISHED
    assert [c.alert_ids for c in rig.calls[1:]] == [(ID1, ID2), (ID3, ID4)]


async def test_maximum_batch_size_exceeded_without_an_allowance_halves_the_chunk(clock: ManualClock) -> None:
    rig = build(clock, script=[too_large(None)])
    [chunk] = await rig.accept(ID1, ID2, ID3, ID4)

    attempt = await rig.sender.attempt(chunk, max_wait=0.0)

    assert attempt.kind is AttemptKind.SPLIT and [len(p.alert_ids) for p in attempt.pieces] == [2, 2]
    assert rig.batch_limit.current == 2


async def test_a_single_id_refused_for_size_fails_the_chunk_with_422(clock: ManualClock) -> None:
    rig = build(clock, script=[too_large(None)])
    [chunk] = await rig.accept(ID1)

    attempt = await rig.sender.attempt(chunk, max_wait=0.0)

    assert attempt.kind is AttemptKind.FINISHED and len(rig.calls) == 1
    done = await rig.finished(chunk)
    assert done is not None and (done.state, done.answer_status) == (ChunkResult.FAILED, 422)
    assert done.last_error is not None and done.last_error["code"] == "MaximumBatchSizeExceeded"
    assert rig.batch_limit.learned is None


# --- recording ------------------------------------------------------------------------------------------


async def test_a_known_outcome_is_recorded_through_storage_faults(clock: ManualClock) -> None:
    rig = build(clock)
    [chunk] = await rig.accept(ID1)

    def mde_applies_it_and_storage_falters() -> CallResult:
        rig.operations.inner.fail_next("transact", 3)
        return OK

    rig.channel.then(mde_applies_it_and_storage_falters)

    attempt = await rig.sender.attempt(chunk, max_wait=0.0)

    assert rig.operations.inner.injected == 3
    assert attempt.kind is AttemptKind.FINISHED and attempt.chunk.state == ChunkResult.SUCCEEDED
    done = await rig.finished(chunk)
    assert done is not None and done.state == ChunkResult.SUCCEEDED and len(rig.calls) == 1


async def test_a_deferral_is_recorded_through_storage_faults(clock: ManualClock) -> None:
    rig = build(clock)
    [chunk] = await rig.accept(ID1)

    def mde_fails_and_storage_falters() -> CallResult:
        rig.operations.inner.fail_next("replace", 2)
        return answer(503)

    rig.channel.then(mde_fails_and_storage_falters)

    attempt = await rig.sender.attempt(chunk, max_wait=0.0)

    assert rig.operations.inner.injected == 2
    assert attempt.kind is AttemptKind.DEFERRED
    stored = await rig.pending(chunk)
    assert stored is not None and stored.state == PendingState.PENDING
    assert stored.last_error is not None and stored.last_error["httpStatus"] == 503


async def test_an_answer_hook_ends_the_chunk_in_place_with_its_answer(clock: ManualClock) -> None:
    rig = build(clock)
    [chunk] = await rig.accept(ID1)

    attempt = await rig.sender.attempt(chunk, max_wait=0.0, answer_for=lambda c: f"answer:{c.state}")

    assert attempt.kind is AttemptKind.FINISHED
    assert await rig.finished(chunk) is None  # not moved yet: the sweep settles it
    stored = await rig.stored(chunk)
    assert (stored.state, stored.answer) == (ChunkResult.SUCCEEDED, "answer:Succeeded")
    assert await rig.pending(chunk) is None  # a finished p- entry is not pending


# --- scheduling -----------------------------------------------------------------------------------------


async def test_schedule_names_the_chunk_s_one_live_message(clock: ManualClock) -> None:
    rig = build(clock)
    [chunk] = await rig.accept(ID1)

    queued = await rig.sender.schedule(chunk, 12.0)
    assert queued is not None and queued.expected_at == START + 12.0

    [sent] = rig.queues.chunks
    stored = await rig.pending(chunk)
    assert stored is not None and (stored.msg_token, stored.msg_due_at) == (sent.token, START + 12.0)
    assert (sent.chunk_id, sent.delay) == (chunk.chunk_id, 12.0)
    assert await rig.sender.schedule(chunk, 0.0) is None  # the read is out of date now: not ours
    assert len(rig.queues.chunks) == 1


async def test_resolving_a_stale_send_without_a_comment_retries_it(clock: ManualClock) -> None:
    rig = build(clock)
    await rig.accept(ID3)
    [chunk] = await rig.accept(ID1, view=await rig.ledger.look_ahead([ID1]))

    attempt = await rig.sender.resolve_stale_send(chunk)

    assert attempt is not None and attempt.kind is AttemptKind.DEFERRED
    stored = await rig.pending(chunk)
    assert stored is not None and (stored.state, stored.sending_since) == (PendingState.PENDING, 0.0)
    assert stored.last_error is not None and stored.last_error["code"] == "OutcomeUnknown"
    assert rig.calls == []


# --- someone else changed the chunk ---------------------------------------------------------------------


def another_instance_changes(rig: Rig, chunk_id: str) -> Callable[[], Awaitable[None]]:
    """A write by another instance (its own Ledger) that takes the chunk over."""

    async def change() -> None:
        theirs = Ledger(rig.operations.inner, rig.clock)
        current = await theirs.pending_chunk(chunk_id)
        assert current is not None
        assert await theirs.update_pending(current, msg_token="someone-else") is not None

    return change


async def test_ownership_lost_while_giving_the_mark_back_makes_no_call(clock: ManualClock) -> None:
    rig = build(clock)
    await rig.accept(ID3)
    [chunk] = await rig.accept(ID1, view=await rig.ledger.look_ahead([ID1]))
    rig.operations.before("replace", another_instance_changes(rig, chunk.chunk_id))

    attempt = await rig.sender.attempt(chunk, max_wait=0.0, held=Denial(30.0))

    assert attempt.kind is AttemptKind.LOST and rig.calls == []
    stored = await rig.pending(chunk)
    assert stored is not None and (stored.state, stored.msg_token) == (PendingState.SENDING, "someone-else")


async def test_ownership_lost_after_a_401_makes_no_second_call(clock: ManualClock) -> None:
    rig = build(clock)
    [chunk] = await rig.accept(ID1)

    def unauthorized_and_taken_over() -> CallResult:
        rig.operations.before("replace", another_instance_changes(rig, chunk.chunk_id))
        return answer(401, "Unauthorized")

    rig.channel.then(unauthorized_and_taken_over)

    attempt = await rig.sender.attempt(chunk, max_wait=0.0)

    assert attempt.kind is AttemptKind.LOST
    assert len(rig.calls) == 1 and rig.tokens.rejected == []
    stored = await rig.pending(chunk)
    assert stored is not None and not stored.fresh_token and stored.msg_token == "someone-else"


async def test_ownership_lost_while_a_429_block_cancels_the_slot(clock: ManualClock) -> None:
    rig = build(clock, env={"DEFENDER_RATE_LIMITS": "1/10"})
    await spend_budget(rig)
    [chunk] = await rig.accept(ID1)

    async def another_instance_got_a_429() -> None:
        await rig.limiter.block(60.0)

    rig.operations.before("replace", another_instance_got_a_429)  # as the chunk is marked Sending
    rig.operations.before("replace", another_instance_changes(rig, chunk.chunk_id), skip=1)  # ... unmarked

    attempt = await rig.sender.attempt(chunk, max_wait=20.0)

    assert attempt.kind is AttemptKind.LOST and rig.calls == []
    stored = await rig.pending(chunk)
    assert stored is not None and stored.msg_token == "someone-else"


async def test_ownership_lost_when_a_grant_went_stale_gives_the_grant_back(clock: ManualClock) -> None:
    rig = build(clock, env={"RATE_LIMIT_SAFETY_MARGIN_SECONDS": "1"}, limiter_clock=lambda: clock() - 1.0)
    [chunk] = await rig.accept(ID1)
    # the first replace marks the chunk Sending; the second would give the stale mark back
    rig.operations.before("replace", another_instance_changes(rig, chunk.chunk_id), skip=1)

    attempt = await rig.sender.attempt(chunk, max_wait=0.0)

    assert attempt.kind is AttemptKind.LOST and rig.calls == []
    assert await rig.budget_log() == []


async def test_ownership_lost_before_a_retry_is_recorded_leaves_the_chunk_to_its_owner(
    clock: ManualClock,
) -> None:
    rig = build(clock)
    [chunk] = await rig.accept(ID1)

    def failing_and_taken_over() -> CallResult:
        rig.operations.before("replace", another_instance_changes(rig, chunk.chunk_id))
        return answer(503)

    rig.channel.then(failing_and_taken_over)

    attempt = await rig.sender.attempt(chunk, max_wait=0.0)

    assert attempt.kind is AttemptKind.LOST and len(rig.calls) == 1
    stored = await rig.pending(chunk)
    assert stored is not None and stored.msg_token == "someone-else" and stored.last_error is None


async def test_a_grant_that_cannot_be_given_back_is_only_spent(clock: ManualClock) -> None:
    rig = build(clock)
    [read] = await rig.accept(ID1)
    changed = another_instance_changes(rig, read.chunk_id)

    async def taken_over_and_budget_store_down() -> None:
        await changed()
        rig.budget.inner.fail_next("replace", 1)

    rig.operations.before("replace", taken_over_and_budget_store_down)  # as the chunk is marked Sending

    attempt = await rig.sender.attempt(read, max_wait=0.0)

    assert attempt.kind is AttemptKind.LOST and rig.calls == []
    assert rig.budget.inner.injected == 1
    assert await rig.budget_log() == [START]  # still counted: never more calls than the log says


async def test_a_blocked_chunk_denied_budget_waits_for_the_order_first(clock: ManualClock) -> None:
    rig = build(clock, env={"DEFENDER_RATE_LIMITS": "1/60"})
    await spend_budget(rig)
    await rig.accept(ID1)
    [later] = await rig.accept(ID1, fields={"status": "InProgress"})

    attempt = await rig.sender.attempt(later, max_wait=0.0)

    assert attempt.kind is AttemptKind.DEFERRED and attempt.delay == ORDER_WAIT_SECONDS
    assert rig.calls == [] and await rig.budget_log() == [START]


async def test_recording_gives_up_once_storage_stays_down_past_the_sending_lease(clock: ManualClock) -> None:
    # A lease of 10 ms (real time: how long the process rides faults out); the mark stays for the sweep.
    rig = build(clock, env={"DEFENDER_HTTP_TIMEOUT_SECONDS": "0.01", "SWEEP_GRACE_SECONDS": "0"})
    [chunk] = await rig.accept(ID1)

    def applied_and_storage_down() -> CallResult:
        rig.operations.inner.fail_next("transact", 10**9)
        return OK

    rig.channel.then(applied_and_storage_down)

    with pytest.raises(StorageUnavailable):
        await rig.sender.attempt(chunk, max_wait=0.0)

    assert rig.operations.inner.injected >= 2  # retried before giving up
    stored = await rig.pending(chunk)
    assert stored is not None and stored.state == PendingState.SENDING and len(rig.calls) == 1
