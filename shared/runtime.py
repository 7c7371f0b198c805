"""What one worker process keeps between invocations: settings, one aiohttp session, one credential,
the storage clients and the pipeline built on them.

Created on first use inside the running event loop (an aiohttp session must be), reused by every
invocation, and closed by `shutdown()` (the development host calls it; in Azure the worker simply ends).
Tables and queues are created here once per process if missing (infra creates them in Azure).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

from shared.settings import Settings, load_settings

if TYPE_CHECKING:
    import aiohttp
    from azure.core.credentials_async import AsyncTokenCredential
    from azure.data.tables.aio import TableServiceClient

    from shared.defender import BatchLimit, DefenderClient
    from shared.idempotency import IdempotencyStore
    from shared.intake import Intake
    from shared.ledger import Ledger
    from shared.queues import Queues
    from shared.ratelimit import RateLimiter
    from shared.sender import Sender
    from shared.sentinel import SentinelMapping
    from shared.storage import Tables
    from shared.tokens import TokenProvider


@dataclass
class Runtime:
    settings: Settings
    session: aiohttp.ClientSession
    tokens: TokenProvider
    defender: DefenderClient
    table_service: TableServiceClient
    tables: Tables
    queues: Queues
    storage_credential: AsyncTokenCredential | None
    limiter: RateLimiter
    batch_limit: BatchLimit
    ledger: Ledger
    keys: IdempotencyStore
    sender: Sender
    intake: Intake

    storage_ready: bool = False

    async def ensure_storage(self) -> None:
        """Create the tables and queues if missing, once per process (retried on the next call if it failed)."""
        if not self.storage_ready:
            await asyncio.gather(self.tables.ensure_exist(self.table_service), self.queues.ensure_exist())
            self.storage_ready = True

    async def close(self) -> None:
        await self.queues.close()
        await self.tables.close()
        await self.table_service.close()
        if self.storage_credential is not None:
            await self.storage_credential.close()
        await self.tokens.close()
        await self.session.close()


async def build_runtime(settings: Settings) -> Runtime:
    import aiohttp

    from shared.defender import BatchLimit, DefenderClient, trace_config
    from shared.idempotency import IdempotencyStore
    from shared.intake import Intake
    from shared.ledger import Ledger
    from shared.queues import Queues, queue_client
    from shared.ratelimit import RateLimiter
    from shared.sender import Sender
    from shared.storage import Tables, storage_credential, table_service
    from shared.tokens import TokenProvider

    session = aiohttp.ClientSession(trace_configs=[trace_config()])
    tokens = TokenProvider(
        settings.defender_token_scope, settings.use_managed_identity, settings.azure_client_id
    )
    defender = DefenderClient(
        session, tokens, settings.batch_update_url, settings.defender_http_timeout_seconds
    )
    credential = storage_credential(settings.storage)
    service = table_service(settings.storage, credential)
    tables = Tables.from_service(service, settings.table_prefix)
    queues = Queues(
        queue_client(settings.storage, credential, settings.chunks_queue),
        queue_client(settings.storage, credential, settings.requests_queue),
        queue_client(settings.storage, credential, f"{settings.chunks_queue}-poison"),
    )
    limiter = RateLimiter(
        tables.budget, settings.defender_rate_limits, settings.rate_limit_safety_margin_seconds
    )
    batch_limit = BatchLimit(settings.defender_max_alerts_per_call, tables.budget)
    ledger = Ledger(tables.operations)
    keys = IdempotencyStore(
        tables.keys,
        explicit_ttl=settings.idempotency_ttl_seconds,
        derived_ttl=settings.derived_key_ttl_seconds,
        claim_lease=settings.sync_max_wait_seconds
        + 2 * settings.defender_http_timeout_seconds
        + settings.sweep_grace_seconds,
    )
    sender = Sender(settings, ledger, limiter, defender, batch_limit, queues)
    intake = Intake(settings, keys, ledger, sender)
    return Runtime(
        settings,
        session,
        tokens,
        defender,
        service,
        tables,
        queues,
        credential,
        limiter,
        batch_limit,
        ledger,
        keys,
        sender,
        intake,
    )


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
