#!/usr/bin/env bash
# Run the tests on this machine: sets up .venv from the lock if needed, then
#   1. ruff check (pyflakes, import order, bugbear; rules in pyproject.toml),
#   2. pytest without the GPU-only tests,
#   3. the HF modeling and export tests again under the oldest supported transformers (.venv/hf-oldest first on
#      PYTHONPATH; see setup_env.sh).
# With arguments, only pytest runs, with them: `bash scripts/test.sh tests/unit -k config`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
t0=$SECONDS
bash scripts/setup_env.sh
echo "[test] setup: $((SECONDS - t0)) s"

pytest_run() {
    local rc=0
    .venv/bin/python -m pytest -q -m "not gpu" "$@" || rc=$?
    if [[ $rc -eq 5 ]]; then
        echo "[test] FAILED: pytest collected no tests (exit code 5)" >&2
    fi
    return "$rc"
}

if [[ $# -gt 0 ]]; then
    echo "[test] .venv/bin/python -m pytest -q -m \"not gpu\" $*"
    exec_rc=0
    pytest_run "$@" || exec_rc=$?
    exit "$exec_rc"
fi

t=$SECONDS
echo "[test] ruff check"
.venv/bin/ruff check
echo "[test] ruff: $((SECONDS - t)) s"

HF_TESTS=(tests/unit/test_hf_modeling.py tests/unit/test_hf_export.py)
t=$SECONDS
old=$(PYTHONPATH=.venv/hf-oldest .venv/bin/python -c "import transformers; print(transformers.__version__)")
echo "[test] HF tests under the oldest supported transformers ($old): ${HF_TESTS[*]}"
PYTHONPATH=.venv/hf-oldest pytest_run -p no:cacheprovider "${HF_TESTS[@]}"
echo "[test] HF tests under transformers $old: $((SECONDS - t)) s"

echo "[test] .venv/bin/python -m pytest -q -m \"not gpu\" (setup, ruff and the oldest-transformers run took $((SECONDS - t0)) s)"
rc=0
pytest_run || rc=$?
exit "$rc"
