"""Bearer tokens for MDE from azure-identity, fetched once and reused until shortly before expiry.

In Azure the app uses ManagedIdentityCredential (AZURE_CLIENT_ID picks a user-assigned identity);
anywhere else DefaultAzureCredential, so a developer's own login works. Locally and in the tests the
App Service identity protocol is served by the identity emulator, so the real credential code runs.

The token is cached here rather than relying on the credential's own cache so that a 401 can force a
fresh one (docs/contracts.md §1: a 401 is retried once with a token fetched fresh, bypassing any cache): the
credential is then replaced, which discards whatever it had cached too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from azure.core.credentials_async import AsyncTokenCredential

log = logging.getLogger(__name__)

# Refresh this long before expiry so that a token never expires in flight (MDE tokens live ~1 hour).
REFRESH_MARGIN_SECONDS = 300.0


@dataclass(frozen=True)
class CachedToken:
    value: str
    expires_on: float


def make_credential(use_managed_identity: bool, client_id: str | None) -> AsyncTokenCredential:
    """The credential docs/contracts.md §5 asks for; imported lazily to keep cold start short."""
    if use_managed_identity:
        from azure.identity.aio import ManagedIdentityCredential

        return ManagedIdentityCredential(client_id=client_id) if client_id else ManagedIdentityCredential()
    from azure.identity.aio import DefaultAzureCredential

    return (
        DefaultAzureCredential(managed_identity_client_id=client_id)
        if client_id
        else DefaultAzureCredential()
    )


class TokenProvider:
    """One credential and one cached token per worker process, shared by every invocation."""

    def __init__(self, scope: str, use_managed_identity: bool, client_id: str | None) -> None:
        self._scope = scope
        self._use_managed_identity = use_managed_identity
        self._client_id = client_id
        self._credential: AsyncTokenCredential | None = None
        self._token: CachedToken | None = None
        self._lock = asyncio.Lock()

    async def token(self) -> str:
        """A valid bearer token; concurrent callers share one fetch."""
        cached = self._token
        if cached and cached.expires_on - REFRESH_MARGIN_SECONDS > time.time():
            return cached.value
        async with self._lock:
            cached = self._token
            if cached and cached.expires_on - REFRESH_MARGIN_SECONDS > time.time():
                return cached.value
            return await self._fetch()

    async def refresh(self, rejected: str | None = None) -> str:
        """A token fetched fresh from a new credential, after MDE answered 401 to `rejected`.

        If another invocation already replaced the rejected token, that newer one is used instead of
        fetching yet another.
        """
        async with self._lock:
            if self._token and rejected is not None and self._token.value != rejected:
                return self._token.value
            old, self._credential, self._token = self._credential, None, None
            if old is not None:
                await old.close()
            return await self._fetch()

    async def _fetch(self) -> str:
        if self._credential is None:
            self._credential = make_credential(self._use_managed_identity, self._client_id)
        access = await self._credential.get_token(self._scope)
        self._token = CachedToken(access.token, float(access.expires_on))
        log.info("fetched a token for %s, valid until %s", self._scope, int(access.expires_on))
        return access.token

    async def close(self) -> None:
        async with self._lock:
            if self._credential is not None:
                await self._credential.close()
            self._credential = None
            self._token = None
