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
import contextlib
import dataclasses
import enum
import logging
import math
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from shared.channels.base import TOKEN_UNAVAILABLE, CallKind, CallResult, UpstreamError, bearer
from shared.coalescing import MAX_MEMBERS, alert_ids_of, named_in
from shared.errors import StorageUnavailable
from shared.gathering import Gathering
from shared.ledger import Chunk, ChunkResult, PendingState
from shared.queues import visible_after
from shared.ratelimit import Denial, Grant

if TYPE_CHECKING:
    from shared.channels import Channel
    from shared.coalescing import PendingView
    from shared.ledger import Ledger
    from shared.queues import Queues
    from shared.ratelimit import RateLimiter
    from shared.settings import Settings
    from shared.telemetry import TenantTelemetry
    from shared.tokens import TokenProvider

log = logging.getLogger(__name__)

ORDER_WAIT_SECONDS = 1.0  # how soon a chunk waiting behind an earlier update of its alert looks again
# A call gathers waiting identical updates only for a slot at least this far ahead (see Sender._mark_call),
# trying this many times when other tries take some of the same members first.
COALESCE_LEAD_SECONDS = 0.1
MARK_ROUNDS = 3
# How long before its slot a call starts gathering and marking members (one read and a transaction of up
# to 100 rows: tens of milliseconds, more on a busy instance); at once if the slot is nearer.
COALESCE_MARK_LEAD_SECONDS = 0.5
# How far ahead of now a grant of now is traded for when identical updates wait for a call to carry them
# (Sender._lead_the_waiting): time to read and mark them (tens of milliseconds, more on a busy instance),
# not the full gathering lead: the budget is free, so every tenth of a second here is latency.
TRADE_LEAD_SECONDS = 0.2
# How long after the slot it waits for a chunk riding with another's call looks again (taken along: its
# message finds it gone; left out, a full call: it leads the next).
RIDE_SLACK_SECONDS = 0.2
# How long before its slot a gathering call takes in the identical updates that arrived since.
TOP_UP_LEAD_SECONDS = 0.25
# PATCH goes only if every piece's slot is strictly before batchUpdate's next one (on a tie, batchUpdate).
PATCH_TIE_SECONDS = 0.001
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
# How long a call whose members were marked after its slot waits for a fresh slot, members still marked
# (Sender._fresh_slot); a crash meanwhile leaves them Sending, resolved as any crash mid-call is.
FRESH_SLOT_WAIT_SECONDS = 0.5
# ... a slot this far ahead at least: a grant of now would be stale by the time its write came back.
FRESH_SLOT_LEAD_SECONDS = 0.1
FRESH_SLOT_TRIES = 3
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
    SPLIT = "split"  # replaced by smaller pieces, none of them tried yet
    PIECES = "pieces"  # replaced by one-alert pieces sent by PATCH: `parts` holds each one's try
    LOST = "lost"  # someone else changed the chunk first: they own it now


@dataclass
class Attempt:
    kind: AttemptKind
    chunk: Chunk
    delay: float = 0.0
    pieces: list[Chunk] = field(default_factory=list)
    parts: list[Attempt] = field(default_factory=list)
    # DEFERRED: when its call is expected, in seconds from now, if later than `delay` (a chunk waiting
    # for budget comes back from the queue before its slot, to reserve it): what Retry-After says.
    expected_in: float | None = None
    # DEFERRED without a write: the chunk's live message is sent again as it is (a chunk riding with
    # another's call must not change its entry, or that call's conditional mark of it would fail).
    keep_message: bool = False
    # ... and with no message at all: a chunk just accepted rides a call of this process, whose try
    # queues it if it leaves it out (Gathering.close); the sweep is the net if this process dies.
    handed_over: bool = False


@dataclass(frozen=True)
class PatchGrants:
    """Grants of the PATCH channel for every alert of a chunk, each before batchUpdate's next slot."""

    grants: list[Grant]


