"""The calls this process is gathering, and the identical updates that ride them (docs/contracts.md §7).

In a burst of identical updates (a script closing alerts one request at a time) every request used to
make a try of its own: a read of the whole backlog to find the call that would carry it, and often a
budget request given back at once. On a 2-core machine that was most of alertgate's work, and it capped
how fast requests could be accepted (bench.throughput, workload a).

So a process remembers the batchUpdate calls its own tries lead while they gather members. A chunk
accepted (or dequeued) here after the lead, whose update one of them gathers, *rides along*: no read, no
budget. The call's own gathering reads decide what goes along, with every rule of shared.coalescing
(sendable, per-alert order, the batch limit). A chunk older than the lead never rides: the call takes
the younger ones first, and would leave it out of every full call.

A dequeued rider keeps its message (sent again as it is, due just after the call's slot). A rider just
accepted has none: the call remembers it (`unqueued`), and when the call closes, `close` hands back
those it did not carry, for the sender to take on (shared.sender: the next call, or a message each).
If this process dies meanwhile, the sweep queues them (docs/contracts.md §7, "Riding along").

A call stops taking riders when its lead's try ends, and at the latest OPEN_CALL_MAX_SECONDS after it
opened: a bound, so that no bookkeeping slip can leave an update riding a call that never comes (it is
still remembered until its lead closes it, for the riders it owes).

It also remembers which calls its tries marked Sending, so the worker can drop a message of a chunk in
flight in one of them instead of putting it back for the lease (that try records the outcome).

Plain synchronous bookkeeping without I/O, so every rule is tested directly (tests/unit/test_gathering.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from shared.coalescing import MAX_MEMBERS

if TYPE_CHECKING:
    from shared.ledger import Chunk

# A call's try gathers for its slot, at most WORKER_BUDGET_WAIT_SECONDS ahead (shared.sender), then calls;
# a call open longer than this is ignored.
OPEN_CALL_MAX_SECONDS = 15.0

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
    opened_at: float = 0.0  # when it began to take riders (0: not yet, only riders it was given)
    riders: list[Chunk] = field(default_factory=list)
    unqueued: list[Chunk] = field(default_factory=list)  # riders without a queue message (just accepted)
    carried: set[str] = field(default_factory=set)  # chunks the lead's try marked Sending in its calls

    def fits(self, chunk: Chunk, max_members: int) -> bool:
        return self.members < max_members and self.alerts + len(chunk.alert_ids) <= self.limit

    def add(self, chunk: Chunk, queued: bool = True) -> None:
        self.members, self.alerts = self.members + 1, self.alerts + len(chunk.alert_ids)
        self.riders.append(chunk)
        if not queued:
            self.unqueued.append(chunk)

    def left_out(self) -> list[Chunk]:
        """The riders without a message that the lead's try did not mark Sending: they must be queued."""
        return [chunk for chunk in self.unqueued if chunk.chunk_id not in self.carried]


