"""alertgate's settings: read from the environment once, validated at start-up.

Every setting of docs/contracts.md §4 is parsed here and nowhere else. A bad value raises `SettingsError` listing
every bad setting by name with the rule it broke, so a misconfigured deployment stops at start-up with a
message an operator can act on, instead of failing on the first request.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

from shared.errors import SettingsError

MAX_IDS_PER_CALL = 900
MAX_PATCH_ALERTS = 99  # one delete and the one-alert pieces in one transaction (shared.ledger.split)
MAX_IDS_PER_REQUEST = 50000
DEFAULT_ALERT_ID_PATTERN = r"^(?:[a-z]{2})?\d{18}_-?\d{1,20}$"

T = TypeVar("T")


@dataclass(frozen=True)
class RateWindow:
    """At most `calls` calls in any interval of `seconds` seconds."""

    calls: int
    seconds: float

    def __str__(self) -> str:
        return f"{self.calls}/{self.seconds:g}"


@dataclass(frozen=True)
class StorageSettings:
    """Where Table and Queue storage are: a connection string, or identity-based service URIs."""

    connection_string: str | None
    table_service_uri: str | None
    queue_service_uri: str | None
    credential: str | None
    client_id: str | None


@dataclass(frozen=True)
class TenantSettings:
    """One customer tenant of DEFENDER_TENANTS (docs/contracts.md §8): where its MDE is and its limits.

    Missing fields take the home tenant's values (DEFENDER_API_BASE_URL, DEFENDER_TOKEN_SCOPE, the two
    rate-limit settings), so a tenant in the same cloud needs only its `tenantId`.
    """

    name: str
    tenant_id: str
    api_base_url: str
    token_scope: str
    rate_limits: tuple[RateWindow, ...]
    patch_rate_limits: tuple[RateWindow, ...] | None
    sentinel_workspace_ids: tuple[str, ...] = ()

    @property
    def batch_update_url(self) -> str:
        return f"{self.api_base_url}/api/alerts/batchUpdate"

    @property
    def alerts_url(self) -> str:
        """The PATCH channel's base: one alert is `{alerts_url}/{id}`."""
        return f"{self.api_base_url}/api/alerts"


@dataclass(frozen=True)
class Settings:
    storage: StorageSettings
    defender_api_base_url: str
    defender_token_scope: str
    azure_client_id: str | None
    alert_id_pattern: re.Pattern[str]
    defender_rate_limits: tuple[RateWindow, ...]
    rate_limit_safety_margin_seconds: float
    defender_max_alerts_per_call: int
    max_alerts_per_request: int
    max_body_bytes: int
    defender_enum_overrides: Mapping[str, str]
    resend_unknown_with_comment: bool
    idempotency_ttl_seconds: float
    derived_key_ttl_seconds: float
    sync_max_wait_seconds: float
    defender_http_timeout_seconds: float
    requests_queue: str
    chunks_queue: str
    table_prefix: str
    max_attempts: int
    sentinel_mapping: Mapping[str, Mapping[str, str | None]]
    sentinel_default_assignee: str | None
    sweep_schedule: str
    sweep_grace_seconds: float
    # The single-alert PATCH channel's own budget (docs/contracts.md §7); None: the channel is off.
    defender_patch_rate_limits: tuple[RateWindow, ...] | None = None
    patch_max_alerts: int = 10
    # In Azure (and locally against the identity emulator) the App Service identity endpoint is set;
    # elsewhere a developer's own login is used through DefaultAzureCredential (docs/contracts.md §5).
    use_managed_identity: bool = field(default=False)
    # App Service authentication (Easy Auth) is on: App Service sets WEBSITE_AUTH_ENABLED=True, and then
    # it strips any X-MS-CLIENT-PRINCIPAL* header a caller sends and adds its own. Only then do those
    # headers say who called; without it any caller could forge them (shared/api.py caller_of).
    app_service_auth_enabled: bool = field(default=False)
    # Customer tenants served besides the home tenant, by name (docs/contracts.md §8); empty: home only.
    defender_tenants: Mapping[str, TenantSettings] = field(default_factory=dict)
    # The multi-tenant Entra application whose federated credential trusts the managed identity.
    defender_app_client_id: str | None = None
    # With App Service authentication, acting on a tenant needs the app role Tenants.All or Tenant.<name>.
    require_tenant_roles: bool = False

    def home_tenant(self) -> TenantSettings:
        """The home tenant (the managed identity's own) as a tenant entry: the top-level settings."""
        return TenantSettings(
            name=HOME_TENANT_NAME,
            tenant_id="",
            api_base_url=self.defender_api_base_url,
            token_scope=self.defender_token_scope,
            rate_limits=self.defender_rate_limits,
            patch_rate_limits=self.defender_patch_rate_limits,
        )

    @property
    def batch_update_url(self) -> str:
        return f"{self.defender_api_base_url}/api/alerts/batchUpdate"

    @property
    def alerts_url(self) -> str:
        """The PATCH channel's base: one alert is `{alerts_url}/{id}`."""
        return f"{self.defender_api_base_url}/api/alerts"


