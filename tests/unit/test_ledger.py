"""The operations ledger (shared.ledger) over MemoryTable: accepting, the per-alert order, a chunk's end
(including a known outcome superseding OutcomeUnknown), settling, splitting and purging."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from shared.errors import AlreadyAccepted, StorageUnavailable
from shared.ledger import (
    COUNTER,
    MAX_ENTRIES_PER_ACCEPT,
    PARTITION,
    AcceptPlan,
    Chunk,
    ChunkResult,
    Ledger,
    Operation,
    PendingState,
    fingerprints,
    new_operation_id,
    seq_key,
)
from tests.fakes import MemoryTable
from tests.unit.upstream_fakes import TappedStore

RESOLVE = {"status": "Resolved"}
T0 = 1_700_000_000.0


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def plan(
    *chunks: tuple[str, ...], digest: str = "digest-A", operation_id: str = "", hold: float = 0.0
) -> AcceptPlan:
    return AcceptPlan(
        operation_id or new_operation_id(),
        "http",
        {"app": "tests"},
        [(ids, dict(RESOLVE)) for ids in chunks or (("a1",),)],
        digest,
        hold_seconds=hold,
    )


def rig() -> tuple[Ledger, MemoryTable, Clock]:
    table, clock = MemoryTable("alertgateOperations"), Clock()
    return Ledger(table, clock), table, clock


def entity(table: MemoryTable, rk: str) -> Any:
    found = table.peek(PARTITION, rk)
    assert found is not None, f"{rk} is missing"
    return found


def stored_chunk(table: MemoryTable, rk: str) -> Chunk:
    return Chunk.from_entity(entity(table, rk))


# --- accepting ------------------------------------------------------------------------------------------


async def test_accept_writes_counter_operation_journal_and_pending_chunks_at_once() -> None:
    ledger, table, clock = rig()
    request = plan(("a1", "a2"), ("a3",), hold=30.0)

    operation, chunks = await ledger.accept(request)

    assert (operation.first_seq, operation.last_seq, operation.alert_count) == (1, 2, 3)
    assert entity(table, COUNTER)["Next"] == 3
    assert Operation.from_entity(entity(table, f"o-{request.operation_id}")) == operation
    journal = entity(table, f"j-{seq_key(1)}")
    assert journal["Digest"] == "digest-A" and journal["OperationId"] == request.operation_id
    assert journal["Fingerprints"] == fingerprints(["a1", "a2", "a3"])
    assert [c.chunk_id for c in chunks] == [seq_key(1), seq_key(2)]
    for chunk in chunks:
        stored = stored_chunk(table, chunk.pending_key)
        assert stored.state == PendingState.PENDING and stored.attempts == 0
        assert stored.etag == chunk.etag
        assert stored.msg_due_at == clock.now + 30.0
    assert table.calls["transact"] == 1


async def test_accepts_are_numbered_in_order_from_the_cached_counter() -> None:
    ledger, table, _ = rig()
    await ledger.accept(plan(("a1",)))
    reads = table.calls["get"]

    operation, chunks = await ledger.accept(plan(("a2",), ("a3",)))

    assert (operation.first_seq, operation.last_seq) == (2, 3)
    assert table.calls["get"] == reads  # the counter was not read again
    assert entity(table, COUNTER)["Next"] == 4
    assert [c.seq for c in chunks] == [2, 3]


async def test_accept_refuses_no_chunks_or_too_many() -> None:
    ledger, _, _ = rig()
    with pytest.raises(ValueError):
        await ledger.accept(AcceptPlan("op", "http", {}, [], "d"))
    with pytest.raises(ValueError):
        await ledger.accept(plan(*[(f"a{n}",) for n in range(MAX_ENTRIES_PER_ACCEPT + 1)]))


async def test_a_request_is_accepted_at_most_once() -> None:
    ledger, table, _ = rig()
    request = plan(("a1",))
    await ledger.accept(request)
    other = Ledger(table, Clock())  # another instance, with its own cached counter

    with pytest.raises(AlreadyAccepted):
        await other.accept(request)
    with pytest.raises(AlreadyAccepted):
        await ledger.accept(request)
    assert entity(table, COUNTER)["Next"] == 2
    assert len(await ledger.all_pending()) == 1


async def test_a_counter_moved_by_another_instance_is_read_again() -> None:
    ledger, table, _ = rig()
    other = Ledger(table, Clock())
    await ledger.accept(plan(("a1",)))
    await other.accept(plan(("a2",)))

    operation, _ = await ledger.accept(plan(("a3",)))  # its cached counter is stale

    assert operation.first_seq == 3
    assert entity(table, COUNTER)["Next"] == 4


async def test_look_ahead_needs_a_cached_counter() -> None:
    ledger, _, _ = rig()
    assert await ledger.look_ahead(["a1"]) is None


async def test_look_ahead_sees_unfinished_pending_entries_only() -> None:
    ledger, _, _ = rig()
    await ledger.accept(plan(("a1", "a2")))
    _, (second,) = await ledger.accept(plan(("a3",)))

    blocked = await ledger.look_ahead(["a2", "a9"])
    clear = await ledger.look_ahead(["a9"])
    await ledger.finish(second, ChunkResult.SUCCEEDED, 200, None, in_place=True)
    after_finish = await ledger.look_ahead(["a3"])

    assert blocked is not None and blocked.blocked
    assert clear is not None and not clear.blocked
    assert clear.counter[0] == 3
    assert after_finish is not None and not after_finish.blocked  # ended in place: no longer in the order


async def test_a_clear_view_accepts_the_first_chunk_already_sending() -> None:
    ledger, table, clock = rig()
    await ledger.accept(plan(("a0",)))
    view = await ledger.look_ahead(["a1", "a2"])
    assert view is not None and not view.blocked

    _, chunks = await ledger.accept(plan(("a1",), ("a2",)), view)

    first, second = (stored_chunk(table, c.pending_key) for c in chunks)
    assert (first.state, first.attempts, first.sending_since) == (PendingState.SENDING, 1, clock.now)
    assert (second.state, second.attempts) == (PendingState.PENDING, 0)
    assert chunks[0].state == PendingState.SENDING


async def test_a_blocked_view_accepts_every_chunk_pending() -> None:
    ledger, table, _ = rig()
    await ledger.accept(plan(("a1",)))
    view = await ledger.look_ahead(["a1"])
    assert view is not None and view.blocked

    _, (chunk,) = await ledger.accept(plan(("a1",)), view)

    assert stored_chunk(table, chunk.pending_key).state == PendingState.PENDING


async def test_a_view_out_of_date_falls_back_to_an_ordinary_accept() -> None:
    ledger, table, _ = rig()
    await ledger.accept(plan(("a0",)))
    view = await ledger.look_ahead(["a1"])
    assert view is not None and not view.blocked
    _, (theirs,) = await Ledger(table, Clock()).accept(plan(("a1",)))  # accepted in between

    operation, (chunk,) = await ledger.accept(plan(("a1",)), view)

    assert operation.first_seq == theirs.seq + 1
    assert stored_chunk(table, chunk.pending_key).state == PendingState.PENDING
    assert chunk.state == PendingState.PENDING
    blocker = (await ledger.view_ahead_of(chunk)).blocker(chunk)
    assert blocker is not None and blocker.chunk_id == theirs.chunk_id


# --- accepts that arrive together (group commit) -------------------------------------------------------


def held_rig() -> tuple[Ledger, TappedStore, asyncio.Event]:
    """A ledger whose next transaction waits for the returned event: accepts made meanwhile queue up."""
    table = TappedStore(MemoryTable("alertgateOperations"))
    gate = asyncio.Event()
    table.before("transact", opened(gate))
    return Ledger(table, Clock()), table, gate


def opened(gate: asyncio.Event) -> Callable[[], Awaitable[None]]:
    """A hook that waits until `gate` is set."""

    async def wait() -> None:
        await gate.wait()

    return wait


async def settle_tasks() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_accepts_made_while_one_is_written_go_together_in_the_next_transaction() -> None:
    ledger, table, gate = held_rig()
    first = asyncio.ensure_future(ledger.accept(plan(("a0",))))
    await settle_tasks()  # its transaction is held; these five wait for it
    rest = [asyncio.ensure_future(ledger.accept(plan((f"a{n}",), (f"b{n}",)))) for n in range(1, 6)]
    await settle_tasks()
    gate.set()

    accepted = [await first, *[await task for task in rest]]

    assert table.counts["transact"] == 2  # one for the first, one for the five that waited
    seqs = [seq for operation, _ in accepted for seq in range(operation.first_seq, operation.last_seq + 1)]
    assert seqs == list(range(1, 12))  # numbered in the order they arrived, no gap
    for operation, chunks in accepted:
        assert [c.seq for c in chunks] == list(range(operation.first_seq, operation.last_seq + 1))
        for chunk in chunks:  # each chunk's ETag is the stored one
            assert entity(table.inner, chunk.pending_key).metadata["etag"] == chunk.etag
        assert entity(table.inner, f"o-{operation.operation_id}")["AlertCount"] == operation.alert_count
    assert entity(table.inner, COUNTER)["Next"] == 12
    _, (next_chunk,) = await ledger.accept(plan(("c1",)))
    assert next_chunk.seq == 12  # the cached counter is the group's


async def test_an_accept_tells_when_its_transaction_is_on_its_way_alone_or_in_a_group() -> None:
    """`writing` is set as the storage seam sends the transaction (not when the accept starts): the
    synchronous path's budget request waits for it, so that the two go side by side."""
    ledger, _, gate = held_rig()
    events = [asyncio.Event() for _ in range(3)]
    first = asyncio.ensure_future(ledger.accept(plan(("a0",)), writing=events[0]))
    await settle_tasks()
    assert not events[0].is_set()  # its transaction is held before the seam sends it
    rest = [asyncio.ensure_future(ledger.accept(plan((f"a{n}",)), writing=events[n])) for n in (1, 2)]
    await settle_tasks()
    assert not any(event.is_set() for event in events)
    gate.set()
    await asyncio.gather(first, *rest)
    assert all(event.is_set() for event in events)  # the first alone, the two others in one group


