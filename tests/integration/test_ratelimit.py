"""The shared rate limiter against a real Azurite: several limiter objects stand for several instances.

Each test gets its own table; each limiter its own TableClient, so they share nothing but the entity,
as separate Functions instances would. Tests that need precise times drive the limiter's clock; the
concurrency and waiting tests use real time and stay within a few seconds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack
from typing import Any, cast
from uuid import uuid4

import pytest
from azure.data.tables.aio import TableClient, TableServiceClient

from devhost.services import Service
from emulators.control import max_calls_in_any_window
from shared.ratelimit import Denial, Grant, LimiterContentionError, RateLimiter, parse_log
from shared.settings import RateWindow

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
            return RateLimiter(client, windows, margin, **kwargs)

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

    async def get_entity(self, *args: Any, **kwargs: Any) -> Any:
        return await self.inner.get_entity(*args, **kwargs)

    async def create_entity(self, *args: Any, **kwargs: Any) -> Any:
        return await self.inner.create_entity(*args, **kwargs)

    async def update_entity(self, entity: dict[str, Any], **kwargs: Any) -> Any:
        await self.other.upsert_entity({**entity, "Log": ""})
        return await self.inner.update_entity(entity, **kwargs)


async def test_exhausted_conflict_retries_raise(
    azurite: Service, table_name: str, table: TableClient
) -> None:
    async with TableClient.from_connection_string(azurite.urls["connection_string"], table_name) as inner:
        limiter = RateLimiter(cast(TableClient, Meddler(inner, table)), [RateWindow(10, 60.0)], 1.0)
        limiter.MAX_CONFLICT_ATTEMPTS = 4
        began = time.monotonic()
        with pytest.raises(LimiterContentionError):
            await limiter.acquire()
        assert time.monotonic() - began < 2
        # first read (404) + create, then 4 rounds of write (412) + re-read, less the last re-read
        assert limiter.table_operations == 2 + 4 + 3
