"""The pipeline: accept a validated request, then send its chunks within the shared budget and in order.

One path for every source (HTTP, the inbound queue, Sentinel): claim the idempotency key, accept the
request into the ledger (its chunks become the outbox), then try to send. The HTTP path sends at once
while the budget allows within SYNC_MAX_WAIT_SECONDS; whatever cannot be sent now is handed to the chunks
queue, whose worker sends it later. Every send follows the same steps (`Sender.attempt`):

1. not before its back-off; no earlier pending update of any of its alerts (per-alert order);
2. a grant from the shared budget (every call counts, whatever its answer): now, or a slot reserved up
   to the wait allowed (SYNC_MAX_WAIT_SECONDS on the HTTP path, WORKER_BUDGET_WAIT_SECONDS in the
   worker), which the shared log then holds for this call: waiters are served in order, and the budget
   is used the moment it frees up;
3. marked Sending in the ledger *before* the call (the outbox: a crash leaves a trace), MARK_LEAD_SECONDS
   ahead of a reserved slot (the worker's grants are always that far ahead); the HTTP path usually
   accepts its first chunk already marked (Ledger.look_ahead);
4. the call, and its outcome recorded (docs/contracts.md §1):
   - 200 → Succeeded; MaximumBatchSizeExceeded → split by MDE's allowance, limit remembered;
   - 401 → once more with a token fetched fresh; a second 401, or a 403 → Failed (502);
   - other 4xx → Failed (422) with MDE's code, message and target;
   - 429/5xx/not sent → back to Pending with back-off (429's Retry-After blocks every instance);
   - sent but no answer → with a comment, OutcomeUnknown (504: MDE appends comments, a re-send would
     show twice) unless RESEND_UNKNOWN_WITH_COMMENT; without one, retried like a 5xx;
   - after MAX_ATTEMPTS, or once the operation is older than IDEMPOTENCY_TTL_SECONDS → Failed (502, or
     504 when the last failure was a timeout).

Long waits never hold a queue message: the worker waits in process only for a slot it reserved at most
WORKER_BUDGET_WAIT_SECONDS ahead; otherwise it re-enqueues the chunk with a visibility delay (ending half
that wait before the budget should free up, so it comes back in time to reserve) and ends successfully.
Each chunk has one live message, named by a token stored on the chunk; a message whose token is not the
chunk's is a stale duplicate and is dropped. The sweep (a timer) resolves what a crash
left behind: a Sending chunk older than the call timeout plus SWEEP_GRACE_SECONDS (outcome unknown), and
a Pending chunk whose message is overdue by SWEEP_GRACE_SECONDS (re-enqueued).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from shared.defender import TOKEN_UNAVAILABLE, CallKind, CallResult, UpstreamError
from shared.ledger import Chunk, ChunkResult, PendingState
from shared.ratelimit import Denial, Grant
from shared.validation import outbound_body

if TYPE_CHECKING:
    from shared.defender import BatchLimit, DefenderClient
    from shared.ledger import Ledger
    from shared.queues import Queues
    from shared.ratelimit import RateLimiter
    from shared.settings import Settings

log = logging.getLogger(__name__)

ORDER_WAIT_SECONDS = 1.0  # how soon a chunk waiting behind an earlier update of its alert looks again
MAX_BACKOFF_SECONDS = 300.0
# How far ahead the queue worker reserves budget and waits for it in process (RateLimiter.reserve). It is
# longer than the queue's own granularity (whole-second visibility delays, polling up to
# maxPollingInterval), so a reserved slot is used the moment it comes; a chunk whose slot is further away
# goes back to the queue and comes back half this early, to reserve one then. Never more than half
# SWEEP_GRACE_SECONDS (Sender.worker_wait), so the sweep never takes a chunk whose worker is waiting for
# its slot for one whose message went missing.
WORKER_BUDGET_WAIT_SECONDS = 10.0
STALE_GRANT_RETRY_SECONDS = 0.1
STALE_GRANT_RETRIES = 2  # in process, before the chunk goes back to the queue
# How long before a reserved slot its chunk is marked Sending; the worker's grants (and a retry's after a
# grant went stale) are at least this far ahead, so the mark never makes the call late.
MARK_LEAD_SECONDS = 0.2
TOKEN_RETRY_SECONDS = 5.0  # short waits are cheaper in process than as a message round trip

ROLE_HINT = (
    "alertgate's identity needs the Alert.ReadWrite.All application role of WindowsDefenderATP "
    "(infra/grant-defender-permission.sh grants it); a new grant can take a while to reach tokens, so "
    "re-submit once it has."
)


AnswerHook = Callable[[Chunk], str]
"""Builds, from a chunk as it ends, the answer a waiting caller gets: stored with the chunk's end."""


