#!/usr/bin/env bash
# The run command: sets up everything (scripts/bootstrap.sh), then runs alertgate locally on
# http://127.0.0.1:7071/api with Azurite and the local MDE and managed-identity emulators.
# Creates local.settings.json from local.settings.sample.json on first run. Ctrl-C stops everything.
#   scripts/run.sh                   everything, with the development host
#   scripts/run.sh --services-only   Azurite and the emulators only (then run `func start` yourself)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
if [ ! -f local.settings.json ]; then
  cp local.settings.sample.json local.settings.json
  echo "run: created local.settings.json from local.settings.sample.json"
fi
exec .venv/bin/python -m devhost.local "$@"
