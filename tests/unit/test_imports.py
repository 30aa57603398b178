"""The import direction of architecture.md §2, read from the source (AST), so it holds before any code runs.

config imports nothing of ours; data imports only config; model never imports data or train; nothing outside train
imports train; the HF modeling/configuration files (copied into every export) import nothing of the package.
Imports inside functions count too: a lazy import is still a dependency.
"""

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PKG = "genlip_mcore"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted((REPO / PKG).rglob("*.py"))}


def imported_modules(source: str, name: str, is_package: bool, known=MODULES) -> set[tuple[str, int]]:
    """(absolute module, level) for every import in `source`; level > 0 marks a relative import.

    `from pkg import x` counts as pkg.x when that is one of our modules, else as pkg."""
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {(alias.name, 0) for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            for alias in node.names:
                sub = f"{mod}.{alias.name}"
                found.add((sub if sub in known else mod, node.level))
    return found


def imports_of(name: str) -> set[tuple[str, int]]:
    path = MODULES[name]
    return imported_modules(path.read_text(), name, path.name == "__init__.py")


def ours(mod: str) -> bool:
    return mod == PKG or mod.startswith(PKG + ".")


def within(mod: str, pkg: str) -> bool:
    return mod == pkg or mod.startswith(pkg + ".")


def violations(select, allowed) -> list[str]:
    bad = []
    for name in MODULES:
        if not select(name):
            continue
        for mod, level in sorted(imports_of(name)):
            if not allowed(name, mod, level):
                bad.append(f"{name} imports {mod}")
    return bad


# ------------------------------------------------------------------------------------------------------------------
# The walker itself
# ------------------------------------------------------------------------------------------------------------------
def test_walker_resolves_absolute_relative_and_lazy_imports():
    src = textwrap.dedent("""
        import os, genlip_mcore.config
        from genlip_mcore import config, __version__
        from . import rope
        from .attention import X
        from .. import parallel
        def f():
            from genlip_mcore.train import loop
    """)
    known = {"genlip_mcore.config", "genlip_mcore.model.rope", "genlip_mcore.parallel", "genlip_mcore.train.loop"}
    got = imported_modules(src, "genlip_mcore.model.genlip", False, known)
    assert got == {("os", 0), ("genlip_mcore.config", 0), ("genlip_mcore", 0), ("genlip_mcore.model.rope", 1),
                   ("genlip_mcore.model.attention", 1), ("genlip_mcore.parallel", 2), ("genlip_mcore.train.loop", 0)}
    # inside a package's __init__, "." is the package itself
    assert imported_modules("from . import genlip", "genlip_mcore.model", True,
                            {"genlip_mcore.model.genlip"}) == {("genlip_mcore.model.genlip", 1)}


def test_walker_sees_the_package():
    assert {"genlip_mcore", "genlip_mcore.config", "genlip_mcore.model.genlip"} <= set(MODULES)
    assert ("genlip_mcore.config", 0) in imports_of("genlip_mcore.model.genlip")


# ------------------------------------------------------------------------------------------------------------------
# The rules
# ------------------------------------------------------------------------------------------------------------------
def test_config_imports_nothing_of_ours():
    assert violations(lambda n: n == f"{PKG}.config", lambda n, mod, lvl: not ours(mod)) == []


def test_data_imports_only_config_and_data():
    # procutil is a stdlib-only leaf (process helpers that spawned children import cheaply).
    def allowed(name, mod, level):
        return not ours(mod) or mod in (PKG, f"{PKG}.config", f"{PKG}.procutil") or within(mod, f"{PKG}.data")

    assert violations(lambda n: within(n, f"{PKG}.data"), allowed) == []


def test_model_never_imports_data_or_train():
    def allowed(name, mod, level):
        return not (within(mod, f"{PKG}.data") or within(mod, f"{PKG}.train"))

    assert violations(lambda n: within(n, f"{PKG}.model"), allowed) == []


def test_nothing_outside_train_imports_train():
    assert violations(lambda n: not within(n, f"{PKG}.train"),
                      lambda n, mod, lvl: not within(mod, f"{PKG}.train")) == []


def test_import_of_package_and_config_pulls_no_gpu_only_dependency():
    """`import genlip_mcore` and its config work on any machine: no Transformer Engine, no DALI at import time."""
    code = textwrap.dedent("""
        import sys
        import genlip_mcore, genlip_mcore.config
        bad = sorted(m for m in sys.modules
                     if m.split(".")[0] == "transformer_engine" or m == "nvidia.dali" or m.startswith("nvidia.dali."))
        print(",".join(bad))
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"imported at import time: {out.stdout.strip()}"
