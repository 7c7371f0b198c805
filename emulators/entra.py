"""An Entra ID token endpoint for the client-assertion grant, so a customer tenant's token works locally.

alertgate serves customer tenants without secrets: azure-identity's `ClientAssertionCredential(tenant,
app client id, func)` posts the managed identity's token for `api://AzureADTokenExchange` as the client
assertion of a multi-tenant application whose federated identity credential trusts that identity
(docs/mde-api.md §10). azure-identity 1.27 sends, with no discovery request first:

    POST {AZURE_AUTHORITY_HOST}/{tenant}/oauth2/v2.0/token
    Content-Type: application/x-www-form-urlencoded
    grant_type=client_credentials&client_id=...&scope=<resource>/.default
    &client_assertion_type=urn:ietf:params:oauth:client-assertion-type:jwt-bearer&client_assertion=<JWT>

and reads `access_token`, `expires_in` (or `expires_on`), `token_type`, and `refresh_in` if present. It
accepts only https authorities, hence this server speaks TLS with a self-signed certificate it makes at
start-up (`make_certificate`), which is also the trust anchor a client loads (`connection_verify=<file>`
or `SSL_CERT_FILE`).

The checks follow Entra's order: tenant (a GUID, else AADSTS90002), grant and parameters, the client id
(the configured application, else AADSTS700016), the application's service principal in the tenant
(consent, else AADSTS7000229), the assertion (a JWT, else AADSTS50027; signed by this process's identity
endpoint, else AADSTS700027; within its time range, else AADSTS700024), the federated identity
credential (issuer AADSTS700211, subject AADSTS700213, audience AADSTS700212; or an injected AADSTS70021,
as right after the credential was created), then the scope (`<resource>/.default` with the resource one
the MDE emulator accepts). A success registers a token for that resource whose tenant is the requested
one, in the registry the MDE emulator shares, so MDE attributes its use to that tenant.

Error bodies have Entra's shape: `{"error", "error_description": "AADSTS<code>: ... Trace ID: ...
Correlation ID: ... Timestamp: ...", "error_codes": [<code>], "timestamp", "trace_id",
"correlation_id", "error_uri"}`.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import ssl
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from emulators import APP_CLIENT_ID, EXCHANGE_AUDIENCE, HOME_TENANT_ID, IDENTITY_PRINCIPAL_ID
from emulators.identity import (
    LOG_DETAIL,
    AssertionSigner,
    InvalidAssertion,
    TokenRegistry,
    bad_request,
    decode_unverified,
    home_issuer,
    read_json_object,
)

TOKEN_PATH = re.compile(r"/(?P<tenant>[^/]+)/oauth2/v2\.0/token")
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
DEFAULT_SCOPE_SUFFIX = "/.default"
GUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
CERTIFICATE_DAYS = 30


def is_guid(text: str) -> bool:
    return GUID.fullmatch(text) is not None


# --- the TLS certificate -----------------------------------------------------------------------------


def make_certificate(host: str) -> tuple[bytes, bytes]:
    """A self-signed certificate (PEM) and its private key (PEM) for loopback and `host`.

    It names `localhost`, `127.0.0.1` and `::1` (and `host`) as SubjectAlternativeNames, and is a CA
    (basicConstraints CA:TRUE, keyCertSign) so the certificate file itself can be a client's trust
    anchor; subject and authority key identifiers are there for strict verifiers.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "alertgate Entra emulator")])
    dns_names = {"localhost"}
    addresses = {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")}
    try:
        addresses.add(ipaddress.ip_address(host))
    except ValueError:
        dns_names.add(host)
    alt_names: list[x509.GeneralName] = [x509.DNSName(dns) for dns in sorted(dns_names)]
    alt_names += [x509.IPAddress(address) for address in sorted(addresses, key=str)]
    now = dt.datetime.now(dt.UTC)
    public_key = key.public_key()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=CERTIFICATE_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem


def write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a reader never sees a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def server_ssl_context(host: str, cert_file: Path) -> ssl.SSLContext:
    """Make a certificate, write it (PEM) to `cert_file`, and return a TLS server context using it.

    The private key only passes through a private temporary file (load_cert_chain reads files) that is
    removed at once.
    """
    cert_pem, key_pem = make_certificate(host)
    write_atomically(cert_file, cert_pem)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    with tempfile.TemporaryDirectory(prefix="entra-key-") as private:
        key_file = Path(private) / "key.pem"
        key_file.write_bytes(key_pem)
        key_file.chmod(0o600)
        context.load_cert_chain(cert_file, key_file)
    return context


# --- configuration -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FederatedCredential:
    """The application's federated identity credential: which assertions it accepts."""

    issuer: str
    subject: str
    audience: str

    def to_json(self) -> dict[str, str]:
        return {"issuer": self.issuer, "subject": self.subject, "audience": self.audience}


@dataclass(frozen=True)
class EntraConfig:
    """What `POST /_emulator/config` may change (`app_client_id`, `home_tenant_id` are fixed at start-up).

    `consented_tenants` None means every GUID tenant has consented the application; the home tenant
    (where the application lives) always counts as consented.
    """

    app_client_id: str = APP_CLIENT_ID
    home_tenant_id: str = HOME_TENANT_ID
    federated_credential: FederatedCredential = FederatedCredential(
        issuer=home_issuer(HOME_TENANT_ID), subject=IDENTITY_PRINCIPAL_ID, audience=EXCHANGE_AUDIENCE
    )
    token_lifetime_seconds: int = 3600
    consented_tenants: frozenset[str] | None = None

    def consented(self, tenant_id: str) -> bool:
        return (
            self.consented_tenants is None
            or tenant_id == self.home_tenant_id
            or tenant_id in self.consented_tenants
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "appClientId": self.app_client_id,
            "homeTenantId": self.home_tenant_id,
            "federatedCredential": self.federated_credential.to_json(),
            "tokenLifetimeSeconds": self.token_lifetime_seconds,
            "consentedTenants": None if self.consented_tenants is None else sorted(self.consented_tenants),
        }


def default_config(
    *,
    app_client_id: str = APP_CLIENT_ID,
    home_tenant_id: str = HOME_TENANT_ID,
    principal_id: str = IDENTITY_PRINCIPAL_ID,
    token_lifetime_seconds: int = 3600,
) -> EntraConfig:
    """The configuration matching an identity endpoint with this home tenant and principal id."""
    return EntraConfig(
        app_client_id=app_client_id.lower(),
        home_tenant_id=home_tenant_id.lower(),
        federated_credential=FederatedCredential(
            issuer=home_issuer(home_tenant_id.lower()), subject=principal_id, audience=EXCHANGE_AUDIENCE
        ),
        token_lifetime_seconds=token_lifetime_seconds,
    )


CONFIG_FIELDS = frozenset(
    {"consentedTenants", "federatedCredential", "tokenLifetimeSeconds", "failNextWith70021"}
)
READ_ONLY_FIELDS = frozenset({"appClientId", "homeTenantId"})


def _tenant_list(value: Any) -> frozenset[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(item, str) and is_guid(item) for item in value):
        raise ValueError("consentedTenants must be null (every tenant) or a list of tenant GUIDs.")
    return frozenset(item.lower() for item in value)


def _federated_credential(current: FederatedCredential, value: Any) -> FederatedCredential:
    if not isinstance(value, dict) or not set(value) <= {"issuer", "subject", "audience"}:
        raise ValueError("federatedCredential must be an object with any of issuer, subject, audience.")
    if not all(isinstance(item, str) and item for item in value.values()):
        raise ValueError("federatedCredential's issuer, subject and audience must be non-empty strings.")
    return replace(current, **value)


def _count(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer.")
    return value


# --- errors ------------------------------------------------------------------------------------------


class EntraError(Exception):
    """A refused token request: status, OAuth `error`, AADSTS code and text."""

    def __init__(self, status: int, error: str, code: int, text: str) -> None:
        super().__init__(f"{status} {error} AADSTS{code}: {text}")
        self.status = status
        self.error = error
        self.code = code
        self.text = text


def entra_error_body(err: EntraError, correlation_id: str) -> dict[str, Any]:
    """Entra's error document, with the trace and correlation ids and timestamp it always adds."""
    trace_id = str(uuid.uuid4())
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    description = f"AADSTS{err.code}: {err.text} Trace ID: {trace_id} Correlation ID: {correlation_id} Timestamp: {stamp}"
    return {
        "error": err.error,
        "error_description": description,
        "error_codes": [err.code],
        "timestamp": stamp,
        "trace_id": trace_id,
        "correlation_id": correlation_id,
        "error_uri": f"https://login.microsoftonline.com/error?code={err.code}",
    }


def _missing(name: str) -> EntraError:
    return EntraError(
        400, "invalid_request", 900144, f"The request body must contain the following parameter: '{name}'."
    )


def _seconds(value: Any) -> float | None:
    """A JWT NumericDate claim, or None if it is missing or not a number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _iso(seconds: float | None) -> str:
    if seconds is None:
        return "(none)"
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f0Z")


# --- the emulator ------------------------------------------------------------------------------------


class EntraEmulator:
    """The token endpoint plus its control routes; every request is recorded, whatever the answer.

    `accepted_resources` is read at each request (the MDE emulator's accepted audiences, which its own
    control API may change), so a scope is valid here exactly when MDE would accept the token.
    """

    def __init__(
        self,
        registry: TokenRegistry,
        signer: AssertionSigner,
        config: EntraConfig,
        accepted_resources: Callable[[], frozenset[str]],
    ) -> None:
        self.registry = registry
        self.signer = signer
        self._defaults = config
        self._accepted_resources = accepted_resources
        self.config = config
        self.fail_next_70021 = 0
        self.requests: list[dict[str, Any]] = []
        self._seq = 0

    def app(self) -> web.Application:
        """Control routes first (matched in order), then every other request goes to `handle`."""
        app = web.Application()
        app.router.add_get("/_emulator/requests", self.get_requests)
        app.router.add_post("/_emulator/reset", self.reset)
        app.router.add_get("/_emulator/config", self.get_config)
        app.router.add_post("/_emulator/config", self.set_config)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        """Record, check in Entra's order, then issue a token or answer Entra's error document."""
        form: Mapping[str, str] = {}
        if request.method == "POST" and request.content_type == "application/x-www-form-urlencoded":
            form = {key: str(value) for key, value in (await request.post()).items()}
        else:
            await request.read()
        now = time.time()
        record = self._record(request, form, now)
        correlation_id = (
            request.headers.get("client-request-id")
            or request.headers.get("x-ms-client-request-id")
            or str(uuid.uuid4())
        )
        match = TOKEN_PATH.fullmatch(request.path)
        if match is None:
            record["status"] = 404
            request[LOG_DETAIL] = "no such route"
            body = {"error": "not_found", "error_description": f"No emulated Entra route for {request.path}."}
            return web.json_response(body, status=404)
        try:
            tenant_id = self._tenant(match["tenant"])
            record["tenant"] = tenant_id
            resource = self._check(request, form, tenant_id, record, now)
        except EntraError as err:
            record["status"], record["error"], record["errorCode"] = err.status, err.error, err.code
            request[LOG_DETAIL] = f"tenant={match['tenant']} AADSTS{err.code}"
            return web.json_response(entra_error_body(err, correlation_id), status=err.status)
        lifetime = self.config.token_lifetime_seconds
        token, issued = self.registry.issue(
            resource, self.config.app_client_id, lifetime, now, tenant_id=tenant_id
        )
        record["status"] = 200
        record["resource"] = resource
        request[LOG_DETAIL] = f"tenant={tenant_id} resource={resource} expires_on={issued.expires_on}"
        return web.json_response(
            {
                "token_type": "Bearer",
                "expires_in": lifetime,
                "ext_expires_in": lifetime,
                "access_token": token,
            }
        )

    def _record(self, request: web.Request, form: Mapping[str, str], now: float) -> dict[str, Any]:
        self._seq += 1
        match = TOKEN_PATH.fullmatch(request.path)
        record: dict[str, Any] = {
            "seq": self._seq,
            "time": time.monotonic(),
            "wallTime": now,
            "method": request.method,
            "path": request.path,
            "tenant": match["tenant"] if match else None,
            "grantType": form.get("grant_type"),
            "clientId": form.get("client_id"),
            "scope": form.get("scope"),
            "clientAssertionType": form.get("client_assertion_type"),
            "claims": form.get("claims"),
            "assertion": _assertion_summary(form.get("client_assertion")),
            "resource": None,
            "status": None,
            "error": None,
            "errorCode": None,
        }
        self.requests.append(record)
        return record

    def _tenant(self, tenant: str) -> str:
        if not is_guid(tenant):
            raise EntraError(
                400,
                "invalid_request",
                90002,
                f"Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are "
                "signing into the correct cloud.",
            )
        return tenant.lower()

    def _check(
        self,
        request: web.Request,
        form: Mapping[str, str],
        tenant_id: str,
        record: dict[str, Any],
        now: float,
    ) -> str:
        """Every check in Entra's order; returns the resource to issue a token for."""
        if request.method != "POST":
            raise EntraError(400, "invalid_request", 900561, "The endpoint only accepts POST requests.")
        if request.content_type != "application/x-www-form-urlencoded":
            raise EntraError(
                400, "invalid_request", 900144, "The request body must be application/x-www-form-urlencoded."
            )
        grant_type = form.get("grant_type")
        if not grant_type:
            raise _missing("grant_type")
        if grant_type != "client_credentials":
            raise EntraError(
                400,
                "unsupported_grant_type",
                70003,
                f"The app requested an unsupported grant type '{grant_type}'.",
            )
        client_id = form.get("client_id")
        if not client_id:
            raise _missing("client_id")
        if "client_secret" in form:
            raise EntraError(
                401,
                "invalid_client",
                7000215,
                "Invalid client secret provided. This application authenticates with a federated identity "
                "credential only.",
            )
        assertion = form.get("client_assertion")
        if not assertion:
            raise EntraError(
                400,
                "invalid_client",
                7000218,
                "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
            )
        assertion_type = form.get("client_assertion_type")
        if not assertion_type:
            raise _missing("client_assertion_type")
        if assertion_type != JWT_BEARER:
            raise EntraError(
                400,
                "invalid_request",
                900144,
                f"The 'client_assertion_type' parameter must be '{JWT_BEARER}', not '{assertion_type}'.",
            )
        if client_id.lower() != self.config.app_client_id:
            raise EntraError(
                400,
                "unauthorized_client",
                700016,
                f"Application with identifier '{client_id}' was not found in the directory '{tenant_id}'. "
                "This can happen if the application has not been installed by the administrator of the "
                "tenant or consented to by any user in the tenant. You may have sent your authentication "
                "request to the wrong tenant.",
            )
        if not self.config.consented(tenant_id):
            raise EntraError(
                400,
                "invalid_client",
                7000229,
                f"The client application {client_id} is missing service principal in the tenant {tenant_id}. "
                "An administrator of that tenant must consent to the application.",
            )
        claims = self._verified_claims(assertion, now)
        self._match_federated_credential(claims)
        return self._resource(form.get("scope"), tenant_id)

    def _verified_claims(self, assertion: str, now: float) -> dict[str, Any]:
        try:
            claims = self.signer.verify(assertion)
        except InvalidAssertion as exc:
            if exc.malformed:
                raise EntraError(
                    400, "invalid_client", 50027, f"JWT token is invalid or malformed. {exc}"
                ) from exc
            raise EntraError(
                401, "invalid_client", 700027, f"Client assertion failed signature validation. {exc}"
            ) from exc
        exp, nbf = _seconds(claims.get("exp")), _seconds(claims.get("nbf", claims.get("iat")))
        if exp is None or nbf is None or now >= exp or now < nbf:
            raise EntraError(
                401,
                "invalid_client",
                700024,
                f"Client assertion is not within its valid time range. Current time: {_iso(now)}, assertion "
                f"valid from {_iso(nbf)}, expiry time of assertion {_iso(exp)}.",
            )
        return claims

    def _match_federated_credential(self, claims: Mapping[str, Any]) -> None:
        credential = self.config.federated_credential
        iss, sub, aud = claims.get("iss"), claims.get("sub"), claims.get("aud")
        if iss != credential.issuer:
            raise EntraError(
                400,
                "invalid_client",
                700211,
                f"No matching federated identity record found for presented assertion issuer '{iss}'. Please "
                "check your federated identity credential Subject, Audience and Issuer against the presented "
                "assertion.",
            )
        if sub != credential.subject:
            raise EntraError(
                400,
                "invalid_client",
                700213,
                f"No matching federated identity record found for presented assertion subject '{sub}'. Please "
                "check your federated identity credential Subject, Audience and Issuer against the presented "
                "assertion.",
            )
        audiences = aud if isinstance(aud, list) else [aud]
        if credential.audience not in audiences:
            raise EntraError(
                400,
                "invalid_client",
                700212,
                f"No matching federated identity record found for presented assertion audience '{aud}'. Please "
                "check your federated identity credential Subject, Audience and Issuer against the presented "
                "assertion.",
            )
        if self.fail_next_70021 > 0:
            self.fail_next_70021 -= 1
            raise EntraError(
                400,
                "invalid_request",
                70021,
                "No matching federated identity record found for presented assertion. Assertion Issuer: "
                f"'{iss}'. Assertion Subject: '{sub}'. Assertion Audience: '{aud}'.",
            )

    def _resource(self, scope: str | None, tenant_id: str) -> str:
        if not scope:
            raise _missing("scope")
        scopes = scope.split()
        if len(scopes) != 1:
            raise EntraError(
                400,
                "invalid_scope",
                70011,
                f"The provided value for the input parameter 'scope' is not valid. The scope {scope} is not "
                "valid: the client credentials flow takes exactly one scope.",
            )
        if not scope.endswith(DEFAULT_SCOPE_SUFFIX):
            raise EntraError(
                400,
                "invalid_scope",
                1002012,
                f"The provided value for scope {scope} is not valid. Client credential flows must have a scope "
                "value with /.default suffixed to the resource identifier (application ID URI).",
            )
        resource = scope[: -len(DEFAULT_SCOPE_SUFFIX)]
        if resource not in self._accepted_resources():
            raise EntraError(
                400,
                "invalid_resource",
                500011,
                f"The resource principal named {resource} was not found in the tenant named {tenant_id}. This "
                "can happen if the application has not been installed by the administrator of the tenant or "
                "consented to by any user in the tenant.",
            )
        return resource

    # The control API.

    async def get_requests(self, request: web.Request) -> web.Response:
        return web.json_response({"requests": self.requests})

    async def reset(self, request: web.Request) -> web.Response:
        """Forget requests; configuration (consent, credential, lifetime, injected failures) as at start-up."""
        self.requests = []
        self.config = self._defaults
        self.fail_next_70021 = 0
        return web.json_response({"reset": True, "config": self._config_json()})

    async def get_config(self, request: web.Request) -> web.Response:
        return web.json_response({"config": self._config_json()})

    async def set_config(self, request: web.Request) -> web.Response:
        body = await read_json_object(request)
        read_only = sorted(set(body) & READ_ONLY_FIELDS)
        if read_only:
            raise bad_request(
                f"Read-only Entra config field(s), set on the command line: {', '.join(read_only)}."
            )
        unknown = sorted(set(body) - CONFIG_FIELDS)
        if unknown:
            raise bad_request(f"Unknown Entra config field(s): {', '.join(unknown)}.")
        config, fail_next = self.config, self.fail_next_70021
        try:
            if "consentedTenants" in body:
                config = replace(config, consented_tenants=_tenant_list(body["consentedTenants"]))
            if "federatedCredential" in body:
                credential = _federated_credential(config.federated_credential, body["federatedCredential"])
                config = replace(config, federated_credential=credential)
            if "tokenLifetimeSeconds" in body:
                lifetime = _count(body["tokenLifetimeSeconds"], "tokenLifetimeSeconds")
                config = replace(config, token_lifetime_seconds=lifetime)
            if "failNextWith70021" in body:
                fail_next = _count(body["failNextWith70021"], "failNextWith70021")
        except ValueError as exc:
            raise bad_request(str(exc)) from exc
        self.config, self.fail_next_70021 = config, fail_next
        return web.json_response({"config": self._config_json()})

    def _config_json(self) -> dict[str, Any]:
        return {**self.config.to_json(), "failNextWith70021": self.fail_next_70021}


def _assertion_summary(assertion: str | None) -> dict[str, Any] | None:
    """What a test wants to know about the presented assertion (its claims, signature not checked)."""
    if not assertion:
        return None
    try:
        header, claims = decode_unverified(assertion)
    except InvalidAssertion:
        return {"malformed": True}
    summary = {name: claims.get(name) for name in ("iss", "sub", "aud", "tid", "iat", "nbf", "exp", "jti")}
    return {"malformed": False, "alg": header.get("alg"), **summary}
