"""Several tenants from one deployment (docs/contracts.md §8), end to end with nothing patched.

One development host serves the home tenant and two customer tenants. A customer tenant's token comes
from the real azure-identity `ClientAssertionCredential`: the managed identity's token for
api://AzureADTokenExchange is fetched from the identity emulator, and that token is presented as the
client assertion to the Entra emulator over https (AZURE_AUTHORITY_HOST, trusted through SSL_CERT_FILE).
The MDE emulator attributes every call to its token's `tid` and keeps budgets and alerts per tenant.
"""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import aiohttp

from devhost.services import Service
from emulators import APP_CLIENT_ID, HOME_TENANT_ID
from emulators.control import EmulatorControl
from shared.queue_handlers import operation_id_for_message
from tests.conftest import HostPool
from tests.integration.helpers import new_ids, post, wait_for_operation
from tests.integration.test_queues import FAST_POLL, AppQueues, wait_until
from tests.integration.test_sentinel_incidents import fixture, mde_ids

CONTOSO = "a0e1b2c3-d4e5-4f60-8172-93a4b5c6d7e8"
FABRIKAM = "b1f2c3d4-e5f6-4071-8293-a4b5c6d7e8f9"
WORKSPACE = "c2a3b4c5-d6e7-4f80-9123-b4c5d6e7f8a9"
TENANTS = {
    "contoso": {"tenantId": CONTOSO, "sentinelWorkspaceIds": [WORKSPACE]},
    "fabrikam": {"tenantId": FABRIKAM},
}


def tenant_settings(**more: str) -> dict[str, str]:
    return {
        "DEFENDER_TENANTS": json.dumps(TENANTS),
        "DEFENDER_APP_CLIENT_ID": APP_CLIENT_ID,
        **more,
    }


def route(tenant: str | None) -> str:
    return "/api/alerts/batchUpdate" if tenant is None else f"/api/tenants/{tenant}/alerts/batchUpdate"


def principal(*roles: str) -> str:
    claims = [{"typ": "roles", "val": r} for r in roles]
    return base64.b64encode(json.dumps({"auth_typ": "aad", "claims": claims}).encode()).decode()


async def test_every_call_carries_a_token_of_its_tenant(
    hosts: HostPool, ctl: EmulatorControl, http: aiohttp.ClientSession
) -> None:
    settings = tenant_settings()
    tenant_ids = {None: HOME_TENANT_ID, "home": HOME_TENANT_ID, "contoso": CONTOSO, "fabrikam": FABRIKAM}
    for tenant in tenant_ids:
        (alert,) = new_ids(1)
        status, _, body = await post(
            http, hosts.url(route(tenant), **settings), {"alertIds": [alert], "status": "Resolved"}
        )
        assert status == 200, (tenant, body)
    calls = await ctl.calls()
    assert [c["tenantId"] for c in calls] == [t.lower() for t in tenant_ids.values()]
    assert all(c["status"] == 200 for c in calls)


async def test_the_same_key_and_body_in_two_tenants_are_two_operations_and_two_calls(
    hosts: HostPool, ctl: EmulatorControl, http: aiohttp.ClientSession
) -> None:
    settings = tenant_settings()
    body = {"alertIds": new_ids(1), "status": "Resolved", "comment": "closed by the SOC"}
    key = {"Idempotency-Key": f"same-{uuid.uuid4()}"}
    answers = [await post(http, hosts.url(route(t), **settings), body, key) for t in ("contoso", "fabrikam")]
    assert [a[0] for a in answers] == [200, 200]
    assert answers[0][2]["operationId"] != answers[1][2]["operationId"]
    replay = await post(http, hosts.url(route("contoso"), **settings), body, key)
    assert replay[0] == 200 and replay[1].get("Idempotent-Replayed") == "true"
    assert replay[2]["operationId"] == answers[0][2]["operationId"]
    calls = await ctl.calls()
    assert sorted(c["tenantId"] for c in calls) == sorted([CONTOSO, FABRIKAM])


