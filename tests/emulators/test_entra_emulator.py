"""The Entra token endpoint, driven by azure-identity's real ClientAssertionCredential.

The chain under test is the app's (docs/contracts.md §8): the real `ManagedIdentityCredential` gets the
identity's signed token for `api://AzureADTokenExchange`; the real `ClientAssertionCredential(tenant,
APP_CLIENT_ID, func)` exchanges it at the emulator (https, trusted through azure-core's
`connection_verify`, since aiohttp is already imported in this process) for a token of that tenant; the
MDE emulator attributes that token's calls, budgets and alerts to the tenant.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from azure.core.credentials import AccessToken
from azure.core.exceptions import ClientAuthenticationError, ServiceRequestError
from azure.identity.aio import ClientAssertionCredential, ManagedIdentityCredential
from cryptography import x509

from devhost.services import Service, local_app_env, start_emulators
from emulators import APP_CLIENT_ID, EXCHANGE_AUDIENCE, HOME_TENANT_ID, IDENTITY_PRINCIPAL_ID
from emulators.control import EmulatorControl, EmulatorControlError
from tests.emulators.conftest import (
    EXCHANGE_SCOPE,
    MDE_RESOURCE,
    MDE_SCOPE,
    TENANT_A,
    TENANT_B,
    MdeApi,
    assertion_form,
    entra_ssl,
    fetch_token,
    post_entra_token,
)

ALERT = "da637399794050273582_760707377"


@pytest.fixture
async def assertion(ctl: EmulatorControl, identity_env: Service) -> str:
    """The managed identity's token for the exchange, from azure-identity's real credential."""
    async with ManagedIdentityCredential() as credential:
        token: AccessToken = await credential.get_token(EXCHANGE_SCOPE)
    return token.token


def tenant_credential(
    service: Service, tenant: str, assertion: str, client_id: str = APP_CLIENT_ID
) -> ClientAssertionCredential:
    """The app's credential for a customer tenant, pointed at the emulator: the https authority, and the
    emulator's certificate as azure-core's `connection_verify` (a CA file path)."""
    return ClientAssertionCredential(
        tenant,
        client_id,
        lambda: assertion,
        authority=service.urls["entra"],
        connection_verify=service.urls["entra_cert"],
    )


async def tenant_token(
    service: Service, tenant: str, assertion: str, *, scope: str = MDE_SCOPE, client_id: str = APP_CLIENT_ID
) -> AccessToken:
    async with tenant_credential(service, tenant, assertion, client_id) as credential:
        return await credential.get_token(scope)


async def refusal(
    ctl: EmulatorControl,
    service: Service,
    tenant: str,
    assertion: str,
    *,
    scope: str = MDE_SCOPE,
    client_id: str = APP_CLIENT_ID,
) -> tuple[str, dict[str, Any]]:
    """The credential's error message and the emulator's record of the one (refused) request."""
    with pytest.raises(ClientAuthenticationError) as info:
        await tenant_token(service, tenant, assertion, scope=scope, client_id=client_id)
    [request] = await ctl.entra_requests()
    assert request["resource"] is None  # no token issued
    return str(info.value), request


def claims_of(jwt: str) -> dict[str, Any]:
    payload = jwt.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(claims: dict[str, Any], *, alg: str = "HS256", key: bytes = b"not-the-emulator-key") -> str:
    """A compact JWT with these claims that the identity endpoint did not sign."""
    signing_input = (
        b64url(json.dumps({"alg": alg, "typ": "JWT"}).encode()) + "." + b64url(json.dumps(claims).encode())
    )
    if alg == "none":
        return signing_input + "."
    return signing_input + "." + b64url(hmac.new(key, signing_input.encode(), hashlib.sha256).digest())


# --- the exchange, end to end ------------------------------------------------------------------------


async def test_assertion_credential_gets_a_tenant_token_that_mde_attributes_to_the_tenant(
    ctl: EmulatorControl, assertion: str, emulators: Service, http: aiohttp.ClientSession
) -> None:
    before = time.time()
    async with tenant_credential(emulators, TENANT_A, assertion) as credential:
        token = await credential.get_token(MDE_SCOPE)
        again = await credential.get_token(MDE_SCOPE)

    assert again.token == token.token  # azure-identity cached it: one request reached the emulator
    assert before + 3600 - 2 <= token.expires_on <= time.time() + 3600 + 1
    [request] = await ctl.entra_requests()
    assert request["path"] == f"/{TENANT_A}/oauth2/v2.0/token"
    assert (request["tenant"], request["clientId"], request["scope"]) == (TENANT_A, APP_CLIENT_ID, MDE_SCOPE)
    assert request["grantType"] == "client_credentials"
    assert request["clientAssertionType"] == "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    assert (request["assertion"]["sub"], request["assertion"]["aud"]) == (
        IDENTITY_PRINCIPAL_ID,
        EXCHANGE_AUDIENCE,
    )
    assert (request["status"], request["resource"]) == (200, MDE_RESOURCE)

    answer = await MdeApi(http, emulators.urls["mde"], token.token).update(
        {"alertIds": [ALERT], "status": "Resolved"}
    )
    assert answer.status == 200, answer.text
    [call] = await ctl.calls()
    assert (call["tenantId"], call["clientId"]) == (TENANT_A, APP_CLIENT_ID)
    assert (await ctl.alert(ALERT, tenant_id=TENANT_A) or {})["status"] == "Resolved"
    assert await ctl.alert(ALERT) is None  # the home tenant's alert was never touched


async def test_batch_update_budgets_are_per_tenant(
    ctl: EmulatorControl, assertion: str, emulators: Service, http: aiohttp.ClientSession
) -> None:
    await ctl.configure(rate_limits="2/60")
    mde = emulators.urls["mde"]
    tenant_a = MdeApi(http, mde, (await tenant_token(emulators, TENANT_A, assertion)).token)
    tenant_b = MdeApi(http, mde, (await tenant_token(emulators, TENANT_B, assertion)).token)
    home = MdeApi(http, mde, await fetch_token(http, emulators))
    body = {"alertIds": [ALERT]}

    assert [(await tenant_a.update(body)).status for _ in range(3)] == [200, 200, 429]
    assert (await tenant_b.update(body)).status == 200  # A's spent budget is not B's
    assert (await home.update(body)).status == 200

    calls = await ctl.calls()
    assert [(c["tenantId"], c["status"]) for c in calls] == [
        (TENANT_A, 200),
        (TENANT_A, 200),
        (TENANT_A, 429),
        (TENANT_B, 200),
        (HOME_TENANT_ID, 200),
    ]
    assert [c["seq"] for c in await ctl.calls(tenant_id=TENANT_B)] == [calls[3]["seq"]]


async def test_patch_budgets_are_per_tenant(
    ctl: EmulatorControl, assertion: str, emulators: Service, http: aiohttp.ClientSession
) -> None:
    await ctl.configure(patch_rate_limits="1/60")
    mde = emulators.urls["mde"]
    tenant_a = MdeApi(http, mde, (await tenant_token(emulators, TENANT_A, assertion)).token)
    tenant_b = MdeApi(http, mde, (await tenant_token(emulators, TENANT_B, assertion)).token)

    assert [(await tenant_a.patch(ALERT, {})).status for _ in range(2)] == [200, 429]
    assert (await tenant_b.patch(ALERT, {})).status == 200


async def test_a_tenant_can_have_its_own_limits(
    ctl: EmulatorControl, assertion: str, emulators: Service, http: aiohttp.ClientSession
) -> None:
    own = await ctl.configure(tenant_id=TENANT_B, rate_limits="1/60")
    assert own == {"rateLimits": "1/60", "patchRateLimits": "100/60,1500/3600"}
    mde = emulators.urls["mde"]
    tenant_a = MdeApi(http, mde, (await tenant_token(emulators, TENANT_A, assertion)).token)
    tenant_b = MdeApi(http, mde, (await tenant_token(emulators, TENANT_B, assertion)).token)
    body = {"alertIds": [ALERT]}

    assert [(await tenant_b.update(body)).status for _ in range(2)] == [200, 429]
    assert [(await tenant_a.update(body)).status for _ in range(2)] == [200, 200]
    tenants = (await ctl.tenants())["tenants"]
    assert (tenants[TENANT_B]["own"], tenants[TENANT_B]["calls"]) == (["rateLimits"], 2)
    assert (tenants[TENANT_A]["own"], tenants[TENANT_A]["rateLimits"]) == ([], "10/60,500/3600")

    # null goes back to the configured limits, which B's one admitted call does not exhaust
    assert (await ctl.configure(tenant_id=TENANT_B, rate_limits=None))["rateLimits"] == "10/60,500/3600"
    assert (await tenant_b.update(body)).status == 200


async def test_alert_state_is_per_tenant(
    ctl: EmulatorControl, assertion: str, emulators: Service, http: aiohttp.ClientSession
) -> None:
    mde = emulators.urls["mde"]
    tenant_a = MdeApi(http, mde, (await tenant_token(emulators, TENANT_A, assertion)).token)
    tenant_b = MdeApi(http, mde, (await tenant_token(emulators, TENANT_B, assertion)).token)

    assert (
        await tenant_a.update({"alertIds": [ALERT], "status": "Resolved", "comment": "from A"})
    ).status == 200
    patched = await tenant_b.patch(ALERT, {"comment": "from B"})

    assert patched.status == 200
    entity = json.loads(patched.text)
    assert (entity["status"], [c["comment"] for c in entity["comments"]]) == (None, ["from B"])
    in_a = await ctl.alert(ALERT, tenant_id=TENANT_A)
    assert in_a is not None
    assert (in_a["status"], in_a["comments"]) == ("Resolved", ["from A"])
    assert list(await ctl.alerts(tenant_id=TENANT_B)) == [ALERT]
    assert await ctl.alerts() == {}  # the home tenant's


# --- refusals ----------------------------------------------------------------------------------------


async def test_wrong_client_id_is_unauthorized_client(
    ctl: EmulatorControl, assertion: str, emulators: Service
) -> None:
    other_app = "12345678-1234-4234-8234-123456789abc"
    message, request = await refusal(ctl, emulators, TENANT_A, assertion, client_id=other_app)

    assert "(unauthorized_client) AADSTS700016:" in message
    assert other_app in message
    assert (request["status"], request["errorCode"]) == (400, 700016)


@pytest.mark.parametrize(
    ("field", "code"),
    [("issuer", 700211), ("subject", 700213), ("audience", 700212)],
)
async def test_assertion_not_matching_the_federated_credential_is_refused(
    ctl: EmulatorControl, assertion: str, emulators: Service, field: str, code: int
) -> None:
    """The identity's real assertion, against a credential that trusts another issuer, subject or audience."""
    await ctl.entra_config(federated_credential={field: "something-else"})

    message, request = await refusal(ctl, emulators, TENANT_A, assertion)

    assert f"(invalid_client) AADSTS{code}: No matching federated identity record" in message
    assert (request["status"], request["errorCode"]) == (400, code)