async def test_one_request_accepted_before_fails_alone_and_the_others_of_its_group_are_accepted() -> None:
    ledger, table, gate = held_rig()
    gate.set()
    again = plan(("a1",))
    await ledger.accept(again)
    gate.clear()
    table.before("transact", opened(gate))
    holder = asyncio.ensure_future(ledger.accept(plan(("a0",))))
    await settle_tasks()
    group = [asyncio.ensure_future(ledger.accept(p)) for p in (plan(("a2",)), again, plan(("a3",)))]
    await settle_tasks()
    gate.set()

    await holder
    results = await asyncio.gather(*group, return_exceptions=True)

    assert isinstance(results[1], AlreadyAccepted)
    (op_a, _), (op_b, _) = results[0], results[2]  # type: ignore[misc]
    assert (op_a.first_seq, op_b.first_seq) == (3, 4)  # the group failed as one; each went alone
    assert entity(table.inner, COUNTER)["Next"] == 5


async def test_in_a_group_only_a_view_of_this_counter_clear_of_earlier_members_starts_sending() -> None:
    ledger, table, gate = held_rig()
    gate.set()
    taken = plan(("a0",))
    await ledger.accept(taken)
    views = [await ledger.look_ahead(ids) for ids in (["a1"], ["a1", "a2"], ["a3"])]
    assert all(v is not None and not v.blocked for v in views)
    gate.clear()
    table.before("transact", opened(gate))
    # the held transaction fails (accepted before), so the counter the views were read against stays
    failing = asyncio.ensure_future(ledger.accept(taken))
    await settle_tasks()
    group = [
        asyncio.ensure_future(ledger.accept(plan(tuple(ids)), view))
        for ids, view in zip((["a1"], ["a1", "a2"], ["a3"]), views, strict=True)
    ]
    await settle_tasks()
    gate.set()

    with pytest.raises(AlreadyAccepted):
        await failing
    states = [chunks[0].state for _, chunks in await asyncio.gather(*group)]

    # the second shares a1 with the first of its group: it waits its turn
    assert states == [PendingState.SENDING, PendingState.PENDING, PendingState.SENDING]
    assert [
        stored_chunk(table.inner, c.pending_key).state for _, (c,) in await asyncio.gather(*group)
    ] == states


