"""`python -m emulators`: the MDE emulator, the managed-identity endpoint and the Entra token endpoint.

One process and one event loop, because the three servers share the in-memory token registry (the MDE
side must accept exactly the tokens the identity and Entra sides issued) and the key that signs the
identity's token-exchange assertion (which the Entra side must verify). The READY line tells launchers
(and people) the real addresses, which matters when a port of 0 lets the OS choose, and where the Entra
server's certificate is.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import ssl
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from emulators import APP_CLIENT_ID, HOME_TENANT_ID, IDENTITY_PRINCIPAL_ID
from emulators.entra import EntraEmulator, default_config, is_guid, server_ssl_context
from emulators.identity import (
    DEFAULT_TOKEN_LIFETIME_SECONDS,
    LOG_DETAIL,
    TOKEN_PATH,
    AssertionSigner,
    IdentityEmulator,
    TokenRegistry,
)
from emulators.mde import (
    DEFAULT_AUDIENCE,
    DEFAULT_MAX_BATCH,
    DEFAULT_PATCH_RATE_LIMITS,
    DEFAULT_RATE_LIMITS,
    MdeConfig,
    MdeEmulator,
    RateLimit,
    parse_rate_limits,
)

# In-flight calls (a scripted delay, say) get this long to finish once a stop signal arrives.
SHUTDOWN_GRACE_SECONDS = 1.0


def _rate_limits(text: str) -> tuple[RateLimit, ...]:
    try:
        return parse_rate_limits(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be a positive integer")
    return value


def _guid(text: str) -> str:
    if not is_guid(text):
        raise argparse.ArgumentTypeError("must be a GUID like 00000000-0000-4000-8000-000000000000")
    return text.lower()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m emulators", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address both servers listen on")
    parser.add_argument("--mde-port", type=int, required=True, help="MDE API port (0: any free port)")
    parser.add_argument("--identity-port", type=int, required=True, help="identity port (0: any free port)")
    parser.add_argument("--identity-header", required=True, help="the secret expected in X-IDENTITY-HEADER")
    parser.add_argument(
        "--entra-port",
        type=int,
        default=0,
        help="Entra token endpoint port, https (default 0: any free port)",
    )
    parser.add_argument(
        "--entra-cert-file",
        type=Path,
        help="where to write the Entra server's self-signed certificate, PEM (default: a temporary file)",
    )
    parser.add_argument(
        "--home-tenant-id", type=_guid, default=HOME_TENANT_ID, help="the managed identity's tenant (tid)"
    )
    parser.add_argument(
        "--identity-principal-id",
        type=_guid,
        default=IDENTITY_PRINCIPAL_ID,
        help="the managed identity's object id: its exchange assertion's sub, the federated credential's subject",
    )
    parser.add_argument(
        "--app-client-id",
        type=_guid,
        default=APP_CLIENT_ID,
        help="the multi-tenant application whose federated credential trusts the identity",
    )
    parser.add_argument(
        "--rate-limits",
        type=_rate_limits,
        default=parse_rate_limits(DEFAULT_RATE_LIMITS),
        help=f"batchUpdate's CALLS/SECONDS sliding windows, comma-separated; '' for none "
        f"(default {DEFAULT_RATE_LIMITS})",
    )
    parser.add_argument(
        "--patch-rate-limits",
        type=_rate_limits,
        default=parse_rate_limits(DEFAULT_PATCH_RATE_LIMITS),
        help=f"the same for PATCH /api/alerts/{{id}}, its own budget (default {DEFAULT_PATCH_RATE_LIMITS})",
    )
    parser.add_argument(
        "--max-batch", type=_positive_int, default=DEFAULT_MAX_BATCH, help="most ids per call"
    )
    parser.add_argument(
        "--token-lifetime-seconds", type=_positive_int, default=DEFAULT_TOKEN_LIFETIME_SECONDS
    )
    parser.add_argument(
        "--audience",
        action="append",
        help=f"accepted token audience; repeat for several (default {DEFAULT_AUDIENCE})",
    )
    return parser


def access_log(service: str) -> Middleware:
    """One stdout line per call, with the handler's own summary (seq, outcome) when it left one."""

    @web.middleware
    async def log(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.monotonic()
        status = "500"
        try:
            response = await handler(request)
            status = str(response.status)
            return response
        except web.HTTPException as exc:
            status = str(exc.status)
            raise
        finally:
            if request.transport is None or request.transport.is_closing():
                status = "---"  # aborted on purpose, or the client left before the answer
            elapsed_ms = (time.monotonic() - started) * 1000
            stamp = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
            detail = request.get(LOG_DETAIL, "")
            print(
                f"{stamp} {service} {request.method} {request.path_qs} {status} {elapsed_ms:.1f}ms {detail}",
                flush=True,
            )

    return log


async def _start(
    app: web.Application, service: str, host: str, port: int, ssl_context: ssl.SSLContext | None = None
) -> tuple[web.AppRunner, str]:
    app.middlewares.append(access_log(service))
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_GRACE_SECONDS)
    await runner.setup()
    await web.TCPSite(runner, host, port, ssl_context=ssl_context).start()
    bound_port = runner.addresses[0][1]
    scheme = "https" if ssl_context is not None else "http"
    return runner, f"{scheme}://{host}:{bound_port}"


