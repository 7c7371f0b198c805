"""The shared rate limiter against a real Azurite: several limiter objects stand for several instances.

Each test gets its own table; each limiter its own TableClient, so they share nothing but the entity,
as separate Functions instances would. Tests that need precise times drive the limiter's clock; the
concurrency and waiting tests use real time and stay within a few seconds.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack
from typing import Any, cast
from uuid import uuid4

import pytest
from azure.data.tables.aio import TableClient, TableServiceClient

from devhost.services import Service
from emulators.control import max_calls_in_any_window
from shared.errors import LimiterContentionError
from shared.ratelimit import Denial, Grant, RateLimiter, parse_log
from shared.settings import RateWindow
from shared.storage import WRITE_TOKEN, StateTable

MakeLimiter = Callable[..., RateLimiter]


class FakeClock:
    """Epoch seconds that move only when a test says so."""

    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def table_name(azurite: Service) -> AsyncIterator[str]:
    name = f"rl{uuid4().hex[:12]}"
    async with TableServiceClient.from_connection_string(azurite.urls["connection_string"]) as service:
        await service.create_table(name)
        yield name
        await service.delete_table(name)


@pytest.fixture
async def table(azurite: Service, table_name: str) -> AsyncIterator[TableClient]:
    """A client of the test's table for the test itself (reading the entity as stored)."""
    async with TableClient.from_connection_string(azurite.urls["connection_string"], table_name) as client:
        yield client


@pytest.fixture
async def instance(azurite: Service, table_name: str) -> AsyncIterator[MakeLimiter]:
    """`instance(windows, margin, **kwargs)`: a RateLimiter with its own TableClient, closed at the end."""
    async with AsyncExitStack() as stack:

        def make(windows: Sequence[RateWindow], margin: float, **kwargs: Any) -> RateLimiter:
            client = TableClient.from_connection_string(azurite.urls["connection_string"], table_name)
            stack.push_async_exit(client)
            return RateLimiter(StateTable(client), windows, margin, **kwargs)

        yield make


async def stored(table: TableClient) -> tuple[list[int], str]:
    entity = await table.get_entity("mde", "calls")
    return parse_log(str(entity["Log"])), str(entity.metadata["etag"])


async def test_instances_together_never_exceed_any_window(instance: MakeLimiter, table: TableClient) -> None:
    windows, margin, seconds = [RateWindow(5, 1.0)], 0.05, 3.0
    limiters = [instance(windows, margin) for _ in range(3)]
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds

    async def acquirer(limiter: RateLimiter) -> list[float]:
        times: list[float] = []
        for _ in range(50):  # far more than can be granted; bounds the loop in count as well as time
            left = end - loop.time()
            if left <= 0:
                break
            outcome = await limiter.acquire(max_wait=left)
            if not isinstance(outcome, Grant):
                break
            times.append(outcome.at)
        return times

    results = await asyncio.wait_for(asyncio.gather(*(acquirer(lim) for lim in limiters * 2)), seconds + 10)
    grants = sorted(t for times in results for t in times)
    assert max_calls_in_any_window(grants, 1.0) <= 5
    assert max_calls_in_any_window(grants, 1.0 + margin - 0.001) <= 5
    # Bursts of 5 at about 0, 1.05 and 2.1 s: 15 fit in 3 s. 13 fails a limiter that holds grants
    # ~45% too long (bursts at 0 and 1.5 only), yet leaves room for a slow last burst.
    assert len(grants) >= 13, grants
    # Nor is any grant late: each waits only for the grant 5 before it to leave W + margin.
    late = [b - a for a, b in zip(grants, grants[5:], strict=False) if b - a > 1.0 + margin + 0.5]
    assert not late, late
    log, _ = await stored(table)
    assert set(log) <= {round(t * 1000) for t in grants}  # no phantom grants


