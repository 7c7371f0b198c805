"""The chunks worker, the sweep and the poison handler: what happens to a chunk after its first try.

They are the queue- and timer-triggered side of the sender (shared.sender), with no caller waiting:

- `on_message`: one chunks-queue message. A message whose token is not its chunk's is a stale duplicate
  and is dropped; a chunk whose call is in flight elsewhere is looked at again once that call must have
  ended; a Sending mark older than the lease is resolved by the outcome-unknown rule; otherwise one
  attempt, and its next try queued.
- `sweep` (a timer): settles chunks the synchronous path finished in place, resolves stale Sending marks
  (a crash between call and record), and re-queues Pending chunks whose message went missing.
- `on_poison`: a chunk message that failed repeatedly ends its chunk Failed rather than let it vanish,
  unless a call for it is in flight, whose sender records the outcome.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from shared.ledger import ChunkResult, PendingState
from shared.sender import MARK_LEAD_SECONDS, AttemptKind

if TYPE_CHECKING:
    from shared.sender import Sender


class Worker:
    """The queue and timer side of one tenant's sender."""

    def __init__(self, sender: Sender, clock: Callable[[], float] = time.time) -> None:
        self.sender = sender
        self._clock = clock

    async def on_message(self, chunk_id: str, token: str) -> str:
        """Handle one chunks-queue message; never raises for a state it can resolve. Returns what it did."""
        with self.sender.holding(chunk_id):
            return await self._on_message(chunk_id, token)

    async def _on_message(self, chunk_id: str, token: str) -> str:
        chunk = await self.sender.ledger.pending_chunk(chunk_id)
        if chunk is None:
            return "gone"  # finished or split: nothing to do
        if chunk.msg_token != token:
            return "stale-message"
        if self.sender.sending_here(chunk):
            return "in-flight-here"  # that try records it; were this process to die, the sweep would
        if chunk.state == PendingState.SENDING:
            age = self._clock() - chunk.sending_since
            if age < self.sender.sending_lease:
                # Someone's call is in flight: look again once it must have ended. The chunk itself is left
                # alone (changing it would make that sender's own record of the outcome fail its ETag).
                await self.sender.queues.send_chunk(chunk.chunk_id, token, self.sender.sending_lease - age)
                return "in-flight-elsewhere"
            resolved = await self.sender.resolve_stale_send(chunk)
            if resolved is None or resolved.kind is not AttemptKind.DEFERRED:
                return "stale-send-resolved"
            chunk = resolved.chunk
        attempt = await self.sender.attempt(chunk, max_wait=self.sender.worker_wait, lead=MARK_LEAD_SECONDS)
        await self.sender.follow_up(attempt)
        return attempt.kind.value

    async def sweep(self) -> dict[str, int]:
        """Resolve what crashes left (stale Sending marks, Pending chunks whose message went missing) and
        settle chunks the synchronous path finished in place."""
        counts = {"staleSends": 0, "requeued": 0, "settled": 0}
        now = self._clock()
        for chunk in await self.sender.ledger.all_pending():
            if chunk.finished:  # ended on the synchronous path, recorded in place
                counts["settled"] += await self.sender.ledger.settle(chunk)
            elif (
                chunk.state == PendingState.SENDING and now - chunk.sending_since > self.sender.sending_lease
            ):
                attempt = await self.sender.resolve_stale_send(chunk)
                counts["staleSends"] += 1
                if attempt is not None:
                    await self.sender.follow_up(attempt)
            elif (
                chunk.state == PendingState.PENDING
                and now > chunk.msg_due_at + self.sender.settings.sweep_grace_seconds
            ):
                due = max(0.0, chunk.not_before - now)
                if await self.sender.schedule(chunk, due):
                    counts["requeued"] += 1
        return counts

    async def on_poison(self, chunk_id: str) -> bool:
        """A chunk message failed repeatedly: record the chunk Failed (OutcomeUnknown if it was sent) rather than let it vanish."""
        if self.sender.telemetry is not None:
            self.sender.telemetry.poison("chunks")
        chunk = await self.sender.ledger.pending_chunk(chunk_id)
        if chunk is None:
            return False
        age = self._clock() - chunk.sending_since
        if chunk.state == PendingState.SENDING and age < self.sender.sending_lease:
            # A call is in flight: its sender records the outcome. Look again once it must have ended
            # (then the ordinary worker path resolves a mark left behind).
            await self.sender.queues.send_chunk(
                chunk.chunk_id, chunk.msg_token, self.sender.sending_lease - age
            )
            return False
        if chunk.state == PendingState.SENDING:
            # Its call was made and never recorded: whatever the message's fate, MDE may have applied
            # it, so the chunk ends OutcomeUnknown (504), never a Failed that invites a re-send.
            unknown = {
                "httpStatus": None,
                "code": "OutcomeUnknown",
                "target": None,
                "message": "The chunk was sent and its message then failed repeatedly (poison queue); "
                "MDE may have applied it.",
            }
            await self.sender.ledger.finish(chunk, ChunkResult.OUTCOME_UNKNOWN, 504, unknown)
            return True
        error = {
            "httpStatus": None,
            "code": "PoisonMessage",
            "target": None,
            "message": "The chunk's queue message failed repeatedly and reached the poison queue.",
        }
        await self.sender.ledger.finish(chunk, ChunkResult.FAILED, 502, chunk.last_error or error)
        return True