async def test_a_waiting_accept_cancelled_before_its_turn_writes_nothing() -> None:
    ledger, table, gate = held_rig()
    first = asyncio.ensure_future(ledger.accept(plan(("a0",))))
    await settle_tasks()
    cancelled_plan = plan(("a1",))
    waiting = asyncio.ensure_future(ledger.accept(cancelled_plan))
    await settle_tasks()
    waiting.cancel()
    await settle_tasks()
    gate.set()
    await first

    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert table.inner.peek(PARTITION, f"o-{cancelled_plan.operation_id}") is None
    assert entity(table.inner, COUNTER)["Next"] == 2


async def test_record_invalid_is_written_once() -> None:
    ledger, _, _ = rig()
    first = await ledger.record_invalid("op-1", "queue", {}, [{"field": "x", "message": "bad"}], 400)
    second = await ledger.record_invalid("op-1", "queue", {}, [], 422)

    assert second == first
    assert (first.invalid_status, first.last_seq < first.first_seq) == (400, True)
    assert await ledger.chunks_of(first) == []


# --- reading the order ------------------------------------------------------------------------------------


async def test_the_view_ahead_finds_the_first_earlier_chunk_sharing_an_alert() -> None:
    ledger, _, _ = rig()
    _, (one,) = await ledger.accept(plan(("a1", "a2")))
    _, (two,) = await ledger.accept(plan(("a3",)))
    _, (three,) = await ledger.accept(plan(("a2", "a3")))

    blocker = (await ledger.view_ahead_of(three)).blocker(three)

    assert blocker is not None and blocker.chunk_id == one.chunk_id
    assert blocker.operation_id == one.operation_id
    assert (await ledger.view_ahead_of(one)).blocker(one) is None
    assert (await ledger.view_ahead_of(two)).blocker(two) is None
    await ledger.finish(one, ChunkResult.SUCCEEDED, 200, None)
    blocker = (await ledger.view_ahead_of(three)).blocker(three)
    assert blocker is not None and blocker.chunk_id == two.chunk_id
    await ledger.finish(two, ChunkResult.FAILED, 422, {"code": "x"}, in_place=True)
    assert (await ledger.view_ahead_of(three)).blocker(three) is None