async def test_denial_by_the_longer_window_leaves_the_log_unchanged(
    instance: MakeLimiter, table: TableClient
) -> None:
    clock = FakeClock(time.time())
    start = clock.now
    windows = [RateWindow(3, 1.0), RateWindow(5, 3.0)]
    limiter = instance(windows, 0.05, clock=clock)
    for step in range(3):
        clock.now = start + step * 0.01
        assert isinstance(await limiter.acquire(), Grant)
    clock.now = start + 0.03
    denial = await limiter.acquire()  # the 1-s window is full
    assert isinstance(denial, Denial) and denial.wait_seconds == pytest.approx(1.02)
    clock.now = start + 1.1
    assert isinstance(await limiter.acquire(), Grant)
    assert isinstance(await limiter.acquire(), Grant)

    clock.now = start + 1.2  # 1-s window: 2 of 3 used; 3-s window: 5 of 5
    before = await stored(table)
    ops = limiter.table_operations
    outcome = await limiter.acquire()
    assert isinstance(outcome, Denial)
    assert outcome.wait_seconds == pytest.approx(1.85, abs=0.002)  # until `start` leaves 3.05 s
    assert limiter.table_operations == ops  # decided from the cached entity: no write, no read
    # Another instance, reading the entity afresh, is refused too, and writes nothing either.
    other = instance(windows, 0.05, clock=clock)
    assert isinstance(await other.acquire(), Denial)
    assert await stored(table) == before
    snapshot = await other.snapshot()
    assert [(w.used, w.remaining) for w in snapshot.windows] == [(2, 1), (5, 0)]


async def test_block_stops_every_instance_until_it_passes(instance: MakeLimiter) -> None:
    windows, margin = [RateWindow(10, 60.0)], 0.05
    told, other = instance(windows, margin), instance(windows, margin)
    assert isinstance(await other.acquire(), Grant)  # `other` now has a warm (soon stale) cache
    await told.block(2)
    await told.block(0.5)  # a shorter block never shortens the stored one
    blocked_at = time.time()

    outcome = await other.acquire()  # its cache lacks the block: the write gets 412, it re-reads
    assert isinstance(outcome, Denial)
    assert 1.8 < outcome.wait_seconds <= 2.05
    snapshot = await other.snapshot()
    assert snapshot.blocked_until is not None
    assert snapshot.blocked_until == pytest.approx(blocked_at + 2.05, abs=0.2)

    granted = await other.acquire(max_wait=3.0)
    assert isinstance(granted, Grant)
    assert granted.at >= snapshot.blocked_until
    assert (await told.snapshot()).blocked_until is None


async def test_max_wait_zero_answers_at_once_and_max_wait_waits(instance: MakeLimiter) -> None:
    limiter = instance([RateWindow(2, 1.0)], 0.05)
    first = await limiter.acquire()
    assert isinstance(first, Grant)
    assert isinstance(await limiter.acquire(), Grant)

    began = time.monotonic()
    denial = await limiter.acquire(max_wait=0)
    assert isinstance(denial, Denial)
    assert time.monotonic() - began < 0.1
    assert 0.9 < denial.wait_seconds <= 1.05

    began = time.monotonic()
    short = await limiter.acquire(max_wait=0.3)  # the wait is longer: no point sleeping
    assert isinstance(short, Denial) and short.wait_seconds > 0.3
    assert time.monotonic() - began < 0.1

    began = time.monotonic()
    granted = await limiter.acquire(max_wait=denial.wait_seconds + 1.0)
    assert isinstance(granted, Grant)
    assert granted.at - first.at >= 1.05 - 1e-6  # (float noise of epoch seconds)
    assert time.monotonic() - began < denial.wait_seconds + 0.5


async def test_uncontended_grant_is_one_table_operation(instance: MakeLimiter) -> None:
    limiter = instance([RateWindow(50, 60.0), RateWindow(100, 3600.0)], 1.0)
    assert isinstance(await limiter.acquire(), Grant)
    assert limiter.table_operations == 3  # read (404), create, conditional write
    for _ in range(20):
        assert isinstance(await limiter.acquire(), Grant)
    assert limiter.table_operations == 3 + 20
    snapshot = await limiter.snapshot()
    assert [(w.calls, w.used, w.remaining) for w in snapshot.windows] == [(50, 21, 29), (100, 21, 79)]
    assert snapshot.blocked_until is None


