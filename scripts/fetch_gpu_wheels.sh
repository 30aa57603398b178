#!/usr/bin/env bash
# Download, on this (CPU) machine, the wheels the GPU machine lacks into .whl/ (ignored by git), for
# scripts/gpu_check.sh to install there: the device image has Python 3.12, a CUDA torch, numpy, pyyaml, psutil,
# pillow, sentencepiece, tokenizers, pytest and pytest-timeout, but no Megatron-Core and no webdataset, and no network.
#   megatron-core   the model and training step (requires torch, numpy, packaging: all on the device)
#   webdataset      shard writing of the shapes generator (requires braceexpand, numpy, pyyaml)
#   braceexpand     shard patterns (config.expand_shards)
#   torchao         for the FP8 work on the torch-native path (not used by the check yet)
# Versions come from requirements/dev.txt where the lock has the package. A call of the device tool carries at most
# 64 MiB: the script prints the total and fails above it. Re-running replaces .whl/.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
LIMIT_MIB=64
TORCHAO=0.18.0            # not in the CPU lock: the version the issue names for the device

pin() {   # NAME -> NAME==VERSION from the lock
    local line
    line=$(grep -i "^$1==" requirements/dev.txt | head -1 | cut -d' ' -f1)
    if [[ -z $line ]]; then
        echo "[fetch_gpu_wheels] $1 is not pinned in requirements/dev.txt" >&2
        exit 1
    fi
    echo "$line"
}

specs=("$(pin megatron-core)" "$(pin webdataset)" "$(pin braceexpand)" "torchao==$TORCHAO")
rm -rf .whl
mkdir -p .whl
for spec in "${specs[@]}"; do
    echo "[fetch_gpu_wheels] $spec"
    # (without the "Location ... is ignored" lines that some machines' find-links settings print per package)
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "$spec" 2>&1 | { grep -v "^WARNING: Location 'file://.*' is ignored" || true; }
done
total=$(du -cb .whl/*.whl | tail -1 | cut -f1)
ls -l .whl/*.whl | awk '{printf "[fetch_gpu_wheels] %9d  %s\n", $5, $NF}'
echo "[fetch_gpu_wheels] total $total bytes ($(awk "BEGIN {printf \"%.1f\", $total / 1048576}") MiB) in" \
     "${#specs[@]} wheels; limit $LIMIT_MIB MiB"
if (( total > LIMIT_MIB * 1048576 )); then
    echo "[fetch_gpu_wheels] FAILED: over the $LIMIT_MIB MiB a device call can carry" >&2
    exit 1
fi
