"""bench.reference: hand-computed minima, and every answer checked against an independent brute force.

The brute force here shares nothing with the scheduler but the model: integer times, one time step at
a time, every subset of waiting same-key updates as a batchUpdate call, any PATCH piece, or waiting.
It is exhaustive on integer inputs because every call of an optimal schedule can be moved to the
earliest moment allowed, which is then an integer (an arrival, or a sum of an arrival and window
lengths). Random instances are seeded, so the test is deterministic; sizes are small enough that the
whole file runs in about a second on the 2-core machine.
"""

from __future__ import annotations

import itertools
import math
import random
from functools import cache

import pytest

from bench.reference import (
    BATCH,
    PATCH,
    Call,
    Drain,
    Update,
    check,
    minimum_drain,
    minimum_schedule,
    one_call_per_request,
)
from shared.settings import RateWindow

Windows = list[tuple[int, int]]


def one_alert(arrival: float, alert: str, key: str = "k") -> Update:
    return Update(arrival, (alert,), key)


def assert_valid(
    updates: list[Update], drain: Drain, batch: Windows, patch: Windows | None, **caps: int
) -> None:
    assert check(updates, drain, batch, patch, **caps) == []


# --- hand-computed cases ------------------------------------------------------------------------------


def test_one_update_is_applied_when_it_arrives() -> None:
    updates = [one_alert(5.0, "x")]
    drain = minimum_drain(updates, [(1, 10)])
    # Nothing is waiting and no window is spent: one call at its arrival, 5.
    assert drain.makespan == 5.0
    assert drain.calls == (Call(BATCH, 5.0, (0,)),)
    assert drain.exact


def test_identical_updates_wait_for_one_call_when_that_is_sooner() -> None:
    updates = [one_alert(0, "x"), one_alert(1, "y"), one_alert(2, "z")]
    drain = minimum_drain(updates, [(1, 10)])
    # Batch 1/10, no PATCH. Never waiting would send x at 0 and y, z together at 0 + 10 = 10. The ideal
    # gateway knows the arrivals: one call at 2, the last arrival, carries all three (same key, disjoint
    # alerts). That is the minimum, 2: no update can be applied before the last one arrives.
    assert drain.makespan == 2
    assert drain.calls == (Call(BATCH, 2, (0, 1, 2)),)
    # One call per request: 0, then 0 + 10 = 10, then 10 + 10 = 20.
    assert one_call_per_request(updates, [(1, 10)]).makespan == 20


def test_identical_updates_all_waiting_go_in_one_call() -> None:
    updates = [one_alert(0, a) for a in "xyz"]
    # All at 0 with batch 1/10: one call at 0 with all three; one call per request: 0, 10, 20.
    assert minimum_drain(updates, [(1, 10)]).makespan == 0
    assert one_call_per_request(updates, [(1, 10)]).makespan == 20


def test_distinct_comments_use_the_patch_budget_for_the_small_updates() -> None:
    updates = [Update(0, ("x1", "x2"), "A"), Update(0, ("y",), "B"), Update(0, ("z",), "C")]
    batch, patch = [(1, 10)], [(2, 10)]
    drain = minimum_drain(updates, batch, patch)
    # Three keys, so no coalescing. batchUpdate has one call at 0; PATCH two. The two-alert update in the
    # batch call and y, z as one PATCH each: everything at 0. (The other way round, the two-alert update
    # takes both PATCH calls, and y or z waits for the batch window: 0 + 10 = 10.)
    assert drain.makespan == 0
    assert [c.members for c in drain.calls_on(BATCH)] == [(0,)]
    assert sorted(c.alert or "" for c in drain.calls_on(PATCH)) == ["y", "z"]
    assert_valid(updates, drain, batch, patch)


def test_a_fourth_distinct_update_waits_for_a_window() -> None:
    updates = [one_alert(0, a, key=a) for a in "wxyz"]
    # batchUpdate 1/10 and PATCH 2/10 give three calls at 0; the fourth waits until 0 + 10 = 10 on
    # either channel.
    assert minimum_drain(updates, [(1, 10)], [(2, 10)]).makespan == 10


def test_patch_off_leaves_one_channel() -> None:
    updates = [one_alert(0, a, key=a) for a in "xyz"]
    # No PATCH: three keys need three batchUpdate calls at 0, 10, 20.
    drain = minimum_drain(updates, [(1, 10)], None)
    assert drain.makespan == 20
    assert drain.calls_on(PATCH) == []
    assert_valid(updates, drain, [(1, 10)], None)