async def test_concurrent_acquirers_in_one_process_do_not_conflict(instance: MakeLimiter) -> None:
    limiter = instance([RateWindow(30, 60.0)], 1.0)
    outcomes = await asyncio.gather(*(limiter.acquire() for _ in range(40)))
    assert sum(isinstance(o, Grant) for o in outcomes) == 30
    # 3 to start, 1 per grant after, none for the 10 denials (decided from the cache), and no 412s
    assert limiter.table_operations == 3 + 29


async def test_instances_taking_turns_recover_from_stale_caches(instance: MakeLimiter) -> None:
    windows = [RateWindow(6, 60.0)]
    a, b = instance(windows, 1.0), instance(windows, 1.0)
    for _ in range(3):
        assert isinstance(await a.acquire(), Grant)
        assert isinstance(await b.acquire(), Grant)
    assert isinstance(await a.acquire(), Denial)
    assert isinstance(await b.acquire(), Denial)
    # After its first grant, each write of either found the other had written since: 412, re-read,
    # write (3 operations). a's stale cache let it try once more: 412, re-read, denied (2 operations);
    # b wrote last, so its cache was fresh and its denial cost nothing.
    assert (a.table_operations, b.table_operations) == (3 + 3 + 3 + 2, 2 + 3 + 3)


class Meddler:
    """A table client that lets another writer change the entity just before each of our writes."""

    def __init__(self, inner: TableClient, other: TableClient) -> None:
        self.inner, self.other = inner, other
        self.table_name = inner.table_name

    async def get_entity(self, *args: Any, **kwargs: Any) -> Any:
        return await self.inner.get_entity(*args, **kwargs)

    async def create_entity(self, *args: Any, **kwargs: Any) -> Any:
        return await self.inner.create_entity(*args, **kwargs)

    async def update_entity(self, entity: dict[str, Any], **kwargs: Any) -> Any:
        theirs = {k: v for k, v in entity.items() if k != WRITE_TOKEN}  # another writer's row, not ours
        await self.other.upsert_entity({**theirs, "Log": ""})
        return await self.inner.update_entity(entity, **kwargs)


async def test_exhausted_conflict_retries_raise(
    azurite: Service, table_name: str, table: TableClient
) -> None:
    async with TableClient.from_connection_string(azurite.urls["connection_string"], table_name) as inner:
        limiter = RateLimiter(
            StateTable(cast(TableClient, Meddler(inner, table))), [RateWindow(10, 60.0)], 1.0
        )
        limiter.MAX_CONFLICT_ATTEMPTS = 4
        began = time.monotonic()
        with pytest.raises(LimiterContentionError):
            await limiter.acquire()
        assert time.monotonic() - began < 2
        # first read (404) + create, then 4 rounds of write (412) + re-read, less the last re-read
        assert limiter.table_operations == 2 + 4 + 3


# --- reservations: a waiter writes its future slot and sleeps until it -------------------------------


def set_ms(clock: FakeClock, ms: int) -> None:
    """Set the clock to epoch millisecond `ms` (half a millisecond in, so float noise never floors it to
    the millisecond before)."""
    clock.now = (ms + 0.5) / 1000


async def wait_for_log_end(table: TableClient, last_ms: int) -> list[int]:
    """The stored log once its last entry is `last_ms` (a waiter's reservation has landed); bounded."""
    log: list[int] = []
    for _ in range(200):
        log, _ = await stored(table)
        if log and log[-1] == last_ms:
            return log
        await asyncio.sleep(0.01)
    raise AssertionError(f"the log never ended with {last_ms}: {log}")


