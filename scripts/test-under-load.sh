#!/usr/bin/env bash
# The README's test command (scripts/test.sh) on a busy machine, as CI machines are: LOAD_WORKERS CPU
# burners (default: one per CPU) run beside it and are stopped when it ends, whatever happens (test
# failure, Ctrl-C, SIGTERM). Each burner also ends by itself after LOAD_MAX_SECONDS (default 3600), so
# none outlives a wrapper that was SIGKILLed. The last line is a one-line summary: result, pytest's
# counts, wall time and load average. Extra arguments go to pytest, as with scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
workers="${LOAD_WORKERS:-$(getconf _NPROCESSORS_ONLN 2>/dev/null || nproc)}"
max_seconds="${LOAD_MAX_SECONDS:-3600}"
for value in "$workers" "$max_seconds"; do
  case "$value" in
    '' | *[!0-9]*)
      echo "LOAD_WORKERS and LOAD_MAX_SECONDS must be whole numbers (got '$value')" >&2
      exit 2
      ;;
  esac
done

log=$(mktemp "${TMPDIR:-/tmp}/alertgate-test-under-load.XXXXXX")
burners=()
test_pid=""

stop_burners() {
  if [ "${#burners[@]}" -gt 0 ]; then
    kill "${burners[@]}" 2>/dev/null || true
    wait "${burners[@]}" 2>/dev/null || true
    burners=()
  fi
}

# shellcheck disable=SC2329 # invoked by on_signal
stop_tests() {
  # The test run is a job of its own process group (set -m below). SIGINT lets pytest tear down its
  # fixtures (Azurite, emulators, development hosts); whatever is left after 60 s is killed.
  if [ -n "$test_pid" ] && kill -0 "$test_pid" 2>/dev/null; then
    kill -INT -- "-$test_pid" 2>/dev/null || true
    for _ in $(seq 1 600); do
      kill -0 "$test_pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL -- "-$test_pid" 2>/dev/null || true
  fi
  test_pid=""
}

# shellcheck disable=SC2329 # invoked by the traps below
on_signal() {
  trap - INT TERM
  echo "test-under-load: interrupted; stopping the tests and the load" >&2
  stop_tests
  stop_burners
  exit "$1"
}
trap stop_burners EXIT
trap 'on_signal 130' INT
trap 'on_signal 143' TERM

echo "test-under-load: $workers CPU burner(s) beside scripts/test.sh; output also in $log"
for _ in $(seq 1 "$workers"); do
  "$PYTHON" -c '
import sys, time
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    pass
' "$max_seconds" &
  burners+=("$!")
done

started=$(date +%s)
# Its own process group, so that a signal to this script can stop the whole test run (stop_tests); waiting
# for a background job, unlike for a foreground one, lets the traps run at once.
# The subshell waits for tee too (tee -i: an interrupt must not cut off pytest's last lines).
set -m
(bash scripts/test.sh "$@" 2>&1 | tee -i "$log") &
test_pid=$!
set +m
status=0
wait "$test_pid" || status=$?
test_pid=""
ended=$(date +%s)
read -r load1 load5 load15 _ </proc/loadavg
stop_burners

# pytest's last line, e.g. "==== 1 failed, 250 passed, 3 deselected in 301.20s (0:05:01) ====" (no
# "=" with -q).
counts=$(grep -E '^(=+ )?[0-9]+ (passed|failed|error|errors|skipped|deselected|xfailed|xpassed)\b.* in [0-9.]+s' \
  "$log" | tail -n 1 | sed -E 's/^=+ //; s/ in [0-9.]+s.*$//' || true)
grep -E '^(FAILED|ERROR) ' "$log" || true
result=passed
[ "$status" -eq 0 ] || result=failed
elapsed=$((ended - started))
printf 'test-under-load: %s (%s); wall %dm%02ds; %s burner(s) on %s CPU(s), load average %s %s %s (1/5/15 min) at the end; log %s\n' \
  "$result" "${counts:-pytest did not report}" $((elapsed / 60)) $((elapsed % 60)) \
  "$workers" "$(nproc)" "$load1" "$load5" "$load15" "$log"
exit "$status"
