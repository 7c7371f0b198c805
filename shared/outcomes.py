"""What taking a request in can end in, as types: intake says what happened, the edges say it their way.

The HTTP edge (shared.api.render) turns an outcome into a status and a body; the inbound queue
(shared.queue_handlers) turns the same outcome into what happens to its message (consumed, re-enqueued,
recorded as a Failed operation). Neither has to read an HTTP answer back to learn what happened.

An accepted request's answer is part of the outcome because it is part of the contract: it is built once,
stored with the idempotency key, and replayed byte for byte (docs/contracts.md §1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shared.errors import FieldError
    from shared.http import ApiResponse


@dataclass(frozen=True)
class Accepted:
    """A new operation: accepted now, and sent, deferred or ended by the time of the answer."""

    operation_id: str
    answer: ApiResponse


@dataclass(frozen=True)
class Replayed:
    """The key was completed before: the first answer again, nothing sent."""

    operation_id: str
    answer: ApiResponse


@dataclass(frozen=True)
class InProgress:
    """The key's first request is still being processed elsewhere; try again after `retry_after` s."""

    operation_id: str
    retry_after: int


@dataclass(frozen=True)
class KeyReused:
    """The key was used before with a different body: refused, nothing accepted."""

    key_kind: str


@dataclass(frozen=True)
class Refused:
    """Refused before anything was accepted, for a reason found in the request (e.g. a Sentinel incident
    whose alerts are not in its payload)."""

    status: int
    kind: str
    title: str
    detail: str
    errors: list[FieldError] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class NothingToDo:
    """Nothing to send and nothing recorded (a Sentinel incident without Defender alerts)."""

    document: dict[str, Any]


SubmitOutcome = Accepted | Replayed | InProgress | KeyReused
IncidentOutcome = SubmitOutcome | Refused | NothingToDo


def describe(outcome: IncidentOutcome) -> str:
    """One line for logs."""
    if isinstance(outcome, Accepted | Replayed):
        return f"{type(outcome).__name__.lower()} {outcome.answer.status} operation={outcome.operation_id}"
    if isinstance(outcome, InProgress):
        return f"in progress elsewhere: operation={outcome.operation_id}"
    if isinstance(outcome, KeyReused):
        return f"{outcome.key_kind} idempotency key reused with a different body"
    if isinstance(outcome, Refused):
        return f"refused: {outcome.detail}"
    return "nothing to do"