async def test_waiters_on_several_instances_get_fifo_slots_by_the_rule(
    instance: MakeLimiter, table: TableClient
) -> None:
    """Nine waiters on three instances, all at once, with room for three calls a window: every one gets
    a Grant, none returns before its time, and the grants are the rule's slots in order."""
    calls, margin = 3, 0.05
    span = 1050  # ms: W + margin
    limiters = [instance([RateWindow(calls, 1.0)], margin) for _ in range(3)]

    async def waiter(limiter: RateLimiter) -> tuple[int, Grant | Denial, int]:
        called = math.floor(time.time() * 1000)
        outcome = await limiter.acquire(max_wait=5.0)
        return called, outcome, math.floor(time.time() * 1000)

    began = time.monotonic()
    results = await asyncio.wait_for(asyncio.gather(*(waiter(lim) for lim in limiters * 3)), 10)
    assert time.monotonic() - began < 2 * span / 1000 + 1.0  # three windows' worth of slots, no more
    assert all(isinstance(outcome, Grant) for _, outcome, _ in results), results
    records = sorted(
        (round(cast(Grant, outcome).at * 1000), called, returned) for called, outcome, returned in results
    )
    grants = [at for at, _, _ in records]
    for at, _, returned in records:
        assert returned >= at  # never before its time (both in the limiter's whole milliseconds)
        assert returned - at < 300  # and not much after it: the budget does not sit idle
    assert grants == sorted(set(grants))  # distinct slots
    reserved = 0
    for i, (at, called, returned) in enumerate(records):
        # FIFO after the previous slot, and no earlier than the rule allows
        earliest = max(grants[i - 1] if i else 0, grants[i - calls] + span if i >= calls else 0)
        assert at >= earliest, (i, grants)
        if at == earliest and at > called + 500:
            reserved += 1  # a reservation, at exactly the rule's slot
        else:  # otherwise it was granted at its own decision, which lies within its acquire call
            assert called <= at <= returned, (i, records)
    # Six of the nine had to wait; those that decided while the log was still full got exactly their
    # slot (all six, unless the Table round trips are very slow).
    assert reserved >= 3, records
    assert max_calls_in_any_window([g / 1000 for g in grants], 1.0 + margin - 0.001) <= calls
    log, _ = await stored(table)
    assert log == grants[-calls:]  # trimmed to the last N, which are exactly the last grants


async def test_reservations_are_one_write_each_and_denials_count_them(
    instance: MakeLimiter, table: TableClient
) -> None:
    clock = FakeClock(0)
    start = math.floor(time.time() * 1000)
    windows, margin = [RateWindow(3, 0.3)], 0.05  # span 350 ms
    a = instance(windows, margin, clock=clock)
    b = instance(windows, margin, clock=clock)
    set_ms(clock, start)
    assert isinstance(await b.acquire(), Grant)  # b's cache: [start]; it will go stale
    for step in (10, 20):
        set_ms(clock, start + step)
        assert isinstance(await a.acquire(), Grant)
    assert a.table_operations == 3  # read, two writes

    set_ms(clock, start + 30)  # full until start + 350
    tasks = [asyncio.create_task(a.acquire(max_wait=1.0)) for _ in range(3)]
    try:
        log = await wait_for_log_end(table, start + 370)
        assert log == [start + 350, start + 360, start + 370]  # each one window after the grant it follows
        assert a.table_operations == 3 + 3  # one conditional write per reservation, nothing else
        assert not any(t.done() for t in tasks)  # the clock has not reached their slots

        # b's stale cache shows room now: its write gets 412, it re-reads and is refused. Its wait is to
        # the slot after a's reservations (start + 700), not to when the budget frees up (start + 350).
        ops = b.table_operations
        denial = await b.acquire()
        assert isinstance(denial, Denial) and denial.wait_seconds == pytest.approx(0.67)
        assert b.table_operations == ops + 2
        # The slot is further than max_wait: refused at once, from the (now fresh) cache, writing nothing.
        before = await stored(table)
        ops = b.table_operations
        short = await b.acquire(max_wait=0.5)
        assert isinstance(short, Denial) and short.wait_seconds == pytest.approx(0.67)
        assert b.table_operations == ops and await stored(table) == before
        # Another instance reading the entity afresh sees the same.
        fresh = await instance(windows, margin, clock=clock).acquire(max_wait=0.6)
        assert isinstance(fresh, Denial) and fresh.wait_seconds == pytest.approx(0.67)
        assert await stored(table) == before
        snapshot = await b.snapshot()
        assert [(w.used, w.remaining) for w in snapshot.windows] == [(3, 0)]  # reserved = used

        tasks.append(asyncio.create_task(b.acquire(max_wait=0.7)))  # within reach: reserves start + 700
        await wait_for_log_end(table, start + 700)
        set_ms(clock, start + 700)
        outcomes = await asyncio.wait_for(asyncio.gather(*tasks), 5)
    finally:
        for task in tasks:
            task.cancel()
    assert sorted(round(cast(Grant, o).at * 1000) for o in outcomes) == [
        start + 350,
        start + 360,
        start + 370,
        start + 700,
    ]


