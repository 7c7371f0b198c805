"""The calls this process is gathering, and the identical updates handed over to them (docs/contracts.md §7).

In a burst of identical updates (a script closing alerts one request at a time) every request used to
make a try of its own: a read of the whole backlog to find the call that would carry it, and a queue
message to look again after that call. On a 2-core machine that was most of alertgate's work, and it
capped how fast requests could be accepted (bench.throughput, workload a).

So a process remembers the batchUpdate calls its own tries lead while they gather members. A chunk
accepted here whose update one of them gathers *rides along*: no read, no budget, no queue message. It
is handed over to that call's try, which owes it a message if the call leaves it out:

- The call's own gathering reads still decide what goes along, with every rule of shared.coalescing
  (sendable, per-alert order, the batch limit): riding along only skips the rider's own try.
- When the lead's try ends, the riders its call did not take (accepted after its last read, or over
  its size) become *orphans*: waiting for the next call of their update. (Closing the call to riders
  before its last read instead was tried: the chunks arriving then each made a try, read a backlog
  whose members were not marked yet, and several led calls at once.) The next call opened here
  adopts them as its riders. If none is open, one orphan is queued to lead it (the *driver*); an orphan
  still waiting after ORPHAN_MAX_WAIT_SECONDS is queued on its own.
- If this process dies meanwhile, a rider or orphan has no message: the sweep queues it once its
  message is overdue, as for any chunk whose holder died (docs/contracts.md §3).

It also remembers which calls its tries marked Sending, so the worker can drop a message of a chunk in
flight in one of them instead of putting it back for the lease (that try records the outcome).

Plain synchronous bookkeeping without I/O, so every rule is tested directly (tests/unit/test_gathering.py);
Sender does the queueing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from shared.coalescing import MAX_MEMBERS

if TYPE_CHECKING:
    from shared.ledger import Chunk

# How long an orphan waits for the next call of its update before it is queued on its own: past any
# call's gathering here (a driver comes back when the budget should free up, WORKER_BUDGET_WAIT_SECONDS
# at most), short of the sweep's grace.
ORPHAN_MAX_WAIT_SECONDS = 10.0

Key = tuple[tuple[str, str], ...]


def update_key(fields: dict[str, str]) -> Key:
    """What identical updates share (the outbound fields, in a hashable order)."""
    return tuple(sorted(fields.items()))


@dataclass
class OpenCall:
    """A batchUpdate call a try of this process leads, while it gathers members."""

    lead: str
    slot: float  # when the call is expected (its grant's slot, or an estimate before the grant)
    limit: int  # alert ids the call may carry
    members: int = 1  # chunks it expects to carry so far, its lead included
    alerts: int = 0
    riders: list[Chunk] = field(default_factory=list)  # handed over to it
    taken: set[str] = field(default_factory=set)  # the chunks its call marked Sending

    def fits(self, chunk: Chunk, max_members: int) -> bool:
        return self.members < max_members and self.alerts + len(chunk.alert_ids) <= self.limit

    def add(self, chunk: Chunk) -> None:
        self.members, self.alerts = self.members + 1, self.alerts + len(chunk.alert_ids)
        self.riders.append(chunk)


class Gathering:
    """One process's open calls, their riders and orphans, and the calls its tries marked Sending."""

    def __init__(
        self, max_members: int = MAX_MEMBERS, orphan_max_wait: float = ORPHAN_MAX_WAIT_SECONDS
    ) -> None:
        self.max_members = max_members
        self.orphan_max_wait = orphan_max_wait
        self._calls: dict[Key, OpenCall] = {}  # the call that takes riders, per update
        self._leading: dict[str, OpenCall] = {}  # the same, by lead
        self._orphans: dict[Key, list[tuple[Chunk, float]]] = {}  # and since when each waits
        self._sending: dict[str, str] = {}  # call id → the lead whose try marked it

    def is_open(self, fields: dict[str, str]) -> bool:
        return update_key(fields) in self._calls

    def call_of(self, fields: dict[str, str]) -> OpenCall | None:
        return self._calls.get(update_key(fields))

    def open(self, lead: Chunk, slot: float, limit: int) -> None:
        """`lead` leads a call of its update expected at `slot`. A call already open for the update stays
        (its lead's own again only moves the slot); a new one adopts the update's orphans that fit."""
        key = update_key(lead.fields)
        call = self._calls.get(key)
        if call is not None:
            if call.lead == lead.chunk_id:
                call.slot = slot
            return
        call = OpenCall(lead.chunk_id, slot, limit, alerts=len(lead.alert_ids))
        self._calls[key] = self._leading[lead.chunk_id] = call
        waiting = []
        for orphan, since in self._orphans.pop(key, []):
            if orphan.chunk_id == lead.chunk_id:
                continue
            if call.fits(orphan, self.max_members):
                call.add(orphan)
            else:
                waiting.append((orphan, since))
        if waiting:
            self._orphans[key] = waiting

    def ride(self, chunk: Chunk) -> OpenCall | None:
        """Hand `chunk` over to the open call of its update, if there is one it fits (and it is not that
        call's lead). The caller checked that the chunk is Pending and sendable as far as it knows."""
        call = self._calls.get(update_key(chunk.fields))
        if call is None or call.lead == chunk.chunk_id or not call.fits(chunk, self.max_members):
            return None
        self._drop_orphan(chunk)
        call.add(chunk)
        return call

    def taken(self, lead_id: str, members: Sequence[Chunk]) -> None:
        """`lead_id`'s call marked these Sending: riders among them are owed nothing."""
        call = self._leading.get(lead_id)
        if call is not None:
            call.taken.update(m.chunk_id for m in members)
        self._sending.update((m.call_id, lead_id) for m in members if m.call_id)

    def sending_here(self, call_id: str | None) -> bool:
        return bool(call_id) and call_id in self._sending

    def close(self, lead: Chunk, now: float) -> list[Chunk]:
        """`lead`'s try ended. Its call's untaken riders become orphans of their update; returns the chunks
        to queue now: a driver for an update with orphans and no open call, and orphans that waited too
        long."""
        key = update_key(lead.fields)
        if key in self._calls and self._calls[key].lead == lead.chunk_id:
            del self._calls[key]
        call = self._leading.pop(lead.chunk_id, None)
        if call is not None:
            left = [(r, now) for r in call.riders if r.chunk_id not in call.taken]
            if left:
                self._orphans.setdefault(key, []).extend(left)
        self._sending = {c: owner for c, owner in self._sending.items() if owner != lead.chunk_id}
        self._drop_orphan(lead)
        queue: list[Chunk] = []
        orphans = self._orphans.get(key)
        if orphans and key not in self._calls:
            queue.append(orphans.pop(0)[0])
        for other, waiting in list(self._orphans.items()):
            kept = [(c, since) for c, since in waiting if now - since <= self.orphan_max_wait]
            queue += [c for c, since in waiting if now - since > self.orphan_max_wait]
            if kept:
                self._orphans[other] = kept
            else:
                del self._orphans[other]
        return queue

    def orphans(self, fields: dict[str, str]) -> list[Chunk]:
        return [c for c, _ in self._orphans.get(update_key(fields), [])]

    def _drop_orphan(self, chunk: Chunk) -> None:
        key = update_key(chunk.fields)
        waiting = self._orphans.get(key)
        if waiting:
            kept = [(c, since) for c, since in waiting if c.chunk_id != chunk.chunk_id]
            if kept:
                self._orphans[key] = kept
            else:
                del self._orphans[key]