@pytest.mark.parametrize(
    "change",
    [
        {},
        {"iss": "https://login.microsoftonline.com/99999999-9999-4999-8999-999999999999/v2.0"},
        {"sub": "99999999-9999-4999-8999-999999999999"},
        {"aud": "api://SomethingElse"},
    ],
    ids=["same-claims", "other-issuer", "other-subject", "other-audience"],
)
async def test_forged_assertion_is_refused(
    ctl: EmulatorControl, assertion: str, emulators: Service, change: dict[str, str]
) -> None:
    """Only the identity endpoint's key makes an acceptable assertion, whatever the claims say."""
    forged = forge({**claims_of(assertion), **change})

    message, request = await refusal(ctl, emulators, TENANT_A, forged)

    assert "(invalid_client) AADSTS700027: Client assertion failed signature validation" in message
    assert (request["status"], request["errorCode"]) == (401, 700027)
    assert request["assertion"]["alg"] == "HS256"


async def test_unsigned_assertion_is_refused(
    ctl: EmulatorControl, assertion: str, emulators: Service
) -> None:
    message, request = await refusal(ctl, emulators, TENANT_A, forge(claims_of(assertion), alg="none"))

    assert "AADSTS700027" in message
    assert (request["errorCode"], request["assertion"]["alg"]) == (700027, "none")


