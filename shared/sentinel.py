"""A Microsoft Sentinel incident → one batchUpdate body for its MDE alerts (docs/contracts.md §1, docs/mde-api.md §7).

Sentinel closes an incident; its Microsoft Defender for Endpoint alerts stay open unless someone pushes
the closure to MDE. This module is the pure half of that push: it reads the incident as an automation
rule / incident trigger delivers it (`object.properties…`) or as a bare incident resource
(`properties…`), picks the MDE alerts, and plans one batchUpdate body with a derived idempotency key.
No I/O here, so every rule can be tested without a service.

Choices where docs/contracts.md §1 is silent (each is the safer of the options, and tested):

- Keys are read case-insensitively at every level, because Sentinel itself varies the casing
  (`alerts`/`Alerts`). A key given twice with different casings and *different* values is rejected
  (which one would be meant is a guess); the same value twice is accepted. JSON null means "absent".
- Incident status: `New`, `Active`, `Closed` (any casing). An unknown status is a 400 naming the field:
  leaving the status out would report success for a closure that changed nothing. An absent status
  leaves MDE's status as it is.
- Classification: one of Sentinel's four (any casing), else a 400 naming the field, for the same
  reason. A classification reason Sentinel does not document, or a pairing the mapping does not list
  (TruePositive/InaccurateData), falls back to the classification-alone rule: the reason refines a
  classification, it never changes what the classification says. The reason is still quoted in the
  comment as given. "No classification" uses the `Undetermined` rule, so one override covers both.
- An MDE alert (by `productName`) without a `providerAlertId` is a 400 naming the field: it cannot be
  updated, and silently leaving it open is what alertgate exists to prevent. Whether the id has MDE's
  shape is left to `validate_batch_update`, which knows ALERT_ID_PATTERN.
- An alert entry without a `properties` object is read from the entry itself (flattened forms).
- assignedTo: the first of owner UPN, owner email, SENTINEL_DEFAULT_ASSIGNEE that MDE would accept
  (1-256 code points, no control characters); a UPN that is too long falls back to the email, then to
  the default. A default that MDE would not accept is a SettingsError (configuration, not the request).
- Comment: lone surrogates (possible from JSON `\\ud800`) become U+FFFD, as MDE's body must be valid
  UTF-8; `comment_for` gives None only when the incident has none of the comment's parts at all.
- Idempotency key: `sentinel-` + SHA-256 of the lower-cased ARM id (ARM ids are case-insensitive) and
  lastModifiedTimeUtc normalised to UTC with every fractional digit kept (Sentinel gives 100 ns ticks).
  Without lastModifiedTimeUtc the fields that drive the update stand in for it, so a later change still
  gets a new key. The key is visible ASCII, so it is also a valid Idempotency-Key header.
- Outcome: "AlertsNotInPayload" only when alertsCount > 0 and the payload lists no alert at all; when it
  lists some alerts but fewer than alertsCount, the listed MDE alerts are updated.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

from shared.errors import FieldError, RequestRejected, SettingsError
from shared.validation import (
    ASSIGNED_TO_MAX,
    CLASSIFICATION_ALIASES,
    CLASSIFICATION_VALUES,
    COMMENT_MAX,
    DETERMINATION_ALIASES,
    DETERMINATION_VALUES,
    RETIRED_DETERMINATIONS,
    ascii_lower,
    json_type,
)

MDE_PRODUCT_NAME = "Microsoft Defender Advanced Threat Protection"

SENTINEL_STATUSES = ("New", "Active", "Closed")
SENTINEL_CLASSIFICATIONS = ("Undetermined", "TruePositive", "BenignPositive", "FalsePositive")
SENTINEL_REASONS = ("SuspiciousActivity", "SuspiciousButExpected", "IncorrectAlertLogic", "InaccurateData")
STATUS_TO_MDE = MappingProxyType({"New": "New", "Active": "InProgress", "Closed": "Resolved"})

OUTCOME_UPDATE = "Update"
OUTCOME_NO_DEFENDER_ALERTS = "NoDefenderAlerts"
OUTCOME_ALERTS_NOT_IN_PAYLOAD = "AlertsNotInPayload"

MAPPING_SETTING = "SENTINEL_MAPPING"
DEFAULT_ASSIGNEE_SETTING = "SENTINEL_DEFAULT_ASSIGNEE"
NO_CLASSIFICATION_KEY = "Undetermined"  # the rule for "Undetermined, or no classification"
_RULE_FIELDS = ("classification", "determination")
_COMMENT_PREFIX = "Microsoft Sentinel incident"
_ELLIPSIS = "…"
_KEPT_CONTROLS = frozenset("\n\r\t")
_MAX_LISTED_ERRORS = 100


# --- the classification mapping ----------------------------------------------------------------------


@dataclass(frozen=True)
class MappingRule:
    """What MDE is told for one Sentinel classification[/reason]; determination None = not sent."""

    classification: str
    determination: str | None


_DEFAULT_RULES: Mapping[str, MappingRule] = MappingProxyType(
    {
        "TruePositive/SuspiciousActivity": MappingRule("TruePositive", "Other"),
        "TruePositive": MappingRule("TruePositive", "Other"),
        "BenignPositive/SuspiciousButExpected": MappingRule(
            "InformationalExpectedActivity", "ConfirmedActivity"
        ),
        "BenignPositive": MappingRule("InformationalExpectedActivity", "ConfirmedActivity"),
        "FalsePositive/IncorrectAlertLogic": MappingRule("FalsePositive", "NotMalicious"),
        "FalsePositive/InaccurateData": MappingRule("FalsePositive", "InsufficientData"),
        "FalsePositive": MappingRule("FalsePositive", "Other"),
        NO_CLASSIFICATION_KEY: MappingRule("Unknown", None),
    }
)
_FALLBACK_RULE = MappingRule("Unknown", None)


@dataclass(frozen=True)
class SentinelMapping:
    """Rules keyed `<Classification>/<Reason>` or `<Classification>`, in Sentinel's canonical spelling."""

    rules: Mapping[str, MappingRule]

    def lookup(self, classification: str | None, reason: str | None) -> MappingRule:
        """`<Classification>/<Reason>` first, then `<Classification>`, then the Undetermined rule.

        No classification means Undetermined. An unknown or unlisted reason is ignored (see the module
        docstring); an unknown classification is a ValueError, since guessing it could close alerts
        as the wrong thing (parse_incident rejects it first, with the field named).
        """
        if classification is None:
            canonical = NO_CLASSIFICATION_KEY
        else:
            found = _canonical(classification, SENTINEL_CLASSIFICATIONS)
            if found is None:
                raise ValueError(f"{classification!r} is not a Sentinel classification")
            canonical = found
        known_reason = _canonical(reason, SENTINEL_REASONS) if reason is not None else None
        if known_reason is not None:
            rule = self.rules.get(f"{canonical}/{known_reason}")
            if rule is not None:
                return rule
        rule = self.rules.get(canonical)
        if rule is not None:
            return rule
        return self.rules.get(NO_CLASSIFICATION_KEY, _FALLBACK_RULE)


