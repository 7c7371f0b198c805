"""The rate limiter's decision rules, exactly, with integer milliseconds and no storage or real time."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emulators.control import max_calls_in_any_window
from shared.ratelimit import (
    MAX_CALLS_PER_WINDOW,
    RateLimiter,
    block_until_ms,
    decide,
    format_log,
    next_slot,
    parse_log,
    record_grant,
    span_ms,
    trim_log,
    window_usage,
)
from shared.settings import RateWindow

T0 = 1_700_000_000_000  # an epoch in ms
MINUTE_HOUR = (RateWindow(10, 60.0), RateWindow(500, 3600.0))


def simulate(
    windows: tuple[RateWindow, ...], margin: float, attempts_ms: list[int], log: list[int] | None = None
) -> tuple[list[int], list[int]]:
    """Try a call at each time in order, as one instance would; returns (granted times, final log)."""
    log = list(log or [])
    granted = []
    for now in attempts_ms:
        if decide(log, 0, now, windows, margin) == 0:
            log = record_grant(log, now, windows, margin)
            granted.append(now)
    return granted, log


def test_empty_log_grants() -> None:
    assert decide([], 0, T0, MINUTE_HOUR, 1.0) == 0


def test_nth_call_in_window_is_refused_with_the_exact_wait() -> None:
    windows = (RateWindow(3, 1.0),)
    log = [T0, T0 + 100, T0 + 200]
    # Full: the oldest of the last 3 leaves at T0 + 1000 (margin 0).
    assert decide(log, 0, T0 + 300, windows, 0) == pytest.approx(0.7)
    assert decide(log, 0, T0 + 999, windows, 0) == pytest.approx(0.001)
    assert decide(log, 0, T0 + 1000, windows, 0) == 0


def test_two_n_at_a_fixed_window_boundary_is_refused() -> None:
    """N calls just before a minute boundary and N just after: a fixed counter allows 2N in 2 ms."""
    windows = (RateWindow(10, 60.0),)
    boundary = (T0 // 60_000 + 1) * 60_000
    before = [boundary - 10 + i for i in range(10)]  # the last 10 ms of one fixed minute
    after = [boundary + i for i in range(10)]  # the first 10 ms of the next
    granted, _ = simulate(windows, 0, before + after)
    assert granted == before
    assert max_calls_in_any_window([t / 1000 for t in granted], 60.0) == 10


def test_sliding_log_never_exceeds_n_in_any_interval() -> None:
    """A dense stream of attempts (every 7 ms for 5 windows) never yields N + 1 grants in any W."""
    windows = (RateWindow(4, 1.0), RateWindow(10, 3.5))
    attempts = [T0 + 7 * i for i in range(2500)]
    granted, _ = simulate(windows, 0, attempts)
    seconds = [t / 1000 for t in granted]
    assert max_calls_in_any_window(seconds, 1.0) == 4
    assert max_calls_in_any_window(seconds, 3.5) == 10
    # and it is not needlessly strict: 10 calls per 3.5 s over 17.5 s is about 50 grants
    assert len(granted) >= 48


def test_denial_in_the_hour_does_not_spend_the_minute() -> None:
    """The hour window is full, the minute is not: refused, and the log (hence the minute) is unchanged."""
    windows = (RateWindow(10, 60.0), RateWindow(20, 3600.0))
    log = [T0 + i * 120_000 for i in range(20)]  # 20 calls 2 minutes apart: the minute window is empty
    now = T0 + 40 * 60_000
    assert window_usage(log, now, windows[0], 0.5) == 0
    wait = decide(log, 0, now, windows, 0.5)
    assert wait == pytest.approx((T0 + 3_600_500 - now) / 1000)
    granted, after = simulate(windows, 0.5, [now, now + 1, now + 2], log)
    assert granted == [] and after == log


def test_the_longest_wait_of_all_full_windows_wins() -> None:
    windows = (RateWindow(2, 1.0), RateWindow(3, 10.0))
    log = [T0, T0 + 5000, T0 + 9000]
    # 1-s window: 1 inside (9000), not full; 10-s window: full, T0 leaves at 10_000
    assert decide(log, 0, T0 + 9100, windows, 0) == pytest.approx(0.9)
    log2 = [T0, T0 + 9050, T0 + 9100]
    # 1-s window full until 9050 leaves at 10_050; 10-s window full until T0 leaves at 10_000
    assert decide(log2, 0, T0 + 9200, windows, 0) == pytest.approx(0.85)


def test_margin_is_honoured() -> None:
    windows = (RateWindow(1, 1.0),)
    log = [T0]
    assert decide(log, 0, T0 + 1000, windows, 0) == 0
    assert decide(log, 0, T0 + 1000, windows, 0.25) == pytest.approx(0.25)
    assert decide(log, 0, T0 + 1249, windows, 0.25) == pytest.approx(0.001)
    assert decide(log, 0, T0 + 1250, windows, 0.25) == 0


def test_decimal_spans_round_up_never_down() -> None:
    assert span_ms(RateWindow(5, 1.0), 0.05) == 1050
    assert span_ms(RateWindow(5, 1.0), 0.0005) == 1001
    assert span_ms(RateWindow(10, 60.0), 0) == 60_000


def test_blocked_until_is_honoured() -> None:
    windows = (RateWindow(10, 60.0),)
    assert decide([], T0 + 2500, T0, windows, 0) == pytest.approx(2.5)
    assert decide([], T0 + 2500, T0 + 2500, windows, 0) == 0
    # a block later than the window's wait decides; an earlier one does not
    log = [T0 - 59_000 + i for i in range(10)]
    assert decide(log, T0 + 5000, T0, windows, 0) == pytest.approx(5.0)
    assert decide(log, T0 + 500, T0, windows, 0) == pytest.approx(1.0)
    assert block_until_ms(T0, 2, 0.05) == T0 + 2050


def test_entries_ahead_of_this_clock_count() -> None:
    """Another instance's clock runs ahead: its grants lie in our future and still count."""
    windows = (RateWindow(2, 1.0),)
    log = [T0 + 300, T0 + 400]
    assert decide(log, 0, T0, windows, 0) == pytest.approx(1.3)
    # FIFO: a new entry never goes before the last one, even where the window would have room (before
    # reservations this was 0, a grant at T0 inserted ahead of the entry at T0 + 300).
    assert decide([T0 + 300], 0, T0, windows, 0) == pytest.approx(0.3)
    # record_grant itself still inserts in order, whatever it is given
    assert record_grant([T0 + 300], T0, windows, 0) == [T0, T0 + 300]


