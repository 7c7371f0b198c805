"""A managed-identity token endpoint speaking App Service's protocol (api-version 2019-08-01).

alertgate gets its Defender token from azure-identity's `ManagedIdentityCredential`. Locally there is no
Azure, so this endpoint answers the exact request that credential sends when `IDENTITY_ENDPOINT` and
`IDENTITY_HEADER` are set (`GET /msi/token?api-version=2019-08-01&resource=...[&client_id=...]` with the
`X-IDENTITY-HEADER` secret). Running the real credential against it means tests exercise the real token
code path instead of a patched credential (docs/contracts.md §5).

Tokens are opaque random strings kept in a `TokenRegistry` that the MDE emulator shares, so a token is
accepted there only if it was issued here, for an accepted audience, and is neither expired nor revoked.
Module-level helpers at the bottom (`LOG_DETAIL`, `error_body`, `read_json_object`, `bad_request`) are
shared with mde.py.
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any

from aiohttp import web

API_VERSION = "2019-08-01"
TOKEN_PATH = "/msi/token"
IDENTITY_HEADER_NAME = "X-IDENTITY-HEADER"
# Answered as client_id when the caller asks for the system-assigned identity (no client_id parameter).
FAKE_CLIENT_ID = "00000000-0000-4000-8000-00000000a1e7"
DEFAULT_TOKEN_LIFETIME_SECONDS = 3600

# What each handler wants appended to its one access-log line (see __main__.py).
LOG_DETAIL = web.RequestKey("emulator_log_detail", str)


class TokenRejected(Exception):
    """Why a bearer token is not acceptable; the MDE emulator turns it into a 401 with this message."""


@dataclass(frozen=True)
class IssuedToken:
    """What the registry remembers about a token: who it is for, whose it is, and until when it is valid."""

    resource: str
    client_id: str
    expires_on: int  # unix seconds: the very value sent as `expires_on`, so client and server agree


class TokenRegistry:
    """Tokens issued by the identity endpoint, shared with the MDE emulator (one process, one loop).

    Revoked tokens are remembered separately so a 401 can say *why* a token was refused, which makes a
    failing test about the app's "401 → fresh token, retry once" rule much easier to read.
    """

    def __init__(self) -> None:
        self._tokens: dict[str, IssuedToken] = {}
        self._revoked: set[str] = set()

    def issue(
        self, resource: str, client_id: str, lifetime_seconds: int, now: float
    ) -> tuple[str, IssuedToken]:
        """A new opaque token valid until `now + lifetime` (rounded down to whole seconds, as sent)."""
        token = "emu-" + secrets.token_urlsafe(32)
        issued = IssuedToken(resource=resource, client_id=client_id, expires_on=int(now + lifetime_seconds))
        self._tokens[token] = issued
        return token, issued

    def validate(self, token: str, audiences: frozenset[str], now: float) -> IssuedToken:
        """The token's record if it is usable now for one of `audiences`; otherwise TokenRejected."""
        if token in self._revoked:
            raise TokenRejected("The access token has been revoked.")
        issued = self._tokens.get(token)
        if issued is None:
            raise TokenRejected("The access token is invalid: it was not issued by the identity endpoint.")
        if now >= issued.expires_on:
            raise TokenRejected("The access token has expired.")
        if issued.resource not in audiences:
            raise TokenRejected(f"The access token audience '{issued.resource}' is not accepted.")
        return issued

    def revoke_all(self) -> int:
        """Invalidate every token issued so far; returns how many were still live."""
        return self.revoke(list(self._tokens))

    def revoke(self, tokens: list[str]) -> int:
        """Invalidate just these tokens (unknown ones are ignored); returns how many were live."""
        live = [token for token in tokens if self._tokens.pop(token, None) is not None]
        self._revoked.update(live)
        return len(live)


