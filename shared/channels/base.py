"""What every MDE channel shares: the kinds of answer, MDE's error body, and the one HTTP call.

A channel (shared.channels) is one MDE API. The transport here makes exactly one HTTP call per `call`
and never retries by itself: every call spends the shared budget (docs/contracts.md §3), so retries,
token refreshes and splitting are the sender's decisions. What it does decide is the *kind* of each
answer, with the channel's own classification: success, a smaller batch limit, a permanent failure, a
retryable one, or an unknown outcome (the request may have reached MDE, docs/mde-api.md §1-2).

"Sent" is known precisely: an aiohttp trace hook marks the moment the request headers went out. A
failure before that point cannot have changed anything at MDE and is simply retryable; a failure after
it may have applied the update (docs/contracts.md §1 "Outcome unknown").
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

    import aiohttp

    from shared.tokens import TokenProvider

log = logging.getLogger(__name__)

_RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})
TOKEN_UNAVAILABLE = "TokenUnavailable"
_ERROR_SNIPPET = 500


class CallKind(enum.StrEnum):
    OK = "ok"
    BATCH_TOO_LARGE = "batch_too_large"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    PERMANENT = "permanent"
    RETRYABLE = "retryable"
    OUTCOME_UNKNOWN = "outcome_unknown"


@dataclass(frozen=True)
class UpstreamError:
    """MDE's error body (`code` is what to switch on; `target` is the id Microsoft support asks for)."""

    http_status: int | None
    code: str | None
    message: str
    target: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "httpStatus": self.http_status,
            "code": self.code,
            "message": self.message,
            "target": self.target,
        }


@dataclass(frozen=True)
class CallResult:
    kind: CallKind
    error: UpstreamError | None = None
    retry_after: float | None = None
    allowed_batch_size: int | None = None
    timed_out: bool = False
    sent: bool = True


@dataclass
class _SendState:
    sent: bool = False


def _mark_sent(_session: Any, ctx: SimpleNamespace, _params: Any) -> Any:
    async def hook() -> None:
        state = ctx.trace_request_ctx
        if isinstance(state, _SendState):
            state.sent = True

    return hook()


def trace_config() -> aiohttp.TraceConfig:
    """The session hook that records when a request's headers have left this process."""
    import aiohttp

    config = aiohttp.TraceConfig()
    config.on_request_headers_sent.append(_mark_sent)
    return config


async def bearer(
    tokens: TokenProvider, *, fresh: bool = False, rejected: str | None = None
) -> str | CallResult:
    """A bearer token (fetched fresh after a 401), or a not-sent retryable result saying why none came.

    Kept apart from the call so the sender can fetch it before it spends budget: a grant must reach MDE
    within the safety margin, and a token fetch can take longer than that.
    """
    try:
        return await (tokens.refresh(rejected) if fresh else tokens.token())
    except Exception as exc:  # azure-identity raises several types; none of them reached MDE
        log.warning("no token for MDE: %s", exc)
        message = f"Could not obtain a token for MDE: {type(exc).__name__}: {_first_line(exc)}"
        return CallResult(CallKind.RETRYABLE, UpstreamError(None, TOKEN_UNAVAILABLE, message), sent=False)


class Transport:
    """One HTTP call to MDE on the process's shared aiohttp session, bounded by the call timeout."""

    def __init__(self, session: aiohttp.ClientSession, timeout: float) -> None:
        self._session = session
        self.timeout = timeout

    async def call(
        self,
        method: str,
        url: str,
        body: dict[str, Any],
        token: str,
        classify: Callable[[int, str | None, str], CallResult],
    ) -> CallResult:
        """Send once and classify the answer with the channel's rules; never raises, never retries."""
        import aiohttp

        payload = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        state = _SendState()
        try:
            async with (
                asyncio.timeout(self.timeout),
                self._session.request(
                    method, url, data=payload, headers=headers, trace_request_ctx=state
                ) as response,
            ):
                text = await response.text(errors="replace") if response.status != 200 else ""
                return classify(response.status, response.headers.get("Retry-After"), text)
        except TimeoutError:
            return _transport_failure(
                state.sent, timed_out=True, detail=f"no answer within {self.timeout:g}s"
            )
        except aiohttp.ClientError as exc:
            return _transport_failure(state.sent, timed_out=False, detail=f"{type(exc).__name__}: {exc}")


def _transport_failure(sent: bool, *, timed_out: bool, detail: str) -> CallResult:
    if sent:
        error = UpstreamError(
            None, "OutcomeUnknown", f"The request was sent but {detail}; MDE may have applied it."
        )
        return CallResult(CallKind.OUTCOME_UNKNOWN, error, timed_out=timed_out, sent=True)
    error = UpstreamError(None, "NotSent", f"The request could not be sent: {detail}.")
    return CallResult(CallKind.RETRYABLE, error, timed_out=timed_out, sent=False)


def classify(status: int, retry_after_header: str | None, text: str) -> CallResult:
    """An MDE answer → what it means, by the rules every channel shares (docs/mde-api.md §2). Pure, so
    every branch is tested without a network; a channel adds its own cases before these."""
    if status == 200:
        return CallResult(CallKind.OK)
    error = parse_error_body(status, text)
    if status == 401:
        return CallResult(CallKind.UNAUTHORIZED, error)
    if status == 403:
        return CallResult(CallKind.FORBIDDEN, error)
    if status in _RETRYABLE_STATUSES:
        return CallResult(CallKind.RETRYABLE, error, retry_after=parse_retry_after(retry_after_header))
    return CallResult(CallKind.PERMANENT, error)


def parse_error_body(status: int, text: str) -> UpstreamError:
    """`{"error": {"code", "message", "target"}}`, or whatever came, kept short."""
    document: Any = None
    with contextlib.suppress(ValueError):
        document = json.loads(text) if text else None
    inner = document.get("error") if isinstance(document, dict) else None
    if isinstance(inner, dict):
        code = inner.get("code")
        message = inner.get("message")
        target = inner.get("target")
        return UpstreamError(
            status,
            code if isinstance(code, str) else None,
            message if isinstance(message, str) else text[:_ERROR_SNIPPET],
            target if isinstance(target, str) else None,
        )
    return UpstreamError(status, None, text[:_ERROR_SNIPPET] or f"HTTP {status} with no body")


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds (MDE sends seconds; an HTTP date is accepted too)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        from datetime import UTC, datetime

        when = parsedate_to_datetime(value)
        return max(0.0, (when - datetime.now(UTC)).total_seconds())
    except (TypeError, ValueError):
        return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""