async def test_a_reserved_waiter_never_gets_a_grant_before_its_slot(instance: MakeLimiter) -> None:
    """If the limiter's clock does not reach the slot (set back, say), the slot goes unused: a Denial."""
    clock = FakeClock(0)
    start = math.floor(time.time() * 1000)
    limiter = instance([RateWindow(1, 0.1)], 0, clock=clock)
    limiter.WAKE_TOLERANCE_SECONDS = 0.1
    set_ms(clock, start)
    assert isinstance(await limiter.acquire(), Grant)
    began = time.monotonic()
    outcome = await asyncio.wait_for(limiter.acquire(max_wait=1.0), 5)  # reserves start + 100
    assert isinstance(outcome, Denial) and outcome.wait_seconds == pytest.approx(0.1)
    assert 0.2 <= time.monotonic() - began < 1.0  # slept for the slot and the tolerance, then gave up


async def test_a_block_recorded_meanwhile_leaves_the_reserved_slot_unused(
    instance: MakeLimiter, table: TableClient
) -> None:
    clock = FakeClock(0)
    start = math.floor(time.time() * 1000)
    limiter = instance([RateWindow(1, 0.2)], 0, clock=clock)
    set_ms(clock, start)
    assert isinstance(await limiter.acquire(), Grant)
    set_ms(clock, start + 10)
    task = asyncio.create_task(limiter.acquire(max_wait=1.0))
    try:
        await wait_for_log_end(table, start + 200)  # reserved
        set_ms(clock, start + 20)
        await limiter.block(0.5)  # MDE answered 429 to a call of this process: blocked until start + 520
        set_ms(clock, start + 200)
        outcome = await asyncio.wait_for(task, 5)
    finally:
        task.cancel()
    assert isinstance(outcome, Denial) and outcome.wait_seconds == pytest.approx(0.32)
    log, _ = await stored(table)
    assert log == [start + 200]  # the slot stays spent, unused
    # The next slot is after both the block and the unused slot's window.
    set_ms(clock, start + 520)
    assert await limiter.acquire() == Grant((start + 520) / 1000)


async def test_reserve_returns_the_slot_at_once_and_wait_for_holds_until_it(
    instance: MakeLimiter, table: TableClient
) -> None:
    """`reserve` writes the slot and returns without sleeping (the dispatcher prepares its call
    meanwhile); `wait_for` returns the Grant only once the limiter's clock has reached the slot."""
    clock = FakeClock(0)
    start = math.floor(time.time() * 1000)
    limiter = instance([RateWindow(1, 0.2)], 0.0, clock=clock)  # span 200 ms
    set_ms(clock, start)
    now = await limiter.reserve()
    assert isinstance(now, Grant) and round(now.at * 1000) == start
    assert await limiter.wait_for(now) == now  # a grant of now: at once

    set_ms(clock, start + 50)
    ahead = await limiter.reserve(max_wait=1.0)
    assert isinstance(ahead, Grant) and round(ahead.at * 1000) == start + 200
    assert (await stored(table))[0][-1] == start + 200  # written before any wait
    waiting = asyncio.create_task(limiter.wait_for(ahead))
    try:
        await asyncio.sleep(0.1)
        assert not waiting.done()  # the clock is still short of the slot
        set_ms(clock, start + 200)
        assert await asyncio.wait_for(waiting, 5) == ahead
    finally:
        waiting.cancel()


def two_instances_of_two_in_ten(instance: MakeLimiter) -> tuple[FakeClock, int, RateLimiter, RateLimiter]:
    """Two instances of a 2-calls-in-10-s budget on one fake clock, and now in epoch ms (no margin)."""
    clock = FakeClock(0)
    windows = [RateWindow(2, 10)]
    start = math.floor(time.time() * 1000)
    return clock, start, instance(windows, 0.0, clock=clock), instance(windows, 0.0, clock=clock)


