"""A Defender for Endpoint alert-update emulator that is strict where MDE is documented.

alertgate cannot reach Microsoft in tests or in the local run, so this emulator is its counterpart for
MDE's two alert-update APIs:

- `POST …/api/alerts/batchUpdate` (docs/mde-api.md §1-4): `alertIds` plus the properties to set,
  `MaximumBatchSizeExceeded`, 200 with an empty body on success.
- `PATCH …/api/alerts/{id}` (docs/mde-api.md §5, §8): one alert named in the path, the same properties
  (an `alertIds` in the body is ignored like any unknown name), 200 with the updated alert entity
  `{"id", "status", "classification", "determination", "assignedTo", "comments": [{"comment",
  "createdTime"}]}`, 404 `NotFound` for an id configured as unknown.

Both obey: bearer tokens from the identity emulator for an accepted audience, case-sensitive body names
(a wrongly cased name is ignored and reported in the call record), exact-case enum values,
sliding-window rate limits answered with 429 + `Retry-After`, and `{"error": {"code", "message",
"target"}}` on every error. Both update one shared state per alert, where comments are appended, never
replaced.

Where MDE's behaviour is *not* documented the emulator picks one behaviour and says so:
- Each API has its own rate-limit budget (batchUpdate `10/60,500/3600`, PATCH `100/60,1500/3600`, both
  configurable): whether MDE counts the two APIs together is undocumented, and each page gives its
  limits "for this API". A 429 on one API never blocks the other.
- A call refused with 429 by the rate limiter is not counted in the windows (how MDE counts rejected
  calls is undocumented). Calls refused with 401 are never counted either (they cannot be attributed to
  an app). Every other call that reaches the limiter counts, whatever it is answered afterwards.
- If any id of a batchUpdate call is configured as unknown, the whole call fails with 404 and nothing is
  applied (MDE's partial-failure behaviour is undocumented; the single-alert PATCH answers 404).
- PATCH checks its body (JSON object, enums) before the unknown id, in batchUpdate's order, so a bad
  body on an unknown id is a 400. PATCH on the batchUpdate path is a 405 naming POST, not an update of
  an alert called "batchUpdate".
- The PATCH entity carries only the fields the emulator keeps (no title, severity, createdBy...);
  `createdTime` is when the comment was applied. A PATCH that a fault answers 200 without applying
  (`apply: false`) returns the alert's unchanged entity.
- JSON `null` for an optional property is treated as leaving the property out.

Every call is recorded (see `CallRecord`, whose `api` says which API it addressed) so tests can assert
exactly-once delivery per channel and that the app kept under the limits
(`emulators.control.max_calls_in_any_window`).

State is per tenant, as MDE's is: the validated token's tenant (`tid`: the home tenant for the identity
endpoint's tokens, the requested tenant for the Entra emulator's) selects that tenant's alerts and its
own batchUpdate and PATCH budgets (the configured limits unless `/_emulator/config` with a `tenantId`
gives that tenant its own). Calls carry `tenantId`. The control routes answer for the home tenant unless
a `tenantId` names another, so callers that know nothing of tenants see what they always saw.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import math
import re
import socket
import struct
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote

from aiohttp import web

from emulators import HOME_TENANT_ID
from emulators.identity import (
    LOG_DETAIL,
    TokenRegistry,
    TokenRejected,
    bad_request,
    error_body,
    read_json_object,
)

BATCH_UPDATE_SUFFIX = "/api/alerts/batchUpdate"
# `…/api/alerts/{id}`, matched on the still-encoded path so an id may carry an encoded `/`.
ALERT_PATH = re.compile(r".*/api/alerts/(?P<alert_id>[^/]+)")
DEFAULT_AUDIENCE = "https://api.securitycenter.microsoft.com"
DEFAULT_RATE_LIMITS = "10/60,500/3600"
DEFAULT_PATCH_RATE_LIMITS = "100/60,1500/3600"
DEFAULT_MAX_BATCH = 500

# What `CallRecord.api` says: which emulated API a call addressed.
API_BATCH_UPDATE = "batchUpdate"
API_PATCH = "patch"
API_UNKNOWN = "unknown"

KNOWN_FIELDS = ("alertIds", "status", "assignedTo", "classification", "determination", "comment")
# PATCH names its alert in the path: an `alertIds` in its body is just another ignored key.
PATCH_FIELDS = tuple(name for name in KNOWN_FIELDS if name != "alertIds")
STATUSES = ("New", "InProgress", "Resolved")
CLASSIFICATIONS = ("Unknown", "FalsePositive", "TruePositive", "InformationalExpectedActivity")
DETERMINATIONS = (
    "MultiStagedAttack",
    "MaliciousUserActivity",
    "CompromisedUser",
    "Malware",
    "Phishing",
    "UnwantedSoftware",
    "Other",
    "SecurityTesting",
    "LineOfBusinessApplication",
    "ConfirmedActivity",
    "NotMalicious",
    "InsufficientData",
)

DEFAULT_FAULT_CODES = {
    400: "InvalidInput",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    429: "TooManyRequests",
    500: "InternalServerError",
    502: "BadGateway",
    503: "ServiceUnavailable",
    504: "GatewayTimeout",
}
DEFAULT_FAULT_MESSAGES = {
    403: "Missing application roles. API required roles: Alert.ReadWrite.All",
    429: "Rate limit is exceeded. Try again later.",
}
FAULT_KEYS = frozenset(
    {"status", "code", "message", "retryAfter", "delaySeconds", "apply", "reset", "api", "tenantId"}
)
GUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
FAULT_APIS = (API_BATCH_UPDATE, API_PATCH)
# Which limits `/_emulator/config` may set for one tenant, and their API (everything else stays global).
TENANT_CONFIG_FIELDS = {"rateLimits": API_BATCH_UPDATE, "patchRateLimits": API_PATCH}


class ApiError(Exception):
    """An answer other than 200: raised anywhere in the pipeline, turned into the error body once."""

    def __init__(
        self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


@dataclass(frozen=True)
class Route:
    """Which emulated API a request addresses, decided before the call is recorded.

    A request that addresses none is still recorded (as `API_UNKNOWN`), then answered `error`.
    """

    api: str
    alert_id: str | None = None
    error: ApiError | None = None


def resolve_route(method: str, path: str, raw_path: str) -> Route:
    """POST `…/api/alerts/batchUpdate` or PATCH `…/api/alerts/{id}`; the base path may carry a prefix.

    `path` is decoded (for matching batchUpdate and for messages), `raw_path` still encoded (for the
    id). The batchUpdate path is never an alert id: PATCH on it is a 405 naming POST, as before PATCH
    existed, so a client that sends the wrong verb to batchUpdate is not taken for a single-alert update.
    """
    if path.endswith(BATCH_UPDATE_SUFFIX):
        return Route(API_BATCH_UPDATE) if method == "POST" else _wrong_method(method, path, "POST")
    match = ALERT_PATH.fullmatch(raw_path)
    if match is None:
        return Route(API_UNKNOWN, error=ApiError(404, "ResourceNotFound", f"No emulated route for {path}."))
    if method != "PATCH":
        return _wrong_method(method, path, "PATCH")
    return Route(API_PATCH, alert_id=unquote(match["alert_id"]))


def _wrong_method(method: str, path: str, allowed: str) -> Route:
    message = f"{method} is not allowed on {path}; use {allowed}."
    return Route(API_UNKNOWN, error=ApiError(405, "BadRequest", message))


# --- rate limits -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RateLimit:
    """At most `calls` admitted calls in any `seconds`-long stretch of time."""

    calls: int
    seconds: float

    def __str__(self) -> str:
        return f"{self.calls}/{self.seconds:g}"


def parse_rate_limits(text: str) -> tuple[RateLimit, ...]:
    """`"10/60,500/3600"` → limits; decimals allowed (`"5/2.5"`); an empty string means no limit."""
    limits: list[RateLimit] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        calls_text, sep, seconds_text = part.partition("/")
        try:
            calls, seconds = int(calls_text), float(seconds_text)
        except ValueError:
            calls, seconds = 0, 0.0
        if not sep or calls < 1 or not (seconds > 0 and math.isfinite(seconds)):
            raise ValueError(f"bad rate limit {part!r}: expected CALLS/SECONDS, e.g. 10/60")
        limits.append(RateLimit(calls, seconds))
    return tuple(limits)


def format_rate_limits(limits: tuple[RateLimit, ...]) -> str:
    return ",".join(str(limit) for limit in limits)


class SlidingWindowLimiter:
    """Exact sliding windows over one log of admitted call times (monotonic seconds).

    One log serves every window, so changing the limits at run time keeps the history that matters.
    A call at `now` is admitted only if, for every limit, fewer than `calls` admitted calls lie in
    `(now - seconds, now]`; hence no half-open interval of length `seconds` ever holds more than `calls`.
    """

    def __init__(self, limits: tuple[RateLimit, ...]) -> None:
        self.limits = limits
        self._times: list[float] = []

    def try_admit(self, now: float) -> float | None:
        """Admit and log the call (None), or return how many seconds until it would be admitted."""
        waits = [wait for limit in self.limits if (wait := self._wait(limit, now)) is not None]
        if waits:
            return max(waits)
        self._times.append(now)
        self._prune(now)
        return None

    def _wait(self, limit: RateLimit, now: float) -> float | None:
        first_inside = bisect.bisect_right(self._times, now - limit.seconds)
        inside = len(self._times) - first_inside
        if inside < limit.calls:
            return None
        # The call fits once the `calls`-th newest admitted call has left the window.
        blocking = self._times[len(self._times) - limit.calls]
        return blocking + limit.seconds - now

    def _prune(self, now: float) -> None:
        longest = max((limit.seconds for limit in self.limits), default=0.0)
        keep_from = bisect.bisect_right(self._times, now - longest)
        if keep_from:
            del self._times[:keep_from]


def retry_after_header(wait_seconds: float) -> str:
    """Whole seconds, rounded up and at least 1, so a client that waits exactly this long gets in."""
    return str(max(1, math.ceil(wait_seconds)))


# --- configuration and faults ----------------------------------------------------------------------


@dataclass(frozen=True)
class MdeConfig:
    """What `POST /_emulator/config` may change; `reset` restores the command-line values."""

    rate_limits: tuple[RateLimit, ...] = field(default_factory=lambda: parse_rate_limits(DEFAULT_RATE_LIMITS))
    patch_rate_limits: tuple[RateLimit, ...] = field(
        default_factory=lambda: parse_rate_limits(DEFAULT_PATCH_RATE_LIMITS)
    )
    max_batch: int = DEFAULT_MAX_BATCH
    unknown_ids: frozenset[str] = frozenset()
    accepted_audiences: frozenset[str] = frozenset({DEFAULT_AUDIENCE})
    extra_determinations: frozenset[str] = frozenset()

    def to_json(self) -> dict[str, Any]:
        return {
            "rateLimits": format_rate_limits(self.rate_limits),
            "patchRateLimits": format_rate_limits(self.patch_rate_limits),
            "maxBatch": self.max_batch,
            "unknownIds": sorted(self.unknown_ids),
            "acceptedAudiences": sorted(self.accepted_audiences),
            "extraDeterminations": sorted(self.extra_determinations),
        }

    def updated(self, fields: Mapping[str, Any]) -> MdeConfig:
        """A copy with the given JSON fields applied; ValueError names the first bad field."""
        unknown = sorted(set(fields) - set(_CONFIG_PARSERS))
        if unknown:
            raise ValueError(f"Unknown config field(s): {', '.join(unknown)}.")
        changes = {_CONFIG_ATTRS[name]: _CONFIG_PARSERS[name](value) for name, value in fields.items()}
        return replace(self, **changes)


def _parse_limits_field(name: str) -> Callable[[Any], tuple[RateLimit, ...]]:
    def parse(value: Any) -> tuple[RateLimit, ...]:
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string like '10/60,500/3600' ('' for none).")
        try:
            return parse_rate_limits(value)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from exc

    return parse


def _parse_max_batch(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError("maxBatch must be a positive integer.")
    return value


def _parse_string_set(name: str) -> Callable[[Any], frozenset[str]]:
    def parse(value: Any) -> frozenset[str]:
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise ValueError(f"{name} must be a list of strings.")
        return frozenset(value)

    return parse


_CONFIG_PARSERS: dict[str, Callable[[Any], Any]] = {
    "rateLimits": _parse_limits_field("rateLimits"),
    "patchRateLimits": _parse_limits_field("patchRateLimits"),
    "maxBatch": _parse_max_batch,
    "unknownIds": _parse_string_set("unknownIds"),
    "acceptedAudiences": _parse_string_set("acceptedAudiences"),
    "extraDeterminations": _parse_string_set("extraDeterminations"),
}
_CONFIG_ATTRS = {
    "rateLimits": "rate_limits",
    "patchRateLimits": "patch_rate_limits",
    "maxBatch": "max_batch",
    "unknownIds": "unknown_ids",
    "acceptedAudiences": "accepted_audiences",
    "extraDeterminations": "extra_determinations",
}


@dataclass(frozen=True)
class Fault:
    """One scripted misbehaviour, consumed by the next admitted call (see README: fault injection).

    With `api` set ("batchUpdate" or "patch") only a call of that API takes it, so a test can aim a
    fault at one channel while the other keeps flowing; without it, the next call of either API does.
    With `tenant_id` set only a call of that tenant takes it.
    `delay_seconds` is slept first. Then `status` answers that error; `reset` aborts the connection
    (after processing the update if `apply`); otherwise the call is processed normally (`apply`, the
    default for a pure delay) or answered 200 without touching any alert (`apply: false`).
    """

    raw: dict[str, Any]
    status: int | None = None
    code: str | None = None
    message: str | None = None
    retry_after: float | None = None
    delay_seconds: float = 0.0
    reset: bool = False
    apply: bool = True
    api: str | None = None
    tenant_id: str | None = None

    def meant_for(self, api: str, tenant_id: str | None = None) -> bool:
        return (self.api is None or self.api == api) and (
            self.tenant_id is None or self.tenant_id == tenant_id
        )


def parse_fault(raw: Any) -> Fault:
    """Validate one fault object up front, so a typo fails the test that scripted it, not a later one."""
    if not isinstance(raw, dict):
        raise ValueError("Each fault must be a JSON object.")
    unknown = sorted(set(raw) - FAULT_KEYS)
    if unknown:
        raise ValueError(f"Unknown fault field(s): {', '.join(unknown)}.")
    status, reset = raw.get("status"), raw.get("reset", False)
    if status is None and not reset and "delaySeconds" not in raw:
        raise ValueError("A fault needs 'status', 'reset' or 'delaySeconds'.")
    if status is not None and reset:
        raise ValueError("A fault cannot have both 'status' and 'reset'.")
    if status is not None and "apply" in raw:
        raise ValueError("'apply' makes no sense with 'status': an error answer never applies the update.")
    return Fault(
        raw=dict(raw),
        status=_fault_status(status),
        code=_optional_str(raw, "code"),
        message=_optional_str(raw, "message"),
        retry_after=_optional_seconds(raw, "retryAfter"),
        delay_seconds=_optional_seconds(raw, "delaySeconds") or 0.0,
        reset=_bool(raw, "reset", False),
        apply=_bool(raw, "apply", not reset),
        api=_fault_api(raw.get("api")),
        tenant_id=_fault_tenant(raw.get("tenantId")),
    )


def _fault_tenant(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not is_guid(value):
        raise ValueError("A fault 'tenantId' must be a tenant GUID (or left out for any tenant).")
    return value.lower()


def is_guid(text: str) -> bool:
    return GUID.fullmatch(text) is not None


def _fault_api(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or value not in FAULT_APIS:
        raise ValueError(f"A fault 'api' must be one of {', '.join(FAULT_APIS)} (or left out for either).")
    return value


def _fault_status(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 400 <= value <= 599:
        raise ValueError("A fault 'status' must be an integer from 400 to 599.")
    return value


def _optional_str(raw: Mapping[str, Any], key: str) -> str | None:
    value = raw.get(key)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"A fault '{key}' must be a string.")
    return value


def _optional_seconds(raw: Mapping[str, Any], key: str) -> float | None:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 3600:
        raise ValueError(f"A fault '{key}' must be a number of seconds from 0 to 3600.")
    return float(value)


def _bool(raw: Mapping[str, Any], key: str, default: bool) -> bool:
    value = raw.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"A fault '{key}' must be a boolean.")
    return value


def fault_error(fault: Fault) -> ApiError:
    """The error answer a status fault scripts, with sensible default codes and messages."""
    assert fault.status is not None
    status = fault.status
    code = fault.code or DEFAULT_FAULT_CODES.get(
        status, "BadRequest" if status < 500 else "InternalServerError"
    )
    message = fault.message or DEFAULT_FAULT_MESSAGES.get(status, f"Scripted fault: HTTP {status}.")
    retry_after = fault.retry_after if fault.retry_after is not None else (1.0 if status == 429 else None)
    headers = {} if retry_after is None else {"Retry-After": str(math.ceil(retry_after))}
    return ApiError(status, code, message, headers)


# --- calls and alerts --------------------------------------------------------------------------------


@dataclass
class CallRecord:
    """Everything a test may want to know about one call, including what it was answered.

    `api` is the emulated API the call addressed (`API_UNKNOWN` for a 404/405 route error), so tests
    and benchmarks can count calls per API; `path_alert_id` is a PATCH call's alert id. `time` is
    `time.monotonic()` in this process; on Linux that is the system-wide CLOCK_MONOTONIC, so it
    compares with the test process's own monotonic clock. `status` stays None until answered (a
    delayed call in flight) and for a call whose connection was reset (`aborted`). `tenant_id` is the
    valid token's tenant (None when the call was refused before its token was accepted).
    """

    seq: int
    time: float
    wall_time: float
    method: str
    path: str
    authorization: str | None
    content_type: str | None
    body: str
    json: Any
    ignored_keys: list[str]
    api: str = API_UNKNOWN
    path_alert_id: str | None = None
    admitted: bool = False
    client_id: str | None = None
    tenant_id: str | None = None
    fault: dict[str, Any] | None = None
    status: int | None = None
    error_code: str | None = None
    aborted: bool = False

    @property
    def alert_ids(self) -> list[str]:
        """The alert ids the call named: PATCH's path id, else the strings in the body's `alertIds`."""
        if self.path_alert_id is not None:
            return [self.path_alert_id]
        ids = self.json.get("alertIds") if isinstance(self.json, dict) else None
        return [item for item in ids if isinstance(item, str)] if isinstance(ids, list) else []

    def to_json(self) -> dict[str, Any]:
        """The record for `/_emulator/calls`; `alertIds` reads the same for every API (see `alert_ids`)."""
        return {
            "seq": self.seq,
            "api": self.api,
            "alertIds": self.alert_ids,
            "time": self.time,
            "wallTime": self.wall_time,
            "method": self.method,
            "path": self.path,
            "authorization": self.authorization,
            "contentType": self.content_type,
            "body": self.body,
            "json": self.json,
            "ignoredKeys": self.ignored_keys,
            "admitted": self.admitted,
            "clientId": self.client_id,
            "tenantId": self.tenant_id,
            "fault": self.fault,
            "status": self.status,
            "errorCode": self.error_code,
            "aborted": self.aborted,
        }


@dataclass(frozen=True)
class AlertComment:
    """One comment on an alert: its text, when it was applied (ISO-8601 UTC) and by which call."""

    comment: str
    created_time: str
    seq: int


@dataclass
class AlertState:
    """An alert as far as batchUpdate and PATCH can change it; comments accumulate, as in MDE (FACTS §5).

    Both APIs update the same state, so a test can check each comment landed exactly once per alert
    whichever way it was sent. `update_seqs` lists the seqs of the calls (of either API) that applied.
    """

    id: str
    status: str | None = None
    classification: str | None = None
    determination: str | None = None
    assigned_to: str | None = None
    comments: list[AlertComment] = field(default_factory=list)
    update_seqs: list[int] = field(default_factory=list)

    def _fields(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "status": self.status,
            "classification": self.classification,
            "determination": self.determination,
            "assignedTo": self.assigned_to,
        }

    def to_json(self) -> dict[str, Any]:
        """The control API's view: `comments` stays a list of strings; `commentEntries` adds when/which."""
        return {
            **self._fields(),
            "comments": [entry.comment for entry in self.comments],
            "commentEntries": [
                {"comment": entry.comment, "createdTime": entry.created_time, "seq": entry.seq}
                for entry in self.comments
            ],
            "updateSeqs": self.update_seqs,
        }

    def entity(self) -> dict[str, Any]:
        """The alert entity PATCH answers with: the fields it can change, comments as MDE lists them."""
        return {
            **self._fields(),
            "comments": [
                {"comment": entry.comment, "createdTime": entry.created_time} for entry in self.comments
            ],
        }