async def test_changed_since_sees_a_different_update_to_a_shared_alert() -> None:
    ledger, _, _ = rig()
    first, _ = await ledger.accept(plan(("a1", "a2"), digest="A"))
    await ledger.accept(plan(("a2",), digest="B"))
    await ledger.accept(plan(("a7",), digest="C"))

    assert await ledger.changed_since(first.first_seq, "A", ["a1", "a2"]) is True
    assert await ledger.changed_since(first.first_seq, "A", ["a1"]) is False  # B did not touch a1
    assert await ledger.changed_since(first.first_seq, "B", ["a2"]) is False  # the same update again
    assert await ledger.changed_since(first.first_seq + 1, "A", ["a2"]) is False  # nothing after B


async def test_chunks_of_reports_pending_and_finished_in_order() -> None:
    ledger, _, _ = rig()
    operation, (one, two, three) = await ledger.accept(plan(("a1",), ("a2",), ("a3",)))
    await ledger.finish(one, ChunkResult.SUCCEEDED, 200, None)
    await ledger.finish(three, ChunkResult.FAILED, 422, None, in_place=True)

    chunks = await ledger.chunks_of(operation)

    assert [(c.chunk_id, c.state) for c in chunks] == [
        (one.chunk_id, ChunkResult.SUCCEEDED),
        (two.chunk_id, PendingState.PENDING),
        (three.chunk_id, ChunkResult.FAILED),
    ]
    assert await ledger.operation(operation.operation_id) == operation
    assert await ledger.pending_chunk(three.chunk_id) is None  # ended in place: not pending
    assert await ledger.pending_chunk(two.chunk_id) is not None