def default_mapping() -> SentinelMapping:
    """The table of docs/contracts.md §1, unchanged."""
    return SentinelMapping(_DEFAULT_RULES)


def build_mapping(overrides: Mapping[str, Mapping[str, str | None]]) -> SentinelMapping:
    """SENTINEL_MAPPING merged over the defaults, key by key; every bad entry is reported at once.

    settings.py only checks the JSON's shape, so the values are checked here against Sentinel's and
    MDE's vocabularies: a typo in a setting would otherwise surface as a 400 from MDE on the first
    incident closed, long after deployment.
    """
    problems: list[tuple[str, str]] = []
    rules = dict(_DEFAULT_RULES)
    given_as: dict[str, str] = {}
    for given_key, entry in overrides.items():
        key = _mapping_key(given_key, problems)
        rule = _mapping_rule(given_key, entry, problems)
        if key is None or rule is None:
            continue
        if key in given_as:
            problems.append(
                (MAPPING_SETTING, f"key {given_key!r} repeats {given_as[key]!r}: keys are case-insensitive")
            )
            continue
        given_as[key] = given_key
        rules[key] = rule
    if problems:
        raise SettingsError(problems)
    return SentinelMapping(MappingProxyType(rules))


def _mapping_key(given: Any, problems: list[tuple[str, str]]) -> str | None:
    """`<Classification>[/<Reason>]` in canonical spelling, or None after reporting why not."""
    if not isinstance(given, str):
        problems.append((MAPPING_SETTING, f"key {given!r} must be a string"))
        return None
    parts = [part.strip() for part in given.split("/")]
    if len(parts) > 2:
        problems.append(
            (MAPPING_SETTING, f"key {given!r} must be '<Classification>' or '<Classification>/<Reason>'")
        )
        return None
    classification = _canonical(parts[0], SENTINEL_CLASSIFICATIONS)
    if classification is None:
        problems.append(
            (
                MAPPING_SETTING,
                f"key {given!r}: {parts[0]!r} is not a Sentinel classification "
                f"(allowed: {', '.join(SENTINEL_CLASSIFICATIONS)})",
            )
        )
    if len(parts) == 1:
        return classification
    reason = _canonical(parts[1], SENTINEL_REASONS)
    if reason is None:
        problems.append(
            (
                MAPPING_SETTING,
                f"key {given!r}: {parts[1]!r} is not a Sentinel classification reason "
                f"(allowed: {', '.join(SENTINEL_REASONS)}; leave '/<Reason>' out for 'no reason')",
            )
        )
    if classification is None or reason is None:
        return None
    return f"{classification}/{reason}"


