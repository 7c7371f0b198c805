"""The least time in which an ideal gateway could apply a set of updates under MDE's two call budgets.

`bench.throughput` compares alertgate's drain time with this minimum, so the minimum must be exact:
a heuristic would flatter or shame alertgate by its own error. Pure Python, no I/O.

## The model (what an ideal gateway may do)

- Update j arrives at `arrival`, touches `alerts`, and carries `key`: its outbound fields, comment
  included. Updates are accepted in arrival order (ties: the order given).
- A batchUpdate call at time t carries any set of updates that have arrived by t, share one key, are
  pairwise alert-disjoint, at most `max_members` (100) of them with at most `max_alerts_per_call` (500)
  alerts in all; every member is applied at t.
- A PATCH call carries one alert of one update. An update goes entirely by one channel: by batchUpdate
  in one call, or by PATCH as one call per alert, applied when its last piece is. (Sending part of an
  update by PATCH and the rest in a batchUpdate call would not help unless that call were at its alert
  cap: the call could carry all of it.)
- Per-alert order: if i was accepted before j and they share an alert, every call of j is at or after
  the time i is applied, and after i's last call in the order calls are made (never in the same call:
  members are alert-disjoint).
- Each channel's windows are counted as the emulator counts them: a call at t is allowed iff, for every
  window (N, W), fewer than N calls of that channel were made in (t - W, t]. Sorted, that is exactly
  `t[k] >= t[k - N] + W`. No latency, no safety margin.
- The gateway knows every arrival in advance and may hold an update back to share a later call (alertgate
  never waits to coalesce). So the minimum bounds any gateway, clairvoyant or not, from below.
- The makespan is when the last update is applied. `minimum_drain` gives the least makespan and a
  schedule that attains it; `check` tells whether a schedule keeps every rule above.

## The method

Think of the schedule backwards from a makespan T: reversed time tau = T - t turns arrivals into
deadlines (an update must be applied at tau <= T - a_j), everything is available at tau = 0, the windows
(symmetric in time) stay the same, and per-alert order reverses (the later-accepted update goes first).
Deciding "can everything be applied by T" becomes a deadline problem.

1. **A lower bound, exact for a relaxation** without per-alert order, without same-call disjointness and
   without the alert cap (`_relaxed_feasible`, `_lower_bound`). In it, with no release times in reversed
   time:
   - every call can be moved as early as its channel's windows allow, so the k-th call of a channel is
     at the channel's *envelope* `e[k]` (`minimum_schedule` of k calls all waiting at 0);
   - PATCH: given the set of PATCH updates, serving their pieces in deadline order (EDF) is optimal (unit
     pieces, common release: of the updates due by some deadline, all their pieces must fit the slots
     up to it, and EDF uses exactly those), so the test is, for each PATCH update in deadline order,
     `e_patch[c] <= T - a_j` with c the pieces counted so far, its own included;
   - batchUpdate: a key's members can be regrouped into consecutive blocks of `max_members` (M) in
     deadline order (the m-th block's members have deadlines no sooner than the key's m-th call: of the
     (m-1)M + 1 most urgent members at most (m-1)M fit in the first m-1 calls), so each block is a unit
     demand due at its most urgent member's deadline, and all keys' demands are served EDF on the
     batchUpdate envelope.
   A dynamic programme over the updates in deadline order (latest arrival first) decides each update's
   channel and whether it opens a new block of its key or joins the open one. Its state is (batchUpdate
   calls used, PATCH pieces used, room left in each key's open block), pruned by dominance: X dominates
   Y if X used no more calls and X's PATCH pieces, plus what X's smaller rooms could cost (each missing
   place is one future member of that key sent by PATCH instead, at most the key's largest update in
   pieces), are no more than Y's: X can copy any future of Y. (Without PATCH: fewer calls and no less
   room.) Every constraint reads `a_j + e[k] <= T`, so the least feasible T is one of those sums; the
   search gallops up the sorted sums from the smallest (the programme fails fast far below the bound
   and keeps more states far above it), then bisects.
2. **A schedule for that T that keeps every rule** (`_construct`): list scheduling in reversed time with
   step 1's channels. Each channel calls as early as its windows allow for the most urgent update that
   may go (its later-accepted neighbours on a shared alert all applied), the sooner call first and, at
   one moment, the more urgent channel first; a batchUpdate call takes every such update of that key it
   may. Urgency is tried three ways (`_blocks`, `_priorities`): by deadline;
   with a key's members grouped into blocks whose members wait for each other and lend their urgency to
   the updates that must precede them; and with the blocks formed among members due in the same
   envelope period, so an early block is not held back by members that could go late. If a schedule
   meets every deadline, the bound is attained and the schedule is optimal: `exact`, `method`
   "lower bound attained". Without shared alerts (and within the alert cap) this always happens: the
   plain list schedule is then step 1's EDF schedule. With shared alerts it is checked, not assumed:
   bench.throughput's workload (c) (InProgress then Resolved on one alert) attains it with its defaults.
3. Otherwise, for at most `search_limit` updates, an exhaustive search (`_search`) forward in time over
   the moments a call can happen: an arrival, the moment a channel's window frees a call, or the moment
   of a call just made (an update whose predecessor was just applied). Every call of an optimal schedule
   can be moved to the earliest moment allowed, which is one of these, and adding a further waiting
   update of the key to a batchUpdate call never hurts, so only maximal calls are tried. Exact: `method`
   "exhaustive search". Larger inputs get the soonest schedule step 2 builds above the bound, with
   `exact` False and `lower_bound`, so that a report says "between" rather than pass off an estimate.

tests/unit/test_reference_scheduler.py checks every answer against an independent brute force on random
small inputs (shared alerts, two keys, small caps, with and without PATCH), with and without step 3.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from functools import cache

from shared.settings import RateWindow

BATCH = "batchUpdate"
PATCH = "patch"
MAX_MEMBERS = 100
MAX_ALERTS_PER_CALL = 500
SEARCH_LIMIT = 8
# Times are sums of arrivals and window lengths given as floats; one sum may round a last bit away from
# another that is equal on paper. Every comparison of times allows this much.
EPS = 1e-9

WindowLike = RateWindow | tuple[int, float]


def minimum_schedule(arrivals: list[float], windows: Sequence[RateWindow]) -> list[float]:
    """The earliest time each call can be admitted: at its arrival, and never while a window already
    holds its limit. Calls in arrival order, each as early as possible, is optimal for identical calls
    (swapping two calls' times never lets the last one go sooner); with the emulator's sliding windows
    (a call at `now` needs fewer than CALLS admitted in `(now - SECONDS, now]`), call k may go at
    `times[k - CALLS] + SECONDS` exactly."""
    times: list[float] = []
    for k, arrival in enumerate(sorted(arrivals)):
        earliest = arrival
        for window in windows:
            if k >= window.calls:
                earliest = max(earliest, times[k - window.calls] + window.seconds)
        times.append(earliest)
    return times


@dataclass(frozen=True)
class Update:
    """One accepted update: when it arrived, the alerts it touches, and its outbound fields (`key`:
    anything hashable; equal keys may share a batchUpdate call)."""

    arrival: float
    alerts: tuple[str, ...]
    key: Hashable


@dataclass(frozen=True)
class Call:
    """One upstream call: `members` are indexes into the caller's list of updates; a PATCH call carries
    one member and names its `alert`."""

    channel: str
    time: float
    members: tuple[int, ...]
    alert: str | None = None


@dataclass(frozen=True)
class Drain:
    """A schedule: `makespan` is when the last update is applied, `completions[i]` when update i is.

    `exact` says `makespan` is proven least; `lower_bound` is what step 1 of the method proved (equal to
    the makespan when exact by the bound). `calls` are in the order made (sorted by time)."""

    makespan: float
    calls: tuple[Call, ...]
    completions: tuple[float, ...]
    lower_bound: float
    exact: bool
    method: str

    def calls_on(self, channel: str) -> list[Call]:
        return [call for call in self.calls if call.channel == channel]


def windows_of(windows: Iterable[WindowLike]) -> tuple[RateWindow, ...]:
    """`[(10, 60), (500, 3600)]` or RateWindows → RateWindows, each checked (calls >= 1, seconds > 0)."""
    result: list[RateWindow] = []
    for window in windows:
        calls, seconds = (window.calls, window.seconds) if isinstance(window, RateWindow) else window
        if int(calls) != calls or calls < 1 or not (math.isfinite(seconds) and seconds > 0):
            raise ValueError(f"bad window {window!r}: calls must be a positive integer, seconds positive")
        result.append(RateWindow(int(calls), float(seconds)))
    return tuple(result)


def allowed(history: Sequence[float], now: float, windows: Sequence[RateWindow]) -> bool:
    """May a channel whose calls were at `history` call at `now` (the emulator's rule)?"""
    return all(sum(1 for t in history if now - w.seconds + EPS < t <= now + EPS) < w.calls for w in windows)


def one_call_per_request(updates: Sequence[Update], batch_windows: Iterable[WindowLike]) -> Drain:
    """Today's design: each update is one batchUpdate call, in arrival order, each as early as its
    arrival and the windows allow (`minimum_schedule`, exact for those rules). Calls in acceptance order
    keep per-alert order by themselves."""
    if not updates:
        raise ValueError("no updates")
    order = sorted(range(len(updates)), key=lambda i: (updates[i].arrival, i))
    times = minimum_schedule([updates[i].arrival for i in order], windows_of(batch_windows))
    completions = [0.0] * len(updates)
    calls = []
    for i, t in zip(order, times, strict=True):
        completions[i] = t
        calls.append(Call(BATCH, t, (i,)))
    return Drain(times[-1], tuple(calls), tuple(completions), times[-1], True, "one call per request")


# --- the instance, in acceptance order ----------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    index: int  # in the caller's list
    arrival: float
    alerts: tuple[str, ...]
    key: Hashable
    klass: int  # index of its key among keys held by more than one update, else -1


@dataclass(frozen=True)
class _Instance:
    jobs: tuple[_Job, ...]  # acceptance order
    preds: tuple[frozenset[int], ...]  # earlier jobs sharing an alert
    succs: tuple[frozenset[int], ...]  # later jobs sharing an alert
    batch: tuple[RateWindow, ...]
    patch: tuple[RateWindow, ...] | None
    max_members: int
    max_alerts: int
    class_sizes: tuple[int, ...]  # per shared key, its largest update in alerts

    @property
    def pieces(self) -> int:
        return sum(len(job.alerts) for job in self.jobs)


def _instance(
    updates: Sequence[Update],
    batch_windows: Iterable[WindowLike],
    patch_windows: Iterable[WindowLike] | None,
    max_members: int,
    max_alerts: int,
) -> _Instance:
    if not updates:
        raise ValueError("no updates")
    if max_members < 1 or max_alerts < 1:
        raise ValueError("max_members and max_alerts_per_call must be at least 1")
    order = sorted(range(len(updates)), key=lambda i: (updates[i].arrival, i))
    counts: dict[Hashable, int] = {}
    for update in updates:
        counts[update.key] = counts.get(update.key, 0) + 1
    shared = [key for key, count in counts.items() if count > 1]
    klass = {key: n for n, key in enumerate(shared)}
    jobs = []
    for i in order:
        update = updates[i]
        alerts = tuple(dict.fromkeys(update.alerts))
        if not alerts or len(alerts) > max_alerts:
            raise ValueError(f"update {i} must touch 1 to {max_alerts} alerts (split larger ones first)")
        if not math.isfinite(update.arrival):
            raise ValueError(f"update {i} has no finite arrival")
        jobs.append(_Job(i, update.arrival, alerts, update.key, klass.get(update.key, -1)))
    sizes = [0] * len(shared)
    for job in jobs:
        if job.klass >= 0:
            sizes[job.klass] = max(sizes[job.klass], len(job.alerts))
    touching: dict[str, list[int]] = {}
    for rank, job in enumerate(jobs):
        for alert in job.alerts:
            touching.setdefault(alert, []).append(rank)
    preds: list[set[int]] = [set() for _ in jobs]
    succs: list[set[int]] = [set() for _ in jobs]
    for ranks in touching.values():
        for x, y in itertools.combinations(ranks, 2):
            preds[y].add(x)
            succs[x].add(y)
    return _Instance(
        tuple(jobs),
        tuple(frozenset(p) for p in preds),
        tuple(frozenset(s) for s in succs),
        windows_of(batch_windows),
        None if patch_windows is None else windows_of(patch_windows),
        max_members,
        max_alerts,
        tuple(sizes),
    )


def _envelope(windows: Sequence[RateWindow], count: int) -> list[float]:
    """When a channel's k-th call (k = 1..count) can be made at the soonest, all waiting from 0."""
    return minimum_schedule([0.0] * count, windows)


# --- step 1: the relaxation's exact optimum -----------------------------------------------------------

_State = tuple[int, int, tuple[int, ...]]  # batch calls, PATCH pieces, room in each shared key's block
_Move = tuple[str, int, tuple[int, ...]]  # channel, the alerts it applies (bits), members (ranks)


def _prune(states: Iterable[_State], sizes: tuple[int, ...], patch_on: bool) -> list[_State]:
    """The states no other dominates (see the module's docstring, step 1). A dominator sorts before
    what it dominates (no more calls, no more pieces, and with both equal, no less room), so one pass
    suffices. Written out rather than with a helper: this loop is most of the scheduler's time."""
    kept: list[_State] = []
    classes = range(len(sizes))
    for state in sorted(set(states), key=lambda s: (s[0], s[1], -sum(s[2]))):
        b, p, rooms = state
        for kb, kp, krooms in kept:
            if kb > b:
                continue
            if patch_on:
                owed = kp
                for c in classes:
                    if rooms[c] > krooms[c]:
                        owed += (rooms[c] - krooms[c]) * sizes[c]
                if owed <= p:
                    break
            elif all(kr >= r for kr, r in zip(krooms, rooms, strict=True)):
                break
        else:
            kept.append(state)
    return kept


def _relaxed_feasible(
    inst: _Instance, makespan: float, benv: list[float], penv: list[float]
) -> list[str] | None:
    """Step 1 for one makespan: a channel per job (acceptance order) if the relaxation can apply
    everything by `makespan`, else None."""
    patch_on = inst.patch is not None
    m = inst.max_members
    start: _State = (0, 0, tuple(0 for _ in inst.class_sizes))
    frontier = [start]
    parents: list[dict[_State, tuple[_State, str]]] = []
    for rank in range(len(inst.jobs) - 1, -1, -1):  # deadline order: latest arrival first
        job = inst.jobs[rank]
        slack = makespan - job.arrival + EPS
        max_b = bisect.bisect_right(benv, slack)
        max_p = bisect.bisect_right(penv, slack) if patch_on else 0
        size = len(job.alerts)
        step: dict[_State, tuple[_State, str]] = {}
        for state in frontier:
            b, p, rooms = state
            if patch_on and p + size <= max_p:
                step.setdefault((b, p + size, rooms), (state, PATCH))
            if job.klass >= 0 and rooms[job.klass] > 0:
                joined = (*rooms[: job.klass], rooms[job.klass] - 1, *rooms[job.klass + 1 :])
                step.setdefault((b, p, joined), (state, BATCH))
            if b + 1 <= max_b:
                opened = rooms
                if job.klass >= 0:
                    opened = (*rooms[: job.klass], m - 1, *rooms[job.klass + 1 :])
                step.setdefault((b + 1, p, opened), (state, BATCH))
        frontier = _prune(step, inst.class_sizes, patch_on)
        if not frontier:
            return None
        parents.append(step)
    channels = [""] * len(inst.jobs)
    state = frontier[0]
    for rank, step in zip(range(len(inst.jobs)), reversed(parents), strict=True):
        state, channels[rank] = step[state]
    return channels


def _candidates(inst: _Instance, benv: list[float], penv: list[float]) -> list[float]:
    """Every value the relaxation's optimum can take: an arrival plus a channel's envelope time."""
    offsets = set(benv) | set(penv)
    return sorted({job.arrival + offset for job in inst.jobs for offset in offsets})


def _lower_bound(inst: _Instance) -> tuple[float, list[str]]:
    """The relaxation's least makespan and its channels. Feasibility is monotone in the makespan, so a
    search over the sorted candidates finds it; it gallops up from the smallest, because the programme
    is slowest at large makespans (more slack keeps more states) and fails fast far below the bound."""
    benv = _envelope(inst.batch, len(inst.jobs))
    penv = _envelope(inst.patch, inst.pieces) if inst.patch is not None else []
    candidates = _candidates(inst, benv, penv)
    low, step = 0, 1
    while True:  # the largest candidate is feasible: every update by batchUpdate in a call of its own
        probe = min(low + step - 1, len(candidates) - 1)
        found = _relaxed_feasible(inst, candidates[probe], benv, penv)
        if found is not None:
            high, best = probe, found
            break
        low, step = probe + 1, step * 2
    while low < high:
        middle = (low + high) // 2
        found = _relaxed_feasible(inst, candidates[middle], benv, penv)
        if found is None:
            low = middle + 1
        else:
            high, best = middle, found
    return candidates[high], best


# --- step 2: a schedule that keeps every constraint ---------------------------------------------------


def _next_slot(history: list[float], windows: Sequence[RateWindow]) -> float:
    """The soonest a channel may call again, its calls so far being `history` (sorted); never before its
    last call, so each channel's calls stay in time order."""
    slot = history[-1] if history else 0.0
    for w in windows:
        if len(history) >= w.calls:
            slot = max(slot, history[-w.calls] + w.seconds)
    return slot


def _blocks(inst: _Instance, makespan: float, channels: list[str], mode: str) -> list[int]:
    """A block number per job (-1: none). "blocks": each shared key's batchUpdate members in urgency
    order, `max_members` at a time; "buckets": the same among members whose deadlines allow the same
    latest envelope time, so that members which could go late (in reversed time) are not held to the
    early ones' urgency."""
    block = [-1] * len(inst.jobs)
    if mode == "plain":
        return block
    benv = sorted(set(_envelope(inst.batch, len(inst.jobs))))
    groups: dict[tuple[Hashable, float], list[int]] = {}
    for rank in range(len(inst.jobs) - 1, -1, -1):
        job = inst.jobs[rank]
        if channels[rank] == BATCH and job.klass >= 0:
            latest = benv[max(0, bisect.bisect_right(benv, makespan - job.arrival + EPS) - 1)]
            groups.setdefault((job.key, latest if mode == "buckets" else 0.0), []).append(rank)
    number = 0
    for ranks in groups.values():
        for start in range(0, len(ranks), inst.max_members):
            for rank in ranks[start : start + inst.max_members]:
                block[rank] = number
            number += 1
    return block


def _priorities(inst: _Instance, block: list[int]) -> list[tuple[float, int]]:
    """Reversed-time urgency of each job, larger first: its arrival and rank (latest accepted first), or
    its block's most urgent member's, raised to the urgency of any earlier-accepted job sharing an
    alert, which cannot go (in reversed time) before it. A block's call waits for every member's
    successors, so those must go as early as the block's urgency says, or the block splits."""
    own = [(job.arrival, rank) for rank, job in enumerate(inst.jobs)]
    first: dict[int, tuple[float, int]] = {}
    for rank in range(len(inst.jobs) - 1, -1, -1):
        if block[rank] >= 0:
            own[rank] = first.setdefault(block[rank], own[rank])
    priority = list(own)
    for rank in range(len(inst.jobs)):
        priority[rank] = max([own[rank], *(priority[p] for p in inst.preds[rank])])
    return priority


def _construct(inst: _Instance, makespan: float, channels: list[str], mode: str) -> Drain | None:
    """Step 2: list scheduling in reversed time with the given channels and urgency (`_blocks`,
    `_priorities`); a block's members wait until all of them may go. None if a deadline fails."""
    jobs = inst.jobs
    block = _blocks(inst, makespan, channels, mode)
    priority = _priorities(inst, block)
    done_at: list[float | None] = [None] * len(jobs)
    left = [list(job.alerts) for job in jobs]
    history: dict[str, list[float]] = {BATCH: [], PATCH: []}
    windows = {BATCH: inst.batch, PATCH: inst.patch or ()}
    made: list[tuple[float, Call]] = []
    pending = set(range(len(jobs)))

    def ready_times() -> dict[int, float]:
        """When each pending job may go, given what is done: its successors' last completion, or for a
        block member, its whole block's; jobs that may not go yet are left out."""
        own: dict[int, float | None] = {}
        for rank in pending:
            times = [done_at[s] for s in inst.succs[rank]]
            own[rank] = None if None in times else max([0.0, *(t for t in times if t is not None)])
        blocks: dict[int, float | None] = {}
        for rank, t in own.items():
            number = block[rank]
            if number >= 0:
                held = blocks.get(number, 0.0)
                blocks[number] = None if held is None or t is None else max(held, t)
        ready: dict[int, float] = {}
        for rank, t in own.items():
            t = t if block[rank] < 0 else blocks[block[rank]]
            if t is not None:
                ready[rank] = t
        return ready

    while pending:
        best: tuple[float, tuple[float, int], int, str, list[int]] | None = None
        ready_all = ready_times()
        for channel in (BATCH, PATCH):
            ready = [(r, t) for r, t in ready_all.items() if channels[r] == channel]
            if not ready:
                continue
            when = max(_next_slot(history[channel], windows[channel]), min(t for _, t in ready))
            urgent = sorted(
                (r for r, t in ready if t <= when + EPS), key=lambda r: (priority[r], r), reverse=True
            )
            # The sooner call first; at the same moment, the channel with the more urgent update.
            urgency = priority[urgent[0]]
            option = (when, (-urgency[0], -urgency[1]), 0 if channel == BATCH else 1, channel, urgent)
            if best is None or option[:3] < best[:3]:
                best = option
        if best is None:
            return None  # a block waits for a member's successor that waits for the block
        when, _, _, channel, urgent = best
        members = _members(inst, urgent) if channel == BATCH else urgent[:1]
        if any(jobs[r].arrival + when > makespan + EPS for r in members):
            return None
        history[channel].append(when)
        if channel == BATCH:
            call = Call(BATCH, makespan - when, tuple(sorted(jobs[r].index for r in members)))
            for r in members:
                done_at[r] = when
                pending.discard(r)
        else:
            rank = members[0]
            call = Call(PATCH, makespan - when, (jobs[rank].index,), left[rank].pop())
            if not left[rank]:
                done_at[rank] = when
                pending.discard(rank)
        made.append((when, call))
    return _drain(inst, [call for _, call in reversed(made)], makespan, True, "lower bound attained")


def _constructed(inst: _Instance, makespan: float, channels: list[str]) -> Drain | None:
    """Step 2 with each kind of urgency in turn: the first schedule that meets `makespan`."""
    for mode in ("plain", "blocks", "buckets"):
        built = _construct(inst, makespan, channels, mode)
        if built is not None:
            return built
    return None


def _members(inst: _Instance, urgent: list[int]) -> list[int]:
    """The most urgent update's key, then every other such update that fits (alert-disjoint, caps)."""
    key = inst.jobs[urgent[0]].key
    members: list[int] = []
    taken: set[str] = set()
    for rank in urgent:
        job = inst.jobs[rank]
        if job.key != key or taken.intersection(job.alerts) or len(members) >= inst.max_members:
            continue
        if len(taken) + len(job.alerts) > inst.max_alerts:
            continue
        members.append(rank)
        taken.update(job.alerts)
    return members


def _drain(inst: _Instance, calls: list[Call], lower: float, exact: bool, method: str) -> Drain:
    completions = [0.0] * len(inst.jobs)
    for call in calls:
        for i in call.members:
            completions[i] = max(completions[i], call.time)
    calls.sort(key=lambda c: c.time)  # stable: same-time calls keep their order
    return Drain(max(completions), tuple(calls), tuple(completions), lower, exact, method)


# --- step 3: exhaustive search for small inputs -------------------------------------------------------


def _search(inst: _Instance, lower: float) -> Drain:
    """The least makespan over every schedule whose calls sit at the moments listed in the module's
    docstring (step 3), by depth-first search with memory over (moment, alerts applied per update,
    each channel's recent calls)."""
    jobs = inst.jobs
    piece_bits: list[list[int]] = []
    bit = 0
    for job in jobs:
        piece_bits.append([1 << (bit + n) for n in range(len(job.alerts))])
        bit += len(job.alerts)
    full = [sum(bits) for bits in piece_bits]
    everything = (1 << bit) - 1
    arrivals = sorted({job.arrival for job in jobs})
    windows = {BATCH: inst.batch, PATCH: inst.patch}
    longest = {ch: max((w.seconds for w in ws), default=0.0) for ch, ws in windows.items() if ws is not None}

    def is_done(mask: int, rank: int) -> bool:
        return mask & full[rank] == full[rank]

    def free(mask: int, t: float, rank: int) -> bool:
        return jobs[rank].arrival <= t + EPS and all(is_done(mask, p) for p in inst.preds[rank])

    def moves(t: float, mask: int, hb: tuple[float, ...], hp: tuple[float, ...]) -> list[_Move]:
        found: list[_Move] = []
        open_jobs = [r for r in range(len(jobs)) if not is_done(mask, r) and free(mask, t, r)]
        if allowed(hb, t, inst.batch):
            untouched = [r for r in open_jobs if mask & full[r] == 0]
            for key in dict.fromkeys(jobs[r].key for r in untouched):
                same = [r for r in untouched if jobs[r].key == key]
                for group in _maximal_groups(inst, same):
                    gained = sum(full[r] for r in group)
                    found.append((BATCH, gained, tuple(group)))
        if inst.patch is not None and allowed(hp, t, inst.patch):
            for r in open_jobs:
                piece = next(b for b in piece_bits[r] if not mask & b)
                found.append((PATCH, piece, (r,)))
        return found

    def next_moment(t: float, mask: int, hb: tuple[float, ...], hp: tuple[float, ...]) -> float:
        later = [a for a in arrivals if a > t + EPS]
        for channel, history in ((BATCH, hb), (PATCH, hp)):
            ws = windows[channel]
            if ws is not None and history and not allowed(history, t, ws):
                later.append(_release(history, t, ws))
        return min(later, default=math.inf)

    @cache
    def best(
        t: float, mask: int, hb: tuple[float, ...], hp: tuple[float, ...]
    ) -> tuple[float, _Move | None, float]:
        """(least makespan from here, the move taken or None to wait, the moment waited for)."""
        value, wait = math.inf, math.inf
        choice: _Move | None = None
        for channel, gained, members in moves(t, mask, hb, hp):
            after = mask | gained
            nb = _recent((*hb, t), t, longest[BATCH]) if channel == BATCH else hb
            np_ = _recent((*hp, t), t, longest.get(PATCH, 0.0)) if channel == PATCH else hp
            result = t if after == everything else best(t, after, nb, np_)[0]
            if result < value - EPS:
                value, choice = result, (channel, gained, members)
        moment = next_moment(t, mask, hb, hp)
        if moment < math.inf and value > moment + EPS:
            result = best(
                moment,
                mask,
                _recent(hb, moment, longest[BATCH]),
                _recent(hp, moment, longest.get(PATCH, 0.0)),
            )[0]
            if result < value - EPS:
                value, choice, wait = result, None, moment
        return value, choice, wait

    calls: list[Call] = []
    t, mask = arrivals[0], 0
    hb: tuple[float, ...] = ()
    hp: tuple[float, ...] = ()
    while mask != everything:
        value, choice, wait = best(t, mask, hb, hp)
        if value == math.inf:
            raise AssertionError("some schedule always exists")
        if choice is None:
            t, hb, hp = wait, _recent(hb, wait, longest[BATCH]), _recent(hp, wait, longest.get(PATCH, 0.0))
            continue
        channel, gained, members = choice
        if channel == BATCH:
            calls.append(Call(BATCH, t, tuple(sorted(jobs[r].index for r in members))))
            hb = _recent((*hb, t), t, longest[BATCH])
        else:
            r = members[0]
            alert = jobs[r].alerts[piece_bits[r].index(gained)]
            calls.append(Call(PATCH, t, (jobs[r].index,), alert))
            hp = _recent((*hp, t), t, longest.get(PATCH, 0.0))
        mask |= gained
    best.cache_clear()
    return _drain(inst, calls, lower, True, "exhaustive search")


def _recent(history: tuple[float, ...], now: float, longest: float) -> tuple[float, ...]:
    """The calls that can still count in a window at `now` or later."""
    return tuple(t for t in history if t > now - longest + EPS)


def _release(history: Sequence[float], now: float, windows: Sequence[RateWindow]) -> float:
    """The soonest moment after `now` at which a channel blocked at `now` may call."""
    ordered = sorted(history)
    moment = now
    for w in windows:
        inside = [t for t in ordered if now - w.seconds + EPS < t <= now + EPS]
        if len(inside) >= w.calls:
            moment = max(moment, inside[len(inside) - w.calls] + w.seconds)
    return moment


def _maximal_groups(inst: _Instance, ranks: list[int]) -> list[list[int]]:
    """Every valid batchUpdate call over these same-key updates that no further one of them could join."""
    groups: list[list[int]] = []

    def fits(group: list[int], rank: int) -> bool:
        taken = {a for r in group for a in inst.jobs[r].alerts}
        alerts = inst.jobs[rank].alerts
        return (
            len(group) < inst.max_members
            and not taken.intersection(alerts)
            and len(taken) + len(alerts) <= inst.max_alerts
        )

    def extend(group: list[int], start: int) -> None:
        extended = False
        for n in range(start, len(ranks)):
            if fits(group, ranks[n]):
                extended = True
                extend([*group, ranks[n]], n + 1)
        if not extended and all(r in group or not fits(group, r) for r in ranks):
            groups.append(group)

    extend([], 0)
    return groups


# --- the entry point ----------------------------------------------------------------------------------


def minimum_drain(
    updates: Sequence[Update],
    batch_windows: Iterable[WindowLike],
    patch_windows: Iterable[WindowLike] | None = None,
    *,
    max_members: int = MAX_MEMBERS,
    max_alerts_per_call: int = MAX_ALERTS_PER_CALL,
    search_limit: int = SEARCH_LIMIT,
) -> Drain:
    """The least makespan (and a schedule attaining it) for `updates` under the batchUpdate windows and
    the PATCH windows (None: no PATCH channel); see the module's docstring for the model and method."""
    inst = _instance(updates, batch_windows, patch_windows, max_members, max_alerts_per_call)
    lower, channels = _lower_bound(inst)
    built = _constructed(inst, lower, channels)
    if built is not None:
        return built
    if len(inst.jobs) <= search_limit:
        return _search(inst, lower)
    return _above_bound(inst, lower, channels, updates, batch_windows)


def _above_bound(
    inst: _Instance,
    lower: float,
    channels: list[str],
    updates: Sequence[Update],
    batch_windows: Iterable[WindowLike],
) -> Drain:
    """The least candidate makespan above the bound at which step 2, with the bound's channels, finds a
    schedule (binary search; one call per request is always a schedule), marked not exact."""
    fallback = one_call_per_request(updates, batch_windows)
    benv = _envelope(inst.batch, len(inst.jobs))
    penv = _envelope(inst.patch, inst.pieces) if inst.patch is not None else []
    candidates = [c for c in _candidates(inst, benv, penv) if lower < c < fallback.makespan]
    best = Drain(fallback.makespan, fallback.calls, fallback.completions, lower, False, "bounds only")
    low, high = 0, len(candidates)
    while low < high:
        middle = (low + high) // 2
        built = _constructed(inst, candidates[middle], channels)
        if built is None:
            low = middle + 1
        else:
            high = middle
            best = Drain(built.makespan, built.calls, built.completions, lower, False, "bounds only")
    return best


def check(
    updates: Sequence[Update],
    drain: Drain,
    batch_windows: Iterable[WindowLike],
    patch_windows: Iterable[WindowLike] | None = None,
    *,
    max_members: int = MAX_MEMBERS,
    max_alerts_per_call: int = MAX_ALERTS_PER_CALL,
) -> list[str]:
    """Every rule of the model that `drain` breaks (empty: a valid schedule with the makespan it
    claims). Written from the model, not from the scheduler, so tests can trust it."""
    problems: list[str] = []
    batch, patch = windows_of(batch_windows), None if patch_windows is None else windows_of(patch_windows)
    served: dict[int, list[Call]] = {i: [] for i in range(len(updates))}
    for call in drain.calls:
        for i in call.members:
            served[i].append(call)
        if any(updates[i].arrival > call.time + EPS for i in call.members):
            problems.append(f"{call} before a member arrived")
        if call.channel == BATCH:
            keys = {updates[i].key for i in call.members}
            alerts = [a for i in call.members for a in dict.fromkeys(updates[i].alerts)]
            if len(keys) != 1 or len(alerts) != len(set(alerts)):
                problems.append(f"{call} mixes keys or shares an alert")
            if len(call.members) > max_members or len(alerts) > max_alerts_per_call:
                problems.append(f"{call} too large")
        elif call.channel == PATCH:
            if patch is None or len(call.members) != 1 or call.alert not in updates[call.members[0]].alerts:
                problems.append(f"{call} is not a PATCH of one alert of its update")
        else:
            problems.append(f"{call} on no channel")
    completion: dict[int, float] = {}
    for i, calls in served.items():
        channels = {c.channel for c in calls}
        if channels == {BATCH} and len(calls) == 1:
            completion[i] = calls[0].time
        elif channels == {PATCH} and sorted(c.alert or "" for c in calls) == sorted(set(updates[i].alerts)):
            completion[i] = max(c.time for c in calls)
        else:
            problems.append(f"update {i} is not applied exactly once: {calls}")
    position = {id(call): n for n, call in enumerate(drain.calls)}
    order = sorted(range(len(updates)), key=lambda i: (updates[i].arrival, i))
    for x, i in enumerate(order):
        for j in order[x + 1 :]:
            if (
                not set(updates[i].alerts) & set(updates[j].alerts)
                or i not in completion
                or j not in completion
            ):
                continue
            last_of_i = max(position[id(c)] for c in served[i])
            for call in served[j]:
                if call.time < completion[i] - EPS or (
                    call.time <= completion[i] + EPS and position[id(call)] < last_of_i
                ):
                    problems.append(
                        f"update {j} goes before the earlier update {i} of a shared alert is applied"
                    )
    for channel, ws in ((BATCH, batch), (PATCH, patch or ())):
        times = sorted(c.time for c in drain.calls if c.channel == channel)
        for w in ws:
            for k in range(w.calls, len(times)):
                if times[k] < times[k - w.calls] + w.seconds - EPS:
                    problems.append(
                        f"{channel}: more than {w.calls} calls within {w.seconds:g} s at {times[k]:g}"
                    )
    if completion and abs(max(completion.values()) - drain.makespan) > EPS:
        problems.append(f"makespan {drain.makespan} is not the last completion {max(completion.values())}")
    return problems
