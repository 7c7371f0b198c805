"""The batchUpdate body: strict validation and one canonical form (docs/contracts.md §1, docs/mde-api.md §3).

MDE's body is case-sensitive and silently ignores a field it does not know (`Status` is dropped, the
alert stays open), so a typo in a playbook would "succeed" and change nothing. alertgate therefore
matches field names and enum values case-insensitively, maps every documented alias to one canonical
value, rejects anything it does not know, and sends only MDE's exact spelling.

Validation is written out here rather than with a schema library: the rules (case-insensitive names,
aliases, retired values, code-point lengths, Unicode categories, every broken rule reported at once with
its field) would need as much custom code on top of one, and this keeps cold start free of it.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from shared.errors import FieldError, RequestRejected

STATUS_VALUES = ("New", "InProgress", "Resolved")
CLASSIFICATION_VALUES = ("Unknown", "FalsePositive", "TruePositive", "InformationalExpectedActivity")
DETERMINATION_VALUES = (
    # true positive
    "MultiStagedAttack",
    "MaliciousUserActivity",
    "CompromisedUser",
    "Malware",
    "Phishing",
    "UnwantedSoftware",
    "Other",
    # informational, expected activity
    "SecurityTesting",
    "LineOfBusinessApplication",
    "ConfirmedActivity",
    # false positive
    "NotMalicious",
    "InsufficientData",
)
CLASSIFICATION_ALIASES = {"Informational, expected activity": "InformationalExpectedActivity"}
DETERMINATION_ALIASES = {
    "ConfirmedUserActivity": "ConfirmedActivity",
    "Clean": "NotMalicious",
    "NoEnoughDataToValidate": "InsufficientData",
    "CompromisedAccount": "CompromisedUser",
}
RETIRED_DETERMINATIONS = {
    "Apt": "deprecated by Microsoft in 2022",
    "SecurityPersonnel": "deprecated by Microsoft in 2022",
    "NotAvailable": "belongs to the old determination list only",
}
ALL_CANONICAL_VALUES = frozenset(STATUS_VALUES + CLASSIFICATION_VALUES + DETERMINATION_VALUES)

# Outbound order follows Microsoft's documented example.
FIELD_ORDER = ("alertIds", "status", "assignedTo", "classification", "determination", "comment")
UPDATE_FIELDS = FIELD_ORDER[1:]
_FIELD_BY_LOWER = {name.lower(): name for name in FIELD_ORDER}
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def ascii_lower(text: str) -> str:
    """Lower-case A-Z only. MDE's field names and values are ASCII, so "case-insensitive" means ASCII
    case: a character that Unicode lower-cases to an ASCII letter (the Kelvin sign to k) is a look-alike,
    not a spelling of the name, and is refused rather than taken for it."""
    return text.translate(_ASCII_LOWER)


ASSIGNED_TO_MAX = 256
COMMENT_MAX = 8000
MAX_LISTED_ERRORS = 100

_GUID = r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}"
_FOREIGN_ALERT_IDS = (
    (re.compile(rf"fa{_GUID}", re.ASCII), "an Office 365 alert id (fa + GUID)"),
    (re.compile(rf"ca{_GUID}", re.ASCII), "a Microsoft Defender for Cloud Apps alert id (ca + GUID)"),
)
_COMMENT_ALLOWED_CONTROLS = frozenset("\n\r\t")


@dataclass(frozen=True)
class ValidationRules:
    """What the settings decide about validation; kept apart so the model needs no settings object."""

    alert_id_pattern: re.Pattern[str]
    max_alerts_per_request: int


@dataclass(frozen=True)
class AlertUpdate:
    """The properties to set, in canonical spelling; None means "leave it as it is"."""

    status: str | None = None
    assigned_to: str | None = None
    classification: str | None = None
    determination: str | None = None
    comment: str | None = None

    def fields(self) -> dict[str, str]:
        """The set properties under MDE's field names, in MDE's order."""
        values = {
            "status": self.status,
            "assignedTo": self.assigned_to,
            "classification": self.classification,
            "determination": self.determination,
            "comment": self.comment,
        }
        return {name: value for name, value in values.items() if value is not None}


@dataclass(frozen=True)
class BatchUpdate:
    """A validated request: distinct alert ids in the order given, and one update for all of them."""

    alert_ids: tuple[str, ...]
    update: AlertUpdate

    def canonical_body(self) -> dict[str, Any]:
        return {"alertIds": list(self.alert_ids), **self.update.fields()}

    def digest(self) -> str:
        """A stable fingerprint of what this request asks for (ids as a set, fields canonical)."""
        payload = {"alertIds": sorted(self.alert_ids), **self.update.fields()}
        text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()


def outbound_body(
    alert_ids: Iterable[str], fields: Mapping[str, str], overrides: Mapping[str, str]
) -> dict[str, Any]:
    """MDE's body for one call: canonical values, each replaced by the operator's override if any."""
    body: dict[str, Any] = {"alertIds": list(alert_ids)}
    for name, value in fields.items():
        body[name] = overrides.get(value, value) if name in _ENUM_FIELDS else value
    return body


# --- parsing the envelope ------------------------------------------------------------------------


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def is_json_media_type(content_type: str | None) -> bool:
    if not content_type:
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def parse_json_body(body: bytes, content_type: str | None, max_body_bytes: int) -> Any:
    """Bytes → JSON value, answering 413, 415 or 400 with a problem that says what is wrong."""
    if len(body) > max_body_bytes:
        raise RequestRejected(
            413,
            "Request body too large",
            f"The body is {len(body)} bytes; alertgate accepts at most {max_body_bytes} (MAX_BODY_BYTES). "
            "Split the alert ids over several requests.",
            [FieldError("body", f"must be at most {max_body_bytes} bytes")],
        )
    if not is_json_media_type(content_type):
        raise RequestRejected(
            415,
            "Unsupported media type",
            f"Content-Type must be application/json, got {content_type or 'none'}.",
            [FieldError("Content-Type", "must be application/json")],
        )
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _bad_json(f"the body is not UTF-8 (byte {exc.start})") from None
    try:
        return json.loads(text, object_pairs_hook=_reject_duplicate_keys)
    except _DuplicateKey as exc:
        raise RequestRejected(
            400,
            "Invalid request",
            f"The field {exc.key!r} is given twice.",
            [FieldError(exc.key, "must be given only once")],
        ) from None
    except json.JSONDecodeError as exc:
        raise _bad_json(f"{exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise _bad_json("the JSON is nested too deeply") from None


def _bad_json(reason: str) -> RequestRejected:
    return RequestRejected(
        400,
        "Invalid JSON",
        f"The body is not valid JSON: {reason}.",
        [FieldError("body", "must be valid JSON")],
    )


# --- validating the batchUpdate object ------------------------------------------------------------


class _Errors:
    """Collects broken rules, naming each field as the caller spelled it (`Status`, `AlertIDs[2]`)."""

    def __init__(self) -> None:
        self.items: list[FieldError] = []
        self.given_as: dict[str, str] = {}

    def add(self, field: str, message: str, *, literal: bool = False) -> None:
        if not literal:
            head, bracket, rest = field.partition("[")
            field = self.given_as.get(head, head) + bracket + rest
        self.items.append(FieldError(field, message))


def validate_batch_update(document: Any, rules: ValidationRules) -> BatchUpdate:
    """Check every rule of docs/contracts.md §1 and return the canonical request, or raise listing every problem."""
    errors = _Errors()
    if not isinstance(document, dict):
        errors.add("body", f"must be a JSON object, not {json_type(document)}")
        raise _invalid(errors.items)
    fields = _match_field_names(document, errors)
    alert_ids = _validate_alert_ids(fields.get("alertIds", _MISSING), rules, errors)
    update = AlertUpdate(
        status=_enum_value(fields, "status", STATUS_VALUES, {}, errors),
        assigned_to=_text_value(fields, "assignedTo", ASSIGNED_TO_MAX, frozenset(), errors),
        classification=_enum_value(
            fields, "classification", CLASSIFICATION_VALUES, CLASSIFICATION_ALIASES, errors
        ),
        determination=_enum_value(
            fields, "determination", DETERMINATION_VALUES, DETERMINATION_ALIASES, errors
        ),
        comment=_text_value(fields, "comment", COMMENT_MAX, _COMMENT_ALLOWED_CONTROLS, errors),
    )
    if not any(name in fields for name in UPDATE_FIELDS):
        errors.add("body", f"must set at least one of {', '.join(UPDATE_FIELDS)}")
    if errors.items:
        raise _invalid(errors.items)
    return BatchUpdate(alert_ids=alert_ids, update=update)


_MISSING = object()
_ENUM_FIELDS = frozenset({"status", "classification", "determination"})


def _invalid(items: list[FieldError]) -> RequestRejected:
    shown = items[:MAX_LISTED_ERRORS]
    if len(items) > MAX_LISTED_ERRORS:
        shown.append(FieldError("body", f"{len(items) - MAX_LISTED_ERRORS} more problems not listed"))
    summary = "; ".join(f"{e.field}: {e.message}" for e in items[:3])
    more = f" (and {len(items) - 3} more)" if len(items) > 3 else ""
    return RequestRejected(400, "Invalid request", f"{len(items)} problem(s): {summary}{more}.", shown)


def json_type(value: Any) -> str:
    """How a JSON value's type reads in an error message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _match_field_names(document: dict[str, Any], errors: _Errors) -> dict[str, Any]:
    """Map each given name to MDE's spelling; unknown names and case-collisions are errors."""
    fields: dict[str, Any] = {}
    given_as = errors.given_as
    for key, value in document.items():
        name = _FIELD_BY_LOWER.get(ascii_lower(key))
        if name is None:
            errors.add(
                key, f"is not a batchUpdate field (known fields: {', '.join(FIELD_ORDER)})", literal=True
            )
        elif name in fields:
            errors.add(
                key, f"repeats {given_as[name]!r}: field names are matched case-insensitively", literal=True
            )
        else:
            fields[name] = value
            given_as[name] = key
    return fields