async def test_an_opaque_token_is_not_an_assertion(
    ctl: EmulatorControl, emulators: Service, http: aiohttp.ClientSession
) -> None:
    mde_token = await fetch_token(http, emulators)  # the identity's token for MDE, not a JWT

    message, request = await refusal(ctl, emulators, TENANT_A, mde_token)

    assert "(invalid_client) AADSTS50027:" in message
    assert (request["status"], request["assertion"]) == (400, {"malformed": True})


async def test_expired_assertion_is_refused(
    ctl: EmulatorControl, emulators: Service, http: aiohttp.ClientSession
) -> None:
    await ctl.identity_config(token_lifetime_seconds=0)  # expires_on = the second it was issued in
    expired = await fetch_token(http, emulators, resource=EXCHANGE_AUDIENCE)
    assert claims_of(expired)["exp"] <= time.time()

    message, request = await refusal(ctl, emulators, TENANT_A, expired)

    assert "(invalid_client) AADSTS700024: Client assertion is not within its valid time range" in message
    assert (request["status"], request["errorCode"]) == (401, 700024)


async def test_tenant_that_has_not_consented_is_refused(
    ctl: EmulatorControl, assertion: str, emulators: Service
) -> None:
    config = await ctl.entra_config(consented_tenants=[TENANT_A.upper()])
    assert config["consentedTenants"] == [TENANT_A]

    message, request = await refusal(ctl, emulators, TENANT_B, assertion)
    assert "(invalid_client) AADSTS7000229:" in message
    assert (request["tenant"], request["status"]) == (TENANT_B, 400)

    assert (await tenant_token(emulators, TENANT_A, assertion)).token
    assert (await tenant_token(emulators, HOME_TENANT_ID, assertion)).token  # the app's own tenant


