"""Which waiting chunks may share one batchUpdate call, and what a chunk waits behind (docs/contracts.md §7).

MDE's budget counts calls, not alerts, so one batchUpdate call carries the chunk whose turn it is plus
every other *sendable* pending chunk with an identical outbound update on other alerts, oldest first, up
to the batch limit and MAX_MEMBERS. Sendable: Pending (not Sending, not ended), out of its back-off, not
kept apart (`solo`, after a coalesced call MDE refused without saying which alert it meant) and not behind
an earlier pending update of any of its alerts (per-alert order, §3).

These rules are pure functions over one read of the pending entries (`Ledger.pending_view`), so they are
tested without storage. Sendable chunks are pairwise disjoint by construction: of two pending entries
that share an alert, the later one is behind the earlier. The members are then marked Sending in one
conditional transaction, so a chunk that changed since the read is never sent twice.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from shared.ledger import MAX_TRANSACTION, PendingState

if TYPE_CHECKING:
    from shared.ledger import Chunk

MAX_MEMBERS = MAX_TRANSACTION  # the members are marked Sending, and recorded, in one transaction


@dataclass(frozen=True)
class PendingView:
    """One read of the pending entries, in acceptance order (row key order)."""

    entries: Sequence[Chunk]
    now: float

    def sendable(self) -> list[Chunk]:
        """The entries that could go out now, oldest first."""
        seen: set[str] = set()
        ready: list[Chunk] = []
        for entry in self.entries:
            if entry.finished:
                continue
            if not seen.intersection(entry.alert_ids) and _free(entry, self.now):
                ready.append(entry)
            seen.update(entry.alert_ids)
        return ready

    def blocker(self, chunk: Chunk) -> Chunk | None:
        """The first unfinished entry accepted before `chunk` that shares one of its alerts."""
        mine = set(chunk.alert_ids)
        for entry in self.entries:
            if entry.pending_key >= chunk.pending_key:
                break
            if not entry.finished and mine.intersection(entry.alert_ids):
                return entry
        return None

    def members_for(self, lead: Chunk, limit: int, max_members: int = MAX_MEMBERS) -> list[Chunk]:
        """The other chunks that ride `lead`'s call: sendable, identical update, disjoint alerts, while
        the call stays within `limit` alert ids and `max_members` chunks (lead included).

        The ones accepted after `lead` come first, in order, then older ones, oldest first: `lead` leads
        the call of its own group (`carried_by`), and the older ones it may take are those an older
        leader's call left behind. Two leaders gathering at once then take disjoint members instead of
        racing for the oldest ones."""
        if lead.solo:
            return []
        taken = set(lead.alert_ids)
        size = len(lead.alert_ids)
        members: list[Chunk] = []
        ready = self.sendable()
        later = [e for e in ready if e.pending_key > lead.pending_key]
        for entry in [*later, *(e for e in ready if e.pending_key < lead.pending_key)]:
            if len(members) + 1 >= max_members:
                break
            if entry.chunk_id == lead.chunk_id or entry.fields != lead.fields:
                continue
            if taken.intersection(entry.alert_ids) or size + len(entry.alert_ids) > limit:
                continue
            members.append(entry)
            taken.update(entry.alert_ids)
            size += len(entry.alert_ids)
        return members

    def carried_by(
        self, chunk: Chunk, limit: int, max_members: int = MAX_MEMBERS, *, due_by: float | None = None
    ) -> Chunk | None:
        """The older waiting chunk whose call would carry `chunk`, or None if `chunk` leads a call.

        The sendable chunks with `chunk`'s update form calls in acceptance order: the oldest leads the
        first, which takes the next ones while they fit (the batch limit, `max_members`); the first that
        does not fit leads the second call, and so on. `chunk` rides with its call's leader. With
        `due_by`, only a leader whose own try is due by then (its queue message: a leader whose try
        comes later would leave `chunk` waiting, so `chunk` leads instead and carries it)."""
        if chunk.solo:
            return None
        lead: Chunk | None = None
        size = count = 0
        for entry in self.sendable():
            if entry.fields != chunk.fields or entry.solo:
                continue
            if lead is None or count >= max_members or size + len(entry.alert_ids) > limit:
                lead, size, count = entry, 0, 0
            size, count = size + len(entry.alert_ids), count + 1
            if entry.chunk_id == chunk.chunk_id:
                break
        else:
            return None  # `chunk` is not sendable itself
        if lead is None or lead.chunk_id == chunk.chunk_id:
            return None
        if due_by is not None and lead.msg_due_at > due_by:
            return None
        return lead

    def has_peer(self, chunk: Chunk) -> bool:
        """Would `chunk` share a batchUpdate call with another waiting chunk (identical update)? Then it
        rides that call for free and is not worth a PATCH grant of its own."""
        return any(
            entry.chunk_id != chunk.chunk_id and entry.fields == chunk.fields and not entry.solo
            for entry in self.sendable()
        )


def _free(entry: Chunk, now: float) -> bool:
    return (
        entry.state == PendingState.PENDING
        and entry.not_before <= now
        and not entry.solo
        and not entry.fresh_token
    )


def alert_ids_of(members: Iterable[Chunk]) -> tuple[str, ...]:
    """The call's ids: every member's, in member order."""
    return tuple(alert for member in members for alert in member.alert_ids)


def named_in(message: str, members: Sequence[Chunk]) -> list[Chunk]:
    """The members one of whose alert ids MDE's error message names (its 404 and 400 messages list the
    ids they refuse)."""
    return [m for m in members if any(alert in message for alert in m.alert_ids)]