def test_trimming_keeps_what_the_longest_window_needs() -> None:
    windows = (RateWindow(3, 1.0), RateWindow(5, 10.0))
    margin = 0.5
    log = [T0, T0 + 2000, T0 + 4000, T0 + 9000, T0 + 10_000]
    now = T0 + 10_600
    kept = trim_log(log, now, windows, margin)
    # T0 is 10.6 s old (> 10.5 s span of the longest window): gone; T0 + 2000 is 8.6 s old: kept
    assert kept == log[1:]
    # the decision is the same with the trimmed log, now and later
    for later in range(now, now + 12_000, 250):
        assert decide(kept, 0, later, windows, margin) == decide(log, 0, later, windows, margin)


def test_trimming_keeps_at_most_the_largest_window_of_entries() -> None:
    """Even a log written under a larger limit shrinks to max(N), so the property stays bounded."""
    windows = (RateWindow(2, 1.0), RateWindow(4, 60.0))
    log = [T0 + i for i in range(50)]
    now = T0 + 5000
    kept = trim_log(log, now, windows, 0)
    assert kept == log[-4:]
    for later in range(now, now + 70_000, 500):
        assert decide(kept, 0, later, windows, 0) == decide(log, 0, later, windows, 0)


def test_log_round_trips_and_fits_a_table_property() -> None:
    log = [T0 + 5, T0, T0 + 3]
    assert parse_log(format_log(log)) == sorted(log)
    assert parse_log("") == []
    full = [9_999_999_999_999] * MAX_CALLS_PER_WINDOW
    assert len(format_log(full)) * 2 <= 64 * 1024  # UTF-16 bytes