def _mapping_rule(key: Any, entry: Any, problems: list[tuple[str, str]]) -> MappingRule | None:
    """One entry's MDE values, canonicalised with shared.validation's enums and aliases."""
    where = f"entry {key!r}"
    if not isinstance(entry, Mapping):
        problems.append(
            (
                MAPPING_SETTING,
                f'{where} must be an object like {{"classification": "FalsePositive", '
                '"determination": "NotMalicious"}',
            ),
        )
        return None
    fields: dict[str, Any] = {}
    before = len(problems)
    for name, value in entry.items():
        canonical = _canonical(name, _RULE_FIELDS) if isinstance(name, str) else None
        if canonical is None:
            problems.append(
                (MAPPING_SETTING, f"{where}: unknown field {name!r} (allowed: classification, determination)")
            )
        elif canonical in fields:
            problems.append((MAPPING_SETTING, f"{where}: field {name!r} is given twice (case-insensitive)"))
        else:
            fields[canonical] = value
    classification = _rule_classification(where, fields.get("classification"), problems)
    determination = _rule_determination(where, fields.get("determination"), problems)
    if len(problems) > before or classification is None:
        return None
    return MappingRule(classification, determination)


def _rule_classification(where: str, value: Any, problems: list[tuple[str, str]]) -> str | None:
    if value is None:
        problems.append(
            (
                MAPPING_SETTING,
                f"{where}: classification is required (one of {', '.join(CLASSIFICATION_VALUES)})",
            )
        )
        return None
    found = _canonical_enum(value, CLASSIFICATION_VALUES, CLASSIFICATION_ALIASES)
    if found is None:
        problems.append(
            (
                MAPPING_SETTING,
                f"{where}: classification {value!r} is not an MDE classification "
                f"(allowed, case-insensitive: {', '.join(CLASSIFICATION_VALUES)}; "
                f"aliases {', '.join(CLASSIFICATION_ALIASES)})",
            )
        )
    return found


def _rule_determination(where: str, value: Any, problems: list[tuple[str, str]]) -> str | None:
    """None (absent or null) means "not sent"; anything else must be a current MDE determination."""
    if value is None:
        return None
    found = _canonical_enum(value, DETERMINATION_VALUES, DETERMINATION_ALIASES)
    if found is not None:
        return found
    retired = _canonical(value, tuple(RETIRED_DETERMINATIONS)) if isinstance(value, str) else None
    if retired is not None:
        why = RETIRED_DETERMINATIONS[retired]
        problems.append((MAPPING_SETTING, f"{where}: determination {value!r} is retired ({why})"))
        return None
    problems.append(
        (
            MAPPING_SETTING,
            f"{where}: determination {value!r} is not an MDE determination "
            f"(allowed, case-insensitive: {', '.join(DETERMINATION_VALUES)}; "
            f"aliases {', '.join(DETERMINATION_ALIASES)}; leave it out or null to send none)",
        )
    )
    return None


def _canonical(value: str, values: tuple[str, ...]) -> str | None:
    """The canonical spelling of `value` among `values`, matched case-insensitively after trimming."""
    lowered = ascii_lower(value.strip())
    for canonical in values:
        if canonical.lower() == lowered:
            return canonical
    return None


def _canonical_enum(value: Any, values: tuple[str, ...], aliases: Mapping[str, str]) -> str | None:
    if not isinstance(value, str):
        return None
    found = _canonical(value, values)
    if found is not None:
        return found
    alias = _canonical(value, tuple(aliases))
    return aliases[alias] if alias is not None else None


