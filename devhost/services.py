"""Start and stop the local services that the run command and the tests share.

Azurite, the emulators and the development host each run as a child process on loopback, so that
the app under test talks to them over real sockets exactly as it would in Azure. Every wait here is
bounded in time: a service that does not come up fails loudly with its own output attached, instead of
hanging the run or the test session.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"

# Azurite's well-known development account (public, documented by Microsoft; not a secret).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, *, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Block until something accepts connections on the port, the process dies, or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection((LOOPBACK, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listened on {LOOPBACK}:{port} within {timeout}s")


@dataclass
class Service:
    """A child process with its log file; stop() ends it and its children."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    urls: dict[str, str] = field(default_factory=dict)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, *, timeout: float = 10.0, sig: int = signal.SIGTERM) -> int | None:
        """Send a signal to the process group, wait, then kill whatever is left."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=timeout)
        return self.proc.returncode

    def kill(self) -> None:
        """End the process at once, as a crash would (no clean-up runs)."""
        self.stop(timeout=5.0, sig=signal.SIGKILL)


def _spawn(name: str, argv: list[str], log_dir: Path, env: dict[str, str] | None = None) -> Service:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    log_file = open(log_path, "wb")  # noqa: SIM115 - the child owns it for its lifetime
    proc = subprocess.Popen(
        argv,
        cwd=REPO_ROOT,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    log_file.close()
    return Service(name=name, proc=proc, log_path=log_path)


def _wait_ready(service: Service, ports: list[int], timeout: float) -> None:
    try:
        for port in ports:
            wait_for_port(port, timeout=timeout, proc=service.proc)
    except (RuntimeError, TimeoutError) as exc:
        service.stop()
        raise RuntimeError(f"{service.name} did not start: {exc}\n{service.log_tail()}") from exc


@dataclass(frozen=True)
class AzuritePorts:
    queue: int
    table: int


def azurite_connection_string(ports: AzuritePorts) -> str:
    """The explicit form: `UseDevelopmentStorage=true` would pin the default ports."""
    return (
        "DefaultEndpointsProtocol=http;"
        f"AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
        f"QueueEndpoint=http://{LOOPBACK}:{ports.queue}/{AZURITE_ACCOUNT};"
        f"TableEndpoint=http://{LOOPBACK}:{ports.table}/{AZURITE_ACCOUNT};"
    )


def azurite_bin() -> Path:
    path = REPO_ROOT / "node_modules" / ".bin" / "azurite"
    if not path.exists():
        raise RuntimeError(f"{path} is missing: run scripts/bootstrap.sh (it runs `npm ci` in the repo)")
    return path


def start_azurite(
    log_dir: Path,
    *,
    ports: AzuritePorts | None = None,
    location: Path | None = None,
    debug_log: Path | None = None,
    timeout: float = 30.0,
) -> Service:
    """Azurite's Queue and Table services on loopback, telemetry off.

    Without `location` the data lives in memory and disappears with the process; with it, on disk, so a
    restart keeps it (the reliability tests stop and restart Azurite mid-drain).
    """
    ports = ports or AzuritePorts(queue=free_port(), table=free_port())
    argv = [
        str(azurite_bin()),
        "--silent",
        "--disableTelemetry",
        "--skipApiVersionCheck",
        "--loose",
        "--blobHost", LOOPBACK, "--blobPort", "0",
        "--queueHost", LOOPBACK, "--queuePort", str(ports.queue),
        "--tableHost", LOOPBACK, "--tablePort", str(ports.table),
    ]  # fmt: skip
    if location is None:
        argv.append("--inMemoryPersistence")
    else:
        location.mkdir(parents=True, exist_ok=True)
        argv += ["--location", str(location)]
    if debug_log is not None:  # every request Azurite serves (the gateway benchmark counts them)
        argv += ["--debug", str(debug_log)]
    service = _spawn("azurite", argv, log_dir)
    _wait_ready(service, [ports.queue, ports.table], timeout)
    service.urls["connection_string"] = azurite_connection_string(ports)
    service.urls["queue"] = f"http://{LOOPBACK}:{ports.queue}/{AZURITE_ACCOUNT}"
    service.urls["table"] = f"http://{LOOPBACK}:{ports.table}/{AZURITE_ACCOUNT}"
    service.urls["table_port"] = str(ports.table)
    return service


def start_emulators(
    log_dir: Path,
    *,
    mde_port: int | None = None,
    identity_port: int | None = None,
    entra_port: int | None = None,
    identity_header: str = "local-identity-header",
    extra_args: list[str] | None = None,
    timeout: float = 20.0,
) -> Service:
    """The MDE emulator, the managed-identity endpoint and the Entra token endpoint, in one process (they
    share the tokens).

    `urls["entra"]` is the Entra server's https base, the value for `AZURE_AUTHORITY_HOST` (or a
    credential's `authority`); `urls["entra_cert"]` the PEM file of its self-signed certificate, written in
    `log_dir` before the server listens, the value for `SSL_CERT_FILE` (or `connection_verify`).
    """
    mde_port = mde_port or free_port()
    identity_port = identity_port or free_port()
    entra_port = entra_port or free_port()
    entra_cert = (log_dir / "emulators-entra-cert.pem").resolve()
    argv = [
        sys.executable, "-m", "emulators",
        "--host", LOOPBACK,
        "--mde-port", str(mde_port),
        "--identity-port", str(identity_port),
        "--identity-header", identity_header,
        "--entra-port", str(entra_port),
        "--entra-cert-file", str(entra_cert),
        *(extra_args or []),
    ]  # fmt: skip
    service = _spawn("emulators", argv, log_dir)
    _wait_ready(service, [mde_port, identity_port, entra_port], timeout)
    service.urls["mde"] = f"http://{LOOPBACK}:{mde_port}"
    service.urls["identity"] = f"http://{LOOPBACK}:{identity_port}/msi/token"
    service.urls["identity_base"] = f"http://{LOOPBACK}:{identity_port}"
    service.urls["identity_header"] = identity_header
    service.urls["entra"] = f"https://{LOOPBACK}:{entra_port}"
    service.urls["entra_cert"] = str(entra_cert)
    return service


def start_devhost(
    log_dir: Path,
    env: dict[str, str],
    *,
    port: int | None = None,
    app: str = "function_app:app",
    name: str = "devhost",
    timeout: float = 30.0,
) -> Service:
    """The development host serving `app` with exactly the given environment (no local.settings.json)."""
    port = port or free_port()
    argv = [
        sys.executable, "-m", "devhost",
        "--app", app,
        "--host", LOOPBACK,
        "--port", str(port),
        "--no-local-settings",
    ]  # fmt: skip
    service = _spawn(name, argv, log_dir, env=env)
    _wait_ready(service, [port], timeout)
    service.urls["base"] = f"http://{LOOPBACK}:{port}"
    return service


_SETTING_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def local_app_env(
    *,
    connection_string: str,
    mde_url: str,
    identity_url: str,
    identity_header: str,
    overrides: dict[str, str] | None = None,
    authority_host: str | None = None,
    ssl_cert_file: str | None = None,
) -> dict[str, str]:
    """The environment the app gets locally: this process's, plus the local service addresses.

    `authority_host` (the emulators' `urls["entra"]`) becomes `AZURE_AUTHORITY_HOST`, where azure-identity
    asks for customer tenants' tokens; `ssl_cert_file` (`urls["entra_cert"]`) becomes `SSL_CERT_FILE`, so
    the app process trusts that https server (its environment is set before it imports aiohttp). Note
    that `SSL_CERT_FILE` replaces the default trust store of that process: fine while it talks to loopback
    services only.
    """
    env = dict(os.environ)
    env.update(
        {
            "AzureWebJobsStorage": connection_string,
            "DEFENDER_API_BASE_URL": mde_url,
            "IDENTITY_ENDPOINT": identity_url,
            "IDENTITY_HEADER": identity_header,
            "PYTHONUNBUFFERED": "1",
        }
    )
    if authority_host is not None:
        env["AZURE_AUTHORITY_HOST"] = authority_host
    if ssl_cert_file is not None:
        env["SSL_CERT_FILE"] = ssl_cert_file
    for key, value in (overrides or {}).items():
        if not _SETTING_NAME.match(key):
            raise ValueError(f"not a setting name: {key!r}")
        env[key] = value
    return env
