"""Taking a validated request in: idempotency, acceptance into the ledger, the synchronous try, the answer.

Used by every source (HTTP, the inbound queue, Sentinel), so keys, operations and answers behave the
same whichever way a request came. The answer is built once, stored with the key (or kept in the ledger:
a synchronous answer with its chunk's end, a rider's 202 with its operation), and replayed as is.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from shared.errors import AlreadyAccepted, StorageUnavailable
from shared.http import ApiResponse, json_response, problem
from shared.idempotency import ClaimOutcome, IdempotencyKey, KeyKind, KeyRecord, StoredResponse
from shared.ledger import (
    MAX_ENTRIES_PER_ACCEPT,
    AcceptPlan,
    Chunk,
    Operation,
    OrderView,
    new_operation_id,
)
from shared.operations import retry_after_seconds, status_of, summary, worst_error
from shared.outcomes import Accepted, InProgress, KeyReused, Replayed, SubmitOutcome
from shared.sender import RIDE_SLACK_SECONDS, AnswerHook, AttemptKind, Held, plan_chunks
from shared.storage import sending_after

if TYPE_CHECKING:
    from shared.idempotency import IdempotencyStore
    from shared.ledger import Ledger
    from shared.sender import Sender
    from shared.settings import Settings
    from shared.validation import BatchUpdate

log = logging.getLogger(__name__)

REPLAYED = {"Idempotent-Replayed": "true"}
ACCEPT_LEASE_SECONDS = 30.0
"""How long a claim whose operation does not exist yet is left to its holder. Taking it over sooner is
never unsafe (the operation id was fixed at the claim, and the ledger accepts an id at most once); it
only spares the holder a race. It covers the storage seam's retry deadline."""
T = TypeVar("T")