# --- reading the incident ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SkippedAlert:
    """An alert of another product (Office 365, Cloud Apps...): reported, never sent to MDE."""

    product_name: str | None
    provider_alert_id: str | None
    system_alert_id: str | None
    alert_name: str | None


@dataclass(frozen=True)
class Incident:
    """What alertgate needs of a Sentinel incident; status and classification in canonical spelling."""

    arm_id: str
    name: str | None
    number: int | None
    title: str | None
    status: str | None
    classification: str | None
    classification_reason: str | None
    classification_comment: str | None
    owner_upn: str | None
    owner_email: str | None
    last_modified: str | None
    alerts_count: int | None
    provider_incident_url: str | None
    mde_alert_ids: tuple[str, ...]
    skipped: tuple[SkippedAlert, ...]


class _Reader:
    """Reads keys case-insensitively and collects every problem, so one answer lists them all.

    Paths name each key as the caller spelled it (`object.Properties.Alerts[1]`), so the problem can be
    found in the caller's own payload.
    """

    def __init__(self) -> None:
        self.errors: list[FieldError] = []

    def add(self, path: str, message: str) -> None:
        self.errors.append(FieldError(path, message))

    def get(self, obj: dict[str, Any], name: str, base: str) -> tuple[Any, str]:
        """The value under `name` in any casing (None if absent or null), and its path."""
        wanted = name.lower()
        matches = [(k, v) for k, v in obj.items() if isinstance(k, str) and ascii_lower(k) == wanted]
        if not matches:
            return None, _join(base, name)
        key, value = matches[0]
        for other, other_value in matches[1:]:
            if other_value != value:
                self.add(
                    _join(base, other),
                    f"repeats {key!r} with a different value: keys are read case-insensitively",
                )
        return value, _join(base, key)

    def text(self, obj: dict[str, Any], name: str, base: str) -> str | None:
        return self.text_at(obj, name, base)[0]

    def text_at(self, obj: dict[str, Any], name: str, base: str) -> tuple[str | None, str]:
        """A string field, trimmed (empty and null both mean absent), and its path."""
        value, path = self.get(obj, name, base)
        if value is None:
            return None, path
        if not isinstance(value, str):
            self.add(path, f"must be a string or null, not {json_type(value)}")
            return None, path
        return value.strip() or None, path

    def mapping(self, obj: dict[str, Any], name: str, base: str) -> tuple[dict[str, Any] | None, str]:
        value, path = self.get(obj, name, base)
        if value is not None and not isinstance(value, dict):
            self.add(path, f"must be an object, not {json_type(value)}")
            return None, path
        return value, path

    def count(self, obj: dict[str, Any], name: str, base: str) -> int | None:
        """A whole number >= 0; `"42"` and `42.0` are accepted too (workflow tools convert numbers)."""
        value, path = self.get(obj, name, base)
        if value is None:
            return None
        if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
            return int(value.strip())
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            self.add(path, f"must be a whole number of at least 0, not {_shown(value)}")
            return None
        return value

    def enum(self, obj: dict[str, Any], name: str, base: str, values: tuple[str, ...]) -> str | None:
        """One of `values` in its canonical spelling; anything else is reported, not guessed."""
        value, path = self.text_at(obj, name, base)
        if value is None:
            return None
        found = _canonical(value, values)
        if found is None:
            self.add(path, f"{_short(value)!r} is not one of {', '.join(values)} (case-insensitive)")
        return found


def parse_incident(document: Any) -> Incident:
    """The incident in an automation-rule body or a bare incident resource; 400 listing every problem."""
    reader = _Reader()
    if not isinstance(document, dict):
        reader.add("body", f"must be a Sentinel incident (a JSON object), not {json_type(document)}")
        raise _rejected(reader.errors)
    resource, base = _incident_resource(document, reader)
    if resource is None:
        raise _rejected(reader.errors)
    arm_id, id_path = reader.text_at(resource, "id", base)
    if arm_id is None and not _has_error_at(reader, id_path):
        reader.add(id_path, "is required: the incident's ARM resource id")
    properties, ppath = reader.mapping(resource, "properties", base)
    if properties is None:
        if not _has_error_at(reader, ppath):
            reader.add(ppath, "is required: the incident's properties object")
        raise _rejected(reader.errors)
    incident = _incident(reader, arm_id or "", reader.text(resource, "name", base), properties, ppath)
    if reader.errors:
        raise _rejected(reader.errors)
    return incident