Held = Grant | PatchGrants | Denial | None
"""The budget the synchronous path asked for beside accepting (Sender.budget_now)."""


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
    held: Held
    answer_for: AnswerHook | None
    lead: float
    order_checked: bool  # accepted marked Sending: the order was checked before accepting
    queued: bool = True  # the chunk has a queue message (else, riding, it goes without: `ride_along`)
    may_ride: bool = True  # False: it leads (riders a call left out go on behind one of them: `_drive`)
    rejected: str | None = None  # the token MDE answered 401 to
    first: bool = True  # the first budget request (it may check the order and wait)
    stale: int = 0  # grants given up for age so far
    view: PendingView | None = None  # the pending entries as read for the order check
    # when the try began (monotonic): it may share reads of the pending entries started since
    started: float = field(default_factory=time.monotonic)

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
        *,
        patch: Channel | None = None,
        telemetry: TenantTelemetry | None = None,
    ) -> None:
        self.settings = settings
        self.telemetry = telemetry  # every call's outcome is counted (docs/telemetry.md)
        self.ledger = ledger
        self.channel = channel
        self.patch = patch  # the single-alert channel (docs/contracts.md §7), None when it is off
        self.tokens = tokens
        self.queues = queues
        self._clock = clock
        self._trying: dict[str, int] = {}  # chunks tries in this process hold, and how many (`holding`)
        self._gather_seconds = 0.0  # how long gathering a call's members took here lately (`trade_lead`)
        self.gathering = Gathering()  # the calls this process gathers, and what rides them
        self._drivers: set[asyncio.Task[None]] = set()  # tries for riders a call left out (`_drive`)

    @property
    def limiter(self) -> RateLimiter:
        return self.channel.limiter

    async def attempt(
        self,
        chunk: Chunk,
        max_wait: float,
        *,
        held: Held = None,
        answer_for: AnswerHook | None = None,
        lead: float = 0.0,
        queued: bool = True,
        may_ride: bool = True,
    ) -> Attempt:
        """One try at sending `chunk` (plus the single fresh-token retry after a 401).

        The synchronous path hands in a chunk that was accepted already marked Sending (its per-alert
        order checked before accepting: Ledger.look_ahead) and `held`, the budget it asked for side by
        side with accepting; a usable grant is then sent at once, otherwise the mark is given back before
        any wait, so a crash while waiting never leaves a false "outcome unknown". If the chunk ends in
        this try, its end is recorded with one write in place (Ledger.finish) holding `answer_for`'s
        answer, the caller's idempotent replay. A `lead` asks for grants at least that far ahead, time
        to mark the chunk Sending before its slot (the queue worker, where no caller waits, uses it; a
        retry after a grant went stale does too). `queued`: the chunk has a queue message (the worker's);
        one just accepted (the synchronous path's) has none, and rides without one.
        """
        if held is None and may_ride:
            riding = self.ride_along(chunk, queued)
            if riding is not None:
                return riding
        ended: Attempt | None = None
        with self.holding(chunk.chunk_id):
            try:
                ended = await self._attempt(chunk, max_wait, held, answer_for, lead, queued, may_ride)
                return ended
            finally:
                self.gathering.ended(chunk)
                await self._close_call(chunk, ended is not None and ended.kind is AttemptKind.FINISHED)

    async def _close_call(self, lead: Chunk, finished: bool = False) -> None:
        """`lead`'s call takes no more riders. The riders without a message that it left out (accepted
        after its last read of the backlog, or over its size) go on: after a call that ended its lead,
        with the next call of their update here (`_drive`), which takes riders from now on, so that a
        request accepted before its try has read anything rides it instead of leading a call of its
        own (in a burst, each round had two leaders that way); otherwise (no call was made: the budget
        was denied, or the lead changed hands) each is queued now with the token it was accepted with,
        so its entry stays as it is. One that cannot be queued, or whose process dies, is the sweep's
        (its entry is due since it was accepted)."""
        left_out = self.gathering.adopt(self.gathering.close(lead), self._clock())
        if not left_out:  # they ride another call here (the one the lead itself rides, say)
            return
        if finished:
            log.info(
                "call of chunk %s: %d riders left out go with the next call", lead.chunk_id, len(left_out)
            )
            driver, others = left_out[0], left_out[1:]
            self.gathering.expect(driver, others)
            await self._open_early(driver)
            task = asyncio.get_running_loop().create_task(self._drive(driver))
            self._drivers.add(task)
            task.add_done_callback(self._drivers.discard)
            return
        log.info("call of chunk %s: %d riders left out, queued", lead.chunk_id, len(left_out))
        await self._queue_riders(left_out)

    async def _open_early(self, driver: Chunk) -> None:
        """The driver's call takes riders at once: what is accepted before its try reserves a slot rides
        it instead of leading a call of its own (a read of the backlog, budget asked for). If the batch
        limit cannot be read now, the call opens when the driver's try leads, as any other."""
        try:
            limit = await self.channel.max_alerts()
        except Exception:
            log.warning("chunk %s: batch limit unreadable; its call opens when it leads", driver.chunk_id)
            return
        self._open_call(driver, self._clock() + self.trade_lead, limit)

    async def _queue_riders(self, riders: Sequence[Chunk]) -> None:
        async def queue(rider: Chunk) -> None:
            try:
                await self.queues.send_chunk(rider.chunk_id, rider.msg_token, 0.0)
            except Exception:
                log.warning("chunk %s, left out of a call it rode, could not be queued", rider.chunk_id)

        await asyncio.gather(*(queue(rider) for rider in riders))

    async def _drive(self, driver: Chunk) -> None:
        """Riders a finished call left out, still without messages: the oldest leads the next call (a
        full try, as the worker makes it: it reads the order and the backlog, and rides no call here)
        and takes the others along. Its try hands back what it leaves out in turn, queued if it made no
        call: every round either makes a call or queues them. A try that breaks off (an error, or this
        process stopping: `stop_drivers`) queues the driver itself too. It asks for a slot
        `trade_lead` ahead, time to gather, which `_lead_the_waiting` then keeps."""
        try:
            attempt = await self.attempt(
                driver, max_wait=self.worker_wait, lead=self.trade_lead, queued=False, may_ride=False
            )
        except BaseException as exc:
            await self._queue_riders([driver])
            if not isinstance(exc, Exception):
                raise
            log.warning(
                "chunk %s: the try for riders left out failed; queued", driver.chunk_id, exc_info=True
            )
            return
        try:
            await self.follow_up(attempt)
        except Exception:
            log.warning("chunk %s: could not be queued after its try; the sweep will", driver.chunk_id)

    async def stop_drivers(self, grace: float) -> None:
        """Let the tries for left-out riders (`_drive`) end, at most `grace` seconds, then cancel the
        rest: each cancelled try queues its driver and the riders it held, so a clean stop leaves every
        one of them a message (a crash leaves them to the sweep)."""
        for _ in range(10):  # a try that ends may start the next one
            if not self._drivers:
                return
            _, pending = await asyncio.wait(set(self._drivers), timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    @contextlib.contextmanager
    def holding(self, chunk_id: str) -> Iterator[None]:
        """While a try in this process holds the chunk (from the worker's read of it to the try's end), a
        chunk whose call it would carry rides with it (`_riding`) instead of leading a call of its own."""
        self._trying[chunk_id] = self._trying.get(chunk_id, 0) + 1
        try:
            yield
        finally:
            self._trying[chunk_id] -= 1
            if not self._trying[chunk_id]:
                del self._trying[chunk_id]

    def holds(self, chunk_id: str) -> bool:
        return chunk_id in self._trying

    def _open_call(self, lead: Chunk, slot: float, limit: int) -> None:
        """`lead` leads a call that gathers identical updates, expected at `slot`: until its try ends, an
        identical chunk accepted in this process rides it without a try of its own (`ride_along`)."""
        self.gathering.open(lead, slot, limit, self._clock())

    def sending_here(self, chunk: Chunk) -> bool:
        """Is `chunk` marked Sending in a call a try of this process leads? That try records its outcome
        (or, if this process dies, the sweep resolves the mark), so its queue message can go."""
        return chunk.state == PendingState.SENDING and self.gathering.sending_here(chunk.call_id)

    def _ride_along(self, state: _Try) -> Attempt | None:
        return self.ride_along(state.chunk, state.queued) if state.may_ride else None

    def ride_along(self, chunk: Chunk, queued: bool = True) -> Attempt | None:
        """A chunk just accepted (or back from the queue) whose update a call of this process is gathering
        rides that call without a try of its own: no read of the pending entries, no budget
        (shared.gathering). Back from the queue (`queued`), its message is sent again as it is, due just
        after the call's slot, so a chunk the call leaves out comes back then; just accepted, it has no
        message and the call's try takes on what it leaves out (`_close_call`). In a burst of identical
        updates this leaves one try with reads per call instead of one per request (bench.throughput,
        workload a). None: try it."""
        if chunk.solo or chunk.state != PendingState.PENDING or chunk.not_before > self._clock():
            return None
        if not chunk.msg_token:
            return None  # its message could not be sent as it is
        call = self.gathering.ride(chunk, self._clock(), queued)
        if call is None:
            return None
        wait = max(0.0, call.slot - self._clock())
        log.info("chunk %s rides with chunk %s's call, gathering here", chunk.chunk_id, call.lead)
        return Attempt(
            AttemptKind.DEFERRED,
            chunk,
            wait + RIDE_SLACK_SECONDS,
            expected_in=wait,
            keep_message=True,
            handed_over=not queued,
        )

    async def _attempt(
        self,
        chunk: Chunk,
        max_wait: float,
        held: Held,
        answer_for: AnswerHook | None,
        lead: float,
        queued: bool = True,
        may_ride: bool = True,
    ) -> Attempt:
        ended = await self._not_yet(chunk)
        if ended is not None:
            return ended
        state = _Try(
            chunk,
            max_wait,
            held,
            answer_for,
            lead,
            order_checked=chunk.state == PendingState.SENDING,
            queued=queued,
            may_ride=may_ride,
        )
        while True:
            token = await bearer(self.tokens, fresh=state.chunk.fresh_token, rejected=state.rejected)
            if isinstance(state.held, PatchGrants):
                by_patch = await self._held_patch(state, state.held, token)
                if by_patch is not None:
                    return by_patch
            grant = state.usable_held()
            if isinstance(token, CallResult) or grant is None:
                ended = await self._give_mark_back(state)
                if ended is not None:
                    return ended
            if isinstance(token, CallResult):
                return await self._retry_later(state.chunk, token, answer_for)
            granted = grant or await self._budget(state)
            if isinstance(granted, PatchGrants):
                return await self._send_by_patch(state, granted, token)
            if not isinstance(granted, Grant):
                return granted
            members = await self._mark(state, granted)
            if isinstance(members, Attempt):
                return members
            members = await self._top_up(members, granted)
            blocked = await self._await_slot(members, granted)
            if blocked is not None:
                return blocked
            if self._clock() - granted.at > self.max_grant_age:
                fresh = await self._fresh_slot(granted)
                if fresh is None:
                    gone_stale = await self._grant_went_stale(members, None)
                    if gone_stale.kind is AttemptKind.DEFERRED and state.retry_after_stale_grant(
                        gone_stale.chunk
                    ):
                        continue
                    return gone_stale
                granted = fresh
            sending = members[0]
            result = await self.channel.send(alert_ids_of(members), sending.fields, token)
            self._observe(self.channel, result, len(members))
            if result.kind is CallKind.UNAUTHORIZED and not sending.fresh_token:
                lost = await self._fresh_token_next(state, members, token)
                if lost is not None:
                    return lost
                continue
            return await self._record_call(members, result, answer_for)

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

    async def _held_patch(self, state: _Try, held: PatchGrants, token: str | CallResult) -> Attempt | None:
        """A one-alert chunk accepted marked Sending with a PATCH grant asked for beside accepting
        (`budget_now`): its call goes at once, as a PATCH piece of its own. Without a token the grant
        goes back and the try goes on the ordinary way (None)."""
        assert self.patch is not None
        state.held = None
        if isinstance(token, CallResult) or not (state.first and state.order_checked):
            await self._release_all(held.grants, self.patch)
            return None
        state.first = False
        piece = dataclasses.replace(state.chunk, channel=self.patch.name, call_id=uuid.uuid4().hex)
        return await self._patch_one(piece, held.grants[0], token, state.answer_for)

    async def _give_mark_back(self, state: _Try) -> Attempt | None:
        """No call is about to start (no token, or no grant in hand): a Sending mark goes back first."""
        unmarked = await self._unmark(state.chunk)
        if unmarked is None:
            return Attempt(AttemptKind.LOST, state.chunk)
        state.chunk = unmarked
        return None

    async def _budget(self, state: _Try) -> Grant | PatchGrants | Attempt:
        """A grant (of batchUpdate, or PATCH grants for each alert), or the Attempt that defers the chunk:
        behind an earlier update of one of its alerts, or denied budget. The first round checks the
        order (unless done before accepting) and may wait; after a fresh token the call goes now by
        batchUpdate or not at all."""
        if state.first:
            grant = await self._ordered_grant(state)
        else:
            grant = await self.limiter.reserve(0.0, lead=state.lead)
        state.first = False
        if grant is None:
            return Attempt(AttemptKind.DEFERRED, state.chunk, ORDER_WAIT_SECONDS)
        if isinstance(grant, Attempt):
            return grant
        if isinstance(grant, Denial):
            wait = grant.wait_seconds
            return Attempt(AttemptKind.DEFERRED, state.chunk, self.requeue_delay(wait), expected_in=wait)
        return grant

    async def _mark(self, state: _Try, grant: Grant) -> list[Chunk] | Attempt:
        """The call's members marked Sending before its slot: the chunk (already marked if accepted so)
        and the chunks that ride its call (shared.coalescing); LOST if someone else changed the chunk
        meanwhile, and then the grant goes back: no call was made."""
        state.first = False
        if state.chunk.state == PendingState.SENDING:
            return [state.chunk]
        members = await self._mark_call(state, grant)
        if members is None:
            await self._release(grant)
            return Attempt(AttemptKind.LOST, state.chunk)
        return members

    async def _mark_call(self, state: _Try, grant: Grant) -> list[Chunk] | None:
        """Mark the chunk and the chunks that ride its call Sending in one conditional transaction,
        MARK_LEAD_SECONDS before the slot (see `_mark_sending`). None if the chunk itself changed.

        Coalescing takes only what is waiting already (a call is never delayed to gather members), and
        only for a slot reserved ahead (COALESCE_LEAD_SECONDS or more), starting
        COALESCE_MARK_LEAD_SECONDS before it: a grant of now means budget is
        free and every waiting chunk's own try gets a call, and reading and marking members would age
        the grant past its use. Other tries may be gathering the same members for their own slots; when
        one of them took a member first, the entries are read again and the rest gathered (the chunk
        itself taken: None), up to MARK_ROUNDS times, then the chunk goes alone.
        """
        chunk = state.chunk
        coalesce = not chunk.solo and grant.at - self._clock() >= COALESCE_LEAD_SECONDS
        if coalesce:
            self._open_call(chunk, grant.at, await self.channel.max_alerts())
        early = grant.at - (COALESCE_MARK_LEAD_SECONDS if coalesce else MARK_LEAD_SECONDS) - self._clock()
        if early > 0:
            await asyncio.sleep(early)
        call_id = uuid.uuid4().hex
        sending = self._sending(self.channel, call_id)

        view: PendingView | None = None
        began = time.monotonic()
        for _ in range(MARK_ROUNDS if coalesce else 0):
            view = view or await self.ledger.pending_view()
            mine = next((e for e in view.entries if e.chunk_id == chunk.chunk_id), None)
            if mine is None or mine.etag != chunk.etag:
                return None  # taken into another's call, or changed otherwise: theirs now
            others = view.members_for(chunk, await self.channel.max_alerts())
            if not others:
                break
            marked = await self.ledger.update_together([chunk, *others], sending)
            self._gather_seconds = 0.5 * self._gather_seconds + 0.5 * (time.monotonic() - began)
            if marked is not None:
                self.gathering.taken(chunk.chunk_id, marked)
                log.info("chunk %s carries %d other chunks in call %s", chunk.chunk_id, len(others), call_id)
                return marked
            view = None  # someone changed one of them first: read again
        else:
            if coalesce:
                log.info(
                    "chunk %s goes alone: its members changed under %d tries", chunk.chunk_id, MARK_ROUNDS
                )
        return await self.ledger.update_together([chunk], sending)

    async def _top_up(self, members: list[Chunk], grant: Grant) -> list[Chunk]:
        """Shortly before the slot (TOP_UP_LEAD_SECONDS), the identical updates that arrived since the
        members were gathered join the call too: one more read and conditional transaction, made only
        for a call that had time to gather (`_mark_call`). If it fails, the call goes with the members
        it has. A burst keeps arriving while a call waits for its slot."""
        lead = members[0]
        if lead.solo or lead.channel != self.channel.name or len(members) >= MAX_MEMBERS:
            return members
        wait = grant.at - TOP_UP_LEAD_SECONDS - self._clock()
        if wait <= 0 or grant.at - lead.sending_since < COALESCE_LEAD_SECONDS:
            return members  # no time left, or a call that was not gathering (a grant of now)
        await asyncio.sleep(wait)
        room = await self.channel.max_alerts() - len(alert_ids_of(members)) + len(lead.alert_ids)
        view = await self.ledger.pending_view()
        extra = view.members_for(lead, room, MAX_MEMBERS - len(members) + 1)
        if not extra:
            return members
        joined = await self.ledger.update_together(extra, self._sending(self.channel, lead.call_id))
        if joined is None:
            return members
        self.gathering.taken(lead.chunk_id, joined)
        log.info("call %s: %d more chunks joined before its slot", lead.call_id, len(joined))
        return [*members, *joined]

    def _sending(self, channel: Channel, call_id: str | None) -> Callable[[Chunk], dict[str, Any]]:
        """The change that marks a chunk Sending in a call of `channel`: `call_id`, or (PATCH, one alert
        a call) an id of its own for each chunk. The attempt is counted before the call."""

        def change(chunk: Chunk) -> dict[str, Any]:
            return {
                "state": PendingState.SENDING,
                "sending_since": self._clock(),
                "attempts": chunk.attempts + 1,
                "channel": channel.name,
                "call_id": call_id or uuid.uuid4().hex,
            }

        return change

    async def _await_slot(self, members: list[Chunk], grant: Grant) -> Attempt | None:
        """Wait for the grant's slot; None when it came. A 429 block that came up meanwhile defers the
        call's members (their marks given back: no call was made)."""
        slot = await self.limiter.wait_for(grant)
        if isinstance(slot, Denial):
            delay = self.requeue_delay(slot.wait_seconds)
            unmarked = await self._give_back(members, delay)
            if unmarked is None:
                return Attempt(AttemptKind.LOST, members[0])
            return Attempt(AttemptKind.DEFERRED, unmarked, delay, expected_in=slot.wait_seconds)
        return None

    async def _fresh_token_next(self, state: _Try, members: list[Chunk], token: str) -> Attempt | None:
        """MDE answered 401: once more, now, with a token fetched fresh (the 401 spent no MDE work). The
        chunk tries alone; the others of its call go back to wait for their own turn."""
        sending = members[0]
        log.warning(
            "chunk %s: MDE answered 401; retrying once with a freshly fetched token", sending.chunk_id
        )
        await self._persisting(
            lambda: self._give_back(members[1:], 0.0, sent=True, queue_first=True, fresh_token=True)
        )
        retry = await self.ledger.update_pending(
            sending, state=PendingState.PENDING, fresh_token=True, sending_since=0.0
        )
        if retry is None:
            return Attempt(AttemptKind.LOST, sending)
        state.chunk, state.max_wait, state.rejected = retry, 0.0, token
        return None

    async def _give_back(
        self,
        members: list[Chunk],
        delay: float,
        *,
        sent: bool = False,
        queue_first: bool = False,
        **changes: Any,
    ) -> Chunk | None:
        """Members of a call that is not going to be made go back to Pending, the attempt not counted;
        members of a call that was made (`sent`) but whose answer was no verdict on them go back with the
        attempt counted (MDE got it). All but the first are queued again after `delay` (their own
        messages would wait for the Sending mark's lease), the first too with `queue_first`. Returns the
        first as it is now, None if someone else changed it."""
        if not members:
            return None

        def pending(c: Chunk) -> dict[str, Any]:
            return {
                "state": PendingState.PENDING,
                "sending_since": 0.0,
                "attempts": c.attempts if sent else max(0, c.attempts - 1),
                **changes,
            }

        back: list[Chunk | None] = []
        together = await self.ledger.update_together(members, pending) if len(members) > 1 else None
        if together is not None:
            back = list(together)
        else:
            back = [await self.ledger.update_pending(c, **pending(c)) for c in members]
        for other in back if queue_first else back[1:]:
            if other is not None:
                await self.schedule(other, delay)
        return back[0]

    @property
    def patch_exchange_rate(self) -> float:
        """How many PATCH calls one batchUpdate call is worth over the long run: the ratio of the two
        channels' sustained rates (calls per second of each one's longest window; MDE's 1500 an hour
        against 500 an hour: 3).

        In a backlog it is the long windows that bind, so a chunk of k alerts goes by PATCH only if its
        k calls take a smaller share of PATCH's sustained budget than one call takes of batchUpdate's:
        k below this rate (k equal to it is a tie: batchUpdate). A Sentinel storm of 1- to 3-alert
        incidents then sends the small ones by PATCH and leaves batchUpdate to the large ones, instead
        of spending PATCH's hour on whatever came first (docs/contracts.md §7).
        """
        if self.patch is None:
            return 0.0
        longest_patch = max(self.patch.limiter.windows, key=lambda w: w.seconds)
        longest_batch = max(self.limiter.windows, key=lambda w: w.seconds)
        return (longest_patch.calls / longest_patch.seconds) / (longest_batch.calls / longest_batch.seconds)

    @property
    def worker_wait(self) -> float:
        """How far ahead the queue worker reserves budget and waits for it (see WORKER_BUDGET_WAIT_SECONDS)."""
        return min(WORKER_BUDGET_WAIT_SECONDS, self.settings.sweep_grace_seconds / 2)

    def requeue_delay(self, budget_wait: float) -> float:
        """How long a chunk denied budget stays in the queue: it comes back half the worker's in-process
        wait before the budget should free up, early enough to reserve its slot then (the wait is a lower
        bound, so coming back late would only leave the budget idle)."""
        return max(0.0, budget_wait - self.worker_wait / 2)

    def budget_free_as_seen(self) -> bool:
        """Was batchUpdate's budget free when this process last saw it (no I/O)? Only a hint for
        whether the synchronous path's fast start is worth its reads: the budget request decides."""
        return self.limiter.expected_wait() <= 0

    async def budget_now(self, alert_count: int = 0) -> Held:
        """A non-waiting budget request that the synchronous path makes side by side with accepting.

        Only once a token is at hand (normally from the cache, no I/O): a grant must reach MDE within half
        the safety margin, and a token fetch could take longer. A one-alert request whose update nothing
        pending shares (`alert_count` 1: the caller checked) asks PATCH first (`prefers_patch`), unless
        this process last saw PATCH's budget spent, and batchUpdate if PATCH has no room now. None when there is no token or the limiter failed:
        the ordinary path then asks again.
        """
        if isinstance(await bearer(self.tokens), CallResult):
            return None
        try:
            patch = self.patch
            if (
                alert_count == 1
                and patch is not None
                and self.prefers_patch(1)
                and patch.limiter.expected_wait() <= 0
            ):
                grants = await patch.limiter.reserve_many(1, 0.0)
                if not isinstance(grants, Denial):
                    return PatchGrants(grants)
            return await self.limiter.acquire(0.0)
        except Exception:
            log.warning("budget request alongside accepting failed; asking again after", exc_info=True)
            return None

    def prefers_patch(self, alert_count: int) -> bool:
        """Does a chunk of this many alerts go by PATCH when both channels could take it now? When PATCH is
        on and the chunk is below the exchange rate (`patch_exchange_rate`) and within PATCH_MAX_ALERTS:
        then its PATCH calls cost less of the long windows than one batchUpdate call, which stays free
        for the chunks PATCH cannot take cheaply (docs/contracts.md §7, "Choices"). The caller checks
        that no identical update is pending (batchUpdate would carry those together)."""
        return (
            self.patch is not None
            and alert_count <= self.settings.patch_max_alerts
            and alert_count < self.patch_exchange_rate
        )

    async def _release(self, grant: Grant, channel: Channel | None = None) -> None:
        """Give back a grant whose call was not made; if that fails, the budget is only spent unused."""
        try:
            await (channel or self.channel).limiter.release(grant)
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

    async def _ordered_grant(self, state: _Try) -> Grant | PatchGrants | Denial | Attempt | None:
        """A grant for the chunk, or None while an earlier pending update touches one of its alerts.

        The order check (one read of the pending entries, kept for coalescing) and a first, non-waiting
        budget request (or the one the caller held) run side by side: one round trip instead of two on
        the synchronous path. When the chunk turns out to be blocked, a grant it got is given back
        (RateLimiter.release). When batchUpdate has no budget now, a chunk that an older identical
        update's call will carry waits for that call instead of reserving a slot of its own (`_riding`);
        the PATCH channel may take the chunk (`_patch_grants`); otherwise a batchUpdate slot is reserved
        within the wait allowed.
        """
        chunk, lead = state.chunk, state.lead

        async def first_budget() -> Grant | Denial:
            held = state.held
            if isinstance(held, Grant | Denial):
                return held
            return await self.limiter.reserve(0.0, lead=lead)

        if not state.order_checked:
            # Order and carrier first, budget only if the chunk leads: in a burst most tries ride, and a
            # grant asked for beside the read would mostly go back (two writes to the shared budget row
            # for nothing each; reading both side by side was tried, and it stalled the first calls of
            # bench.throughput's workload a for seconds).
            view = await self.ledger.view_ahead_of(chunk, state.started)
            state.view, blocker = view, view.blocker(chunk)
            if blocker is not None:
                log.info("chunk %s waits behind chunk %s", chunk.chunk_id, blocker.chunk_id)
                return None
            riding = await self._riding(state, self.limiter.expected_wait())
            if riding is not None:
                if isinstance(state.held, Grant):
                    await self._release(state.held)  # asked for beside accepting: the carrier's call is its
                return riding
        grant = await first_budget()
        if isinstance(grant, Grant):
            patch_now = await self._patch_first(state, grant)
            if patch_now is not None:
                return patch_now
            return await self._lead_the_waiting(state, grant)
        riding = await self._riding(state, grant.wait_seconds)
        if riding is not None:
            return riding
        by_patch = await self._patch_grants(state, grant.wait_seconds)
        if isinstance(by_patch, PatchGrants):
            return by_patch
        if state.max_wait > 0:
            grant = await self.limiter.reserve(state.max_wait, lead=lead)
        if isinstance(grant, Denial) and by_patch is not None:
            return Denial(min(grant.wait_seconds, by_patch.wait_seconds))
        return grant

    async def _patch_first(self, state: _Try, grant: Grant) -> PatchGrants | None:
        """Both channels could take the chunk now: a small one with an update nothing pending shares goes
        by PATCH if each of its alerts gets a PATCH slot now (`prefers_patch`), and the batchUpdate
        grant goes back. None: batchUpdate it is."""
        chunk = state.chunk
        if self.patch is None or chunk.solo or state.held is not None:
            return None
        if not self.prefers_patch(len(chunk.alert_ids)) or self.gathering.has_riders(chunk):
            return None
        if await self.ledger.identical_unfinished(chunk, state.started):
            return None
        grants = await self.patch.limiter.reserve_many(len(chunk.alert_ids), 0.0, lead=state.lead)
        if isinstance(grants, Denial):
            return None
        await self._release(grant)
        await self._close_call(chunk)  # a PATCH call carries no one
        return PatchGrants(grants)

    async def _lead_the_waiting(self, state: _Try, grant: Grant) -> Grant | Denial | Attempt:
        """A grant of now while identical updates wait (the budget has just freed up, and they wait for a
        call to carry them). If an older one waits, it leads: this chunk gives the grant back and rides
        with it (`_riding`). If only younger ones wait, this chunk's call carries them: a grant of now
        leaves no time to gather them, so it is traded for a slot TRADE_LEAD_SECONDS ahead (the
        first that fits, within the wait allowed from there); a grant at least half that far ahead
        (a driver's, which asks that far ahead) is kept: a release and a reservation fewer. Budget
        is seldom free while many wait, so the extra read of the later entries is seldom made."""
        view = state.view
        if view is None or state.chunk.solo or state.held is not None:
            return grant
        if view.carried_by(state.chunk, await self.channel.max_alerts()) is not None:
            await self._release(grant)
            riding = await self._riding(state, 0.0)
            return riding or await self.limiter.reserve(state.max_wait, lead=max(state.lead, self.trade_lead))
        # riders here wait for this chunk's call: it gathers them, even with the budget free now
        if not self.gathering.has_riders(state.chunk) and not await self.ledger.identical_waiting_after(
            state.chunk, state.started
        ):
            if self._clock() - grant.at <= self.max_grant_age / 2:
                return grant
            # the read took long enough to age the grant: a slot with time to mark the chunk instead
            await self._release(grant)
            return await self.limiter.reserve(state.max_wait, lead=max(state.lead, MARK_LEAD_SECONDS))
        limit = await self.channel.max_alerts()
        # A grant far enough ahead to gather them is kept (a driver's try asks that far ahead, `_drive`).
        keep = grant.at - self._clock() >= self.trade_lead / 2
        if not keep:
            await self._release(grant)
        along = self._ride_along(state)  # another try here began to lead meanwhile: ride with it
        if along is not None:
            if keep:
                await self._release(grant)
            return along
        if keep:
            self._open_call(state.chunk, grant.at, limit)
            return grant
        self._open_call(state.chunk, self._clock() + self.trade_lead, limit)
        return await self.limiter.reserve(state.max_wait, lead=max(state.lead, self.trade_lead))

    async def _riding(self, state: _Try, batch_wait: float) -> Attempt | None:
        """A chunk whose update an older waiting chunk's call will carry (shared.coalescing: the oldest
        leads) reserves no slot of its own: a slot per waiting chunk would be spent, or wasted, by each
        chunk the first call takes along. It looks again once that call's slot should have come; if the
        call did not take it (full), it leads the next. Only while that call is coming: a call this
        process is gathering (`ride_along`), or a carrier whose queue message is due within the wait
        (its try will lead). A carrier a try of this process holds without gathering a call goes
        alone or by PATCH, and one whose message is not due soon leaves nothing driving its call: then
        this chunk leads, and its call takes the older ones along (`PendingView.members_for`). None: it
        leads (a call of this process gathering its update from now on, `_open_call`)."""
        if state.chunk.solo:
            return None
        along = self._ride_along(state)
        if along is not None:
            return along
        if state.view is None:
            state.view = await self.ledger.view_ahead_of(state.chunk, state.started)
        limit = await self.channel.max_alerts()
        along = self._ride_along(state)  # again: another try may have opened one meanwhile
        if along is not None:
            return along
        due_by = self._clock() + batch_wait + RIDE_SLACK_SECONDS
        carrier = state.view.carried_by(state.chunk, limit)
        if carrier is None or carrier.msg_due_at > due_by or self.holds(carrier.chunk_id):
            self._open_call(state.chunk, self._clock() + max(batch_wait, self.trade_lead), limit)
            return None
        delay = batch_wait + RIDE_SLACK_SECONDS
        log.info("chunk %s rides with chunk %s's call", state.chunk.chunk_id, carrier.chunk_id)
        return Attempt(AttemptKind.DEFERRED, state.chunk, delay, expected_in=batch_wait, keep_message=True)

    @property
    def trade_lead(self) -> float:
        """How far ahead a call that gathers members reserves its slot: TRADE_LEAD_SECONDS, or what
        gathering took here lately (a moving average) if that is more (a read of the backlog and a
        transaction of up to a hundred rows take far longer on a busy instance, and a call marked
        after its slot must find another)."""
        return max(TRADE_LEAD_SECONDS, self._gather_seconds)

    async def _patch_grants(self, state: _Try, batch_wait: float) -> PatchGrants | Denial | None:
        """PATCH grants for each of the chunk's alerts, if it should go that way (docs/contracts.md §7):
        the channel is on, the chunk has at most PATCH_MAX_ALERTS alerts, it would not ride a batchUpdate
        call with other chunks (an identical update waits: that call carries it for nothing), and every
        piece gets a PATCH slot strictly before batchUpdate's next one (on a tie, batchUpdate) and within
        the wait allowed. A Denial says when PATCH budget would come; None: not a PATCH chunk."""
        chunk = state.chunk
        if self.patch is None or not self.prefers_patch(len(chunk.alert_ids)):
            return None  # cheaper, over the long run, as one batchUpdate call (see patch_exchange_rate)
        if state.view is None:
            state.view = await self.ledger.view_ahead_of(chunk, state.started)
        if (
            self.gathering.has_riders(chunk)
            or state.view.has_peer(chunk)
            or await self.ledger.identical_waiting_after(chunk, state.started)
        ):
            return None  # it leads (or rides) a batchUpdate call that carries others for nothing
        within = min(state.max_wait, batch_wait - PATCH_TIE_SECONDS)
        if within < 0:
            return None
        grants = await self.patch.limiter.reserve_many(len(chunk.alert_ids), within, lead=state.lead)
        if isinstance(grants, Denial):
            return grants
        await self._close_call(chunk)  # a PATCH call carries no one
        return PatchGrants(grants)

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

    async def _fresh_slot(self, grant: Grant, channel: Channel | None = None) -> Grant | None:
        """The call's members were marked after its slot had passed (marking a hundred of them, or
        splitting a chunk into PATCH pieces, on a busy instance can take longer than the lead it was
        given): the stale grant (of `channel`, batchUpdate by default) is moved to a slot
        FRESH_SLOT_LEAD_SECONDS ahead, within FRESH_SLOT_WAIT_SECONDS, in one write
        (RateLimiter.move), and the call keeps its marks, up to FRESH_SLOT_TRIES times (a busy event
        loop can wake late for the slot too). Giving the members back instead costs a transaction and
        a message each, which on a busy instance made the next call late as well (bench.throughput,
        workload a). A grant that is still fresh, or None (the grant given back)."""
        log.info("call: grant too old when its call would start; moving it to a fresh slot")
        limiter = (channel or self.channel).limiter
        stale: Grant = grant
        for _ in range(FRESH_SLOT_TRIES):
            try:
                moved = await limiter.move(stale, FRESH_SLOT_WAIT_SECONDS, lead=FRESH_SLOT_LEAD_SECONDS)
            except Exception:
                log.warning("a call whose grant went stale could not move it", exc_info=True)
                return None  # its budget stays spent: the stale grant is not known to be gone
            if isinstance(moved, Denial):
                break
            slot = await limiter.wait_for(moved)
            if not isinstance(slot, Grant):
                return None  # a 429 block came up: the moved slot goes unused (only budget wasted)
            if self._clock() - slot.at <= self.max_grant_age:
                return slot
            stale = slot
        await self._release(stale, channel)  # no call was made: the budget goes back
        return None

    async def _grant_went_stale(
        self, members: list[Chunk], grant: Grant | None, channel: Channel | None = None
    ) -> Attempt:
        sending = members[0]
        log.info("chunk %s: grant too old when its call would start; trying again", sending.chunk_id)
        pending = await self._give_back(members, STALE_GRANT_RETRY_SECONDS)
        if grant is not None:
            await self._release(grant, channel)  # no call was made: the budget goes back
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
        self,
        chunk: Chunk,
        result: CallResult,
        answer_for: AnswerHook | None = None,
        channel: Channel | None = None,
    ) -> Attempt:
        channel = channel or self.channel
        kind = result.kind
        error = result.error.as_dict() if result.error else None
        if kind is CallKind.OK:
            return await self._finish(chunk, ChunkResult.SUCCEEDED, 200, None, answer_for)
        size = await channel.learn_limit(result, len(chunk.alert_ids))
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
            await self._blocked(channel, result)
        return await self._retry_later(chunk, result, answer_for)

    async def _blocked(self, channel: Channel, result: CallResult) -> None:
        """MDE answered 429 although this channel's budget granted the call: block the channel (every
        instance) for its Retry-After. Whether MDE counts the two APIs apart is undocumented; a 429 the
        channel's own budget did not predict may mean it counts them together, so say so."""
        log.warning(
            "MDE answered 429 on the %s channel although its budget had room; if this repeats, MDE may "
            "count batchUpdate and PATCH calls together (docs/contracts.md §7): lower "
            "DEFENDER_RATE_LIMITS / DEFENDER_PATCH_RATE_LIMITS, or turn PATCH off",
            channel.name,
        )
        await channel.limiter.block(result.retry_after if result.retry_after is not None else 1.0)

    async def _record_call(
        self, members: list[Chunk], result: CallResult, answer_for: AnswerHook | None = None
    ) -> Attempt:
        """Record a batchUpdate call's answer for each of its members (docs/contracts.md §7); the first
        member's Attempt is returned, the others' next tries are queued here.

        - 200, 403 and a 400 that is a verdict on the update itself: every member ends alike (one
          transaction in place when they can, each on its own otherwise);
        - a 404, or a 400 naming alert ids, is no verdict on the others: members whose alerts MDE names
          end Failed with its answer, the others are sent again (apart, if MDE named none);
        - MaximumBatchSizeExceeded: the limit is learned and the members wait for calls re-formed;
        - 429, 5xx, not sent, no answer: each member by the rules of one chunk (back-off, outcome unknown).
        """
        if len(members) == 1:
            return await self._record(members[0], result, answer_for)
        kind, error = result.kind, (result.error.as_dict() if result.error else None)
        if kind is CallKind.OK:
            return await self._finish_all(members, ChunkResult.SUCCEEDED, 200, None, answer_for)
        if kind is CallKind.FORBIDDEN or kind is CallKind.UNAUTHORIZED:
            hinted = with_role_hint(result.error).as_dict()
            return await self._finish_all(members, ChunkResult.FAILED, 502, hinted, answer_for)
        if kind is CallKind.BATCH_TOO_LARGE:
            await self.channel.learn_limit(result, len(alert_ids_of(members)))
            return await self._members_again(members, solo=False)
        if kind is CallKind.PERMANENT:
            message = result.error.message if result.error else ""
            refused = named_in(message, members)
            status = result.error.http_status if result.error else None
            if status != 404 and not refused:
                return await self._finish_all(members, ChunkResult.FAILED, 422, error, answer_for)
            return await self._isolate(members, refused, error, answer_for)
        if result.error is not None and result.error.http_status == 429:
            await self._blocked(self.channel, result)
        parts = await asyncio.gather(
            *(self._record_member(m, result, answer_for if n == 0 else None) for n, m in enumerate(members))
        )
        for part in parts[1:]:
            await self.follow_up(part)
        return parts[0]

    async def _record_member(
        self, member: Chunk, result: CallResult, answer_for: AnswerHook | None
    ) -> Attempt:
        """One member of a coalesced call that got no verdict (429, 5xx, not sent, no answer), by the
        rules of one chunk; a 429 has blocked the channel once already."""
        if (
            result.kind is CallKind.OUTCOME_UNKNOWN
            and member.has_comment
            and not self.settings.resend_unknown_with_comment
        ):
            error = result.error.as_dict() if result.error else None
            return await self._finish(member, ChunkResult.OUTCOME_UNKNOWN, 504, error, answer_for)
        return await self._retry_later(member, result, answer_for)

    async def _finish_all(
        self,
        members: list[Chunk],
        result: ChunkResult,
        status: int,
        error: dict[str, Any] | None,
        answer_for: AnswerHook | None,
    ) -> Attempt:
        """One end for every member: one transaction in place (the sweep settles it), or, if one of them
        changed meanwhile (the sweep took a stale mark), each on its own."""
        done = await self._persisting(
            lambda: self.ledger.finish_together(members, result, status, error, answer_for=answer_for)
        )
        if done is not None:
            log.info("call %s: %d chunks %s", members[0].call_id, len(members), result)
            return Attempt(AttemptKind.FINISHED, done[0])
        ends = [
            await self._finish(m, result, status, error, answer_for if n == 0 else None)
            for n, m in enumerate(members)
        ]
        return ends[0]

    async def _members_again(self, members: list[Chunk], *, solo: bool) -> Attempt:
        """The call's answer was no verdict on its members: all go back to Pending (the attempt counted:
        MDE got the call) to go out again at once (`solo`: each in a call of its own)."""
        changes: dict[str, Any] = {"solo": True} if solo else {}
        # MDE's answer is known (it applied nothing): ride out storage faults rather than leave the marks
        # for the sweep, which could only call them unknown
        first = await self._persisting(lambda: self._give_back(members, 0.0, sent=True, **changes))
        if first is None:
            return Attempt(AttemptKind.LOST, members[0])
        return Attempt(AttemptKind.DEFERRED, first, 0.0)

    async def _isolate(
        self,
        members: list[Chunk],
        refused: list[Chunk],
        error: dict[str, Any] | None,
        answer_for: AnswerHook | None,
    ) -> Attempt:
        """A coalesced call MDE refused for some alert: the members whose alerts it names end Failed with
        its answer; the others go out again, apart from each other if it named none. (A refused call
        applied nothing: docs/contracts.md §7.)"""
        log.warning(
            "call %s of %d chunks refused (%s); %d named, the others go out again%s",
            members[0].call_id,
            len(members),
            (error or {}).get("code"),
            len(refused),
            " apart" if not refused else "",
        )
        lead, named = members[0], {m.chunk_id for m in refused}
        lead_attempt: Attempt | None = None
        for member in refused:
            ended = await self._finish(
                member, ChunkResult.FAILED, 422, error, answer_for if member is lead else None
            )
            if member is lead:
                lead_attempt = ended
        rest = [m for m in members if m.chunk_id not in named]
        if not rest:
            assert lead_attempt is not None
            return lead_attempt
        again = await self._members_again(rest, solo=not refused)
        if lead_attempt is None:  # the lead goes again: its try is the caller's to follow up
            return again
        await self.follow_up(again)
        return lead_attempt

    async def _send_by_patch(self, state: _Try, patch: PatchGrants, token: str) -> Attempt:
        """Send the chunk as one PATCH call per alert (docs/contracts.md §7): split into one-alert pieces
        that keep its place in the order, all marked Sending in one transaction before the first slot,
        then each call at its own slot, each with its own outcome."""
        assert self.patch is not None
        channel, chunk = self.patch, state.chunk
        split = len(chunk.alert_ids) > 1
        early = patch.grants[0].at - MARK_LEAD_SECONDS - self._clock()
        if early > 0:
            await asyncio.sleep(early)
        sending = self._sending(channel, None)
        if split:  # split and marked in one transaction: one write between the grants and the calls
            marked = await self.ledger.split(chunk, 1, mark=sending)
        else:
            marked = await self.ledger.update_together([chunk], sending)
        if marked is None:
            await self._release_all(patch.grants, channel)
            return Attempt(AttemptKind.LOST, chunk)
        answer = None if split else state.answer_for
        parts = list(
            await asyncio.gather(
                *(
                    self._patch_one(piece, grant, token, answer)
                    for piece, grant in zip(marked, patch.grants, strict=True)
                )
            )
        )
        if not split:
            return parts[0]
        return Attempt(AttemptKind.PIECES, chunk, pieces=[p.chunk for p in parts], parts=parts)

    async def _patch_one(
        self, piece: Chunk, grant: Grant, token: str, answer_for: AnswerHook | None
    ) -> Attempt:
        """One piece's PATCH call at its grant's slot, and its outcome. A 401 sends it back to try again
        with a token fetched fresh (by either channel)."""
        assert self.patch is not None
        slot = await self.patch.limiter.wait_for(grant)
        if isinstance(slot, Denial):
            delay = self.requeue_delay(slot.wait_seconds)
            back = await self._unmark(piece)
            if back is None:
                return Attempt(AttemptKind.LOST, piece)
            return Attempt(AttemptKind.DEFERRED, back, delay, expected_in=slot.wait_seconds)
        if self._clock() - grant.at > self.max_grant_age:
            fresh = await self._fresh_slot(grant, self.patch)
            if fresh is None:
                return await self._grant_went_stale([piece], None, self.patch)
            grant = fresh
        result = await self.patch.send(piece.alert_ids, piece.fields, token)
        self._observe(self.patch, result, 1)
        if result.kind is CallKind.UNAUTHORIZED and not piece.fresh_token:
            back = await self.ledger.update_pending(
                piece, state=PendingState.PENDING, fresh_token=True, sending_since=0.0
            )
            return (
                Attempt(AttemptKind.LOST, piece) if back is None else Attempt(AttemptKind.DEFERRED, back, 0.0)
            )
        return await self._record(piece, result, answer_for, self.patch)

    def _observe(self, channel: Channel, result: CallResult, members: int) -> None:
        if self.telemetry is not None:
            self.telemetry.call(channel.name, result, members)

    async def _release_all(self, grants: list[Grant], channel: Channel) -> None:
        for grant in grants:
            await self._release(grant, channel)

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

    async def schedule(self, chunk: Chunk, delay: float, expected_in: float | None = None) -> Chunk | None:
        """Make `chunk`'s next try a queue message due after `delay`, its call expected `expected_in`
        seconds from now (default: when the message is due); the chunk as stored then, or None if
        someone else owns it."""
        token, now = uuid.uuid4().hex, self._clock()
        expected = now + max(delay, expected_in if expected_in is not None else delay)
        owned = await self.ledger.update_pending(
            chunk, msg_token=token, msg_due_at=now + visible_after(delay), expected_at=expected
        )
        if owned is None:
            return None
        await self.queues.send_chunk(chunk.chunk_id, token, delay)
        return owned

    async def follow_up(self, attempt: Attempt) -> list[Chunk]:
        """After a try that did not finish the chunk, make sure its next try is queued. Returns the chunks
        as they are now (the pieces of a split chunk), for the answer a caller gets."""
        if attempt.kind is AttemptKind.DEFERRED and attempt.keep_message and attempt.chunk.msg_token:
            if not attempt.handed_over:
                await self.queues.send_chunk(attempt.chunk.chunk_id, attempt.chunk.msg_token, attempt.delay)
            expected = self._clock() + max(attempt.delay, attempt.expected_in or 0.0)
            return [dataclasses.replace(attempt.chunk, expected_at=expected)]  # for the answer only
        if attempt.kind is AttemptKind.DEFERRED:
            queued = await self.schedule(attempt.chunk, attempt.delay, attempt.expected_in)
            return [queued or attempt.chunk]
        if attempt.kind is AttemptKind.SPLIT:
            return [await self.schedule(piece, 0.0) or piece for piece in attempt.pieces]
        if attempt.kind is AttemptKind.PIECES:
            return [chunk for part in attempt.parts for chunk in await self.follow_up(part)]
        return [attempt.chunk]

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
