"""The local run: Azurite, the MDE and identity emulators, and the development host, on loopback.

Ports are those of local.settings.sample.json: Azurite's usual 10001 (queues) and 10002 (tables), the MDE
emulator on 7081, the identity endpoint on 7082, the app on 7071. Azurite keeps its data in .azurite/ so
that queued work survives a restart of the run. `--services-only` starts everything but the host, for
running the same app with Core Tools' `func start`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

from devhost.services import REPO_ROOT, AzuritePorts, Service, start_azurite, start_devhost, start_emulators

APP_PORT = 7071
MDE_PORT = 7081
IDENTITY_PORT = 7082
AZURITE = AzuritePorts(queue=10001, table=10002)


def _local_values(path: Path) -> dict[str, str]:
    document = json.loads(path.read_text(encoding="utf-8"))
    values = document.get("Values", {})
    return {str(k): str(v) for k, v in values.items()}


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
            identity_header=values.get("IDENTITY_HEADER", "local-identity-header"),
        )
        services.append(emulators)
        print(f"MDE emulator  {emulators.urls['mde']}  (control: {emulators.urls['mde']}/_emulator/calls)")
        print(f"Identity      {emulators.urls['identity']}")
        if not args.services_only:
            env = {**os.environ, **values, **{k: v for k, v in os.environ.items() if k in values}}
            env["PYTHONUNBUFFERED"] = "1"
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