# --- changing a pending chunk ------------------------------------------------------------------------------


async def test_update_pending_if_unchanged() -> None:
    ledger, table, clock = rig()
    _, (chunk,) = await ledger.accept(plan(("a1",)))
    clock.now += 5

    marked = await ledger.update_pending(
        chunk, state=PendingState.SENDING, attempts=1, sending_since=clock.now
    )

    assert marked is not None and marked.etag != chunk.etag
    stored = stored_chunk(table, chunk.pending_key)
    assert (stored.state, stored.attempts, stored.updated_at, stored.etag) == (
        PendingState.SENDING,
        1,
        clock.now,
        marked.etag,
    )
    assert await ledger.update_pending(chunk, attempts=7) is None  # read before the mark: stale
    assert stored_chunk(table, chunk.pending_key).attempts == 1


# --- a chunk's end ----------------------------------------------------------------------------------------


async def test_finish_moves_the_chunk_from_pending_to_finished_in_one_transaction() -> None:
    ledger, table, clock = rig()
    _, (chunk,) = await ledger.accept(plan(("a1",)))
    clock.now += 3

    done = await ledger.finish(
        chunk,
        ChunkResult.FAILED,
        422,
        {"code": "InvalidInput"},
        answer_for=lambda c: f"answer {c.answer_status}",
    )

    assert table.peek(PARTITION, chunk.pending_key) is None
    stored = stored_chunk(table, chunk.result_key)
    assert (stored.state, stored.answer_status, stored.last_error, stored.finished_at, stored.answer) == (
        ChunkResult.FAILED,
        422,
        {"code": "InvalidInput"},
        clock.now,
        "answer 422",
    )
    assert done.state == ChunkResult.FAILED and done.answer == "answer 422"
    assert await ledger.finished_chunk(chunk.chunk_id) == as_read_back(stored, done)


def as_read_back(stored: Chunk, done: Chunk) -> Chunk:
    """`done` as read back (the finished entry has its own ETag and no pending-only fields)."""
    return Chunk(
        **{
            **done.__dict__,
            "etag": stored.etag,
            "not_before": 0.0,
            "sending_since": 0.0,
            "updated_at": 0.0,
            "msg_token": "",
            "msg_due_at": 0.0,
            "fresh_token": False,
        }
    )


async def test_finish_in_place_writes_the_end_to_the_pending_entry() -> None:
    ledger, table, _ = rig()
    _, (chunk,) = await ledger.accept(plan(("a1",)))

    done = await ledger.finish(chunk, ChunkResult.SUCCEEDED, 200, None, in_place=True)

    stored = stored_chunk(table, chunk.pending_key)
    assert (stored.state, stored.answer_status, stored.etag) == (ChunkResult.SUCCEEDED, 200, done.etag)
    assert table.peek(PARTITION, chunk.result_key) is None
    assert table.calls["transact"] == 1  # only the accept


