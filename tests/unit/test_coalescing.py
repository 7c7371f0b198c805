"""Coalescing and the PATCH channel (docs/contracts.md §7), over the real ledger and budgets on in-memory
tables, with MDE scripted (tests/unit/upstream_fakes.py).

The rules under test: a batchUpdate call carries the chunk whose turn it is plus every sendable chunk
with an identical update on other alerts, oldest first; members are disjoint, identical and never ahead
of an earlier update of their alerts; one caller's refused alert fails only that caller; a chunk goes by
PATCH, split into one-alert pieces, only when no identical update waits and each piece's slot comes
before batchUpdate's; a 429 blocks only its own channel; a crash between marking and recording leaves
every member to the outcome-unknown rule.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from shared.channels.base import CallResult
from shared.coalescing import PendingView
from shared.errors import StorageUnavailable
from shared.ledger import Chunk, ChunkResult, PendingState
from shared.ratelimit import Grant
from shared.sender import (
    COALESCE_MARK_LEAD_SECONDS,
    RIDE_SLACK_SECONDS,
    TRADE_LEAD_SECONDS,
    Attempt,
    AttemptKind,
)
from tests.unit.upstream_fakes import OK, START, ManualClock, Rig, answer, build, too_large, unknown

CLOSE = {"status": "Resolved", "classification": "FalsePositive", "comment": "closed by script"}
OTHER = {"status": "Resolved", "classification": "FalsePositive", "comment": "another comment"}
PATCH_ON = {"DEFENDER_RATE_LIMITS": "1/10", "DEFENDER_PATCH_RATE_LIMITS": "10/10"}


def alert(n: int) -> str:
    return f"da6373997940502735{n:02d}_76070737{n:02d}"


async def spend_batch_budget(rig: Rig) -> None:
    assert isinstance(await rig.limiter.acquire(0.0), Grant)


WAIT = 20.0  # long enough for the next slot of a 1/10 budget: a reserved slot, so calls coalesce


async def scarce(clock: ManualClock) -> Rig:
    """One batchUpdate call per 10 s, just spent: every try reserves a slot ahead, where a call gathers
    the waiting identical updates (a grant of now goes alone: docs/contracts.md §7)."""
    rig = build(clock, env={"DEFENDER_RATE_LIMITS": "1/10"})
    await spend_batch_budget(rig)
    return rig


async def one_each(rig: Rig, *numbers: int, fields: dict[str, str] = CLOSE) -> list[Chunk]:
    """One accepted request per alert number, each one chunk, in this order."""
    return [(await rig.accept(alert(n), fields=fields))[0] for n in numbers]


async def stored(rig: Rig, chunk: Chunk) -> Chunk:
    """The chunk as recorded now: its result if it was moved there, else its pending entry."""
    return await rig.finished(chunk) or await rig.stored(chunk)


# --- who rides a call (pure rules over one read) -------------------------------------------------------


def entry(seq: int, *ids: int, fields: dict[str, str] = CLOSE, **changes: object) -> Chunk:
    chunk = Chunk(f"{seq:012d}", f"op{seq}", tuple(alert(n) for n in ids), dict(fields), START)
    for name, value in changes.items():
        setattr(chunk, name, value)
    return chunk


def test_members_are_identical_disjoint_sendable_and_the_lead_s_own_group_first() -> None:
    lead = entry(5, 5)
    view = PendingView(
        [
            entry(1, 1),  # identical, older: rides, after the later ones
            entry(2, 2, fields=OTHER),  # another update: not a member
            entry(3, 3, state=PendingState.SENDING),  # in flight elsewhere
            entry(4, 4, not_before=START + 5),  # in its back-off
            lead,
            entry(6, 1),  # behind the pending update of alert 1 (seq 1)
            entry(7, 7, solo=True),  # kept apart after a refused call
            entry(8, 8, 9),  # identical, two alerts: rides
        ],
        now=START,
    )

    members = view.members_for(lead, limit=500)

    assert [m.chunk_id for m in members] == [f"{8:012d}", f"{1:012d}"]
    ids = [a for c in [lead, *members] for a in c.alert_ids]
    assert len(ids) == len(set(ids))  # disjoint


def test_calls_of_one_update_form_in_groups_that_two_leaders_gather_apart() -> None:
    chunks = [entry(n, n) for n in range(1, 6)]
    view = PendingView(chunks, now=START)

    # calls of at most two members: 1 leads 1-2, 3 leads 3-4, 5 leads 5
    assert [view.carried_by(c, 500, 2) for c in chunks] == [None, chunks[0], None, chunks[2], None]
    assert view.members_for(chunks[2], 500, 2) == [chunks[3]]  # its own group, not the older 1 and 2
    assert view.members_for(chunks[0], 500, 2) == [chunks[1]]
    assert view.members_for(chunks[4], 500, 3) == [chunks[0], chunks[1]]  # nothing later: the oldest


def test_members_stop_at_the_batch_limit_and_the_member_cap() -> None:
    lead = entry(1, 1)
    view = PendingView([lead, *(entry(n, n) for n in range(2, 12))], now=START)

    assert len(view.members_for(lead, limit=4)) == 3  # 4 ids in all
    assert len(view.members_for(lead, limit=500, max_members=5)) == 4  # 5 chunks in all
    assert view.members_for(entry(1, 1, solo=True), limit=500) == []


def test_a_chunk_has_a_peer_only_if_an_identical_update_is_sendable() -> None:
    mine = entry(3, 3)
    assert PendingView([entry(1, 1), mine], now=START).has_peer(mine)
    assert not PendingView([entry(1, 1, fields=OTHER), mine], now=START).has_peer(mine)
    assert not PendingView([entry(1, 1, state=PendingState.SENDING), mine], now=START).has_peer(mine)
    assert not PendingView([mine], now=START).has_peer(mine)


# --- coalesced calls -------------------------------------------------------------------------------------


async def test_one_call_carries_every_identical_waiting_update_and_records_them_together(
    clock: ManualClock,
) -> None:
    rig = build(clock, env={"DEFENDER_RATE_LIMITS": "1/10"})
    await spend_batch_budget(rig)
    first, second, other, third = (
        *(await one_each(rig, 1, 2)),
        *(await one_each(rig, 3, fields=OTHER)),
        *(await one_each(rig, 4)),
    )

    riding = await rig.sender.attempt(second, max_wait=20.0)
    attempt = await rig.sender.attempt(first, max_wait=20.0)

    # the younger one reserved nothing: the oldest's call carries it
    assert riding.kind is AttemptKind.DEFERRED and riding.expected_in == pytest.approx(10.0)
    assert attempt.kind is AttemptKind.FINISHED and attempt.chunk.state == ChunkResult.SUCCEEDED
    [call] = rig.calls
    assert call.alert_ids == (alert(1), alert(2), alert(4))  # the oldest leads, the others in order
    assert call.fields == CLOSE and call.at == pytest.approx(START + 10, abs=0.01)
    ends = [await stored(rig, c) for c in (first, second, third)]
    assert {(e.state, e.answer_status, e.attempts) for e in ends} == {(ChunkResult.SUCCEEDED, 200, 1)}
    assert len({e.call_id for e in ends}) == 1 and ends[0].channel == "fake"
    waiting = await rig.pending(other)
    assert waiting is not None and waiting.state == PendingState.PENDING and waiting.attempts == 0
    assert await rig.budget_log() == [START + 10]  # one call spent for three requests


async def test_an_earlier_update_of_an_alert_keeps_a_later_one_out_of_the_call(clock: ManualClock) -> None:
    rig = await scarce(clock)
    [earlier] = await one_each(rig, 1, fields=OTHER)
    later, lead = await one_each(rig, 1, 2)

    await rig.sender.attempt(lead, max_wait=WAIT)

    assert [c.alert_ids for c in rig.calls] == [(alert(2),)]
    assert (await stored(rig, later)).state == PendingState.PENDING
    assert (await stored(rig, earlier)).state == PendingState.PENDING


async def test_members_are_gathered_again_when_another_call_took_one_first(clock: ManualClock) -> None:
    rig = await scarce(clock)
    lead, taken, other = await one_each(rig, 1, 2, 3)

    async def another_call_takes_a_member() -> None:
        current = await rig.pending(taken)
        assert current is not None
        await rig.ledger.update_pending(current, state=PendingState.SENDING, sending_since=clock())

    rig.operations.before("transact", another_call_takes_a_member)

    attempt = await rig.sender.attempt(lead, max_wait=WAIT)

    assert attempt.chunk.state == ChunkResult.SUCCEEDED
    assert [c.alert_ids for c in rig.calls] == [(alert(1), alert(3))]  # the one left waiting, again
    assert (await stored(rig, taken)).state == PendingState.SENDING  # left to the call that took it
    assert (await stored(rig, other)).state == ChunkResult.SUCCEEDED


async def test_a_chunk_taken_into_another_s_call_gives_its_grant_back(clock: ManualClock) -> None:
    rig = await scarce(clock)
    lead, member = await one_each(rig, 1, 2)

    async def another_call_takes_the_lead() -> None:
        current = await rig.pending(lead)
        assert current is not None
        await rig.ledger.update_pending(current, state=PendingState.SENDING, sending_since=clock())

    rig.operations.before("transact", another_call_takes_the_lead)

    attempt = await rig.sender.attempt(lead, max_wait=WAIT)

    assert attempt.kind is AttemptKind.LOST and rig.calls == []
    assert START + 10 not in await rig.budget_log()  # the reserved slot went back to the budget
    assert (await stored(rig, member)).state == PendingState.PENDING


async def test_a_grant_of_now_goes_alone_when_nothing_identical_waits(clock: ManualClock) -> None:
    rig = build(clock)
    [lead] = await one_each(rig, 1)
    await one_each(rig, 3, fields=OTHER)

    await rig.sender.attempt(lead, max_wait=0.0)

    assert [(c.alert_ids, c.at) for c in rig.calls] == [((alert(1),), START)]


async def test_a_grant_of_now_is_traded_for_a_slot_that_carries_the_waiting(clock: ManualClock) -> None:
    rig = build(clock)
    lead, waiting = await one_each(rig, 1, 2)

    await rig.sender.attempt(lead, max_wait=1.0)

    [call] = rig.calls
    assert call.alert_ids == (alert(1), alert(2)) and call.at >= START + TRADE_LEAD_SECONDS
    assert (await stored(rig, waiting)).state == ChunkResult.SUCCEEDED


async def test_a_404_naming_one_alert_fails_only_its_request(clock: ManualClock) -> None:
    rig = await scarce(clock)
    lead, refused, other = await one_each(rig, 1, 2, 3)
    rig.channel.then(answer(404, "NotFound", f"Alert(s) not found: {alert(2)}. Nothing was updated."))

    attempt = await rig.sender.attempt(lead, max_wait=WAIT)

    assert rig.calls[0].alert_ids == (alert(1), alert(2), alert(3))
    failed = await stored(rig, refused)
    assert (failed.state, failed.answer_status) == (ChunkResult.FAILED, 422)
    assert failed.last_error is not None and failed.last_error["code"] == "NotFound"
    assert attempt.kind is AttemptKind.DEFERRED and attempt.delay == 0.0
    for chunk in (lead, other):
        again = await stored(rig, chunk)
        assert (again.state, again.attempts, again.solo) == (PendingState.PENDING, 1, False)
    queued = {sent.chunk_id for sent in rig.queues.chunks}
    assert other.chunk_id in queued  # its next try is queued; the lead's is its caller's to queue

    retry = await rig.pending(lead)
    assert retry is not None
    done = await rig.sender.attempt(retry, max_wait=WAIT)

    assert done.chunk.state == ChunkResult.SUCCEEDED
    assert rig.calls[1].alert_ids == (alert(1), alert(3))  # the two others together, once more
    applied = [a for call in rig.calls[1:] for a in call.alert_ids]
    assert sorted(applied) == [alert(1), alert(3)]


async def test_a_404_naming_no_alert_sends_every_member_apart(clock: ManualClock) -> None:
    rig = await scarce(clock)
    lead, member = await one_each(rig, 1, 2)
    rig.channel.then(answer(404, "NotFound", "Not found."), OK, answer(404, "NotFound", "Not found."))

    await rig.sender.attempt(lead, max_wait=WAIT)
    for chunk in (lead, member):
        assert (await stored(rig, chunk)).solo is True
    for chunk in (lead, member):
        current = await rig.pending(chunk)
        assert current is not None
        await rig.sender.attempt(current, max_wait=WAIT)

    assert [c.alert_ids for c in rig.calls] == [(alert(1), alert(2)), (alert(1),), (alert(2),)]
    assert (await stored(rig, lead)).state == ChunkResult.SUCCEEDED
    lost = await stored(rig, member)
    assert (lost.state, lost.answer_status) == (ChunkResult.FAILED, 422)


async def test_a_400_that_names_no_alert_is_a_verdict_on_every_member(clock: ManualClock) -> None:
    rig = await scarce(clock)
    lead, member = await one_each(rig, 1, 2)
    rig.channel.then(answer(400, "InvalidInput", "Invalid value 'Clean' for 'determination'."))

    await rig.sender.attempt(lead, max_wait=WAIT)

    for chunk in (lead, member):
        end = await stored(rig, chunk)
        assert (end.state, end.answer_status) == (ChunkResult.FAILED, 422)
    assert len(rig.calls) == 1


async def test_a_429_puts_every_member_back_with_back_off_and_blocks_the_channel_once(
    clock: ManualClock,
) -> None:
    rig = await scarce(clock)
    lead, member = await one_each(rig, 1, 2)
    rig.channel.then(answer(429, "TooManyRequests", retry_after=7))

    attempt = await rig.sender.attempt(lead, max_wait=WAIT)

    assert attempt.kind is AttemptKind.DEFERRED and attempt.delay >= 7
    for chunk in (lead, member):
        back = await stored(rig, chunk)
        assert (back.state, back.attempts) == (PendingState.PENDING, 1)  # the attempt counted once
        assert back.not_before >= START + 7
    assert rig.blocked_until() == pytest.approx(START + 7)
    assert member.chunk_id in {sent.chunk_id for sent in rig.queues.chunks}


async def test_maximum_batch_size_exceeded_learns_the_limit_and_re_forms_the_calls(
    clock: ManualClock,
) -> None:
    rig = await scarce(clock)
    lead, member, third = await one_each(rig, 1, 2, 3)
    rig.channel.then(too_large(2))

    attempt = await rig.sender.attempt(lead, max_wait=WAIT)
    assert attempt.kind is AttemptKind.DEFERRED
    assert await rig.batch_limit.refresh() == 2
    for chunk in (lead, member, third):
        assert (await stored(rig, chunk)).attempts == 1  # no verdict, but MDE got the call: counted

    again = await rig.pending(lead)
    assert again is not None
    await rig.sender.attempt(again, max_wait=WAIT)
    assert rig.calls[1].alert_ids == (alert(1), alert(2))


async def test_no_answer_ends_each_member_by_the_outcome_unknown_rule(clock: ManualClock) -> None:
    rig = await scarce(clock)
    [with_comment] = await one_each(rig, 1)
    [without] = await one_each(rig, 2, fields={"status": "Resolved"})
    [also_with] = await one_each(rig, 3)
    rig.channel.then(unknown())

    attempt = await rig.sender.attempt(with_comment, max_wait=WAIT)

    assert rig.calls[0].alert_ids == (alert(1), alert(3))  # identical updates only
    assert attempt.chunk.state == ChunkResult.OUTCOME_UNKNOWN
    unknown_end = await stored(rig, also_with)
    assert (unknown_end.state, unknown_end.answer_status) == (ChunkResult.OUTCOME_UNKNOWN, 504)
    assert (await stored(rig, without)).state == PendingState.PENDING  # never in that call


class Crash(BaseException):
    """The process dies between marking the members Sending and recording MDE's answer."""


