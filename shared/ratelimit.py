"""The shared MDE call budget: one Table Storage entity that every alertgate instance spends from.

MDE allows each app + tenant a fixed number of batchUpdate calls per window (10 a minute and 500 an
hour), however many Functions instances make them, so the budget lives in one entity that all instances
read and write (docs/contracts.md §3):

- `Log` holds a sliding log of grant times, reserved future slots included (epoch milliseconds, sorted,
  comma-separated), trimmed to what the longest window can still need. A sliding log, unlike a fixed-window counter, is exact over
  *any* window-long interval: a counter reset at a boundary lets 2N calls through in a moment.
- `BlockedUntil` (epoch milliseconds, 0 if none) is set when MDE answers 429 with Retry-After, so every
  instance waits, not only the one that was told.

Every window is checked and the grant spent in one ETag-conditioned REPLACE, so a grant is all or
nothing and a denial (which writes nothing) never spends another window. A 412 means another instance
wrote first: the limiter re-reads and decides again, with jitter, a bounded number of times.

Reservations: a caller willing to wait (`acquire(max_wait)` with `max_wait > 0`) for whom no call fits
now does not sleep and try again. It writes the earliest future slot T that fits (`next_slot`) into the
log, in the same single conditional write a grant takes, then sleeps until T and returns `Grant(at=T)`.
Entries are added in order (FIFO: a new entry is never before the last logged one), which makes the
check exact and serves waiters, across instances, in the order their writes landed; the budget is
spent at the moment it frees up instead of at the next wake-up of a herd of retrying sleepers. A
reserved entry counts like a grant everywhere (decisions, trimming, the health snapshot). A reserved
caller never calls before T; if it learns of a 429 block covering T meanwhile it does not call at all
(an unused slot only wastes budget, which never breaks a limit).

`RATE_LIMIT_SAFETY_MARGIN_SECONDS` is added to every window: a grant stays in the log for W + margin
seconds, which absorbs clock skew between instances and the delay between a grant and the call's
arrival at MDE.

The decision itself (`next_slot`, and `decide` on top of it) and the log handling are pure
module-level functions, so the rules can be tested exactly without storage or real time.
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

from azure.data.tables import EdmType, EntityProperty

from shared.errors import LimiterContentionError
from shared.settings import RateWindow

if TYPE_CHECKING:
    from shared.storage import StateStore

# A Table string property holds at most 64 KiB of UTF-16, i.e. 32,768 characters. An epoch in
# milliseconds has 13 digits until the year 2286, so a log entry is 14 characters with its comma, and
# 2,000 entries (28,000 characters) always fit. The log never keeps more entries than the largest window
# allows calls (see `trim_log`), so bounding each window's calls bounds the property.
MAX_CALLS_PER_WINDOW = 2000

LOG_PROPERTY = "Log"
BLOCKED_UNTIL_PROPERTY = "BlockedUntil"


@dataclass(frozen=True)
class Grant:
    """One call may be made now; it is already counted in the shared log at `at` (epoch seconds).

    `at` is never after the moment the Grant is returned: a reservation's Grant is returned only once
    the clock has reached its slot.
    """

    at: float


@dataclass(frozen=True)
class Denial:
    """No call may be made yet; `wait_seconds` (> 0) is the earliest a call could be granted.

    It is a lower bound: other instances may spend or reserve the budget meanwhile, so the caller must
    still acquire (never assume a grant) when the wait is over.
    """

    wait_seconds: float


@dataclass(frozen=True)
class WindowState:
    """One window's budget at a moment: `used` entries (grants, reserved slots too) still count against
    it, `remaining` may be made."""

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

    Entries ahead of `now_ms` (reservations, or grants of an instance whose clock runs ahead) count too:
    they are spent, and the log only errs on the strict side. So `used` can exceed N while a queue of
    reservations waits.
    """
    return len(log_ms) - bisect.bisect_right(log_ms, now_ms - span_ms(window, margin_seconds))