def _validate_alert_ids(value: Any, rules: ValidationRules, errors: _Errors) -> tuple[str, ...]:
    if value is _MISSING:
        errors.add("alertIds", "is required: a non-empty array of MDE alert ids")
        return ()
    if not isinstance(value, list):
        errors.add("alertIds", f"must be an array of strings, not {json_type(value)}")
        return ()
    if not value:
        errors.add("alertIds", "must not be empty")
        return ()
    distinct: dict[str, None] = {}
    for index, item in enumerate(value):
        problem = _alert_id_problem(item, rules.alert_id_pattern)
        if problem:
            errors.add(f"alertIds[{index}]", problem)
        else:
            distinct.setdefault(item, None)
    if len(distinct) > rules.max_alerts_per_request:
        errors.add(
            "alertIds",
            f"holds {len(distinct)} distinct ids; at most {rules.max_alerts_per_request} are allowed per "
            "request (MAX_ALERTS_PER_REQUEST)",
        )
    return tuple(distinct)


def _alert_id_problem(item: Any, pattern: re.Pattern[str]) -> str | None:
    if not isinstance(item, str):
        return f"must be a string, not {json_type(item)}"
    for foreign, what in _FOREIGN_ALERT_IDS:
        if foreign.fullmatch(item):
            return (
                f"{item!r} is {what}, not a Microsoft Defender for Endpoint alert: MDE's batchUpdate "
                "can only update MDE alerts"
            )
    if not pattern.fullmatch(item):
        shown = item if len(item) <= 80 else item[:77] + "..."
        return (
            f"{shown!r} is not an MDE alert id: it must match ALERT_ID_PATTERN {pattern.pattern} "
            "(for example da637399794050273582_760707377)"
        )
    return None