async def test_a_crash_between_marking_and_recording_leaves_every_member_to_the_sweep(
    clock: ManualClock,
) -> None:
    rig = await scarce(clock)
    lead, member = await one_each(rig, 1, 2)
    [plain] = await one_each(rig, 3, fields={"status": "Resolved"})
    [plain_member] = await one_each(rig, 4, fields={"status": "Resolved"})

    def crash() -> CallResult:
        raise Crash

    rig.channel.then(crash, crash)
    for chunk in (lead, plain):
        with pytest.raises(Crash):
            await rig.sender.attempt(chunk, max_wait=WAIT)
    marks = [await stored(rig, c) for c in (lead, member, plain, plain_member)]
    assert {m.state for m in marks} == {PendingState.SENDING}
    clock.advance(rig.sender.sending_lease + 1)

    assert (await rig.worker.sweep())["staleSends"] == 4

    for chunk in (lead, member):  # with a comment: never re-sent
        end = await stored(rig, chunk)
        assert (end.state, end.answer_status) == (ChunkResult.OUTCOME_UNKNOWN, 504)
    for chunk in (plain, plain_member):  # without: retried like a 5xx
        back = await stored(rig, chunk)
        assert back.state == PendingState.PENDING and back.last_error is not None
    assert len(rig.calls) == 2


