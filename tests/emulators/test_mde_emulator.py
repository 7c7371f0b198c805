"""The MDE batchUpdate emulator, over real sockets: token check, body rules, faults, sliding windows.

Every test starts from a reset emulator (the `ctl`/`mde` fixtures) because the process is shared by the
whole test session. Timing-based tests check their own timing preconditions on the server's recorded
clocks, so a slow machine fails them loudly instead of letting them pass for the wrong reason.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from devhost.services import Service, start_emulators
from emulators import APP_CLIENT_ID, HOME_TENANT_ID, IDENTITY_PRINCIPAL_ID
from emulators.__main__ import build_parser
from emulators.control import EmulatorControl, EmulatorControlError, max_calls_in_any_window
from emulators.mde import RateLimit, SlidingWindowLimiter, parse_rate_limits, retry_after_header
from tests.emulators.conftest import (
    DOCUMENTED_EXAMPLE,
    MDE_RESOURCE,
    TENANT_A,
    TENANT_B,
    Answer,
    MdeApi,
    fetch_tenant_token,
    fetch_token,
    wait_until,
)

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
ID_A = "da637551227677560813_-961444813"
ID_B = "121688558380765161_2136280442"


async def statuses(mde: MdeApi, count: int, body: dict[str, Any] | None = None) -> list[int]:
    return [(await mde.update(body or {"alertIds": [ID_A]})).status for _ in range(count)]


async def sleep_until_wall(target: float) -> None:
    await asyncio.sleep(max(0.0, target - time.time()))


# --- tokens ------------------------------------------------------------------------------------------


async def test_valid_token_is_accepted_and_recorded(mde: MdeApi, ctl: EmulatorControl) -> None:
    answer = await mde.update({"alertIds": [ID_A], "status": "InProgress"})

    assert answer.status == 200
    [call] = await ctl.calls()
    assert call["authorization"] == f"Bearer {mde.token}"
    assert call["contentType"] == "application/json"
    assert call["admitted"] is True
    assert (call["status"], call["errorCode"]) == (200, None)


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer", "Basic dXNlcjpwYXNz", "Bearer not-a-token-we-issued"],
    ids=["missing", "empty-bearer", "basic", "unknown-token"],
)
async def test_missing_or_invalid_token_is_401(
    mde: MdeApi, ctl: EmulatorControl, authorization: str | None
) -> None:
    headers = {"Content-Type": "application/json"}
    if authorization is not None:
        headers["Authorization"] = authorization

    answer = await mde.update(DOCUMENTED_EXAMPLE, headers=headers)

    assert answer.status == 401
    error = answer.error()
    assert error["code"] == "Unauthorized"
    assert UUID.match(error["target"])
    assert await ctl.alerts() == {}
    [call] = await ctl.calls()
    assert (call["status"], call["errorCode"], call["admitted"]) == (401, "Unauthorized", False)


async def test_revoked_token_is_401_and_a_fresh_one_works(
    mde: MdeApi, ctl: EmulatorControl, http: aiohttp.ClientSession, emulators: Service
) -> None:
    assert (await mde.update({"alertIds": [ID_A]})).status == 200

    assert await ctl.revoke_tokens([mde.token]) == 1  # only ours: the process serves the whole session

    refused = await mde.update({"alertIds": [ID_A]})
    assert refused.status == 401
    assert "revoked" in refused.error()["message"]
    mde.token = await fetch_token(http, emulators)
    assert (await mde.update({"alertIds": [ID_A]})).status == 200


async def test_token_for_another_audience_is_401_unless_configured(
    mde: MdeApi, ctl: EmulatorControl, http: aiohttp.ClientSession, emulators: Service
) -> None:
    other = "https://api.security.microsoft.com"
    mde.token = await fetch_token(http, emulators, resource=other)

    refused = await mde.update({"alertIds": [ID_A]})
    assert refused.status == 401
    assert other in refused.error()["message"]

    await ctl.configure(accepted_audiences=[other])
    assert (await mde.update({"alertIds": [ID_A]})).status == 200


# --- routes and call records --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "status", "named"),
    [
        ("GET", "/api/alerts/batchUpdate", 405, "POST"),
        ("PATCH", "/api/alerts/batchUpdate", 405, "POST"),  # not an alert called "batchUpdate"
        ("GET", f"/api/alerts/{ID_A}", 405, "PATCH"),
        ("POST", f"/api/alerts/{ID_A}", 405, "PATCH"),
        ("PATCH", "/api/alerts/", 404, "/api/alerts/"),
        ("PATCH", f"/api/alerts/{ID_A}/comments", 404, "/comments"),
        ("POST", "/api/alerts", 404, "/api/alerts"),
        ("POST", "/api/incidents/batchUpdate/x", 404, "/api/incidents/batchUpdate/x"),
    ],
)
async def test_route_errors_are_recorded_as_unknown_api(
    mde: MdeApi, ctl: EmulatorControl, method: str, path: str, status: int, named: str
) -> None:
    async with mde.session.request(
        method, mde.base_url + path, json={"alertIds": [ID_A]}, headers=mde.default_headers()
    ) as response:
        answer = Answer(response.status, response.headers, await response.text())

    assert answer.status == status
    assert named in answer.error()["message"]
    [call] = await ctl.calls()
    assert (call["api"], call["status"], call["admitted"]) == ("unknown", status, False)
    assert await ctl.calls(api="batchUpdate") == []
    assert await ctl.alerts() == {}


async def test_batch_update_record_names_its_api_and_alert_ids(mde: MdeApi, ctl: EmulatorControl) -> None:
    await mde.update({"alertIds": [ID_A, ID_B], "status": "Resolved"})
    await mde.update({"alertIds": [ID_A, 7]})  # 400, but the string ids it named are still listed

    calls = await ctl.calls()
    assert [(c["api"], c["alertIds"], c["status"]) for c in calls] == [
        ("batchUpdate", [ID_A, ID_B], 200),
        ("batchUpdate", [ID_A], 400),
    ]
    assert calls[0]["json"]["alertIds"] == [ID_A, ID_B]  # the raw body stays where it was
    assert await ctl.calls(api="batchUpdate") == calls


# --- body rules --------------------------------------------------------------------------------------


async def test_documented_example_is_200_empty_and_applied(mde: MdeApi, ctl: EmulatorControl) -> None:
    answer = await mde.update(DOCUMENTED_EXAMPLE)

    assert answer.status == 200
    assert answer.text == ""
    assert "Content-Type" not in answer.headers
    for alert_id in DOCUMENTED_EXAMPLE["alertIds"]:
        alert = await ctl.alert(alert_id)
        assert alert is not None
        assert alert["status"] == "Resolved"
        assert alert["assignedTo"] == "secop2@contoso.com"
        assert alert["classification"] == "FalsePositive"
        assert alert["determination"] == "Malware"
        assert alert["comments"] == ["Resolve my alert and assign to secop2"]
    assert await ctl.alert(ID_A) is None


async def test_wrongly_cased_name_is_ignored_and_recorded(mde: MdeApi, ctl: EmulatorControl) -> None:
    answer = await mde.update({"alertIds": [ID_A], "Status": "Resolved", "Comment": "x"})

    assert answer.status == 200
    alert = await ctl.alert(ID_A)
    assert alert is not None
    assert alert["status"] is None
    assert alert["comments"] == []
    [call] = await ctl.calls()
    assert call["ignoredKeys"] == ["Status", "Comment"]


@pytest.mark.parametrize(
    "body",
    [
        {"status": "Resolved"},
        {"alertIds": [], "status": "Resolved"},
        {"AlertIds": [ID_A], "status": "Resolved"},
    ],
    ids=["absent", "empty", "wrong-case"],
)
async def test_missing_alert_ids_is_missing_required_parameter(
    mde: MdeApi, ctl: EmulatorControl, body: dict[str, Any]
) -> None:
    answer = await mde.update(body)

    assert answer.status == 400
    error = answer.error()
    assert error["code"] == "MissingRequiredParameter"
    assert "alertIds" in error["message"]
    assert await ctl.alerts() == {}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("status", "resolved"),
        ("status", "Closed"),
        ("classification", "Informational, expected activity"),
        ("classification", "falsePositive"),
        ("determination", "Clean"),
        ("determination", "Apt"),
        ("determination", "malware"),
        ("status", 3),
        ("assignedTo", ["secop2@contoso.com"]),
        ("comment", {"text": "x"}),
    ],
)
async def test_bad_values_are_invalid_input(
    mde: MdeApi, ctl: EmulatorControl, field: str, value: Any
) -> None:
    answer = await mde.update({"alertIds": [ID_A], "comment": "c", field: value})

    assert answer.status == 400
    error = answer.error()
    assert error["code"] == "InvalidInput"
    assert field in error["message"]
    assert await ctl.alert(ID_A) is None


@pytest.mark.parametrize("alert_ids", [ID_A, [ID_A, 7], [None]], ids=["string", "mixed", "null-item"])
async def test_alert_ids_must_be_a_list_of_strings(mde: MdeApi, alert_ids: Any) -> None:
    answer = await mde.update({"alertIds": alert_ids})

    assert answer.status == 400
    assert answer.error()["code"] == "InvalidInput"


async def test_configured_extra_determination_is_accepted(mde: MdeApi, ctl: EmulatorControl) -> None:
    await ctl.configure(extra_determinations=["Clean"])

    answer = await mde.update({"alertIds": [ID_A], "determination": "Clean"})

    assert answer.status == 200
    alert = await ctl.alert(ID_A)
    assert alert is not None
    assert alert["determination"] == "Clean"


@pytest.mark.parametrize(
    ("data", "content_type"),
    [('{"alertIds": ["x"]}', "text/plain"), ('["x"]', "application/json"), ("{not json", "application/json")],
    ids=["text-plain", "json-list", "broken-json"],
)
async def test_non_json_object_body_is_invalid_request_body(
    mde: MdeApi, ctl: EmulatorControl, data: str, content_type: str
) -> None:
    headers = {"Authorization": f"Bearer {mde.token}", "Content-Type": content_type}

    answer = await mde.update(data=data, headers=headers)

    assert answer.status == 400
    assert answer.error()["code"] == "InvalidRequestBody"
    [call] = await ctl.calls()
    assert call["body"] == data  # the raw text is recorded whatever it is


async def test_batch_size_limit_message_is_exact(mde: MdeApi, ctl: EmulatorControl) -> None:
    await ctl.configure(max_batch=3)
    ids = [f"da63739979405027358{i}_76070737{i}" for i in range(4)]

    too_many = await mde.update({"alertIds": ids, "status": "Resolved"})
    just_right = await mde.update({"alertIds": ids[:3], "status": "Resolved"})

    assert too_many.status == 400
    assert too_many.error()["code"] == "MaximumBatchSizeExceeded"
    assert too_many.error()["message"] == "Maximum batch size exceeded. Received: 4, allowed: 3"
    assert just_right.status == 200
    assert await ctl.alert(ids[3]) is None


async def test_default_batch_limit_is_500(mde: MdeApi) -> None:
    answer = await mde.update({"alertIds": [f"id{i}" for i in range(501)]})

    assert answer.status == 400
    assert answer.error()["message"] == "Maximum batch size exceeded. Received: 501, allowed: 500"


async def test_unknown_id_fails_the_whole_call(mde: MdeApi, ctl: EmulatorControl) -> None:
    await ctl.configure(unknown_ids=[ID_B])

    answer = await mde.update({"alertIds": [ID_A, ID_B], "status": "Resolved"})

    assert answer.status == 404
    assert answer.error()["code"] == "NotFound"
    assert ID_B in answer.error()["message"]
    assert await ctl.alerts() == {}


async def test_comments_are_appended_and_left_out_properties_kept(mde: MdeApi, ctl: EmulatorControl) -> None:
    first = {"alertIds": [ID_A], "status": "InProgress", "classification": "TruePositive", "comment": "one"}
    await mde.update(first)
    await mde.update({"alertIds": [ID_A], "status": "Resolved", "comment": "two"})
    await mde.update({"alertIds": [ID_A], "assignedTo": "a@contoso.com"})

    alert = await ctl.alert(ID_A)
    assert alert is not None
    assert alert["comments"] == ["one", "two"]
    assert (alert["status"], alert["classification"], alert["assignedTo"]) == (
        "Resolved",
        "TruePositive",
        "a@contoso.com",
    )
    assert alert["updateSeqs"] == [1, 2, 3]


# --- single-alert PATCH ------------------------------------------------------------------------------


def utc_time(text: str) -> datetime:
    """An ISO-8601 UTC timestamp as the entity writes it (`...Z`), parsed; fails on anything else."""
    assert text.endswith("Z"), text
    parsed = datetime.fromisoformat(text)
    assert parsed.utcoffset() == timedelta(0), text
    return parsed


async def test_patch_answers_the_updated_entity_and_appends_comments(
    mde: MdeApi, ctl: EmulatorControl
) -> None:
    first = await mde.patch(
        ID_A, {"status": "InProgress", "classification": "TruePositive", "comment": "one"}
    )
    second = await mde.patch(
        ID_A,
        {"status": "Resolved", "determination": "Malware", "assignedTo": "a@contoso.com", "comment": "two"},
    )

    assert (first.status, second.status) == (200, 200)
    assert second.headers["Content-Type"].startswith("application/json")
    entity = json.loads(second.text)
    comments = entity.pop("comments")
    assert entity == {
        "id": ID_A,
        "status": "Resolved",
        "classification": "TruePositive",  # left out of the second call: kept
        "determination": "Malware",
        "assignedTo": "a@contoso.com",
    }
    assert [c["comment"] for c in comments] == ["one", "two"]  # appended, never replaced
    assert all(set(c) == {"comment", "createdTime"} for c in comments)
    assert json.loads(first.text)["comments"] == comments[:1]
    walls = [c["wallTime"] for c in await ctl.calls()]
    created = [utc_time(c["createdTime"]).timestamp() for c in comments]
    assert walls[0] - 0.001 <= created[0] <= walls[1] <= created[1] + 0.001  # applied by its own call
    alert = await ctl.alert(ID_A)
    assert alert is not None
    assert (alert["comments"], alert["updateSeqs"]) == (["one", "two"], [1, 2])


async def test_patch_of_a_fresh_alert_with_an_empty_body_changes_nothing(
    mde: MdeApi, ctl: EmulatorControl
) -> None:
    answer = await mde.patch(ID_A, {})

    assert answer.status == 200
    assert json.loads(answer.text) == {
        "id": ID_A,
        "status": None,
        "classification": None,
        "determination": None,
        "assignedTo": None,
        "comments": [],
    }
    alert = await ctl.alert(ID_A)
    assert alert is not None
    assert alert["updateSeqs"] == [1]  # like batchUpdate with only alertIds: accepted, and it counts


async def test_patch_works_under_a_prefixed_base_path(mde: MdeApi, ctl: EmulatorControl) -> None:
    mde.base_url += "/tenant-x"

    answer = await mde.patch(ID_A, {"status": "Resolved"})

    assert answer.status == 200
    [call] = await ctl.calls()
    assert (call["api"], call["alertIds"], call["path"]) == ("patch", [ID_A], f"/tenant-x/api/alerts/{ID_A}")


async def test_patch_ignores_wrongly_cased_names_and_alert_ids(mde: MdeApi, ctl: EmulatorControl) -> None:
    body = {"Status": "Resolved", "alertIds": [ID_B], "classification": "FalsePositive", "Comment": "x"}

    answer = await mde.patch(ID_A, body)

    assert answer.status == 200
    entity = json.loads(answer.text)
    assert (entity["status"], entity["classification"], entity["comments"]) == (None, "FalsePositive", [])
    assert await ctl.alert(ID_B) is None  # the body's alertIds named nothing
    [call] = await ctl.calls()
    assert call["ignoredKeys"] == ["Status", "alertIds", "Comment"]
    assert (call["api"], call["method"], call["alertIds"]) == ("patch", "PATCH", [ID_A])


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("status", "resolved"),
        ("classification", "falsePositive"),
        ("determination", "Clean"),
        ("assignedTo", 7),
        ("comment", ["x"]),
    ],
)
async def test_patch_bad_values_are_invalid_input(
    mde: MdeApi, ctl: EmulatorControl, field: str, value: Any
) -> None:
    answer = await mde.patch(ID_A, {"comment": "c", field: value})

    assert answer.status == 400
    error = answer.error()
    assert error["code"] == "InvalidInput"
    assert field in error["message"]
    assert await ctl.alert(ID_A) is None


@pytest.mark.parametrize(
    ("data", "content_type"),
    [('{"status": "New"}', "text/plain"), ('["New"]', "application/json")],
    ids=["text-plain", "json-list"],
)
async def test_patch_non_json_object_body_is_invalid_request_body(
    mde: MdeApi, ctl: EmulatorControl, data: str, content_type: str
) -> None:
    headers = {"Authorization": f"Bearer {mde.token}", "Content-Type": content_type}

    answer = await mde.patch(ID_A, data=data, headers=headers)

    assert answer.status == 400
    assert answer.error()["code"] == "InvalidRequestBody"
    assert await ctl.alert(ID_A) is None


async def test_unknown_id_is_404_on_both_apis_and_applies_nothing(mde: MdeApi, ctl: EmulatorControl) -> None:
    await ctl.configure(unknown_ids=[ID_B])

    patched = await mde.patch(ID_B, {"status": "Resolved", "comment": "c"})
    batched = await mde.update({"alertIds": [ID_A, ID_B], "status": "Resolved", "comment": "c"})

    for answer in (patched, batched):
        assert answer.status == 404
        assert answer.error()["code"] == "NotFound"
        assert ID_B in answer.error()["message"]
    assert await ctl.alerts() == {}
    assert (await mde.patch(ID_A, {"comment": "c"})).status == 200  # a known id is still served


@pytest.mark.parametrize("exhausted", ["batchUpdate", "patch"])
async def test_each_api_has_its_own_rate_limit(mde: MdeApi, ctl: EmulatorControl, exhausted: str) -> None:
    await ctl.configure(rate_limits="2/60", patch_rate_limits="2/60")
    other = "patch" if exhausted == "batchUpdate" else "batchUpdate"

    async def status(api: str) -> int:
        answer = await (mde.update({"alertIds": [ID_A]}) if api == "batchUpdate" else mde.patch(ID_A))
        return answer.status

    first = [await status(exhausted) for _ in range(3)]
    then = [await status(other) for _ in range(3)]

    assert first == [200, 200, 429]
    assert then == [200, 200, 429]  # a full budget on one API does not refuse the other
    calls = await ctl.calls()
    assert [c["api"] for c in calls] == [exhausted] * 3 + [other] * 3
    assert [c["admitted"] for c in calls] == [True, True, False] * 2


async def test_patch_429_has_retry_after_and_refused_calls_do_not_count(
    mde: MdeApi, ctl: EmulatorControl
) -> None:
    await ctl.configure(patch_rate_limits="1/60")

    unauthenticated = await mde.patch(ID_A, {"comment": "x"}, headers={"Content-Type": "application/json"})
    admitted = await mde.patch(ID_A, {"comment": "one"})
    refused = await mde.patch(ID_A, {"comment": "two"})

    assert [a.status for a in (unauthenticated, admitted, refused)] == [401, 200, 429]  # 401 not counted
    assert refused.error()["code"] == "TooManyRequests"
    times = [c["time"] for c in await ctl.calls()]
    assert refused.headers["Retry-After"] == retry_after_header(times[1] + 60 - times[2])
    assert int(refused.headers["Retry-After"]) >= 1
    alert = await ctl.alert(ID_A)
    assert alert is not None
    assert alert["comments"] == ["one"]

    await ctl.configure(patch_rate_limits="2/60")  # room for one more, unless the 429 had counted
    assert [(await mde.patch(ID_A)).status for _ in range(2)] == [200, 429]


async def test_patch_rate_limits_config_field(mde: MdeApi, ctl: EmulatorControl) -> None:
    assert (await ctl.configure(patchRateLimits="1/60"))["patchRateLimits"] == "1/60"
    assert [(await mde.patch(ID_A)).status for _ in range(2)] == [200, 429]

    config = await ctl.configure(patch_rate_limits="")  # changes the live limiter, keeps batchUpdate's

    assert (config["patchRateLimits"], config["rateLimits"]) == ("", "10/60,500/3600")
    assert [(await mde.patch(ID_A)).status for _ in range(3)] == [200, 200, 200]
    for bad in ("1/0", 5):
        with pytest.raises(EmulatorControlError, match="patchRateLimits"):
            await ctl.configure(patch_rate_limits=bad)
    assert (await ctl.configure())["patchRateLimits"] == ""


def test_patch_rate_limits_command_line_flag() -> None:
    required = ["--mde-port", "0", "--identity-port", "0", "--identity-header", "s"]
    parser = build_parser()

    assert parser.parse_args(required).patch_rate_limits == parse_rate_limits("100/60,1500/3600")
    assert parser.parse_args([*required, "--patch-rate-limits", "3/10"]).patch_rate_limits == (
        RateLimit(3, 10.0),
    )
    assert parser.parse_args([*required, "--patch-rate-limits", ""]).patch_rate_limits == ()
    assert parser.parse_args([*required, "--patch-rate-limits", "3/10"]).rate_limits == parse_rate_limits(
        "10/60,500/3600"
    )
    with pytest.raises(SystemExit):
        parser.parse_args([*required, "--patch-rate-limits", "3"])


async def test_each_comment_lands_once_per_alert_across_both_apis(mde: MdeApi, ctl: EmulatorControl) -> None:
    await mde.update({"alertIds": [ID_A, ID_B], "status": "InProgress", "comment": "b1"})
    await mde.patch(ID_A, {"comment": "p1"})
    last = await mde.patch(ID_B, {"status": "Resolved", "comment": "p2"})
    await mde.update({"alertIds": [ID_A], "comment": "b2"})

    alerts = await ctl.alerts()
    assert (alerts[ID_A]["comments"], alerts[ID_A]["updateSeqs"]) == (["b1", "p1", "b2"], [1, 2, 4])
    assert (alerts[ID_B]["comments"], alerts[ID_B]["updateSeqs"]) == (["b1", "p2"], [1, 3])
    assert [(e["comment"], e["seq"]) for e in alerts[ID_A]["commentEntries"]] == [
        ("b1", 1),
        ("p1", 2),
        ("b2", 4),
    ]
    entity = json.loads(last.text)
    assert (entity["status"], [c["comment"] for c in entity["comments"]]) == ("Resolved", ["b1", "p2"])
    calls = await ctl.calls()
    assert [(c["api"], c["alertIds"]) for c in calls] == [
        ("batchUpdate", [ID_A, ID_B]),
        ("patch", [ID_A]),
        ("patch", [ID_B]),
        ("batchUpdate", [ID_A]),
    ]
    assert [c["seq"] for c in await ctl.calls(api="patch")] == [2, 3]


# --- faults ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (500, "InternalServerError"),
        (502, "BadGateway"),
        (503, "ServiceUnavailable"),
        (504, "GatewayTimeout"),
        (400, "InvalidInput"),
        (401, "Unauthorized"),
        (403, "Forbidden"),
        (404, "NotFound"),
    ],
)
async def test_status_fault_answers_once_then_normal(
    mde: MdeApi, ctl: EmulatorControl, status: int, code: str
) -> None:
    await ctl.add_faults([{"status": status}])

    faulted = await mde.update(DOCUMENTED_EXAMPLE)
    normal = await mde.update(DOCUMENTED_EXAMPLE)

    assert faulted.status == status
    assert faulted.error()["code"] == code
    assert faulted.headers["Content-Type"].startswith("application/json")
    assert normal.status == 200
    calls = await ctl.calls()
    assert calls[0]["fault"] == {"status": status}
    alert = await ctl.alert(DOCUMENTED_EXAMPLE["alertIds"][0])
    assert alert is not None
    assert alert["updateSeqs"] == [2]  # the faulted call applied nothing


async def test_forbidden_fault_has_missing_role_message(mde: MdeApi, ctl: EmulatorControl) -> None:
    await ctl.add_faults([{"status": 403}, {"status": 500, "code": "Custom", "message": "custom text"}])

    forbidden = (await mde.update({"alertIds": [ID_A]})).error()
    custom = (await mde.update({"alertIds": [ID_A]})).error()

    assert forbidden["message"] == "Missing application roles. API required roles: Alert.ReadWrite.All"
    assert (custom["code"], custom["message"]) == ("Custom", "custom text")


async def test_429_fault_has_retry_after(mde: MdeApi, ctl: EmulatorControl) -> None:
    await ctl.add_faults([{"status": 429, "retryAfter": 7}, {"status": 429}])

    first = await mde.update({"alertIds": [ID_A]})
    second = await mde.update({"alertIds": [ID_A]})

    assert (first.status, first.headers["Retry-After"], first.error()["code"]) == (
        429,
        "7",
        "TooManyRequests",
    )
    assert (second.status, second.headers["Retry-After"]) == (429, "1")


async def test_delay_fault_without_apply_answers_200_late_and_applies_nothing(
    mde: MdeApi, ctl: EmulatorControl
) -> None:
    await ctl.add_faults([{"delaySeconds": 0.6, "apply": False}])

    with pytest.raises(TimeoutError):
        await mde.update({"alertIds": [ID_A], "status": "Resolved"}, give_up_after=0.2)

    async def answered() -> bool:
        return bool((await ctl.calls())[0]["status"] == 200)

    await wait_until(answered)
    assert await ctl.alert(ID_A) is None


async def test_delay_fault_with_apply_applies_after_the_client_gave_up(
    mde: MdeApi, ctl: EmulatorControl
) -> None:
    await ctl.add_faults([{"delaySeconds": 0.6, "apply": True}])

    with pytest.raises(TimeoutError):
        await mde.update({"alertIds": [ID_A], "status": "Resolved"}, give_up_after=0.2)
    assert await ctl.alert(ID_A) is None  # not yet: still sleeping

    async def applied() -> bool:
        return await ctl.alert(ID_A) is not None

    await wait_until(applied)


async def test_delay_fault_a_patient_client_sees_the_normal_answer(mde: MdeApi, ctl: EmulatorControl) -> None:
    await ctl.add_faults([{"delaySeconds": 0.3}])

    started = time.monotonic()
    answer = await mde.update({"alertIds": [ID_A], "status": "Bogus"})

    assert time.monotonic() - started >= 0.3
    assert answer.status == 400  # after the delay, normal processing (validation included)


@pytest.mark.parametrize("apply", [False, True])
async def test_reset_fault_drops_the_connection(mde: MdeApi, ctl: EmulatorControl, apply: bool) -> None:
    await ctl.add_faults([{"reset": True, "apply": apply}])

    with pytest.raises(aiohttp.ClientConnectionError):
        await mde.update({"alertIds": [ID_A], "status": "Resolved"})

    [call] = await ctl.calls()
    assert call["aborted"] is True
    assert call["status"] is None
    assert (await ctl.alert(ID_A) is not None) is apply
    assert (await mde.update({"alertIds": [ID_B]})).status == 200  # the next call is served normally


async def test_bad_fault_script_is_refused_whole(ctl: EmulatorControl) -> None:
    with pytest.raises(Exception, match="Unknown fault field"):
        await ctl.add_faults([{"status": 500}, {"stauts": 500}])
    assert await ctl.pending_faults() == []


async def test_faults_are_consumed_only_by_admitted_calls(mde: MdeApi, ctl: EmulatorControl) -> None:
    await ctl.configure(rate_limits="2/30")
    await ctl.add_faults([{"status": 503}])

    unauthenticated = await mde.update({"alertIds": [ID_A]}, headers={"Content-Type": "application/json"})
    faulted = await mde.update({"alertIds": [ID_A]})
    normal = await mde.update({"alertIds": [ID_A]})
    await ctl.add_faults([{"status": 500}])
    limited = await mde.update({"alertIds": [ID_A]})

    assert [a.status for a in (unauthenticated, faulted, normal, limited)] == [401, 503, 200, 429]
    assert await ctl.pending_faults() == [{"status": 500}]  # the 429'd call did not consume it
    assert [c["admitted"] for c in await ctl.calls()] == [False, True, True, False]


async def test_fault_with_api_is_taken_only_by_that_api(mde: MdeApi, ctl: EmulatorControl) -> None:
    await ctl.add_faults([{"status": 503, "api": "patch"}, {"status": 500}])

    batched = await mde.update({"alertIds": [ID_A], "comment": "b"})  # passes the PATCH fault by
    pending = await ctl.pending_faults()
    patched = await mde.patch(ID_A, {"comment": "p"})
    again = await mde.patch(ID_A, {"comment": "p"})

    assert pending == [{"status": 503, "api": "patch"}]
    assert [a.status for a in (batched, patched, again)] == [500, 503, 200]
    assert [c["fault"] for c in await ctl.calls()] == [{"status": 500}, {"status": 503, "api": "patch"}, None]
    alert = await ctl.alert(ID_A)
    assert alert is not None
    assert (alert["comments"], alert["updateSeqs"]) == (["p"], [3])  # faulted calls applied nothing


async def test_fault_without_api_is_taken_by_patch_too(mde: MdeApi, ctl: EmulatorControl) -> None:
    await ctl.add_faults([{"status": 502, "api": "batchUpdate"}, {"status": 504}])

    first = await mde.patch(ID_A)
    second = await mde.patch(ID_A)
    pending = await ctl.pending_faults()
    batched = await mde.update({"alertIds": [ID_A]})

    assert [a.status for a in (first, second, batched)] == [504, 200, 502]
    assert first.error()["code"] == "GatewayTimeout"
    assert pending == [{"status": 502, "api": "batchUpdate"}]
    assert await ctl.pending_faults() == []


@pytest.mark.parametrize("api", ["PATCH", "batchupdate", "unknown", 1])
async def test_fault_api_must_name_an_api(ctl: EmulatorControl, api: Any) -> None:
    with pytest.raises(EmulatorControlError, match="'api'"):
        await ctl.add_faults([{"status": 500}, {"status": 500, "api": api}])
    assert await ctl.pending_faults() == []


@pytest.mark.parametrize("apply", [False, True])
async def test_reset_fault_on_patch_applies_only_if_told(
    mde: MdeApi, ctl: EmulatorControl, apply: bool
) -> None:
    await ctl.add_faults([{"reset": True, "apply": apply, "api": "patch"}])

    with pytest.raises(aiohttp.ClientConnectionError):
        await mde.patch(ID_A, {"status": "Resolved", "comment": "c"})

    [call] = await ctl.calls()
    assert (call["api"], call["aborted"], call["status"]) == ("patch", True, None)
    alert = await ctl.alert(ID_A)
    assert (alert is not None and alert["comments"] == ["c"]) is apply
    assert (alert is not None and alert["updateSeqs"] == [1]) is apply


async def test_delay_fault_on_patch_answers_the_entity_applied_or_not(
    mde: MdeApi, ctl: EmulatorControl
) -> None:
    await ctl.add_faults([{"delaySeconds": 0.05, "apply": True}, {"delaySeconds": 0.05, "apply": False}])

    applied = await mde.patch(ID_A, {"status": "Resolved", "comment": "kept"})
    dropped = await mde.patch(ID_A, {"status": "New", "comment": "lost"})

    assert (applied.status, dropped.status) == (200, 200)
    for answer in (applied, dropped):  # apply: false answers the alert as it stands, unchanged
        entity = json.loads(answer.text)
        assert (entity["status"], [c["comment"] for c in entity["comments"]]) == ("Resolved", ["kept"])
    alert = await ctl.alert(ID_A)
    assert alert is not None
    assert (alert["comments"], alert["updateSeqs"]) == (["kept"], [1])


# --- rate limits -------------------------------------------------------------------------------------


async def test_limit_refuses_with_retry_after_then_admits_again(mde: MdeApi, ctl: EmulatorControl) -> None:
    await ctl.configure(rate_limits="3/1")

    assert await statuses(mde, 3) == [200, 200, 200]
    refused = await mde.update({"alertIds": [ID_A]})
    assert refused.status == 429
    assert refused.error()["code"] == "TooManyRequests"
    retry_after = int(refused.headers["Retry-After"])
    assert retry_after >= 1

    await asyncio.sleep(retry_after)
    assert (await mde.update({"alertIds": [ID_A]})).status == 200


async def test_window_slides_across_fixed_window_boundaries(mde: MdeApi, ctl: EmulatorControl) -> None:
    """3/1: a fixed window (aligned to wall seconds, or to the first call) would admit D and F.

    Planned wall times, k a whole second: A k+.20; B, C k+.60; D k+1.10; E k+1.35; F k+1.45.
    D crosses the wall-second boundary but A is still within 1 s: refused. E comes after A left:
    admitted. F has B, C, E within 1 s: refused, although a window started at A would have reset.
    """
    await ctl.configure(rate_limits="3/1")
    k = math.floor(time.time()) + 1
    answers = []
    for offset, count in [(0.20, 1), (0.60, 2), (1.10, 1), (1.35, 1), (1.45, 1)]:
        await sleep_until_wall(k + offset)
        answers += [await mde.update({"alertIds": [ID_A]}) for _ in range(count)]

    calls = await ctl.calls()
    wall = [c["wallTime"] for c in calls]
    mono = [c["time"] for c in calls]
    # Timing preconditions, measured by the server: if these fail the machine was too slow, not the code.
    assert [math.floor(w) for w in wall[:4]] == [k, k, k, k + 1], wall
    assert mono[3] - mono[0] < 1 <= mono[4] - mono[0], mono
    assert mono[5] - mono[1] < 1, mono

    assert [a.status for a in answers] == [200, 200, 200, 429, 200, 429]
    assert answers[3].headers["Retry-After"] == "1"
    admitted = [c["time"] for c in calls if c["admitted"]]
    assert max_calls_in_any_window(admitted, 1.0) == 3


async def test_refused_calls_do_not_count(mde: MdeApi, ctl: EmulatorControl) -> None:
    await ctl.configure(rate_limits="2/1")
    assert await statuses(mde, 2) == [200, 200]
    await asyncio.sleep(0.5)
    assert await statuses(mde, 1) == [429]
    await asyncio.sleep(0.6)

    assert await statuses(mde, 2) == [200, 200]  # the refused call would have blocked the second
    times = [c["time"] for c in await ctl.calls()]
    assert times[3] - times[2] < 1, times  # precondition: the refused call is within the window


async def test_reset_restores_command_line_config(ctl: EmulatorControl, mde: MdeApi) -> None:
    changed = await ctl.configure(rate_limits="1/5", patch_rate_limits="1/5", max_batch=2, unknown_ids=["x"])
    await mde.update({"alertIds": [ID_A], "comment": "c"})

    await ctl.reset()

    assert (changed["maxBatch"], changed["patchRateLimits"]) == (2, "1/5")
    restored = await ctl.configure()
    assert restored == {
        "rateLimits": "10/60,500/3600",
        "patchRateLimits": "100/60,1500/3600",
        "maxBatch": 500,
        "unknownIds": [],
        "acceptedAudiences": ["https://api.securitycenter.microsoft.com"],
        "extraDeterminations": [],
    }
    assert await ctl.calls() == []
    assert await ctl.alerts() == {}


# --- tenants -----------------------------------------------------------------------------------------


async def test_calls_carry_the_token_tenant(
    mde: MdeApi, ctl: EmulatorControl, http: aiohttp.ClientSession, emulators: Service
) -> None:
    tenant_a = MdeApi(http, emulators.urls["mde"], await fetch_tenant_token(http, emulators, TENANT_A))

    assert (await mde.update({"alertIds": [ID_A]})).status == 200  # the identity's token: home tenant
    assert (await tenant_a.patch(ID_B, {"status": "Resolved"})).status == 200
    assert (await mde.update({"alertIds": [ID_A]}, headers={})).status == 401

    calls = await ctl.calls()
    assert [(c["tenantId"], c["clientId"]) for c in calls] == [
        (HOME_TENANT_ID, "00000000-0000-4000-8000-00000000a1e7"),
        (TENANT_A, APP_CLIENT_ID),
        (None, None),  # refused before its token was accepted: no tenant
    ]
    assert [c["api"] for c in await ctl.calls(tenant_id=TENANT_A.upper())] == ["patch"]
    assert list(await ctl.alerts()) == [ID_A]  # the home tenant's, as before tenants existed
    assert list(await ctl.alerts(tenant_id=TENANT_A)) == [ID_B]
    tenants = await ctl.tenants()
    assert tenants["homeTenantId"] == HOME_TENANT_ID
    assert {tid: (t["calls"], t["alerts"]) for tid, t in tenants["tenants"].items()} == {
        HOME_TENANT_ID: (1, 1),
        TENANT_A: (1, 1),
    }


async def test_fault_with_tenant_is_taken_only_by_that_tenant(
    mde: MdeApi, ctl: EmulatorControl, http: aiohttp.ClientSession, emulators: Service
) -> None:
    tenant_b = MdeApi(http, emulators.urls["mde"], await fetch_tenant_token(http, emulators, TENANT_B))
    await ctl.add_faults([{"status": 503, "tenantId": TENANT_B}])

    assert (await mde.update({"alertIds": [ID_A]})).status == 200  # the home tenant's call passes it by
    assert (await tenant_b.update({"alertIds": [ID_A]})).status == 503
    assert await ctl.pending_faults() == []
    assert await ctl.alert(ID_A, tenant_id=TENANT_B) is None


async def test_reset_forgets_tenants_and_their_limits(
    ctl: EmulatorControl, http: aiohttp.ClientSession, emulators: Service
) -> None:
    await ctl.configure(tenant_id=TENANT_A, rate_limits="1/60", patch_rate_limits="1/60")
    tenant_a = MdeApi(http, emulators.urls["mde"], await fetch_tenant_token(http, emulators, TENANT_A))
    assert [(await tenant_a.update({"alertIds": [ID_A]})).status for _ in range(2)] == [200, 429]

    await ctl.reset()

    assert (await ctl.tenants())["tenants"] == {
        HOME_TENANT_ID: {
            "rateLimits": "10/60,500/3600",
            "patchRateLimits": "100/60,1500/3600",
            "own": [],
            "calls": 0,
            "alerts": 0,
        }
    }
    assert await ctl.alerts(tenant_id=TENANT_A) == {}
    assert (await tenant_a.update({"alertIds": [ID_A]})).status == 200  # a fresh budget


async def test_changing_the_configured_limits_reaches_every_tenant_without_its_own(
    ctl: EmulatorControl, http: aiohttp.ClientSession, emulators: Service
) -> None:
    await ctl.configure(tenant_id=TENANT_B, rate_limits="5/60")
    tenant_a = MdeApi(http, emulators.urls["mde"], await fetch_tenant_token(http, emulators, TENANT_A))
    tenant_b = MdeApi(http, emulators.urls["mde"], await fetch_tenant_token(http, emulators, TENANT_B))
    assert (await tenant_a.update({"alertIds": [ID_A]})).status == 200
    assert (await tenant_b.update({"alertIds": [ID_A]})).status == 200

    await ctl.configure(rate_limits="1/60")  # A's existing budget follows, B keeps its own

    assert (await tenant_a.update({"alertIds": [ID_A]})).status == 429
    assert (await tenant_b.update({"alertIds": [ID_A]})).status == 200
    assert (await ctl.configure(tenant_id=TENANT_B))["rateLimits"] == "5/60"


@pytest.mark.parametrize(
    "fields",
    [
        {"tenant_id": "not-a-guid", "rate_limits": "1/60"},
        {"tenant_id": TENANT_A, "max_batch": 2},
        {"tenant_id": TENANT_A, "rate_limits": "1"},
        {"tenant_id": TENANT_A, "patch_rate_limits": 5},
    ],
    ids=["bad-tenant", "global-field", "bad-limits", "limits-not-text"],
)
async def test_bad_tenant_config_is_refused_and_changes_nothing(
    ctl: EmulatorControl, fields: dict[str, Any]
) -> None:
    with pytest.raises(EmulatorControlError, match="400"):
        await ctl.configure(**fields)
    assert (await ctl.configure(tenant_id=TENANT_A))["rateLimits"] == "10/60,500/3600"
    assert (await ctl.configure())["maxBatch"] == 500


async def test_tenant_names_in_control_requests_are_checked(ctl: EmulatorControl) -> None:
    requests: list[Callable[[], Awaitable[Any]]] = [
        lambda: ctl.alerts(tenant_id="x"),
        lambda: ctl.alert(ID_A, tenant_id="x"),
        lambda: ctl.calls(tenant_id="x"),
        lambda: ctl.add_faults([{"status": 503, "tenantId": "x"}]),
    ]
    for request in requests:
        with pytest.raises(EmulatorControlError, match="400"):
            await request()
    assert await ctl.pending_faults() == []


def test_identity_options_must_be_guids() -> None:
    required = ["--mde-port", "0", "--identity-port", "0", "--identity-header", "h"]
    parser = build_parser()
    args = parser.parse_args(required)
    assert (args.home_tenant_id, args.identity_principal_id, args.app_client_id) == (
        HOME_TENANT_ID,
        IDENTITY_PRINCIPAL_ID,
        APP_CLIENT_ID,
    )
    assert (args.entra_port, args.entra_cert_file) == (0, None)
    assert parser.parse_args([*required, "--home-tenant-id", TENANT_A.upper()]).home_tenant_id == TENANT_A
    for option in ("--home-tenant-id", "--identity-principal-id", "--app-client-id"):
        with pytest.raises(SystemExit):
            parser.parse_args([*required, option, "contoso"])


# --- pure helpers ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("times", "window", "expected"),
    [
        ([], 1.0, 0),
        ([5.0], 1.0, 1),
        ([0.0, 1.0, 2.0], 1.0, 1),  # half-open: a call exactly one window later is outside
        ([0.0, 0.5, 0.99, 1.0], 1.0, 3),
        ([2.0, 0.1, 1.15, 0.2, 1.0], 1.0, 3),  # unsorted input
        ([3.0, 3.0, 3.0], 0.001, 3),
        ([0.0, 0.9, 1.8, 2.7], 1.0, 2),
        ([float(i) for i in range(100)], 10.0, 10),
    ],
)
def test_max_calls_in_any_window(times: list[float], window: float, expected: int) -> None:
    assert max_calls_in_any_window(times, window) == expected


def test_max_calls_in_any_window_rejects_empty_window() -> None:
    with pytest.raises(ValueError):
        max_calls_in_any_window([1.0], 0)


def test_parse_rate_limits() -> None:
    assert [(r.calls, r.seconds) for r in parse_rate_limits("10/60, 500/3600")] == [(10, 60.0), (500, 3600.0)]
    assert [(r.calls, r.seconds) for r in parse_rate_limits("5/2.5")] == [(5, 2.5)]
    assert parse_rate_limits("") == ()
    for bad in ("10", "0/60", "10/0", "x/60", "10/-1", "10/inf"):
        with pytest.raises(ValueError):
            parse_rate_limits(bad)


def test_limiter_is_sliding_not_fixed() -> None:
    """Deterministic clock (binary-exact times, so no float rounding at the window edges)."""
    limiter = SlidingWindowLimiter(parse_rate_limits("3/1"))
    assert [limiter.try_admit(t) for t in (0.25, 0.5, 0.5)] == [None, None, None]
    assert limiter.try_admit(1.125) == 0.125  # crossed a whole second, but 0.25 is inside until 1.25
    assert limiter.try_admit(1.25) is None  # a call leaves exactly one window later
    assert limiter.try_admit(1.375) == 0.125  # a window started at 0.25 would have reset; 0.5 x2 leave at 1.5
    assert limiter.try_admit(1.5) is None


def test_limiter_honours_every_window() -> None:
    limiter = SlidingWindowLimiter(parse_rate_limits("2/1,3/10"))
    assert [limiter.try_admit(t) for t in (0.0, 0.1)] == [None, None]
    assert limiter.try_admit(0.5) == pytest.approx(0.5)  # short window full
    assert limiter.try_admit(1.5) is None
    assert limiter.try_admit(2.0) == pytest.approx(8.0)  # long window full until 0.0 + 10


# --- a private process: command-line options, revoking everything, clean exit -------------------------

OTHER_AUDIENCE = "https://api.security.microsoft.com"


@pytest.fixture
def private_emulators(tmp_path: Path) -> Iterator[Service]:
    """An emulator process of its own, so revoking every token cannot disturb other tests' hosts."""
    args = ["--rate-limits", "2/60", "--patch-rate-limits", "1/60", "--max-batch", "2"]
    args += ["--token-lifetime-seconds", "120"]
    args += ["--audience", MDE_RESOURCE, "--audience", OTHER_AUDIENCE]
    service = start_emulators(tmp_path, identity_header="private-secret", extra_args=args)
    yield service
    service.stop()


