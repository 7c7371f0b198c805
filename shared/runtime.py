"""What one worker process keeps between invocations: settings, one aiohttp session, one credential.

Created on first use inside the running event loop (an aiohttp session must be), reused by every
invocation, and closed by `shutdown()` (the development host calls it; in Azure the worker simply ends).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

from shared.defender import BatchLimit, DefenderClient, trace_config
from shared.dispatch import Forwarder
from shared.settings import Settings, load_settings
from shared.tokens import TokenProvider

if TYPE_CHECKING:
    import aiohttp
    from azure.core.credentials_async import AsyncTokenCredential
    from azure.data.tables.aio import TableServiceClient


@dataclass
class Runtime:
    settings: Settings
    session: aiohttp.ClientSession
    tokens: TokenProvider
    defender: DefenderClient
    forwarder: Forwarder
    tables: TableServiceClient
    storage_credential: AsyncTokenCredential | None

    async def close(self) -> None:
        await self.tables.close()
        if self.storage_credential is not None:
            await self.storage_credential.close()
        await self.tokens.close()
        await self.session.close()


async def build_runtime(settings: Settings) -> Runtime:
    import aiohttp

    from shared.storage import storage_credential, table_service

    session = aiohttp.ClientSession(trace_configs=[trace_config()])
    tokens = TokenProvider(
        settings.defender_token_scope, settings.use_managed_identity, settings.azure_client_id
    )
    defender = DefenderClient(
        session, tokens, settings.batch_update_url, settings.defender_http_timeout_seconds
    )
    forwarder = Forwarder(
        defender,
        BatchLimit(settings.defender_max_alerts_per_call),
        dict(settings.defender_enum_overrides),
        settings.resend_unknown_with_comment,
    )
    credential = storage_credential(settings.storage)
    return Runtime(
        settings,
        session,
        tokens,
        defender,
        forwarder,
        table_service(settings.storage, credential),
        credential,
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


async def shutdown() -> None:
    global _runtime
    current, _runtime = _runtime, None
    if current is not None:
        await current.close()
