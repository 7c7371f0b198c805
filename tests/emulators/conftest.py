"""Fixtures for the emulator tests: a reset control client, an HTTP session, a token, an MDE caller.

The emulator process is the session-wide `emulators` fixture from tests/conftest.py, shared with every
other test module, so `ctl` resets it before each test (state, faults, windows, config, token requests).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from multidict import CIMultiDictProxy

from devhost.services import Service
from emulators.control import EmulatorControl

MDE_RESOURCE = "https://api.securitycenter.microsoft.com"
MDE_SCOPE = f"{MDE_RESOURCE}/.default"
BATCH_UPDATE = "/api/alerts/batchUpdate"

# Microsoft's documented example body (docs/mde-api.md §1).
DOCUMENTED_EXAMPLE: dict[str, Any] = {
    "alertIds": ["da637399794050273582_760707377", "da637399989469816469_51697947354"],
    "status": "Resolved",
    "assignedTo": "secop2@contoso.com",
    "classification": "FalsePositive",
    "determination": "Malware",
    "comment": "Resolve my alert and assign to secop2",
}


@dataclass
class Answer:
    """One HTTP answer, read completely so the connection can be reused."""

    status: int
    headers: CIMultiDictProxy[str]
    text: str

    def error(self) -> dict[str, Any]:
        """The `error` object of a Defender-style error body."""
        body = json.loads(self.text)
        assert set(body) == {"error"}, body
        return dict(body["error"])


async def fetch_token(
    session: aiohttp.ClientSession,
    service: Service,
    resource: str = MDE_RESOURCE,
    client_id: str | None = None,
) -> str:
    """A token straight from the identity endpoint (the azure-identity path is tested separately)."""
    params = {"api-version": "2019-08-01", "resource": resource}
    if client_id is not None:
        params["client_id"] = client_id
    headers = {"X-IDENTITY-HEADER": service.urls["identity_header"]}
    async with session.get(service.urls["identity"], params=params, headers=headers) as response:
        assert response.status == 200, await response.text()
        return str((await response.json())["access_token"])


class MdeApi:
    """Calls the emulated batchUpdate (or PATCH) with a valid token and JSON type unless told otherwise."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str, token: str) -> None:
        self.session = session
        self.base_url = base_url
        self.url = base_url + BATCH_UPDATE
        self.token = token

    def default_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}

    async def update(
        self,
        body: Any = None,
        *,
        data: str | None = None,
        headers: dict[str, str] | None = None,
        give_up_after: float | None = None,
    ) -> Answer:
        """POST `body` as JSON (or `data` verbatim) with `headers` (default: token + JSON type).

        `give_up_after` is a client-side total timeout, for tests that make the client give up.
        """
        payload = data if data is not None else json.dumps(body)
        client_timeout = aiohttp.ClientTimeout(total=give_up_after) if give_up_after is not None else None
        async with self.session.post(
            self.url,
            data=payload.encode(),
            headers=self.default_headers() if headers is None else headers,
            timeout=client_timeout,
        ) as response:
            return Answer(response.status, response.headers, await response.text())

    async def patch(
        self,
        alert_id: str,
        body: Any = None,
        *,
        data: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> Answer:
        """PATCH `…/api/alerts/{alert_id}` (id percent-encoded) with `body` as JSON, or `data` verbatim."""
        payload = data if data is not None else json.dumps(body if body is not None else {})
        async with self.session.patch(
            f"{self.base_url}/api/alerts/{quote(alert_id, safe='')}",
            data=payload.encode(),
            headers=self.default_headers() if headers is None else headers,
        ) as response:
            return Answer(response.status, response.headers, await response.text())


@pytest.fixture
async def ctl(emulators: Service) -> AsyncIterator[EmulatorControl]:
    async with EmulatorControl(emulators.urls["mde"], emulators.urls["identity_base"]) as control:
        await control.reset()
        yield control


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


@pytest.fixture
async def mde(ctl: EmulatorControl, http: aiohttp.ClientSession, emulators: Service) -> MdeApi:
    """Depends on `ctl`, so the emulator is already reset when the test gets it."""
    return MdeApi(http, emulators.urls["mde"], await fetch_token(http, emulators))


async def wait_until(
    check: Callable[[], Awaitable[bool]], *, within: float = 3.0, interval: float = 0.05
) -> None:
    """Poll `check` until true; fail after `within` seconds (never loops unbounded)."""
    deadline = time.monotonic() + within
    for _ in range(int(within / interval) + 1):
        if await check():
            return
        if time.monotonic() >= deadline:
            break
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {within}s")
