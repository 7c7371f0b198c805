"""alertgate's HTTP API as plain async functions: request in, response out, no Functions types.

function_app.py (and the development host through it) only translates to and from these types, so the
behaviour is the same under Core Tools, in Azure and locally. Every answer that is not a success is
`application/problem+json` (RFC 9457) with `errors: [{field, message}]`; an unexpected exception is
logged with an incident id and answered as a problem naming that id, never as a bare 500.
"""

from __future__ import annotations

import json
import logging
import math
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from shared.errors import FieldError, RequestRejected

log = logging.getLogger(__name__)

PROBLEM_BASE = (
    "https://alertgate.invalid/problems/"  # stable identifiers, not pages to fetch (RFC 9457 §3.1.1)
)


@dataclass(frozen=True)
class ApiRequest:
    method: str
    url: str
    headers: Mapping[str, str]  # case-insensitive lookups are the caller's job: use header()
    body: bytes = b""
    query: Mapping[str, str] = field(default_factory=dict)
    route_params: Mapping[str, str] = field(default_factory=dict)

    def header(self, name: str) -> str | None:
        lowered = name.lower()
        for key, value in self.headers.items():
            if key.lower() == lowered:
                return value
        return None


@dataclass(frozen=True)
class ApiResponse:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


def json_response(status: int, document: Any, headers: dict[str, str] | None = None) -> ApiResponse:
    body = json.dumps(document, ensure_ascii=False).encode("utf-8")
    return ApiResponse(status, body, {"Content-Type": "application/json; charset=utf-8", **(headers or {})})


def problem(
    status: int,
    kind: str,
    title: str,
    detail: str,
    errors: list[FieldError] | None = None,
    headers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> ApiResponse:
    document: dict[str, Any] = {
        "type": PROBLEM_BASE + kind,
        "title": title,
        "status": status,
        "detail": detail,
    }
    document["errors"] = [e.as_dict() for e in errors or []]
    document.update(extra or {})
    body = json.dumps(document, ensure_ascii=False).encode("utf-8")
    return ApiResponse(
        status, body, {"Content-Type": "application/problem+json; charset=utf-8", **(headers or {})}
    )


_KIND_BY_STATUS = {400: "invalid-request", 413: "body-too-large", 415: "unsupported-media-type"}


def rejected(exc: RequestRejected) -> ApiResponse:
    return problem(
        exc.status, _KIND_BY_STATUS.get(exc.status, "invalid-request"), exc.title, exc.detail, exc.errors
    )


def retry_after_header(seconds: float | None, *, minimum: int = 1) -> dict[str, str]:
    """Retry-After in whole seconds, rounded up so a caller never comes back too early."""
    value = minimum if seconds is None else max(minimum, math.ceil(seconds))
    return {"Retry-After": str(value)}


async def guarded(
    handler: Callable[[ApiRequest], Awaitable[ApiResponse]], request: ApiRequest
) -> ApiResponse:
    """Run a handler; turn any exception that escaped it into a logged problem+json 500."""
    try:
        return await handler(request)
    except RequestRejected as exc:
        return rejected(exc)
    except Exception:
        incident = str(uuid.uuid4())
        log.exception("unexpected error handling %s %s (incident %s)", request.method, request.url, incident)
        return problem(
            500,
            "internal-error",
            "Internal error",
            f"alertgate failed unexpectedly; the log holds the details under incident {incident}.",
            extra={"incident": incident},
        )


# --- POST /api/alerts/batchUpdate -------------------------------------------------------------------


async def batch_update(request: ApiRequest) -> ApiResponse:
    from shared import runtime
    from shared.model import ValidationRules, parse_json_body, validate_batch_update, validate_idempotency_key

    settings = runtime.settings()
    validate_idempotency_key(request.header("Idempotency-Key"))
    document = parse_json_body(request.body, request.header("Content-Type"), settings.max_body_bytes)
    rules = ValidationRules(settings.alert_id_pattern, settings.max_alerts_per_request)
    update = validate_batch_update(document, rules)
    rt = await runtime.runtime()
    report = await rt.forwarder.forward(update)
    return forward_answer(report, len(update.alert_ids))


def forward_answer(report: Any, alert_count: int) -> ApiResponse:
    """The HTTP answer for a forwarding report (see shared.dispatch for the rules behind each status)."""
    from shared.dispatch import ChunkStatus

    chunks = [c.as_dict() for c in report.chunks]
    if report.succeeded:
        return json_response(200, {"status": "Succeeded", "alertCount": alert_count, "chunks": chunks})
    status = report.answer_status
    worst = report.worst()
    upstream = worst.error.as_dict() if worst and worst.error else None
    sent_ok = sum(len(c.alert_ids) for c in report.chunks if c.status is ChunkStatus.SUCCEEDED)
    common: dict[str, Any] = {
        "alertCount": alert_count,
        "succeededAlertCount": sent_ok,
        "chunks": chunks,
        "upstream": upstream,
    }
    message = upstream["message"] if upstream else "no detail"
    if status == 503:
        return problem(
            503,
            "upstream-unavailable",
            "MDE is busy or unavailable",
            f"MDE did not take the update now ({message}). Retry after the Retry-After delay.",
            headers=retry_after_header(report.retry_after),
            extra=common,
        )
    if status == 504:
        return problem(
            504,
            "outcome-unknown",
            "Outcome unknown",
            "A chunk with a comment was sent but MDE gave no answer; it may have been applied. It is not "
            "re-sent automatically because MDE appends comments and the comment would appear twice. "
            "Check the alerts before re-submitting.",
            extra=common,
        )
    if status == 502:
        return problem(502, "upstream-auth", "MDE refused alertgate's identity", message, extra=common)
    return problem(422, "upstream-rejected", "MDE rejected the update", message, extra=common)


# --- GET /api/health -----------------------------------------------------------------------------------


async def health(request: ApiRequest) -> ApiResponse:
    """Storage reachable and a token obtainable; 503 names what is not."""
    import asyncio

    from shared import runtime

    rt = await runtime.runtime()
    checks: dict[str, dict[str, Any]] = {}
    for name, check in (("storage", _storage_check(rt)), ("token", _token_check(rt))):
        try:
            checks[name] = await asyncio.wait_for(check, timeout=10)
        except Exception as exc:
            checks[name] = {
                "ok": False,
                "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}",
            }
    healthy = all(c["ok"] for c in checks.values())
    document = {
        "status": "Healthy" if healthy else "Unhealthy",
        "checks": checks,
        "defender": {
            "batchUpdateUrl": rt.settings.batch_update_url,
            "maxAlertsPerCall": rt.forwarder.batch_limit,
        },
    }
    return json_response(200 if healthy else 503, document)


async def _storage_check(rt: Any) -> dict[str, Any]:
    async for _ in rt.tables.list_tables(results_per_page=1):
        break
    return {"ok": True}


async def _token_check(rt: Any) -> dict[str, Any]:
    await rt.tokens.token()
    return {"ok": True, "scope": rt.settings.defender_token_scope}
