"""HTTP functions served by a real devhost process: routing, request and response translation, limits."""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.devhost.conftest import SampleHost


@pytest.fixture
async def http(sample_host: SampleHost) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(
        base_url=sample_host.base, timeout=aiohttp.ClientTimeout(total=10)
    ) as session:
        yield session


def test_ready_line_lists_every_function_and_warns_about_bindings(sample_host: SampleHost) -> None:
    log = sample_host.log()
    assert re.search(r"^DEVHOST READY http://127\.0\.0\.1:\d+$", log, re.MULTILINE)
    assert f"echo: httpTrigger [GET,POST] {sample_host.base}/api/echo/{{name}}/{{item?}}" in log
    assert f"work: queueTrigger queue={sample_host.queue} (connection AzureWebJobsStorage)" in log
    assert "startup_timer: timerTrigger schedule='0 0 0 1 1 *', run_on_startup" in log
    assert "function with_output: queue binding 'out' is not supported by devhost" in log


async def test_route_parameters_query_headers_and_json_body(http: aiohttp.ClientSession) -> None:
    async with http.post(
        "/api/echo/b%C3%B6b?x=1&x=2&code=secret", json={"a": [1, 2]}, headers={"X-Sample": "hi"}
    ) as response:
        assert response.status == 200
        echoed = await response.json()
    assert echoed["method"] == "POST"
    assert echoed["route"] == {"name": "böb"}
    assert echoed["params"] == {"x": "1,2", "code": "secret"}  # the function key passes through unchanged
    assert echoed["json"] == {"a": [1, 2]}
    assert echoed["header"] == "hi"
    assert echoed["url"].endswith("/api/echo/b%C3%B6b?x=1&x=2&code=secret")


async def test_optional_parameter_and_case_insensitive_literal(http: aiohttp.ClientSession) -> None:
    async with http.get("/API/Echo/bob/thing/") as response:
        assert response.status == 200
        assert (await response.json())["route"] == {"name": "bob", "item": "thing"}


async def test_async_runs_on_the_loop_and_sync_in_a_worker_thread(http: aiohttp.ClientSession) -> None:
    async with http.get("/api/echo/x") as response:
        assert (await response.json())["thread"] == "MainThread"
    async with http.get("/api/sync/12") as response:
        body = await response.json()
    assert body["number"] == "12"
    assert body["thread"] != "MainThread"
    assert body["function"] == "sync_echo"  # a `context` parameter gets the invocation context
    assert len(body["invocation"]) == 36


async def test_route_constraint_mismatch_is_404(http: aiohttp.ClientSession) -> None:
    async with http.get("/api/sync/twelve") as response:
        assert response.status == 404


async def test_custom_status_repeated_headers_and_charset(http: aiohttp.ClientSession) -> None:
    async with http.get("/api/custom") as response:
        assert response.status == 418
        assert response.headers["X-Sample"] == "one"
        assert response.headers.getall("Set-Cookie") == ["a=1", "b=2"]
        assert response.headers["Content-Type"] == "text/html; charset=latin-1"
        assert await response.read() == "café".encode("latin-1")


async def test_str_result_is_text_plain(http: aiohttp.ClientSession) -> None:
    async with http.get("/api/with-output") as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
        assert await response.text() == "plain text"


async def test_exception_is_500_with_traceback_in_log(
    http: aiohttp.ClientSession, sample_host: SampleHost
) -> None:
    async with http.get("/api/boom") as response:
        assert response.status == 500
        assert await response.read() == b""
    assert "RuntimeError: the sample function failed on purpose" in sample_host.log()


async def test_body_over_aiohttp_default_limit_is_accepted(http: aiohttp.ClientSession) -> None:
    body = bytes(range(256)) * (2 * 1024 * 1024 // 256)  # 2 MiB, twice aiohttp's default limit
    async with http.post("/api/size", data=body) as response:
        assert response.status == 200
        assert await response.json() == {"bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}


async def test_undeclared_method_and_unknown_paths_are_404(http: aiohttp.ClientSession) -> None:
    for method, path in (("DELETE", "/api/slow"), ("GET", "/api/nothing-here"), ("GET", "/echo/x")):
        async with http.request(method, path) as response:
            assert response.status == 404, (method, path)
