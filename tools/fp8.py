"""FP8 scaling experiments (plan, run, report, bench over one sweep file): see genlip_mcore/fp8/.

    python tools/fp8.py plan examples/fp8/cpu_sweep.yaml
    python tools/fp8.py run examples/fp8/cpu_sweep.yaml --report
    python tools/fp8.py bench --variant l16 --tp 2
"""

import sys

try:
    import genlip_mcore  # noqa: F401
except ImportError:  # run from a checkout without installing: the repo root is one level up
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from genlip_mcore.fp8.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
