"""Forwarding a validated request to MDE in chunks, and the answer it earns (DESIGN §1).

This version forwards synchronously within the HTTP request. The shared-state issue adds the call
budget, idempotency keys, operations and deferral in front of it; the chunk outcomes defined here are
what those records will hold.

Decisions, all from DESIGN §1:
- Chunks hold at most `BatchLimit.current` ids. MaximumBatchSizeExceeded is not a failure: the chunk is
  split by MDE's reported allowance, which is remembered, and the pieces are sent.
- A 401 is retried once with a freshly fetched token; a second 401 fails the chunk (502).
- A retryable failure (429, 5xx, not sent) stops the request: the chunks not yet sent are reported
  NotSent, and nothing more is spent on an upstream that is refusing or failing.
- A call that may have reached MDE but gave no answer (timeout, reset) is "outcome unknown". With no
  comment, setting the same values again is harmless, so it is answered like a 5xx (retry later). With a
  comment it is not, because MDE appends comments: the chunk ends OutcomeUnknown and the answer is 504.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field
from typing import Any

from shared.defender import BatchLimit, CallKind, CallResult, DefenderClient, UpstreamError
from shared.model import AlertUpdate, BatchUpdate, outbound_body

log = logging.getLogger(__name__)


class ChunkStatus(enum.Enum):
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    RETRYABLE = "Retryable"
    OUTCOME_UNKNOWN = "OutcomeUnknown"
    NOT_SENT = "NotSent"


@dataclass
class ChunkOutcome:
    alert_ids: tuple[str, ...]
    status: ChunkStatus
    attempts: int = 0
    answer_status: int = 200
    error: UpstreamError | None = None
    retry_after: float | None = None

    def as_dict(self) -> dict[str, Any]:
        result: dict[str, Any] = {
            "alertIds": list(self.alert_ids),
            "status": self.status.value,
            "attempts": self.attempts,
        }
        if self.error is not None:
            result["lastError"] = self.error.as_dict()
        return result


# The answer a chunk earns; when chunks differ the most severe wins (DESIGN §1: 504 > 502 > 422 > 400),
# with 503 ("retry later", before operations exist) placed just under 504.
_SEVERITY = {504: 5, 503: 4, 502: 3, 422: 2, 400: 1, 200: 0}


@dataclass
class ForwardReport:
    chunks: list[ChunkOutcome] = field(default_factory=list)

    @property
    def answer_status(self) -> int:
        return max((c.answer_status for c in self.chunks), key=lambda s: _SEVERITY.get(s, 0), default=200)

    @property
    def succeeded(self) -> bool:
        return all(c.status is ChunkStatus.SUCCEEDED for c in self.chunks)

    @property
    def retry_after(self) -> float | None:
        waits = [c.retry_after for c in self.chunks if c.retry_after is not None]
        return max(waits) if waits else None

    def worst(self) -> ChunkOutcome | None:
        failing = [c for c in self.chunks if c.status is not ChunkStatus.SUCCEEDED]
        return max(failing, key=lambda c: _SEVERITY.get(c.answer_status, 0)) if failing else None


def split(alert_ids: tuple[str, ...], size: int) -> list[tuple[str, ...]]:
    return [alert_ids[i : i + size] for i in range(0, len(alert_ids), size)]


class Forwarder:
    """Sends a request's chunks one after another and collects what happened to each."""

    def __init__(
        self,
        client: DefenderClient,
        batch_limit: BatchLimit,
        enum_overrides: dict[str, str],
        resend_unknown_with_comment: bool = False,
    ) -> None:
        self._client = client
        self._batch_limit = batch_limit
        self._overrides = enum_overrides
        self._resend_unknown_with_comment = resend_unknown_with_comment

    @property
    def batch_limit(self) -> int:
        return self._batch_limit.current

    async def forward(self, request: BatchUpdate) -> ForwardReport:
        report = ForwardReport()
        pending = split(request.alert_ids, self._batch_limit.current)
        while pending:
            ids = pending.pop(0)
            outcome, smaller = await self._send_chunk(ids, request.update)
            if smaller is not None:
                pending[:0] = smaller
                continue
            report.chunks.append(outcome)
            if outcome.status in (ChunkStatus.RETRYABLE, ChunkStatus.OUTCOME_UNKNOWN):
                report.chunks.extend(
                    ChunkOutcome(
                        rest, ChunkStatus.NOT_SENT, answer_status=503, retry_after=outcome.retry_after
                    )
                    for rest in pending
                )
                break
        return report

    async def _send_chunk(
        self, ids: tuple[str, ...], update: AlertUpdate
    ) -> tuple[ChunkOutcome, list[tuple[str, ...]] | None]:
        """One chunk, with the single fresh-token retry after a 401; returns pieces if it must be split."""
        body = outbound_body(ids, update, self._overrides)
        result, token = await self._client.send(body)
        attempts = 1 if result.sent else 0
        if result.kind is CallKind.UNAUTHORIZED:
            log.warning("MDE answered 401; retrying once with a freshly fetched token")
            result, _ = await self._client.send(body, fresh_token=True, rejected_token=token)
            attempts += 1 if result.sent else 0
        if result.kind is CallKind.BATCH_TOO_LARGE and len(ids) > 1:
            size = self._batch_limit.learn(result.allowed_batch_size, len(ids))
            return ChunkOutcome(ids, ChunkStatus.NOT_SENT), split(ids, size)
        return self._outcome(ids, update, result, attempts), None

    def _outcome(
        self, ids: tuple[str, ...], update: AlertUpdate, result: CallResult, attempts: int
    ) -> ChunkOutcome:
        kind = result.kind
        if kind is CallKind.OK:
            return ChunkOutcome(ids, ChunkStatus.SUCCEEDED, attempts)
        if kind in (CallKind.PERMANENT, CallKind.BATCH_TOO_LARGE):
            return ChunkOutcome(ids, ChunkStatus.FAILED, attempts, 422, result.error)
        if kind in (CallKind.UNAUTHORIZED, CallKind.FORBIDDEN):
            return ChunkOutcome(ids, ChunkStatus.FAILED, attempts, 502, _with_role_hint(result.error))
        if (
            kind is CallKind.OUTCOME_UNKNOWN
            and update.comment is not None
            and not self._resend_unknown_with_comment
        ):
            status = 504
            return ChunkOutcome(ids, ChunkStatus.OUTCOME_UNKNOWN, attempts, status, result.error)
        return ChunkOutcome(ids, ChunkStatus.RETRYABLE, attempts, 503, result.error, result.retry_after)


ROLE_HINT = (
    "alertgate's identity needs the Alert.ReadWrite.All application role of WindowsDefenderATP "
    "(infra/grant-defender-permission.sh grants it); a new grant can take a while to reach tokens, so "
    "re-submit once it has."
)


def _with_role_hint(error: UpstreamError | None) -> UpstreamError:
    base = error or UpstreamError(None, None, "MDE refused the token")
    return UpstreamError(base.http_status, base.code, f"{base.message} — {ROLE_HINT}", base.target)
