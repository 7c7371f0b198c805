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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from shared.channels.base import TOKEN_UNAVAILABLE, CallKind, CallResult, UpstreamError, bearer
from shared.errors import StorageUnavailable
from shared.ledger import Chunk, ChunkResult, PendingState
from shared.ratelimit import Denial, Grant

if TYPE_CHECKING:
    from shared.channels import Channel
    from shared.ledger import Ledger
    from shared.queues import Queues
    from shared.ratelimit import RateLimiter
    from shared.settings import Settings
    from shared.tokens import TokenProvider

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
TOKEN_RETRY_SECONDS = 5.0
PERSIST_RETRY_SECONDS = 0.5
T = TypeVar("T")  # short waits are cheaper in process than as a message round trip

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


@dataclass
class _Try:
    """One attempt's state as it goes through the steps of `Sender.attempt`."""

    chunk: Chunk
    max_wait: float
    held: Grant | Denial | None
    answer_for: AnswerHook | None
    lead: float
    order_checked: bool  # accepted marked Sending: the order was checked before accepting
    rejected: str | None = None  # the token MDE answered 401 to
    first: bool = True  # the first budget request (it may check the order and wait)
    stale: int = 0  # grants given up for age so far

    def usable_held(self) -> Grant | None:
        """The grant asked for beside accepting, usable only by a chunk accepted marked Sending."""
        if self.first and self.order_checked and isinstance(self.held, Grant):
            return self.held
        return None

    def retry_after_stale_grant(self, pending: Chunk) -> bool:
        """After a grant went stale: try again in process (up to STALE_GRANT_RETRIES), with a lead that
        gives the mark its time before the next slot."""
        if self.stale >= STALE_GRANT_RETRIES:
            return False
        self.chunk, self.held, self.first, self.stale = pending, None, True, self.stale + 1
        self.lead = max(self.lead, MARK_LEAD_SECONDS)
        return True