def test_window_too_large_for_the_log_is_refused() -> None:
    with pytest.raises(ValueError, match="64 KiB"):
        RateLimiter(None, [RateWindow(MAX_CALLS_PER_WINDOW + 1, 3600.0)], 1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="margin"):
        RateLimiter(None, [RateWindow(10, 60.0)], -1.0)  # type: ignore[arg-type]
    RateLimiter(None, [RateWindow(MAX_CALLS_PER_WINDOW, 3600.0)], 0)  # type: ignore[arg-type]


# --- the slot rule: where the next grant or reservation goes -----------------------------------------


def test_slot_of_an_empty_log_is_now() -> None:
    assert next_slot([], 0, T0, MINUTE_HOUR, 1.0) == T0
    assert next_slot([], T0 - 1, T0, MINUTE_HOUR, 1.0) == T0  # a block in the past does not matter


def test_slot_after_a_full_short_window() -> None:
    windows = (RateWindow(3, 1.0), RateWindow(10, 60.0))
    log = [T0, T0 + 100, T0 + 200]
    # the 3rd most recent (T0) leaves (T - 1 s, T] at T0 + 1000; the minute window has room
    assert next_slot(log, 0, T0 + 300, windows, 0) == T0 + 1000
    assert next_slot(log, 0, T0 + 1000, windows, 0) == T0 + 1000
    assert next_slot(log, 0, T0 + 1500, windows, 0) == T0 + 1500
    # with a window not yet full, the slot is now (the last entry is in the past)
    assert next_slot(log[:2], 0, T0 + 300, windows, 0) == T0 + 300


def test_slot_after_a_full_long_window() -> None:
    windows = (RateWindow(2, 1.0), RateWindow(3, 10.0))
    log = [T0, T0 + 5000, T0 + 9000]
    # 1-s window: T0 + 5000 + 1000 is past; 10-s window: T0 + 10_000
    assert next_slot(log, 0, T0 + 9100, windows, 0) == T0 + 10_000
    # both full: the later of the two
    log2 = [T0, T0 + 9050, T0 + 9100]
    assert next_slot(log2, 0, T0 + 9200, windows, 0) == T0 + 10_050


def test_slot_honours_a_block() -> None:
    windows = (RateWindow(3, 1.0),)
    log = [T0, T0 + 100, T0 + 200]
    assert next_slot([], T0 + 2500, T0, windows, 0) == T0 + 2500
    assert next_slot(log, T0 + 2500, T0 + 300, windows, 0) == T0 + 2500  # later than the window's
    assert next_slot(log, T0 + 600, T0 + 300, windows, 0) == T0 + 1000  # earlier than the window's


def test_slot_is_never_before_a_future_entry() -> None:
    """FIFO: a queue of reservations is served in order, and the window rule applies to them too."""
    windows = (RateWindow(3, 1.0),)
    # one reservation ahead; the window has room at now (2 entries in (now - 1 s, now]), but not before it
    assert next_slot([T0 - 500, T0 + 400], 0, T0, windows, 0) == T0 + 400
    # three grants and three reservations after them: the next slot comes after the 3rd most recent
    # (the first reservation) leaves the window
    log = [T0, T0 + 10, T0 + 20, T0 + 1000, T0 + 1010, T0 + 1020]
    assert next_slot(log, 0, T0 + 30, windows, 0) == T0 + 2000
    assert decide(log, 0, T0 + 30, windows, 0) == pytest.approx(1.97)
    # placed one after another, the reservations land exactly one window after the entries they follow
    placed, slots = list(log[:3]), []
    for _ in range(6):
        slots.append(next_slot(placed, 0, T0 + 30, windows, 0))
        placed = record_grant(placed, slots[-1], windows, 0, now_ms=T0 + 30)
    assert slots == [T0 + 1000, T0 + 1010, T0 + 1020, T0 + 2000, T0 + 2010, T0 + 2020]