@pytest.mark.parametrize("in_place", [False, True])
async def test_a_second_finish_returns_the_first(in_place: bool) -> None:
    ledger, table, _ = rig()
    _, (chunk,) = await ledger.accept(plan(("a1",)))
    first = await ledger.finish(chunk, ChunkResult.SUCCEEDED, 200, None, in_place=in_place)

    second = await ledger.finish(chunk, ChunkResult.FAILED, 502, {"code": "x"}, in_place=in_place)

    assert (second.state, second.answer_status) == (ChunkResult.SUCCEEDED, 200)
    where = chunk.pending_key if in_place else chunk.result_key
    assert stored_chunk(table, where).state == ChunkResult.SUCCEEDED
    assert first.state == ChunkResult.SUCCEEDED


async def test_a_known_outcome_supersedes_outcome_unknown_in_the_finished_entry() -> None:
    ledger, table, _ = rig()
    _, (chunk,) = await ledger.accept(plan(("a1",)))
    sweep = Ledger(table, Clock(T0 + 60))
    await sweep.finish(chunk, ChunkResult.OUTCOME_UNKNOWN, 504, {"code": "OutcomeUnknown"})

    done = await ledger.finish(chunk, ChunkResult.SUCCEEDED, 200, None)

    stored = stored_chunk(table, chunk.result_key)
    assert (stored.state, stored.answer_status, stored.last_error) == (ChunkResult.SUCCEEDED, 200, None)
    assert done.state == ChunkResult.SUCCEEDED and done.etag == stored.etag


async def test_a_known_outcome_supersedes_outcome_unknown_recorded_in_place() -> None:
    ledger, table, _ = rig()
    _, (chunk,) = await ledger.accept(plan(("a1",)))
    sweep = Ledger(table, Clock(T0 + 60))
    await sweep.finish(chunk, ChunkResult.OUTCOME_UNKNOWN, 504, None, in_place=True)

    done = await ledger.finish(chunk, ChunkResult.FAILED, 422, {"code": "x"}, in_place=True)

    stored = stored_chunk(table, chunk.pending_key)
    assert (stored.state, stored.answer_status) == (ChunkResult.FAILED, 422)
    assert done.etag == stored.etag


async def test_a_known_outcome_supersedes_outcome_unknown_in_place_from_a_transaction() -> None:
    ledger, table, _ = rig()
    _, (chunk,) = await ledger.accept(plan(("a1",)))
    await Ledger(table, Clock()).finish(chunk, ChunkResult.OUTCOME_UNKNOWN, 504, None, in_place=True)

    await ledger.finish(chunk, ChunkResult.SUCCEEDED, 200, None)

    assert stored_chunk(table, chunk.pending_key).state == ChunkResult.SUCCEEDED


async def test_outcome_unknown_never_supersedes_a_known_outcome() -> None:
    ledger, table, _ = rig()
    _, (chunk,) = await ledger.accept(plan(("a1",)))
    await ledger.finish(chunk, ChunkResult.SUCCEEDED, 200, None)

    late = await Ledger(table, Clock()).finish(chunk, ChunkResult.OUTCOME_UNKNOWN, 504, None)

    assert late.state == ChunkResult.SUCCEEDED
    assert stored_chunk(table, chunk.result_key).state == ChunkResult.SUCCEEDED


async def test_finish_over_a_changed_but_unfinished_entry_records_the_end() -> None:
    ledger, table, _ = rig()
    _, (chunk,) = await ledger.accept(plan(("a1",)))
    await ledger.update_pending(chunk, attempts=2)  # e.g. a stale Sending mark undone meanwhile

    done = await ledger.finish(chunk, ChunkResult.SUCCEEDED, 200, None)

    assert done.state == ChunkResult.SUCCEEDED
    assert stored_chunk(table, chunk.result_key).state == ChunkResult.SUCCEEDED
    assert table.peek(PARTITION, chunk.pending_key) is None