class Sender:
    """Sends one pending chunk by the rules above; shared by the HTTP path, the worker and the sweep.

    `attempt` is a short sequence of named steps over one `_Try`; each step either hands the try on or
    ends it with an Attempt.
    """

    def __init__(
        self,
        settings: Settings,
        ledger: Ledger,
        channel: Channel,
        tokens: TokenProvider,
        queues: Queues,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.ledger = ledger
        self.channel = channel
        self.tokens = tokens
        self.queues = queues
        self._clock = clock

    @property
    def limiter(self) -> RateLimiter:
        return self.channel.limiter

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
        ended = await self._not_yet(chunk)
        if ended is not None:
            return ended
        state = _Try(
            chunk, max_wait, held, answer_for, lead, order_checked=chunk.state == PendingState.SENDING
        )
        while True:
            token = await bearer(self.tokens, fresh=state.chunk.fresh_token, rejected=state.rejected)
            grant = state.usable_held()
            if isinstance(token, CallResult) or grant is None:
                ended = await self._give_mark_back(state)
                if ended is not None:
                    return ended
            if isinstance(token, CallResult):
                return await self._retry_later(state.chunk, token, answer_for)
            granted = grant or await self._budget(state)
            if not isinstance(granted, Grant):
                return granted
            sending = await self._mark(state, granted)
            if isinstance(sending, Attempt):
                return sending
            blocked = await self._await_slot(sending, granted)
            if blocked is not None:
                return blocked
            if self._clock() - granted.at > self.max_grant_age:
                gone_stale = await self._grant_went_stale(sending, granted)
                if gone_stale.kind is AttemptKind.DEFERRED and state.retry_after_stale_grant(
                    gone_stale.chunk
                ):
                    continue
                return gone_stale
            result = await self.channel.send(sending.alert_ids, sending.fields, token)
            if result.kind is CallKind.UNAUTHORIZED and not sending.fresh_token:
                lost = await self._fresh_token_next(state, sending, token)
                if lost is not None:
                    return lost
                continue
            return await self._record(sending, result, answer_for)

    # --- the steps of an attempt ---------------------------------------------------------------------

    async def _not_yet(self, chunk: Chunk) -> Attempt | None:
        """Before anything: still in its back-off, or too big for the channel now (split first)."""
        now = self._clock()
        if chunk.not_before > now:
            return Attempt(AttemptKind.DEFERRED, chunk, chunk.not_before - now)
        limit = await self.channel.max_alerts()
        if len(chunk.alert_ids) > limit:
            return await self._split(chunk, limit)
        return None

    async def _give_mark_back(self, state: _Try) -> Attempt | None:
        """No call is about to start (no token, or no grant in hand): a Sending mark goes back first."""
        unmarked = await self._unmark(state.chunk)
        if unmarked is None:
            return Attempt(AttemptKind.LOST, state.chunk)
        state.chunk = unmarked
        return None

    async def _budget(self, state: _Try) -> Grant | Attempt:
        """A grant, or the Attempt that defers the chunk: behind an earlier update of one of its alerts, or
        denied budget. The first round checks the order (unless done before accepting) and may wait;
        after a fresh token the call goes now or not at all."""
        if state.first:
            grant = await self._ordered_grant(
                state.chunk,
                state.max_wait,
                check_order=not state.order_checked,
                held=state.held,
                lead=state.lead,
            )
        else:
            grant = await self.limiter.reserve(0.0, lead=state.lead)
        state.first = False
        if grant is None:
            return Attempt(AttemptKind.DEFERRED, state.chunk, ORDER_WAIT_SECONDS)
        if isinstance(grant, Denial):
            return Attempt(AttemptKind.DEFERRED, state.chunk, self.requeue_delay(grant.wait_seconds))
        return grant

    async def _mark(self, state: _Try, grant: Grant) -> Chunk | Attempt:
        """The chunk marked Sending before its slot (already marked if accepted so); LOST if someone else
        changed it meanwhile, and then the grant goes back: no call was made."""
        state.first = False
        if state.chunk.state == PendingState.SENDING:
            return state.chunk
        sending = await self._mark_sending(state.chunk, grant)
        if sending is None:
            await self._release(grant)
            return Attempt(AttemptKind.LOST, state.chunk)
        return sending

    async def _await_slot(self, sending: Chunk, grant: Grant) -> Attempt | None:
        """Wait for the grant's slot; None when it came. A 429 block that came up meanwhile defers the
        chunk (its mark given back: no call was made)."""
        slot = await self.limiter.wait_for(grant)
        if isinstance(slot, Denial):
            unmarked = await self._unmark(sending)
            if unmarked is None:
                return Attempt(AttemptKind.LOST, sending)
            return Attempt(AttemptKind.DEFERRED, unmarked, self.requeue_delay(slot.wait_seconds))
        return None

    async def _fresh_token_next(self, state: _Try, sending: Chunk, token: str) -> Attempt | None:
        """MDE answered 401: once more, now, with a token fetched fresh (the 401 spent no MDE work)."""
        log.warning(
            "chunk %s: MDE answered 401; retrying once with a freshly fetched token", sending.chunk_id
        )
        retry = await self.ledger.update_pending(
            sending, state=PendingState.PENDING, fresh_token=True, sending_since=0.0
        )
        if retry is None:
            return Attempt(AttemptKind.LOST, sending)
        state.chunk, state.max_wait, state.rejected = retry, 0.0, token
        return None

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
        if isinstance(await bearer(self.tokens), CallResult):
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
        await self._release(grant)  # no call was made: the budget goes back
        if pending is None:
            return Attempt(AttemptKind.LOST, sending)
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
        size = await self.channel.learn_limit(result, len(chunk.alert_ids))
        if size is not None:
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
        final_status = 504 if result.timed_out else 502  # docs/contracts.md §1: 504 only for a timeout
        if chunk.attempts >= self.settings.max_attempts or await self._too_old(chunk):
            return await self._finish(chunk, ChunkResult.FAILED, final_status, error, answer_for)
        delay = backoff(chunk.attempts, result.retry_after)
        if result.error is not None and result.error.code == TOKEN_UNAVAILABLE:
            delay = max(
                delay, TOKEN_RETRY_SECONDS
            )  # not an attempt at MDE: don't hammer the identity endpoint
        pending = await self._persisting(
            lambda: self.ledger.update_pending(
                chunk,
                state=PendingState.PENDING,
                sending_since=0.0,
                not_before=self._clock() + delay,
                last_error=error,
                # A fresh token that reached MDE served its one try (a later 401 earns another); one
                # still owed because the fetch failed stays owed.
                fresh_token=chunk.fresh_token and not result.sent,
            )
        )
        if pending is None:
            return Attempt(AttemptKind.LOST, chunk)
        return Attempt(AttemptKind.DEFERRED, pending, delay)

    async def _persisting(self, write: Callable[[], Awaitable[T]]) -> T:
        """A write that records what MDE told us: storage faults are ridden out for as long as the sweep
        would wait before it calls the chunk's outcome unknown (docs/contracts.md §3), never given up
        sooner, since the sweep could then only guess."""
        give_up = time.monotonic() + self.sending_lease
        while True:
            try:
                return await write()
            except StorageUnavailable:
                if time.monotonic() >= give_up:
                    raise
                log.warning("recording what MDE answered failed on storage; trying again")
                await asyncio.sleep(PERSIST_RETRY_SECONDS)

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
        # A caller waiting gets one write in place, with its answer (the sweep settles it later).
        in_place = answer_for is not None
        done = await self._persisting(
            lambda: self.ledger.finish(chunk, result, status, error, in_place=in_place, answer_for=answer_for)
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

    # --- outcome unknown ---------------------------------------------------------------------------------

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


def plan_chunks(
    alert_ids: tuple[str, ...], fields: dict[str, str], limit: int, max_entries: int
) -> list[tuple[tuple[str, ...], dict[str, str]]]:
    """Chunks of at most `limit` ids, fewer and larger if the request would need more than `max_entries`
    (the attempt splits those by the limit before sending, keeping their place in the order)."""
    size = max(limit, math.ceil(len(alert_ids) / max_entries))
    return [(alert_ids[i : i + size], fields) for i in range(0, len(alert_ids), size)]
