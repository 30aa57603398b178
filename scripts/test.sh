#!/usr/bin/env bash
# Run the tests on this machine: sets up .venv from the lock if needed, then
#   1. ruff check (pyflakes, import order, bugbear; rules in pyproject.toml),
#   2. the HF modeling and export tests under the oldest supported transformers (.venv/hf-oldest first on
#      PYTHONPATH; see setup_env.sh),
#   3. the slurm stage: a local two-node Slurm (scripts/slurm_local.sh start; needs root and apt-get, and fails
#      without them, never skips), the tests of tests/slurm through sbatch, then stop, also on failure,
#   4. pytest without the GPU-only and the slurm tests, under the locked versions.
# With arguments, only pytest runs, with them: `bash scripts/test.sh tests/unit -k config`.
# `bash scripts/test.sh --slurm` runs only the slurm stage.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
t0=$SECONDS
bash scripts/setup_env.sh
echo "[test] setup: $((SECONDS - t0)) s"

pytest_run() {
    local rc=0
    .venv/bin/python -m pytest -q -m "not gpu and not slurm" "$@" || rc=$?
    if [[ $rc -eq 5 ]]; then
        echo "[test] FAILED: pytest collected no tests (exit code 5)" >&2
    fi
    return "$rc"
}

slurm_stage() (         # a subshell: its EXIT trap stops the cluster when the stage ends, however it ends
    export SLURM_LOCAL_DIR="${SLURM_LOCAL_DIR:-/tmp/genlip-slurm}"
    export SLURM_CONF="$SLURM_LOCAL_DIR/slurm.conf"
    t=$SECONDS
    trap 'bash scripts/slurm_local.sh stop; echo "[test] slurm stage: $((SECONDS - t)) s"' EXIT
    bash scripts/slurm_local.sh start
    echo "[test] OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q -m slurm tests/slurm"
    rc=0
    OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q -p no:cacheprovider -m slurm tests/slurm || rc=$?
    [[ $rc -ne 5 ]] || echo "[test] FAILED: pytest collected no slurm tests (exit code 5)" >&2
    exit "$rc"
)

if [[ "${1:-}" == --slurm ]]; then
    (($# == 1)) || { echo "[test] error: --slurm takes no other arguments" >&2; exit 2; }
    slurm_stage
    exit 0
fi

if [[ $# -gt 0 ]]; then
    echo "[test] .venv/bin/python -m pytest -q -m \"not gpu and not slurm\" $*"
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

slurm_rc=0
slurm_stage || slurm_rc=$?

echo "[test] setup, ruff, the oldest-transformers run and the slurm stage took $((SECONDS - t0)) s"
echo "[test] .venv/bin/python -m pytest -q -m \"not gpu and not slurm\""
rc=0
pytest_run || rc=$?
if ((slurm_rc != 0)); then
    echo "[test] FAILED: the slurm stage (exit code $slurm_rc; its output is above the main suite)" >&2
    ((rc != 0)) || rc=$slurm_rc
fi
exit "$rc"