def _incident_resource(document: dict[str, Any], reader: _Reader) -> tuple[dict[str, Any] | None, str]:
    """The `object` of an automation-rule body, or the document itself when it is a bare resource."""
    schema, schema_path = reader.text_at(document, "objectSchemaType", "")
    if schema is not None and schema.lower() != "incident":
        reader.add(
            schema_path,
            f"is {_short(schema)!r}: only incident triggers are handled (objectSchemaType 'Incident')",
        )
    wrapped, path = reader.get(document, "object", "")
    if wrapped is None:
        return document, ""
    if not isinstance(wrapped, dict):
        reader.add(path, f"must be the incident (an object), not {json_type(wrapped)}")
        return None, path
    return wrapped, path


def _incident(
    reader: _Reader, arm_id: str, name: str | None, properties: dict[str, Any], ppath: str
) -> Incident:
    owner, opath = reader.mapping(properties, "owner", ppath)
    extra, xpath = reader.mapping(properties, "additionalData", ppath)
    mde_ids, skipped = _alerts(reader, properties, ppath)
    return Incident(
        arm_id=arm_id,
        name=name,
        number=reader.count(properties, "incidentNumber", ppath),
        title=reader.text(properties, "title", ppath),
        status=reader.enum(properties, "status", ppath, SENTINEL_STATUSES),
        classification=reader.enum(properties, "classification", ppath, SENTINEL_CLASSIFICATIONS),
        classification_reason=_reason(reader.text(properties, "classificationReason", ppath)),
        classification_comment=reader.text(properties, "classificationComment", ppath),
        owner_upn=reader.text(owner, "userPrincipalName", opath) if owner else None,
        owner_email=reader.text(owner, "email", opath) if owner else None,
        last_modified=reader.text(properties, "lastModifiedTimeUtc", ppath),
        alerts_count=reader.count(extra, "alertsCount", xpath) if extra else None,
        provider_incident_url=reader.text(extra, "providerIncidentUrl", xpath) if extra else None,
        mde_alert_ids=mde_ids,
        skipped=skipped,
    )


def _reason(value: str | None) -> str | None:
    """Sentinel's spelling when the reason is a known one; an unknown reason is kept as given."""
    if value is None:
        return None
    return _canonical(value, SENTINEL_REASONS) or value


def _alerts(
    reader: _Reader, properties: dict[str, Any], ppath: str
) -> tuple[tuple[str, ...], tuple[SkippedAlert, ...]]:
    """MDE alert ids in order without repeats, and every other alert as skipped."""
    alerts, apath = reader.get(properties, "alerts", ppath)
    if alerts is None:
        return (), ()
    if not isinstance(alerts, list):
        reader.add(apath, f"must be an array of alerts, not {json_type(alerts)}")
        return (), ()
    ids: dict[str, None] = {}
    skipped: list[SkippedAlert] = []
    for index, item in enumerate(alerts):
        alert = _alert(reader, item, f"{apath}[{index}]")
        if alert is None:
            continue
        if _is_mde(alert):
            if alert.provider_alert_id is not None:
                ids.setdefault(alert.provider_alert_id, None)
        else:
            skipped.append(alert)
    return tuple(ids), tuple(skipped)


def _alert(reader: _Reader, item: Any, path: str) -> SkippedAlert | None:
    """One alert's identifying fields (from `properties`, or the entry itself when it has none)."""
    if not isinstance(item, dict):
        reader.add(path, f"must be an alert (an object), not {json_type(item)}")
        return None
    fields, fpath = reader.mapping(item, "properties", path)
    if fields is None:
        if _has_error_at(reader, fpath):
            return None
        fields, fpath = item, path
    provider_alert_id, id_path = reader.text_at(fields, "providerAlertId", fpath)
    alert = SkippedAlert(
        product_name=reader.text(fields, "productName", fpath),
        provider_alert_id=provider_alert_id,
        system_alert_id=reader.text(fields, "systemAlertId", fpath),
        alert_name=reader.text(fields, "alertDisplayName", fpath),
    )
    if _is_mde(alert) and provider_alert_id is None and not _has_error_at(reader, id_path):
        reader.add(id_path, f"is required for a {MDE_PRODUCT_NAME} alert: it is the MDE alert id")
    return alert