# --- the PATCH channel ------------------------------------------------------------------------------------


async def test_a_chunk_goes_by_patch_as_one_alert_pieces_when_batch_update_is_spent(
    clock: ManualClock,
) -> None:
    rig = build(clock, env=PATCH_ON)
    assert rig.patch is not None
    await spend_batch_budget(rig)
    [chunk] = await rig.accept(alert(1), alert(2), fields=CLOSE)

    attempt = await rig.sender.attempt(chunk, max_wait=20.0)

    assert attempt.kind is AttemptKind.PIECES
    assert [p.state for p in attempt.pieces] == [ChunkResult.SUCCEEDED] * 2
    assert [c.alert_ids for c in rig.patch.calls] == [(alert(1),), (alert(2),)]
    assert rig.calls == []  # no batchUpdate call
    assert [p.chunk_id for p in attempt.pieces] == [f"{chunk.chunk_id}-000", f"{chunk.chunk_id}-001"]
    assert {p.channel for p in attempt.pieces} == {"patch"}
    assert len({p.call_id for p in attempt.pieces}) == 2  # a call each
    assert await rig.budget_log("patch-calls") == [START, START]
    assert await rig.budget_log() == [START]  # batchUpdate's budget untouched


async def test_an_identical_waiting_update_keeps_a_chunk_on_batch_update(clock: ManualClock) -> None:
    rig = build(clock, env=PATCH_ON)
    assert rig.patch is not None
    await spend_batch_budget(rig)
    _, second = await one_each(rig, 1, 2)

    attempt = await rig.sender.attempt(second, max_wait=20.0)

    assert rig.patch.calls == [] and rig.calls == []
    assert attempt.kind is AttemptKind.DEFERRED  # it waits for the older one's call
    assert await rig.budget_log("patch-calls") == [] and await rig.budget_log() == [START]


