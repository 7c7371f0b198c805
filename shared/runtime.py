"""What one worker process keeps between invocations: settings, one aiohttp session, the storage
clients and queues, and each tenant's services built on them (shared.tenants).

Created on first use inside the running event loop (an aiohttp session must be), reused by every
invocation, and closed by `shutdown()` (the development host calls it; in Azure the worker simply ends).
Tables and queues are created here once per process if missing (infra creates them in Azure).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

from shared.settings import Settings, load_settings
from shared.tenants import HOME, TenantContext, UnknownTenant, build_tenant

if TYPE_CHECKING:
    import aiohttp
    from azure.core.credentials_async import AsyncTokenCredential
    from azure.data.tables.aio import TableServiceClient

    from shared.queues import Queues
    from shared.sentinel import SentinelMapping
    from shared.storage import Tables
    from shared.telemetry import Telemetry
    from shared.tenants import TenantServices
    from shared.tokens import TokenProvider

# How long a stopping process lets the tries for left-out riders finish before cutting them short (each
# then queues its riders): a second covers a call about to leave, not one waiting for a later slot.
DRIVER_STOP_GRACE_SECONDS = 1.0


@dataclass
class Runtime:
    settings: Settings
    session: aiohttp.ClientSession
    table_service: TableServiceClient
    tables: Tables
    queues: Queues
    storage_credential: AsyncTokenCredential | None
    tenants: dict[str, TenantServices]
    # The managed identity's token for the token exchange, shared by the customer tenants; None without.
    assertion: TokenProvider | None = None
    telemetry: Telemetry | None = None

    storage_ready: bool = False

    @property
    def home(self) -> TenantServices:
        return self.tenants[HOME]

    def tenant(self, name: str = HOME) -> TenantServices:
        """The services of the tenant the edge decided on; UnknownTenant if this deployment has none."""
        try:
            return self.tenants[name]
        except KeyError:
            raise UnknownTenant(name) from None

    async def ensure_storage(self) -> None:
        """Create the tables and queues if missing, once per process (retried on the next call if it failed)."""
        if not self.storage_ready:
            await asyncio.gather(self.tables.ensure_exist(self.table_service), self.queues.ensure_exist())
            self.storage_ready = True

    async def close(self) -> None:
        # tries for riders a call left out queue them if cut short: before the queues close
        await asyncio.gather(
            *(t.sender.stop_drivers(DRIVER_STOP_GRACE_SECONDS) for t in self.tenants.values())
        )
        await self.queues.close()
        await self.tables.close()
        await self.table_service.close()
        if self.storage_credential is not None:
            await self.storage_credential.close()
        for tenant in self.tenants.values():
            await tenant.close()
        if self.assertion is not None:
            await self.assertion.close()
        await self.session.close()


async def build_runtime(settings: Settings, telemetry: Telemetry | None = None) -> Runtime:
    """Everything one process keeps; `telemetry` defaults to the OpenTelemetry API's global providers
    (the Functions worker's SDK in Azure, no-ops elsewhere)."""
    import aiohttp

    from shared.channels.base import Transport, trace_config
    from shared.queues import Queues, queue_client
    from shared.storage import Tables, storage_credential, table_service
    from shared.telemetry import Telemetry
    from shared.tokens import TokenProvider, assertion_tokens, tenant_tokens

    telemetry = telemetry if telemetry is not None else Telemetry()

    session = aiohttp.ClientSession(trace_configs=[trace_config()])
    transport = Transport(session, settings.defender_http_timeout_seconds)
    credential = storage_credential(settings.storage)
    service = table_service(settings.storage, credential)
    tables = Tables.from_service(service, settings.table_prefix)
    queues = Queues(
        queue_client(settings.storage, credential, settings.chunks_queue),
        queue_client(settings.storage, credential, settings.requests_queue),
        queue_client(settings.storage, credential, f"{settings.chunks_queue}-poison"),
        requests_poison=queue_client(settings.storage, credential, f"{settings.requests_queue}-poison"),
    )
    tokens = TokenProvider.managed(
        settings.defender_token_scope, settings.use_managed_identity, settings.azure_client_id
    )
    tenants = {
        HOME: build_tenant(
            TenantContext.home(),
            settings.home_tenant(),
            settings,
            tokens,
            transport,
            tables,
            queues,
            telemetry,
        )
    }
    assertion: TokenProvider | None = None
    if settings.defender_tenants:
        assert settings.defender_app_client_id is not None  # load_settings requires it with tenants
        assertion = assertion_tokens(settings.use_managed_identity, settings.azure_client_id)
        for name, profile in settings.defender_tenants.items():
            tenant_provider = tenant_tokens(
                profile.token_scope, profile.tenant_id, settings.defender_app_client_id, assertion
            )
            tenants[name] = build_tenant(
                TenantContext.customer(name, profile.tenant_id),
                profile,
                settings,
                tenant_provider,
                transport,
                tables,
                queues.for_tenant(name),
                telemetry,
            )
    return Runtime(settings, session, service, tables, queues, credential, tenants, assertion, telemetry)


_settings: Settings | None = None
_runtime: Runtime | None = None
_lock: asyncio.Lock | None = None


def settings() -> Settings:
    """The settings, read and validated once per process (SettingsError names every bad one)."""
    global _settings
    if _settings is None:
        _settings = load_settings()
    return _settings


_sentinel_mapping: SentinelMapping | None = None


def sentinel_mapping() -> SentinelMapping:
    """SENTINEL_MAPPING merged over the defaults (validated at start-up by load_settings)."""
    global _sentinel_mapping
    if _sentinel_mapping is None:
        from shared.sentinel import build_mapping

        _sentinel_mapping = build_mapping(settings().sentinel_mapping)
    return _sentinel_mapping


async def runtime() -> Runtime:
    global _runtime, _lock
    if _runtime is not None:
        return _runtime
    if _lock is None:
        _lock = asyncio.Lock()
    async with _lock:
        if _runtime is None:
            _runtime = await build_runtime(settings())
        return _runtime


async def ready() -> Runtime:
    """The runtime with its tables and queues in place: what every handler that touches state needs."""
    current = await runtime()
    await current.ensure_storage()
    return current


async def shutdown() -> None:
    global _runtime
    current, _runtime = _runtime, None
    if current is not None:
        await current.close()
