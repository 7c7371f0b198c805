"""Fixtures for the emulator tests: a reset control client, an HTTP session, a token, an MDE caller.

The emulator process is the session-wide `emulators` fixture from tests/conftest.py, shared with every
other test module, so `ctl` resets it before each test (state, faults, windows, config, token requests,
and the Entra emulator's requests and config).
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from multidict import CIMultiDictProxy

from devhost.services import Service
from emulators import APP_CLIENT_ID, EXCHANGE_AUDIENCE
from emulators.control import EmulatorControl

MDE_RESOURCE = "https://api.securitycenter.microsoft.com"
MDE_SCOPE = f"{MDE_RESOURCE}/.default"
EXCHANGE_SCOPE = f"{EXCHANGE_AUDIENCE}/.default"
BATCH_UPDATE = "/api/alerts/batchUpdate"
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# Two customer tenants (any GUID tenant has consented the emulator's application unless told otherwise).
TENANT_A = "aaaaaaaa-0000-4000-8000-00000000000a"
TENANT_B = "bbbbbbbb-0000-4000-8000-00000000000b"

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


def entra_ssl(service: Service) -> ssl.SSLContext:
    """A client TLS context that trusts the Entra emulator's self-signed certificate (and nothing else)."""
    return ssl.create_default_context(cafile=service.urls["entra_cert"])


async def post_entra_token(
    session: aiohttp.ClientSession,
    service: Service,
    tenant: str,
    form: dict[str, str],
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    """POST a form to the Entra emulator's token endpoint for `tenant`: (status, JSON body)."""
    url = f"{service.urls['entra']}/{tenant}/oauth2/v2.0/token"
    async with session.post(url, data=form, headers=headers, ssl=entra_ssl(service)) as response:
        return response.status, await response.json()


def assertion_form(
    assertion: str, *, scope: str = MDE_SCOPE, client_id: str = APP_CLIENT_ID
) -> dict[str, str]:
    """The form azure-identity's ClientAssertionCredential sends."""
    return {
        "client_assertion": assertion,
        "client_assertion_type": JWT_BEARER,
        "client_id": client_id,
        "grant_type": "client_credentials",
        "scope": scope,
    }


async def fetch_tenant_token(session: aiohttp.ClientSession, service: Service, tenant: str) -> str:
    """A token of `tenant` for MDE, by the federated-credential exchange over plain HTTP (the azure-identity
    path is tested in test_entra_emulator.py)."""
    assertion = await fetch_token(session, service, resource=EXCHANGE_AUDIENCE)
    status, body = await post_entra_token(session, service, tenant, assertion_form(assertion))
    assert status == 200, body
    return str(body["access_token"])


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
    async with EmulatorControl(
        emulators.urls["mde"],
        emulators.urls["identity_base"],
        emulators.urls["entra"],
        entra_cert_file=emulators.urls["entra_cert"],
    ) as control:
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


@pytest.fixture
def identity_env(monkeypatch: pytest.MonkeyPatch, emulators: Service) -> Service:
    """App Service style environment pointing at the emulator (and nothing that picks another flavour)."""
    for name in ("IDENTITY_SERVER_THUMBPRINT", "IMDS_ENDPOINT", "MSI_ENDPOINT", "MSI_SECRET"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("IDENTITY_ENDPOINT", emulators.urls["identity"])
    monkeypatch.setenv("IDENTITY_HEADER", emulators.urls["identity_header"])
    return emulators
