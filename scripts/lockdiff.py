#!/usr/bin/env python3
"""Compare pip-compile locks, or an environment with a lock. Standard library only.

    python scripts/lockdiff.py BASE.txt OTHER.txt   one `name==version` line for every package of OTHER that BASE
                                                   lacks or pins differently (what a side install must add)
    python scripts/lockdiff.py --installed LOCK.txt the packages installed in the running interpreter's environment
                                                   whose version differs from LOCK: `name  lock -> installed`
                                                   (`-`: not in the lock)
"""

import re
import sys
from importlib import metadata


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: str) -> dict:
    pins = {}
    with open(path) as f:
        for line in f:
            line = line.split("#", 1)[0].split(";", 1)[0].strip()
            if not line or line.startswith("-"):
                continue
            if "==" not in line:
                raise SystemExit(f"{path}: not a lock line (name==version): {line!r}")
            name, version = line.split("==", 1)
            pins[canonical(name)] = version.strip()
    return pins


def installed() -> dict:
    return {canonical(d.metadata["Name"]): d.version for d in metadata.distributions() if d.metadata["Name"]}


def main(argv) -> int:
    if len(argv) == 2 and argv[0] == "--installed":
        lock, have = read_lock(argv[1]), installed()
        rows = [(n, lock.get(n, "-"), v) for n, v in sorted(have.items())
                if lock.get(n) != v and n not in ("pip", "genlip-mcore")]
        for name, want, got in rows:
            print(f"  {name:32s} {want:>16s} -> {got}")
        absent = len(set(lock) - set(have))
        print(f"  {len(rows)} installed package(s) differ from {argv[1]}; {absent} locked package(s) not installed")
        return 0
    if len(argv) == 2:
        base, other = read_lock(argv[0]), read_lock(argv[1])
        for name, version in sorted(other.items()):
            if base.get(name) != version:
                print(f"{name}=={version}")
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
