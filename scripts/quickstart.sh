#!/usr/bin/env bash
# Quickstart: set up .venv (first run only) and train the tiny GenLIP on CPU with examples/configs/tiny_cpu.yaml.
# Extra arguments go to genlip-pretrain, e.g. `bash scripts/quickstart.sh training.train_iters=5`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh

echo "[quickstart] .venv/bin/genlip-pretrain --config examples/configs/tiny_cpu.yaml $*"
exec .venv/bin/genlip-pretrain --config examples/configs/tiny_cpu.yaml "$@"