def _is_mde(alert: SkippedAlert) -> bool:
    """MDE alerts are told apart by product name only: their ids' shape is ALERT_ID_PATTERN's job."""
    return alert.product_name is not None and alert.product_name.lower() == MDE_PRODUCT_NAME.lower()


def _rejected(errors: list[FieldError]) -> RequestRejected:
    shown = errors[:_MAX_LISTED_ERRORS]
    if len(errors) > _MAX_LISTED_ERRORS:
        shown.append(FieldError("body", f"{len(errors) - _MAX_LISTED_ERRORS} more problems not listed"))
    summary = "; ".join(f"{e.field}: {e.message}" for e in errors[:3])
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return RequestRejected(
        400, "Invalid Sentinel incident", f"{len(errors)} problem(s): {summary}{more}.", shown
    )


def _has_error_at(reader: _Reader, path: str) -> bool:
    return any(error.field == path for error in reader.errors)


def _join(base: str, name: str) -> str:
    return f"{base}.{name}" if base else name


def _shown(value: Any) -> str:
    return repr(_short(value)) if isinstance(value, str) else f"{json_type(value)} {json.dumps(value)[:60]}"


def _short(value: str) -> str:
    return value if len(value) <= 60 else value[:57] + "..."


# --- planning the update -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SentinelPlan:
    """What to do for one incident: `body` is None when there is nothing to send (see `outcome`)."""

    incident: Incident
    body: dict[str, Any] | None
    idempotency_key: str
    outcome: str  # OUTCOME_UPDATE | OUTCOME_NO_DEFENDER_ALERTS | OUTCOME_ALERTS_NOT_IN_PAYLOAD


def plan_update(incident: Incident, mapping: SentinelMapping, default_assignee: str | None) -> SentinelPlan:
    """One batchUpdate body (MDE's field names and order) for the incident's MDE alerts, or why none."""
    key = idempotency_key_for(incident)
    if not incident.mde_alert_ids:
        return SentinelPlan(incident, None, key, _empty_outcome(incident))
    rule = _rule_for(incident, mapping)
    values = {
        "status": _mde_status(incident.status),
        "assignedTo": _assignee(incident, default_assignee),
        "classification": rule.classification,
        "determination": rule.determination,
        "comment": comment_for(incident),
    }
    body: dict[str, Any] = {"alertIds": list(incident.mde_alert_ids)}
    body.update({name: value for name, value in values.items() if value is not None})
    return SentinelPlan(incident, body, key, OUTCOME_UPDATE)


def _empty_outcome(incident: Incident) -> str:
    """AlertsNotInPayload only when alerts exist but none came along (Defender-portal incidents)."""
    if (incident.alerts_count or 0) > 0 and not incident.skipped:
        return OUTCOME_ALERTS_NOT_IN_PAYLOAD
    return OUTCOME_NO_DEFENDER_ALERTS


def _rule_for(incident: Incident, mapping: SentinelMapping) -> MappingRule:
    """The mapping's rule; an Incident built by hand with an unknown classification is a 400 too."""
    try:
        return mapping.lookup(incident.classification, incident.classification_reason)
    except ValueError:
        raise _rejected(
            [
                FieldError(
                    "properties.classification",
                    f"{_short(incident.classification or '')!r} is not one of "
                    f"{', '.join(SENTINEL_CLASSIFICATIONS)} (case-insensitive)",
                )
            ]
        ) from None


def _mde_status(status: str | None) -> str | None:
    if status is None:
        return None
    canonical = _canonical(status, SENTINEL_STATUSES)
    if canonical is None:
        raise _rejected(
            [
                FieldError(
                    "properties.status",
                    f"{_short(status)!r} is not one of {', '.join(SENTINEL_STATUSES)} (case-insensitive)",
                )
            ]
        )
    return STATUS_TO_MDE[canonical]


def _assignee(incident: Incident, default_assignee: str | None) -> str | None:
    """Owner UPN, else owner email, else the default: the first one MDE would accept."""
    for candidate in (incident.owner_upn, incident.owner_email):
        if candidate is not None and _assignable(candidate) is None:
            return candidate
    if default_assignee is None or default_assignee == "":
        return None
    problem = _assignable(default_assignee)
    if problem is not None:
        raise SettingsError([(DEFAULT_ASSIGNEE_SETTING, problem)])
    return default_assignee