async def test_patch_is_not_taken_unless_every_piece_comes_before_batch_update_s_slot(
    clock: ManualClock,
) -> None:
    rig = build(clock, env={"DEFENDER_RATE_LIMITS": "1/10", "DEFENDER_PATCH_RATE_LIMITS": "1/30"})
    assert rig.patch is not None
    await spend_batch_budget(rig)
    assert isinstance(await rig.patch.limiter.acquire(0.0), Grant)  # PATCH next free at START + 30
    [chunk] = await one_each(rig, 1)

    attempt = await rig.sender.attempt(chunk, max_wait=40.0)

    assert rig.patch.calls == [] and [round(c.at, 1) for c in rig.calls] == [START + 10]
    assert attempt.chunk.state == ChunkResult.SUCCEEDED


async def test_a_chunk_over_patch_max_alerts_stays_on_batch_update(clock: ManualClock) -> None:
    rig = build(clock, env={**PATCH_ON, "PATCH_MAX_ALERTS": "2"})
    assert rig.patch is not None
    await spend_batch_budget(rig)
    [chunk] = await rig.accept(alert(1), alert(2), alert(3), fields=CLOSE)

    await rig.sender.attempt(chunk, max_wait=20.0)

    assert rig.patch.calls == [] and len(rig.calls) == 1


async def test_a_429_on_patch_blocks_only_patch(clock: ManualClock) -> None:
    rig = build(clock, env=PATCH_ON)
    assert rig.patch is not None
    await spend_batch_budget(rig)
    [chunk] = await one_each(rig, 1)
    rig.patch.then(answer(429, "TooManyRequests", retry_after=5))

    attempt = await rig.sender.attempt(chunk, max_wait=0.0)

    assert attempt.kind is AttemptKind.DEFERRED
    assert rig.blocked_until("patch-calls") == pytest.approx(START + 5)
    assert rig.blocked_until() == 0.0


