"""A managed-identity token endpoint speaking App Service's protocol (api-version 2019-08-01).

alertgate gets its Defender token from azure-identity's `ManagedIdentityCredential`. Locally there is no
Azure, so this endpoint answers the exact request that credential sends when `IDENTITY_ENDPOINT` and
`IDENTITY_HEADER` are set (`GET /msi/token?api-version=2019-08-01&resource=...[&client_id=...]` with the
`X-IDENTITY-HEADER` secret). Running the real credential against it means tests exercise the real token
code path instead of a patched credential (docs/contracts.md §5).

Tokens are opaque random strings kept in a `TokenRegistry` that the MDE emulator shares, so a token is
accepted there only if it was issued here (or by the Entra emulator), for an accepted audience, and is
neither expired nor revoked. Every token records its tenant (`tid`): the identity endpoint's are the home
tenant's.

One resource is different: for `api://AzureADTokenExchange` (the audience a federated identity credential
accepts) the answer is a compact JWT signed HS256 with a key only this process knows
(`AssertionSigner`), with the claims Entra checks: `iss` = the home tenant's v2.0 issuer, `sub` = the
identity's principal id, `aud`, `tid`, `iat`, `nbf`, `exp` (= the `expires_on` answered) and `jti`. The
Entra emulator (entra.py) verifies it with the same signer, so only this process's identity endpoint can
produce an assertion it accepts.

Module-level helpers at the bottom (`LOG_DETAIL`, `error_body`, `read_json_object`, `bad_request`) are
shared with mde.py and entra.py.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from emulators import EXCHANGE_AUDIENCE, HOME_TENANT_ID, IDENTITY_PRINCIPAL_ID

API_VERSION = "2019-08-01"
TOKEN_PATH = "/msi/token"
IDENTITY_HEADER_NAME = "X-IDENTITY-HEADER"
# Answered as client_id when the caller asks for the system-assigned identity (no client_id parameter).
FAKE_CLIENT_ID = "00000000-0000-4000-8000-00000000a1e7"
DEFAULT_TOKEN_LIFETIME_SECONDS = 3600
ASSERTION_ALGORITHM = "HS256"

__all__ = [
    "EXCHANGE_AUDIENCE",
    "HOME_TENANT_ID",
    "IDENTITY_PRINCIPAL_ID",
    "AssertionSigner",
    "IdentityEmulator",
    "InvalidAssertion",
    "IssuedToken",
    "TokenRegistry",
    "home_issuer",
]

# What each handler wants appended to its one access-log line (see __main__.py).
LOG_DETAIL = web.RequestKey("emulator_log_detail", str)


def home_issuer(tenant_id: str) -> str:
    """The v2.0 issuer Entra writes in a tenant's tokens, and a federated identity credential names."""
    return f"https://login.microsoftonline.com/{tenant_id}/v2.0"


class TokenRejected(Exception):
    """Why a bearer token is not acceptable; the MDE emulator turns it into a 401 with this message."""


@dataclass(frozen=True)
class IssuedToken:
    """What the registry remembers about a token: who it is for, whose it is, and until when it is valid.

    `tenant_id` is the token's `tid`: the home tenant for the identity endpoint's tokens, the requested
    tenant for the Entra emulator's. The MDE emulator keeps its state per tenant by it.
    """

    resource: str
    client_id: str
    expires_on: int  # unix seconds: the very value sent as `expires_on`, so client and server agree
    tenant_id: str = HOME_TENANT_ID


class TokenRegistry:
    """Tokens issued by the identity endpoint, shared with the MDE emulator (one process, one loop).

    Revoked tokens are remembered separately so a 401 can say *why* a token was refused, which makes a
    failing test about the app's "401 → fresh token, retry once" rule much easier to read.
    """

    def __init__(self) -> None:
        self._tokens: dict[str, IssuedToken] = {}
        self._revoked: set[str] = set()

    def issue(
        self,
        resource: str,
        client_id: str,
        lifetime_seconds: int,
        now: float,
        *,
        tenant_id: str = HOME_TENANT_ID,
    ) -> tuple[str, IssuedToken]:
        """A new opaque token valid until `now + lifetime` (rounded down to whole seconds, as sent)."""
        token = "emu-" + secrets.token_urlsafe(32)
        issued = IssuedToken(
            resource=resource,
            client_id=client_id,
            expires_on=expiry(now, lifetime_seconds),
            tenant_id=tenant_id,
        )
        self.register(token, issued)
        return token, issued

    def register(self, token: str, issued: IssuedToken) -> None:
        """Remember a token made elsewhere (the signed exchange assertion), so revocation covers it too."""
        self._tokens[token] = issued

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


