#!/usr/bin/env bash
# Early warning of dependency drift: build a throw-away virtualenv with the NEWEST versions that setup.py allows
# (no lock; torch and megatron-core stay pinned by constraints.txt, which CPU machines need), print which packages
# differ from requirements/dev.txt, and run the tests most exposed to drift: the HF modeling code and export, the
# tokenizers, the config, the metrics sinks (TensorBoard, wandb) and one short training run on webdataset shards.
# Extra arguments go to pytest. Environment: PYTHON (default python3), KEEP_VENV=1 keeps the venv and prints it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
WORK="$(mktemp -d)"
if [[ "${KEEP_VENV:-0}" == 1 ]]; then
    trap 'echo "[test_latest] kept $WORK/venv"' EXIT
else
    trap 'rm -rf "$WORK"' EXIT
fi
VENV="$WORK/venv"
TESTS=(tests/unit/test_hf_modeling.py tests/unit/test_hf_export.py tests/unit/test_tokenizer.py
       tests/unit/test_config.py tests/unit/test_metrics.py
       "tests/e2e/test_pretrain_cli.py::test_trains_on_webdataset_shards_and_checks_the_vocabulary")

t0=$SECONDS
echo "[test_latest] creating $VENV; installing the newest allowed versions of .[dev,logging,hf] (no lock)"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip 2>&1 | { grep -v "^WARNING: Location 'file://.*' is ignored" || true; }
"$VENV/bin/python" -m pip install --quiet --upgrade --upgrade-strategy eager -c constraints.txt -e ".[dev,logging,hf]" \
    2>&1 | { grep -v "^WARNING: Location 'file://.*' is ignored" || true; }
echo "[test_latest] install: $((SECONDS - t0)) s"

echo "[test_latest] packages that differ from requirements/dev.txt (lock -> newest):"
"$VENV/bin/python" scripts/lockdiff.py --installed requirements/dev.txt

# The newest transformers must be at least the locked one: otherwise this run tested nothing new.
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md, re, sys
from packaging.version import Version
lock = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", open("requirements/dev.txt").read(), re.M))
got, locked = md.version("transformers"), lock["transformers"]
print(f"[test_latest] transformers {got} (lock {locked})")
if Version(got) < Version(locked):
    sys.exit(f"[test_latest] the newest transformers resolved to {got}, older than the lock's {locked}")
PY

t=$SECONDS
echo "[test_latest] pytest ${TESTS[*]} $*"
rc=0
"$VENV/bin/python" -m pytest -q -p no:cacheprovider -m "not gpu" "${TESTS[@]}" "$@" || rc=$?
echo "[test_latest] tests: $((SECONDS - t)) s; total $((SECONDS - t0)) s"
exit "$rc"
