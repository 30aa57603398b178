#!/usr/bin/env bash
# Create .venv and install the locked CPU development environment into it:
#   1. requirements/dev.txt: every package at the exact version CI tests (pip-compile output; see update_lock.sh),
#   2. genlip_mcore itself, editable, without dependencies and without build isolation (the lock has setuptools),
#   3. .venv/hf-oldest: the packages that differ for the oldest supported transformers (requirements/hf-oldest.txt),
#      a side directory that scripts/test.sh puts first on PYTHONPATH for the HF tests; nothing else uses it.
# Idempotent: nothing happens while .venv/.genlip-installed holds the hash of the packaging files, the locks and the
# interpreter version. When any of them changes, .venv is rebuilt from scratch, so a package dropped from the lock
# does not linger.
#
# Environment: PYTHON  interpreter used to create the venv (default: python3)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
VENV="$ROOT/.venv"
STAMP="$VENV/.genlip-installed"
PIP_VERSION=26.3          # the installer is pinned too: a new pip can resolve or build differently
LOCK=requirements/dev.txt
OLDEST_LOCK=requirements/hf-oldest.txt

log() { echo "[setup_env] $*"; }
# pip, without the per-package "Location ... is ignored" warnings that this machine's find-links settings cause
pip_quiet() {
    "$VENV/bin/python" -m pip "$@" 2>&1 | { grep -v "^WARNING: Location 'file://.*' is ignored" || true; }
    return "${PIPESTATUS[0]}"
}

# Hash of everything that decides what gets installed, plus the interpreter it is installed into.
want="$("$PYTHON" - "$PIP_VERSION" <<'PY'
import hashlib, sys
h = hashlib.sha256(sys.version.encode() + sys.argv[1].encode())
for name in ("setup.py", "pyproject.toml", "constraints.txt", "requirements/dev.txt", "requirements/hf-oldest.txt"):
    try:
        with open(name, "rb") as f:
            h.update(name.encode() + b"\0" + f.read())
    except FileNotFoundError:
        h.update(name.encode() + b"\0missing")
print(h.hexdigest())
PY
)"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]] && "$VENV/bin/python" -c "import sys" >/dev/null 2>&1; then
    log "dependencies up to date (stamp $STAMP matches); skipping install"
    exit 0
fi

if [[ -e "$VENV" ]]; then
    log "the lock, packaging files or interpreter changed since $VENV was built; rebuilding it"
    rm -rf "$VENV"
fi
log "creating virtualenv $VENV with $("$PYTHON" --version 2>&1) ($PYTHON)"
"$PYTHON" -m venv "$VENV"
pip_quiet install --quiet "pip==$PIP_VERSION"
log "installing the lock: pip install -r $LOCK ($(grep -c '==' "$LOCK") packages)"
pip_quiet install --quiet -r "$LOCK"
log "installing genlip_mcore (editable, --no-deps)"
# (setuptools' banner about editable installs is advice for package authors, not for this install)
PYTHONWARNINGS="ignore:Editable installation" pip_quiet install --quiet --no-deps --no-build-isolation -e .
if ! problems=$("$VENV/bin/python" -m pip check 2>&1); then
    echo "$problems" >&2
    log "pip check found broken requirements in the lock"
    exit 1
fi
oldest=$("$VENV/bin/python" scripts/lockdiff.py "$LOCK" "$OLDEST_LOCK")
log "oldest supported transformers into $VENV/hf-oldest: $(echo $oldest)"
# shellcheck disable=SC2086
pip_quiet install --quiet --no-deps --target "$VENV/hf-oldest" $oldest
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
print("[setup_env] installed " + ", ".join(f"{p} {md.version(p)}" for p in ("torch", "megatron-core", "transformers")))
PY
echo "$want" > "$STAMP"
log "wrote stamp $STAMP"
