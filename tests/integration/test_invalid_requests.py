"""Invalid requests end to end: each is answered 400/413/415 problem+json naming the field, and nothing
reaches MDE."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

from emulators.control import EmulatorControl
from tests.conftest import HostPool

ID = "da637399794050273582_760707377"


@dataclass(frozen=True)
class Case:
    name: str
    body: bytes
    status: int
    where: str
    message_has: str = ""
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": "application/json"})


def j(document: Any) -> bytes:
    return json.dumps(document).encode()


def ok(**fields: Any) -> bytes:
    return j({"alertIds": [ID], **fields})


CASES = [
    Case("text/plain", ok(status="New"), 415, "Content-Type", headers={"Content-Type": "text/plain"}),
    Case(
        "form-encoded",
        b"alertIds=1",
        415,
        "Content-Type",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    ),
    Case("no content type", ok(status="New"), 415, "Content-Type", headers={}),
    Case("over MAX_BODY_BYTES", j({"alertIds": [ID], "comment": "x" * 1_100_000}), 413, "body"),
    Case("malformed JSON", b'{"alertIds": [', 400, "body", "not valid JSON"),
    Case("not UTF-8", b'{"comment": "caf\xe9"}', 400, "body", "UTF-8"),
    Case("array at top level", j([ID]), 400, "body", "JSON object"),
    Case("string at top level", j("Resolved"), 400, "body", "JSON object"),
    Case("nested too deep", b"[" * 50_000 + b"]" * 50_000, 400, "body"),
    Case("empty object", j({}), 400, "alertIds", "required"),
    Case("alertIds missing", j({"status": "Resolved"}), 400, "alertIds", "required"),
    Case("alertIds empty", j({"alertIds": [], "status": "Resolved"}), 400, "alertIds", "empty"),
    Case("alertIds a string", j({"alertIds": ID, "status": "Resolved"}), 400, "alertIds", "array"),
    Case(
        "alert id a number",
        j({"alertIds": [637399794050273582], "status": "New"}),
        400,
        "alertIds[0]",
        "string",
    ),
    Case(
        "alert id malformed",
        j({"alertIds": [ID, "da123_4"], "status": "New"}),
        400,
        "alertIds[1]",
        "ALERT_ID_PATTERN",
    ),
    Case(
        "Office 365 alert id",
        j({"alertIds": ["fa3e0c6b5e-1f0d-4c47-9d0b-6c1bd4b2a8e1"], "status": "New"}),
        400,
        "alertIds[0]",
        "Office 365",
    ),
    Case(
        "Cloud Apps alert id",
        j({"alertIds": ["ca5a1f0a8b2c3d4e5f60718293a4b5c6d7"], "status": "New"}),
        400,
        "alertIds[0]",
        "Cloud Apps",
    ),
    Case(
        "unicode digits in id", j({"alertIds": ["da" + "٣" * 18 + "_1"], "status": "New"}), 400, "alertIds[0]"
    ),
    Case(
        "too many alert ids",
        j({"alertIds": [f"da{i:018d}_1" for i in range(10001)], "status": "New"}),
        400,
        "alertIds",
        "MAX_ALERTS_PER_REQUEST",
    ),
    Case("nothing to change", ok(), 400, "body", "at least one"),
    Case("status unknown", ok(status="Closed"), 400, "status", "New, InProgress, Resolved"),
    Case("status null", ok(status=None), 400, "status", "string"),
    Case("classification unknown", ok(classification="Benign"), 400, "classification"),
    Case("determination retired", ok(determination="Apt"), 400, "determination", "retired"),
    Case("determination unknown", ok(determination="Malicious"), 400, "determination"),
    Case("determination a number", ok(determination=3), 400, "determination", "string"),
    Case("assignedTo empty", ok(assignedTo=""), 400, "assignedTo", "empty"),
    Case("assignedTo too long", ok(assignedTo="a" * 257), 400, "assignedTo", "256"),
    Case("assignedTo with a newline", ok(assignedTo="a\nb"), 400, "assignedTo", "control"),
    Case("comment too long", ok(comment="c" * 8001), 400, "comment", "8000"),
    Case("comment with NUL", ok(comment="a\u0000b"), 400, "comment", "U+0000"),
    Case("comment with a C1 control", ok(comment="a\u0085b"), 400, "comment", "U+0085"),
    Case(
        "comment lone surrogate",
        b'{"alertIds": ["' + ID.encode() + b'"], "comment": "\\ud800"}',
        400,
        "comment",
        "surrogate",
    ),
    Case("comment an object", ok(comment={"text": "x"}), 400, "comment", "string"),
    Case("unknown field", ok(status="New", severity="High"), 400, "severity", "not a batchUpdate field"),
    Case(
        "same field in two casings", ok(status="New", Status="Resolved"), 400, "Status", "case-insensitively"
    ),
    Case(
        "same key twice",
        b'{"alertIds": ["' + ID.encode() + b'"], "status": "New", "status": "Resolved"}',
        400,
        "status",
        "only once",
    ),
    Case(
        "Idempotency-Key too long",
        ok(status="New"),
        400,
        "Idempotency-Key",
        headers={"Content-Type": "application/json", "Idempotency-Key": "k" * 256},
    ),
    Case(
        "Idempotency-Key with a space",
        ok(status="New"),
        400,
        "Idempotency-Key",
        headers={"Content-Type": "application/json", "Idempotency-Key": "my key"},
    ),
]


def test_the_cases_are_distinct_and_enough() -> None:
    assert len({c.name for c in CASES}) == len(CASES) >= 25
    assert len({(c.body, tuple(sorted(c.headers.items()))) for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_invalid_request_is_rejected_naming_the_field(
    case: Case, hosts: HostPool, ctl: EmulatorControl, http: aiohttp.ClientSession
) -> None:
    async with http.post(
        hosts.url("/api/alerts/batchUpdate"), data=case.body, headers=case.headers
    ) as response:
        assert response.status == case.status, await response.text()
        assert response.headers["Content-Type"].startswith("application/problem+json")
        problem = json.loads(await response.text())
    assert problem["status"] == case.status
    assert problem["title"] and problem["detail"] and problem["type"]
    fields = [e["field"] for e in problem["errors"]]
    assert case.where in fields, problem
    if case.message_has:
        messages = " ".join(e["message"] for e in problem["errors"]) + " " + problem["detail"]
        assert case.message_has in messages, problem
    assert await ctl.calls() == [], "nothing invalid may reach MDE"


async def test_every_broken_rule_is_listed(
    hosts: HostPool, ctl: EmulatorControl, http: aiohttp.ClientSession
) -> None:
    body = j({"alertIds": ["bad"], "status": "Done", "classification": 1, "assignedTo": "", "extra": True})
    async with http.post(
        hosts.url("/api/alerts/batchUpdate"), data=body, headers={"Content-Type": "application/json"}
    ) as r:
        problem = await r.json(content_type=None)
    assert sorted(e["field"] for e in problem["errors"]) == [
        "alertIds[0]",
        "assignedTo",
        "classification",
        "extra",
        "status",
    ]
    assert await ctl.calls() == []