class AttemptKind(enum.Enum):
    FINISHED = "finished"  # the chunk reached a terminal state
    DEFERRED = "deferred"  # try again after `delay`
    SPLIT = "split"  # replaced by smaller pieces
    LOST = "lost"  # someone else changed the chunk first: they own it now


@dataclass
class Attempt:
    kind: AttemptKind
    chunk: Chunk
    delay: float = 0.0
    pieces: list[Chunk] = field(default_factory=list)


def backoff(attempts: int, retry_after: float | None) -> float:
    """Exponential from 1 s with ±50 % jitter, capped, and never sooner than MDE's Retry-After."""
    base = min(MAX_BACKOFF_SECONDS, 2.0 ** max(0, attempts - 1))
    return max(retry_after or 0.0, base * random.uniform(0.5, 1.5))


def with_role_hint(error: UpstreamError | None) -> UpstreamError:
    base = error or UpstreamError(None, None, "MDE refused the token")
    return UpstreamError(base.http_status, base.code, f"{base.message} — {ROLE_HINT}", base.target)


class Sender:
    """Sends one pending chunk by the rules above; shared by the HTTP path, the worker and the sweep."""

    def __init__(
        self,
        settings: Settings,
        ledger: Ledger,
        limiter: RateLimiter,
        client: DefenderClient,
        batch_limit: BatchLimit,
        queues: Queues,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.ledger = ledger
        self.limiter = limiter
        self.client = client
        self.batch_limit = batch_limit
        self.queues = queues
        self._clock = clock
        self._operation_created: dict[str, float] = {}

    async def attempt(
        self,
        chunk: Chunk,
        max_wait: float,
        *,
        held: Grant | Denial | None = None,
        answer_for: AnswerHook | None = None,
        lead: float = 0.0,
    ) -> Attempt:
        """One try at sending `chunk` (plus the single fresh-token retry after a 401).

        The synchronous path hands in a chunk that was accepted already marked Sending (its per-alert
        order checked before accepting: Ledger.look_ahead) and `held`, the budget it asked for side by
        side with accepting; a usable grant is then sent at once, otherwise the mark is given back before
        any wait, so a crash while waiting never leaves a false "outcome unknown". If the chunk ends in
        this try, its end is recorded with one write in place (Ledger.finish) holding `answer_for`'s
        answer, the caller's idempotent replay. A `lead` asks for grants at least that far ahead, time
        to mark the chunk Sending before its slot (the queue worker, where no caller waits, uses it; a
        retry after a grant went stale does too).
        """
        now = self._clock()
        if chunk.not_before > now:
            return Attempt(AttemptKind.DEFERRED, chunk, chunk.not_before - now)
        current = await self.batch_limit.refresh()
        if len(chunk.alert_ids) > current:
            return await self._split(chunk, current)
        order_checked = chunk.state == PendingState.SENDING
        rejected: str | None = None
        first = True
        stale = 0
        while True:
            token = await self.client.token(fresh=chunk.fresh_token, rejected=rejected)
            grant: Grant | Denial | None = (
                held if first and order_checked and isinstance(held, Grant) else None
            )
            if isinstance(token, CallResult) or grant is None:
                unmarked = await self._unmark(chunk)
                if unmarked is None:
                    return Attempt(AttemptKind.LOST, chunk)
                chunk = unmarked
            if isinstance(token, CallResult):
                return await self._retry_later(chunk, token, answer_for)
            if grant is None:
                grant = await (
                    self._ordered_grant(chunk, max_wait, check_order=not order_checked, held=held, lead=lead)
                    if first
                    else self.limiter.reserve(0.0, lead=lead)
                )
            first = False
            if grant is None:
                return Attempt(AttemptKind.DEFERRED, chunk, ORDER_WAIT_SECONDS)
            if isinstance(grant, Denial):
                return Attempt(AttemptKind.DEFERRED, chunk, self.requeue_delay(grant.wait_seconds))
            sending = chunk if chunk.state == PendingState.SENDING else await self._mark_sending(chunk, grant)
            if sending is None:  # someone else changed the chunk: they own it now, and no call was made
                await self._release(grant)
                return Attempt(AttemptKind.LOST, chunk)
            slot = await self.limiter.wait_for(grant)
            if isinstance(slot, Denial):  # a 429 block came up while waiting for the reserved slot
                unmarked = await self._unmark(sending)
                if unmarked is None:
                    return Attempt(AttemptKind.LOST, sending)
                return Attempt(AttemptKind.DEFERRED, unmarked, self.requeue_delay(slot.wait_seconds))
            if self._clock() - grant.at > self.max_grant_age:
                gone_stale = await self._grant_went_stale(sending, grant)
                if gone_stale.kind is not AttemptKind.DEFERRED or stale >= STALE_GRANT_RETRIES:
                    return gone_stale
                chunk, held, first, stale = gone_stale.chunk, None, True, stale + 1
                lead = max(lead, MARK_LEAD_SECONDS)  # give the mark its time before the next slot
                continue
            body = outbound_body(sending.alert_ids, sending.fields, self.settings.defender_enum_overrides)
            result = await self.client.post(body, token)
            if result.kind is CallKind.UNAUTHORIZED and not sending.fresh_token:
                log.warning(
                    "chunk %s: MDE answered 401; retrying once with a freshly fetched token", chunk.chunk_id
                )
                retry = await self.ledger.update_pending(
                    sending, state=PendingState.PENDING, fresh_token=True, sending_since=0.0
                )
                if retry is None:
                    return Attempt(AttemptKind.LOST, chunk)
                chunk, max_wait, rejected = retry, 0.0, token
                continue
            return await self._record(sending, result, answer_for)

    @property
    def worker_wait(self) -> float:
        """How far ahead the queue worker reserves budget and waits for it (see WORKER_BUDGET_WAIT_SECONDS)."""
        return min(WORKER_BUDGET_WAIT_SECONDS, self.settings.sweep_grace_seconds / 2)

    def requeue_delay(self, budget_wait: float) -> float:
        """How long a chunk denied budget stays in the queue: it comes back half the worker's in-process
        wait before the budget should free up, early enough to reserve its slot then (the wait is a lower
        bound, so coming back late would only leave the budget idle)."""
        return max(0.0, budget_wait - self.worker_wait / 2)

    async def budget_now(self) -> Grant | Denial | None:
        """A non-waiting budget request that the synchronous path makes side by side with accepting.

        Only once a token is at hand (normally from the cache, no I/O): a grant must reach MDE within half
        the safety margin, and a token fetch could take longer. None when there is no token or the limiter
        failed: the ordinary path then asks again.
        """
        if isinstance(await self.client.token(), CallResult):
            return None
        try:
            return await self.limiter.acquire(0.0)
        except Exception:
            log.warning("budget request alongside accepting failed; asking again after", exc_info=True)
            return None

    async def _release(self, grant: Grant) -> None:
        """Give back a grant whose call was not made; if that fails, the budget is only spent unused."""
        try:
            await self.limiter.release(grant)
        except Exception:
            log.warning("an unused grant could not be given back (its budget stays spent)", exc_info=True)

    async def _mark_sending(self, chunk: Chunk, grant: Grant) -> Chunk | None:
        """Mark the chunk Sending just before its grant's slot (MARK_LEAD_SECONDS ahead of a reserved
        one), so that the call leaves at the slot instead of a write's latency after it, while a crash
        before the slot leaves a false "Sending" for at most that long."""
        early = grant.at - MARK_LEAD_SECONDS - self._clock()
        if early > 0:
            await asyncio.sleep(early)
        return await self.ledger.update_pending(
            chunk, state=PendingState.SENDING, sending_since=self._clock(), attempts=chunk.attempts + 1
        )

    async def _unmark(self, chunk: Chunk) -> Chunk | None:
        """A chunk marked Sending whose call is not going to start now goes back to Pending (not counted
        as an attempt); a Pending chunk is returned as it is. None if someone else changed it."""
        if chunk.state != PendingState.SENDING:
            return chunk
        return await self.ledger.update_pending(
            chunk, state=PendingState.PENDING, sending_since=0.0, attempts=max(0, chunk.attempts - 1)
        )

    async def _ordered_grant(
        self,
        chunk: Chunk,
        max_wait: float,
        *,
        check_order: bool = True,
        held: Grant | Denial | None = None,
        lead: float = 0.0,
    ) -> Grant | Denial | None:
        """A grant for `chunk`, or None while an earlier pending update touches one of its alerts.

        The order check and a first, non-waiting budget request (or the one the caller `held`) run side
        by side: one round trip instead of two on the synchronous path. When the chunk turns out to be
        blocked, a grant it got is given back (RateLimiter.release).
        """

        async def first_budget() -> Grant | Denial:
            return held if held is not None else await self.limiter.reserve(0.0, lead=lead)

        if check_order:
            blocker, grant = await asyncio.gather(self.ledger.blocked_by_earlier(chunk), first_budget())
            if blocker is not None:
                if isinstance(grant, Grant):
                    log.info("chunk %s waits behind chunk %s", chunk.chunk_id, blocker.chunk_id)
                    await self._release(grant)
                return None
        else:
            grant = await first_budget()
        if isinstance(grant, Denial) and max_wait > 0:
            return await self.limiter.reserve(max_wait, lead=lead)
        return grant

    @property
    def max_grant_age(self) -> float:
        """How old a grant may be when its call starts.

        The limiter counts a call when it grants it, MDE when the call arrives; between the two lies the
        write that marks the chunk Sending (or, on the synchronous path, the accept it was asked for beside).
        The safety margin covers that lag only while it is short, so a grant older than half the margin is
        given up before its call, given back (RateLimiter.release), and the chunk tried again. With no
        margin the operator accepted the lag: no check.
        """
        margin = self.settings.rate_limit_safety_margin_seconds
        return margin / 2 if margin > 0 else float("inf")

    async def _grant_went_stale(self, sending: Chunk, grant: Grant) -> Attempt:
        log.info("chunk %s: grant too old when its call would start; trying again", sending.chunk_id)
        pending = await self.ledger.update_pending(
            sending, state=PendingState.PENDING, sending_since=0.0, attempts=sending.attempts - 1
        )
        if pending is None:
            return Attempt(AttemptKind.LOST, sending)
        await self._release(grant)  # no call was made: the budget goes back
        return Attempt(AttemptKind.DEFERRED, pending, STALE_GRANT_RETRY_SECONDS)

    async def _split(self, chunk: Chunk, size: int) -> Attempt:
        pieces = await self.ledger.split(chunk, size)
        if pieces is None:  # someone else changed the chunk first: they own it now
            return Attempt(AttemptKind.LOST, chunk)
        log.info("chunk %s split into %d pieces of at most %d ids", chunk.chunk_id, len(pieces), size)
        return Attempt(AttemptKind.SPLIT, chunk, pieces=pieces)

    async def _record(
        self, chunk: Chunk, result: CallResult, answer_for: AnswerHook | None = None
    ) -> Attempt:
        kind = result.kind
        error = result.error.as_dict() if result.error else None
        if kind is CallKind.OK:
            return await self._finish(chunk, ChunkResult.SUCCEEDED, 200, None, answer_for)
        if kind is CallKind.BATCH_TOO_LARGE and len(chunk.alert_ids) > 1:
            size = await self.batch_limit.learn(result.allowed_batch_size, len(chunk.alert_ids))
            return await self._split(chunk, size)
        if kind in (CallKind.PERMANENT, CallKind.BATCH_TOO_LARGE):
            return await self._finish(chunk, ChunkResult.FAILED, 422, error, answer_for)
        if kind in (CallKind.UNAUTHORIZED, CallKind.FORBIDDEN):
            hinted = with_role_hint(result.error).as_dict()
            return await self._finish(chunk, ChunkResult.FAILED, 502, hinted, answer_for)
        if (
            kind is CallKind.OUTCOME_UNKNOWN
            and chunk.has_comment
            and not self.settings.resend_unknown_with_comment
        ):
            return await self._finish(chunk, ChunkResult.OUTCOME_UNKNOWN, 504, error, answer_for)
        if result.error is not None and result.error.http_status == 429:
            await self.limiter.block(result.retry_after if result.retry_after is not None else 1.0)
        return await self._retry_later(chunk, result, answer_for)

    async def _retry_later(
        self, chunk: Chunk, result: CallResult, answer_for: AnswerHook | None = None
    ) -> Attempt:
        error = result.error.as_dict() if result.error else None
        final_status = 504 if result.timed_out or result.kind is CallKind.OUTCOME_UNKNOWN else 502
        if chunk.attempts >= self.settings.max_attempts or await self._too_old(chunk):
            return await self._finish(chunk, ChunkResult.FAILED, final_status, error, answer_for)
        delay = backoff(chunk.attempts, result.retry_after)
        if result.error is not None and result.error.code == TOKEN_UNAVAILABLE:
            delay = max(
                delay, TOKEN_RETRY_SECONDS
            )  # not an attempt at MDE: don't hammer the identity endpoint
        pending = await self.ledger.update_pending(
            chunk,
            state=PendingState.PENDING,
            sending_since=0.0,
            not_before=self._clock() + delay,
            last_error=error,
        )
        if pending is None:
            return Attempt(AttemptKind.LOST, chunk)
        return Attempt(AttemptKind.DEFERRED, pending, delay)

    async def _too_old(self, chunk: Chunk) -> bool:
        return self._clock() - chunk.created_at > self.settings.idempotency_ttl_seconds

    async def _finish(
        self,
        chunk: Chunk,
        result: ChunkResult,
        status: int,
        error: dict[str, Any] | None,
        answer_for: AnswerHook | None = None,
    ) -> Attempt:
        if answer_for is None:
            done = await self.ledger.finish(chunk, result, status, error)
        else:  # a caller is waiting: one write in place, with its answer (the sweep settles it later)
            done = await self.ledger.finish(
                chunk, result, status, error, in_place=True, answer_for=answer_for
            )
        log.info("chunk %s of operation %s: %s", chunk.chunk_id, chunk.operation_id, done.state)
        return Attempt(AttemptKind.FINISHED, done)

    # --- scheduling ----------------------------------------------------------------------------------

    async def schedule(self, chunk: Chunk, delay: float) -> bool:
        """Make `chunk`'s next try a queue message due after `delay`; False if someone else owns it."""
        token = uuid.uuid4().hex
        owned = await self.ledger.update_pending(chunk, msg_token=token, msg_due_at=self._clock() + delay)
        if owned is None:
            return False
        await self.queues.send_chunk(chunk.chunk_id, token, delay)
        return True

    async def follow_up(self, attempt: Attempt) -> None:
        """After a try that did not finish the chunk, make sure its next try is queued."""
        if attempt.kind is AttemptKind.DEFERRED:
            await self.schedule(attempt.chunk, attempt.delay)
        elif attempt.kind is AttemptKind.SPLIT:
            for piece in attempt.pieces:
                await self.schedule(piece, 0.0)

    # --- the queue worker and the sweep --------------------------------------------------------------

    async def on_message(self, chunk_id: str, token: str) -> str:
        """Handle one chunks-queue message; never raises for a state it can resolve. Returns what it did."""
        chunk = await self.ledger.pending_chunk(chunk_id)
        if chunk is None:
            return "gone"  # finished or split: nothing to do
        if chunk.msg_token != token:
            return "stale-message"
        if chunk.state == PendingState.SENDING:
            age = self._clock() - chunk.sending_since
            if age < self.sending_lease:
                # Someone's call is in flight: look again once it must have ended. The chunk itself is left
                # alone (changing it would make that sender's own record of the outcome fail its ETag).
                await self.queues.send_chunk(chunk.chunk_id, token, self.sending_lease - age)
                return "in-flight-elsewhere"
            resolved = await self.resolve_stale_send(chunk)
            if resolved is None or resolved.kind is not AttemptKind.DEFERRED:
                return "stale-send-resolved"
            chunk = resolved.chunk
        attempt = await self.attempt(chunk, max_wait=self.worker_wait, lead=MARK_LEAD_SECONDS)
        await self.follow_up(attempt)
        return attempt.kind.value

    @property
    def sending_lease(self) -> float:
        """How long a Sending mark is trusted: no call lives past its timeout, plus the sweep's grace."""
        return self.settings.defender_http_timeout_seconds + self.settings.sweep_grace_seconds

    async def resolve_stale_send(self, chunk: Chunk) -> Attempt | None:
        """A call was marked Sending and never recorded (the process died): its outcome is unknown."""
        log.warning(
            "chunk %s was sent at %.3f and never recorded: outcome unknown",
            chunk.chunk_id,
            chunk.sending_since,
        )
        error = UpstreamError(
            None, "OutcomeUnknown", "alertgate stopped between sending this chunk and recording MDE's answer"
        )
        result = CallResult(CallKind.OUTCOME_UNKNOWN, error)
        if chunk.has_comment and not self.settings.resend_unknown_with_comment:
            return await self._finish(chunk, ChunkResult.OUTCOME_UNKNOWN, 504, error.as_dict())
        return await self._retry_later(chunk, result)

    async def sweep(self) -> dict[str, int]:
        """Resolve what crashes left (stale Sending marks, Pending chunks whose message went missing) and
        settle chunks the synchronous path finished in place."""
        counts = {"staleSends": 0, "requeued": 0, "settled": 0}
        now = self._clock()
        for chunk in await self.ledger.all_pending():
            if chunk.finished:  # ended on the synchronous path, recorded in place
                counts["settled"] += await self.ledger.settle(chunk)
            elif chunk.state == PendingState.SENDING and now - chunk.sending_since > self.sending_lease:
                attempt = await self.resolve_stale_send(chunk)
                counts["staleSends"] += 1
                if attempt is not None:
                    await self.follow_up(attempt)
            elif (
                chunk.state == PendingState.PENDING
                and now > chunk.msg_due_at + self.settings.sweep_grace_seconds
            ):
                due = max(0.0, chunk.not_before - now)
                if await self.schedule(chunk, due):
                    counts["requeued"] += 1
        return counts

    async def on_poison(self, chunk_id: str) -> bool:
        """A chunk message failed repeatedly: record the chunk Failed rather than let it vanish."""
        chunk = await self.ledger.pending_chunk(chunk_id)
        if chunk is None:
            return False
        age = self._clock() - chunk.sending_since
        if chunk.state == PendingState.SENDING and age < self.sending_lease:
            # A call is in flight: its sender records the outcome. Look again once it must have ended
            # (then the ordinary worker path resolves a mark left behind).
            await self.queues.send_chunk(chunk.chunk_id, chunk.msg_token, self.sending_lease - age)
            return False
        error = {
            "httpStatus": None,
            "code": "PoisonMessage",
            "target": None,
            "message": "The chunk's queue message failed repeatedly and reached the poison queue.",
        }
        await self.ledger.finish(chunk, ChunkResult.FAILED, 502, chunk.last_error or error)
        return True


def plan_chunks(
    alert_ids: tuple[str, ...], fields: dict[str, str], limit: int, max_entries: int
) -> list[tuple[tuple[str, ...], dict[str, str]]]:
    """Chunks of at most `limit` ids, fewer and larger if the request would need more than `max_entries`
    (the attempt splits those by the limit before sending, keeping their place in the order)."""
    size = max(limit, math.ceil(len(alert_ids) / max_entries))
    return [(alert_ids[i : i + size], fields) for i in range(0, len(alert_ids), size)]