def test_per_alert_order_a_then_b_on_one_alert() -> None:
    updates = [one_alert(0, "x", key="A"), one_alert(0, "x", key="B")]
    # Batch 1/10: A at 0, and B only after A is applied: the next window, 10.
    drain = minimum_drain(updates, [(1, 10)])
    assert drain.makespan == 10
    assert [c.members for c in drain.calls] == [(0,), (1,)]
    # With PATCH 1/10 too, one goes by each channel, both at 0: A's call first, then B's.
    both = minimum_drain(updates, [(1, 10)], [(1, 10)])
    assert both.makespan == 0
    assert [c.members for c in both.calls] == [(0,), (1,)]
    assert {c.channel for c in both.calls} == {BATCH, PATCH}
    assert_valid(updates, both, [(1, 10)], [(1, 10)])


def test_per_alert_order_forbids_coalescing_with_an_earlier_update_of_the_alert() -> None:
    updates = [one_alert(0, "x", key="A"), one_alert(0, "x", key="A"), one_alert(0, "y", key="A")]
    # All one key, but the first two share x: the second may not share the first's call, so x, y at 0
    # and the second x at 0 + 10 = 10 (batch 1/10).
    drain = minimum_drain(updates, [(1, 10)])
    assert drain.makespan == 10
    assert [c.members for c in drain.calls] == [(0, 2), (1,)]


def test_a_later_update_may_not_overtake_on_either_channel() -> None:
    updates = [one_alert(0, "x", key="A"), one_alert(1, "x", key="B"), one_alert(5, "y", key="A")]
    # B (x, arrives 1) must follow A (x). A could wait for y at 5 to share a call, but then B goes at 5
    # at the soonest (PATCH 1/10, free) and everything is done at 5; A at 0 alone costs the only batch
    # call until 10, so y would wait until 10. The minimum is 5: A and y at 5, B by PATCH at 5.
    drain = minimum_drain(updates, [(1, 10)], [(1, 10)])
    assert drain.makespan == 5
    assert drain.completions[1] == 5
    assert_valid(updates, drain, [(1, 10)], [(1, 10)])


def test_a_call_holds_at_most_max_members() -> None:
    updates = [one_alert(0, f"a{n}") for n in range(101)]
    # 101 identical updates at 0, batch 1/10: 100 in one call, the 101st in another; the first at 0,
    # the second at 0 + 10 = 10 (which of them goes first does not matter).
    drain = minimum_drain(updates, [(1, 10)])
    assert drain.makespan == 10
    assert sorted(len(c.members) for c in drain.calls) == [1, 100]
    # With PATCH 1/10 the 101st goes by PATCH at 0.
    assert minimum_drain(updates, [(1, 10)], [(1, 10)]).makespan == 0


def test_a_call_holds_at_most_max_alerts() -> None:
    updates = [Update(0, (f"a{n}", f"b{n}"), "k") for n in range(3)]
    # Six alerts, at most four in a call: two calls, 0 and 0 + 10 = 10.
    drain = minimum_drain(updates, [(1, 10)], max_alerts_per_call=4)
    assert drain.makespan == 10
    assert_valid(updates, drain, [(1, 10)], None, max_alerts_per_call=4)


def test_sliding_windows_count_as_the_emulator_does() -> None:
    updates = [one_alert(0, a, key=a) for a in "vwxyz"]
    # 2/1 and 3/10, five keys at 0: calls at 0, 0; the third needs the 1-s window clear, 0 + 1 = 1; the
    # fourth needs fewer than 3 in (t - 10, t], so 0 + 10 = 10, and the fifth 10 (only 1 and 10 within
    # (0, 10]); a sixth would wait for 1 + 10 = 11.
    windows = [(2, 1), (3, 10)]
    assert minimum_schedule([0.0] * 6, [RateWindow(2, 1), RateWindow(3, 10)]) == [0, 0, 1, 10, 10, 11]
    assert minimum_drain(updates, windows).makespan == 10
    assert one_call_per_request(updates, windows).makespan == 10


def test_one_call_per_request_keeps_arrival_order() -> None:
    updates = [one_alert(1.0, "y"), one_alert(0.5, "x"), one_alert(1.0, "z")]
    drain = one_call_per_request(updates, [(1, 10)])
    # Accepted x (0.5), y (1.0, given first), z (1.0): calls at 0.5, 10.5, 20.5.
    assert [(c.time, c.members) for c in drain.calls] == [(0.5, (1,)), (10.5, (0,)), (20.5, (2,))]


