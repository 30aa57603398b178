#!/usr/bin/env bash
# Run the test suite on this machine: sets up .venv if needed, then pytest without the GPU-only tests.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh tests/unit -k config`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh

echo "[test] .venv/bin/python -m pytest -q -m \"not gpu\" $*"
rc=0
.venv/bin/python -m pytest -q -m "not gpu" "$@" || rc=$?
if [[ $rc -eq 5 ]]; then
    echo "[test] FAILED: pytest collected no tests (exit code 5)" >&2
fi
exit "$rc"