async def test_order_spans_both_channels(clock: ManualClock) -> None:
    rig = build(clock, env=PATCH_ON)
    assert rig.patch is not None
    await spend_batch_budget(rig)
    [by_patch] = await one_each(rig, 1, fields=OTHER)
    [later] = await one_each(rig, 1)
    rig.patch.then(answer(503, "ServiceUnavailable"))

    sent = await rig.sender.attempt(by_patch, max_wait=0.0)
    assert sent.kind is AttemptKind.DEFERRED and [c.alert_ids for c in rig.patch.calls] == [(alert(1),)]

    waits = await rig.sender.attempt(later, max_wait=20.0)

    assert waits.kind is AttemptKind.DEFERRED  # behind the pending PATCH update of alert 1
    assert rig.calls == [] and len(rig.patch.calls) == 1


async def test_a_chunk_as_dear_on_patch_as_a_batch_update_call_stays_on_batch_update(
    clock: ManualClock,
) -> None:
    # PATCH sustains 2 calls for every batchUpdate call (2/10 against 1/10): 2 alerts is a tie
    rig = build(clock, env={"DEFENDER_RATE_LIMITS": "1/10", "DEFENDER_PATCH_RATE_LIMITS": "2/10"})
    assert rig.patch is not None and rig.sender.patch_exchange_rate == 2
    await spend_batch_budget(rig)
    [pair] = await rig.accept(alert(1), alert(2), fields=OTHER)
    [single] = await one_each(rig, 3)

    await rig.sender.attempt(pair, max_wait=0.0)
    await rig.sender.attempt(single, max_wait=0.0)

    assert [c.alert_ids for c in rig.patch.calls] == [(alert(3),)]
    assert (await stored(rig, pair)).state == PendingState.PENDING  # waits for batchUpdate's slot


async def test_updates_arriving_while_a_call_waits_for_its_slot_join_it(clock: ManualClock) -> None:
    rig = await scarce(clock)
    lead, member = await one_each(rig, 1, 2)
    arrived: list[Chunk] = []

    async def another_request_arrives() -> None:
        arrived.extend(await one_each(rig, 3))

    # queries: the order check, the gathering half a second before the slot, then the top-up
    rig.operations.before("query", another_request_arrives, skip=2)

    attempt = await rig.sender.attempt(lead, max_wait=WAIT)

    assert attempt.chunk.state == ChunkResult.SUCCEEDED
    assert [c.alert_ids for c in rig.calls] == [(alert(1), alert(2), alert(3))]
    ends = [await stored(rig, c) for c in (lead, member, *arrived)]
    assert {e.state for e in ends} == {ChunkResult.SUCCEEDED} and len({e.call_id for e in ends}) == 1


# --- which channel when both could take a chunk now (docs/contracts.md §7, "Choices") ---------------------


async def test_with_both_channels_free_a_small_update_nothing_shares_goes_by_patch(
    clock: ManualClock,
) -> None:
    rig = build(clock, env=PATCH_ON)
    assert rig.patch is not None and rig.sender.patch_exchange_rate == 10
    [chunk] = await rig.accept(alert(1), alert(2), fields=OTHER)

    attempt = await rig.sender.attempt(chunk, max_wait=0.0)

    assert attempt.kind is AttemptKind.PIECES and rig.calls == []
    assert [c.alert_ids for c in rig.patch.calls] == [(alert(1),), (alert(2),)]
    assert [(p.state, p.attempts, p.channel) for p in attempt.pieces] == [
        (ChunkResult.SUCCEEDED, 1, "patch")
    ] * 2
    assert await rig.budget_log() == []  # the batchUpdate grant asked for first went back
    assert await rig.budget_log("patch-calls") == [START, START]


async def test_with_both_channels_free_an_update_identical_to_a_pending_one_takes_batch_update(
    clock: ManualClock,
) -> None:
    rig = build(clock, env=PATCH_ON)
    assert rig.patch is not None
    first, _ = await one_each(rig, 1, 2)

    await rig.sender.attempt(first, max_wait=WAIT)

    assert rig.patch.calls == []  # a stream of one update: batchUpdate carries them together
    assert [c.alert_ids for c in rig.calls] == [(alert(1), alert(2))]


async def test_with_both_channels_free_a_chunk_at_the_exchange_rate_takes_batch_update(
    clock: ManualClock,
) -> None:
    rig = build(clock, env={"DEFENDER_RATE_LIMITS": "1/10", "DEFENDER_PATCH_RATE_LIMITS": "2/10"})
    assert rig.patch is not None and rig.sender.patch_exchange_rate == 2
    [pair] = await rig.accept(alert(1), alert(2), fields=OTHER)

    await rig.sender.attempt(pair, max_wait=0.0)

    assert rig.patch.calls == [] and [c.alert_ids for c in rig.calls] == [(alert(1), alert(2))]


async def test_with_patch_spent_a_small_update_takes_batch_update_s_free_budget(clock: ManualClock) -> None:
    rig = build(clock, env={"DEFENDER_RATE_LIMITS": "1/10", "DEFENDER_PATCH_RATE_LIMITS": "1/10"})
    assert rig.patch is not None
    assert isinstance(await rig.patch.limiter.acquire(0.0), Grant)
    [chunk] = await one_each(rig, 1, fields=OTHER)

    attempt = await rig.sender.attempt(chunk, max_wait=0.0)

    assert attempt.chunk.state == ChunkResult.SUCCEEDED
    assert rig.patch.calls == [] and [c.alert_ids for c in rig.calls] == [(alert(1),)]


