"""The shared MDE call budget: one Table Storage entity that every alertgate instance spends from.

MDE allows each app + tenant a fixed number of batchUpdate calls per window (10 a minute and 500 an
hour), however many Functions instances make them, so the budget lives in one entity that all instances
read and write (DESIGN §3):

- `Log` holds a sliding log of grant times (epoch milliseconds, sorted, comma-separated), trimmed to
  what the longest window can still need. A sliding log, unlike a fixed-window counter, is exact over
  *any* window-long interval: a counter reset at a boundary lets 2N calls through in a moment.
- `BlockedUntil` (epoch milliseconds, 0 if none) is set when MDE answers 429 with Retry-After, so every
  instance waits, not only the one that was told.

Every window is checked and the grant spent in one ETag-conditioned REPLACE, so a grant is all or
nothing and a denial (which writes nothing) never spends another window. A 412 means another instance
wrote first: the limiter re-reads and decides again, with jitter, a bounded number of times.

`RATE_LIMIT_SAFETY_MARGIN_SECONDS` is added to every window: a grant stays in the log for W + margin
seconds, which absorbs clock skew between instances and the delay between a grant and the call's
arrival at MDE.

The decision itself (`decide`) and the log handling are pure module-level functions, so the rules can be
tested exactly without storage or real time.
"""

from __future__ import annotations

import asyncio
import bisect
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from azure.core import MatchConditions
from azure.core.exceptions import (
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
)
from azure.data.tables import EdmType, EntityProperty, UpdateMode

from shared.errors import AlertgateError
from shared.settings import RateWindow

if TYPE_CHECKING:
    from azure.data.tables.aio import TableClient

# A Table string property holds at most 64 KiB of UTF-16, i.e. 32,768 characters. An epoch in
# milliseconds has 13 digits until the year 2286, so a log entry is 14 characters with its comma, and
# 2,000 entries (28,000 characters) always fit. The log never keeps more entries than the largest window
# allows calls (see `trim_log`), so bounding each window's calls bounds the property.
MAX_CALLS_PER_WINDOW = 2000

LOG_PROPERTY = "Log"
BLOCKED_UNTIL_PROPERTY = "BlockedUntil"


class LimiterContentionError(AlertgateError):
    """Other instances kept winning the conditional write: the bounded 412 retries ran out.

    Raised instead of waiting without end, so the caller can defer the work (it is not a denial: nobody
    knows how long to wait).
    """


@dataclass(frozen=True)
class Grant:
    """One call may be made now; it is already counted in the shared log at `at` (epoch seconds)."""

    at: float


@dataclass(frozen=True)
class Denial:
    """No call may be made yet; `wait_seconds` (> 0) is the earliest a call could be granted.

    It is a lower bound: other instances may spend the budget meanwhile, so the caller must still
    acquire (never assume a grant) when the wait is over.
    """

    wait_seconds: float


@dataclass(frozen=True)
class WindowState:
    """One window's budget at a moment: `used` grants still count against it, `remaining` may be made."""

    calls: int
    seconds: float
    used: int
    remaining: int


@dataclass(frozen=True)
class BudgetSnapshot:
    """Every window's state and the 429 block (epoch seconds, None if not blocked), for /api/health."""

    windows: list[WindowState]
    blocked_until: float | None


# ---------------------------------------------------------------------------------------------------
# Pure decision logic (no storage, no clock): all times are integer epoch milliseconds.


def span_ms(window: RateWindow, margin_seconds: float) -> int:
    """How long a grant counts against `window`: W + margin, rounded *up* to a whole millisecond.

    Rounding up can only make the limiter stricter by under a millisecond; rounding down could let a
    call in a millisecond early. The inner round() drops binary noise (1.05 * 1000 = 1050.0000000000002)
    so that exact decimal settings are not rounded up by a whole millisecond.
    """
    return math.ceil(round((window.seconds + margin_seconds) * 1000, 6))


def window_usage(log_ms: Sequence[int], now_ms: int, window: RateWindow, margin_seconds: float) -> int:
    """How many logged grants count against `window` at `now_ms`: those with `now - t < W + margin`.

    Entries ahead of `now_ms` (written by an instance whose clock runs ahead) count too: the log only
    errs on the strict side.
    """
    return len(log_ms) - bisect.bisect_right(log_ms, now_ms - span_ms(window, margin_seconds))