async def test_finish_of_a_chunk_that_vanished_is_storage_unavailable() -> None:
    ledger, table, _ = rig()
    _, (chunk,) = await ledger.accept(plan(("a1",)))
    await table.delete(PARTITION, chunk.pending_key)

    with pytest.raises(StorageUnavailable):
        await ledger.finish(chunk, ChunkResult.SUCCEEDED, 200, None)


@pytest.fixture
def quick_sleep(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """finish(persist_for=...) waits 0.5 s between tries: make each wait a real but tiny one."""
    asked: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(delay: float, result: Any = None) -> Any:
        asked.append(delay)
        await real_sleep(0.001)
        return result

    monkeypatch.setattr(asyncio, "sleep", sleep)
    return asked


async def test_finish_with_persist_for_rides_out_storage_faults(quick_sleep: list[float]) -> None:
    ledger, table, _ = rig()
    _, (chunk,) = await ledger.accept(plan(("a1",)))
    table.fail_next("transact", 3)

    done = await ledger.finish(chunk, ChunkResult.SUCCEEDED, 200, None, persist_for=30.0)

    assert done.state == ChunkResult.SUCCEEDED
    assert stored_chunk(table, chunk.result_key).state == ChunkResult.SUCCEEDED
    assert table.injected == 3
    assert quick_sleep == [0.5, 0.5, 0.5]


async def test_finish_with_persist_for_after_a_write_that_landed_returns_it(quick_sleep: list[float]) -> None:
    ledger, table, _ = rig()
    _, (chunk,) = await ledger.accept(plan(("a1",)))
    table.fail_next("transact", 1, landed=True)

    done = await ledger.finish(chunk, ChunkResult.FAILED, 422, None, persist_for=30.0)

    assert (done.state, done.answer_status) == (ChunkResult.FAILED, 422)
    assert stored_chunk(table, chunk.result_key).state == ChunkResult.FAILED


async def test_finish_without_persist_for_gives_up_at_once(quick_sleep: list[float]) -> None:
    ledger, table, _ = rig()
    _, (chunk,) = await ledger.accept(plan(("a1",)))
    table.fail_next("transact", 1)

    with pytest.raises(StorageUnavailable):
        await ledger.finish(chunk, ChunkResult.SUCCEEDED, 200, None)
    assert quick_sleep == []
    assert stored_chunk(table, chunk.pending_key).state == PendingState.PENDING


async def test_finish_with_persist_for_gives_up_when_it_has_passed(quick_sleep: list[float]) -> None:
    ledger, table, _ = rig()
    _, (chunk,) = await ledger.accept(plan(("a1",)))
    table.fail_next("write", 100_000)

    with pytest.raises(StorageUnavailable):
        await ledger.finish(chunk, ChunkResult.SUCCEEDED, 200, None, in_place=True, persist_for=0.02)
    assert 2 <= table.injected < 1000


# --- settle, split, purge ----------------------------------------------------------------------------------


async def test_settle_moves_an_end_recorded_in_place_once() -> None:
    ledger, table, _ = rig()
    _, (chunk,) = await ledger.accept(plan(("a1",)))
    done = await ledger.finish(chunk, ChunkResult.SUCCEEDED, 200, None, in_place=True)

    assert await ledger.settle(done) is True
    assert await ledger.settle(done) is False

    assert table.peek(PARTITION, chunk.pending_key) is None
    stored = stored_chunk(table, chunk.result_key)
    assert (stored.state, stored.answer_status) == (ChunkResult.SUCCEEDED, 200)


async def test_split_replaces_a_chunk_by_pieces_that_keep_its_place() -> None:
    ledger, table, clock = rig()
    _, (before,) = await ledger.accept(plan(("z",)))
    _, (chunk,) = await ledger.accept(plan(("a1", "a2", "a3", "a4", "a5")))
    _, (after,) = await ledger.accept(plan(("a5",)))
    marked = await ledger.update_pending(chunk, attempts=1)
    assert marked is not None
    clock.now += 9

    pieces = await ledger.split(marked, 2)

    assert pieces is not None
    assert [p.alert_ids for p in pieces] == [("a1", "a2"), ("a3", "a4"), ("a5",)]
    assert [p.chunk_id for p in pieces] == [f"{chunk.chunk_id}-{n:03d}" for n in range(3)]
    assert table.peek(PARTITION, chunk.pending_key) is None
    for piece in pieces:
        stored = stored_chunk(table, piece.pending_key)
        assert (stored.state, stored.attempts, stored.etag) == (PendingState.PENDING, 0, piece.etag)
        assert (stored.fields, stored.created_at, stored.updated_at) == (RESOLVE, chunk.created_at, clock.now)
    pending = [c.chunk_id for c in await ledger.all_pending()]
    assert pending == [before.chunk_id, *(p.chunk_id for p in pieces), after.chunk_id]
    blocker = (await ledger.view_ahead_of(after)).blocker(after)
    assert blocker is not None and blocker.chunk_id == pieces[2].chunk_id


async def test_split_of_a_changed_chunk_is_none_and_changes_nothing() -> None:
    ledger, table, _ = rig()
    _, (chunk,) = await ledger.accept(plan(("a1", "a2")))
    await ledger.update_pending(chunk, attempts=1)

    assert await ledger.split(chunk, 1) is None
    assert stored_chunk(table, chunk.pending_key).alert_ids == ("a1", "a2")
    assert len(await ledger.all_pending()) == 1


async def test_split_never_makes_a_transaction_too_large() -> None:
    ledger, _, _ = rig()
    ids = tuple(f"a{n}" for n in range(300))
    _, (chunk,) = await ledger.accept(plan(ids))

    pieces = await ledger.split(chunk, 1)

    assert pieces is not None and len(pieces) <= 99
    assert sum(len(p.alert_ids) for p in pieces) == 300


async def test_purge_deletes_old_operations_results_and_journal_entries() -> None:
    ledger, table, clock = rig()
    old_op, (old_chunk,) = await ledger.accept(plan(("a1",)))
    await ledger.finish(old_chunk, ChunkResult.SUCCEEDED, 200, None)
    clock.now += 100
    new_op, (new_chunk,) = await ledger.accept(plan(("a2",)))
    await ledger.finish(new_chunk, ChunkResult.SUCCEEDED, 200, None)
    _, (pending,) = await ledger.accept(plan(("a3",)))

    removed = await ledger.purge(operations_before=T0 + 50, journal_before=T0 + 150)

    assert removed == 2 + 3  # old operation and result; all three journal entries
    assert await ledger.operation(old_op.operation_id) is None
    assert await ledger.finished_chunk(old_chunk.chunk_id) is None
    assert await ledger.operation(new_op.operation_id) is not None
    assert await ledger.finished_chunk(new_chunk.chunk_id) is not None
    assert await ledger.pending_chunk(pending.chunk_id) is not None
    assert [e["RowKey"] for e in table.rows() if str(e["RowKey"]).startswith("j-")] == []
    assert table.peek(PARTITION, COUNTER) is not None
    assert await ledger.purge(operations_before=T0 + 50, journal_before=T0 + 150) == 0


async def test_a_ledger_keeps_to_its_partition() -> None:
    table = MemoryTable()
    home, other = Ledger(table, Clock()), Ledger(table, Clock(), partition="tenant-b")
    await home.accept(plan(("a1",)))

    operation, (chunk,) = await other.accept(plan(("a1",)))

    assert operation.first_seq == 1 and chunk.partition == "tenant-b"
    assert (await other.view_ahead_of(chunk)).blocker(chunk) is None
    assert entity(table, COUNTER)["Next"] == 2
    theirs = table.peek("tenant-b", COUNTER)
    assert theirs is not None and theirs["Next"] == 2
    assert table.peek("tenant-b", f"o-{operation.operation_id}") is not None