@dataclass(frozen=True)
class Update:
    """A validated update of either API: which alerts, and the properties it sets (None = left out)."""

    alert_ids: list[str]
    status: str | None
    classification: str | None
    determination: str | None
    assigned_to: str | None
    comment: str | None


def _parse_json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _ignored_keys(parsed: Any, api: str) -> list[str]:
    if not isinstance(parsed, dict):
        return []
    known = PATCH_FIELDS if api == API_PATCH else KNOWN_FIELDS
    return [key for key in parsed if key not in known]


def _body_object(record: CallRecord) -> dict[str, Any]:
    if not (record.content_type or "").lower().startswith("application/json"):
        raise ApiError(400, "InvalidRequestBody", "Content-Type must be application/json.")
    if not isinstance(record.json, dict):
        raise ApiError(400, "InvalidRequestBody", "The request body must be a JSON object.")
    return record.json


def _alert_ids(body: Mapping[str, Any], max_batch: int) -> list[str]:
    ids = body.get("alertIds")
    if ids is None or ids == []:
        raise ApiError(400, "MissingRequiredParameter", "Missing required parameter: alertIds.")
    if not isinstance(ids, list) or not all(isinstance(item, str) for item in ids):
        raise ApiError(400, "InvalidInput", "alertIds must be a list of strings.")
    if len(ids) > max_batch:
        message = f"Maximum batch size exceeded. Received: {len(ids)}, allowed: {max_batch}"
        raise ApiError(400, "MaximumBatchSizeExceeded", message)
    return ids


