#!/usr/bin/env bash
# The GPU check in one command (tools/gpu_check.py; stages in genlip_mcore/gpucheck):
#   bash scripts/gpu_check.sh --out DIR           on the GPU machine: installs the wheels carried in .whl/ (see
#                                                 scripts/fetch_gpu_wheels.sh) into a side directory, puts it and
#                                                 this checkout on PYTHONPATH, runs the check with python3
#   bash scripts/gpu_check.sh --smoke --out DIR   CPU, tiny sizes, with the project's .venv (CI; no .whl needed)
# Stages: correctness, attention, throughput, loader, fp8 (tests/gpu/test_gpu_fp8_*.py and `python -m
# genlip_mcore.fp8 bench`; torchao comes from the carried wheels, TE and nvdlfw-inspect are not on the device).
# Writes DIR/gpu_report.json and DIR/gpu_report.md; further arguments go to tools/gpu_check.py (--only, --budget,
# --budgets). Exit status 0 when every stage passed or was skipped with a reason, 1 otherwise: the report is
# written either way.
#
# Environment: PYTHON     interpreter of the GPU mode (default: python3, the device's CUDA torch)
#              GPU_SITE   where the carried wheels are installed (default: /tmp/genlip-site)
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
smoke=0
for arg in "$@"; do
    [[ $arg == --smoke ]] && smoke=1
done

if [[ $smoke -eq 1 ]]; then
    PY="$ROOT/.venv/bin/python"
    if [[ ! -x $PY ]]; then
        echo "[gpu_check] no $PY: run 'bash scripts/setup_env.sh' first" >&2
        exit 2
    fi
else
    PY="${PYTHON:-python3}"
    SITE="${GPU_SITE:-/tmp/genlip-site}"
    shopt -s nullglob
    wheels=(.whl/*.whl)
    if [[ ${#wheels[@]} -eq 0 ]]; then
        GPU_CHECK_WHEELS="none: no .whl/*.whl here (run scripts/fetch_gpu_wheels.sh and carry .whl)"
    elif "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            "${wheels[@]}" >/tmp/genlip-wheels.log 2>&1; then
        GPU_CHECK_WHEELS="$(cd .whl && echo *.whl) -> $SITE"
    else
        GPU_CHECK_WHEELS="pip install into $SITE failed: $(tail -3 /tmp/genlip-wheels.log | tr '\n' ' ')"
    fi
    export GPU_CHECK_WHEELS
    echo "[gpu_check] wheels: $GPU_CHECK_WHEELS"
    export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
exec "$PY" tools/gpu_check.py "$@"
