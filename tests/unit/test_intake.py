"""Intake.submit, one test per outcome, over the real idempotency store, ledger and budget on in-memory
tables (MDE, tokens and queues faked; a manual clock that asyncio.sleep moves on)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from shared.channels.base import CallResult
from shared.errors import AlreadyAccepted, StorageUnavailable
from shared.idempotency import KeyKind, KeyState, StoredResponse
from shared.intake import ACCEPT_LEASE_SECONDS, REPLAYED, Submission
from shared.ledger import AcceptPlan, ChunkResult, Ledger, PendingState, new_operation_id
from shared.outcomes import Accepted, InProgress, KeyReused, Replayed
from shared.sender import TOKEN_RETRY_SECONDS
from shared.validation import AlertUpdate, BatchUpdate
from tests.unit.upstream_fakes import (
    ID1,
    ID2,
    OK,
    ManualClock,
    Rig,
    TokenError,
    answer,
    build,
    too_large,
    unknown,
)

OPERATIONS_URL = "https://gate.example/api/operations/"
RESOLVE = BatchUpdate((ID1, ID2), AlertUpdate(status="Resolved"))
REOPEN = BatchUpdate((ID1,), AlertUpdate(status="InProgress"))


def submission(
    update: BatchUpdate = RESOLVE, *, key: str | None = "key-1", respond_async: bool = False
) -> Submission:
    return Submission(
        update, "http", {"app": "tests"}, OPERATIONS_URL, explicit_key=key, respond_async=respond_async
    )


async def operations(rig: Rig) -> list[str]:
    entities = await rig.operations.inner.query(
        "PartitionKey eq @pk and RowKey ge @lo and RowKey lt @hi", {"pk": "ledger", "lo": "o-", "hi": "o."}
    )
    return [str(e["OperationId"]) for e in entities]


async def claimed_elsewhere(rig: Rig, update: BatchUpdate = RESOLVE, key: str = "key-1") -> str:
    """Another instance claimed the key (and has not accepted the request yet): its operation id."""
    operation_id = new_operation_id()
    claim = await rig.keys.claim(rig.keys.key(KeyKind.EXPLICIT, key), update.digest(), operation_id)
    assert claim.record.operation_id == operation_id
    return operation_id


def plan_for(operation_id: str, update: BatchUpdate = RESOLVE) -> AcceptPlan:
    return AcceptPlan(operation_id, "http", {}, [(update.alert_ids, update.update.fields())], update.digest())


# --- accepted ----------------------------------------------------------------------------------------------


async def test_a_new_request_is_accepted_and_answered_200_after_one_call(clock: ManualClock) -> None:
    rig = build(clock)

    outcome = await rig.intake.submit(submission())

    assert isinstance(outcome, Accepted) and outcome.answer.status == 200
    document = json.loads(outcome.answer.body)
    assert (document["operationId"], document["status"]) == (outcome.operation_id, "Succeeded")
    assert outcome.answer.headers["Location"] == OPERATIONS_URL + outcome.operation_id
    assert [c.alert_ids for c in rig.calls] == [(ID1, ID2)]
    assert await operations(rig) == [outcome.operation_id]
    [chunk] = await rig.ledger.all_pending()  # ended in place, with the answer the caller got
    assert chunk.state == ChunkResult.SUCCEEDED
    assert json.loads(chunk.answer)["body"] == outcome.answer.body.decode()
    assert rig.queues.chunks == []


async def test_respond_async_answers_202_sends_nothing_and_queues_the_chunk(clock: ManualClock) -> None:
    rig = build(clock)

    outcome = await rig.intake.submit(submission(respond_async=True))

    assert isinstance(outcome, Accepted) and outcome.answer.status == 202
    assert outcome.answer.headers["Location"] == OPERATIONS_URL + outcome.operation_id
    assert int(outcome.answer.headers["Retry-After"]) >= 1
    assert json.loads(outcome.answer.body)["status"] == "Queued"
    assert rig.calls == []
    [chunk] = await rig.ledger.all_pending()
    [sent] = rig.queues.chunks
    assert (sent.chunk_id, sent.token, sent.delay) == (chunk.chunk_id, chunk.msg_token, 0.0)
    assert chunk.state == PendingState.PENDING
    record = await rig.keys.get(rig.keys.key(KeyKind.EXPLICIT, "key-1"))
    assert record is not None and record.state == KeyState.COMPLETED and record.response is not None
    assert record.response.status == 202


async def test_a_request_the_budget_cannot_take_now_is_answered_202_and_queued(clock: ManualClock) -> None:
    rig = build(clock, env={"DEFENDER_RATE_LIMITS": "1/60"})
    assert await rig.limiter.acquire(0.0)

    outcome = await rig.intake.submit(submission())

    assert isinstance(outcome, Accepted) and outcome.answer.status == 202
    assert rig.calls == []
    [chunk] = await rig.ledger.all_pending()
    assert rig.queues.chunks[-1].chunk_id == chunk.chunk_id
    assert rig.queues.chunks[-1].delay == pytest.approx(rig.sender.requeue_delay(60.0), abs=0.01)


async def test_a_request_riding_a_call_gathering_here_keeps_its_202_with_its_operation(
    clock: ManualClock,
) -> None:
    """A rider is answered 202 at once; its answer is written with its operation as it is accepted, so
    its key takes no second write. A repeat gets that 202 (status, body, Location) even once the
    operation has ended, and copies it to the key; nothing is sent for the repeat."""
    rig = build(clock)
    [lead] = await rig.accept("da637399794050273599_760707379", fields=RESOLVE.update.fields())
    rig.sender.gathering.open(lead, clock() + 5.0, 500, clock())  # its call is 5 s away

    outcome = await rig.intake.submit(submission())

    assert isinstance(outcome, Accepted) and outcome.answer.status == 202
    assert outcome.answer.headers["Location"] == OPERATIONS_URL + outcome.operation_id
    assert outcome.answer.headers["Retry-After"] == "6"  # just after the call's slot
    assert rig.calls == [] and rig.queues.chunks == []  # it rides: no call, no message of its own
    assert rig.keys_table.counts["replace"] == 0  # the claim was the key's only write
    record = await rig.keys.get(rig.keys.key(KeyKind.EXPLICIT, "key-1"))
    assert record is not None and record.state == KeyState.IN_PROGRESS
    operation = await rig.ledger.operation(outcome.operation_id)
    assert operation is not None
    assert StoredResponse.loads(operation.answer).body == outcome.answer.body.decode()

    [chunk] = await rig.ledger.chunks_of(operation)
    await rig.ledger.finish(chunk, ChunkResult.SUCCEEDED, 200, None)  # the call went; it ended
    repeat = await rig.intake.submit(submission())

    assert isinstance(repeat, Replayed) and repeat.answer.status == 202
    assert repeat.answer.body == outcome.answer.body
    assert repeat.answer.headers == {**outcome.answer.headers, **REPLAYED}
    completed = await rig.keys.get(rig.keys.key(KeyKind.EXPLICIT, "key-1"))
    assert completed is not None and completed.state == KeyState.COMPLETED
    assert completed.response is not None and completed.response.status == 202
    assert rig.calls == []


async def test_a_rider_whose_call_closed_before_its_try_still_answers_its_kept_202(
    clock: ManualClock,
) -> None:
    """The call it was to ride closed between the look and the try (its lead's call ended): the request
    still answers the 202 written with its operation, and its chunk goes on by a try of its own,
    without waiting (budget free: sent now)."""
    rig = build(clock)
    [lead] = await rig.accept("da637399794050273599_760707379", fields=RESOLVE.update.fields())
    rig.sender.gathering.open(lead, clock() + 5.0, 500, clock())

    async def the_lead_s_try_ends() -> None:
        await rig.ledger.finish(lead, ChunkResult.SUCCEEDED, 200, None)
        rig.sender.gathering.close(lead)

    rig.operations.before("transact", the_lead_s_try_ends)  # as the request is accepted

    outcome = await rig.intake.submit(submission())

    assert isinstance(outcome, Accepted) and outcome.answer.status == 202
    operation = await rig.ledger.operation(outcome.operation_id)
    assert operation is not None and StoredResponse.loads(operation.answer).status == 202
    assert [c.alert_ids for c in rig.calls] == [(ID1, ID2)]  # its own try sent it at once
    repeat = await rig.intake.submit(submission())
    assert isinstance(repeat, Replayed) and repeat.answer.status == 202
    assert len(rig.calls) == 1


async def test_mde_refusing_is_accepted_with_its_problem_answer_and_replayed_as_is(
    clock: ManualClock,
) -> None:
    rig = build(clock, script=[answer(404, "NotFound", "no such alert")])

    first = await rig.intake.submit(submission())
    again = await rig.intake.submit(submission())

    assert isinstance(first, Accepted) and first.answer.status == 422
    assert json.loads(first.answer.body)["upstream"]["code"] == "NotFound"
    assert isinstance(again, Replayed) and (again.answer.status, again.answer.body) == (
        422,
        first.answer.body,
    )
    assert len(rig.calls) == 1


# --- answered from the key ------------------------------------------------------------------------------------


async def test_a_repeat_replays_the_first_answer_without_sending(clock: ManualClock) -> None:
    rig = build(clock)
    first = await rig.intake.submit(submission())
    assert isinstance(first, Accepted)

    second = await rig.intake.submit(submission())  # completes the key from the ledger
    third = await rig.intake.submit(submission())  # from the completed key

    for replay in (second, third):
        assert isinstance(replay, Replayed) and replay.operation_id == first.operation_id
        assert (replay.answer.status, replay.answer.body) == (first.answer.status, first.answer.body)
        assert replay.answer.headers["Idempotent-Replayed"] == REPLAYED["Idempotent-Replayed"]
        assert replay.answer.headers["Location"] == first.answer.headers["Location"]
    record = await rig.keys.get(rig.keys.key(KeyKind.EXPLICIT, "key-1"))
    assert record is not None and record.state == KeyState.COMPLETED
    assert len(rig.calls) == 1 and await operations(rig) == [first.operation_id]


async def test_a_key_reused_with_a_different_body_is_refused(clock: ManualClock) -> None:
    rig = build(clock)
    first = await rig.intake.submit(submission())
    assert isinstance(first, Accepted)

    outcome = await rig.intake.submit(submission(REOPEN))

    assert outcome == KeyReused("explicit")
    assert len(rig.calls) == 1 and await operations(rig) == [first.operation_id]


async def test_a_key_claimed_elsewhere_whose_operation_has_not_ended_is_in_progress(
    clock: ManualClock,
) -> None:
    rig = build(clock)
    operation_id = await claimed_elsewhere(rig)
    await rig.ledger.accept(plan_for(operation_id))  # accepted there, not sent yet

    outcome = await rig.intake.submit(submission())

    assert isinstance(outcome, InProgress) and outcome.operation_id == operation_id
    assert outcome.retry_after >= 1
    assert rig.calls == [] and await operations(rig) == [operation_id]
    record = await rig.keys.get(rig.keys.key(KeyKind.EXPLICIT, "key-1"))
    assert record is not None and record.state == KeyState.IN_PROGRESS


async def test_a_fresh_claim_not_accepted_yet_is_left_to_its_holder(clock: ManualClock) -> None:
    rig = build(clock)
    operation_id = await claimed_elsewhere(rig)
    clock.advance(ACCEPT_LEASE_SECONDS - 1)

    outcome = await rig.intake.submit(submission())

    assert isinstance(outcome, InProgress) and outcome.operation_id == operation_id
    assert rig.calls == [] and await operations(rig) == []


# --- claims taken over ---------------------------------------------------------------------------------------


async def test_a_stale_claim_is_taken_over_with_its_operation_id(clock: ManualClock) -> None:
    rig = build(clock)
    operation_id = await claimed_elsewhere(rig)
    clock.advance(rig.keys.claim_lease + 1)  # its holder went quiet

    outcome = await rig.intake.submit(submission())

    assert isinstance(outcome, Accepted) and outcome.operation_id == operation_id
    assert outcome.answer.status == 200 and len(rig.calls) == 1
    assert await operations(rig) == [operation_id]


async def test_a_stale_claim_whose_request_was_accepted_is_answered_for_that_operation(
    clock: ManualClock,
) -> None:
    rig = build(clock)
    operation_id = await claimed_elsewhere(rig)
    await rig.ledger.accept(plan_for(operation_id))  # its holder died after accepting
    clock.advance(rig.keys.claim_lease + 1)

    outcome = await rig.intake.submit(submission())

    assert isinstance(outcome, Replayed) and outcome.operation_id == operation_id
    assert outcome.answer.status == 202  # the sweep will resolve its chunks
    assert rig.calls == [] and await operations(rig) == [operation_id]


async def test_a_claim_never_accepted_within_the_accept_lease_is_taken_over_and_accepted_once(
    clock: ManualClock,
) -> None:
    rig = build(clock)
    operation_id = await claimed_elsewhere(rig)
    clock.advance(ACCEPT_LEASE_SECONDS + 1)  # still within the claim lease
    assert rig.keys.claim_lease > ACCEPT_LEASE_SECONDS + 1

    outcome = await rig.intake.submit(submission())

    assert isinstance(outcome, Accepted) and outcome.operation_id == operation_id
    assert len(rig.calls) == 1 and await operations(rig) == [operation_id]
    with pytest.raises(AlreadyAccepted):  # the first holder, waking up, cannot accept it again
        await Ledger(rig.operations, clock).accept(plan_for(operation_id))
    assert await operations(rig) == [operation_id]


async def test_a_takeover_that_loses_the_accept_to_the_first_holder_is_in_progress(
    clock: ManualClock,
) -> None:
    rig = build(clock)
    operation_id = await claimed_elsewhere(rig)
    clock.advance(ACCEPT_LEASE_SECONDS + 1)

    async def first_holder_accepts() -> None:  # just as the claim is taken over
        await Ledger(rig.operations.inner, clock).accept(plan_for(operation_id))

    rig.keys_table.before("replace", first_holder_accepts)

    outcome = await rig.intake.submit(submission())

    assert isinstance(outcome, InProgress) and outcome.operation_id == operation_id
    assert rig.calls == [] and await operations(rig) == [operation_id]
    [chunk] = await rig.ledger.all_pending()
    assert chunk.operation_id == operation_id and chunk.state == PendingState.PENDING


async def test_storage_failing_during_accept_keeps_the_claim_for_a_takeover(clock: ManualClock) -> None:
    rig = build(clock)
    rig.operations.inner.fail_next("transact", 1)

    with pytest.raises(StorageUnavailable):
        await rig.intake.submit(submission())

    record = await rig.keys.get(rig.keys.key(KeyKind.EXPLICIT, "key-1"))
    assert record is not None and record.state == KeyState.IN_PROGRESS  # kept, not released
    assert rig.calls == [] and await operations(rig) == []
    clock.advance(ACCEPT_LEASE_SECONDS + 1)
    retried = await rig.intake.submit(submission())
    assert isinstance(retried, Accepted) and retried.operation_id == record.operation_id
    assert len(rig.calls) == 1


async def test_any_other_failure_during_accept_releases_the_claim(clock: ManualClock) -> None:
    rig = build(clock)
    rig.operations.inner.fail_next("transact", 1, exc=RuntimeError("bug"))

    with pytest.raises(RuntimeError):
        await rig.intake.submit(submission())

    assert await rig.keys.get(rig.keys.key(KeyKind.EXPLICIT, "key-1")) is None
    retried = await rig.intake.submit(submission())  # at once: nothing was accepted
    assert isinstance(retried, Accepted) and len(rig.calls) == 1


# --- derived keys ---------------------------------------------------------------------------------------------


async def test_a_derived_key_replays_a_repeat(clock: ManualClock) -> None:
    rig = build(clock)
    first = await rig.intake.submit(submission(key=None))

    again = await rig.intake.submit(submission(key=None))

    assert isinstance(first, Accepted) and isinstance(again, Replayed)
    assert again.operation_id == first.operation_id and len(rig.calls) == 1


async def test_a_derived_key_never_swallows_a_change_back(clock: ManualClock) -> None:
    rig = build(clock)

    a = await rig.intake.submit(submission(RESOLVE, key=None))
    b = await rig.intake.submit(submission(REOPEN, key=None))
    a_again = await rig.intake.submit(submission(RESOLVE, key=None))

    assert all(isinstance(o, Accepted) for o in (a, b, a_again))
    ids = [o.operation_id for o in (a, b, a_again) if isinstance(o, Accepted)]
    assert len(set(ids)) == 3 and sorted(await operations(rig)) == sorted(ids)
    assert [c.fields["status"] for c in rig.calls] == ["Resolved", "InProgress", "Resolved"]


# --- the synchronous path ----------------------------------------------------------------------------------


async def test_a_request_of_several_chunks_is_sent_chunk_by_chunk_and_its_key_completed(
    clock: ManualClock,
) -> None:
    rig = build(clock, env={"DEFENDER_MAX_ALERTS_PER_CALL": "1"})

    outcome = await rig.intake.submit(submission())

    assert isinstance(outcome, Accepted) and outcome.answer.status == 200
    assert [c.alert_ids for c in rig.calls] == [(ID1,), (ID2,)]
    record = await rig.keys.get(rig.keys.key(KeyKind.EXPLICIT, "key-1"))
    assert record is not None and record.state == KeyState.COMPLETED and record.response is not None
    assert record.response.body == outcome.answer.body.decode()


async def test_chunks_left_when_the_synchronous_wait_is_over_are_queued_untried(clock: ManualClock) -> None:
    rig = build(clock, env={"DEFENDER_MAX_ALERTS_PER_CALL": "1", "SYNC_MAX_WAIT_SECONDS": "2"})

    def slow_answer() -> CallResult:
        clock.advance(3.0)  # MDE takes longer than the whole synchronous wait
        return OK

    rig.channel.then(slow_answer)

    outcome = await rig.intake.submit(submission())

    assert isinstance(outcome, Accepted) and outcome.answer.status == 202
    assert [c.alert_ids for c in rig.calls] == [(ID1,)]
    left = (await rig.ledger.all_pending())[-1]
    assert left.alert_ids == (ID2,) and left.state == PendingState.PENDING and left.attempts == 0
    assert [(s.chunk_id, s.delay) for s in rig.queues.chunks] == [(left.chunk_id, 0.0)]


async def test_a_chunk_split_on_the_synchronous_path_is_sent_in_pieces(clock: ManualClock) -> None:
    rig = build(clock, script=[too_large(1)])

    outcome = await rig.intake.submit(submission())

    assert isinstance(outcome, Accepted) and outcome.answer.status == 200
    assert [c.alert_ids for c in rig.calls] == [(ID1, ID2), (ID1,), (ID2,)]
    assert [c["alertCount"] for c in json.loads(outcome.answer.body)["chunks"]] == [1, 1]


async def test_the_order_read_ahead_failing_falls_back_to_the_ordinary_accept(clock: ManualClock) -> None:
    rig = build(clock)
    await rig.intake.submit(submission(REOPEN, key="key-0"))  # caches the accept counter
    rig.operations.inner.fail_next("query", 1)

    outcome = await rig.intake.submit(submission())

    assert rig.operations.inner.injected == 1
    assert isinstance(outcome, Accepted) and outcome.answer.status == 200 and len(rig.calls) == 2


async def test_a_chunk_accepted_marked_sending_uses_the_grant_asked_for_beside_the_accept(
    clock: ManualClock,
) -> None:
    rig = build(clock)
    await rig.intake.submit(submission(REOPEN, key="key-0"))
    budget_writes = rig.budget.counts["replace"]

    outcome = await rig.intake.submit(submission(BatchUpdate((ID2,), AlertUpdate(status="Resolved"))))

    assert isinstance(outcome, Accepted) and outcome.answer.status == 200 and len(rig.calls) == 2
    assert rig.budget.counts["replace"] == budget_writes + 1  # one grant, asked for beside the accept


async def test_no_token_beside_the_accept_defers_without_spending_budget(clock: ManualClock) -> None:
    rig = build(clock)
    await rig.intake.submit(submission(REOPEN, key="key-0"))
    rig.tokens.current = TokenError("identity endpoint down")
    log = await rig.budget_log()

    outcome = await rig.intake.submit(submission(BatchUpdate((ID2,), AlertUpdate(status="Resolved"))))

    assert isinstance(outcome, Accepted) and outcome.answer.status == 202 and len(rig.calls) == 1
    assert await rig.budget_log() == log
    assert rig.queues.chunks[-1].delay >= TOKEN_RETRY_SECONDS


async def test_a_failed_budget_request_beside_the_accept_is_asked_again(clock: ManualClock) -> None:
    rig = build(clock)
    await rig.intake.submit(submission(REOPEN, key="key-0"))
    rig.budget.inner.fail_next("replace", 1)

    outcome = await rig.intake.submit(submission(BatchUpdate((ID2,), AlertUpdate(status="Resolved"))))

    assert rig.budget.inner.injected == 1
    assert isinstance(outcome, Accepted) and outcome.answer.status == 200 and len(rig.calls) == 2


async def test_storage_failing_during_the_accept_beside_the_budget_keeps_the_claim(
    clock: ManualClock,
) -> None:
    rig = build(clock)
    await rig.intake.submit(submission(REOPEN, key="key-0"))  # the next accept reads the order ahead
    rig.operations.inner.fail_next("transact", 1)

    with pytest.raises(StorageUnavailable):
        await rig.intake.submit(submission(BatchUpdate((ID2,), AlertUpdate(status="Resolved"))))

    record = await rig.keys.get(rig.keys.key(KeyKind.EXPLICIT, "key-1"))
    assert record is not None and record.state == KeyState.IN_PROGRESS
    assert len(rig.calls) == 1


# --- races on the key ------------------------------------------------------------------------------------------


async def test_a_takeover_beaten_by_another_looks_again_and_finds_it_in_progress(clock: ManualClock) -> None:
    rig = build(clock)
    operation_id = await claimed_elsewhere(rig)
    clock.advance(ACCEPT_LEASE_SECONDS + 1)
    key = rig.keys.key(KeyKind.EXPLICIT, "key-1")

    async def another_takes_it_over() -> None:
        record = await rig.keys.get(key)
        assert record is not None and await rig.keys.take_over(record) is not None

    rig.keys_table.before("replace", another_takes_it_over)

    outcome = await rig.intake.submit(submission())

    assert isinstance(outcome, InProgress) and outcome.operation_id == operation_id
    assert rig.calls == [] and await operations(rig) == []


async def test_a_stale_takeover_beaten_by_another_looks_again(clock: ManualClock) -> None:
    rig = build(clock)
    operation_id = await claimed_elsewhere(rig)
    clock.advance(rig.keys.claim_lease + 1)
    key = rig.keys.key(KeyKind.EXPLICIT, "key-1")

    async def another_takes_it_over() -> None:
        record = await rig.keys.get(key)
        assert record is not None and await rig.keys.take_over(record) is not None

    rig.keys_table.before("replace", another_takes_it_over)

    outcome = await rig.intake.submit(submission())

    assert isinstance(outcome, InProgress) and outcome.operation_id == operation_id
    assert rig.calls == [] and await operations(rig) == []


async def test_a_stale_claim_completed_meanwhile_by_another_replays_their_answer(clock: ManualClock) -> None:
    rig = build(clock)
    operation_id = await claimed_elsewhere(rig)
    await rig.ledger.accept(plan_for(operation_id))
    clock.advance(rig.keys.claim_lease + 1)
    key = rig.keys.key(KeyKind.EXPLICIT, "key-1")

    async def another_completes_it() -> None:
        record = await rig.keys.get(key)
        assert record is not None
        assert await rig.keys.complete(record, StoredResponse(202, {"Location": "theirs"}, "{}")) is not None

    rig.keys_table.before("replace", another_completes_it)

    outcome = await rig.intake.submit(submission())

    assert isinstance(outcome, Replayed) and outcome.operation_id == operation_id
    assert (outcome.answer.status, outcome.answer.headers["Location"]) == (202, "theirs")
    assert rig.calls == []


async def test_a_derived_key_taken_by_another_change_back_is_not_accepted_twice(clock: ManualClock) -> None:
    rig = build(clock)
    await rig.intake.submit(submission(RESOLVE, key=None))
    await rig.intake.submit(submission(REOPEN, key=None))
    key = rig.keys.key(KeyKind.DERIVED, RESOLVE.digest())
    theirs = new_operation_id()

    async def another_replaces_it() -> None:
        record = await rig.keys.get(key)
        assert record is not None and await rig.keys.replace(record, RESOLVE.digest(), theirs) is not None

    # the first replace completes the key from the ledger, the second would take it for the change back
    rig.keys_table.before("replace", another_replaces_it, skip=1)

    outcome = await rig.intake.submit(submission(RESOLVE, key=None))

    assert isinstance(outcome, InProgress) and outcome.operation_id == theirs
    assert len(rig.calls) == 2


async def test_a_derived_key_whose_operation_was_purged_is_accepted_anew(clock: ManualClock) -> None:
    rig = build(clock)
    first = await rig.intake.submit(submission(key=None))
    assert isinstance(await rig.intake.submit(submission(key=None)), Replayed)  # the key is completed
    assert isinstance(first, Accepted)
    assert await rig.operations.inner.delete("ledger", f"o-{first.operation_id}")

    outcome = await rig.intake.submit(submission(key=None))

    assert isinstance(outcome, Accepted) and outcome.operation_id != first.operation_id
    assert len(rig.calls) == 2


async def test_a_key_that_keeps_changing_under_every_look_is_answered_in_progress(clock: ManualClock) -> None:
    rig = build(clock)
    operation_id = await claimed_elsewhere(rig)
    clock.advance(rig.keys.claim_lease + 1)
    key = rig.keys.key(KeyKind.EXPLICIT, "key-1")

    async def touched_elsewhere() -> None:  # rewritten as it is: only its ETag moves
        entity = rig.keys_table.inner.peek(key.partition_key, "key")
        assert entity is not None
        rig.keys_table.inner.put(dict(entity))

    for look in range(3):  # before each look's takeover
        rig.keys_table.before("replace", touched_elsewhere, skip=look)

    outcome = await rig.intake.submit(submission())

    assert isinstance(outcome, InProgress) and outcome.operation_id == operation_id
    assert rig.keys_table.counts["replace"] == 3
    assert rig.calls == [] and await operations(rig) == []


# --- a replayed 504 ---------------------------------------------------------------------------------------------


async def test_a_replayed_504_is_rebuilt_once_a_known_outcome_superseded_it(clock: ManualClock) -> None:
    rig = build(clock, script=[unknown()])
    commented = BatchUpdate((ID1,), AlertUpdate(status="Resolved", comment="closed by the SOC"))
    first = await rig.intake.submit(submission(commented))
    assert isinstance(first, Accepted) and first.answer.status == 504
    unknown_yet = await rig.intake.submit(submission(commented))
    assert isinstance(unknown_yet, Replayed) and unknown_yet.answer.status == 504
    # MDE's answer arrives after all (the sender that made the call records it late)
    [ended] = await rig.ledger.all_pending()
    assert ended.state == ChunkResult.OUTCOME_UNKNOWN
    late = dataclasses.replace(ended, state=PendingState.SENDING, etag='W/"as-it-was-when-sent"')
    await rig.ledger.finish(late, ChunkResult.SUCCEEDED, 200, None)

    outcome = await rig.intake.submit(submission(commented))

    assert isinstance(outcome, Replayed) and outcome.answer.status == 200
    assert json.loads(outcome.answer.body)["status"] == "Succeeded"
    record = await rig.keys.get(rig.keys.key(KeyKind.EXPLICIT, "key-1"))
    assert record is not None and record.response is not None and record.response.status == 200
    assert len(rig.calls) == 1


async def test_a_replayed_504_of_a_purged_operation_stands(clock: ManualClock) -> None:
    rig = build(clock, script=[unknown()])
    commented = BatchUpdate((ID1,), AlertUpdate(status="Resolved", comment="closed by the SOC"))
    first = await rig.intake.submit(submission(commented))
    assert isinstance(first, Accepted) and first.answer.status == 504
    assert isinstance(await rig.intake.submit(submission(commented)), Replayed)
    assert await rig.operations.inner.delete("ledger", f"o-{first.operation_id}")

    outcome = await rig.intake.submit(submission(commented))

    assert isinstance(outcome, Replayed) and (outcome.answer.status, outcome.answer.body) == (
        504,
        first.answer.body,
    )
    assert len(rig.calls) == 1