def test_workload_a_shape_is_the_last_arrival() -> None:
    updates = [one_alert(n * 2.0 / 200, f"a{n}", key="script") for n in range(200)]
    drain = minimum_drain(updates, [(5, 2), (20, 20)], [(50, 2), (60, 20)])
    # 200 identical one-alert updates over 2 s: two calls at the last arrival, 1.99, of 100 each.
    assert drain.makespan == pytest.approx(1.99)
    assert drain.exact and drain.method == "lower bound attained"
    assert_valid(updates, drain, [(5, 2), (20, 20)], [(50, 2), (60, 20)])


def test_workload_b_shape() -> None:
    sizes = [1, 1, 2, 3] * 15
    updates = [
        Update(n * 3.0 / 60, tuple(f"b{n}.{k}" for k in range(size)), f"incident {n}")
        for n, size in enumerate(sizes)
    ]
    batch, patch = [(5, 2), (20, 20)], [(50, 2), (60, 20)]
    drain = minimum_drain(updates, batch, patch)
    # 60 keys, 105 alerts, one every 50 ms. The 15 three-alert incidents go by batchUpdate (15 calls),
    # the 30 one-alert and 15 two-alert ones by PATCH (60 calls). Backwards from a makespan T, PATCH can
    # make 50 calls at T and 10 at T - 2, all after the last arrival 2.95 if T >= 4.95; batchUpdate 5 at
    # T, 5 at T - 2, 5 at T - 4, and the five at T - 4 need five incidents arrived by then: the first five
    # three-alert ones arrive at 0.15, 0.35, 0.55, 0.75, 0.95, so T - 4 >= 0.95, T = 4.95.
    assert drain.makespan == pytest.approx(4.95)
    assert drain.exact
    assert len(drain.calls_on(BATCH)) == 15 and len(drain.calls_on(PATCH)) == 60
    assert_valid(updates, drain, batch, patch)
    # Without PATCH: 60 calls at 5/2, 20/20: call 60 at 46.2 (the last of the third 20-s period).
    assert minimum_drain(updates, batch, None).makespan == pytest.approx(46.2)


def test_the_checker_finds_broken_rules() -> None:
    updates = [one_alert(0, "x", key="A"), one_alert(0, "x", key="B")]
    broken = Drain(0, (Call(PATCH, 0, (1,), "x"), Call(BATCH, 1, (0,))), (1, 0), 0, True, "hand-made, wrong")
    problems = check(updates, broken, [(1, 10)], [(1, 10)])
    assert any("before the earlier update" in p for p in problems)
    assert any("makespan" in p for p in problems)
    assert check(updates, broken, [(1, 10)], None) != []  # PATCH without a PATCH channel


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError):
        minimum_drain([], [(1, 10)])
    with pytest.raises(ValueError):
        minimum_drain([one_alert(0, "x")], [(0, 10)])
    with pytest.raises(ValueError):
        minimum_drain([Update(0, ("a", "b"), "k")], [(1, 10)], max_alerts_per_call=1)


# --- the brute force ----------------------------------------------------------------------------------


def brute_force(
    updates: list[Update], batch: Windows, patch: Windows | None, max_members: int, max_alerts: int
) -> int:
    """The least makespan by trying, at each integer moment from the first arrival, every call that
    may be made (or none) and every sequence of them, with memory over (moment, alerts applied,
    each channel's calls in the longest window). Integer inputs only."""
    order = sorted(range(len(updates)), key=lambda i: (updates[i].arrival, i))
    rank = {i: r for r, i in enumerate(order)}
    alerts = [tuple(dict.fromkeys(u.alerts)) for u in updates]
    pieces = [(i, a) for i in range(len(updates)) for a in alerts[i]]
    bit = {piece: 1 << n for n, piece in enumerate(pieces)}
    whole = [sum(bit[(i, a)] for a in alerts[i]) for i in range(len(updates))]
    everything = (1 << len(pieces)) - 1
    earlier = [
        [j for j in range(len(updates)) if rank[j] < rank[i] and set(alerts[i]) & set(alerts[j])]
        for i in range(len(updates))
    ]
    horizon = int(one_call_per_request(updates, batch).makespan)
    longest = max(w for _, w in [*batch, *(patch or [])])

    def may_call(history: tuple[int, ...], now: int, windows: Windows) -> bool:
        return all(sum(1 for t in history if now - w < t <= now) < n for n, w in windows)

    def keep(history: tuple[int, ...], now: int) -> tuple[int, ...]:
        return tuple(t for t in history if t > now - longest)

    @cache
    def least(now: int, done: int, hb: tuple[int, ...], hp: tuple[int, ...]) -> float:
        best = math.inf

        def applied(i: int) -> bool:
            return done & whole[i] == whole[i]

        free = [
            i
            for i in range(len(updates))
            if not applied(i) and updates[i].arrival <= now and all(applied(j) for j in earlier[i])
        ]
        if may_call(hb, now, batch):
            untouched = [i for i in free if done & whole[i] == 0]
            for size in range(1, min(len(untouched), max_members) + 1):
                for group in itertools.combinations(untouched, size):
                    ids = [a for i in group for a in alerts[i]]
                    if len({updates[i].key for i in group}) > 1 or len(ids) != len(set(ids)):
                        continue
                    if len(ids) > max_alerts:
                        continue
                    after = done | sum(whole[i] for i in group)
                    best = min(
                        best, now if after == everything else least(now, after, keep((*hb, now), now), hp)
                    )
        if patch is not None and may_call(hp, now, patch):
            for i in free:
                piece = next(bit[(i, a)] for a in alerts[i] if not done & bit[(i, a)])  # pieces are alike
                after = done | piece
                best = min(best, now if after == everything else least(now, after, hb, keep((*hp, now), now)))
        if now < horizon and best > now + 1:
            best = min(best, least(now + 1, done, keep(hb, now + 1), keep(hp, now + 1)))
        return best

    result = least(int(min(u.arrival for u in updates)), 0, (), ())
    assert result < math.inf
    return int(result)