@dataclass(frozen=True)
class Submission:
    update: BatchUpdate
    source: str  # http | queue | sentinel
    caller: dict[str, Any]
    operations_url: str  # `.../api/operations/`, where the Location of an accepted request points
    location_query: str = ""  # `?code=...` when the caller authenticated with a function key in the URL
    explicit_key: str | None = None
    respond_async: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class Intake:
    def __init__(
        self,
        settings: Settings,
        keys: IdempotencyStore,
        ledger: Ledger,
        sender: Sender,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.keys = keys
        self.ledger = ledger
        self.sender = sender
        self._clock = clock

    def _key(self, sub: Submission) -> IdempotencyKey:
        if sub.explicit_key is not None:
            return self.keys.key(KeyKind.EXPLICIT, sub.explicit_key)
        return self.keys.key(KeyKind.DERIVED, sub.update.digest())

    async def submit(self, sub: Submission) -> SubmitOutcome:
        """Accept and try a request, or answer from its idempotency key. Never sends a request twice.

        A request that will be tried at once reads the per-alert order side by side with claiming its key
        (Ledger.look_ahead), so a new one-chunk request takes three Table round trips besides its call:
        claim ‖ order, accept ‖ budget, and its end recorded with its answer in one write. The key is
        then completed by the first replay, from the answer kept in the ledger (`_from_ledger`). When
        this process last saw the budget spent, that read and the budget request are not made: the
        request is accepted Pending and tried the ordinary way (in a backlog the read, of every pending
        entry, and a mark given back at once were most of a request's cost).
        """
        key = self._key(sub)
        digest = sub.update.digest()
        for _ in range(3):
            view: OrderView | None = None
            rides = not sub.respond_async and self.sender.gathering.is_open(
                sub.update.update.fields(), self._clock()
            )
            if sub.respond_async or not self.sender.budget_free_as_seen() or rides:
                claim = await self.keys.claim(key, digest, new_operation_id())
            else:
                claim, view = await asyncio.gather(
                    self.keys.claim(key, digest, new_operation_id()), self._look_ahead(sub)
                )
            record = claim.record
            if claim.outcome is ClaimOutcome.MISMATCH:
                return KeyReused(key.kind.value)
            if claim.outcome is ClaimOutcome.CLAIMED:
                return await self._accept(record, sub, view, rides=rides)
            if claim.outcome is ClaimOutcome.IN_PROGRESS:
                accepted, completed = await self._from_ledger(record, sub, ended_only=True)
                if not accepted and self._clock() - record.claimed_at > ACCEPT_LEASE_SECONDS:
                    taken = await self.keys.take_over(record)  # its holder failed before accepting
                    if taken is None:
                        continue
                    return await self._accept(taken, sub)
                if completed is None:
                    return self._in_progress(record)
                record = completed
            elif claim.outcome is ClaimOutcome.STALE:
                accepted, completed = await self._from_ledger(record, sub, ended_only=False)
                if not accepted:  # the first holder went quiet before accepting: take the claim over
                    taken = await self.keys.take_over(record)
                    if taken is None:
                        continue  # someone else changed the key meanwhile: look again
                    return await self._accept(taken, sub)
                if completed is None:
                    continue
                record = completed
            # A completed key: replay its first answer, unless a derived key would swallow a change back.
            if key.kind is KeyKind.DERIVED and await self._changed_back(record, sub):
                replaced = await self.keys.replace(record, digest, new_operation_id())
                if replaced is None:
                    continue  # someone else changed the key meanwhile: look again
                return await self._accept(replaced, sub, view)
            if record.response is not None and record.response.status == 504:
                record = await self._rebuilt(record, sub)
            return _replay(record)
        return self._in_progress(record)

    async def _rebuilt(self, record: KeyRecord, sub: Submission) -> KeyRecord:
        """A stored 504 (outcome unknown) is answered from the ledger again: a known outcome that arrived
        after the sweep recorded OutcomeUnknown supersedes it (docs/contracts.md §3), and its answer with
        it. The key is completed again with the new answer; if it changed meanwhile, the old one stands."""
        operation = await self.ledger.operation(record.operation_id)
        if operation is None:
            return record
        chunks = await self.ledger.chunks_of(operation)
        answer = self._answer(operation, chunks, sub)
        if answer.status == 504:
            return record
        return await self.keys.complete(record, _stored(answer)) or record

    async def _look_ahead(self, sub: Submission) -> OrderView | None:
        """The order read before accepting; None (the ordinary path) if it could not be read."""
        try:
            return await self.ledger.look_ahead(sub.update.alert_ids, sub.update.update.fields())
        except Exception:
            log.warning("per-alert order could not be read ahead; accepting the ordinary way", exc_info=True)
            return None

    async def _changed_back(self, record: KeyRecord, sub: Submission) -> bool:
        """A derived key never swallows a change back: was a different update of these alerts accepted since?"""
        operation = await self.ledger.operation(record.operation_id)
        if operation is None:
            return True
        return await self.ledger.changed_since(operation.first_seq, record.digest, sub.update.alert_ids)

    async def _from_ledger(
        self, record: KeyRecord, sub: Submission, *, ended_only: bool
    ) -> tuple[bool, KeyRecord | None]:
        """Complete a claimed key from its operation: whether the request was accepted, and the key
        completed (None if not accepted, not ended while `ended_only`, or the key changed meanwhile).

        A still-claimed key whose operation exists was answered by the synchronous path, which keeps the
        answer with the chunk's end (exactly what the first caller got), or its holder died after
        accepting (the sweep resolves its chunks): then the answer is built from the operation as it
        stands. Either way nothing is processing the request any more once the operation has ended; a
        stale claim is answered for its operation even before that (202 with its Location).
        """
        operation = await self.ledger.operation(record.operation_id)
        if operation is None:
            return False, None
        if operation.answer:  # a rider's 202, kept with its operation (`_answer_kept`)
            return True, await self.keys.complete(record, StoredResponse.loads(operation.answer))
        chunks = await self.ledger.chunks_of(operation)
        if ended_only and not status_of(operation, chunks).terminal:
            return True, None
        kept = chunks[0].answer if len(chunks) == 1 else ""
        stored = StoredResponse.loads(kept) if kept else _stored(self._answer(operation, chunks, sub))
        return True, await self.keys.complete(record, stored)

    async def _accept(
        self, record: KeyRecord, sub: Submission, view: OrderView | None = None, *, rides: bool = False
    ) -> Accepted | InProgress:
        limit = await self.sender.channel.max_alerts()
        fields = sub.update.update.fields()
        planned = plan_chunks(sub.update.alert_ids, fields, limit, MAX_ENTRIES_PER_ACCEPT)
        plan = AcceptPlan(
            record.operation_id,
            sub.source,
            sub.caller,
            planned,
            record.digest,
            hold_seconds=self.keys.claim_lease,
            answer=self._answer_kept(sub) if rides and len(planned) == 1 else None,
        )
        # An update an older pending one carries already rides with that one's call: no budget for it.
        ahead = view is not None and not view.blocked and not view.identical and not sub.respond_async
        # A small update nothing pending shares goes by PATCH while PATCH has room (docs/contracts.md §7,
        # "Choices"): one alert asks PATCH beside accepting; more are split into pieces first, which the
        # ordinary path does.
        by_patch = (
            view is not None
            and not view.identical
            and len(plan.chunks) == 1
            and self.sender.prefers_patch(len(sub.update.alert_ids))
        )
        ahead = ahead and not (by_patch and len(sub.update.alert_ids) > 1)
        held: Held = None
        try:
            if ahead:
                writing = asyncio.Event()
                accepting = asyncio.ensure_future(self.ledger.accept(plan, view, writing))
                (operation, chunks), held = await _both(
                    accepting,
                    self._budget_beside(accepting, writing, len(sub.update.alert_ids) if by_patch else 0),
                )
            else:
                operation, chunks = await self.ledger.accept(plan)
        except AlreadyAccepted:
            return self._in_progress(record)
        except StorageUnavailable:
            # Whether the accept landed is unknown, so the claim stays: a retry takes it over after
            # ACCEPT_LEASE_SECONDS with the same operation id, which the ledger accepts at most once.
            raise
        except BaseException:
            await self.keys.release(record)  # never accepted, nothing sent: a retry may proceed
            raise
        log.info(
            "accepted operation %s from %s: %d alerts in %d chunks from %s",
            operation.operation_id,
            sub.source,
            operation.alert_count,
            len(chunks),
            chunks[0].chunk_id,
        )
        if operation.answer:  # it rides a call gathering here: answered 202, the key left as claimed
            await self._send_or_defer(chunks, respond_async=False, max_wait=0.0)
            return Accepted(operation.operation_id, _response(StoredResponse.loads(operation.answer)))
        answered: list[tuple[ApiResponse, str]] = []  # the answer, and as kept with the chunk

        def answer_for(ended: Chunk) -> str:
            """A one-chunk request's answer, kept with its chunk's end (see `_from_ledger`)."""
            answer = self._answer(operation, [ended], sub)
            answered.append((answer, _stored(answer).dumps()))
            return answered[-1][1]

        one_chunk = answer_for if len(chunks) == 1 else None
        chunks = await self._send_or_defer(chunks, sub.respond_async, held, one_chunk)
        if answered and len(chunks) == 1 and chunks[0].answer == answered[-1][1]:
            # recorded with the chunk's end (not someone else's end of it)
            return Accepted(operation.operation_id, answered[-1][0])
        answer = self._answer(operation, chunks, sub)
        await self.keys.complete(record, _stored(answer))
        return Accepted(operation.operation_id, answer)

    async def _send_or_defer(
        self,
        chunks: list[Chunk],
        respond_async: bool,
        held: Held = None,
        answer_for: AnswerHook | None = None,
        *,
        max_wait: float | None = None,
    ) -> list[Chunk]:
        """Send what the budget allows within SYNC_MAX_WAIT_SECONDS (or `max_wait`); queue the rest.
        Returns the chunks' states.

        `held` and `answer_for` go with the first try of the first chunk only (see Sender.attempt).
        """
        if respond_async:  # expected when the budget frees up, as this process last saw it
            expected = self.sender.limiter.expected_wait()
            return [await self.sender.schedule(chunk, 0.0, expected) or chunk for chunk in chunks]
        wait = self.settings.sync_max_wait_seconds if max_wait is None else max_wait
        deadline = self._clock() + wait
        todo, seen = list(chunks), list[Chunk]()
        while todo:
            chunk = todo.pop(0)
            remaining = deadline - self._clock()
            if remaining < 0 and seen:  # the first chunk is always tried (without waiting, if need be)
                seen.append(await self.sender.schedule(chunk, 0.0) or chunk)
                continue
            attempt = await self.sender.attempt(
                chunk, max_wait=max(0.0, remaining), held=held, answer_for=answer_for, queued=False
            )
            held, answer_for = None, None
            if attempt.kind is AttemptKind.SPLIT:
                todo[:0] = attempt.pieces
                continue
            seen.extend(await self.sender.follow_up(attempt))
        return seen

    def _answer(self, operation: Operation, chunks: list[Chunk], sub: Submission) -> ApiResponse:
        location = f"{sub.operations_url}{operation.operation_id}{sub.location_query}"
        state = status_of(operation, chunks)
        document = {**summary(operation, chunks), **sub.extra}
        headers = {"Location": location}
        if not state.terminal:
            headers["Retry-After"] = str(retry_after_seconds(chunks, self._clock()))
            return json_response(202, document, headers)
        if state.http_status == 200:
            return json_response(200, document, headers)
        error = worst_error(chunks)
        succeeded = sum(c.alert_count for c in _chunk_docs(document) if c.status == "Succeeded")
        message = (error or {}).get("message") or "no detail"
        extra = {**document, "succeededAlertCount": succeeded, "upstream": error}
        kind, title = _FAILURE_TITLES.get(state.http_status, ("upstream-rejected", "MDE rejected the update"))
        return problem(state.http_status, kind, title, message, headers=headers, extra=extra)

    def _answer_kept(self, sub: Submission) -> Callable[[Operation, list[Chunk]], str]:
        """The 202 of a request that rides a call gathering in this process, built as it is accepted
        and written with its operation (AcceptPlan.answer), so its idempotency key needs no second
        write: a repeat finds the answer there (`_from_ledger`). It says what a rider's 202 said
        when it was built after the ride: the chunk Pending, expected just after the call's slot.
        Whatever the try then does (the call may have closed meanwhile), the request answers this."""
        fields = sub.update.update.fields()

        def build(operation: Operation, chunks: list[Chunk]) -> str:
            now = self._clock()
            call = self.sender.gathering.call_of(fields, now)
            if call is not None:
                expected = max(now, call.slot) + RIDE_SLACK_SECONDS
                chunks = [dataclasses.replace(c, expected_at=expected) for c in chunks]
            return _stored(self._answer(operation, chunks, sub)).dumps()

        return build

    async def _budget_beside(
        self, accepting: asyncio.Future[Any], writing: asyncio.Event, by_patch: int
    ) -> Held:
        """The budget request made beside accepting. It is built at once but sent only once the accept's
        transaction is built and on its way (storage.sending_after), so both are in flight together;
        an accept that ends first (failed before writing) lets it go too."""
        accepting.add_done_callback(lambda _: writing.set())
        with sending_after(writing):
            return await self.sender.budget_now(by_patch)

    def _in_progress(self, record: KeyRecord) -> InProgress:
        wait = max(1, min(int(self.settings.sync_max_wait_seconds) + 1, 30))
        return InProgress(record.operation_id, wait)


_FAILURE_TITLES = {
    422: ("upstream-rejected", "MDE rejected the update"),
    502: ("upstream-failed", "MDE refused or kept failing"),
    504: ("outcome-unknown", "Outcome unknown"),
    400: ("invalid-request", "Invalid request"),
}


@dataclass(frozen=True)
class _ChunkDoc:
    alert_count: int
    status: str


def _chunk_docs(document: dict[str, Any]) -> list[_ChunkDoc]:
    return [_ChunkDoc(int(c["alertCount"]), str(c["status"])) for c in document.get("chunks", [])]


async def _both(first: Awaitable[T], second: Awaitable[Held]) -> tuple[T, Held]:
    """Run both; the first's exception propagates once the second is done, the second's is logged as None."""
    results = await asyncio.gather(first, second, return_exceptions=True)
    if isinstance(results[0], BaseException):
        raise results[0]
    other = results[1]
    return results[0], None if isinstance(other, BaseException) else other


def _stored(answer: ApiResponse) -> StoredResponse:
    return StoredResponse(answer.status, dict(answer.headers), answer.body.decode("utf-8"))


def _response(stored: StoredResponse, extra_headers: dict[str, str] | None = None) -> ApiResponse:
    return ApiResponse(
        stored.status, stored.body.encode("utf-8"), {**stored.headers, **(extra_headers or {})}
    )


def _replay(record: KeyRecord) -> Replayed:
    stored = record.response
    assert stored is not None  # a completed record always holds its response
    return Replayed(record.operation_id, _response(stored, REPLAYED))
