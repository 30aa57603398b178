"""Checkpoint conversion to and from the HuggingFace layout: see genlip_mcore/convert.py.

    python tools/convert.py to-hf --checkpoint runs/quickstart/checkpoints --out runs/quickstart/hf
    python tools/convert.py from-hf --hf runs/quickstart/hf --out runs/from_hf parallel.tensor_model_parallel_size=2
"""

import sys

try:
    import genlip_mcore  # noqa: F401
except ImportError:  # run from a checkout without installing: the repo root is one level up
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from genlip_mcore.convert import main

if __name__ == "__main__":
    sys.exit(main())