def decide(
    log_ms: Sequence[int],
    blocked_until_ms: int,
    now_ms: int,
    windows: Sequence[RateWindow],
    margin_seconds: float,
) -> float:
    """Seconds to wait before a call may be granted at `now_ms`; 0 means grant now.

    A call is granted only if, for every window of N calls per W seconds, fewer than N logged grants lie
    in the last W + margin seconds, and `now_ms` is not before `blocked_until_ms`. Otherwise the wait is
    until the earliest moment every window admits a call and the block is over. Each window's admission
    only improves as time passes (no grant is added while waiting), so that moment is the latest of the
    windows' own moments: for a full window, when its N-th most recent grant leaves W + margin (then at
    most N - 1 remain inside). `log_ms` must be sorted ascending.
    """
    wait_ms = max(0, blocked_until_ms - now_ms)
    for window in windows:
        span = span_ms(window, margin_seconds)
        if window_usage(log_ms, now_ms, window, margin_seconds) >= window.calls:
            nth_most_recent = log_ms[-window.calls]
            wait_ms = max(wait_ms, nth_most_recent + span - now_ms)
    return wait_ms / 1000


def trim_log(
    log_ms: Sequence[int], now_ms: int, windows: Sequence[RateWindow], margin_seconds: float
) -> list[int]:
    """Keep only the grants a future decision can need.

    A decision at `now_ms` or later looks at most W + margin back for the longest window, and at most at
    the N most recent grants of each window (whether the N-th most recent is inside decides it), so
    entries older than the longest span, and all but the most recent max(N) entries, can go. The second
    rule bounds the property's size even if the windows are reconfigured to fewer calls.
    """
    longest = max(span_ms(w, margin_seconds) for w in windows)
    keep_from = bisect.bisect_right(log_ms, now_ms - longest)
    most = max(w.calls for w in windows)
    return list(log_ms[max(keep_from, len(log_ms) - most) :])


def record_grant(
    log_ms: Sequence[int], now_ms: int, windows: Sequence[RateWindow], margin_seconds: float
) -> list[int]:
    """The log after a grant at `now_ms`: inserted in order (another instance's clock may run ahead), then trimmed."""
    updated = list(log_ms)
    bisect.insort(updated, now_ms)
    return trim_log(updated, now_ms, windows, margin_seconds)


def parse_log(text: str) -> list[int]:
    """`"1700000000000,1700000000500"` → sorted ints; tolerant of an empty string and stray blanks."""
    return sorted(int(part) for part in text.split(",") if part.strip())


def format_log(log_ms: Sequence[int]) -> str:
    return ",".join(str(t) for t in log_ms)


def block_until_ms(now_ms: int, seconds: float, margin_seconds: float) -> int:
    """The end of a 429 block: Retry-After plus the margin (skew between instances), rounded up."""
    return now_ms + math.ceil(round((seconds + margin_seconds) * 1000, 6))


# ---------------------------------------------------------------------------------------------------
# The shared entity


@dataclass(frozen=True)
class _Cached:
    """The entity as last read or written by this object, with the ETag that makes a write conditional."""

    log_ms: list[int]
    blocked_until_ms: int
    etag: str


def _int_property(value: Any) -> int:
    """BlockedUntil comes back as an EntityProperty (Edm.Int64) or, if small, as a plain int."""
    if isinstance(value, EntityProperty):
        return int(value.value)
    return int(value or 0)


def _is_conflict(exc: HttpResponseError) -> bool:
    """412 (someone wrote since our ETag) or 404 (the entity was deleted since): our view is stale."""
    return isinstance(exc, ResourceModifiedError | ResourceNotFoundError) or exc.status_code == 412


def conflict_jitter(attempt: int) -> float:
    """Random back-off after the `attempt`-th 412 in a row, so colliding instances stop colliding."""
    return random.uniform(0.0, min(0.2, 0.01 * 2**attempt))


