"""Parameter counts, FLOPs per token and per-rank split of a GenLIP variant: see genlip_mcore/info.py.

    python tools/model_info.py --variant g16 --tp 2 --pp 4
"""

import sys

try:
    import genlip_mcore  # noqa: F401
except ImportError:  # run from a checkout without installing: the repo root is one level up
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from genlip_mcore.info import main

if __name__ == "__main__":
    sys.exit(main())
