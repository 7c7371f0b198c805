"""The local run: Azurite, the MDE, identity and Entra emulators, and the development host, on loopback.

Ports are those of local.settings.sample.json: Azurite's usual 10001 (queues) and 10002 (tables), the MDE
emulator on 7081, the identity endpoint on 7082, the app on 7071; the Entra token endpoint listens on
https://127.0.0.1:7083 with a self-signed certificate written to .local/logs/emulators-entra-cert.pem. The
app gets `AZURE_AUTHORITY_HOST` and `SSL_CERT_FILE` pointing there (unless local.settings.json sets them),
so it can get customer tenants' tokens; the emulator's application is `DEFENDER_APP_CLIENT_ID` when that
setting holds a GUID. Azurite keeps its data in .azurite/ so that queued work survives a restart of the
run. `--services-only` starts everything but the host, for running the same app with Core Tools' `func
start` (then set those two variables yourself, as printed).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import uuid
from pathlib import Path

from devhost.services import REPO_ROOT, AzuritePorts, Service, start_azurite, start_devhost, start_emulators

APP_PORT = 7071
MDE_PORT = 7081
IDENTITY_PORT = 7082
ENTRA_PORT = 7083
AZURITE = AzuritePorts(queue=10001, table=10002)


def _local_values(path: Path) -> dict[str, str]:
    document = json.loads(path.read_text(encoding="utf-8"))
    values = document.get("Values", {})
    return {str(k): str(v) for k, v in values.items()}


def _emulator_args(values: dict[str, str]) -> list[str]:
    """The emulators' application follows the app's DEFENDER_APP_CLIENT_ID when that holds a GUID."""
    try:
        app_client_id = uuid.UUID(values.get("DEFENDER_APP_CLIENT_ID", "").strip())
    except ValueError:
        return []
    return ["--app-client-id", str(app_client_id)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devhost.local", description=__doc__)
    parser.add_argument("--services-only", action="store_true", help="start Azurite and the emulators only")
    parser.add_argument("--settings", default=str(REPO_ROOT / "local.settings.json"))
    args = parser.parse_args(argv)

    values = _local_values(Path(args.settings))
    log_dir = REPO_ROOT / ".local" / "logs"
    services: list[Service] = []
    stopping = False

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        services.append(start_azurite(log_dir, ports=AZURITE, location=REPO_ROOT / ".azurite"))
        print(f"Azurite       queues {services[-1].urls['queue']}  tables {services[-1].urls['table']}")
        emulators = start_emulators(
            log_dir,
            mde_port=MDE_PORT,
            identity_port=IDENTITY_PORT,
            entra_port=ENTRA_PORT,
            identity_header=values.get("IDENTITY_HEADER", "local-identity-header"),
            extra_args=_emulator_args(values),
        )
        services.append(emulators)
        print(f"MDE emulator  {emulators.urls['mde']}  (control: {emulators.urls['mde']}/_emulator/calls)")
        print(f"Identity      {emulators.urls['identity']}")
        print(f"Entra         {emulators.urls['entra']}  (AZURE_AUTHORITY_HOST; "
              f"SSL_CERT_FILE={emulators.urls['entra_cert']})")  # fmt: skip
        if not args.services_only:
            env = {**os.environ, **values, **{k: v for k, v in os.environ.items() if k in values}}
            env["PYTHONUNBUFFERED"] = "1"
            # Customer tenants' tokens come from the Entra emulator, whose certificate the app must trust
            # (set before the app imports aiohttp, which a child's environment guarantees).
            local_tls = {
                "AZURE_AUTHORITY_HOST": emulators.urls["entra"],
                "SSL_CERT_FILE": emulators.urls["entra_cert"],
            }
            env.update({name: value for name, value in local_tls.items() if name not in values})
            host = start_devhost(log_dir, env, port=APP_PORT)
            services.append(host)
            print(f"alertgate     {host.urls['base']}/api  (log: {host.log_path})")
            print(f"Try: curl -s -X POST {host.urls['base']}/api/alerts/batchUpdate "
                  "-H 'Content-Type: application/json' -d @docs/example-batch-update.json")  # fmt: skip
        print(f"Logs in {log_dir}. Ctrl-C stops everything.", flush=True)
        while not stopping:
            for service in services:
                if not service.alive():
                    print(f"{service.name} exited; its log ends:\n{service.log_tail()}", file=sys.stderr)
                    return 1
            time.sleep(0.5)
        return 0
    finally:
        for service in reversed(services):
            service.stop()


if __name__ == "__main__":
    sys.exit(main())
