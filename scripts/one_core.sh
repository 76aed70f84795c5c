#!/usr/bin/env bash
# Run a command as on a slow machine: it and every process it starts (tritonserver, the
# service, the test client) confined to core 0, beside a busy loop on the same core, so
# they get about half of one core. Tests must give the same verdict there as at full speed.
#   scripts/one_core.sh python3 -m pytest tests/integration/test_cancellation.py
set -euo pipefail
core=${ONE_CORE:-0}
taskset -c "$core" "${PYTHON:-python3}" -c 'while True: pass' &
hog=$!
trap 'kill "$hog" 2>/dev/null || true' EXIT
echo "[one-core] core $core, a busy loop beside it (pid $hog): $*" >&2
taskset -c "$core" "$@"
