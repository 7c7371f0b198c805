"""Which tenant a request acts on, and whether its caller may (docs/contracts.md §8).

Decided at the edge, before any tenant's service is touched:

- The tenant is the route's `{tenant}`; the plain routes act on the home tenant, and `home` names it on
  the tenant routes too. A name this deployment does not serve is a 404 problem naming it.
- With REQUIRE_TENANT_ROLES off, every caller that passed the function key (or App Service
  authentication) may act on every tenant. With it on, acting on a customer tenant needs the app role
  `Tenants.All` or `Tenant.<name>`, which only App Service authentication can vouch for: a function-key
  caller reaches only the home tenant. The home tenant needs no role, so the routes that existed before
  tenants behave as they did (a choice the design leaves open; docs/contracts.md §8 "Choices").
- Roles are read from X-MS-CLIENT-PRINCIPAL (base64 JSON: the claims whose `typ` is its `role_typ`, or
  `roles`) and only when App Service authentication is on, because only then does App Service strip a
  caller's own copy of that header. Otherwise a forged header changes nothing.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shared.errors import FieldError, RequestRejected
from shared.tenants import HOME

ALL_TENANTS_ROLE = "Tenants.All"
ROLE_CLAIM_TYPES = ("roles", "http://schemas.microsoft.com/ws/2008/06/identity/claims/role")


@dataclass(frozen=True)
class Caller:
    """What the edge knows of who called: whether App Service authentication vouched for a principal,
    and the app roles it carries."""

    authenticated: bool
    roles: frozenset[str]


def tenant_named(name: str | None, served: Mapping[str, object]) -> str:
    """The tenant a route names (None: a plain route, the home tenant); a 404 problem for an unknown one."""
    if name is None or name == HOME:
        return HOME
    if name not in served:
        raise RequestRejected(
            404,
            "Unknown tenant",
            f"This deployment serves no tenant named {name!r}; the home tenant is 'home', others are "
            "named in DEFENDER_TENANTS.",
            [FieldError("tenant", f"{name!r} is not a tenant this deployment serves")],
        )
    return name


def may_act_on(tenant: str, caller: Caller, require_roles: bool) -> bool:
    if tenant == HOME or not require_roles:
        return True
    return caller.authenticated and bool({ALL_TENANTS_ROLE, f"Tenant.{tenant}"} & caller.roles)


def check_access(tenant: str, caller: Caller, require_roles: bool) -> None:
    """A 403 problem when the caller may not act on the tenant (nothing is accepted or sent then)."""
    if may_act_on(tenant, caller, require_roles):
        return
    how = (
        "a caller authenticated by App Service authentication with the app role "
        f"{ALL_TENANTS_ROLE} or Tenant.{tenant}"
    )
    raise RequestRejected(
        403,
        "Not allowed for this tenant",
        f"Acting on tenant {tenant!r} needs {how} (REQUIRE_TENANT_ROLES is on); a function key reaches only "
        "the home tenant.",
        [FieldError("tenant", f"needs the app role {ALL_TENANTS_ROLE} or Tenant.{tenant}")],
    )


def caller_from_headers(principal: str | None, principal_id: str | None, auth_enabled: bool) -> Caller:
    """The caller as App Service authentication describes it; an unauthenticated caller when it is off."""
    if not auth_enabled or not (principal or principal_id):
        return Caller(False, frozenset())
    return Caller(True, roles_in(principal))


def roles_in(principal: str | None) -> frozenset[str]:
    """The app roles in an X-MS-CLIENT-PRINCIPAL header; none when it is absent or unreadable."""
    if not principal:
        return frozenset()
    try:
        padded = principal + "=" * (-len(principal) % 4)
        document: Any = json.loads(base64.b64decode(padded, validate=False))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return frozenset()
    if not isinstance(document, dict) or not isinstance(document.get("claims"), list):
        return frozenset()
    role_type = document.get("role_typ")
    types = {role_type, *ROLE_CLAIM_TYPES} if isinstance(role_type, str) else set(ROLE_CLAIM_TYPES)
    return frozenset(
        str(claim["val"])
        for claim in document["claims"]
        if isinstance(claim, dict) and claim.get("typ") in types and isinstance(claim.get("val"), str)
    )
