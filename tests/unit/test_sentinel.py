"""Sentinel incident → batchUpdate body (docs/contracts.md §1 "POST /api/sentinel/incidents"), without any service."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import re
from pathlib import Path
from typing import Any

import pytest

from shared.errors import RequestRejected, SettingsError
from shared.sentinel import (
    MDE_PRODUCT_NAME,
    Incident,
    MappingRule,
    SentinelMapping,
    SkippedAlert,
    build_mapping,
    comment_for,
    default_mapping,
    parse_incident,
    plan_update,
)
from shared.settings import DEFAULT_ALERT_ID_PATTERN
from shared.validation import ASSIGNED_TO_MAX, COMMENT_MAX, ValidationRules, validate_batch_update
from shared.validation import validate_idempotency_key as check_header_key

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "sentinel"
RULES = ValidationRules(re.compile(DEFAULT_ALERT_ID_PATTERN, re.ASCII), max_alerts_per_request=10000)
ARM_ID = (
    "/subscriptions/7b3e2a51-4c1d-4e8f-9a6b-2d5c8f0e1a34/resourceGroups/rg-soc-prod/providers/"
    "Microsoft.OperationalInsights/workspaces/law-sentinel-prod/providers/Microsoft.SecurityInsights/"
    "Incidents/c2a4e6f8-1b3d-4f5a-9c7e-0d2b4f6a8c1e"
)
MDE1, MDE2 = "da637551227677560813_-961444813", "ed637431102114129586_160070831"
O365 = "fa8f2b1c3d-4e5f-4a6b-9c7d-8e9f0a1b2c3d"
UPN, EMAIL = "jane.analyst@contoso.onmicrosoft.com", "jane.analyst@contoso.com"
BASE = Incident(
    arm_id=ARM_ID,
    name="c2a4e6f8-1b3d-4f5a-9c7e-0d2b4f6a8c1e",
    number=42,
    title="Suspicious PowerShell",
    status="Closed",
    classification="FalsePositive",
    classification_reason="IncorrectAlertLogic",
    classification_comment="Build server script",
    owner_upn=UPN,
    owner_email=EMAIL,
    last_modified="2024-05-03T09:42:17.8340912Z",
    alerts_count=2,
    provider_incident_url=None,
    mde_alert_ids=(MDE1, MDE2),
    skipped=(),
)


def load(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


def incident(**changes: Any) -> Incident:
    return dataclasses.replace(BASE, **changes)


def mde_alert(provider_id: Any, **extra: Any) -> dict[str, Any]:
    return {"properties": {"productName": MDE_PRODUCT_NAME, "providerAlertId": provider_id, **extra}}


def body_doc(**properties: Any) -> dict[str, Any]:
    """A minimal automation-rule body; keyword arguments replace or add incident properties."""
    props: dict[str, Any] = {
        "status": "Closed",
        "classification": "FalsePositive",
        "classificationReason": "IncorrectAlertLogic",
        "incidentNumber": 42,
        "lastModifiedTimeUtc": "2024-05-03T09:42:17.8340912Z",
        "alerts": [mde_alert(MDE1)],
    }
    props.update(properties)
    return {"objectSchemaType": "Incident", "object": {"id": ARM_ID, "name": "n", "properties": props}}


def fields_of(exc: pytest.ExceptionInfo[RequestRejected]) -> list[str]:
    return [e.field for e in exc.value.errors]


def plan(document: Any, default_assignee: str | None = None) -> dict[str, Any] | None:
    return plan_update(parse_incident(document), default_mapping(), default_assignee).body


# --- the mapping table ---------------------------------------------------------------------------------

TABLE = [
    ("TruePositive", "SuspiciousActivity", "TruePositive", "Other"),
    ("TruePositive", None, "TruePositive", "Other"),
    ("BenignPositive", "SuspiciousButExpected", "InformationalExpectedActivity", "ConfirmedActivity"),
    ("BenignPositive", None, "InformationalExpectedActivity", "ConfirmedActivity"),
    ("FalsePositive", "IncorrectAlertLogic", "FalsePositive", "NotMalicious"),
    ("FalsePositive", "InaccurateData", "FalsePositive", "InsufficientData"),
    ("FalsePositive", None, "FalsePositive", "Other"),
    ("Undetermined", None, "Unknown", None),
    (None, None, "Unknown", None),
]


@pytest.mark.parametrize(("classification", "reason", "mde_classification", "determination"), TABLE)
def test_every_row_of_the_table_reaches_the_body(
    classification: str | None, reason: str | None, mde_classification: str, determination: str | None
) -> None:
    body = plan(body_doc(classification=classification, classificationReason=reason))
    assert body is not None
    assert body["classification"] == mde_classification
    if determination is None:
        assert "determination" not in body
    else:
        assert body["determination"] == determination
    validate_batch_update(body, RULES)


@pytest.mark.parametrize(
    ("classification", "reason", "expected"),
    [
        # an unlisted pairing or an undocumented reason falls back to the classification alone
        ("TruePositive", "InaccurateData", MappingRule("TruePositive", "Other")),
        ("FalsePositive", "SuspiciousButExpected", MappingRule("FalsePositive", "Other")),
        ("FalsePositive", "SomeFutureReason", MappingRule("FalsePositive", "Other")),
        ("Undetermined", "SuspiciousActivity", MappingRule("Unknown", None)),
        # a reason without a classification is the "no classification" row
        (None, "IncorrectAlertLogic", MappingRule("Unknown", None)),
        # Sentinel values are matched case-insensitively
        ("falsepositive", "INACCURATEDATA", MappingRule("FalsePositive", "InsufficientData")),
    ],
)
def test_lookup_falls_back_to_the_classification_alone(
    classification: str | None, reason: str | None, expected: MappingRule
) -> None:
    assert default_mapping().lookup(classification, reason) == expected


def test_lookup_refuses_an_unknown_classification() -> None:
    with pytest.raises(ValueError, match="Escalated"):
        default_mapping().lookup("Escalated", None)


def test_a_mapping_without_the_classification_rule_uses_the_undetermined_rule() -> None:
    mapping = SentinelMapping({"Undetermined": MappingRule("Unknown", None)})
    assert mapping.lookup("TruePositive", None) == MappingRule("Unknown", None)
    assert SentinelMapping({}).lookup("TruePositive", None) == MappingRule("Unknown", None)


# --- SENTINEL_MAPPING overrides --------------------------------------------------------------------------


def test_no_override_gives_the_defaults() -> None:
    assert dict(build_mapping({}).rules) == dict(default_mapping().rules)


def test_overrides_are_merged_over_the_defaults_and_canonicalised() -> None:
    mapping = build_mapping(
        {
            "falsepositive/incorrectalertlogic": {
                "Classification": "falsepositive",
                "DETERMINATION": "clean",
            },
            "TruePositive/InaccurateData": {"classification": "TruePositive", "determination": "malware"},
            "BenignPositive": {"classification": "Informational, expected activity"},
        }
    )
    assert mapping.lookup("FalsePositive", "IncorrectAlertLogic") == MappingRule(
        "FalsePositive", "NotMalicious"
    )
    assert mapping.lookup("TruePositive", "InaccurateData") == MappingRule("TruePositive", "Malware")
    assert mapping.lookup("BenignPositive", None) == MappingRule("InformationalExpectedActivity", None)
    # untouched defaults survive the merge
    assert mapping.lookup("FalsePositive", "InaccurateData") == MappingRule(
        "FalsePositive", "InsufficientData"
    )
    assert mapping.lookup("BenignPositive", "SuspiciousButExpected") == MappingRule(
        "InformationalExpectedActivity", "ConfirmedActivity"
    )


def test_the_undetermined_override_also_covers_no_classification() -> None:
    mapping = build_mapping({"Undetermined": {"classification": "TruePositive", "determination": "Other"}})
    assert mapping.lookup(None, None) == MappingRule("TruePositive", "Other")
    body = plan_update(incident(classification=None, classification_reason=None), mapping, None).body
    assert body is not None
    assert (body["classification"], body["determination"]) == ("TruePositive", "Other")


def test_a_null_determination_means_not_sent() -> None:
    mapping = build_mapping({"FalsePositive": {"classification": "FalsePositive", "determination": None}})
    body = plan_update(incident(classification_reason=None), mapping, None).body
    assert body is not None
    assert body["classification"] == "FalsePositive"
    assert "determination" not in body


@pytest.mark.parametrize(
    ("overrides", "mentioned"),
    [
        ({"Malicious": {"classification": "TruePositive"}}, ["'Malicious'", "Sentinel classification"]),
        ({"FalsePositive/WrongRule": {"classification": "FalsePositive"}}, ["'WrongRule'", "reason"]),
        ({"FalsePositive/": {"classification": "FalsePositive"}}, ["''", "reason"]),
        ({"A/B/C": {"classification": "FalsePositive"}}, ["'A/B/C'", "<Classification>/<Reason>"]),
        ({"TruePositive": {"classification": "Malicious"}}, ["'Malicious'", "MDE classification"]),
        (
            {"TruePositive": {"classification": "TruePositive", "determination": "Malwere"}},
            ["'Malwere'", "MDE determination"],
        ),
        ({"TruePositive": {"classification": "TruePositive", "determination": "apt"}}, ["'apt'", "retired"]),
        (
            {"TruePositive": {"classification": "TruePositive", "status": "Resolved"}},
            ["'status'", "unknown field"],
        ),
        ({"TruePositive": {"determination": "Other"}}, ["classification is required"]),
        ({"TruePositive": "TruePositive"}, ["'TruePositive'", "must be an object"]),
        ({"TruePositive": {"classification": "TruePositive", "determination": 7}}, ["7", "determination"]),
        (
            {"TruePositive": {"classification": "TruePositive", "Classification": "TruePositive"}},
            ["'Classification'", "twice"],
        ),
        (
            {
                "TruePositive": {"classification": "TruePositive"},
                "truepositive": {"classification": "Unknown"},
            },
            ["'truepositive'", "repeats 'TruePositive'"],
        ),
    ],
)
def test_each_bad_entry_is_a_settings_error(overrides: dict[str, Any], mentioned: list[str]) -> None:
    with pytest.raises(SettingsError) as exc:
        build_mapping(overrides)
    assert len(exc.value.problems) == 1
    name, rule = exc.value.problems[0]
    assert name == "SENTINEL_MAPPING"
    for text in mentioned:
        assert text in rule


def test_every_bad_entry_is_listed_at_once() -> None:
    with pytest.raises(SettingsError) as exc:
        build_mapping(
            {
                "Malicious/Nope": {"classification": "Bad", "determination": "Worse", "extra": "x"},
                "FalsePositive": {"classification": "FalsePositive"},
                "TruePositive": {"classification": "TruePositive", "determination": "SecurityPersonnel"},
            }
        )
    rules = [rule for _, rule in exc.value.problems]
    assert len(rules) == 6
    assert {name for name, _ in exc.value.problems} == {"SENTINEL_MAPPING"}
    for text in ("'Malicious'", "'Nope'", "'Bad'", "'Worse'", "'extra'", "'SecurityPersonnel'"):
        assert any(text in rule for rule in rules), text
    assert "SENTINEL_MAPPING" in str(exc.value)


# --- reading the incident ---------------------------------------------------------------------------------


def test_the_closed_incident_is_read_completely() -> None:
    parsed = parse_incident(load("closed_false_positive.json"))
    assert parsed == Incident(
        arm_id=ARM_ID,
        name="c2a4e6f8-1b3d-4f5a-9c7e-0d2b4f6a8c1e",
        number=4711,
        title="Multi-stage incident involving Execution on one endpoint",
        status="Closed",
        classification="FalsePositive",
        classification_reason="IncorrectAlertLogic",
        classification_comment="Admin script from the build server, tuning the rule.",
        owner_upn=UPN,
        owner_email=EMAIL,
        last_modified="2024-05-03T09:42:17.8340912Z",
        alerts_count=3,
        provider_incident_url=None,
        mde_alert_ids=(MDE1, MDE2),
        skipped=(
            SkippedAlert(
                product_name="Office 365 Advanced Threat Protection",
                provider_alert_id=O365,
                system_alert_id="b6e2d1f8-3a47-4c9e-a5d0-8f1b2c3e4d5a",
                alert_name="Email messages containing malicious URL removed after delivery",
            ),
        ),
    )


def test_capital_alerts_key_reads_the_same() -> None:
    document = load("closed_false_positive_capital_alerts.json")
    assert "Alerts" in document["object"]["properties"]
    assert "alerts" not in document["object"]["properties"]
    assert parse_incident(document) == parse_incident(load("closed_false_positive.json"))


def test_every_key_is_read_case_insensitively() -> None:
    document = {
        "OBJECTSCHEMATYPE": "incident",
        "Object": {
            "ID": ARM_ID,
            "Properties": {
                "Status": "closed",
                "CLASSIFICATION": "falsePositive",
                "ClassificationReason": "incorrectalertlogic",
                "IncidentNumber": 7,
                "Owner": {"UserPrincipalName": UPN, "EMAIL": EMAIL},
                "AdditionalData": {"AlertsCount": 1, "ProviderIncidentUrl": "https://example.test/i/7"},
                "Alerts": [
                    {"Properties": {"ProductName": MDE_PRODUCT_NAME.upper(), "ProviderAlertId": MDE1}},
                    {
                        "PROPERTIES": {
                            "productname": "Office 365 Advanced Threat Protection",
                            "PROVIDERALERTID": O365,
                            "SystemAlertId": "s1",
                            "AlertDisplayName": "Phish",
                        }
                    },
                ],
            },
        },
    }
    parsed = parse_incident(document)
    assert parsed.arm_id == ARM_ID
    assert (parsed.status, parsed.classification, parsed.classification_reason) == (
        "Closed",
        "FalsePositive",
        "IncorrectAlertLogic",
    )
    assert (parsed.number, parsed.owner_upn, parsed.owner_email) == (7, UPN, EMAIL)
    assert (parsed.alerts_count, parsed.provider_incident_url) == (1, "https://example.test/i/7")
    assert parsed.mde_alert_ids == (MDE1,)
    assert parsed.skipped == (SkippedAlert("Office 365 Advanced Threat Protection", O365, "s1", "Phish"),)


def test_a_key_repeated_in_another_casing_with_the_same_value_is_accepted() -> None:
    document = body_doc()
    props = document["object"]["properties"]
    props["Alerts"] = copy.deepcopy(props["alerts"])
    assert parse_incident(document).mde_alert_ids == (MDE1,)


def test_a_key_repeated_in_another_casing_with_another_value_is_rejected() -> None:
    document = body_doc(Status="Active")
    with pytest.raises(RequestRejected) as exc:
        parse_incident(document)
    assert fields_of(exc) == ["object.properties.Status"]
    assert "case-insensitively" in exc.value.errors[0].message


def test_mde_ids_keep_their_order_without_repeats_and_others_are_skipped() -> None:
    alerts = [
        mde_alert(MDE2),
        {
            "properties": {
                "productName": "Microsoft Cloud App Security",
                "providerAlertId": "ca1",
                "systemAlertId": "sys-ca",
                "alertDisplayName": "Impossible travel",
            }
        },
        mde_alert(MDE1),
        mde_alert(MDE2),
        {"properties": {"productName": None, "providerAlertId": "x1"}},
        {"productName": MDE_PRODUCT_NAME, "providerAlertId": "121688558380765161_2136280442"},
    ]
    parsed = parse_incident(body_doc(alerts=alerts))
    assert parsed.mde_alert_ids == (MDE2, MDE1, "121688558380765161_2136280442")
    assert parsed.skipped == (
        SkippedAlert("Microsoft Cloud App Security", "ca1", "sys-ca", "Impossible travel"),
        SkippedAlert(None, "x1", None, None),
    )


def test_a_bare_resource_and_the_automation_body_read_the_same() -> None:
    wrapped = body_doc()
    bare = wrapped["object"]
    assert parse_incident(bare) == parse_incident(wrapped)


def test_nulls_and_blank_strings_are_absent_values() -> None:
    parsed = parse_incident(
        body_doc(title="  ", classification=None, classificationReason="", owner=None, additionalData=None)
    )
    assert (parsed.title, parsed.classification, parsed.classification_reason) == (None, None, None)
    assert (parsed.owner_upn, parsed.owner_email, parsed.alerts_count) == (None, None, None)


def test_numbers_given_as_digit_strings_are_accepted() -> None:
    parsed = parse_incident(body_doc(incidentNumber="4711", additionalData={"alertsCount": "3"}))
    assert (parsed.number, parsed.alerts_count) == (4711, 3)


@pytest.mark.parametrize(
    ("document", "expected_fields"),
    [
        ([], ["body"]),
        ("incident", ["body"]),
        (None, ["body"]),
        ({"objectSchemaType": "Incident", "object": "x"}, ["object"]),
        ({"objectSchemaType": "Incident", "object": {"id": ARM_ID}}, ["object.properties"]),
        ({"objectSchemaType": "Incident", "object": {"id": ARM_ID, "properties": []}}, ["object.properties"]),
        ({"properties": {"status": "Closed"}}, ["id"]),
        ({"objectSchemaType": "Alert", "object": {"id": ARM_ID, "properties": {}}}, ["objectSchemaType"]),
        (body_doc(status=3), ["object.properties.status"]),
        (body_doc(status="Resolved"), ["object.properties.status"]),
        (body_doc(classification="Malicious"), ["object.properties.classification"]),
        (body_doc(incidentNumber="forty-two"), ["object.properties.incidentNumber"]),
        (body_doc(incidentNumber=True), ["object.properties.incidentNumber"]),
        (body_doc(additionalData={"alertsCount": -1}), ["object.properties.additionalData.alertsCount"]),
        (body_doc(additionalData=[]), ["object.properties.additionalData"]),
        (body_doc(owner="jane"), ["object.properties.owner"]),
        (body_doc(owner={"userPrincipalName": 5}), ["object.properties.owner.userPrincipalName"]),
        (body_doc(alerts={"a": 1}), ["object.properties.alerts"]),
        (body_doc(alerts=["x"]), ["object.properties.alerts[0]"]),
        (body_doc(alerts=[{"properties": 5}]), ["object.properties.alerts[0].properties"]),
        (
            body_doc(alerts=[{"properties": {"productName": MDE_PRODUCT_NAME}}]),
            ["object.properties.alerts[0].properties.providerAlertId"],
        ),
        (body_doc(alerts=[mde_alert(5)]), ["object.properties.alerts[0].properties.providerAlertId"]),
        (body_doc(lastModifiedTimeUtc=20240503), ["object.properties.lastModifiedTimeUtc"]),
    ],
)
def test_a_body_that_is_not_an_incident_is_rejected_naming_the_field(
    document: Any, expected_fields: list[str]
) -> None:
    with pytest.raises(RequestRejected) as exc:
        parse_incident(document)
    assert exc.value.status == 400
    assert fields_of(exc) == expected_fields


def test_every_problem_is_listed_at_once() -> None:
    document = {
        "objectSchemaType": "Incident",
        "object": {
            "id": 5,
            "properties": {
                "status": "Done",
                "classification": "Bad",
                "incidentNumber": -1,
                "alerts": [mde_alert(MDE1), "x", {"properties": {"productName": MDE_PRODUCT_NAME}}],
            },
        },
    }
    with pytest.raises(RequestRejected) as exc:
        parse_incident(document)
    assert sorted(fields_of(exc)) == sorted(
        [
            "object.id",
            "object.properties.status",
            "object.properties.classification",
            "object.properties.incidentNumber",
            "object.properties.alerts[1]",
            "object.properties.alerts[2].properties.providerAlertId",
        ]
    )
    assert exc.value.detail.startswith("6 problem(s)")


# --- status and assignedTo ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sentinel", "mde"),
    [("Closed", "Resolved"), ("Active", "InProgress"), ("New", "New"), ("cLoSeD", "Resolved")],
)
def test_status_is_mapped(sentinel: str, mde: str) -> None:
    body = plan(body_doc(status=sentinel))
    assert body is not None
    assert body["status"] == mde


def test_no_status_leaves_the_status_out() -> None:
    body = plan(body_doc(status=None))
    assert body is not None
    assert "status" not in body


def test_a_hand_built_incident_with_an_unknown_status_or_classification_is_rejected() -> None:
    with pytest.raises(RequestRejected) as exc:
        plan_update(incident(status="Resolved"), default_mapping(), None)
    assert fields_of(exc) == ["properties.status"]
    with pytest.raises(RequestRejected) as exc:
        plan_update(incident(classification="Malicious"), default_mapping(), None)
    assert fields_of(exc) == ["properties.classification"]


@pytest.mark.parametrize(
    ("upn", "email", "default", "expected"),
    [
        (UPN, EMAIL, "soc@contoso.com", UPN),
        (None, EMAIL, "soc@contoso.com", EMAIL),
        (None, None, "soc@contoso.com", "soc@contoso.com"),
        (None, None, None, None),
        (None, None, "", None),
        ("u" * (ASSIGNED_TO_MAX + 1), EMAIL, None, EMAIL),
        ("u" * (ASSIGNED_TO_MAX + 1), "e" * (ASSIGNED_TO_MAX + 1), "soc@contoso.com", "soc@contoso.com"),
        ("u" * ASSIGNED_TO_MAX, EMAIL, None, "u" * ASSIGNED_TO_MAX),
        ("jane\x00@contoso.com", EMAIL, None, EMAIL),
    ],
)
def test_assigned_to_is_the_first_usable_of_upn_email_default(
    upn: str | None, email: str | None, default: str | None, expected: str | None
) -> None:
    body = plan_update(incident(owner_upn=upn, owner_email=email), default_mapping(), default).body
    assert body is not None
    assert body.get("assignedTo") == expected
    validate_batch_update(body, RULES)


def test_an_unusable_default_assignee_is_a_settings_error() -> None:
    with pytest.raises(SettingsError) as exc:
        plan_update(
            incident(owner_upn=None, owner_email=None), default_mapping(), "d" * (ASSIGNED_TO_MAX + 1)
        )
    assert exc.value.problems[0][0] == "SENTINEL_DEFAULT_ASSIGNEE"


# --- the comment -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        (
            {},
            'Microsoft Sentinel incident #42 "Suspicious PowerShell" Closed as FalsePositive/IncorrectAlertLogic '
            f"by {UPN}: Build server script",
        ),
        (
            {"number": None},
            'Microsoft Sentinel incident "Suspicious PowerShell" Closed as '
            f"FalsePositive/IncorrectAlertLogic by {UPN}: Build server script",
        ),
        (
            {"title": None},
            "Microsoft Sentinel incident #42 Closed as FalsePositive/IncorrectAlertLogic "
            f"by {UPN}: Build server script",
        ),
        (
            {"status": None},
            'Microsoft Sentinel incident #42 "Suspicious PowerShell" as '
            f"FalsePositive/IncorrectAlertLogic by {UPN}: Build server script",
        ),
        (
            {"classification": None, "classification_reason": None},
            f'Microsoft Sentinel incident #42 "Suspicious PowerShell" Closed by {UPN}: Build server script',
        ),
        (
            {"classification_reason": None},
            f'Microsoft Sentinel incident #42 "Suspicious PowerShell" Closed as FalsePositive by {UPN}: '
            "Build server script",
        ),
        (
            {"owner_upn": None},
            'Microsoft Sentinel incident #42 "Suspicious PowerShell" Closed as '
            f"FalsePositive/IncorrectAlertLogic by {EMAIL}: Build server script",
        ),
        (
            {"owner_upn": None, "owner_email": None},
            'Microsoft Sentinel incident #42 "Suspicious PowerShell" Closed as FalsePositive/IncorrectAlertLogic: '
            "Build server script",
        ),
        (
            {"classification_comment": None},
            'Microsoft Sentinel incident #42 "Suspicious PowerShell" Closed as '
            f"FalsePositive/IncorrectAlertLogic by {UPN}",
        ),
        (
            {
                "number": None,
                "title": None,
                "status": None,
                "classification": None,
                "owner_upn": None,
                "owner_email": None,
            },
            "Microsoft Sentinel incident: Build server script",
        ),
    ],
)
def test_comment_leaves_out_each_missing_part_with_its_words(changes: dict[str, Any], expected: str) -> None:
    assert comment_for(incident(**changes)) == expected


PARTS = (
    "number",
    "title",
    "status",
    "classification",
    "classification_reason",
    "owner_upn",
    "classification_comment",
)


@pytest.mark.parametrize("present", list(itertools.product((True, False), repeat=len(PARTS))))
def test_comment_for_every_combination_of_missing_parts(present: tuple[bool, ...]) -> None:
    given = dict(zip(PARTS, present, strict=True))
    changes = {name: None for name, keep in given.items() if not keep}
    subject = incident(owner_email=None, **changes)
    words = ["Microsoft Sentinel incident"]
    if given["number"]:
        words.append("#42")
    if given["title"]:
        words.append('"Suspicious PowerShell"')
    if given["status"]:
        words.append("Closed")
    if given["classification"]:
        words.append(
            "as FalsePositive/IncorrectAlertLogic" if given["classification_reason"] else "as FalsePositive"
        )
    if given["owner_upn"]:
        words.append(f"by {UPN}")
    expected = " ".join(words) + (": Build server script" if given["classification_comment"] else "")
    if expected == "Microsoft Sentinel incident":
        assert comment_for(subject) is None
    else:
        assert comment_for(subject) == expected


def test_comment_replaces_control_characters_but_keeps_line_breaks_and_tabs() -> None:
    comment = comment_for(
        incident(title="a\x00b\x1bc", classification_comment="line1\nline2\r\n\tx\x7fy\ud800z")
    )
    assert comment is not None
    assert '"a b c"' in comment
    assert comment.endswith(": line1\nline2\r\n\tx y\ufffdz")
    validate_batch_update({"alertIds": [MDE1], "comment": comment}, RULES)


@pytest.mark.parametrize(("extra", "cut"), [(0, False), (1, True), (5000, True)])
def test_comment_is_cut_to_8000_code_points_with_an_ellipsis(extra: int, cut: bool) -> None:
    head = comment_for(incident(classification_comment="x"))
    assert head is not None
    room = COMMENT_MAX - len(head) + 1  # code points the remark may have without a cut
    remark = "😀" * (room + extra)  # astral characters: one code point, two UTF-16 units
    comment = comment_for(incident(classification_comment=remark))
    assert comment is not None
    assert len(comment) == COMMENT_MAX
    assert comment.endswith("…") is cut
    assert comment.startswith(head[:-1])
    validate_batch_update({"alertIds": [MDE1], "comment": comment}, RULES)


# --- the idempotency key ------------------------------------------------------------------------------------


def key_of(document: Any) -> str:
    return plan_update(parse_incident(document), default_mapping(), None).idempotency_key


def test_a_redelivery_gets_the_same_key() -> None:
    first = key_of(load("closed_false_positive.json"))
    assert first == key_of(load("closed_false_positive.json"))
    assert first == key_of(load("closed_false_positive_capital_alerts.json"))
    assert first == key_of(load("closed_false_positive.json")["object"])  # the bare resource
    assert check_header_key(first) == first  # visible ASCII, at most 255 characters


def test_a_later_change_gets_another_key() -> None:
    closed = key_of(load("closed_false_positive.json"))
    assert key_of(load("reopened_active.json")) != closed
    later = body_doc(lastModifiedTimeUtc="2024-05-03T09:42:17.8340913Z")  # one 100 ns tick later
    assert key_of(later) != key_of(body_doc())


def test_another_incident_gets_another_key() -> None:
    other = body_doc()
    other["object"]["id"] = ARM_ID.replace("c2a4e6f8", "d2a4e6f8")
    assert key_of(other) != key_of(body_doc())


@pytest.mark.parametrize(
    "same_instant",
    [
        "2024-05-03T09:42:17.8340912Z",
        "2024-05-03T09:42:17.83409120Z",
        "2024-05-03T11:42:17.8340912+02:00",
        "2024-05-03T09:42:17.8340912+00:00",
        "2024-05-03t09:42:17.8340912z",
    ],
)
def test_one_instant_written_differently_gets_one_key(same_instant: str) -> None:
    assert key_of(body_doc(lastModifiedTimeUtc=same_instant)) == key_of(body_doc())


def test_the_arm_id_casing_does_not_change_the_key() -> None:
    upper = body_doc()
    upper["object"]["id"] = ARM_ID.upper()
    assert key_of(upper) == key_of(body_doc())


def test_without_last_modified_the_content_stands_in() -> None:
    assert key_of(body_doc(lastModifiedTimeUtc=None)) == key_of(body_doc(lastModifiedTimeUtc=None))
    assert key_of(body_doc(lastModifiedTimeUtc=None, status="Active")) != key_of(
        body_doc(lastModifiedTimeUtc=None)
    )


# --- the fixtures end to end --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "outcome"),
    [
        ("closed_false_positive.json", "Update"),
        ("closed_false_positive_capital_alerts.json", "Update"),
        ("reopened_active.json", "Update"),
        ("no_mde_alert.json", "NoDefenderAlerts"),
        ("defender_portal_no_alerts.json", "AlertsNotInPayload"),
        ("bare_incident_resource.json", "Update"),
    ],
)
def test_each_fixture_is_planned_into_a_valid_body(name: str, outcome: str) -> None:
    result = plan_update(parse_incident(load(name)), default_mapping(), "soc@contoso.com")
    assert result.outcome == outcome
    assert (result.body is not None) == (outcome == "Update")
    if result.body is not None:
        canonical = validate_batch_update(result.body, RULES).canonical_body()
        assert canonical == result.body  # already in MDE's names, order and spelling


def test_the_closed_false_positive_incident_gives_the_expected_body() -> None:
    body = plan(load("closed_false_positive.json"), "soc@contoso.com")
    assert body == {
        "alertIds": [MDE1, MDE2],
        "status": "Resolved",
        "assignedTo": UPN,
        "classification": "FalsePositive",
        "determination": "NotMalicious",
        "comment": 'Microsoft Sentinel incident #4711 "Multi-stage incident involving Execution on one endpoint" '
        f"Closed as FalsePositive/IncorrectAlertLogic by {UPN}: Admin script from the build server, tuning the rule.",
    }


def test_the_reopened_incident_goes_back_in_progress() -> None:
    body = plan(load("reopened_active.json"))
    assert body is not None
    assert body["alertIds"] == [MDE1, MDE2]
    assert body["status"] == "InProgress"
    assert (body["classification"], "determination" in body) == ("Unknown", False)
    assert body["comment"] == (
        f'Microsoft Sentinel incident #4711 "Multi-stage incident involving Execution on one endpoint" Active by {UPN}'
    )


def test_an_incident_without_mde_alerts_sends_nothing_and_lists_what_it_skipped() -> None:
    parsed = parse_incident(load("no_mde_alert.json"))
    result = plan_update(parsed, default_mapping(), None)
    assert (result.outcome, result.body) == ("NoDefenderAlerts", None)
    assert parsed.alerts_count == 2  # alerts exist, but none of them is MDE's
    assert [s.product_name for s in parsed.skipped] == [
        "Office 365 Advanced Threat Protection",
        "Microsoft Cloud App Security",
    ]
    assert [s.provider_alert_id for s in parsed.skipped] == [O365, "ca5e6f7a8b-9c0d-4e1f-a2b3-c4d5e6f7a8b9"]


def test_a_defender_portal_incident_without_its_alerts_says_so() -> None:
    parsed = parse_incident(load("defender_portal_no_alerts.json"))
    result = plan_update(parsed, default_mapping(), None)
    assert (result.outcome, result.body) == ("AlertsNotInPayload", None)
    assert parsed.alerts_count == 3
    assert parsed.provider_incident_url == (
        "https://security.microsoft.com/incidents/48213?tid=0d7c3f2a-9b1e-4c5d-8a6f-2e3d4c5b6a7f"
    )
    assert result.idempotency_key.startswith("sentinel-")


@pytest.mark.parametrize(("count", "outcome"), [(None, "NoDefenderAlerts"), (0, "NoDefenderAlerts")])
def test_no_alerts_and_no_count_is_nothing_to_do(count: int | None, outcome: str) -> None:
    result = plan_update(incident(mde_alert_ids=(), alerts_count=count), default_mapping(), None)
    assert (result.outcome, result.body) == (outcome, None)


def test_the_bare_resource_fixture_maps_a_benign_positive() -> None:
    document = load("bare_incident_resource.json")
    assert "object" not in document
    body = plan(document)
    assert body is not None
    assert body["alertIds"] == ["da637399794050273582_760707377"]
    assert (body["status"], body["classification"], body["determination"]) == (
        "Resolved",
        "InformationalExpectedActivity",
        "ConfirmedActivity",
    )
    assert body["assignedTo"] == "sam.hunter@contoso.com"


def test_the_email_is_assigned_when_the_owner_has_no_upn() -> None:
    document = load("closed_false_positive.json")
    document["object"]["properties"]["owner"]["userPrincipalName"] = None
    body = plan(document)
    assert body is not None
    assert body["assignedTo"] == EMAIL
    assert f"by {EMAIL}:" in body["comment"]


def test_empty_strings_in_a_hand_built_incident_count_as_missing_in_the_comment() -> None:
    subject = incident(title="", status="", classification="", owner_upn="", owner_email="")
    assert comment_for(subject) == "Microsoft Sentinel incident #42: Build server script"
    assert (
        comment_for(
            incident(
                number=None,
                title=None,
                status=None,
                classification=None,
                owner_upn=None,
                owner_email=None,
                classification_comment="",
            )
        )
        is None
    )
