#!/usr/bin/env bash
# The whole reliability suite (issue 6): every case of the fault matrix, Azurite stopped and restarted
# mid-drain, and 10,000 generated bodies through validation. The README's test command (scripts/test.sh)
# runs only the fast subset; this runs everything. Sets up like scripts/test.sh (scripts/bootstrap.sh),
# starts its own Azurite, emulators and development hosts on free loopback ports, takes about 8 minutes
# on a 2-core machine. Extra arguments go to pytest, e.g. scripts/reliability.sh -k restart -x
# ALERTGATE_PROPERTY_EXAMPLES=N changes the number of generated bodies (default here 10000).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh

export ALERTGATE_FULL=1
export ALERTGATE_PROPERTY_EXAMPLES="${ALERTGATE_PROPERTY_EXAMPLES:-10000}"
echo "== pytest tests/reliability (whole suite, ${ALERTGATE_PROPERTY_EXAMPLES} generated bodies)"
exec .venv/bin/python -m pytest tests/reliability --durations=10 "$@"
