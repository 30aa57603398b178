#!/usr/bin/env bash
# Regenerate the locks in requirements/ with pip-compile (pip-tools), in a throw-away virtualenv:
#   requirements/dev.txt        every package of the CPU development environment (setup.py's dev, dali, logging, hf
#                               and fp8 extras, under constraints.txt), at an exact version. CI and setup_env.sh install it.
#   requirements/hf-oldest.txt  requirements/hf-oldest.in (the oldest supported transformers) resolved against
#                               dev.txt, so it differs from dev.txt only where that transformers needs it to.
# Packages move to their newest allowed versions: review `git diff requirements/`, run the tests, commit.
# Arguments go to both pip-compile calls, e.g. `--upgrade-package wandb` (default: --upgrade, everything newest).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
TOOLS="$(mktemp -d)"
CONSTRAINTS=requirements/dev-constraints.tmp      # a fixed name: pip-compile writes it into the annotations
trap 'rm -rf "$TOOLS" "$CONSTRAINTS"' EXIT

"$PYTHON" -m venv "$TOOLS/venv"
"$TOOLS/venv/bin/python" -m pip install --quiet --upgrade pip "pip-tools>=7.4,<8"
compile=("$TOOLS/venv/bin/pip-compile" --quiet --allow-unsafe --strip-extras --no-emit-index-url
         --no-emit-find-links --annotation-style line)
args=("$@")
[[ ${#args[@]} -gt 0 ]] || args=(--upgrade)

echo "[update_lock] requirements/dev.txt from setup.py [dev,dali,logging,hf,fp8] under constraints.txt"
CUSTOM_COMPILE_COMMAND="bash scripts/update_lock.sh" "${compile[@]}" "${args[@]}" \
    --extra dev --extra dali --extra logging --extra hf --extra fp8 -c constraints.txt -o requirements/dev.txt setup.py

# dev.txt as constraints, less the packages that the oldest transformers pins differently
grep -E '^[A-Za-z0-9]' requirements/dev.txt | grep -vE '^(transformers|tokenizers|huggingface-hub)==' \
    | sed 's/ *#.*//' > "$CONSTRAINTS"
echo "[update_lock] requirements/hf-oldest.txt from requirements/hf-oldest.in, against dev.txt"
CUSTOM_COMPILE_COMMAND="bash scripts/update_lock.sh" "${compile[@]}" "${args[@]}" \
    -c "$CONSTRAINTS" -o requirements/hf-oldest.txt requirements/hf-oldest.in

echo "[update_lock] done; packages that hf-oldest.txt installs over dev.txt:"
"$TOOLS/venv/bin/python" "$ROOT/scripts/lockdiff.py" requirements/dev.txt requirements/hf-oldest.txt
