#!/usr/bin/env bash
# Sets up everything the run and test commands need, inside the repo, on a fresh machine:
# a Python virtual environment (.venv) with requirements-dev.txt, and Azurite from npm (node_modules/).
# Safe to run again: it reinstalls only when requirements or the npm lock file changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
  echo "alertgate needs Python 3.11 or newer as '$PYTHON' (set PYTHON=/path/to/python3.11)." >&2
  exit 1
fi
for tool in node npm; do
  command -v "$tool" >/dev/null || { echo "alertgate needs Node.js 18+ with npm for Azurite ($tool not found)." >&2; exit 1; }
done

if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.requirements.sha256
want=$(cat requirements.txt requirements-dev.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "bootstrap: installing Python packages"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
  echo "$want" > "$stamp"
fi

npm_stamp=node_modules/.package-lock.sha256
npm_want=$(cat package.json package-lock.json | sha256sum | cut -d' ' -f1)
if [ ! -x node_modules/.bin/azurite ] || [ "$(cat "$npm_stamp" 2>/dev/null)" != "$npm_want" ]; then
  echo "bootstrap: installing Azurite (npm ci, inside the repo)"
  npm ci --no-audit --no-fund --loglevel=error
  echo "$npm_want" > "$npm_stamp"
fi
