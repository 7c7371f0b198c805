"""A typed async client for the emulators' `/_emulator/` control API, for tests and benchmarks.

Tests share one emulator process for the whole session, so each test starts with `reset()`; the helper
`max_calls_in_any_window` turns the recorded call times into proof that a client kept under a limit.
"""

from __future__ import annotations

import re
import ssl
from types import TracebackType
from typing import Any, cast
from urllib.parse import quote

import aiohttp


class EmulatorControlError(RuntimeError):
    """A control request was refused; the message carries the emulator's own explanation."""


def max_calls_in_any_window(times: list[float], window_seconds: float) -> int:
    """The most call times that fit in any half-open interval `[start, start + window_seconds)`.

    An interval holding the most calls can always be slid right until it starts at one of them, so it is
    enough to count, for each time, the times in `[time, time + window)` (two pointers over the sorted
    list, O(n log n)). This matches the emulator's sliding windows: with a limit of N calls per W
    seconds, the admitted call times never give more than N here.
    """
    if window_seconds <= 0:
        raise ValueError("window_seconds must be positive")
    ordered = sorted(times)
    best = 0
    end = 0
    for start, first in enumerate(ordered):
        end = max(end, start)
        while end < len(ordered) and ordered[end] < first + window_seconds:
            end += 1
        best = max(best, end - start)
    return best


def _camel(name: str) -> str:
    """`rate_limits` → `rateLimits` (`fail_next_with_70021` → `failNextWith70021`), so `configure()` takes
    Python-style or API-style names."""
    return re.sub(r"_([a-z0-9])", lambda match: match.group(1).upper(), name)


def _tenant_query(tenant_id: str | None) -> dict[str, str] | None:
    return None if tenant_id is None else {"tenantId": tenant_id}


