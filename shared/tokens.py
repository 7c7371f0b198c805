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
from collections.abc import Awaitable, Callable
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
    """One credential and one cached token per worker process and tenant, shared by every invocation.

    `make` builds the credential (again after a 401); `before_fetch`, if given, runs before every token
    fetch: a customer tenant's provider uses it to have the managed identity's assertion at hand, which
    its credential then reads synchronously (`tenant_tokens`).
    """

    def __init__(
        self,
        scope: str,
        make: Callable[[], AsyncTokenCredential],
        before_fetch: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        self._scope = scope
        self._make = make
        self._before_fetch = before_fetch
        self._credential: AsyncTokenCredential | None = None
        self._token: CachedToken | None = None
        self._lock = asyncio.Lock()

    @classmethod
    def managed(cls, scope: str, use_managed_identity: bool, client_id: str | None) -> TokenProvider:
        """The home tenant's tokens: the managed identity itself (docs/contracts.md §5)."""
        return cls(scope, lambda: make_credential(use_managed_identity, client_id))

    def cached(self) -> str:
        """The token fetched last, without I/O (for azure-identity's synchronous assertion callback)."""
        if self._token is None:
            raise RuntimeError(f"no token for {self._scope} has been fetched yet")
        return self._token.value

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
        if self._before_fetch is not None:
            await self._before_fetch()
        if self._credential is None:
            self._credential = self._make()
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


# The audience of the managed identity's token that a federated identity credential accepts as an
# assertion (docs/contracts.md §8); with /.default it is the scope the identity endpoint is asked for.
EXCHANGE_SCOPE = "api://AzureADTokenExchange/.default"


def assertion_tokens(use_managed_identity: bool, client_id: str | None) -> TokenProvider:
    """The managed identity's token for the token exchange, shared by every customer tenant."""
    return TokenProvider.managed(EXCHANGE_SCOPE, use_managed_identity, client_id)


def tenant_tokens(scope: str, tenant_id: str, app_client_id: str, assertion: TokenProvider) -> TokenProvider:
    """A customer tenant's tokens, without a secret: the multi-tenant application signs in to that tenant
    with the managed identity's token as its client assertion (a federated identity credential).

    azure-identity calls the assertion callback synchronously, even in `azure.identity.aio`, so the
    assertion is fetched asynchronously before each token fetch (`before_fetch`: cached, refreshed
    REFRESH_MARGIN_SECONDS before it expires) and the callback only reads it. The authority is
    azure-identity's own AZURE_AUTHORITY_HOST, so other clouds and the local Entra emulator need no code.
    """

    def make() -> AsyncTokenCredential:
        from azure.identity.aio import ClientAssertionCredential

        return ClientAssertionCredential(tenant_id, app_client_id, assertion.cached)

    return TokenProvider(scope, make, before_fetch=assertion.token)