def expiry(now: float, lifetime_seconds: int) -> int:
    """`expires_on` for a token issued at `now`: whole unix seconds, rounded down (so 0 s = already expired)."""
    return int(now + lifetime_seconds)


# --- the signed token-exchange assertion -------------------------------------------------------------


class InvalidAssertion(Exception):
    """A client assertion that is not a JWT (`malformed`) or whose signature this process did not make."""

    def __init__(self, message: str, *, malformed: bool) -> None:
        super().__init__(message)
        self.message = message
        self.malformed = malformed


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    if not text or any(char not in _B64URL_CHARS for char in text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


_B64URL_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def decode_unverified(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A compact JWT's header and claims, signature unchecked; InvalidAssertion(malformed) if not a JWT."""
    parts = token.split(".")
    if len(parts) != 3:
        raise InvalidAssertion("The assertion is not a JWT in compact form.", malformed=True)
    try:
        header = json.loads(_b64url_decode(parts[0]))
        claims = json.loads(_b64url_decode(parts[1]))
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise InvalidAssertion(
            "The assertion's header or payload is not base64url JSON.", malformed=True
        ) from exc
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise InvalidAssertion("The assertion's header and payload must be JSON objects.", malformed=True)
    return header, claims


class AssertionSigner:
    """This process's HS256 key for the exchange assertion: the identity endpoint signs, Entra verifies.

    The key is random per process and never leaves it, so an assertion made anywhere else (another
    emulator process, a test forging one) fails verification.
    """

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key if key is not None else secrets.token_bytes(32)

    def _mac(self, signing_input: str) -> bytes:
        return hmac.new(self._key, signing_input.encode("ascii"), hashlib.sha256).digest()

    def sign(self, claims: dict[str, Any]) -> str:
        header = {"alg": ASSERTION_ALGORITHM, "typ": "JWT"}
        signing_input = _b64url(json.dumps(header).encode()) + "." + _b64url(json.dumps(claims).encode())
        return signing_input + "." + _b64url(self._mac(signing_input))

    def verify(self, token: str) -> dict[str, Any]:
        """The claims of an assertion this signer made; InvalidAssertion otherwise (time is not checked)."""
        header, claims = decode_unverified(token)
        if header.get("alg") != ASSERTION_ALGORITHM:
            raise InvalidAssertion(
                f"The assertion's algorithm {header.get('alg')!r} is not {ASSERTION_ALGORITHM}.",
                malformed=False,
            )
        signing_input, _, signature = token.rpartition(".")
        try:
            supplied = _b64url_decode(signature)
        except (ValueError, binascii.Error):
            supplied = b""
        if not hmac.compare_digest(supplied, self._mac(signing_input)):
            raise InvalidAssertion("The assertion was not signed by this identity endpoint.", malformed=False)
        return claims


class IdentityRequestError(Exception):
    """A token request refused the way App Service refuses it: a status and a message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class IdentityEmulator:
    """The token endpoint plus its control routes; every token request is recorded, whatever the answer."""

    def __init__(
        self,
        registry: TokenRegistry,
        *,
        header_secret: str,
        token_lifetime_seconds: int,
        home_tenant_id: str = HOME_TENANT_ID,
        principal_id: str = IDENTITY_PRINCIPAL_ID,
        signer: AssertionSigner | None = None,
    ) -> None:
        self.registry = registry
        self.home_tenant_id = home_tenant_id
        self.principal_id = principal_id
        self.signer = signer or AssertionSigner()
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
        if resource == EXCHANGE_AUDIENCE:
            token, issued = self._exchange_assertion(client_id, now)
        else:
            token, issued = self.registry.issue(
                resource, client_id, self.token_lifetime_seconds, now, tenant_id=self.home_tenant_id
            )
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

    def _exchange_assertion(self, client_id: str, now: float) -> tuple[str, IssuedToken]:
        """The signed JWT a federated identity credential accepts, registered like any other token."""
        issued = IssuedToken(
            resource=EXCHANGE_AUDIENCE,
            client_id=client_id,
            expires_on=expiry(now, self.token_lifetime_seconds),
            tenant_id=self.home_tenant_id,
        )
        claims = {
            "aud": EXCHANGE_AUDIENCE,
            "iss": home_issuer(self.home_tenant_id),
            "iat": int(now),
            "nbf": int(now),
            "exp": issued.expires_on,
            "sub": self.principal_id,
            "oid": self.principal_id,
            "tid": self.home_tenant_id,
            "appid": client_id,
            "azp": client_id,
            "idtyp": "app",
            "ver": "2.0",
            "jti": str(uuid.uuid4()),
        }
        token = self.signer.sign(claims)
        self.registry.register(token, issued)
        return token, issued

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