class RateLimiter:
    """The MDE call budget shared by every instance through one Table entity.

    One object per process and budget: it keeps the last entity and ETag it read or wrote and tries the
    conditional write with them directly, so an uncontended grant costs one Table round trip. That is
    sound: a stale cached log can only lack grants made since (trimmed entries no longer count, and
    BlockedUntil only grows), so a denial computed from it is never wrong, and a grant computed from it
    is written only if the ETag still matches. An asyncio.Lock serialises this process's acquirers so
    they do not make each other's writes fail with 412.

    The table is created by the caller; the entity is created here on first use.
    """

    MAX_CONFLICT_ATTEMPTS = 30
    """412s in a row before LimiterContentionError (a class attribute so tests can lower it)."""

    CONTENTION_GRACE_SECONDS = 5.0
    """How far past `max_wait` the 412 retries may go: enough for 30 jittered attempts, yet bounded."""

    SLEEP_SLACK_SECONDS = 0.002
    """Added to a budget sleep so the clock has surely passed the millisecond the grant leaves at."""

    def __init__(
        self,
        table: TableClient,
        windows: Sequence[RateWindow],
        margin_seconds: float,
        *,
        partition_key: str = "mde",
        row_key: str = "calls",
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not windows:
            raise ValueError("at least one rate window is needed")
        too_big = [str(w) for w in windows if w.calls > MAX_CALLS_PER_WINDOW]
        if too_big:
            raise ValueError(
                f"rate window(s) {', '.join(too_big)} allow more than {MAX_CALLS_PER_WINDOW} calls: the "
                "grant log would outgrow a Table string property (64 KiB)"
            )
        if any(w.calls < 1 or not (math.isfinite(w.seconds) and w.seconds > 0) for w in windows):
            raise ValueError("every rate window needs at least 1 call and a positive, finite length")
        if not (math.isfinite(margin_seconds) and margin_seconds >= 0):
            raise ValueError("the safety margin must be a finite number of seconds, at least 0")
        self._table = table
        self._windows = tuple(sorted(windows, key=lambda w: w.seconds))
        self._margin = float(margin_seconds)
        self._partition_key = partition_key
        self._row_key = row_key
        self._clock = clock
        self._cached: _Cached | None = None
        self._lock = asyncio.Lock()
        self.table_operations = 0

    # -- public API ---------------------------------------------------------------------------------

    async def acquire(self, max_wait: float = 0.0) -> Grant | Denial:
        """Spend one call from every window, waiting up to `max_wait` seconds for budget.

        With `max_wait == 0` it never sleeps for budget. Otherwise it sleeps until the budget should
        allow a call (never longer than what is left of `max_wait`) and tries again. A denial whose wait
        is longer than what is left is returned at once: the wait can only grow with what other
        instances do, so sleeping on could not end in a grant.

        Losing a conditional write to another instance is not a denial (the budget had room), so 412
        retries go on with jitter up to MAX_CONFLICT_ATTEMPTS in a row and at most
        CONTENTION_GRACE_SECONDS past `max_wait`; under heavy contention a grant can therefore come a
        little after `max_wait`. When they are exhausted it raises LimiterContentionError.
        """
        if not (math.isfinite(max_wait) and max_wait >= 0):
            raise ValueError("max_wait must be a finite number of seconds, at least 0")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max_wait
        give_up = deadline + self.CONTENTION_GRACE_SECONDS
        conflicts = 0
        while True:
            async with self._lock:
                outcome = await self._try_acquire()
            if outcome is None:
                conflicts += 1
                self._check_contention(conflicts, loop.time(), give_up)
                await asyncio.sleep(conflict_jitter(conflicts))
                continue
            if isinstance(outcome, Grant):
                return outcome
            conflicts = 0
            remaining = deadline - loop.time()
            if outcome.wait_seconds > remaining:
                return outcome
            await asyncio.sleep(min(outcome.wait_seconds + self.SLEEP_SLACK_SECONDS, remaining))

    async def block(self, seconds: float) -> None:
        """MDE answered 429 with Retry-After `seconds`: no instance may call before it (+ margin) passes.

        BlockedUntil only ever moves later (max of the stored and the new end), so concurrent 429s
        cannot shorten each other's block.
        """
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError("a block must be a finite number of seconds, at least 0")
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.CONTENTION_GRACE_SECONDS
        conflicts = 0
        while True:
            async with self._lock:
                if await self._try_block(seconds):
                    return
            conflicts += 1
            self._check_contention(conflicts, loop.time(), give_up)
            await asyncio.sleep(conflict_jitter(conflicts))

    async def snapshot(self) -> BudgetSnapshot:
        """The budget as stored now (a fresh read, not the cache: health must show the truth)."""
        async with self._lock:
            self._cached = None
            state = await self._state()
        now_ms = self._now_ms()
        windows = []
        for window in self._windows:
            used = window_usage(state.log_ms, now_ms, window, self._margin)
            windows.append(WindowState(window.calls, window.seconds, used, max(0, window.calls - used)))
        blocked = state.blocked_until_ms / 1000 if state.blocked_until_ms > now_ms else None
        return BudgetSnapshot(windows=windows, blocked_until=blocked)

    # -- one attempt each (caller holds the lock) --------------------------------------------------

    async def _try_acquire(self) -> Grant | Denial | None:
        """Decide from the cached entity and, if granting, write conditionally. None = lost to a 412."""
        state = await self._state()
        now_ms = self._now_ms()
        wait = decide(state.log_ms, state.blocked_until_ms, now_ms, self._windows, self._margin)
        if wait > 0:
            return Denial(wait)
        log_ms = record_grant(state.log_ms, now_ms, self._windows, self._margin)
        if not await self._write(log_ms, state.blocked_until_ms, state.etag):
            return None
        return Grant(now_ms / 1000)

    async def _try_block(self, seconds: float) -> bool:
        """Move BlockedUntil later if needed; False = lost to a 412."""
        state = await self._state()
        until = block_until_ms(self._now_ms(), seconds, self._margin)
        if state.blocked_until_ms >= until:
            # The stored block can only be later than the cached one, so it already covers this one.
            return True
        return await self._write(state.log_ms, until, state.etag)

    def _check_contention(self, conflicts: int, now: float, give_up: float) -> None:
        if conflicts >= self.MAX_CONFLICT_ATTEMPTS or now >= give_up:
            raise LimiterContentionError(
                f"the shared rate-limit entity {self._partition_key}/{self._row_key} changed under "
                f"{conflicts} conditional write(s) in a row; giving up"
            )

    # -- Table round trips -----------------------------------------------------------------------

    def _now_ms(self) -> int:
        return math.floor(self._clock() * 1000)

    async def _state(self) -> _Cached:
        """The cached entity, or a fresh read (creating the entity on first use) if there is none."""
        if self._cached is None:
            self._cached = await self._load()
        return self._cached

    async def _load(self) -> _Cached:
        """Read the entity; create it empty if missing. Bounded: a create race ends in a read."""
        for _ in range(3):
            try:
                self.table_operations += 1
                entity = await self._table.get_entity(self._partition_key, self._row_key)
            except ResourceNotFoundError:
                pass
            else:
                return _Cached(
                    log_ms=parse_log(str(entity.get(LOG_PROPERTY) or "")),
                    blocked_until_ms=_int_property(entity.get(BLOCKED_UNTIL_PROPERTY)),
                    etag=str(entity.metadata["etag"]),
                )
            try:
                # A missing table also lands here and raises ResourceNotFoundError: the caller's job.
                self.table_operations += 1
                meta = await self._table.create_entity(self._entity([], 0))
            except ResourceExistsError:
                continue  # another instance created it first: read theirs
            return _Cached(log_ms=[], blocked_until_ms=0, etag=str(meta["etag"]))
        raise LimiterContentionError(
            f"the shared rate-limit entity {self._partition_key}/{self._row_key} kept appearing and "
            "disappearing"
        )

    async def _write(self, log_ms: list[int], blocked_until_ms: int, etag: str) -> bool:
        """REPLACE the entity if it still has `etag`; True and cache the result, False on 412/404.

        Any other failure leaves the outcome unknown (the write may have landed), so the cache is
        dropped and the error propagates; a grant that was written but not returned only wastes budget.
        """
        self._cached = None
        try:
            self.table_operations += 1
            meta = await self._table.update_entity(
                self._entity(log_ms, blocked_until_ms),
                mode=UpdateMode.REPLACE,
                etag=etag,
                match_condition=MatchConditions.IfNotModified,
            )
        except HttpResponseError as exc:
            if _is_conflict(exc):
                return False
            raise
        self._cached = _Cached(log_ms=log_ms, blocked_until_ms=blocked_until_ms, etag=str(meta["etag"]))
        return True

    def _entity(self, log_ms: list[int], blocked_until_ms: int) -> dict[str, Any]:
        return {
            "PartitionKey": self._partition_key,
            "RowKey": self._row_key,
            LOG_PROPERTY: format_log(log_ms),
            # Explicitly Int64: the SDK would send a Python int as Int32 and refuse an epoch in ms.
            BLOCKED_UNTIL_PROPERTY: EntityProperty(blocked_until_ms, EdmType.INT64),
        }