async def test_tenant_that_is_not_a_guid_is_not_found(
    ctl: EmulatorControl, assertion: str, emulators: Service
) -> None:
    message, request = await refusal(ctl, emulators, "contoso.onmicrosoft.com", assertion)

    assert "(invalid_request) AADSTS90002: Tenant 'contoso.onmicrosoft.com' not found" in message
    assert request["status"] == 400


async def test_injected_aadsts70021_fails_the_next_requests_then_clears(
    ctl: EmulatorControl, assertion: str, emulators: Service
) -> None:
    """What a token request right after the federated credential was created may get; retrying works."""
    assert (await ctl.entra_config(fail_next_with_70021=2))["failNextWith70021"] == 2

    async with tenant_credential(emulators, TENANT_A, assertion) as credential:
        for _ in range(2):
            with pytest.raises(
                ClientAuthenticationError, match=r"\(invalid_request\) AADSTS70021: No matching"
            ):
                await credential.get_token(MDE_SCOPE)
        token = await credential.get_token(MDE_SCOPE)

    assert token.token
    assert [r["errorCode"] for r in await ctl.entra_requests()] == [70021, 70021, None]
    assert (await ctl.entra_config())["failNextWith70021"] == 0


@pytest.mark.parametrize(
    ("scope", "error", "code"),
    [
        (f"{MDE_RESOURCE}/Alert.ReadWrite.All", "invalid_scope", 1002012),
        ("https://graph.microsoft.com/.default", "invalid_resource", 500011),
    ],
    ids=["not-default", "resource-mde-does-not-accept"],
)
async def test_scope_must_be_an_accepted_resource_with_default(
    ctl: EmulatorControl, assertion: str, emulators: Service, scope: str, error: str, code: int
) -> None:
    message, request = await refusal(ctl, emulators, TENANT_A, assertion, scope=scope)

    assert f"({error}) AADSTS{code}:" in message
    assert (request["scope"], request["errorCode"]) == (scope, code)