def _given_string(fields: dict[str, Any], name: str, errors: _Errors) -> str | None:
    """The field's value if it was given as a string; None if absent or (reported) of another type."""
    if name not in fields:
        return None
    value = fields[name]
    if not isinstance(value, str):
        errors.add(name, f"must be a string, not {json_type(value)} (leave the field out to keep its value)")
        return None
    return value


def _enum_value(
    fields: dict[str, Any],
    name: str,
    values: tuple[str, ...],
    aliases: Mapping[str, str],
    errors: _Errors,
) -> str | None:
    value = _given_string(fields, name, errors)
    if value is None:
        return None
    lowered = ascii_lower(value)
    for canonical in values:
        if canonical.lower() == lowered:
            return canonical
    for alias, canonical in aliases.items():
        if alias.lower() == lowered:
            return canonical
    if name == "determination":
        for retired, why in RETIRED_DETERMINATIONS.items():
            if retired.lower() == lowered:
                errors.add(name, f"{value!r} is retired ({why}); use one of {', '.join(values)}")
                return None
    accepted = ", ".join(values)
    alias_note = f"; aliases {', '.join(aliases)}" if aliases else ""
    errors.add(name, f"{_short(value)!r} is not one of {accepted} (case-insensitive{alias_note})")
    return None


def _text_value(
    fields: dict[str, Any], name: str, max_length: int, allowed_controls: frozenset[str], errors: _Errors
) -> str | None:
    value = _given_string(fields, name, errors)
    if value is None:
        return None
    if not value:
        errors.add(name, "must not be empty (leave the field out to keep its value)")
        return None
    if len(value) > max_length:
        errors.add(name, f"is {len(value)} characters long; at most {max_length} are allowed")
        return None
    for position, char in enumerate(value):
        category = unicodedata.category(char)
        if category == "Cs":
            errors.add(name, f"holds an unpaired surrogate (\\u{ord(char):04x}) at character {position}")
            return None
        if category == "Cc" and char not in allowed_controls:
            allowed = " other than newline, carriage return and tab" if allowed_controls else ""
            errors.add(
                name,
                f"holds control character U+{ord(char):04X} at character {position}; "
                f"control characters{allowed} are not allowed",
            )
            return None
    return value


def _short(value: str) -> str:
    return value if len(value) <= 60 else value[:57] + "..."


def validate_idempotency_key(value: str | None) -> str | None:
    """The Idempotency-Key header: 1-255 visible ASCII characters, or absent."""
    if value is None:
        return None
    if not 1 <= len(value) <= 255 or not all("\x21" <= c <= "\x7e" for c in value):
        raise RequestRejected(
            400,
            "Invalid Idempotency-Key",
            "The Idempotency-Key header must be 1-255 visible ASCII characters (no spaces).",
            [FieldError("Idempotency-Key", "must be 1-255 visible ASCII characters")],
        )
    return value
