"""Validation and canonicalisation of the batchUpdate body, without any service."""

from __future__ import annotations

import json
import re

import pytest

from shared.errors import RequestRejected
from shared.settings import DEFAULT_ALERT_ID_PATTERN
from shared.validation import (
    AlertUpdate,
    BatchUpdate,
    ValidationRules,
    outbound_body,
    parse_json_body,
    validate_batch_update,
    validate_idempotency_key,
)
from tests.examples import ID1, ID2, MICROSOFT_EXAMPLE

RULES = ValidationRules(re.compile(DEFAULT_ALERT_ID_PATTERN, re.ASCII), max_alerts_per_request=5)


def fields_of(exc: pytest.ExceptionInfo[RequestRejected]) -> list[str]:
    return [e.field for e in exc.value.errors]


def test_microsoft_example_is_accepted_unchanged() -> None:
    update = validate_batch_update(dict(MICROSOFT_EXAMPLE), RULES)
    assert update.canonical_body() == MICROSOFT_EXAMPLE
    assert list(update.canonical_body()) == list(MICROSOFT_EXAMPLE)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({"AlertIDs": [ID1], "STATUS": "resolved"}, {"alertIds": [ID1], "status": "Resolved"}),
        (
            {"alertids": [ID1], "Classification": "informational, EXPECTED activity"},
            {"alertIds": [ID1], "classification": "InformationalExpectedActivity"},
        ),
        ({"alertIds": [ID1], "determination": "clean"}, {"alertIds": [ID1], "determination": "NotMalicious"}),
        (
            {"alertIds": [ID1], "determination": "ConfirmedUserActivity"},
            {"alertIds": [ID1], "determination": "ConfirmedActivity"},
        ),
        (
            {"alertIds": [ID1], "determination": "noenoughdatatovalidate"},
            {"alertIds": [ID1], "determination": "InsufficientData"},
        ),
        (
            {"alertIds": [ID1], "determination": "COMPROMISEDACCOUNT"},
            {"alertIds": [ID1], "determination": "CompromisedUser"},
        ),
        (
            {"alertIds": [ID1], "Status": "inprogress", "AssignedTo": "a@b.c"},
            {"alertIds": [ID1], "status": "InProgress", "assignedTo": "a@b.c"},
        ),
    ],
)
def test_names_and_values_are_canonicalised(given: dict[str, object], expected: dict[str, object]) -> None:
    assert validate_batch_update(given, RULES).canonical_body() == expected


def test_duplicate_ids_are_removed_in_order() -> None:
    update = validate_batch_update({"alertIds": [ID2, ID1, ID2], "status": "New"}, RULES)
    assert update.alert_ids == (ID2, ID1)


def test_ids_of_every_documented_shape_are_accepted() -> None:
    ids = [
        "da637551227677560813_-961444813",
        "ed637431102114129586_160070831",
        "121688558380765161_2136280442",
    ]
    assert validate_batch_update({"alertIds": ids, "status": "New"}, RULES).alert_ids == tuple(ids)


def test_every_broken_rule_is_reported_at_once() -> None:
    with pytest.raises(RequestRejected) as exc:
        validate_batch_update(
            {"alertIds": ["nope", 7], "status": "Closed", "classification": "Bad", "comment": "", "x": 1},
            RULES,
        )
    assert exc.value.status == 400
    assert sorted(fields_of(exc)) == sorted(
        ["alertIds[0]", "alertIds[1]", "status", "classification", "comment", "x"]
    )


def test_office_and_cloud_apps_ids_are_named_as_not_mde() -> None:
    with pytest.raises(RequestRejected) as exc:
        validate_batch_update(
            {
                "alertIds": ["fa3e0c6b5e-1f0d-4c47-9d0b-6c1bd4b2a8e1", "ca5a1f0a8b2c3d4e5f60718293a4b5c6d7"],
                "status": "Resolved",
            },
            RULES,
        )
    messages = [e.message for e in exc.value.errors]
    assert "Office 365" in messages[0] and "not a Microsoft Defender for Endpoint alert" in messages[0]
    assert "Cloud Apps" in messages[1]


def test_unicode_digits_do_not_pass_as_ascii() -> None:
    arabic_indic = "da" + "٦" * 18 + "_1"
    with pytest.raises(RequestRejected) as exc:
        validate_batch_update({"alertIds": [arabic_indic], "status": "New"}, RULES)
    assert fields_of(exc) == ["alertIds[0]"]


def test_too_many_distinct_ids() -> None:
    ids = [f"da63739979405027358{i}_1" for i in range(6)]
    with pytest.raises(RequestRejected) as exc:
        validate_batch_update({"alertIds": ids, "status": "New"}, RULES)
    assert fields_of(exc) == ["alertIds"]
    assert "MAX_ALERTS_PER_REQUEST" in exc.value.errors[0].message


def test_lengths_count_code_points() -> None:
    emoji_comment = "😀" * 8000  # 8000 code points, 16000 UTF-16 units, 32000 UTF-8 bytes
    update = validate_batch_update({"alertIds": [ID1], "comment": emoji_comment}, RULES)
    assert update.update.comment == emoji_comment
    with pytest.raises(RequestRejected):
        validate_batch_update({"alertIds": [ID1], "assignedTo": "é" * 257}, RULES)


