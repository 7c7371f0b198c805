"""The edge's tenant rules (docs/contracts.md §8): which tenant a request names, who may act on it, and
which roles App Service authentication vouches for. Plain functions, no host or storage."""

from __future__ import annotations

import base64
import json

import pytest

from shared.api import tenant_of, workspace_tenant
from shared.errors import RequestRejected
from shared.http import ApiRequest
from shared.settings import Settings, load_settings
from shared.tenant_access import Caller, caller_from_headers, may_act_on, roles_in

CONTOSO = "a0e1b2c3-d4e5-4f60-8172-93a4b5c6d7e8"
FABRIKAM = "b1f2c3d4-e5f6-4071-8293-a4b5c6d7e8f9"
WORKSPACE = "c2a3b4c5-d6e7-4f80-9123-b4c5d6e7f8a9"
TENANTS = {
    "contoso": {"tenantId": CONTOSO, "sentinelWorkspaceIds": [WORKSPACE]},
    "fabrikam": {"tenantId": FABRIKAM},
}


def settings(require_roles: bool = False, auth: bool = True) -> Settings:
    return load_settings(
        {
            "AzureWebJobsStorage": "UseDevelopmentStorage=true",
            "DEFENDER_TENANTS": json.dumps(TENANTS),
            "DEFENDER_APP_CLIENT_ID": "5b1c3f8e-2d4a-4e6b-9c7d-0a1b2c3d4e5f",
            "REQUIRE_TENANT_ROLES": str(require_roles).lower(),
            "WEBSITE_AUTH_ENABLED": str(auth),
        }
    )


def principal(*roles: str, role_typ: str = "roles") -> str:
    claims = [{"typ": role_typ, "val": r} for r in roles] + [{"typ": "name", "val": "Tenants.All"}]
    return base64.b64encode(
        json.dumps({"auth_typ": "aad", "role_typ": role_typ, "claims": claims}).encode()
    ).decode()


def request(tenant: str | None, **headers: str) -> ApiRequest:
    params = {} if tenant is None else {"tenant": tenant}
    return ApiRequest("POST", "https://gate.example/api/x", headers, route_params=params)


def test_the_plain_routes_and_home_are_the_home_tenant() -> None:
    assert tenant_of(request(None), settings()) == "home"
    assert tenant_of(request("home"), settings(require_roles=True)) == "home"
    assert tenant_of(request("contoso"), settings()) == "contoso"


def test_an_unknown_tenant_is_a_404_naming_it() -> None:
    with pytest.raises(RequestRejected) as raised:
        tenant_of(request("northwind"), settings())
    assert raised.value.status == 404 and "'northwind'" in raised.value.detail
    assert raised.value.errors[0].field == "tenant"


def test_without_required_roles_every_caller_reaches_every_tenant() -> None:
    assert tenant_of(request("fabrikam"), settings(require_roles=False, auth=False)) == "fabrikam"


def test_with_required_roles_a_function_key_reaches_only_home() -> None:
    with pytest.raises(RequestRejected) as raised:
        tenant_of(request("contoso"), settings(require_roles=True, auth=False))
    assert raised.value.status == 403 and "Tenant.contoso" in raised.value.detail


def test_with_required_roles_the_tenant_role_or_all_tenants_is_needed() -> None:
    s = settings(require_roles=True)
    own = request(
        "contoso", **{"X-MS-CLIENT-PRINCIPAL": principal("Tenant.contoso"), "X-MS-CLIENT-PRINCIPAL-ID": "p1"}
    )
    every = request(
        "fabrikam", **{"X-MS-CLIENT-PRINCIPAL": principal("Tenants.All"), "X-MS-CLIENT-PRINCIPAL-ID": "p2"}
    )
    other = request(
        "fabrikam", **{"X-MS-CLIENT-PRINCIPAL": principal("Tenant.contoso"), "X-MS-CLIENT-PRINCIPAL-ID": "p1"}
    )
    assert tenant_of(own, s) == "contoso" and tenant_of(every, s) == "fabrikam"
    with pytest.raises(RequestRejected) as raised:
        tenant_of(other, s)
    assert raised.value.status == 403


def test_a_forged_principal_without_app_service_authentication_grants_nothing() -> None:
    forged = request(
        "contoso", **{"X-MS-CLIENT-PRINCIPAL": principal("Tenants.All"), "X-MS-CLIENT-PRINCIPAL-ID": "x"}
    )
    with pytest.raises(RequestRejected) as raised:
        tenant_of(forged, settings(require_roles=True, auth=False))
    assert raised.value.status == 403
    assert caller_from_headers(principal("Tenants.All"), "x", auth_enabled=False) == Caller(
        False, frozenset()
    )


def test_roles_come_from_the_role_claim_type_the_principal_names() -> None:
    custom = "http://schemas.microsoft.com/ws/2008/06/identity/claims/role"
    assert roles_in(principal("Tenant.a", "Tenant.b")) == {"Tenant.a", "Tenant.b"}
    assert roles_in(principal("Tenants.All", role_typ=custom)) == {"Tenants.All"}
    assert roles_in("not base64 json!") == frozenset() and roles_in(None) == frozenset()
    unpadded = principal("Tenant.a").rstrip("=")
    assert roles_in(unpadded) == {"Tenant.a"}


def test_home_needs_no_role_and_others_need_one() -> None:
    nobody = Caller(False, frozenset())
    assert may_act_on("home", nobody, require_roles=True)
    assert not may_act_on("contoso", nobody, require_roles=True)
    assert may_act_on("contoso", nobody, require_roles=False)
    assert not may_act_on("contoso", Caller(False, frozenset({"Tenants.All"})), require_roles=True)


def test_a_sentinel_incident_goes_to_the_tenant_of_its_workspace() -> None:
    s = settings()
    assert workspace_tenant({"workspaceId": WORKSPACE.upper(), "object": {}}, s) == "contoso"
    assert workspace_tenant({"WorkspaceId": "00000000-0000-0000-0000-000000000000"}, s) == "home"
    assert workspace_tenant({"object": {}}, s) == "home" and workspace_tenant([], s) == "home"