async def test_release_gives_an_unused_grant_back(instance: MakeLimiter, table: TableClient) -> None:
    """A grant given up before its call (too old, or its chunk waits behind another) leaves the log, so
    its budget can be granted again; another instance with a stale cache finds the entry gone."""
    clock, start, a, b = two_instances_of_two_in_ten(instance)
    set_ms(clock, start)
    first = await a.acquire()
    set_ms(clock, start + 5)
    second = await a.acquire()
    assert isinstance(first, Grant) and isinstance(second, Grant)
    assert isinstance(await b.acquire(), Denial)  # b's cache now holds both entries

    assert await a.release(second) is True
    assert (await stored(table))[0] == [start]
    assert await b.release(second) is False  # stale cache: it reads afresh and finds it gone
    set_ms(clock, start + 6)
    again = await b.acquire()
    assert isinstance(again, Grant)
    assert (await stored(table))[0] == [start, start + 6]
    assert isinstance(await a.acquire(), Denial)  # the window is full again: the limit still holds


async def test_move_frees_a_grant_s_slot_and_takes_the_next_in_one_write(
    instance: MakeLimiter, table: TableClient
) -> None:
    """A call marked after its slot moves its grant (Sender._fresh_slot): the old entry leaves and the
    new one is written together, so the window stays full for every other caller meanwhile; with no slot
    in the wait allowed nothing is written and the old entry stays for the caller to release."""
    clock, start, a, other = two_instances_of_two_in_ten(instance)
    set_ms(clock, start)
    stale = await a.acquire()
    set_ms(clock, start + 5)
    assert isinstance(await other.acquire(), Grant)
    set_ms(clock, start + 300)

    moved = await a.move(stale, 0.5, lead=0.1) if isinstance(stale, Grant) else None

    assert isinstance(moved, Grant) and moved.at == (start + 400) / 1000
    log, etag = await stored(table)
    assert log == [start + 5, start + 400]  # the old entry gone, the new one in: still two
    assert isinstance(await other.acquire(), Denial)  # no gap for anyone else

    await other.block(5.0)  # a 429: no slot within the wait
    blocked = await stored(table)
    denied = await a.move(moved, 0.5, lead=0.1)
    assert isinstance(denied, Denial)
    assert await stored(table) == blocked  # nothing written: the grant is still there to release
    assert log == blocked[0] and etag != blocked[1]


async def test_a_lead_puts_the_slot_that_far_ahead_and_max_wait_counts_after_it(
    instance: MakeLimiter, table: TableClient
) -> None:
    """The worker asks for slots MARK_LEAD_SECONDS ahead, time to mark its chunk before the call: free
    budget gives the slot at now + lead, and `max_wait` is counted from there."""
    clock = FakeClock(0)
    start = math.floor(time.time() * 1000)
    limiter = instance([RateWindow(1, 1.0)], 0.0, clock=clock)
    set_ms(clock, start)
    ahead = await limiter.reserve(0.0, lead=0.2)
    assert isinstance(ahead, Grant) and round(ahead.at * 1000) == start + 200
    assert (await stored(table))[0] == [start + 200]
    later = await limiter.reserve(0.9, lead=0.2)  # next slot start + 1200: 1.0 s after the lead ends
    assert isinstance(later, Denial) and later.wait_seconds == pytest.approx(1.0)
    assert (await stored(table))[0] == [start + 200]
    granted = await limiter.reserve(1.1, lead=0.2)
    assert isinstance(granted, Grant) and round(granted.at * 1000) == start + 1200


async def test_a_429_another_instance_recorded_while_a_reserved_slot_approached_stops_the_call(
    instance: MakeLimiter,
) -> None:
    """A reserved slot is not used if, while its holder slept, another instance recorded a 429 whose
    block covers it: the holder reads the row afresh before its call (it could not know otherwise)."""
    windows, margin = [RateWindow(1, 0.5)], 0.0
    a, b = instance(windows, margin), instance(windows, margin)
    assert isinstance(await a.acquire(), Grant)  # the window is full for 0.5 s
    reserved = await a.reserve(max_wait=2.0)
    assert isinstance(reserved, Grant) and reserved.at > time.time()
    await b.block(30.0)  # MDE answered b with 429, Retry-After 30 s
    outcome = await a.wait_for(reserved)
    assert isinstance(outcome, Denial) and outcome.wait_seconds > 25