async def test_a_one_alert_request_on_the_fast_path_asks_patch_beside_accepting(clock: ManualClock) -> None:
    rig = build(clock, env=PATCH_ON)
    assert rig.patch is not None
    await rig.accept(alert(9), fields=CLOSE)  # the accept counter is cached: the order can be read ahead
    view = await rig.ledger.look_ahead([alert(1)], OTHER)
    assert view is not None and not view.blocked and not view.identical
    [chunk] = await rig.accept(alert(1), fields=OTHER, view=view)
    held = await rig.sender.budget_now(1)

    attempt = await rig.sender.attempt(chunk, max_wait=0.0, held=held)

    assert attempt.kind is AttemptKind.FINISHED and attempt.chunk.state == ChunkResult.SUCCEEDED
    assert [c.alert_ids for c in rig.patch.calls] == [(alert(1),)] and rig.calls == []
    done = await stored(rig, chunk)
    assert (done.channel, done.attempts) == ("patch", 1) and done.call_id
    assert await rig.budget_log() == [] and await rig.budget_log("patch-calls") == [START]


async def test_the_read_ahead_sees_an_identical_pending_update(clock: ManualClock) -> None:
    rig = build(clock, env=PATCH_ON)
    await one_each(rig, 1)

    same = await rig.ledger.look_ahead([alert(2)], CLOSE)
    other = await rig.ledger.look_ahead([alert(2)], OTHER)

    assert same is not None and same.identical and not same.blocked
    assert other is not None and not other.identical


async def test_concurrent_tries_share_one_read_of_the_pending_entries(clock: ManualClock) -> None:
    import asyncio
    import time

    rig = build(clock)
    first, second = await one_each(rig, 1, 2)

    async def slow() -> None:  # the read is in flight while the other try asks
        for _ in range(5):
            await asyncio.sleep(0)

    rig.operations.before("query", slow)
    since = time.monotonic()
    before = rig.operations.counts["query"]
    ahead_of_first, ahead_of_second = await asyncio.gather(
        rig.ledger.view_ahead_of(first, since), rig.ledger.view_ahead_of(second, since)
    )

    assert rig.operations.counts["query"] - before == 1
    assert [e.chunk_id for e in ahead_of_first.entries] == [first.chunk_id]
    assert [e.chunk_id for e in ahead_of_second.entries] == [first.chunk_id, second.chunk_id]
    await rig.ledger.view_ahead_of(second)  # no `since`: a read of its own
    assert rig.operations.counts["query"] - before == 2


# --- riding along a call this process gathers (shared.gathering) ------------------------------------------


async def test_an_identical_chunk_accepted_while_a_call_gathers_rides_it_without_a_try(
    clock: ManualClock,
) -> None:
    rig = await scarce(clock)
    [lead] = await one_each(rig, 1)
    rode: list[object] = []

    async def another_request_arrives() -> None:
        [rider] = await one_each(rig, 2)
        reads = rig.operations.counts["query"]
        riding = await rig.sender.attempt(rider, max_wait=0.5)
        rode.append(riding)
        rode.append(rig.operations.counts["query"] - reads)
        await rig.sender.follow_up(riding)  # as the intake or the worker does next

    rig.operations.before("query", another_request_arrives, skip=1)  # just before the call gathers

    attempt = await rig.sender.attempt(lead, max_wait=WAIT)

    riding, reads_of_its_own = rode
    assert isinstance(riding, type(attempt)) and riding.kind is AttemptKind.DEFERRED and riding.keep_message
    assert reads_of_its_own == 0  # no read of the backlog, no budget: the gathering call decides
    # its message as it is, due just after the call's slot: it comes back if the call leaves it out
    [sent] = rig.queues.chunks
    assert sent.chunk_id == riding.chunk.chunk_id and sent.token == riding.chunk.msg_token
    # the hook ran as the call began to gather, COALESCE_MARK_LEAD_SECONDS before its slot
    assert sent.delay == pytest.approx(COALESCE_MARK_LEAD_SECONDS + RIDE_SLACK_SECONDS, abs=0.05)
    assert attempt.chunk.state == ChunkResult.SUCCEEDED
    assert [c.alert_ids for c in rig.calls] == [(alert(1), alert(2))]
    assert await rig.budget_log() == [START + 10]


async def test_a_rider_the_call_leaves_out_comes_back_by_its_own_message(clock: ManualClock) -> None:
    rig = await scarce(clock)
    await one_each(rig, 2, fields=OTHER)  # an earlier update of alert 2: a rider on it must wait
    [lead] = await one_each(rig, 1)
    riders: list[Chunk] = []

    async def a_request_on_alert_2_arrives() -> None:
        [rider] = await one_each(rig, 2)
        riders.append(rider)
        riding = await rig.sender.attempt(rider, max_wait=0.5)
        assert riding.keep_message
        await rig.sender.follow_up(riding)

    rig.operations.before("query", a_request_on_alert_2_arrives, skip=1)

    await rig.sender.attempt(lead, max_wait=WAIT)

    [rider] = riders
    assert [c.alert_ids for c in rig.calls] == [(alert(1),)]  # per-alert order kept it out
    [sent] = rig.queues.chunks
    assert (sent.chunk_id, sent.token) == (rider.chunk_id, rider.msg_token)
    assert (await stored(rig, rider)).state == PendingState.PENDING
    assert not rig.sender.gathering.is_open(CLOSE, clock())  # the lead's try ended: the next one leads


