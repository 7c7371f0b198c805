"""The managed-identity endpoint, driven by azure-identity's real async ManagedIdentityCredential.

If these pass, the app's real credential code path works against the emulator exactly as it would
against App Service, and the MDE emulator accepts the tokens it gets.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from azure.core.exceptions import ClientAuthenticationError
from azure.identity.aio import ManagedIdentityCredential

from devhost.services import Service
from emulators import EXCHANGE_AUDIENCE, HOME_TENANT_ID, IDENTITY_PRINCIPAL_ID
from emulators.control import EmulatorControl
from tests.emulators.conftest import (
    DOCUMENTED_EXAMPLE,
    EXCHANGE_SCOPE,
    MDE_RESOURCE,
    MDE_SCOPE,
    MdeApi,
    fetch_token,
)

USER_ASSIGNED_CLIENT_ID = "11111111-2222-4333-8444-555555555555"


@pytest.fixture
async def credential(identity_env: Service) -> AsyncIterator[ManagedIdentityCredential]:
    async with ManagedIdentityCredential() as cred:
        yield cred


async def test_real_credential_gets_token_that_mde_accepts(
    ctl: EmulatorControl,
    credential: ManagedIdentityCredential,
    http: aiohttp.ClientSession,
    emulators: Service,
) -> None:
    before = time.time()
    token = await credential.get_token(MDE_SCOPE)

    assert token.token
    assert before + 3600 - 2 <= token.expires_on <= before + 3600 + 1
    requests = await ctl.token_requests()
    assert len(requests) == 1
    assert requests[0]["resource"] == MDE_RESOURCE  # the `/.default` scope arrives as the resource
    assert requests[0]["apiVersion"] == "2019-08-01"
    assert requests[0]["headerPresent"] is True
    assert requests[0]["clientId"] is None
    assert requests[0]["status"] == 200

    answer = await MdeApi(http, emulators.urls["mde"], token.token).update(DOCUMENTED_EXAMPLE)
    assert answer.status == 200, answer.text
    assert answer.text == ""


async def test_credential_caches_token_between_calls(
    ctl: EmulatorControl, credential: ManagedIdentityCredential
) -> None:
    first = await credential.get_token(MDE_SCOPE)
    second = await credential.get_token(MDE_SCOPE)

    assert first.token == second.token
    assert len(await ctl.token_requests()) == 1


async def test_user_assigned_client_id_is_sent_recorded_and_answered(
    ctl: EmulatorControl, identity_env: Service, http: aiohttp.ClientSession
) -> None:
    async with ManagedIdentityCredential(client_id=USER_ASSIGNED_CLIENT_ID) as cred:
        token = await cred.get_token(MDE_SCOPE)

    [request] = await ctl.token_requests()
    assert request["clientId"] == USER_ASSIGNED_CLIENT_ID
    answer = await MdeApi(http, identity_env.urls["mde"], token.token).update({"alertIds": ["a1"]})
    assert answer.status == 200
    [call] = await ctl.calls()
    assert call["clientId"] == USER_ASSIGNED_CLIENT_ID


async def test_wrong_identity_header_is_refused_by_the_credential(
    ctl: EmulatorControl, identity_env: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IDENTITY_HEADER", "not-the-secret")
    async with ManagedIdentityCredential() as cred:
        with pytest.raises(ClientAuthenticationError):
            await cred.get_token(MDE_SCOPE)

    requests = await ctl.token_requests()
    assert requests, "the credential never reached the emulator"
    assert {r["status"] for r in requests} == {401}


@pytest.mark.parametrize("header", [None, "not-the-secret"], ids=["missing", "wrong"])
async def test_missing_or_wrong_header_is_401(
    ctl: EmulatorControl, http: aiohttp.ClientSession, emulators: Service, header: str | None
) -> None:
    headers = {} if header is None else {"X-IDENTITY-HEADER": header}
    params = {"api-version": "2019-08-01", "resource": MDE_RESOURCE}
    async with http.get(emulators.urls["identity"], params=params, headers=headers) as response:
        assert response.status == 401
        body = await response.json()
    assert body["statusCode"] == 401
    assert "X-IDENTITY-HEADER" in body["message"]
    assert "access_token" not in body


@pytest.mark.parametrize(
    ("params", "word"),
    [
        ({"api-version": "2019-08-01"}, "resource"),
        ({"resource": MDE_RESOURCE}, "api-version"),
        ({"api-version": "2017-09-01", "resource": MDE_RESOURCE}, "api-version"),
    ],
    ids=["no-resource", "no-api-version", "old-api-version"],
)
async def test_bad_parameters_are_400(
    ctl: EmulatorControl, http: aiohttp.ClientSession, emulators: Service, params: dict[str, str], word: str
) -> None:
    headers = {"X-IDENTITY-HEADER": emulators.urls["identity_header"]}
    async with http.get(emulators.urls["identity"], params=params, headers=headers) as response:
        assert response.status == 400
        body = await response.json()
    assert body["statusCode"] == 400
    assert word in body["message"]


async def test_short_token_lifetime_expires_at_mde(
    ctl: EmulatorControl, http: aiohttp.ClientSession, emulators: Service
) -> None:
    await ctl.identity_config(token_lifetime_seconds=1)
    token = await fetch_token(http, emulators)
    [request] = await ctl.token_requests()
    assert request["status"] == 200

    await asyncio.sleep(1.05)  # expires_on is whole seconds, at most 1 s from issue
    answer = await MdeApi(http, emulators.urls["mde"], token).update({"alertIds": ["a1"]})
    assert answer.status == 401
    assert "expired" in answer.error()["message"]


async def test_reset_forgets_requests_and_restores_lifetime_but_keeps_tokens(
    ctl: EmulatorControl, http: aiohttp.ClientSession, emulators: Service
) -> None:
    await ctl.identity_config(token_lifetime_seconds=5)
    token = await fetch_token(http, emulators)

    await ctl.identity_reset()

    assert await ctl.token_requests() == []
    assert (await ctl.identity_config())["tokenLifetimeSeconds"] == 3600
    assert (await MdeApi(http, emulators.urls["mde"], token).update({"alertIds": ["a1"]})).status == 200


async def test_after_a_revocation_claims_make_the_credential_fetch_a_fresh_token(
    ctl: EmulatorControl,
    credential: ManagedIdentityCredential,
    http: aiohttp.ClientSession,
    emulators: Service,
) -> None:
    """What the app's "401 → fresh token, retry once" rule relies on, with azure-identity 1.27.

    The credential keeps serving its cached token after the emulator revoked it; passing any `claims`
    makes it skip the cache (managed identity does not send the claims anywhere).
    """
    first = await credential.get_token(MDE_SCOPE)
    assert await ctl.revoke_tokens([first.token]) == 1
    api = MdeApi(http, emulators.urls["mde"], first.token)
    assert (await api.update({"alertIds": ["a1"]})).status == 401

    cached = await credential.get_token(MDE_SCOPE)
    fresh = await credential.get_token(MDE_SCOPE, claims='{"access_token": {}}')

    assert cached.token == first.token
    assert fresh.token != first.token
    api.token = fresh.token
    assert (await api.update({"alertIds": ["a1"]})).status == 200
    assert len(await ctl.token_requests()) == 2


def _b64url_json(part: str) -> dict[str, Any]:
    return dict(json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))))


def jwt_parts(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    header, payload, _signature = token.split(".")
    return _b64url_json(header), _b64url_json(payload)


async def test_real_credential_gets_the_signed_exchange_assertion(
    ctl: EmulatorControl,
    credential: ManagedIdentityCredential,
    http: aiohttp.ClientSession,
    emulators: Service,
) -> None:
    before = int(time.time())
    token = await credential.get_token(EXCHANGE_SCOPE)

    header, claims = jwt_parts(token.token)
    assert header == {"alg": "HS256", "typ": "JWT"}
    assert claims["iss"] == f"https://login.microsoftonline.com/{HOME_TENANT_ID}/v2.0"
    assert (claims["sub"], claims["aud"], claims["tid"]) == (
        IDENTITY_PRINCIPAL_ID,
        EXCHANGE_AUDIENCE,
        HOME_TENANT_ID,
    )
    assert claims["exp"] == token.expires_on  # the very expires_on the endpoint answered
    assert before <= claims["nbf"] == claims["iat"] <= time.time()
    assert claims["jti"]
    [request] = await ctl.token_requests()
    assert (request["resource"], request["status"]) == (EXCHANGE_AUDIENCE, 200)

    # It is an assertion for Entra, not a token MDE accepts.
    answer = await MdeApi(http, emulators.urls["mde"], token.token).update({"alertIds": ["a1"]})
    assert answer.status == 401
    assert EXCHANGE_AUDIENCE in answer.error()["message"]


async def test_exchange_assertion_of_a_user_assigned_identity_names_its_client_id(
    ctl: EmulatorControl, identity_env: Service
) -> None:
    async with ManagedIdentityCredential(client_id=USER_ASSIGNED_CLIENT_ID) as cred:
        token = await cred.get_token(EXCHANGE_SCOPE)

    _header, claims = jwt_parts(token.token)
    assert (claims["appid"], claims["sub"]) == (USER_ASSIGNED_CLIENT_ID, IDENTITY_PRINCIPAL_ID)


async def test_identity_tokens_belong_to_the_home_tenant(
    ctl: EmulatorControl,
    credential: ManagedIdentityCredential,
    http: aiohttp.ClientSession,
    emulators: Service,
) -> None:
    token = await credential.get_token(MDE_SCOPE)

    assert (await MdeApi(http, emulators.urls["mde"], token.token).update({"alertIds": ["a1"]})).status == 200
    [call] = await ctl.calls(tenant_id=HOME_TENANT_ID)
    assert call["tenantId"] == HOME_TENANT_ID