async def serve(args: argparse.Namespace, tls: ssl.SSLContext, cert_file: Path) -> None:
    """Run the three servers until SIGTERM or SIGINT, then close them and return (exit status 0).

    `tls` is the Entra server's context, whose certificate `cert_file` holds.
    """
    registry = TokenRegistry()
    signer = AssertionSigner()
    identity = IdentityEmulator(
        registry,
        header_secret=args.identity_header,
        token_lifetime_seconds=args.token_lifetime_seconds,
        home_tenant_id=args.home_tenant_id,
        principal_id=args.identity_principal_id,
        signer=signer,
    )
    defaults = MdeConfig(
        rate_limits=args.rate_limits,
        patch_rate_limits=args.patch_rate_limits,
        max_batch=args.max_batch,
        accepted_audiences=frozenset(args.audience or [DEFAULT_AUDIENCE]),
    )
    mde = MdeEmulator(registry, defaults, home_tenant_id=args.home_tenant_id)
    entra = EntraEmulator(
        registry,
        signer,
        default_config(
            app_client_id=args.app_client_id,
            home_tenant_id=args.home_tenant_id,
            principal_id=args.identity_principal_id,
            token_lifetime_seconds=args.token_lifetime_seconds,
        ),
        accepted_resources=lambda: mde.config.accepted_audiences,
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    runners: list[web.AppRunner] = []
    try:
        mde_runner, mde_url = await _start(mde.app(), "mde", args.host, args.mde_port)
        runners.append(mde_runner)
        identity_runner, identity_base = await _start(
            identity.app(), "identity", args.host, args.identity_port
        )
        runners.append(identity_runner)
        entra_runner, entra_url = await _start(entra.app(), "entra", args.host, args.entra_port, tls)
        runners.append(entra_runner)
        # Fields are only ever added at the end; the certificate path is last, as it may hold spaces.
        print(
            f"EMULATORS READY mde={mde_url} identity={identity_base}{TOKEN_PATH} "
            f"entra={entra_url} entra_cert={cert_file}",
            flush=True,
        )
        await stop.wait()
        print("EMULATORS STOPPING", flush=True)
    finally:
        for runner in reversed(runners):
            await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with contextlib.ExitStack() as cleanup:
        if args.entra_cert_file is None:
            cert_dir = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="emulators-entra-"))
            cert_file = Path(cert_dir) / "entra-cert.pem"
        else:
            cert_file = args.entra_cert_file
        cert_file = cert_file.resolve()
        tls = server_ssl_context(args.host, cert_file)  # written before any server listens
        asyncio.run(serve(args, tls, cert_file))
    return 0


if __name__ == "__main__":
    sys.exit(main())