class IdentityRequestError(Exception):
    """A token request refused the way App Service refuses it: a status and a message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class IdentityEmulator:
    """The token endpoint plus its control routes; every token request is recorded, whatever the answer."""

    def __init__(self, registry: TokenRegistry, *, header_secret: str, token_lifetime_seconds: int) -> None:
        self.registry = registry
        self._header_secret = header_secret
        self._default_lifetime = token_lifetime_seconds
        self.token_lifetime_seconds = token_lifetime_seconds
        self.requests: list[dict[str, Any]] = []
        self._seq = 0

    def app(self) -> web.Application:
        """The aiohttp application: the token route and `/_emulator/` control routes (no secret needed)."""
        app = web.Application()
        app.router.add_get(TOKEN_PATH, self.token)
        app.router.add_get("/_emulator/requests", self.get_requests)
        app.router.add_post("/_emulator/reset", self.reset)
        app.router.add_get("/_emulator/config", self.get_config)
        app.router.add_post("/_emulator/config", self.set_config)
        app.router.add_post("/_emulator/revoke", self.revoke)
        return app

    async def token(self, request: web.Request) -> web.Response:
        """Issue a token, or answer 401 (header) / 400 (parameters) in App Service's error style."""
        now = time.time()
        record = self._record(request, now)
        try:
            self._check_header(request)
            resource, client_id = self._token_parameters(request)
        except IdentityRequestError as err:
            record["status"] = err.status
            request[LOG_DETAIL] = f"refused: {err.message}"
            return web.json_response({"statusCode": err.status, "message": err.message}, status=err.status)
        token, issued = self.registry.issue(resource, client_id, self.token_lifetime_seconds, now)
        record["status"] = 200
        request[LOG_DETAIL] = f"resource={resource} client_id={client_id} expires_on={issued.expires_on}"
        return web.json_response(
            {
                "access_token": token,
                "expires_on": str(issued.expires_on),
                "resource": resource,
                "token_type": "Bearer",
                "client_id": client_id,
            }
        )

    def _record(self, request: web.Request, now: float) -> dict[str, Any]:
        self._seq += 1
        record: dict[str, Any] = {
            "seq": self._seq,
            "time": time.monotonic(),
            "wallTime": now,
            "method": request.method,
            "path": request.path,
            "query": dict(request.query),
            "resource": request.query.get("resource"),
            "clientId": request.query.get("client_id"),
            "apiVersion": request.query.get("api-version"),
            "headerPresent": IDENTITY_HEADER_NAME in request.headers,
            "status": None,
        }
        self.requests.append(record)
        return record

    def _check_header(self, request: web.Request) -> None:
        supplied = request.headers.get(IDENTITY_HEADER_NAME)
        if supplied is None:
            raise IdentityRequestError(401, f"The {IDENTITY_HEADER_NAME} header is missing.")
        if not secrets.compare_digest(supplied.encode(), self._header_secret.encode()):
            raise IdentityRequestError(401, f"The {IDENTITY_HEADER_NAME} header is not valid.")

    def _token_parameters(self, request: web.Request) -> tuple[str, str]:
        api_version = request.query.get("api-version")
        if not api_version:
            raise IdentityRequestError(400, "The api-version query parameter is required.")
        if api_version != API_VERSION:
            raise IdentityRequestError(400, f"Unsupported api-version '{api_version}'; use {API_VERSION}.")
        resource = request.query.get("resource")
        if not resource:
            raise IdentityRequestError(400, "The resource query parameter is required.")
        return resource, request.query.get("client_id") or FAKE_CLIENT_ID

    async def get_requests(self, request: web.Request) -> web.Response:
        return web.json_response({"requests": self.requests})

    async def reset(self, request: web.Request) -> web.Response:
        """Forget recorded requests and restore the start-up token lifetime; revoke tokens only if asked.

        Tokens survive a plain reset because tests share one emulator process: revoking on every reset
        would make a token cached by azure-identity in one test fail in an unrelated one.
        """
        body = await read_json_object(request)
        revoke = body.get("revokeTokens", False)
        if not isinstance(revoke, bool):
            raise bad_request("revokeTokens must be a boolean.")
        self.requests = []
        self.token_lifetime_seconds = self._default_lifetime
        revoked = self.registry.revoke_all() if revoke else 0
        return web.json_response({"reset": True, "revoked": revoked})

    async def get_config(self, request: web.Request) -> web.Response:
        return web.json_response({"config": self._config_json()})

    async def set_config(self, request: web.Request) -> web.Response:
        body = await read_json_object(request)
        unknown = sorted(set(body) - {"tokenLifetimeSeconds"})
        if unknown:
            raise bad_request(f"Unknown identity config field(s): {', '.join(unknown)}.")
        if "tokenLifetimeSeconds" in body:
            self.token_lifetime_seconds = _non_negative_int(
                body["tokenLifetimeSeconds"], "tokenLifetimeSeconds"
            )
        return web.json_response({"config": self._config_json()})

    async def revoke(self, request: web.Request) -> web.Response:
        """Revoke every token, or only `{"tokens": [...]}`.

        The selective form exists because one emulator process serves a whole test session: revoking
        everything also invalidates tokens cached by app hosts that other tests started.
        """
        body = await read_json_object(request)
        if "tokens" not in body:
            return web.json_response({"revoked": self.registry.revoke_all()})
        tokens = body["tokens"]
        if not isinstance(tokens, list) or not all(isinstance(token, str) for token in tokens):
            raise bad_request("tokens must be a list of strings.")
        return web.json_response({"revoked": self.registry.revoke(tokens)})

    def _config_json(self) -> dict[str, Any]:
        return {"tokenLifetimeSeconds": self.token_lifetime_seconds}


def _non_negative_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise bad_request(f"{name} must be a non-negative integer.")
    return value


def error_body(code: str, message: str) -> dict[str, Any]:
    """Defender's error shape; `target` is a fresh correlation id, as Microsoft support would ask for."""
    return {"error": {"code": code, "message": message, "target": str(uuid.uuid4())}}


def bad_request(message: str) -> web.HTTPBadRequest:
    """A 400 for a malformed control-API request, in the same error shape as the emulated API."""
    return web.HTTPBadRequest(
        text=json.dumps(error_body("BadRequest", message)), content_type="application/json"
    )


async def read_json_object(request: web.Request) -> dict[str, Any]:
    """A control request's JSON object body; an empty body counts as `{}` so `curl -X POST` just works."""
    text = await request.text()
    if not text.strip():
        return {}
    try:
        body = json.loads(text)
    except json.JSONDecodeError as exc:
        raise bad_request(f"Body is not JSON: {exc}.") from exc
    if not isinstance(body, dict):
        raise bad_request("Body must be a JSON object.")
    return body