async def test_a_resource_mde_is_configured_to_accept_can_be_asked_for(
    ctl: EmulatorControl, assertion: str, emulators: Service, http: aiohttp.ClientSession
) -> None:
    other = "https://api.security.microsoft.com"
    await ctl.configure(accepted_audiences=[MDE_RESOURCE, other])

    token = await tenant_token(emulators, TENANT_A, assertion, scope=f"{other}/.default")

    assert (
        await MdeApi(http, emulators.urls["mde"], token.token).update({"alertIds": [ALERT]})
    ).status == 200


# --- the wire format ---------------------------------------------------------------------------------


async def test_success_body_has_entra_fields_and_the_configured_lifetime(
    ctl: EmulatorControl, assertion: str, emulators: Service, http: aiohttp.ClientSession
) -> None:
    await ctl.entra_config(token_lifetime_seconds=120)

    status, body = await post_entra_token(http, emulators, TENANT_A, assertion_form(assertion))

    assert status == 200
    assert set(body) == {"token_type", "expires_in", "ext_expires_in", "access_token"}
    assert (body["token_type"], body["expires_in"], body["ext_expires_in"]) == ("Bearer", 120, 120)


async def test_error_body_has_entra_fields(
    ctl: EmulatorControl, assertion: str, emulators: Service, http: aiohttp.ClientSession
) -> None:
    form = assertion_form(assertion)
    form["grant_type"] = "password"
    correlation = "0f1e2d3c-4b5a-4968-8776-655443322110"

    status, body = await post_entra_token(http, emulators, TENANT_A, form, {"client-request-id": correlation})

    assert status == 400
    assert set(body) == {
        "error",
        "error_description",
        "error_codes",
        "timestamp",
        "trace_id",
        "correlation_id",
        "error_uri",
    }
    assert (body["error"], body["error_codes"], body["correlation_id"]) == (
        "unsupported_grant_type",
        [70003],
        correlation,
    )
    assert body["error_description"].startswith("AADSTS70003: ")
    assert f"Trace ID: {body['trace_id']} Correlation ID: {correlation}" in body["error_description"]


@pytest.mark.parametrize("missing", ["grant_type", "client_id", "client_assertion_type", "scope"])
async def test_a_missing_parameter_is_named(
    ctl: EmulatorControl, assertion: str, emulators: Service, http: aiohttp.ClientSession, missing: str
) -> None:
    form = assertion_form(assertion)
    del form[missing]

    status, body = await post_entra_token(http, emulators, TENANT_A, form)

    assert (status, body["error"], body["error_codes"]) == (400, "invalid_request", [900144])
    assert f"'{missing}'" in body["error_description"]


async def test_missing_assertion_and_get_are_refused(
    ctl: EmulatorControl, emulators: Service, http: aiohttp.ClientSession
) -> None:
    status, body = await post_entra_token(http, emulators, TENANT_A, assertion_form(""))
    assert (status, body["error"], body["error_codes"]) == (400, "invalid_client", [7000218])

    url = f"{emulators.urls['entra']}/{TENANT_A}/oauth2/v2.0/token"
    async with http.get(url, ssl=entra_ssl(emulators)) as response:
        assert response.status == 400
        assert (await response.json())["error_codes"] == [900561]
    assert [r["method"] for r in await ctl.entra_requests()] == ["POST", "GET"]


async def test_certificate_names_localhost_too(emulators: Service, http: aiohttp.ClientSession) -> None:
    port = emulators.urls["entra"].rsplit(":", 1)[1]
    async with http.get(f"https://localhost:{port}/_emulator/config", ssl=entra_ssl(emulators)) as response:
        assert response.status == 200


def test_certificate_is_its_own_trust_anchor(emulators: Service) -> None:
    certificate = x509.load_pem_x509_certificate(Path(emulators.urls["entra_cert"]).read_bytes())
    assert certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    assert "127.0.0.1" in {str(address) for address in names.get_values_for_type(x509.IPAddress)}


