"""Settings: defaults, parsing, and start-up errors that name the setting and the rule."""

from __future__ import annotations

import json

import pytest

from shared.errors import SettingsError
from shared.settings import RateWindow, load_settings, parse_rate_limits

BASE = {"AzureWebJobsStorage": "UseDevelopmentStorage=true"}


def test_defaults_match_the_design() -> None:
    s = load_settings(BASE)
    assert s.defender_api_base_url == "https://api.security.microsoft.com"
    assert s.batch_update_url == "https://api.security.microsoft.com/api/alerts/batchUpdate"
    assert s.defender_token_scope == "https://api.securitycenter.microsoft.com/.default"
    assert s.defender_rate_limits == (RateWindow(10, 60.0), RateWindow(500, 3600.0))
    assert (s.defender_max_alerts_per_call, s.max_alerts_per_request, s.max_body_bytes) == (
        500,
        10000,
        1048576,
    )
    assert (s.idempotency_ttl_seconds, s.derived_key_ttl_seconds, s.sync_max_wait_seconds) == (86400, 600, 5)
    assert (s.requests_queue, s.chunks_queue, s.table_prefix, s.max_attempts) == (
        "alert-update-requests",
        "alert-update-chunks",
        "alertgate",
        12,
    )
    assert s.rate_limit_safety_margin_seconds == 1 and s.defender_http_timeout_seconds == 30
    assert s.resend_unknown_with_comment is False and dict(s.defender_enum_overrides) == {}
    assert s.alert_id_pattern.fullmatch("da637399794050273582_760707377")


def test_decimal_seconds_and_scaled_windows() -> None:
    s = load_settings({**BASE, "DEFENDER_RATE_LIMITS": "20/20, 5/2", "SYNC_MAX_WAIT_SECONDS": "0.25"})
    assert s.defender_rate_limits == (RateWindow(5, 2.0), RateWindow(20, 20.0))
    assert s.sync_max_wait_seconds == 0.25


def test_every_bad_setting_is_named_at_once() -> None:
    env = {
        "DEFENDER_RATE_LIMITS": "10 per minute",
        "MAX_BODY_BYTES": "0",
        "DEFENDER_API_BASE_URL": "ftp://x",
        "ALERT_ID_PATTERN": "(",
        "DEFENDER_ENUM_OVERRIDES": '{"Nope": "x"}',
        "RESEND_UNKNOWN_WITH_COMMENT": "maybe",
        "REQUESTS_QUEUE": "Bad_Queue",
        "SYNC_MAX_WAIT_SECONDS": "nan",
    }
    with pytest.raises(SettingsError) as exc:
        load_settings(env)
    named = {name for name, _ in exc.value.problems}
    assert named == set(env) | {"AzureWebJobsStorage"}
    assert "DEFENDER_RATE_LIMITS: must be a comma-separated list" in str(exc.value)


def test_identity_based_storage() -> None:
    s = load_settings(
        {
            "AzureWebJobsStorage__accountName": "acct",
            "AzureWebJobsStorage__credential": "managedidentity",
            "AzureWebJobsStorage__clientId": "cid",
        }
    )
    assert s.storage.connection_string is None
    assert s.storage.table_service_uri == "https://acct.table.core.windows.net"
    assert s.storage.queue_service_uri == "https://acct.queue.core.windows.net"
    assert (s.storage.credential, s.storage.client_id) == ("managedidentity", "cid")


@pytest.mark.parametrize("text", ["", "10/0", "0/60", "10/60,20/60", "ten/60"])
def test_bad_rate_limits(text: str) -> None:
    with pytest.raises(ValueError):
        parse_rate_limits(text)


def test_managed_identity_is_used_where_the_identity_endpoint_is_set() -> None:
    assert load_settings({**BASE, "IDENTITY_ENDPOINT": "http://127.0.0.1:1/msi/token"}).use_managed_identity
    assert not load_settings(BASE).use_managed_identity