class EmulatorControl:
    """Drives the emulators over HTTP with one aiohttp session: `async with EmulatorControl(...) as ctl`.

    `mde_url` is the MDE base (`http://127.0.0.1:P`), `identity_base_url` the identity server's base
    (`http://127.0.0.1:Q`, without `/msi/token`). `entra_url` (`https://127.0.0.1:R`, the emulators'
    `urls["entra"]`) and `entra_cert_file` (`urls["entra_cert"]`, the certificate to trust) are needed only
    for the `entra_*` methods; with them, `reset()` resets the Entra emulator too.
    """

    def __init__(
        self,
        mde_url: str,
        identity_base_url: str,
        entra_url: str | None = None,
        *,
        entra_cert_file: str | None = None,
    ) -> None:
        self.mde_url = mde_url.rstrip("/")
        self.identity_base_url = identity_base_url.rstrip("/")
        self.entra_url = entra_url.rstrip("/") if entra_url is not None else None
        self.entra_cert_file = entra_cert_file
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> EmulatorControl:
        context = ssl.create_default_context(cafile=self.entra_cert_file) if self.entra_cert_file else None
        connector = aiohttp.TCPConnector(ssl=context) if context is not None else None
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10), connector=connector)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _call(
        self,
        method: str,
        url: str,
        body: Any = None,
        *,
        missing_ok: bool = False,
        params: dict[str, str] | None = None,
    ) -> Any:
        if self._session is None:
            raise RuntimeError("use EmulatorControl as `async with EmulatorControl(...) as ctl`")
        async with self._session.request(method, url, json=body, params=params) as response:
            if missing_ok and response.status == 404:
                return None
            if response.status >= 400:
                text = await response.text()
                raise EmulatorControlError(f"{method} {url} -> {response.status}: {text}")
            return await response.json()

    # MDE emulator.

    async def reset(self) -> None:
        """Reset the MDE emulator (calls, faults, every tenant's alerts and windows, config, per-tenant
        limits), the identity requests, and the Entra emulator if this client knows it.

        Issued tokens stay valid (see `identity_reset` to revoke them too).
        """
        await self._call("POST", f"{self.mde_url}/_emulator/reset")
        await self.identity_reset()
        if self.entra_url is not None:
            await self.entra_reset()

    async def calls(self, api: str | None = None, tenant_id: str | None = None) -> list[dict[str, Any]]:
        """Every recorded call in arrival order, or only those whose `api` is `api` and/or of `tenant_id`.

        `api` is "batchUpdate", "patch" or "unknown" (a route error); each record's `alertIds` lists the
        alerts it named whatever the API (the body's ids for batchUpdate, the path's id for PATCH), and
        `tenantId` the tenant of its valid token (None if the call was refused before that).
        """
        body = await self._call("GET", f"{self.mde_url}/_emulator/calls", params=_tenant_query(tenant_id))
        calls = cast(list[dict[str, Any]], body["calls"])
        return calls if api is None else [call for call in calls if call["api"] == api]

    async def add_faults(self, faults: list[dict[str, Any]]) -> int:
        """Append to the fault FIFO; returns how many faults are now pending.

        A fault with `"api": "batchUpdate"` or `"api": "patch"` is taken only by the next admitted call
        of that API (others pass it by); one without `api` by the next admitted call of either.
        """
        body = await self._call("POST", f"{self.mde_url}/_emulator/faults", faults)
        return int(body["pending"])

    async def pending_faults(self) -> list[dict[str, Any]]:
        """Scripted faults not consumed yet (a call refused before admission does not consume one)."""
        body = await self._call("GET", f"{self.mde_url}/_emulator/faults")
        return cast(list[dict[str, Any]], body["faults"])

    async def configure(self, **fields: Any) -> dict[str, Any]:
        """Change MDE settings (`rate_limits="3/1"` or `rateLimits="3/1"`, ...); returns the new config.

        `rate_limits` is batchUpdate's budget, `patch_rate_limits` PATCH's own (`""` for no limit). With
        `tenant_id=...` only that tenant's `rate_limits`/`patch_rate_limits` change (None: back to the
        configured ones) and the answer is that tenant's `{"rateLimits", "patchRateLimits"}`.
        """
        payload = {_camel(name): value for name, value in fields.items()}
        body = await self._call("POST", f"{self.mde_url}/_emulator/config", payload)
        return cast(dict[str, Any], body["config"])

    async def alert(self, alert_id: str, tenant_id: str | None = None) -> dict[str, Any] | None:
        """The alert's emulated state in the home tenant (or `tenant_id`), or None if no call updated it."""
        url = f"{self.mde_url}/_emulator/alerts/{quote(alert_id, safe='')}"
        answer = await self._call("GET", url, missing_ok=True, params=_tenant_query(tenant_id))
        return cast(dict[str, Any] | None, answer)

    async def alerts(self, tenant_id: str | None = None) -> dict[str, dict[str, Any]]:
        """The home tenant's alerts (or `tenant_id`'s)."""
        body = await self._call("GET", f"{self.mde_url}/_emulator/alerts", params=_tenant_query(tenant_id))
        return cast(dict[str, dict[str, Any]], body["alerts"])

    async def tenants(self) -> dict[str, Any]:
        """`{"homeTenantId", "tenants": {id: {"rateLimits", "patchRateLimits", "own", "calls", "alerts"}}}`."""
        return cast(dict[str, Any], await self._call("GET", f"{self.mde_url}/_emulator/tenants"))

    # Identity endpoint.

    async def token_requests(self) -> list[dict[str, Any]]:
        body = await self._call("GET", f"{self.identity_base_url}/_emulator/requests")
        return cast(list[dict[str, Any]], body["requests"])

    async def identity_reset(self, revoke_tokens: bool = False) -> None:
        await self._call("POST", f"{self.identity_base_url}/_emulator/reset", {"revokeTokens": revoke_tokens})

    async def identity_config(self, token_lifetime_seconds: int | None = None) -> dict[str, Any]:
        payload = {} if token_lifetime_seconds is None else {"tokenLifetimeSeconds": token_lifetime_seconds}
        body = await self._call("POST", f"{self.identity_base_url}/_emulator/config", payload)
        return cast(dict[str, Any], body["config"])

    async def revoke_tokens(self, tokens: list[str] | None = None) -> int:
        """Make every token issued so far invalid, or only `tokens`; returns how many were live.

        Revoking everything in the session-wide emulator also hits tokens that app hosts started by
        other tests have cached; pass `tokens` unless the test owns its emulator process.
        """
        payload = None if tokens is None else {"tokens": tokens}
        body = await self._call("POST", f"{self.identity_base_url}/_emulator/revoke", payload)
        return int(body["revoked"])

    # Entra token endpoint.

    def _entra(self, path: str) -> str:
        if self.entra_url is None:
            raise RuntimeError("this EmulatorControl was made without entra_url")
        return f"{self.entra_url}{path}"

    async def entra_requests(self) -> list[dict[str, Any]]:
        """Every token request in arrival order: tenant, clientId, scope, assertion claims, status, errorCode."""
        body = await self._call("GET", self._entra("/_emulator/requests"))
        return cast(list[dict[str, Any]], body["requests"])

    async def entra_reset(self) -> None:
        """Forget token requests; consent, federated credential, lifetime and injected failures as at start-up."""
        await self._call("POST", self._entra("/_emulator/reset"))

    async def entra_config(self, **fields: Any) -> dict[str, Any]:
        """Change `consented_tenants` (list or None for all), `federated_credential` ({issuer?, subject?,
        audience?}), `token_lifetime_seconds`, `fail_next_with_70021`; returns the config (no fields: read)."""
        payload = {_camel(name): value for name, value in fields.items()}
        if not payload:
            body = await self._call("GET", self._entra("/_emulator/config"))
        else:
            body = await self._call("POST", self._entra("/_emulator/config"), payload)
        return cast(dict[str, Any], body["config"])