def _enum_field(body: Mapping[str, Any], name: str, allowed: tuple[str, ...] | frozenset[str]) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or value not in allowed:
        shown = ", ".join(sorted(allowed))
        raise ApiError(400, "InvalidInput", f"Invalid value {value!r} for '{name}'. Allowed values: {shown}.")
    return value


def _text_field(body: Mapping[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise ApiError(400, "InvalidInput", f"'{name}' must be a string.")
    return value


def validate_update(record: CallRecord, config: MdeConfig) -> Update:
    """Steps 5-9 of the brief, in order; raises the first ApiError that applies.

    PATCH takes its one id from the path and skips the `alertIds` checks; everything else (body,
    enums, unknown ids last) is the same for both APIs.
    """
    body = _body_object(record)
    path_id = record.path_alert_id
    ids = [path_id] if path_id is not None else _alert_ids(body, config.max_batch)
    update = Update(
        alert_ids=ids,
        status=_enum_field(body, "status", STATUSES),
        classification=_enum_field(body, "classification", CLASSIFICATIONS),
        determination=_enum_field(
            body, "determination", frozenset(DETERMINATIONS) | config.extra_determinations
        ),
        assigned_to=_text_field(body, "assignedTo"),
        comment=_text_field(body, "comment"),
    )
    unknown = [alert_id for alert_id in ids if alert_id in config.unknown_ids]
    if unknown and record.path_alert_id is not None:
        raise ApiError(404, "NotFound", f"Alert not found: {record.path_alert_id}. Nothing was updated.")
    if unknown:
        raise ApiError(404, "NotFound", f"Alert(s) not found: {', '.join(unknown)}. Nothing was updated.")
    return update


def _now_iso() -> str:
    """The current UTC time as MDE writes it, e.g. `2024-05-01T12:00:00.123456Z`."""
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


# --- the emulator ------------------------------------------------------------------------------------


@dataclass
class TenantState:
    """One tenant's alerts and budgets: MDE's limits and alerts are per application and tenant."""

    alerts: dict[str, AlertState]
    # One limiter per API: how MDE counts the two APIs against each other is undocumented.
    limiters: dict[str, SlidingWindowLimiter]


class MdeEmulator:
    """State and handlers of the MDE emulator; one instance per process, used from one event loop only.

    Handlers never await between a check and the state change it guards, so no locks are needed. State is
    kept per tenant (`tenants`, created on a tenant's first admitted call); `home_tenant_id` is the tenant
    control routes answer for when they are not told one.
    """

    def __init__(
        self, registry: TokenRegistry, defaults: MdeConfig, *, home_tenant_id: str = HOME_TENANT_ID
    ) -> None:
        self.registry = registry
        self._defaults = defaults
        self.home_tenant_id = home_tenant_id.lower()
        self._clear()

    def _clear(self) -> None:
        # Fresh containers (not .clear()) so a call still sleeping in a delay fault cannot touch them.
        self.config = self._defaults
        self.calls: list[CallRecord] = []
        self.faults: deque[Fault] = deque()
        self.tenants: dict[str, TenantState] = {}
        # A tenant's own limits, by API (`API_BATCH_UPDATE`, `API_PATCH`); others follow `config`.
        self.tenant_limits: dict[str, dict[str, tuple[RateLimit, ...]]] = {}
        self._seq = 0

    @property
    def alerts(self) -> dict[str, AlertState]:
        """The home tenant's alerts (what the emulator kept before it knew tenants)."""
        state = self.tenants.get(self.home_tenant_id)
        return {} if state is None else state.alerts

    def limits(self, tenant_id: str, api: str) -> tuple[RateLimit, ...]:
        """The windows of `api` in `tenant_id`: its own if set, else the configured ones."""
        own = self.tenant_limits.get(tenant_id, {}).get(api)
        if own is not None:
            return own
        return self.config.rate_limits if api == API_BATCH_UPDATE else self.config.patch_rate_limits

    def tenant(self, tenant_id: str) -> TenantState:
        """That tenant's state, created with fresh budgets the first time it is needed."""
        state = self.tenants.get(tenant_id)
        if state is None:
            apis = (API_BATCH_UPDATE, API_PATCH)
            limiters = {api: SlidingWindowLimiter(self.limits(tenant_id, api)) for api in apis}
            state = self.tenants[tenant_id] = TenantState(alerts={}, limiters=limiters)
        return state

    def _state_of(self, record: CallRecord) -> TenantState:
        assert record.tenant_id is not None, "a call's tenant is known once its token is accepted"
        return self.tenant(record.tenant_id)

    def _refresh_limits(self) -> None:
        """After a config change: every limiter gets its current limits (its log of calls stays)."""
        for tenant_id, state in self.tenants.items():
            for api, limiter in state.limiters.items():
                limiter.limits = self.limits(tenant_id, api)

    def app(self) -> web.Application:
        """Control routes first (matched in order), then every other request goes to `handle`."""
        app = web.Application()
        app.router.add_post("/_emulator/reset", self.reset)
        app.router.add_get("/_emulator/calls", self.get_calls)
        app.router.add_get("/_emulator/faults", self.get_faults)
        app.router.add_post("/_emulator/faults", self.add_faults)
        app.router.add_get("/_emulator/config", self.get_config)
        app.router.add_post("/_emulator/config", self.set_config)
        app.router.add_get("/_emulator/alerts", self.get_alerts)
        app.router.add_get("/_emulator/alerts/{alert_id}", self.get_alert)
        app.router.add_get("/_emulator/tenants", self.get_tenants)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    # The emulated API.

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Record, then answer: wrong route, 401, 429, scripted fault, validation error or 200."""
        text = (await request.read()).decode("utf-8", errors="replace")
        route = resolve_route(request.method, request.path, request.rel_url.raw_path)
        record = self._record(request, text, route)
        try:
            if route.error is not None:
                raise route.error
            self._authenticate(request, record)
            self._admit(record)
            fault = self._take_fault(record.api, record.tenant_id)
            if fault is not None:
                return await self._run_fault(request, record, fault)
            self._apply(validate_update(record, self.config), record)
        except ApiError as err:
            return self._answer_error(request, record, err)
        return self._answer_ok(request, record)

    def _record(self, request: web.Request, text: str, route: Route) -> CallRecord:
        self._seq += 1
        parsed = _parse_json(text)
        record = CallRecord(
            seq=self._seq,
            time=time.monotonic(),
            wall_time=time.time(),
            method=request.method,
            path=request.path,
            authorization=request.headers.get("Authorization"),
            content_type=request.headers.get("Content-Type"),
            body=text,
            json=parsed,
            ignored_keys=_ignored_keys(parsed, route.api),
            api=route.api,
            path_alert_id=route.alert_id,
        )
        self.calls.append(record)
        return record

    def _authenticate(self, request: web.Request, record: CallRecord) -> None:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _unauthorized("The Authorization header must be 'Bearer <token>'.")
        try:
            issued = self.registry.validate(token.strip(), self.config.accepted_audiences, time.time())
        except TokenRejected as exc:
            raise _unauthorized(str(exc)) from exc
        record.client_id = issued.client_id
        record.tenant_id = issued.tenant_id.lower()

    def _admit(self, record: CallRecord) -> None:
        wait = self._state_of(record).limiters[record.api].try_admit(record.time)
        if wait is not None:
            seconds = retry_after_header(wait)
            message = f"Rate limit is exceeded. Try again in {seconds} seconds."
            raise ApiError(429, "TooManyRequests", message, {"Retry-After": seconds})
        record.admitted = True

    def _take_fault(self, api: str, tenant_id: str | None) -> Fault | None:
        """Remove and return the first queued fault this API's (and tenant's) call may take (FIFO otherwise)."""
        for index, fault in enumerate(self.faults):
            if fault.meant_for(api, tenant_id):
                del self.faults[index]
                return fault
        return None

    async def _run_fault(self, request: web.Request, record: CallRecord, fault: Fault) -> web.StreamResponse:
        record.fault = fault.raw
        calls_before_sleep = self.calls
        if fault.delay_seconds:
            await asyncio.sleep(fault.delay_seconds)
        if self.calls is not calls_before_sleep:
            return self._abort(request, record)  # reset while sleeping: this call belongs to the past
        if fault.status is not None:
            raise fault_error(fault)
        if fault.reset:
            if fault.apply:
                self._apply_quietly(record)
            return self._abort(request, record)
        if fault.apply:
            self._apply(validate_update(record, self.config), record)
        return self._answer_ok(request, record)

    def _apply_quietly(self, record: CallRecord) -> None:
        """Apply before a reset fault; a validation error is noted in the record but never answered."""
        try:
            self._apply(validate_update(record, self.config), record)
        except ApiError as err:
            record.error_code = err.code

    def _apply(self, update: Update, record: CallRecord) -> None:
        created_time = _now_iso()
        alerts = self._state_of(record).alerts
        for alert_id in update.alert_ids:
            alert = alerts.setdefault(alert_id, AlertState(id=alert_id))
            alert.status = update.status or alert.status
            alert.classification = update.classification or alert.classification
            alert.determination = update.determination or alert.determination
            alert.assigned_to = update.assigned_to if update.assigned_to is not None else alert.assigned_to
            if update.comment is not None:
                alert.comments.append(AlertComment(update.comment, created_time, record.seq))
            alert.update_seqs.append(record.seq)

    def _answer_ok(self, request: web.Request, record: CallRecord) -> web.Response:
        """batchUpdate: 200 with an empty body. PATCH: 200 with the alert entity as it now stands."""
        record.status = 200
        request[LOG_DETAIL] = _log_detail(record)
        if record.path_alert_id is None:
            return web.Response(status=200)
        alert = self._state_of(record).alerts.get(record.path_alert_id) or AlertState(id=record.path_alert_id)
        return web.json_response(alert.entity())

    def _answer_error(self, request: web.Request, record: CallRecord, err: ApiError) -> web.Response:
        record.status, record.error_code = err.status, err.code
        request[LOG_DETAIL] = _log_detail(record)
        return web.json_response(error_body(err.code, err.message), status=err.status, headers=err.headers)

    def _abort(self, request: web.Request, record: CallRecord) -> web.Response:
        """Drop the TCP connection with a RST and no HTTP answer (the client sees ECONNRESET)."""
        record.aborted = True
        request[LOG_DETAIL] = _log_detail(record)
        transport = request.transport
        if transport is not None:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        return web.Response(status=200)  # never sent: the transport is gone

    # The control API.

    async def reset(self, request: web.Request) -> web.Response:
        self._clear()
        return web.json_response({"reset": True, "config": self.config.to_json()})

    async def get_calls(self, request: web.Request) -> web.Response:
        """Every tenant's calls, or only those of `?tenantId=`."""
        tenant_id = _tenant_query(request)
        calls = [record for record in self.calls if tenant_id is None or record.tenant_id == tenant_id]
        return web.json_response({"calls": [record.to_json() for record in calls]})

    async def get_faults(self, request: web.Request) -> web.Response:
        return web.json_response({"faults": [fault.raw for fault in self.faults]})

    async def add_faults(self, request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.text())
            if not isinstance(body, list):
                raise ValueError("The body must be a JSON list of fault objects.")
            faults = [parse_fault(item) for item in body]
        except ValueError as exc:  # JSONDecodeError is a ValueError
            raise bad_request(str(exc)) from exc
        self.faults.extend(faults)
        return web.json_response({"pending": len(self.faults)})

    async def get_config(self, request: web.Request) -> web.Response:
        """The configuration, or with `?tenantId=` that tenant's limits."""
        tenant_id = _tenant_query(request)
        if tenant_id is not None:
            return web.json_response(self._tenant_config_json(tenant_id))
        return web.json_response({"config": self.config.to_json()})

    async def set_config(self, request: web.Request) -> web.Response:
        """Change the configuration; with `tenantId` in the body, that tenant's own limits only."""
        body = await read_json_object(request)
        if "tenantId" in body:
            return self._set_tenant_config(body)
        try:
            self.config = self.config.updated(body)
        except ValueError as exc:
            raise bad_request(str(exc)) from exc
        self._refresh_limits()
        return web.json_response({"config": self.config.to_json()})

    def _set_tenant_config(self, body: dict[str, Any]) -> web.Response:
        """`{"tenantId", "rateLimits"?, "patchRateLimits"?}`; a null limit goes back to the configured one."""
        tenant_id = _tenant_value(body.pop("tenantId"), "tenantId")
        unknown = sorted(set(body) - set(TENANT_CONFIG_FIELDS))
        if unknown:
            raise bad_request(
                f"Only {', '.join(TENANT_CONFIG_FIELDS)} can be set per tenant; not {', '.join(unknown)}."
            )
        own = dict(self.tenant_limits.get(tenant_id, {}))
        for name, value in body.items():
            api = TENANT_CONFIG_FIELDS[name]
            if value is None:
                own.pop(api, None)
                continue
            try:
                own[api] = _CONFIG_PARSERS[name](value)
            except ValueError as exc:
                raise bad_request(str(exc)) from exc
        if own:
            self.tenant_limits[tenant_id] = own
        else:
            self.tenant_limits.pop(tenant_id, None)
        self._refresh_limits()
        return web.json_response(self._tenant_config_json(tenant_id))

    def _tenant_config_json(self, tenant_id: str) -> dict[str, Any]:
        own = self.tenant_limits.get(tenant_id, {})
        return {
            "tenantId": tenant_id,
            "config": {
                "rateLimits": format_rate_limits(self.limits(tenant_id, API_BATCH_UPDATE)),
                "patchRateLimits": format_rate_limits(self.limits(tenant_id, API_PATCH)),
            },
            "own": [name for name, api in TENANT_CONFIG_FIELDS.items() if api in own],
        }

    async def get_alerts(self, request: web.Request) -> web.Response:
        """The home tenant's alerts, or `?tenantId=`'s."""
        state = self.tenants.get(_tenant_query(request) or self.home_tenant_id)
        alerts = {} if state is None else state.alerts
        return web.json_response({"alerts": {key: alert.to_json() for key, alert in alerts.items()}})

    async def get_alert(self, request: web.Request) -> web.Response:
        state = self.tenants.get(_tenant_query(request) or self.home_tenant_id)
        alert = None if state is None else state.alerts.get(request.match_info["alert_id"])
        if alert is None:
            return web.json_response(error_body("NotFound", "This alert was never updated."), status=404)
        return web.json_response(alert.to_json())

    async def get_tenants(self, request: web.Request) -> web.Response:
        """Every tenant seen or configured: its limits, how many calls it made and alerts it changed."""
        known = sorted(set(self.tenants) | set(self.tenant_limits) | {self.home_tenant_id})
        tenants: dict[str, Any] = {}
        for tenant_id in known:
            state = self.tenants.get(tenant_id)
            view = self._tenant_config_json(tenant_id)
            tenants[tenant_id] = {
                **view["config"],
                "own": view["own"],
                "calls": sum(record.tenant_id == tenant_id for record in self.calls),
                "alerts": 0 if state is None else len(state.alerts),
            }
        return web.json_response({"homeTenantId": self.home_tenant_id, "tenants": tenants})


def _tenant_value(value: Any, name: str) -> str:
    if not isinstance(value, str) or not is_guid(value):
        raise bad_request(f"{name} must be a tenant GUID.")
    return value.lower()


def _tenant_query(request: web.Request) -> str | None:
    """The `tenantId` query parameter (a GUID, lower-cased), or None when there is none."""
    value = request.query.get("tenantId")
    return None if value is None else _tenant_value(value, "tenantId")


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, "Unauthorized", message, {"WWW-Authenticate": 'Bearer error="invalid_token"'})


def _log_detail(record: CallRecord) -> str:
    count = len(record.alert_ids)
    outcome = "aborted" if record.aborted else (record.error_code or "ok")
    fault = " fault" if record.fault is not None else ""
    return f"seq={record.seq} ids={count} {outcome}{fault}"