async def test_command_line_options_revoke_all_and_clean_exit(
    private_emulators: Service, http: aiohttp.ClientSession
) -> None:
    service = private_emulators
    async with EmulatorControl(service.urls["mde"], service.urls["identity_base"]) as ctl:
        assert await ctl.configure() == {
            "rateLimits": "2/60",
            "patchRateLimits": "1/60",
            "maxBatch": 2,
            "unknownIds": [],
            "acceptedAudiences": [OTHER_AUDIENCE, MDE_RESOURCE],
            "extraDeterminations": [],
        }
        params = {"api-version": "2019-08-01", "resource": MDE_RESOURCE}
        headers = {"X-IDENTITY-HEADER": "private-secret"}
        async with http.get(service.urls["identity"], params=params, headers=headers) as response:
            issued = await response.json()
        assert abs(int(issued["expires_on"]) - (time.time() + 120)) <= 2
        other = MdeApi(http, service.urls["mde"], await fetch_token(http, service, resource=OTHER_AUDIENCE))
        api = MdeApi(http, service.urls["mde"], issued["access_token"])

        assert (await other.update({"alertIds": [ID_A]})).status == 200  # second audience accepted
        assert [(await api.patch(ID_B)).status for _ in range(2)] == [200, 429]  # --patch-rate-limits
        too_many = await api.update({"alertIds": [ID_A, ID_B, "x"]})
        assert too_many.error()["message"] == "Maximum batch size exceeded. Received: 3, allowed: 2"

        assert await ctl.revoke_tokens() == 2
        assert (await api.update({"alertIds": [ID_A]})).status == 401
        assert (await other.update({"alertIds": [ID_A]})).status == 401
        api.token = await fetch_token(http, service)
        await ctl.identity_reset(revoke_tokens=True)
        assert "revoked" in (await api.update({"alertIds": [ID_A]})).error()["message"]

    assert await asyncio.to_thread(service.stop) == 0
    log = service.log_path.read_text().splitlines()
    # The fields older parsers read come first, unchanged; the Entra server's are appended.
    assert log[0] == (
        f"EMULATORS READY mde={service.urls['mde']} identity={service.urls['identity']} "
        f"entra={service.urls['entra']} entra_cert={service.urls['entra_cert']}"
    )
    assert sum(" mde POST /api/alerts/batchUpdate " in line for line in log) == 5
    assert sum(f" mde PATCH /api/alerts/{ID_B} " in line for line in log) == 2