async def test_a_request_just_accepted_rides_without_a_message_and_the_call_carries_it(
    clock: ManualClock,
) -> None:
    """The synchronous path's chunk (no message yet) rides with no message at all: the call's try is
    answerable for it (a crash leaves it to the sweep, due since it was accepted)."""
    rig = await scarce(clock)
    [lead] = await one_each(rig, 1)
    rode: list[Attempt] = []

    async def another_request_arrives() -> None:
        [rider] = await one_each(rig, 2)
        riding = await rig.sender.attempt(rider, max_wait=0.5, queued=False)
        rode.append(riding)
        await rig.sender.follow_up(riding)

    rig.operations.before("query", another_request_arrives, skip=1)

    await rig.sender.attempt(lead, max_wait=WAIT)
    await rig.sender.stop_drivers(grace=1.0)

    [riding] = rode
    assert riding.kind is AttemptKind.DEFERRED and riding.handed_over
    assert rig.queues.chunks == []  # no message: none sent, none needed
    assert [c.alert_ids for c in rig.calls] == [(alert(1), alert(2))]
    assert (await stored(rig, riding.chunk)).state == ChunkResult.SUCCEEDED


async def test_a_rider_without_a_message_left_out_by_the_order_gets_one_from_its_own_try(
    clock: ManualClock,
) -> None:
    """Left out of a call that ended its lead, the rider's own try follows at once (the oldest of those
    left out leads, `Sender._drive`): it reads the order, finds an earlier update of its alert still
    pending, and is queued to look again, with a message of its own."""
    rig = await scarce(clock)
    await one_each(rig, 2, fields=OTHER)  # an earlier update of alert 2
    [lead] = await one_each(rig, 1)
    riders: list[Chunk] = []

    async def a_request_on_alert_2_arrives() -> None:
        [rider] = await one_each(rig, 2)
        riders.append(rider)
        await rig.sender.follow_up(await rig.sender.attempt(rider, max_wait=0.5, queued=False))

    rig.operations.before("query", a_request_on_alert_2_arrives, skip=1)

    await rig.sender.attempt(lead, max_wait=WAIT)
    await rig.sender.stop_drivers(grace=1.0)

    [rider] = riders
    assert [c.alert_ids for c in rig.calls] == [(alert(1),)]
    now = await stored(rig, rider)
    assert now.state == PendingState.PENDING
    [sent] = rig.queues.chunks
    assert (sent.chunk_id, sent.token) == (rider.chunk_id, now.msg_token)


async def two_slots(clock: ManualClock) -> Rig:
    """Two batchUpdate calls per 10 s, both just spent: two slots at START + 10, the lead's call and
    the next."""
    rig = build(clock, env={"DEFENDER_RATE_LIMITS": "2/10"})
    await spend_batch_budget(rig)
    await spend_batch_budget(rig)
    return rig


def riders_arrive_as_the_call_is_recorded(
    rig: Rig, *numbers: int, then: Callable[[], None] | None = None
) -> list[Chunk]:
    """Requests on these alerts, each accepted just now (no message) and tried, arrive while the lead's
    call is being recorded: its gathering is over, so they are left out, though the call still takes
    riders. Returns the list they are put in as they arrive; `then` runs once they all have."""
    riders: list[Chunk] = []

    async def arrive() -> None:
        if riders:
            return
        for rider in await one_each(rig, *numbers):
            riders.append(rider)
            await rig.sender.follow_up(await rig.sender.attempt(rider, max_wait=0.5, queued=False))
        if then is not None:
            then()

    def the_call_is_made() -> CallResult:
        for write in ("replace", "transact"):  # whichever records the call
            rig.operations.before(write, arrive)
        return OK

    rig.channel.then(the_call_is_made)
    return riders


async def test_a_rider_without_a_message_that_came_after_the_call_s_last_read_goes_with_the_next_call(
    clock: ManualClock,
) -> None:
    rig = await two_slots(clock)
    [lead] = await one_each(rig, 1)
    riders = riders_arrive_as_the_call_is_recorded(rig, 2)

    await rig.sender.attempt(lead, max_wait=WAIT)
    await rig.sender.stop_drivers(grace=30.0)

    [rider] = riders
    assert [c.alert_ids for c in rig.calls] == [(alert(1),), (alert(2),)]
    assert (await stored(rig, rider)).state == ChunkResult.SUCCEEDED
    assert rig.queues.chunks == []