@pytest.mark.parametrize(
    ("value", "enabled"), [(None, False), ("True", True), ("true", True), ("False", False)]
)
def test_app_service_authentication_is_what_app_service_says(value: str | None, enabled: bool) -> None:
    env = BASE if value is None else {**BASE, "WEBSITE_AUTH_ENABLED": value}
    assert load_settings(env).app_service_auth_enabled is enabled


def test_a_bad_app_service_authentication_flag_is_named() -> None:
    with pytest.raises(SettingsError) as exc:
        load_settings({**BASE, "WEBSITE_AUTH_ENABLED": "sometimes"})
    assert [name for name, _ in exc.value.problems] == ["WEBSITE_AUTH_ENABLED"]


def test_names_read_are_the_designs_settings_plus_the_platforms() -> None:
    from shared.settings import PLATFORM_NAMES, names_read

    own = names_read() - PLATFORM_NAMES
    assert own == {
        "DEFENDER_API_BASE_URL",
        "DEFENDER_TOKEN_SCOPE",
        "AZURE_CLIENT_ID",
        "ALERT_ID_PATTERN",
        "DEFENDER_RATE_LIMITS",
        "RATE_LIMIT_SAFETY_MARGIN_SECONDS",
        "DEFENDER_MAX_ALERTS_PER_CALL",
        "MAX_ALERTS_PER_REQUEST",
        "MAX_BODY_BYTES",
        "DEFENDER_ENUM_OVERRIDES",
        "RESEND_UNKNOWN_WITH_COMMENT",
        "IDEMPOTENCY_TTL_SECONDS",
        "DERIVED_KEY_TTL_SECONDS",
        "SYNC_MAX_WAIT_SECONDS",
        "DEFENDER_HTTP_TIMEOUT_SECONDS",
        "REQUESTS_QUEUE",
        "CHUNKS_QUEUE",
        "TABLE_PREFIX",
        "MAX_ATTEMPTS",
        "SENTINEL_MAPPING",
        "SENTINEL_DEFAULT_ASSIGNEE",
        "SWEEP_SCHEDULE",
        "SWEEP_GRACE_SECONDS",
        "DEFENDER_PATCH_RATE_LIMITS",
        "PATCH_MAX_ALERTS",
        "DEFENDER_TENANTS",
        "DEFENDER_APP_CLIENT_ID",
        "REQUIRE_TENANT_ROLES",
    }
    assert names_read() >= PLATFORM_NAMES


# --- DEFENDER_TENANTS, DEFENDER_APP_CLIENT_ID, REQUIRE_TENANT_ROLES (docs/contracts.md §8) ----------------

APP = "5b1c3f8e-2d4a-4e6b-9c7d-0a1b2c3d4e5f"
CONTOSO = "a0e1b2c3-d4e5-4f60-8172-93a4b5c6d7e8"
FABRIKAM = "b1f2c3d4-e5f6-4071-8293-a4b5c6d7e8f9"
WORKSPACE = "c2a3b4c5-d6e7-4f80-9123-b4c5d6e7f8a9"


def tenants_env(tenants: object, **extra: str) -> dict[str, str]:
    return {**BASE, "DEFENDER_TENANTS": json.dumps(tenants), "DEFENDER_APP_CLIENT_ID": APP, **extra}


def test_no_tenants_by_default() -> None:
    s = load_settings(BASE)
    assert dict(s.defender_tenants) == {}
    assert s.defender_app_client_id is None and s.require_tenant_roles is False


