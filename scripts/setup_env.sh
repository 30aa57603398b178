#!/usr/bin/env bash
# Create (or reuse) the project virtualenv in .venv and install genlip_mcore into it, editable, with the dev extra
# and the pins of constraints.txt. Idempotent: the install is skipped while .venv/.genlip-installed holds the hash
# of the packaging files (setup.py, pyproject.toml, constraints.txt) and the interpreter version.
#
# Environment: PYTHON  interpreter used to create the venv (default: python3)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
VENV="$ROOT/.venv"
STAMP="$VENV/.genlip-installed"

log() { echo "[setup_env] $*"; }

if [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" -c "import sys" >/dev/null 2>&1; then
    log "reusing virtualenv $VENV"
else
    if [[ -e "$VENV" ]]; then
        log "$VENV exists but has no working interpreter; recreating it"
        rm -rf "$VENV"
    fi
    log "creating virtualenv $VENV with $("$PYTHON" --version 2>&1) ($PYTHON)"
    "$PYTHON" -m venv "$VENV"
fi

# Hash of everything that decides what gets installed, plus the interpreter it is installed into.
want="$("$VENV/bin/python" - <<'PY'
import hashlib, sys
h = hashlib.sha256(sys.version.encode())
for name in ("setup.py", "pyproject.toml", "constraints.txt"):
    try:
        with open(name, "rb") as f:
            h.update(name.encode() + b"\0" + f.read())
    except FileNotFoundError:
        h.update(name.encode() + b"\0missing")
print(h.hexdigest())
PY
)"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
    log "dependencies up to date (stamp $STAMP matches); skipping install"
    exit 0
fi

log "upgrading pip"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
log "installing: pip install -c constraints.txt -e \".[dev,dali,logging,hf]\""
"$VENV/bin/python" -m pip install --quiet -c constraints.txt -e ".[dev,dali,logging,hf]"
"$VENV/bin/python" -W ignore - <<'PY'
import megatron.core, torch
print(f"[setup_env] installed torch {torch.__version__}, megatron-core {megatron.core.__version__}")
PY
echo "$want" > "$STAMP"
log "wrote stamp $STAMP"