async def test_the_next_call_takes_riders_from_the_moment_the_last_one_ends(clock: ManualClock) -> None:
    """Riders a finished call left out go with the next call, and that call takes riders at once: a
    request accepted before the driver's try has read anything rides it, instead of leading a call of
    its own (a read of the backlog and budget asked for, per request, in a burst)."""
    rig = await two_slots(clock)
    [lead] = await one_each(rig, 1)
    riders = riders_arrive_as_the_call_is_recorded(rig, 2)

    await rig.sender.attempt(lead, max_wait=WAIT)

    [rider] = riders
    call = rig.sender.gathering.call_of(CLOSE, clock())
    assert call is not None and call.lead == rider.chunk_id  # open before the driver's try ran at all
    [newcomer] = await one_each(rig, 3)
    reads = rig.operations.counts["query"]
    riding = await rig.sender.attempt(newcomer, max_wait=0.5, queued=False)
    assert riding.kind is AttemptKind.DEFERRED and riding.handed_over
    assert rig.operations.counts["query"] == reads  # no read of its own
    await rig.sender.follow_up(riding)
    await rig.sender.stop_drivers(grace=30.0)

    assert [c.alert_ids for c in rig.calls] == [(alert(1),), (alert(2), alert(3))]
    assert (await stored(rig, newcomer)).state == ChunkResult.SUCCEEDED
    assert rig.queues.chunks == []


async def test_riders_left_out_still_go_when_the_batch_limit_cannot_be_read_as_the_call_ends(
    clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Opening the next call early needs the batch limit; storage failing then must not fail the try that
    just ended its lead, nor strand its riders: the driver's call opens when it leads, as any other."""
    rig = await two_slots(clock)
    [lead] = await one_each(rig, 1)
    real = rig.channel.max_alerts

    async def unreadable_once() -> int:
        monkeypatch.setattr(rig.channel, "max_alerts", real)
        raise StorageUnavailable("the budget table did not answer")

    riders = riders_arrive_as_the_call_is_recorded(
        rig, 2, then=lambda: monkeypatch.setattr(rig.channel, "max_alerts", unreadable_once)
    )

    ended = await rig.sender.attempt(lead, max_wait=WAIT)

    assert ended.kind is AttemptKind.FINISHED
    assert rig.channel.max_alerts == real  # the failing read was the one made as the call ended
    assert not rig.sender.gathering.is_open(CLOSE, clock())
    await rig.sender.stop_drivers(grace=30.0)
    [rider] = riders
    assert [c.alert_ids for c in rig.calls] == [(alert(1),), (alert(2),)]
    assert (await stored(rig, rider)).state == ChunkResult.SUCCEEDED


async def test_a_driver_keeps_a_grant_that_leaves_time_to_gather(clock: ManualClock) -> None:
    """The driver of riders left out asks for a slot far enough ahead to gather them, and keeps it:
    one budget write for its call, not a grant of now given back and a later slot asked for."""
    rig = build(clock, env={"DEFENDER_RATE_LIMITS": "5/10"})  # free: every try gets a grant at once
    [lead] = await one_each(rig, 1)
    riders = riders_arrive_as_the_call_is_recorded(rig, 2, 3)

    await rig.sender.attempt(lead, max_wait=WAIT)
    assert len(riders) == 2 and len(rig.calls) == 1
    writes = rig.budget.counts["replace"] + rig.budget.counts["insert"]
    await rig.sender.stop_drivers(grace=30.0)

    assert [c.alert_ids for c in rig.calls] == [(alert(1),), (alert(2), alert(3))]
    assert rig.budget.counts["replace"] + rig.budget.counts["insert"] - writes == 1
    assert rig.queues.chunks == []


async def test_a_call_marked_after_its_slot_takes_a_fresh_slot_and_keeps_its_members(
    clock: ManualClock,
) -> None:
    rig = build(clock, env={"DEFENDER_RATE_LIMITS": "1/10", "RATE_LIMIT_SAFETY_MARGIN_SECONDS": "1"})
    await spend_batch_budget(rig)  # the next slot is START + 11 (the window plus the margin)
    lead, member = await one_each(rig, 1, 2)

    async def marking_is_slow() -> None:
        clock.advance(2.0)  # a busy instance: the mark lands well after the slot

    rig.operations.before("transact", marking_is_slow)

    attempt = await rig.sender.attempt(lead, max_wait=WAIT)

    assert attempt.kind is AttemptKind.FINISHED
    [call] = rig.calls
    assert call.alert_ids == (alert(1), alert(2))
    assert call.at > START + 11 + 1  # not at the stale slot, whose grant was 1 s old and more
    assert await rig.budget_log() == [pytest.approx(call.at, abs=0.01)]  # the stale slot went back
    assert rig.queues.chunks == []  # the members kept their marks: none given back and queued again
    assert (await stored(rig, member)).state == ChunkResult.SUCCEEDED


async def test_tries_whose_read_started_before_them_share_the_next_read(clock: ManualClock) -> None:
    rig = build(clock)
    await one_each(rig, 1, 2, 3)
    gate = asyncio.Event()

    async def held() -> None:
        await gate.wait()

    rig.operations.before("query", held)
    first = asyncio.ensure_future(rig.ledger.view_ahead_of((await one_each(rig, 4))[0], time.monotonic()))
    await asyncio.sleep(0)
    later = [
        asyncio.ensure_future(rig.ledger.view_ahead_of(chunk, time.monotonic()))
        for chunk in await one_each(rig, 5, 6, 7)
    ]
    for _ in range(5):
        await asyncio.sleep(0)
    reads_while_held = rig.operations.counts["query"]
    gate.set()
    views = [await first, *[await view for view in later]]

    assert reads_while_held == 1  # the held read; the three later tries wait for the next one
    assert rig.operations.counts["query"] == 2  # one more read, shared by all three
    assert [len(v.entries) for v in views] == [4, 5, 6, 7]  # each sees everything accepted before it