def _assignable(value: str) -> str | None:
    """Why MDE's assignedTo would refuse `value` (validate_batch_update's rules), or None."""
    if not value:
        return "must not be empty"
    if len(value) > ASSIGNED_TO_MAX:
        return f"is {len(value)} characters long; at most {ASSIGNED_TO_MAX} are allowed"
    if any(unicodedata.category(char) in ("Cc", "Cs") for char in value):
        return "must not hold control characters or unpaired surrogates"
    return None


def comment_for(incident: Incident) -> str | None:
    """`Microsoft Sentinel incident #<n> "<title>" <status> as <c>/<r> by <owner>: <comment>`.

    A missing part is left out with its words, so the comment never shows an empty `""` or `as /`;
    MDE appends comments and never replaces them, so a comment with nothing to say is not sent (None).
    """
    head = _comment_head(incident)
    remark = incident.classification_comment
    if not head and not remark:
        return None
    text = " ".join([_COMMENT_PREFIX, *head])
    if remark:
        text = f"{text}: {remark}"
    return _cut(_printable(text), COMMENT_MAX)


def _comment_head(incident: Incident) -> list[str]:
    """The parts after the prefix; empty values count as missing (an Incident may be built by hand)."""
    parts: list[str] = []
    if incident.number is not None:
        parts.append(f"#{incident.number}")
    if incident.title:
        parts.append(f'"{incident.title}"')
    if incident.status:
        parts.append(incident.status)
    if incident.classification:
        reason = incident.classification_reason
        parts.append(f"as {incident.classification}/{reason}" if reason else f"as {incident.classification}")
    owner = incident.owner_upn or incident.owner_email
    if owner:
        parts.append(f"by {owner}")
    return parts


def _printable(text: str) -> str:
    """Control characters other than newline, CR and tab → space; lone surrogates → U+FFFD."""
    out = []
    for char in text:
        category = unicodedata.category(char)
        if category == "Cc" and char not in _KEPT_CONTROLS:
            out.append(" ")
        elif category == "Cs":
            out.append("\ufffd")
        else:
            out.append(char)
    return "".join(out)


def _cut(text: str, limit: int) -> str:
    """At most `limit` code points, the last one `…` when something was cut."""
    return text if len(text) <= limit else text[: limit - 1] + _ELLIPSIS


# --- the derived idempotency key ---------------------------------------------------------------------


def idempotency_key_for(incident: Incident) -> str:
    """Same incident and same lastModifiedTimeUtc → same key, so a redelivery is a replay; a later
    change of the incident moves lastModifiedTimeUtc and so gets a new key."""
    if incident.last_modified is not None:
        version = "t:" + _normalised_time(incident.last_modified)
    else:
        version = "c:" + _content_digest(incident)
    material = f"sentinel-incident\n{incident.arm_id.strip().lower()}\n{version}"
    return "sentinel-" + hashlib.sha256(material.encode("utf-8")).hexdigest()


_ISO_TIME = re.compile(
    r"(?P<main>\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2})(?:[.,](?P<fraction>\d+))?(?P<zone>[Zz]|[+-]\d{2}:?\d{2})?"
)


def _normalised_time(value: str) -> str:
    """ISO 8601 → UTC `YYYY-MM-DDTHH:MM:SS[.fff…]Z`, keeping every fractional digit (.NET ticks).

    Equal instants written differently (`Z`/`+00:00`, trailing zeros) give one key; an unparsable
    value is used as given, which is still stable for a redelivery.
    """
    match = _ISO_TIME.fullmatch(value.strip())
    if match is None:
        return value.strip()
    zone = match["zone"] or "Z"
    try:
        offset = "+00:00" if zone.upper() == "Z" else zone
        moment = datetime.fromisoformat(match["main"].replace("t", "T") + offset)
    except ValueError:
        return value.strip()
    fraction = (match["fraction"] or "").rstrip("0")
    utc = moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{utc}.{fraction}Z" if fraction else f"{utc}Z"


def _content_digest(incident: Incident) -> str:
    """Without lastModifiedTimeUtc, what the update is made of stands in for the incident's version."""
    content = [
        incident.status,
        incident.classification,
        incident.classification_reason,
        incident.classification_comment,
        incident.owner_upn,
        incident.owner_email,
        incident.title,
        list(incident.mde_alert_ids),
    ]
    text = json.dumps(content, ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