async def test_each_tenant_has_its_own_budget(
    hosts: HostPool, ctl: EmulatorControl, http: aiohttp.ClientSession
) -> None:
    settings = tenant_settings(DEFENDER_RATE_LIMITS="2/30", SYNC_MAX_WAIT_SECONDS="0.2", TEST_HOST="budgets")
    statuses: dict[str, list[int]] = {}
    for tenant in ("contoso", "contoso", "fabrikam", "fabrikam", "contoso"):
        status, _, _ = await post(
            http, hosts.url(route(tenant), **settings), {"alertIds": new_ids(1), "status": "InProgress"}
        )
        statuses.setdefault(tenant, []).append(status)
    # contoso spent its two calls; fabrikam still had both of its own; contoso's third waits (202)
    assert statuses == {"contoso": [200, 200, 202], "fabrikam": [200, 200]}
    calls = await ctl.calls()
    assert all(c["status"] == 200 for c in calls) and len(calls) == 4


async def test_an_operation_records_its_tenant_and_is_found_on_the_one_route(
    hosts: HostPool, ctl: EmulatorControl, http: aiohttp.ClientSession
) -> None:
    settings = tenant_settings()
    status, headers, body = await post(
        http,
        hosts.url(route("contoso"), **settings),
        {"alertIds": new_ids(1), "status": "Resolved"},
        {"Prefer": "respond-async"},
    )
    assert status == 202 and headers["Location"].endswith(f"/api/operations/{body['operationId']}")
    final, document = await wait_for_operation(http, headers["Location"])
    assert final == 200 and document["tenant"] == "contoso" and document["status"] == "Succeeded"
    assert [c["tenantId"] for c in await ctl.calls()] == [CONTOSO]  # sent later, through the chunks queue


async def test_an_unknown_tenant_is_a_404_naming_it_and_nothing_is_sent(
    hosts: HostPool, ctl: EmulatorControl, http: aiohttp.ClientSession
) -> None:
    status, headers, body = await post(
        http,
        hosts.url(route("northwind"), **tenant_settings()),
        {"alertIds": new_ids(1), "status": "Resolved"},
    )
    assert status == 404 and headers["Content-Type"].startswith("application/problem+json")
    assert "'northwind'" in body["detail"] and body["errors"][0]["field"] == "tenant"
    assert await ctl.calls() == []


async def test_required_roles_keep_function_keys_and_forged_principals_to_the_home_tenant(
    hosts: HostPool, ctl: EmulatorControl, http: aiohttp.ClientSession
) -> None:
    settings = tenant_settings(REQUIRE_TENANT_ROLES="true", WEBSITE_AUTH_ENABLED="false")
    forged = {"X-MS-CLIENT-PRINCIPAL": principal("Tenants.All"), "X-MS-CLIENT-PRINCIPAL-ID": "forged"}
    for headers in ({}, forged):
        status, _, body = await post(
            http,
            hosts.url(route("contoso"), **settings),
            {"alertIds": new_ids(1), "status": "Resolved"},
            headers,
        )
        assert status == 403 and body["errors"][0]["field"] == "tenant", body
    assert await ctl.calls() == []
    status, _, body = await post(
        http, hosts.url(route("home"), **settings), {"alertIds": new_ids(1), "status": "Resolved"}, forged
    )
    assert status == 200
    operation = await _operation(http, hosts.url(f"/api/operations/{body['operationId']}", **settings))
    assert operation["caller"] == {"authentication": "functionKey"}  # the forged principal is not recorded