def test_comment_allows_newlines_but_not_other_controls() -> None:
    ok = validate_batch_update({"alertIds": [ID1], "comment": "line1\r\nline2\tend"}, RULES)
    assert ok.update.comment == "line1\r\nline2\tend"
    for bad in ("bell\x07", "del\x7f", "c1\x85"):
        with pytest.raises(RequestRejected) as exc:
            validate_batch_update({"alertIds": [ID1], "comment": bad}, RULES)
        assert fields_of(exc) == ["comment"]


def test_retired_determination_says_it_is_retired() -> None:
    with pytest.raises(RequestRejected) as exc:
        validate_batch_update({"alertIds": [ID1], "determination": "apt"}, RULES)
    assert "retired" in exc.value.errors[0].message


def test_no_cross_check_between_classification_and_determination() -> None:
    update = validate_batch_update(
        {"alertIds": [ID1], "classification": "FalsePositive", "determination": "Malware"}, RULES
    )
    assert update.update.determination == "Malware"


def test_outbound_body_applies_enum_overrides() -> None:
    update = AlertUpdate(status="Resolved", determination="NotMalicious", comment="NotMalicious")
    body = outbound_body([ID1], update.fields(), {"NotMalicious": "Clean"})
    assert body == {
        "alertIds": [ID1],
        "status": "Resolved",
        "determination": "Clean",
        "comment": "NotMalicious",
    }


def test_digest_ignores_id_order_but_not_values() -> None:
    a = BatchUpdate((ID1, ID2), AlertUpdate(status="Resolved"))
    b = BatchUpdate((ID2, ID1), AlertUpdate(status="Resolved"))
    c = BatchUpdate((ID1, ID2), AlertUpdate(status="New"))
    assert a.digest() == b.digest() != c.digest()


@pytest.mark.parametrize(
    ("body", "content_type", "status"),
    [
        (b"{}" * 10, "application/json", 413),
        (b"{}", "text/plain", 415),
        (b"{}", None, 415),
        (b"{", "application/json", 400),
        (b"\xff\xfe{}", "application/json", 400),
        (b"[" * 100000 + b"]" * 100000, "application/json", 400),
        (b'{"status": "New", "status": "Resolved"}', "application/json", 400),
    ],
)
def test_envelope_errors(body: bytes, content_type: str | None, status: int) -> None:
    with pytest.raises(RequestRejected) as exc:
        parse_json_body(body, content_type, max_body_bytes=len(body) if status != 413 else 10)
    assert exc.value.status == status
    assert exc.value.errors and exc.value.errors[0].field


def test_json_media_types_with_parameters_are_accepted() -> None:
    assert parse_json_body(b'{"a": 1}', "Application/JSON; charset=utf-8", 100) == {"a": 1}
    assert parse_json_body(b'{"a": 1}', "application/merge-patch+json", 100) == {"a": 1}


@pytest.mark.parametrize("key", ["", "a b", "x" * 256, "caf\u00e9", "tab\there"])
def test_bad_idempotency_keys(key: str) -> None:
    with pytest.raises(RequestRejected) as exc:
        validate_idempotency_key(key)
    assert fields_of(exc) == ["Idempotency-Key"]


def test_good_idempotency_key() -> None:
    assert (
        validate_idempotency_key("8e03978e-40d5-43e8-bc93-6894a57f9324")
        == "8e03978e-40d5-43e8-bc93-6894a57f9324"
    )
    assert validate_idempotency_key(None) is None


def test_error_list_is_capped_but_counts_everything() -> None:
    rules = ValidationRules(RULES.alert_id_pattern, 100000)
    with pytest.raises(RequestRejected) as exc:
        validate_batch_update({"alertIds": ["bad"] * 250, "status": "New"}, rules)
    assert len(exc.value.errors) == 101
    assert "150 more" in exc.value.errors[-1].message
    assert exc.value.detail.startswith("250 problem(s)")
    json.dumps([e.as_dict() for e in exc.value.errors])


def test_fields_are_named_as_the_caller_spelled_them() -> None:
    with pytest.raises(RequestRejected) as exc:
        validate_batch_update({"AlertIDs": ["x"], "STATUS": "closed", "status": "New"}, RULES)
    assert fields_of(exc) == ["status", "AlertIDs[0]", "STATUS"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("classification", "Un\u212anown"),  # Kelvin sign: Unicode lower-cases it to "k"
        ("status", "Re\u017folved"),  # long s
        ("determination", "Ot\u0041\u030aher"),  # a combining ring: not a letter of the name
    ],
)
def test_case_insensitive_means_ascii_case_so_lookalikes_are_refused(field: str, value: str) -> None:
    with pytest.raises(RequestRejected) as exc:
        validate_batch_update({"alertIds": [ID1], field: value}, RULES)
    assert fields_of(exc) == [field]


def test_a_field_name_with_a_lookalike_letter_is_unknown() -> None:
    with pytest.raises(RequestRejected) as exc:
        validate_batch_update({"alertIds": [ID1], "\u017ftatus": "Resolved"}, RULES)
    assert fields_of(exc)[0] == "\u017ftatus"  # then "body": no update field is left