class Gathering:
    """One process's open calls and their riders, and the calls its tries marked Sending."""

    def __init__(self, max_members: int = MAX_MEMBERS, max_open: float = OPEN_CALL_MAX_SECONDS) -> None:
        self.max_members = max_members
        self.max_open = max_open
        self._calls: dict[Key, OpenCall] = {}  # the call that takes riders, per update
        # every call not yet closed, by its lead: open, open too long, or not open yet (`expect`)
        self._led: dict[str, OpenCall] = {}
        self._sending: dict[str, str] = {}  # call id → the lead whose try marked it

    def is_open(self, fields: dict[str, str], now: float) -> bool:
        return self.call_of(fields, now) is not None

    def call_of(self, fields: dict[str, str], now: float) -> OpenCall | None:
        """The call of this update that takes riders now (one open too long is dropped)."""
        key = update_key(fields)
        call = self._calls.get(key)
        if call is not None and now - call.opened_at > self.max_open:
            del self._calls[key]
            return None
        return call

    def open(self, lead: Chunk, slot: float, limit: int, now: float) -> None:
        """`lead` leads a call of its update expected at `slot`. A call already open for the update stays
        (its lead's own again only moves the slot); the riders `lead` was to take along (`expect`) then
        stay with it, and are handed back when it closes unless its call carried them."""
        call = self.call_of(lead.fields, now)
        if call is not None:
            if call.lead == lead.chunk_id:
                call.slot = slot
            return
        mine = self._led.get(lead.chunk_id)
        if mine is not None and mine.opened_at:  # its lead's again after it was open too long: stays closed
            mine.slot = slot
            return
        if mine is None:
            mine = self._led[lead.chunk_id] = OpenCall(lead.chunk_id, slot, limit, alerts=len(lead.alert_ids))
        mine.slot, mine.limit, mine.opened_at = slot, limit, now
        self._calls[update_key(lead.fields)] = mine

    def has_riders(self, lead: Chunk) -> bool:
        """Does anything ride (or wait to ride) a call `lead` leads here? Then it goes by batchUpdate,
        which carries them too, not by PATCH, and it gathers them even with budget free now."""
        call = self._led.get(lead.chunk_id)
        return call is not None and bool(call.riders)

    def expect(self, lead: Chunk, riders: Sequence[Chunk]) -> None:
        """`riders` (without messages) go along with the call `lead`'s try is about to lead (it takes
        them in when it opens: `open`); whatever its call does not carry, `close` hands back."""
        call = self._led.get(lead.chunk_id)
        if call is None:
            call = self._led[lead.chunk_id] = OpenCall(lead.chunk_id, 0.0, 0, alerts=len(lead.alert_ids))
        for rider in riders:
            call.add(rider, queued=False)

    def adopt(self, riders: Sequence[Chunk], now: float) -> list[Chunk]:
        """Riders without messages that a closed call left out ride the open call of their update, if
        there is one they fit; returns the others."""
        others: list[Chunk] = []
        for rider in riders:
            if self.ride(rider, now, queued=False) is None:
                others.append(rider)
        return others

    def ride(self, chunk: Chunk, now: float, queued: bool = True) -> OpenCall | None:
        """Let `chunk` ride the open call of its update, if there is one it fits (and it is not that
        call's lead). The caller checked that the chunk is Pending and sendable as far as it knows.
        `queued`: the chunk has a queue message of its own (else `close` hands it back if left out)."""
        call = self.call_of(chunk.fields, now)
        if call is None or call.lead == chunk.chunk_id or not call.fits(chunk, self.max_members):
            return None
        if chunk.chunk_id < call.lead:
            # Older than the lead: a call takes the chunks accepted after its lead first (oldest leads,
            # shared.coalescing), so an older rider would be left out of every younger lead's full call.
            return None
        call.add(chunk, queued)
        return call

    def taken(self, lead_id: str, members: Sequence[Chunk]) -> None:
        """`lead_id`'s call marked these Sending: a message of one of them can go (`sending_here`)."""
        self._sending.update((m.call_id, lead_id) for m in members if m.call_id)
        call = self._led.get(lead_id)
        if call is not None:
            call.carried.update(m.chunk_id for m in members)

    def sending_here(self, call_id: str | None) -> bool:
        return bool(call_id) and call_id in self._sending

    def close(self, lead: Chunk) -> list[Chunk]:
        """`lead`'s call takes no more riders (its try ended, or it goes by PATCH, which carries no
        one); returns the riders without a message it left out, which the caller must queue."""
        key = update_key(lead.fields)
        if key in self._calls and self._calls[key].lead == lead.chunk_id:
            del self._calls[key]
        call = self._led.pop(lead.chunk_id, None)
        return call.left_out() if call is not None else []

    def ended(self, lead: Chunk) -> None:
        """`lead`'s try ended: its calls are no longer in flight here."""
        self._sending = {c: owner for c, owner in self._sending.items() if owner != lead.chunk_id}