def next_slot(
    log_ms: Sequence[int],
    blocked_until_ms: int,
    now_ms: int,
    windows: Sequence[RateWindow],
    margin_seconds: float,
) -> int:
    """The earliest time, not before `now_ms`, at which one more call fits: where the next entry goes.

    T = max(now, the last logged entry, `blocked_until_ms`, and for every window of N calls whose log
    has at least N entries, log[-N] + span), where span = W + margin (`span_ms`). `log_ms` must be
    sorted ascending.

    Entries are added in order (FIFO): T is never before the last logged entry. That makes the check
    exact. With every entry <= T, any interval of length span that contains T holds, besides T, only
    entries of (T - span, T]; intervals without T are unchanged. So T keeps every window-long interval
    at N calls or fewer iff fewer than N entries lie in (T - span, T], which (the log being sorted) is
    iff the log has fewer than N entries or its N-th most recent is at most T - span, i.e.
    T >= log[-N] + span. Each term of the max is therefore needed and together they suffice: no
    earlier T fits, and this one does.

    An entry at T is a promise that the call is made at T or later, never earlier. The check above
    covers only intervals containing T; a call made at t < T also falls in intervals ending before T,
    such as (t - span, t], which reach further back and may already hold N entries (T was later than
    now precisely because some window or the block had no room before it), so the early call could be
    the N + 1st. Calling later than T is the lag between a grant and its call's arrival at MDE that the
    safety margin absorbs, as for any grant.
    """
    slot = max(now_ms, blocked_until_ms)
    if log_ms:
        slot = max(slot, log_ms[-1])
    for window in windows:
        if len(log_ms) >= window.calls:
            slot = max(slot, log_ms[-window.calls] + span_ms(window, margin_seconds))
    return slot


def decide(
    log_ms: Sequence[int],
    blocked_until_ms: int,
    now_ms: int,
    windows: Sequence[RateWindow],
    margin_seconds: float,
) -> float:
    """Seconds to wait before a call may be granted at `now_ms`; 0 means grant now.

    This is `next_slot` less `now_ms`: a call is granted now only if now is the earliest slot, i.e. for
    every window of N calls per W seconds fewer than N logged entries lie in the last W + margin
    seconds, `now_ms` is not before `blocked_until_ms`, and no entry lies ahead of `now_ms`. Entries
    ahead of now are reservations other instances hold (or grants of an instance whose clock runs
    ahead); a new entry goes after them (FIFO), so a denial's wait accounts for them: with a queue of
    reservations it is the wait until the slot after the last one, not until the budget first frees up.
    The wait is a lower bound, since other instances may reserve meanwhile. `log_ms` must be sorted
    ascending.
    """
    return (next_slot(log_ms, blocked_until_ms, now_ms, windows, margin_seconds) - now_ms) / 1000


def trim_log(
    log_ms: Sequence[int], now_ms: int, windows: Sequence[RateWindow], margin_seconds: float
) -> list[int]:
    """Keep only the entries (grants and reservations) a future decision can need.

    A decision at `now_ms` or later (`next_slot`) looks at the last entry and, for each window, at the
    N-th most recent one, which matters only if it lies within W + margin of the decision; so entries
    older than the longest span as of `now_ms`, and all but the most recent max(N) entries, can go. The
    second rule bounds the property's size even if the windows are reconfigured to fewer calls. Entries
    in the future (reservations) are the most recent ones, so they always stay.
    """
    longest = max(span_ms(w, margin_seconds) for w in windows)
    keep_from = bisect.bisect_right(log_ms, now_ms - longest)
    most = max(w.calls for w in windows)
    return list(log_ms[max(keep_from, len(log_ms) - most) :])