def test_a_tenant_takes_the_home_tenants_endpoint_scope_and_limits_unless_it_names_its_own() -> None:
    s = load_settings(
        tenants_env(
            {
                "contoso": {"tenantId": CONTOSO.upper()},
                "fabrikam": {
                    "tenantId": FABRIKAM,
                    "apiBaseUrl": "https://api-us.security.microsoft.com/",
                    "tokenScope": "https://api.securitycenter.microsoft.com/.default",
                    "rateLimits": "5/2,20/20",
                    "patchRateLimits": "off",
                    "sentinelWorkspaceIds": [WORKSPACE],
                },
            },
            DEFENDER_RATE_LIMITS="8/60",
            REQUIRE_TENANT_ROLES="true",
        )
    )
    contoso, fabrikam = s.defender_tenants["contoso"], s.defender_tenants["fabrikam"]
    assert contoso.tenant_id == CONTOSO  # GUIDs kept in lower case
    assert contoso.api_base_url == s.defender_api_base_url and contoso.rate_limits == (RateWindow(8, 60.0),)
    assert contoso.patch_rate_limits == s.defender_patch_rate_limits
    assert fabrikam.api_base_url == "https://api-us.security.microsoft.com"
    assert fabrikam.rate_limits == (RateWindow(5, 2.0), RateWindow(20, 20.0))
    assert fabrikam.patch_rate_limits is None and fabrikam.sentinel_workspace_ids == (WORKSPACE,)
    assert s.defender_app_client_id == APP and s.require_tenant_roles is True


@pytest.mark.parametrize(
    ("tenants", "rule"),
    [
        ([], "must be a JSON object"),
        ({"Contoso": {"tenantId": CONTOSO}}, "tenant name 'Contoso' must match ^[a-z0-9-]{1,32}$"),
        ({"home": {"tenantId": CONTOSO}}, "tenant name 'home' is reserved for the home tenant"),
        ({"contoso": CONTOSO}, "contoso: must be a JSON object with at least tenantId"),
        ({"contoso": {}}, "contoso.tenantId: is required"),
        ({"contoso": {"tenantId": "contoso.onmicrosoft.com"}}, "contoso.tenantId: must be a GUID"),
        ({"contoso": {"tenantId": CONTOSO, "region": "eu"}}, "contoso: unknown field(s) region"),
        (
            {"contoso": {"tenantId": CONTOSO, "apiBaseUrl": "ftp://x"}},
            "contoso.apiBaseUrl: must be an absolute",
        ),
        (
            {"contoso": {"tenantId": CONTOSO, "rateLimits": "ten"}},
            "contoso.rateLimits: must be a comma-separated",
        ),
        ({"contoso": {"tenantId": CONTOSO, "rateLimits": 10}}, "contoso.rateLimits: must be a string"),
        (
            {"contoso": {"tenantId": CONTOSO, "rateLimits": "3000/60"}},
            "contoso: rate limits must allow at most",
        ),
        (
            {"contoso": {"tenantId": CONTOSO, "sentinelWorkspaceIds": "x"}},
            "contoso.sentinelWorkspaceIds: must be a list",
        ),
        (
            {"contoso": {"tenantId": CONTOSO}, "contoso-eu": {"tenantId": CONTOSO}},
            f"contoso-eu.tenantId: tenant {CONTOSO} is already named 'contoso'",
        ),
        (
            {
                "contoso": {"tenantId": CONTOSO, "sentinelWorkspaceIds": [WORKSPACE]},
                "fabrikam": {"tenantId": FABRIKAM, "sentinelWorkspaceIds": [WORKSPACE.upper()]},
            },
            f"fabrikam.sentinelWorkspaceIds: workspace {WORKSPACE} is already under 'contoso'",
        ),
    ],
)
def test_a_bad_tenant_is_named_with_its_rule(tenants: object, rule: str) -> None:
    with pytest.raises(SettingsError) as raised:
        load_settings(tenants_env(tenants))
    assert ("DEFENDER_TENANTS", rule) in [(n, r[: len(rule)]) for n, r in raised.value.problems]


def test_tenants_need_the_multi_tenant_app() -> None:
    env = tenants_env({"contoso": {"tenantId": CONTOSO}})
    del env["DEFENDER_APP_CLIENT_ID"]
    with pytest.raises(SettingsError) as raised:
        load_settings(env)
    assert [n for n, _ in raised.value.problems] == ["DEFENDER_APP_CLIENT_ID"]
    with pytest.raises(SettingsError) as raised:
        load_settings({**env, "DEFENDER_APP_CLIENT_ID": "my-app"})
    assert raised.value.problems == [
        ("DEFENDER_APP_CLIENT_ID", "must be a GUID like 00000000-0000-0000-0000-000000000000 (got 'my-app')")
    ]
