"""The calls this process is gathering, and the identical updates that ride them (docs/contracts.md §7).

In a burst of identical updates (a script closing alerts one request at a time) every request used to
make a try of its own: a read of the whole backlog to find the call that would carry it, and often a
budget request given back at once. On a 2-core machine that was most of alertgate's work, and it capped
how fast requests could be accepted (bench.throughput, workload a).

So a process remembers the batchUpdate calls its own tries lead while they gather members. A chunk
accepted (or dequeued) here whose update one of them gathers *rides along*: no read, no budget. Its queue
message is sent as it is, due just after the call's slot, so if the call leaves it out (accepted after
the call's last read, or over its size) or this process dies, it comes back and is tried then. The
call's own gathering reads decide what goes along, with every rule of shared.coalescing (sendable,
per-alert order, the batch limit). (Handing riders over without a message, the call's try queueing
those it left out, was tried: under storage faults some were never queued, and the sweep's message for
them rode along again.)

A call stops taking riders when its lead's try ends, and at the latest OPEN_CALL_MAX_SECONDS after it
opened: a bound, so that no bookkeeping slip can leave an update riding a call that never comes.

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
    opened_at: float = 0.0
    riders: list[Chunk] = field(default_factory=list)

    def fits(self, chunk: Chunk, max_members: int) -> bool:
        return self.members < max_members and self.alerts + len(chunk.alert_ids) <= self.limit

    def add(self, chunk: Chunk) -> None:
        self.members, self.alerts = self.members + 1, self.alerts + len(chunk.alert_ids)
        self.riders.append(chunk)


class Gathering:
    """One process's open calls and their riders, and the calls its tries marked Sending."""

    def __init__(self, max_members: int = MAX_MEMBERS, max_open: float = OPEN_CALL_MAX_SECONDS) -> None:
        self.max_members = max_members
        self.max_open = max_open
        self._calls: dict[Key, OpenCall] = {}  # the call that takes riders, per update
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
        (its lead's own again only moves the slot)."""
        call = self.call_of(lead.fields, now)
        if call is not None:
            if call.lead == lead.chunk_id:
                call.slot = slot
            return
        self._calls[update_key(lead.fields)] = OpenCall(
            lead.chunk_id, slot, limit, alerts=len(lead.alert_ids), opened_at=now
        )

    def ride(self, chunk: Chunk, now: float) -> OpenCall | None:
        """Let `chunk` ride the open call of its update, if there is one it fits (and it is not that
        call's lead). The caller checked that the chunk is Pending and sendable as far as it knows."""
        call = self.call_of(chunk.fields, now)
        if call is None or call.lead == chunk.chunk_id or not call.fits(chunk, self.max_members):
            return None
        call.add(chunk)
        return call

    def taken(self, lead_id: str, members: Sequence[Chunk]) -> None:
        """`lead_id`'s call marked these Sending: a message of one of them can go (`sending_here`)."""
        self._sending.update((m.call_id, lead_id) for m in members if m.call_id)

    def sending_here(self, call_id: str | None) -> bool:
        return bool(call_id) and call_id in self._sending

    def close(self, lead: Chunk) -> None:
        """`lead`'s try ended: its call takes no more riders, and its calls are no longer in flight here."""
        key = update_key(lead.fields)
        if key in self._calls and self._calls[key].lead == lead.chunk_id:
            del self._calls[key]
        self._sending = {c: owner for c, owner in self._sending.items() if owner != lead.chunk_id}
