#!/usr/bin/env bash
# The test command: sets up everything (scripts/bootstrap.sh), then lint, type-check and the test suite.
# The tests start their own Azurite, emulators and development hosts on free loopback ports.
# Extra arguments go to pytest, e.g. scripts/test.sh -k batch_update -x
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh

echo "== ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== mypy"
.venv/bin/mypy
bash scripts/checkov.sh # infra/: checkov and shellcheck, offline, in their own .venv-checkov
echo "== pytest"
.venv/bin/python -m pytest "$@"