class _Reader:
    """Collects every problem instead of stopping at the first, so one start-up shows them all."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.problems: list[tuple[str, str]] = []
        self.asked: set[str] = set()

    def raw(self, name: str) -> str | None:
        self.asked.add(name)
        value = self.env.get(name)
        if value is None or value.strip() == "":
            return None
        return value.strip()

    def get(self, name: str, default: T, parse: Callable[[str], T]) -> T:
        value = self.raw(name)
        if value is None:
            return default
        try:
            return parse(value)
        except (ValueError, TypeError) as exc:
            self.problems.append((name, f"{exc} (got {value!r})"))
            return default


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError("must be a whole number") from None
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def _seconds(minimum: float, *, allow_equal: bool = True) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError("must be a number of seconds (decimals allowed)") from None
        if not math.isfinite(value) or value < minimum or (not allow_equal and value == minimum):
            bound = "at least" if allow_equal else "more than"
            raise ValueError(f"must be a finite number of seconds {bound} {minimum:g}")
        return value

    return parse


def _bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in {"true", "1", "yes"}:
        return True
    if lowered in {"false", "0", "no"}:
        return False
    raise ValueError("must be true or false")


def _http_url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in {"http", "https"} or not parts.netloc:
        raise ValueError("must be an absolute http(s) URL")
    if parts.query or parts.fragment:
        raise ValueError("must not carry a query or fragment")
    return text.rstrip("/")


def _pattern(text: str) -> re.Pattern[str]:
    try:
        # ASCII: `\d` must not match other scripts' digits (docs/contracts.md §1: ASCII digits only).
        return re.compile(text, re.ASCII)
    except re.error as exc:
        raise ValueError(f"is not a valid regular expression: {exc}") from None


def parse_rate_limits(text: str) -> tuple[RateWindow, ...]:
    """`10/60,500/3600` → windows; calls whole and positive, seconds positive (decimals allowed)."""
    windows: list[RateWindow] = []
    for part in text.split(","):
        calls_text, sep, seconds_text = part.strip().partition("/")
        if not sep:
            raise ValueError("must be a comma-separated list of calls/seconds, like 10/60,500/3600")
        calls = _positive_int(calls_text.strip())
        seconds = _seconds(0, allow_equal=False)(seconds_text.strip())
        windows.append(RateWindow(calls, seconds))
    if len({w.seconds for w in windows}) != len(windows):
        raise ValueError("must not name the same window length twice")
    return tuple(sorted(windows, key=lambda w: w.seconds))


_DEFAULT_PATCH_LIMITS: tuple[RateWindow, ...] | None = (RateWindow(100, 60.0), RateWindow(1500, 3600.0))


def parse_optional_rate_limits(text: str) -> tuple[RateWindow, ...] | None:
    """Like `parse_rate_limits`, or `off` (any case) for a channel turned off."""
    if text.strip().lower() == "off":
        return None
    return parse_rate_limits(text)


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"must be a JSON object: {exc.msg} at position {exc.pos}") from None
    if not isinstance(value, dict):
        raise ValueError("must be a JSON object")
    return value


def _ncrontab(text: str) -> str:
    if len(text.split()) != 6:
        raise ValueError("must be a six-field NCRONTAB schedule (second minute hour day month day-of-week)")
    return text


def _queue_name(text: str) -> str:
    # Storage rule: 3-63 chars, lowercase letters, digits and single hyphens, not at either end.
    if not re.fullmatch(r"[a-z0-9](?:[a-z0-9]|-(?!-)){1,61}[a-z0-9]", text):
        raise ValueError("must be a Storage queue name: 3-63 lowercase letters, digits and single hyphens")
    return text


def _table_prefix(text: str) -> str:
    # Table names: alphanumeric, start with a letter, 3-63; the longest suffix we add is 'Operations'.
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9]{0,52}", text):
        raise ValueError("must start with a letter and hold only letters and digits (at most 53)")
    return text


_GUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_TENANT_NAME = re.compile(r"[a-z0-9-]{1,32}")
HOME_TENANT_NAME = "home"  # reserved: the managed identity's own tenant (shared.tenants.HOME)
_TENANT_FIELDS = frozenset(
    {"tenantId", "apiBaseUrl", "tokenScope", "rateLimits", "patchRateLimits", "sentinelWorkspaceIds"}
)


def _guid(text: str) -> str:
    if not isinstance(text, str) or not _GUID.fullmatch(text):
        raise ValueError("must be a GUID like 00000000-0000-0000-0000-000000000000")
    return text.lower()


def _tenant(name: str, spec: Any, home: Settings) -> TenantSettings:
    """One entry of DEFENDER_TENANTS; ValueError names the field and its rule."""
    if not _TENANT_NAME.fullmatch(name):
        raise ValueError(f"tenant name {name!r} must match ^[a-z0-9-]{{1,32}}$")
    if name == HOME_TENANT_NAME:
        raise ValueError(f"tenant name {name!r} is reserved for the home tenant")
    if not isinstance(spec, dict):
        raise ValueError(f"{name}: must be a JSON object with at least tenantId")
    unknown = sorted(set(spec) - _TENANT_FIELDS)
    if unknown:
        raise ValueError(
            f"{name}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(_TENANT_FIELDS))}"
        )

    def field_of(key: str, default: T, parse: Callable[[Any], T]) -> T:
        if key not in spec:
            return default
        value = spec[key]
        try:
            if key != "sentinelWorkspaceIds" and not isinstance(value, str):
                raise ValueError("must be a string")
            return parse(value)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{name}.{key}: {exc}") from None

    if "tenantId" not in spec:
        raise ValueError(f"{name}.tenantId: is required")
    return TenantSettings(
        name=name,
        tenant_id=field_of("tenantId", "", _guid),
        api_base_url=field_of("apiBaseUrl", home.defender_api_base_url, _http_url),
        token_scope=field_of("tokenScope", home.defender_token_scope, _scope),
        rate_limits=field_of("rateLimits", home.defender_rate_limits, parse_rate_limits),
        patch_rate_limits=field_of(
            "patchRateLimits", home.defender_patch_rate_limits, parse_optional_rate_limits
        ),
        sentinel_workspace_ids=field_of("sentinelWorkspaceIds", (), _workspace_ids),
    )


def _scope(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty")
    return text.strip()


def _workspace_ids(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError("must be a list of workspace GUIDs")
    return tuple(_guid(item) for item in value)


def _tenants(reader: _Reader, home: Settings) -> dict[str, TenantSettings]:
    """DEFENDER_TENANTS, every entry checked; a tenant id or Sentinel workspace under two names is refused
    (two budgets for one tenant would let alertgate exceed MDE's per-tenant limits)."""
    document: dict[str, Any] = reader.get("DEFENDER_TENANTS", {}, _json_object)
    tenants: dict[str, TenantSettings] = {}
    for name, spec in document.items():
        try:
            tenants[name] = _tenant(name, spec, home)
        except ValueError as exc:
            reader.problems.append(("DEFENDER_TENANTS", str(exc)))
    by_tenant: dict[str, str] = {}
    by_workspace: dict[str, str] = {}
    for name, tenant in tenants.items():
        if any(w.calls > 2000 for w in (*tenant.rate_limits, *(tenant.patch_rate_limits or ()))):
            reader.problems.append(
                ("DEFENDER_TENANTS", f"{name}: rate limits must allow at most 2000 calls per window")
            )
        other = by_tenant.setdefault(tenant.tenant_id, name)
        if other != name:
            reader.problems.append(
                ("DEFENDER_TENANTS", f"{name}.tenantId: tenant {tenant.tenant_id} is already named {other!r}")
            )
        for workspace in tenant.sentinel_workspace_ids:
            owner = by_workspace.setdefault(workspace, name)
            if owner != name:
                reader.problems.append(
                    (
                        "DEFENDER_TENANTS",
                        f"{name}.sentinelWorkspaceIds: workspace {workspace} is already under {owner!r}",
                    )
                )
    return tenants


def _storage(reader: _Reader) -> StorageSettings:
    conn = reader.raw("AzureWebJobsStorage")
    account = reader.raw("AzureWebJobsStorage__accountName")
    table_uri = reader.raw("AzureWebJobsStorage__tableServiceUri")
    queue_uri = reader.raw("AzureWebJobsStorage__queueServiceUri")
    if account:
        table_uri = table_uri or f"https://{account}.table.core.windows.net"
        queue_uri = queue_uri or f"https://{account}.queue.core.windows.net"
    if not conn and not (table_uri and queue_uri):
        reader.problems.append(
            (
                "AzureWebJobsStorage",
                "is required: a connection string, or AzureWebJobsStorage__accountName (or both "
                "AzureWebJobsStorage__tableServiceUri and AzureWebJobsStorage__queueServiceUri)",
            )
        )
    for name, uri in (
        ("AzureWebJobsStorage__tableServiceUri", table_uri),
        ("AzureWebJobsStorage__queueServiceUri", queue_uri),
    ):
        if uri and not conn:
            try:
                _http_url(uri)
            except ValueError as exc:
                reader.problems.append((name, str(exc)))
    return StorageSettings(
        connection_string=conn,
        table_service_uri=None if conn else table_uri,
        queue_service_uri=None if conn else queue_uri,
        credential=reader.raw("AzureWebJobsStorage__credential"),
        client_id=reader.raw("AzureWebJobsStorage__clientId"),
    )


def _enum_overrides(reader: _Reader) -> dict[str, str]:
    from shared.validation import ALL_CANONICAL_VALUES  # model imports nothing heavy

    overrides: dict[str, Any] = reader.get("DEFENDER_ENUM_OVERRIDES", {}, _json_object)
    clean: dict[str, str] = {}
    for key, value in overrides.items():
        if key not in ALL_CANONICAL_VALUES:
            reader.problems.append(
                (
                    "DEFENDER_ENUM_OVERRIDES",
                    f"key {key!r} is not a canonical status, classification or "
                    f"determination value (one of {', '.join(sorted(ALL_CANONICAL_VALUES))})",
                )
            )
        elif not isinstance(value, str) or not value.strip():
            reader.problems.append(
                ("DEFENDER_ENUM_OVERRIDES", f"value for {key!r} must be a non-empty string")
            )
        else:
            clean[key] = value
    return clean


def _sentinel_mapping(reader: _Reader) -> dict[str, dict[str, str | None]]:
    """Shape-checked here; the sentinel module checks the values against the enums when it is built."""
    mapping: dict[str, Any] = reader.get("SENTINEL_MAPPING", {}, _json_object)
    clean: dict[str, dict[str, str | None]] = {}
    for key, value in mapping.items():
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and (v is None or isinstance(v, str)) for k, v in value.items()
        ):
            reader.problems.append(
                (
                    "SENTINEL_MAPPING",
                    f"entry {key!r} must be an object of strings, like "
                    '{"classification": "FalsePositive", "determination": "NotMalicious"}',
                )
            )
            continue
        clean[key] = dict(value)
    from shared.sentinel import build_mapping  # checks the values against the enums

    try:
        build_mapping(clean)
    except SettingsError as exc:
        reader.problems.extend(exc.problems)
    return clean