async def test_with_app_service_authentication_the_tenant_role_opens_that_tenant_only(
    hosts: HostPool, ctl: EmulatorControl, http: aiohttp.ClientSession
) -> None:
    settings = tenant_settings(REQUIRE_TENANT_ROLES="true", WEBSITE_AUTH_ENABLED="true")
    caller = {
        "X-MS-CLIENT-PRINCIPAL": principal("Tenant.contoso"),
        "X-MS-CLIENT-PRINCIPAL-ID": "soc-playbook",
    }
    status, _, body = await post(
        http, hosts.url(route("contoso"), **settings), {"alertIds": new_ids(1), "status": "Resolved"}, caller
    )
    assert status == 200, body
    denied, _, _ = await post(
        http, hosts.url(route("fabrikam"), **settings), {"alertIds": new_ids(1), "status": "Resolved"}, caller
    )
    assert denied == 403
    # the operation is visible to its own caller, and not found for one who may not act on contoso
    location = hosts.url(f"/api/operations/{body['operationId']}", **settings)
    assert (await _operation(http, location, caller))["tenant"] == "contoso"
    other = {"X-MS-CLIENT-PRINCIPAL": principal("Tenant.fabrikam"), "X-MS-CLIENT-PRINCIPAL-ID": "other"}
    async with http.get(location, headers=other) as response:
        assert response.status == 404
    assert [c["tenantId"] for c in await ctl.calls()] == [CONTOSO]


async def test_a_sentinel_incident_goes_to_the_tenant_of_its_workspace(
    hosts: HostPool, ctl: EmulatorControl, http: aiohttp.ClientSession
) -> None:
    incident = fixture("closed_false_positive")
    incident["workspaceId"] = WORKSPACE.upper()
    status, _, body = await post(http, hosts.url("/api/sentinel/incidents", **tenant_settings()), incident)
    assert status == 200, body
    assert [c["tenantId"] for c in await ctl.calls()] == [CONTOSO]
    alert = mde_ids(incident)[0]
    assert await ctl.alert(alert) is None  # the home tenant's view knows nothing of contoso's alert
    # the same incident from another workspace is the home tenant's (its own key: a new operation)
    incident["workspaceId"] = str(uuid.uuid4())
    status, _, _ = await post(http, hosts.url("/api/sentinel/incidents", **tenant_settings()), incident)
    assert status == 200
    assert [c["tenantId"] for c in await ctl.calls()] == [CONTOSO, HOME_TENANT_ID.lower()]


async def test_health_reports_every_tenant(hosts: HostPool, http: aiohttp.ClientSession) -> None:
    async with http.get(hosts.url("/api/health", **tenant_settings())) as response:
        document = await response.json()
    assert response.status == 200, document
    assert set(document["tenants"]) == {"contoso", "fabrikam"}
    contoso = document["tenants"]["contoso"]
    assert contoso["tenantId"] == CONTOSO and contoso["ok"] is True and contoso["checks"]["token"]["ok"]


async def _operation(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    async with http.get(url, headers=headers or {}) as response:
        assert response.status == 200, await response.text()
        document: dict[str, Any] = await response.json()
        return document


async def test_an_inbound_message_may_name_its_tenant_and_an_unknown_one_is_failed_in_home(
    hosts: HostPool, azurite: Service, ctl: EmulatorControl, http: aiohttp.ClientSession
) -> None:
    host, env = hosts.fresh(**tenant_settings(**FAST_POLL))
    queues = AppQueues(azurite.urls["connection_string"], env)
    try:
        await queues.put(
            {"alertIds": new_ids(1), "status": "Resolved", "tenant": "fabrikam", "idempotencyKey": "q-t"}
        )
        unknown = await queues.put({"alertIds": new_ids(1), "status": "Resolved", "Tenant": "northwind"})

        async def one_call() -> bool:
            return len(await ctl.calls()) == 1

        await wait_until(one_call)
        assert [c["tenantId"] for c in await ctl.calls()] == [FABRIKAM]
        location = f"{host.urls['base']}/api/operations/{operation_id_for_message(unknown)}"

        async def recorded() -> bool:
            async with http.get(location) as response:
                return bool(response.status != 404)

        await wait_until(recorded)
        failed = await _operation_any(http, location)
        assert failed["status"] == "Failed" and failed["tenant"] == "home"
        assert failed["errors"][0]["field"] == "tenant" and "northwind" in failed["errors"][0]["message"]
        assert len(await ctl.calls()) == 1
    finally:
        await queues.close()
        host.stop()


async def _operation_any(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with http.get(url) as response:
        document: dict[str, Any] = await response.json()
        return document