async def test_without_trusting_the_certificate_the_credential_fails(
    ctl: EmulatorControl, assertion: str, emulators: Service
) -> None:
    """azure-identity really verifies TLS: the trust comes from `connection_verify`, nothing else."""
    credential = ClientAssertionCredential(
        TENANT_A, APP_CLIENT_ID, lambda: assertion, authority=emulators.urls["entra"], retry_total=0
    )
    async with credential:
        with pytest.raises(ServiceRequestError, match=r"(?i)certificate verify failed"):
            await credential.get_token(MDE_SCOPE)
    assert await ctl.entra_requests() == []


# --- the app's way: environment variables in a fresh process ------------------------------------------

APP_LIKE_SCRIPT = """
import asyncio, sys
from azure.identity.aio import ClientAssertionCredential, ManagedIdentityCredential

async def main() -> int:
    async with ManagedIdentityCredential() as identity:
        assertion = (await identity.get_token("api://AzureADTokenExchange/.default")).token
    # No authority and no connection_verify: AZURE_AUTHORITY_HOST and SSL_CERT_FILE do it, as in the app.
    async with ClientAssertionCredential(sys.argv[1], sys.argv[2], lambda: assertion, retry_total=0) as cred:
        try:
            await cred.get_token("https://api.securitycenter.microsoft.com/.default")
        except Exception as exc:
            print("FAILED", type(exc).__name__, exc)
            return 3
    print("TOKEN OK")
    return 0

sys.exit(asyncio.run(main()))
"""