def random_instance(rng: random.Random) -> tuple[list[Update], Windows, Windows | None, int]:
    """Up to 6 updates of 1-3 alerts from a small pool (so alerts are shared and order binds), two keys,
    arrivals 0-3, one or two batch windows, PATCH or not, a member cap of 100 or a small one."""
    count = rng.randint(1, 6)
    pool = [f"x{n}" for n in range(rng.randint(3, 7))]
    budget = 7 if count == 6 else 9  # alerts in all: the brute force's time grows as 2 ** alerts
    updates = []
    for n in range(count):
        size = min(rng.choice([1, 1, 1, 2, 2, 3]), budget - (count - n - 1))
        budget -= size
        updates.append(Update(rng.randint(0, 3), tuple(rng.sample(pool, size)), rng.choice("AB")))
    batch = [(rng.randint(1, 2), rng.randint(1, 3))]
    if rng.random() < 0.4:
        batch.append((batch[0][0] + 1, rng.randint(batch[0][1] + 1, 5)))
    patch = None if rng.random() < 0.3 else [(rng.randint(1, 3), rng.randint(1, 3))]
    return updates, batch, patch, rng.choice([100, 100, 2, 3])


def test_the_minimum_agrees_with_the_brute_force() -> None:
    rng = random.Random(20261127)
    methods: dict[str, int] = {}
    for case in range(150):
        updates, batch, patch, cap = random_instance(rng)
        expected = brute_force(updates, batch, patch, cap, 500)
        drain = minimum_drain(updates, batch, patch, max_members=cap)
        where = f"case {case}: {updates} batch {batch} patch {patch} cap {cap}"
        assert drain.makespan == expected, where
        assert drain.exact, where
        assert_valid(updates, drain, batch, patch, max_members=cap)
        # Without the exhaustive search: the bound is never above the minimum, the schedule never
        # below it, and "exact" (the bound attained) is only claimed when it is the minimum.
        bounded = minimum_drain(updates, batch, patch, max_members=cap, search_limit=0)
        assert bounded.lower_bound <= expected <= bounded.makespan, where
        assert bounded.exact == (bounded.makespan == expected == bounded.lower_bound), where
        assert_valid(updates, bounded, batch, patch, max_members=cap)
        methods[bounded.method] = methods.get(bounded.method, 0) + 1
    # Both paths are exercised: most instances by the bound, the rest (order binding) by the search.
    assert methods.get("lower bound attained", 0) >= 90 and methods.get("bounds only", 0) >= 10, methods


def test_without_shared_alerts_the_bound_is_always_attained() -> None:
    """Without per-alert order (and within the alert cap) the list schedule of step 2 is the relaxation's
    own EDF schedule, so the bound is always attained: what workloads (a) and (b) of bench.throughput
    rely on. (That the bound is the minimum is the previous test's business.)"""
    rng = random.Random(7)
    for case in range(150):
        updates, batch, patch, cap = random_instance(rng)
        disjoint = [
            Update(u.arrival, tuple(f"{n}{a}" for a in u.alerts), u.key) for n, u in enumerate(updates)
        ]
        drain = minimum_drain(disjoint, batch, patch, max_members=cap, search_limit=0)
        assert drain.method == "lower bound attained", f"case {case}: {disjoint} {batch} {patch} {cap}"
        assert drain.makespan == drain.lower_bound
        assert_valid(disjoint, drain, batch, patch, max_members=cap)