def record_grant(
    log_ms: Sequence[int],
    at_ms: int,
    windows: Sequence[RateWindow],
    margin_seconds: float,
    *,
    now_ms: int | None = None,
) -> list[int]:
    """The log after a grant or reservation at `at_ms`: inserted in order, then trimmed as of `now_ms`.

    The slot from `next_slot` is never before the last entry, so it is appended; insertion in order
    keeps the log sorted whatever it is given. Trimming is as of `now_ms` (default `at_ms`), not the
    reserved time: entries that still count at `now_ms` must stay for the health snapshot and for any
    instance deciding at its own now. A future entry is never trimmed (it is the latest, and trimming
    keeps the most recent entries).
    """
    updated = list(log_ms)
    bisect.insort(updated, at_ms)
    return trim_log(updated, at_ms if now_ms is None else now_ms, windows, margin_seconds)


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
    they do not make each other's writes fail with 412; it is held for a decision and its write, never
    for the sleep until a reserved slot.

    The table is created by the caller; the entity is created here on first use.
    """

    MAX_CONFLICT_ATTEMPTS = 30
    """412s in a row before LimiterContentionError (a class attribute so tests can lower it)."""

    CONTENTION_GRACE_SECONDS = 5.0
    """How long one call's 412 retries may go on, counted from the call (they all come before any sleep
    until a reserved slot): enough for 30 jittered attempts, yet bounded."""

    SLEEP_SLACK_SECONDS = 0.002
    """Added to the sleep until a reserved slot so the clock has surely reached the slot's millisecond."""

    BLOCK_CHECK_LEAD_MS = 150
    """How long before a reserved slot the row is read afresh for a 429 another instance recorded; a
    block recorded within this lead is still missed (the call's own 429 then blocks everyone)."""

    WAKE_TOLERANCE_SECONDS = 1.0
    """How long past its slot (by the event loop's monotonic clock) a reserved caller keeps waiting for
    the limiter's clock to reach the slot, should that clock be set back meanwhile; then it gives up the
    slot with a Denial rather than call early."""

    def __init__(
        self,
        table: StateStore,
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
        self._known_block_ms = 0  # the latest BlockedUntil this object has read or written
        self._lock = asyncio.Lock()
        self.table_operations = 0

    @property
    def windows(self) -> tuple[RateWindow, ...]:
        return self._windows

    # -- public API ---------------------------------------------------------------------------------

    async def acquire(self, max_wait: float = 0.0) -> Grant | Denial:
        """Spend one call from every window, waiting up to `max_wait` seconds for budget.

        If a call fits now, it is granted at once. Otherwise, if the earliest slot that fits
        (`next_slot`) is at most `max_wait` away, the slot is reserved (written into the shared log in
        the one conditional write a grant takes), and after sleeping until it (outside the lock) the
        Grant is returned with `at` = the slot: a Grant from `acquire` always means "you may call now".
        If the slot is further away, a Denial with the wait until it is returned at once and nothing is
        written. With `max_wait == 0` it never reserves nor sleeps for budget. It is `reserve` followed
        by `wait_for`.
        """
        outcome = await self.reserve(max_wait)
        return outcome if isinstance(outcome, Denial) else await self.wait_for(outcome)

    async def reserve(self, max_wait: float = 0.0, *, lead: float = 0.0) -> Grant | Denial:
        """Like `acquire`, but without the sleep: a reserved slot comes back as a Grant whose `at` may lie
        ahead, and the caller must not call before `wait_for(grant)` has returned a Grant.

        This lets a caller prepare its call (the dispatcher marks its chunk Sending) while the slot
        approaches, so that the call leaves at the slot rather than a write's latency after it. With a
        `lead`, the slot is never sooner than `lead` seconds from now, which gives that preparation its
        time even when budget is free at once; `max_wait` counts from the end of the lead.

        Losing a conditional write to another instance is not a denial (the budget had room), so 412
        retries go on with jitter up to MAX_CONFLICT_ATTEMPTS in a row and for at most
        CONTENTION_GRACE_SECONDS from the call; time they take comes out of `max_wait`, but a call
        that fits at once is granted even when none is left, so under heavy contention a grant can come
        a little after `max_wait`. When they are exhausted it raises LimiterContentionError.
        """
        if not (math.isfinite(max_wait) and max_wait >= 0):
            raise ValueError("max_wait must be a finite number of seconds, at least 0")
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + max_wait
        give_up = started + self.CONTENTION_GRACE_SECONDS
        conflicts = 0
        while True:
            async with self._lock:
                outcome = await self._try_acquire(deadline if max_wait > 0 else None, lead)
            if outcome is not None:
                break
            conflicts += 1
            self._check_contention(conflicts, loop.time(), give_up)
            await asyncio.sleep(conflict_jitter(conflicts))
        if isinstance(outcome, Denial):
            return outcome
        slot_ms, _ = outcome
        return Grant(slot_ms / 1000)

    async def reserve_many(
        self, count: int, max_wait: float = 0.0, *, lead: float = 0.0
    ) -> list[Grant] | Denial:
        """`count` grants in one conditional write, all within `max_wait` (after `lead`), or a Denial with
        the wait until the last of them would come and nothing written.

        The PATCH channel sends a chunk as one call per alert (docs/contracts.md §7): its pieces go
        only if every one of them gets a slot in time, so they are taken together or not at all. Each
        slot follows the one before it exactly as `next_slot` places a single call.
        """
        if count < 1:
            raise ValueError("count must be at least 1")
        if not (math.isfinite(max_wait) and max_wait >= 0):
            raise ValueError("max_wait must be a finite number of seconds, at least 0")
        loop = asyncio.get_running_loop()
        started = loop.time()
        conflicts = 0
        while True:
            async with self._lock:
                outcome = await self._try_acquire_many(count, max_wait - (loop.time() - started), lead)
            if outcome is not None:
                return outcome
            conflicts += 1
            self._check_contention(conflicts, loop.time(), started + self.CONTENTION_GRACE_SECONDS)
            await asyncio.sleep(conflict_jitter(conflicts))

    async def _try_acquire_many(
        self, count: int, max_wait: float, lead: float
    ) -> list[Grant] | Denial | None:
        state = await self._state()
        now_ms = self._now_ms()
        earliest_ms = now_ms + math.ceil(lead * 1000)
        log_ms, slots = list(state.log_ms), []
        for _ in range(count):
            slot_ms = next_slot(log_ms, state.blocked_until_ms, earliest_ms, self._windows, self._margin)
            slots.append(slot_ms)
            log_ms = record_grant(log_ms, slot_ms, self._windows, self._margin, now_ms=now_ms)
        wait = (slots[-1] - earliest_ms) / 1000
        if wait > 0 and wait > max(0.0, max_wait):
            return Denial(wait)
        if not await self._write(log_ms, state.blocked_until_ms, state.etag):
            return None
        return [Grant(slot / 1000) for slot in slots]

    async def wait_for(self, grant: Grant) -> Grant | Denial:
        """Sleep until a reserved slot comes (at once for a grant of now); then the Grant, or a Denial.

        The wait is by the limiter's clock (the one the log is kept in). If this object has meanwhile
        recorded or read (it reads the row afresh after sleeping for a reserved slot) a 429 block that
        lasts past the slot, a Denial for the rest of the block comes
        back instead: the slot goes unused (always safe), as it does if the caller is cancelled while
        it sleeps. So does a slot the clock has not reached WAKE_TOLERANCE_SECONDS after it should have
        (the clock was set back): never call before the slot.
        """
        slot_ms = round(grant.at * 1000)
        loop = asyncio.get_running_loop()
        latest = loop.time() + (slot_ms - self._now_ms()) / 1000 + self.WAKE_TOLERANCE_SECONDS
        look_ms = slot_ms - self.BLOCK_CHECK_LEAD_MS
        if look_ms > self._now_ms():
            # Another instance may record a 429 while we sleep, and this object would not know: one fresh
            # read shortly before a reserved slot (a grant of now needs none: its write just saw the row).
            # Read ahead of the slot, not at it, so the read never makes the call late.
            await self._sleep_until(look_ms, latest)
            async with self._lock:
                self._cached = None
                await self._state()
        early = await self._sleep_until(slot_ms, latest)
        if early > 0:
            return Denial(early)
        if self._known_block_ms > slot_ms:
            # A 429 recorded since the reservation covers the slot. The remaining block is at least a
            # millisecond (a Denial's wait is positive) even if the block ended while we slept.
            return Denial(max(self._known_block_ms - self._now_ms(), 1) / 1000)
        return grant

    async def release(self, grant: Grant) -> bool:
        """Take back a grant whose call was not made and never will be: its entry leaves the shared log,
        so the budget it held is free again (False if the entry had gone already).

        Only for a call that certainly did not start (the dispatcher gives a grant up before its call
        when the grant has grown too old, or when its chunk turns out to wait behind an earlier update):
        the log must count every call that reached MDE. Bounded like `acquire`'s 412 retries.
        """
        slot_ms = round(grant.at * 1000)
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.CONTENTION_GRACE_SECONDS
        conflicts = 0
        while True:
            async with self._lock:
                released = await self._try_release(slot_ms)
            if released is not None:
                return released
            conflicts += 1
            self._check_contention(conflicts, loop.time(), give_up)
            await asyncio.sleep(conflict_jitter(conflicts))

    async def move(self, grant: Grant, max_wait: float = 0.0, *, lead: float = 0.0) -> Grant | Denial:
        """Move a grant whose call has not started to the earliest slot at least `lead` seconds from now
        and within `max_wait` after that, its own slot freed first: one conditional write, so no other
        caller takes the freed slot in between (a release and a new reservation would leave that
        window). A Denial writes nothing: the grant stays in the log, and the caller releases it.

        For a call whose members were marked only after its slot had passed (Sender._fresh_slot): the
        late call goes at a slot of its own instead of at a time the log never counted."""
        if not (math.isfinite(max_wait) and max_wait >= 0):
            raise ValueError("max_wait must be a finite number of seconds, at least 0")
        old_ms = round(grant.at * 1000)
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline, give_up = started + max_wait, started + self.CONTENTION_GRACE_SECONDS
        conflicts = 0
        while True:
            async with self._lock:
                outcome = await self._try_move(old_ms, deadline, lead)
            if outcome is not None:
                break
            conflicts += 1
            self._check_contention(conflicts, loop.time(), give_up)
            await asyncio.sleep(conflict_jitter(conflicts))
        return outcome if isinstance(outcome, Denial) else Grant(outcome / 1000)

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

    def expected_wait(self) -> float:
        """How long a call asked for now would wait, from the entity as this process last saw it (no
        I/O; 0 if it has seen none): an estimate for Retry-After, never a grant. Other instances may
        have spent or freed budget since."""
        if self._cached is None:
            return 0.0
        blocked = max(self._cached.blocked_until_ms, self._known_block_ms)
        return decide(self._cached.log_ms, blocked, self._now_ms(), self._windows, self._margin)

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

    async def _try_acquire(
        self, deadline: float | None, lead: float = 0.0
    ) -> tuple[int, int] | Denial | None:
        """Decide from the cached entity and, for a grant now (`lead` from now) or a reservation of a slot
        before `deadline` (event loop time, plus the lead; None: no reservation), write conditionally:
        (slot, now) in epoch ms if written, a Denial, or None = lost to a 412."""
        state = await self._state()
        now_ms = self._now_ms()
        earliest_ms = now_ms + math.ceil(lead * 1000)
        slot_ms = next_slot(state.log_ms, state.blocked_until_ms, earliest_ms, self._windows, self._margin)
        wait = (slot_ms - earliest_ms) / 1000
        max_wait = 0.0 if deadline is None else deadline - asyncio.get_running_loop().time()
        if wait > 0 and wait > max_wait:
            return Denial(wait)
        log_ms = record_grant(state.log_ms, slot_ms, self._windows, self._margin, now_ms=now_ms)
        if not await self._write(log_ms, state.blocked_until_ms, state.etag):
            return None
        return slot_ms, now_ms

    async def _try_move(self, old_ms: int, deadline: float, lead: float) -> int | Denial | None:
        """The moved grant's slot in epoch ms if written, a Denial, or None = lost to a 412."""
        state = await self._state()
        log_ms = list(state.log_ms)
        if old_ms in log_ms:
            log_ms.remove(old_ms)
        now_ms = self._now_ms()
        earliest_ms = now_ms + math.ceil(lead * 1000)
        slot_ms = next_slot(log_ms, state.blocked_until_ms, earliest_ms, self._windows, self._margin)
        wait = (slot_ms - earliest_ms) / 1000
        if wait > 0 and wait > deadline - asyncio.get_running_loop().time():
            return Denial(wait)
        log_ms = record_grant(log_ms, slot_ms, self._windows, self._margin, now_ms=now_ms)
        if not await self._write(log_ms, state.blocked_until_ms, state.etag):
            return None
        return slot_ms

    async def _try_block(self, seconds: float) -> bool:
        """Move BlockedUntil later if needed; False = lost to a 412."""
        state = await self._state()
        until = block_until_ms(self._now_ms(), seconds, self._margin)
        if state.blocked_until_ms >= until:
            # The stored block can only be later than the cached one, so it already covers this one.
            return True
        return await self._write(state.log_ms, until, state.etag)

    async def _try_release(self, slot_ms: int) -> bool | None:
        """Remove one entry at `slot_ms`; False if there is none (in a fresh read), None = lost to a 412."""
        state = await self._state()
        if slot_ms not in state.log_ms:
            self._cached = None  # make sure: read it fresh
            state = await self._state()
            if slot_ms not in state.log_ms:
                return False
        log_ms = list(state.log_ms)
        log_ms.remove(slot_ms)
        return await self._write(log_ms, state.blocked_until_ms, state.etag)

    async def _sleep_until(self, at_ms: int, latest: float) -> float:
        """Sleep until the limiter's clock reaches `at_ms`; 0.0 once it has, or the seconds still to go
        if it has not by `latest` (event loop time). Bounded: every round sleeps at least the slack."""
        loop = asyncio.get_running_loop()
        while True:
            left = (at_ms - self._now_ms()) / 1000
            if left <= 0:
                return 0.0
            now = loop.time()
            if now >= latest:
                return left
            await asyncio.sleep(min(left, latest - now) + self.SLEEP_SLACK_SECONDS)

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
            self.table_operations += 1
            entity = await self._table.get(self._partition_key, self._row_key)
            if entity is not None:
                blocked_until_ms = _int_property(entity.get(BLOCKED_UNTIL_PROPERTY))
                self._known_block_ms = max(self._known_block_ms, blocked_until_ms)
                return _Cached(
                    log_ms=parse_log(str(entity.get(LOG_PROPERTY) or "")),
                    blocked_until_ms=blocked_until_ms,
                    etag=str(entity.metadata["etag"]),
                )
            self.table_operations += 1
            etag = await self._table.insert(self._entity([], 0))
            if etag is not None:
                return _Cached(log_ms=[], blocked_until_ms=0, etag=etag)
            # another instance created it first: read theirs
        raise LimiterContentionError(
            f"the shared rate-limit entity {self._partition_key}/{self._row_key} kept appearing and "
            "disappearing"
        )

    async def _write(self, log_ms: list[int], blocked_until_ms: int, etag: str) -> bool:
        """REPLACE the entity if it still has `etag`; True and cache the result, False if it moved.

        A write whose answer was lost is settled by the storage seam (read back); what it cannot settle
        raises StorageUnavailable with the cache dropped. A grant written but not returned only wastes
        budget.
        """
        self._cached = None
        self.table_operations += 1
        new_etag = await self._table.replace(self._entity(log_ms, blocked_until_ms), etag)
        if new_etag is None:
            return False
        self._cached = _Cached(log_ms=log_ms, blocked_until_ms=blocked_until_ms, etag=new_etag)
        self._known_block_ms = max(self._known_block_ms, blocked_until_ms)
        return True

    def _entity(self, log_ms: list[int], blocked_until_ms: int) -> dict[str, Any]:
        return {
            "PartitionKey": self._partition_key,
            "RowKey": self._row_key,
            LOG_PROPERTY: format_log(log_ms),
            # Explicitly Int64: the SDK would send a Python int as Int32 and refuse an epoch in ms.
            BLOCKED_UNTIL_PROPERTY: EntityProperty(blocked_until_ms, EdmType.INT64),
        }
