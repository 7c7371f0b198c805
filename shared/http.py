"""Plain request and response types for alertgate's HTTP API, and problem details (RFC 9457).

The Functions bindings (function_app.py) translate to and from these, so the logic in shared/ never
sees a Functions type and runs the same under Core Tools, in Azure and in the development host.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from shared.errors import FieldError, RequestRejected

PROBLEM_BASE = "https://alertgate.invalid/problems/"  # identifiers, not pages to fetch (RFC 9457 §3.1.1)


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


def without_nulls(document: Any) -> Any:
    """The document with every member whose value is None left out, at any depth (array items are kept).

    openapi.yaml is OpenAPI 2.0, which cannot say "string or null": a member a schema types as a string
    (an MDE error's `target`, a principal's `identityProvider`) is absent when there is no value, never
    null, which is what clients built from the spec (Logic Apps' Parse JSON, generated classes) expect."""
    if isinstance(document, dict):
        return {k: without_nulls(v) for k, v in document.items() if v is not None}
    if isinstance(document, list | tuple):
        return [without_nulls(item) for item in document]
    return document


def json_response(status: int, document: Any, headers: dict[str, str] | None = None) -> ApiResponse:
    body = json.dumps(without_nulls(document), ensure_ascii=False).encode("utf-8")
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
    more = dict(extra or {})
    if "status" in more:
        # RFC 9457 §3.1.2: `status` is the HTTP status code. An answer about an operation carries the
        # operation's status (Failed, PartiallySucceeded) as `operationStatus` instead.
        more["operationStatus"] = more.pop("status")
    document.update(more)
    body = json.dumps(without_nulls(document), ensure_ascii=False).encode("utf-8")
    return ApiResponse(
        status, body, {"Content-Type": "application/problem+json; charset=utf-8", **(headers or {})}
    )


_KIND_BY_STATUS = {
    400: "invalid-request",
    403: "tenant-forbidden",
    404: "unknown-tenant",
    413: "body-too-large",
    415: "unsupported-media-type",
}


def rejected(exc: RequestRejected) -> ApiResponse:
    return problem(
        exc.status, _KIND_BY_STATUS.get(exc.status, "invalid-request"), exc.title, exc.detail, exc.errors
    )
