"""The validator of answers against openapi.yaml (tests/openapi_answers.py), on answers made up here.

It guards every integration and reliability test, so it must pass what the spec describes and refuse
what it does not: otherwise those tests would pass vacuously.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.openapi_answers import OpenApiAnswers, OpenApiViolation, spec_answers

OPERATION_ID = "3f1c0e52-5d7a-4f8e-9a57-2f1f3c9b7e10"
BATCH = "/api/alerts/batchUpdate"
JSON_TYPE = {"Content-Type": "application/json; charset=utf-8"}
PROBLEM_TYPE = {"Content-Type": "application/problem+json; charset=utf-8"}


def summary(**changes: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "operationId": OPERATION_ID,
        "status": "Succeeded",
        "alertCount": 2,
        "chunks": [{"chunkId": "000000000001", "alertCount": 2, "status": "Succeeded", "attempts": 1}],
    }
    return {**document, **changes}


def problem(http_status: int, **changes: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "type": "https://alertgate.invalid/problems/invalid-request",
        "title": "Invalid request",
        "status": http_status,
        "detail": "alertIds[0] is not an MDE alert id",
        "errors": [{"field": "alertIds[0]", "message": "is not an MDE alert id"}],
    }
    return {**document, **changes}


def found(
    method: str, path: str, status: int, document: Any, headers: dict[str, str] | None = None
) -> list[str]:
    body = json.dumps(document).encode()
    return spec_answers().violations(method, path, status, headers or JSON_TYPE, body)


def test_a_documented_answer_passes() -> None:
    location = {**JSON_TYPE, "Location": f"https://h/api/operations/{OPERATION_ID}"}
    assert found("POST", BATCH, 200, summary(), location) == []
    assert found("POST", BATCH, 400, problem(400), PROBLEM_TYPE) == []


def test_a_running_operation_with_its_headers_passes() -> None:
    headers = {**JSON_TYPE, "location": f"https://h/api/operations/{OPERATION_ID}", "retry-after": "3"}
    document = {"operationId": OPERATION_ID, "status": "Running", "chunks": []}
    assert found("GET", f"/api/operations/{OPERATION_ID}", 202, document, headers) == []


def test_an_undocumented_status_fails() -> None:
    faults = found("GET", "/api/health", 418, {"status": "Healthy"})
    assert len(faults) == 1 and "status 418 is not documented" in faults[0], faults


def test_a_missing_required_field_fails() -> None:
    document = summary()
    del document["operationId"]
    faults = found("POST", BATCH, 200, document)
    assert any("body: 'operationId' is a required property" in f for f in faults), faults


def test_a_wrong_type_fails() -> None:
    faults = found("POST", BATCH, 200, summary(alertCount="2"))
    assert any("body.alertCount: '2' is not of type 'integer'" in f for f in faults), faults


def test_a_null_where_the_schema_says_string_fails() -> None:
    document = {"operationId": OPERATION_ID, "status": "Succeeded", "caller": {"principalName": None}}
    faults = found("GET", f"/api/operations/{OPERATION_ID}", 200, document)
    assert any("body.caller.principalName: None is not of type 'string'" in f for f in faults), faults


def test_a_wrong_format_and_a_value_outside_the_enum_fail() -> None:
    faults = found("POST", BATCH, 200, summary(operationId="not-a-uuid", status="Done"))
    assert any("body.operationId" in f and "uuid" in f for f in faults), faults
    assert any("body.status: 'Done' is not one of" in f for f in faults), faults


def test_a_missing_required_header_fails_and_a_mistyped_one_too() -> None:
    document = {"operationId": OPERATION_ID, "status": "Running"}
    faults = found(
        "GET", f"/api/operations/{OPERATION_ID}", 202, document, {**JSON_TYPE, "Retry-After": "soon"}
    )
    assert "header Location is required but absent" in faults, faults
    assert "header Retry-After must be an integer, got 'soon'" in faults, faults


def test_a_problem_must_carry_the_http_status_and_its_media_type() -> None:
    faults = found("POST", BATCH, 400, problem(400, status="Failed"), PROBLEM_TYPE)
    assert any("body.status is 'Failed', but a problem's status is the HTTP status 400" in f for f in faults)
    faults = found("POST", BATCH, 400, problem(400), JSON_TYPE)
    assert any("expected application/problem+json" in f for f in faults), faults


def test_an_undocumented_route_or_method_fails() -> None:
    assert found("GET", "/api/nowhere", 200, {}) == [
        "/api/nowhere is not a path of openapi.yaml (/alerts/batchUpdate, /sentinel/incidents, "
        "/tenants/{tenant}/alerts/batchUpdate, /tenants/{tenant}/sentinel/incidents, "
        "/operations/{operationId}, /health)"
    ]
    assert found("DELETE", BATCH, 200, {}) == ["DELETE is not documented for /alerts/batchUpdate"]


def test_a_body_that_is_not_json_fails() -> None:
    faults = spec_answers().violations("GET", "/api/health", 200, JSON_TYPE, b"<html>")
    assert any(f.startswith("body is not JSON") for f in faults), faults


def test_check_names_route_status_and_fault() -> None:
    with pytest.raises(OpenApiViolation) as caught:
        spec_answers().check("GET", "/api/health", 418, JSON_TYPE, b"{}")
    message = str(caught.value)
    assert "GET /api/health: status 418" in message and "not documented" in message


def test_paths_outside_base_path_are_not_the_apis() -> None:
    answers = spec_answers()
    assert not answers.covers("/msi/token") and not answers.covers("/apix")
    assert answers.route_of("/api/operations/x/y") is None


# --- the aiohttp hook, against a server made up here ---------------------------------------------------


@pytest.fixture
async def made_up_server() -> AsyncIterator[str]:
    async def health(request: web.Request) -> web.Response:
        status = int(request.query.get("status", "200"))
        return web.json_response({"status": "Healthy"}, status=status)

    async def elsewhere(request: web.Request) -> web.Response:
        return web.Response(status=418, text="not the API")

    app = web.Application()
    app.router.add_get("/api/health", health)
    app.router.add_get("/control/reset", elsewhere)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def test_the_hook_checks_answers_under_base_path_and_keeps_the_body_readable(
    made_up_server: str,
) -> None:
    seen: list[OpenApiViolation] = []
    config = OpenApiAnswers.load().trace_config(seen)
    async with aiohttp.ClientSession(trace_configs=[config]) as session:
        async with session.get(made_up_server + "/api/health") as response:
            assert await response.json() == {"status": "Healthy"}
        async with session.get(made_up_server + "/control/reset") as response:
            assert response.status == 418  # not under basePath: not checked
        with pytest.raises(OpenApiViolation, match=r"GET /api/health: status 500"):
            async with session.get(made_up_server + "/api/health?status=500"):
                pass
    assert len(seen) == 1