def _assignee(text: str) -> str:
    if len(text) > 256 or any(unicodedata.category(c) in ("Cc", "Cs") for c in text):
        raise ValueError("must be 1-256 characters without control characters (it is sent as assignedTo)")
    return text


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Parse and validate every setting; raise SettingsError naming each bad one."""
    return _load(_Reader(os.environ if env is None else env))


def names_read() -> frozenset[str]:
    """Every environment variable the settings module reads (for the infra consistency check)."""
    reader = _Reader({"AzureWebJobsStorage": "UseDevelopmentStorage=true"})
    _load(reader)
    return frozenset(reader.asked)


# Variables read above that are not alertgate's own settings: the platform's (the storage connection's
# identity-based forms, azure-identity's, and App Service's) and so not set by alertgate's deployment.
PLATFORM_NAMES = frozenset({
    "AzureWebJobsStorage", "AzureWebJobsStorage__accountName", "AzureWebJobsStorage__tableServiceUri",
    "AzureWebJobsStorage__queueServiceUri", "AzureWebJobsStorage__credential", "AzureWebJobsStorage__clientId",
    "IDENTITY_ENDPOINT", "MSI_ENDPOINT", "WEBSITE_INSTANCE_ID", "WEBSITE_AUTH_ENABLED",
})  # fmt: skip


def _load(reader: _Reader) -> Settings:
    max_per_call = reader.get("DEFENDER_MAX_ALERTS_PER_CALL", 500, _positive_int)
    max_per_request = reader.get("MAX_ALERTS_PER_REQUEST", 10000, _positive_int)
    settings = Settings(
        storage=_storage(reader),
        defender_api_base_url=reader.get(
            "DEFENDER_API_BASE_URL", "https://api.security.microsoft.com", _http_url
        ),
        defender_token_scope=reader.get(
            "DEFENDER_TOKEN_SCOPE", "https://api.securitycenter.microsoft.com/.default", str
        ),
        azure_client_id=reader.raw("AZURE_CLIENT_ID"),
        alert_id_pattern=reader.get(
            "ALERT_ID_PATTERN", re.compile(DEFAULT_ALERT_ID_PATTERN, re.ASCII), _pattern
        ),
        defender_rate_limits=reader.get(
            "DEFENDER_RATE_LIMITS", (RateWindow(10, 60.0), RateWindow(500, 3600.0)), parse_rate_limits
        ),
        rate_limit_safety_margin_seconds=reader.get("RATE_LIMIT_SAFETY_MARGIN_SECONDS", 1.0, _seconds(0)),
        defender_max_alerts_per_call=max_per_call,
        max_alerts_per_request=max_per_request,
        max_body_bytes=reader.get("MAX_BODY_BYTES", 1048576, _positive_int),
        defender_enum_overrides=_enum_overrides(reader),
        resend_unknown_with_comment=reader.get("RESEND_UNKNOWN_WITH_COMMENT", False, _bool),
        idempotency_ttl_seconds=reader.get(
            "IDEMPOTENCY_TTL_SECONDS", 86400.0, _seconds(0, allow_equal=False)
        ),
        derived_key_ttl_seconds=reader.get("DERIVED_KEY_TTL_SECONDS", 600.0, _seconds(0)),
        sync_max_wait_seconds=reader.get("SYNC_MAX_WAIT_SECONDS", 5.0, _seconds(0)),
        defender_http_timeout_seconds=reader.get(
            "DEFENDER_HTTP_TIMEOUT_SECONDS", 30.0, _seconds(0, allow_equal=False)
        ),
        requests_queue=reader.get("REQUESTS_QUEUE", "alert-update-requests", _queue_name),
        chunks_queue=reader.get("CHUNKS_QUEUE", "alert-update-chunks", _queue_name),
        table_prefix=reader.get("TABLE_PREFIX", "alertgate", _table_prefix),
        max_attempts=reader.get("MAX_ATTEMPTS", 12, _positive_int),
        sentinel_mapping=_sentinel_mapping(reader),
        sentinel_default_assignee=reader.get("SENTINEL_DEFAULT_ASSIGNEE", None, _assignee),
        sweep_schedule=reader.get("SWEEP_SCHEDULE", "*/30 * * * * *", _ncrontab),
        sweep_grace_seconds=reader.get("SWEEP_GRACE_SECONDS", 60.0, _seconds(0)),
        defender_patch_rate_limits=reader.get(
            "DEFENDER_PATCH_RATE_LIMITS",
            _DEFAULT_PATCH_LIMITS,
            parse_optional_rate_limits,
        ),
        patch_max_alerts=reader.get("PATCH_MAX_ALERTS", 10, _positive_int),
        use_managed_identity=bool(
            reader.raw("IDENTITY_ENDPOINT") or reader.raw("MSI_ENDPOINT") or reader.raw("WEBSITE_INSTANCE_ID")
        ),
        app_service_auth_enabled=reader.get("WEBSITE_AUTH_ENABLED", False, _bool),
    )
    if settings.defender_max_alerts_per_call > MAX_IDS_PER_CALL:
        reader.problems.append(
            (
                "DEFENDER_MAX_ALERTS_PER_CALL",
                f"must be at most {MAX_IDS_PER_CALL}: a pending "
                "chunk's ids are kept in one Table Storage property (64 KiB)",
            )
        )
    if settings.max_alerts_per_request > MAX_IDS_PER_REQUEST:
        reader.problems.append(
            (
                "MAX_ALERTS_PER_REQUEST",
                f"must be at most {MAX_IDS_PER_REQUEST}: a request is "
                "accepted in one Table Storage transaction (at most 97 chunks)",
            )
        )
    for name, windows in (
        ("DEFENDER_RATE_LIMITS", settings.defender_rate_limits),
        ("DEFENDER_PATCH_RATE_LIMITS", settings.defender_patch_rate_limits or ()),
    ):
        if any(w.calls > 2000 for w in windows):
            reader.problems.append(
                (
                    name,
                    "must allow at most 2000 calls per window: the budget's "
                    "log of calls is kept in one Table Storage property",
                )
            )
    if settings.patch_max_alerts > MAX_PATCH_ALERTS:
        reader.problems.append(
            (
                "PATCH_MAX_ALERTS",
                f"must be at most {MAX_PATCH_ALERTS}: a chunk's PATCH pieces are marked in one "
                "Table Storage transaction",
            )
        )
    tenants = _tenants(reader, settings)
    app_client_id = reader.get("DEFENDER_APP_CLIENT_ID", None, _guid)
    if (
        tenants
        and app_client_id is None
        and not any(n == "DEFENDER_APP_CLIENT_ID" for n, _ in reader.problems)
    ):
        reader.problems.append(
            (
                "DEFENDER_APP_CLIENT_ID",
                "is required once DEFENDER_TENANTS names a tenant: the multi-tenant application whose "
                "federated credential trusts the managed identity",
            )
        )
    settings = dataclasses.replace(
        settings,
        defender_tenants=tenants,
        defender_app_client_id=app_client_id,
        require_tenant_roles=reader.get("REQUIRE_TENANT_ROLES", False, _bool),
    )
    if settings.requests_queue == settings.chunks_queue:
        reader.problems.append(("CHUNKS_QUEUE", "must differ from REQUESTS_QUEUE"))
    if reader.problems:
        raise SettingsError(reader.problems)
    return settings
