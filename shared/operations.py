"""The operation resource (docs/contracts.md §1 "GET /api/operations/{operationId}") and the status it answers with.

Pure functions over the ledger's records, so the rules are tested without storage:
- Succeeded when every chunk is; PartiallySucceeded when some chunk Succeeded and another did not;
  Failed when none did; Queued while nothing has been tried yet, Running while anything is pending.
- A terminal operation that did not succeed answers the status a synchronous call would have got,
  the most severe of its chunks' (504 > 502 > 422 > 400).
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from shared.ledger import Chunk, ChunkResult, Operation, PendingState

_SEVERITY = {504: 4, 502: 3, 422: 2, 400: 1}


@dataclass(frozen=True)
class OperationStatus:
    status: str
    http_status: int
    terminal: bool


def status_of(operation: Operation, chunks: list[Chunk]) -> OperationStatus:
    if operation.invalid_status is not None:
        return OperationStatus("Failed", operation.invalid_status, True)
    pending = [c for c in chunks if not c.finished]
    seen = {c.seq for c in chunks}
    if pending or any(seq not in seen for seq in range(operation.first_seq, operation.last_seq + 1)):
        started = any(c.attempts > 0 or c.state == PendingState.SENDING for c in chunks)
        return OperationStatus("Running" if started else "Queued", 202, False)
    succeeded = sum(1 for c in chunks if c.state == ChunkResult.SUCCEEDED)
    if chunks and succeeded == len(chunks):
        return OperationStatus("Succeeded", 200, True)
    worst = max(
        (c.answer_status for c in chunks if c.state != ChunkResult.SUCCEEDED),
        key=lambda s: _SEVERITY.get(s, 0),
        default=502,
    )
    return OperationStatus("PartiallySucceeded" if succeeded else "Failed", worst, True)


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch)) + f".{int(epoch % 1 * 1000):03d}Z"


def chunk_resource(chunk: Chunk, *, with_ids: bool = True) -> dict[str, Any]:
    status = chunk.state if chunk.finished else "Pending"
    document: dict[str, Any] = {
        "chunkId": chunk.chunk_id,
        "alertCount": len(chunk.alert_ids),
        "status": status,
        "attempts": chunk.attempts,
    }
    if with_ids:
        document = {"alertIds": list(chunk.alert_ids), **document}
    if chunk.call_id:
        document["channel"], document["callId"] = chunk.channel, chunk.call_id
    if chunk.last_error is not None:
        document["lastError"] = chunk.last_error
    return document


def resource(operation: Operation, chunks: list[Chunk]) -> dict[str, Any]:
    state = status_of(operation, chunks)
    updated = max([operation.created_at, *(c.updated_at for c in chunks), *(c.finished_at for c in chunks)])
    return {
        "operationId": operation.operation_id,
        "status": state.status,
        "createdAt": _iso(operation.created_at),
        "updatedAt": _iso(updated),
        "alertCount": operation.alert_count,
        "source": operation.source,
        "caller": operation.caller,
        "errors": operation.errors,
        "chunks": [chunk_resource(c) for c in chunks],
    }


def summary(operation: Operation, chunks: list[Chunk]) -> dict[str, Any]:
    """What a POST answers: small enough to store for replays (the ids are in the resource)."""
    state = status_of(operation, chunks)
    return {
        "operationId": operation.operation_id,
        "status": state.status,
        "alertCount": operation.alert_count,
        "chunks": [chunk_resource(c, with_ids=False) for c in chunks],
    }


def worst_error(chunks: list[Chunk]) -> dict[str, Any] | None:
    failing = [c for c in chunks if c.finished and c.state != ChunkResult.SUCCEEDED]
    if not failing:
        return None
    worst = max(failing, key=lambda c: _SEVERITY.get(c.answer_status, 0))
    return worst.last_error


def retry_after_seconds(chunks: list[Chunk], now: float | None = None) -> int:
    """When polling again makes sense (docs/contracts.md §7): when the last pending chunk is expected to
    go out (its reserved or estimated slot, or the end of its back-off), between 1 and 60 seconds. A
    chunk whose expected time has passed, or that has none yet, is due now."""
    now = time.time() if now is None else now
    due = [max(c.not_before, c.expected_at) - now for c in chunks if not c.finished]
    latest = max(due, default=1.0)
    return int(min(60, max(1, math.ceil(latest))))


def is_operation_id(text: str) -> bool:
    try:
        return str(uuid.UUID(text)) == text.lower()
    except ValueError:
        return False