def test_slot_includes_the_margin() -> None:
    windows = (RateWindow(1, 1.0),)
    assert next_slot([T0], 0, T0 + 10, windows, 0) == T0 + 1000
    assert next_slot([T0], 0, T0 + 10, windows, 0.25) == T0 + 1250
    assert next_slot([T0], 0, T0 + 10, windows, 0.0005) == T0 + 1001  # rounded up, never down


def test_reservations_survive_trimming() -> None:
    """Trimming is as of now: a long queue of future entries keeps its most recent max(N) entries."""
    windows = (RateWindow(2, 1.0), RateWindow(3, 5.0))
    now = T0 + 100
    log, slots = [T0, T0 + 50], []
    for _ in range(6):
        slots.append(next_slot(log, 0, now, windows, 0))
        log = record_grant(log, slots[-1], windows, 0, now_ms=now)
    # each slot is the later of "1 s after the 2nd most recent" and "5 s after the 3rd most recent"
    assert slots == [T0 + 1000, T0 + 5000, T0 + 5050, T0 + 6000, T0 + 10_000, T0 + 10_050]
    assert log == [T0 + 6000, T0 + 10_000, T0 + 10_050]
    assert next_slot(log, 0, now, windows, 0) == T0 + 11_000
    # trimmed as of now, not as of the reserved time: entries that still count now stay
    assert record_grant([T0, T0 + 50], T0 + 6000, windows, 0, now_ms=now) == [T0, T0 + 50, T0 + 6000]
    assert record_grant([T0, T0 + 50], T0 + 6000, windows, 0) == [T0 + 6000]


def most_in_any_interval(times: list[int], span: int) -> int:
    """The most of `times` in any half-open interval [a, a + span), by brute force (integers, no floats)."""
    return max((sum(1 for u in times if t <= u < t + span) for t in times), default=0)


STEPS = st.lists(
    st.tuples(
        st.integers(0, 40),  # ms since the previous request
        st.integers(-100, 100),  # the requesting instance's clock error in ms
        st.integers(0, 1500),  # the request's max_wait in ms
        st.one_of(st.none(), st.integers(0, 300)),  # a 429 recorded at this moment, with this Retry-After
    ),
    min_size=1,
    max_size=60,
)
WINDOW_SETS = st.lists(
    st.builds(RateWindow, st.integers(1, 5), st.integers(1, 40).map(lambda n: n / 100)),
    min_size=1,
    max_size=3,
)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(windows=WINDOW_SETS, margin_ms=st.integers(0, 20), steps=STEPS)
def test_slots_placed_by_the_rule_never_exceed_any_window(
    windows: list[RateWindow], margin_ms: int, steps: list[tuple[int, int, int, int | None]]
) -> None:
    """Requests one after another from instances whose clocks disagree, each placed by the rule if its
    slot is within its max_wait (as `acquire` does): no half-open interval of length W + margin ever
    holds more than N entries, the entries are in order, each slot is the earliest that fits, and the
    trimmed log decides as the whole history would."""
    margin = margin_ms / 1000
    true_now, blocked = T0, 0
    log: list[int] = []  # as the limiter keeps it: trimmed
    history: list[int] = []  # every entry ever placed
    for gap, skew, max_wait, block in steps:
        true_now += gap
        now = true_now + skew  # the time as the requesting instance sees it
        if block is not None:
            blocked = max(blocked, block_until_ms(now, block / 1000, margin))
        slot = next_slot(log, blocked, now, windows, margin)
        assert slot == next_slot(history, blocked, now, windows, margin)  # trimming loses nothing
        assert slot >= max(now, blocked, *history[-1:])
        earlier = slot - 1
        if earlier >= max(now, blocked, *history[-1:]):  # the slot is the earliest that fits
            assert any(
                most_in_any_interval([*history, earlier], span_ms(w, margin)) > w.calls for w in windows
            )
        if slot - now > max_wait:
            continue  # a denial writes nothing
        log = record_grant(log, slot, windows, margin, now_ms=now)
        history.append(slot)
    assert history == sorted(history)
    for window in windows:
        assert most_in_any_interval(history, span_ms(window, margin)) <= window.calls