async def run_app_like(env: dict[str, str], tenant: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        APP_LIKE_SCRIPT,
        tenant,
        APP_CLIENT_ID,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, output.decode(errors="replace")


async def test_a_child_process_trusts_the_emulator_through_ssl_cert_file(
    ctl: EmulatorControl, emulators: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("SSL_CERT_FILE", "AZURE_AUTHORITY_HOST", "MSI_ENDPOINT", "MSI_SECRET", "IMDS_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)

    def app_env(authority_host: str | None = None, ssl_cert_file: str | None = None) -> dict[str, str]:
        return local_app_env(
            connection_string="UseDevelopmentStorage=true",
            mde_url=emulators.urls["mde"],
            identity_url=emulators.urls["identity"],
            identity_header=emulators.urls["identity_header"],
            authority_host=authority_host,
            ssl_cert_file=ssl_cert_file,
        )

    env = app_env(emulators.urls["entra"], emulators.urls["entra_cert"])
    assert (env["AZURE_AUTHORITY_HOST"], env["SSL_CERT_FILE"]) == (
        emulators.urls["entra"],
        emulators.urls["entra_cert"],
    )
    assert not {"AZURE_AUTHORITY_HOST", "SSL_CERT_FILE"} & set(app_env())  # callers that pass neither

    status, output = await run_app_like(env, TENANT_A)
    assert (status, output.strip()) == (0, "TOKEN OK")

    untrusted = app_env(emulators.urls["entra"])
    status, output = await run_app_like(untrusted, TENANT_B)
    assert status == 3, output
    assert "certificate" in output.lower()

    requests = await ctl.entra_requests()
    assert [(r["tenant"], r["status"]) for r in requests] == [(TENANT_A, 200)]  # B never got past TLS


# --- control API -------------------------------------------------------------------------------------


async def test_reset_forgets_requests_and_restores_config(
    ctl: EmulatorControl, assertion: str, emulators: Service
) -> None:
    start = await ctl.entra_config()
    assert start == {
        "appClientId": APP_CLIENT_ID,
        "homeTenantId": HOME_TENANT_ID,
        "federatedCredential": {
            "issuer": f"https://login.microsoftonline.com/{HOME_TENANT_ID}/v2.0",
            "subject": IDENTITY_PRINCIPAL_ID,
            "audience": EXCHANGE_AUDIENCE,
        },
        "tokenLifetimeSeconds": 3600,
        "consentedTenants": None,
        "failNextWith70021": 0,
    }
    await ctl.entra_config(
        consented_tenants=[],
        federated_credential={"subject": "x"},
        token_lifetime_seconds=5,
        fail_next_with_70021=1,
    )
    await refusal(ctl, emulators, TENANT_A, assertion)

    await ctl.entra_reset()

    assert await ctl.entra_requests() == []
    assert await ctl.entra_config() == start


@pytest.mark.parametrize(
    "fields",
    [
        {"appClientId": APP_CLIENT_ID},
        {"unknown": 1},
        {"consentedTenants": ["not-a-guid"]},
        {"federatedCredential": {"issuer": ""}},
        {"federatedCredential": {"kind": "x"}},
        {"failNextWith70021": -1},
        {"tokenLifetimeSeconds": True},
    ],
    ids=["read-only", "unknown", "bad-tenant", "empty-issuer", "bad-credential-field", "negative", "bool"],
)
async def test_bad_config_is_refused_and_changes_nothing(
    ctl: EmulatorControl, fields: dict[str, Any]
) -> None:
    before = await ctl.entra_config()
    with pytest.raises(EmulatorControlError, match="400"):
        await ctl.entra_config(**fields)
    assert await ctl.entra_config() == before


# --- a private process: the identity options --------------------------------------------------------

OTHER_HOME = "cccccccc-0000-4000-8000-00000000000c"
OTHER_PRINCIPAL = "dddddddd-0000-4000-8000-00000000000d"
OTHER_APP = "eeeeeeee-0000-4000-8000-00000000000e"


@pytest.fixture
def private_emulators(tmp_path: Path) -> Iterator[Service]:
    args = ["--home-tenant-id", OTHER_HOME.upper(), "--identity-principal-id", OTHER_PRINCIPAL]
    args += ["--app-client-id", OTHER_APP]
    service = start_emulators(tmp_path, identity_header="private-secret", extra_args=args)
    yield service
    service.stop()


async def test_identity_options_and_another_process_assertion(
    private_emulators: Service, emulators: Service, ctl: EmulatorControl, http: aiohttp.ClientSession
) -> None:
    service = private_emulators
    assertion = await fetch_token(http, service, resource=EXCHANGE_AUDIENCE)
    claims = claims_of(assertion)
    assert (claims["iss"], claims["tid"]) == (
        f"https://login.microsoftonline.com/{OTHER_HOME}/v2.0",
        OTHER_HOME,
    )
    assert (claims["sub"], claims["aud"]) == (OTHER_PRINCIPAL, EXCHANGE_AUDIENCE)

    status, body = await post_entra_token(http, service, TENANT_A, assertion_form(assertion))
    assert body["error_codes"] == [700016]  # the default application is not this process's
    status, body = await post_entra_token(
        http, service, TENANT_A, assertion_form(assertion, client_id=OTHER_APP)
    )
    assert status == 200
    mde_token = await fetch_token(http, service)
    async with EmulatorControl(service.urls["mde"], service.urls["identity_base"]) as private:
        assert (
            await MdeApi(http, service.urls["mde"], mde_token).update({"alertIds": [ALERT]})
        ).status == 200
        assert (
            await MdeApi(http, service.urls["mde"], body["access_token"]).update({"alertIds": [ALERT]})
        ).status == 200
        assert [c["tenantId"] for c in await private.calls()] == [OTHER_HOME, TENANT_A]
        assert (await private.tenants())["homeTenantId"] == OTHER_HOME
        assert await private.alert(ALERT) is not None  # the home tenant's, by default

    # The session's emulator never accepts what another process's identity endpoint signed.
    status, body = await post_entra_token(http, emulators, TENANT_A, assertion_form(assertion))
    assert (status, body["error_codes"]) == (401, [700027])

    assert await asyncio.to_thread(service.stop) == 0
    ready = service.log_path.read_text().splitlines()[0]
    assert ready.endswith(f" entra={service.urls['entra']} entra_cert={service.urls['entra_cert']}")
    # a file the caller chose stays after the process ends
    assert await asyncio.to_thread(Path(service.urls["entra_cert"]).exists)
