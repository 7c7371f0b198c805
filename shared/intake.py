"""Taking a validated request in: idempotency, acceptance into the ledger, the synchronous try, the answer.

Used by every source (HTTP, the inbound queue, Sentinel), so keys, operations and answers behave the
same whichever way a request came. The answer is built once, stored with the key, and replayed as is.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from shared.dispatch import AttemptKind, plan_chunks
from shared.errors import FieldError
from shared.http import ApiResponse, json_response, problem
from shared.idempotency import ClaimOutcome, IdempotencyKey, KeyKind, KeyRecord, StoredResponse
from shared.ledger import (
    MAX_ENTRIES_PER_ACCEPT,
    AcceptPlan,
    AlreadyAccepted,
    Chunk,
    Operation,
    new_operation_id,
)
from shared.operations import retry_after_seconds, status_of, summary, worst_error

if TYPE_CHECKING:
    from shared.dispatch import Sender
    from shared.idempotency import IdempotencyStore
    from shared.ledger import Ledger
    from shared.model import BatchUpdate
    from shared.settings import Settings

log = logging.getLogger(__name__)

REPLAYED = {"Idempotent-Replayed": "true"}


@dataclass(frozen=True)
class Submission:
    update: BatchUpdate
    source: str  # http | queue | sentinel
    caller: dict[str, Any]
    operations_url: str  # `.../api/operations/`, where the Location of an accepted request points
    location_query: str = ""  # `?code=...` when the caller authenticated with a function key in the URL
    explicit_key: str | None = None
    respond_async: bool = False
    derived_key: str | None = None  # Sentinel: from the incident, in place of the body digest
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
            return IdempotencyKey(KeyKind.EXPLICIT, sub.explicit_key)
        return IdempotencyKey(KeyKind.DERIVED, sub.derived_key or sub.update.digest())

    async def submit(self, sub: Submission) -> ApiResponse:
        """Accept and try a request, or answer from its idempotency key. Never sends a request twice."""
        key = self._key(sub)
        digest = sub.update.digest()
        for _ in range(3):
            claim = await self.keys.claim(key, digest, new_operation_id())
            record = claim.record
            if claim.outcome is ClaimOutcome.MISMATCH:
                return _key_reused(key)
            if claim.outcome is ClaimOutcome.IN_PROGRESS:
                return await self._ended_answer(record, sub) or self._in_progress(record)
            if claim.outcome is ClaimOutcome.REPLAY:
                if key.kind is KeyKind.DERIVED and await self._changed_back(record, sub):
                    replaced = await self.keys.replace(record, digest, new_operation_id())
                    if replaced is None:
                        continue  # someone else changed the key meanwhile: look again
                    return await self._accept(replaced, sub)
                return _replay(record)
            if claim.outcome is ClaimOutcome.STALE:
                answer = await self._resume_stale(record, sub)
                if answer is not None:
                    return answer
                continue
            return await self._accept(record, sub)
        return self._in_progress(record)

    async def _changed_back(self, record: KeyRecord, sub: Submission) -> bool:
        """A derived key never swallows a change back: was a different update of these alerts accepted since?"""
        operation = await self.ledger.operation(record.operation_id)
        if operation is None:
            return True
        return await self.ledger.changed_since(operation.first_seq, record.digest, sub.update.alert_ids)

    async def _ended_answer(self, record: KeyRecord, sub: Submission) -> ApiResponse | None:
        """The key is still claimed but its operation has ended (its first holder died after accepting and
        the sweep finished the chunks): nothing is processing the request any more, so answer its outcome."""
        operation = await self.ledger.operation(record.operation_id)
        if operation is None:
            return None
        chunks = await self.ledger.chunks_of(operation)
        if not status_of(operation, chunks).terminal:
            return None
        answer = self._answer(operation, chunks, sub)
        await self.keys.complete(record, _stored(answer))
        return _with_headers(answer, REPLAYED)

    async def _resume_stale(self, record: KeyRecord, sub: Submission) -> ApiResponse | None:
        """The first holder went quiet. If it had accepted the request, answer for that operation (its
        chunks are in the outbox, where the sweep resolves them); otherwise take the claim over."""
        operation = await self.ledger.operation(record.operation_id)
        if operation is not None:
            chunks = await self.ledger.chunks_of(operation)
            answer = self._answer(operation, chunks, sub)
            await self.keys.complete(record, _stored(answer))
            return _with_headers(answer, REPLAYED)
        taken = await self.keys.take_over(record)
        if taken is None:
            return None
        return await self._accept(taken, sub)

    async def _accept(self, record: KeyRecord, sub: Submission) -> ApiResponse:
        limit = await self.sender.batch_limit.refresh()
        fields = sub.update.update.fields()
        plan = AcceptPlan(
            record.operation_id,
            sub.source,
            sub.caller,
            plan_chunks(sub.update.alert_ids, fields, limit, MAX_ENTRIES_PER_ACCEPT),
            record.digest,
            hold_seconds=self.keys.claim_lease,
        )
        try:
            operation, chunks = await self.ledger.accept(plan)
        except AlreadyAccepted:
            return self._in_progress(record)
        except BaseException:
            await self.keys.release(record)  # never accepted, nothing sent: a retry may proceed
            raise
        log.info(
            "accepted operation %s from %s: %d alerts in %d chunks",
            operation.operation_id,
            sub.source,
            operation.alert_count,
            len(chunks),
        )
        chunks = await self._send_or_defer(chunks, sub.respond_async)
        answer = self._answer(operation, chunks, sub)
        await self.keys.complete(record, _stored(answer))
        return answer

    async def _send_or_defer(self, chunks: list[Chunk], respond_async: bool) -> list[Chunk]:
        """Send what the budget allows within SYNC_MAX_WAIT_SECONDS; queue the rest. Returns the chunks' states."""
        if respond_async:
            for chunk in chunks:
                await self.sender.schedule(chunk, 0.0)
            return chunks
        deadline = self._clock() + self.settings.sync_max_wait_seconds
        todo, seen = list(chunks), list[Chunk]()
        while todo:
            chunk = todo.pop(0)
            remaining = deadline - self._clock()
            if remaining < 0 and seen:  # the first chunk is always tried (without waiting, if need be)
                await self.sender.schedule(chunk, 0.0)
                seen.append(chunk)
                continue
            attempt = await self.sender.attempt(chunk, max_wait=max(0.0, remaining))
            if attempt.kind is AttemptKind.SPLIT:
                todo[:0] = attempt.pieces
                continue
            if attempt.kind is AttemptKind.DEFERRED:
                await self.sender.schedule(attempt.chunk, attempt.delay)
            seen.append(attempt.chunk)
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

    def _in_progress(self, record: KeyRecord) -> ApiResponse:
        wait = max(1, min(int(self.settings.sync_max_wait_seconds) + 1, 30))
        return problem(
            409,
            "request-in-progress",
            "Request in progress",
            "A request with this idempotency key is still being processed; retry after the Retry-After delay.",
            headers={"Retry-After": str(wait)},
            extra={"operationId": record.operation_id},
        )


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


def _stored(answer: ApiResponse) -> StoredResponse:
    return StoredResponse(answer.status, dict(answer.headers), answer.body.decode("utf-8"))


def _replay(record: KeyRecord) -> ApiResponse:
    stored = record.response
    assert stored is not None  # a completed record always holds its response
    return ApiResponse(stored.status, stored.body.encode("utf-8"), {**stored.headers, **REPLAYED})


def _with_headers(answer: ApiResponse, headers: dict[str, str]) -> ApiResponse:
    return ApiResponse(answer.status, answer.body, {**answer.headers, **headers})


def _key_reused(key: IdempotencyKey) -> ApiResponse:
    return problem(
        422,
        "idempotency-key-reused",
        "Idempotency-Key reused",
        "This Idempotency-Key was already used with a different request body; use a new key for a new request.",
        errors=[FieldError("Idempotency-Key", "was used before with a different request body")],
        extra={"keyKind": key.kind.value},
    )


def describe(answer: ApiResponse) -> str:
    """One line for logs: status and operation id."""
    try:
        operation = json.loads(answer.body).get("operationId")
    except ValueError:
        operation = None
    return f"{answer.status} operation={operation}"
