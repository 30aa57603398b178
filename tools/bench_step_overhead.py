"""Per-step overhead of the training step besides its math, counted on CPU: the former path against the current.

    python tools/bench_step_overhead.py                                  # tiny model, 3 steps, DDP optimizer
    python tools/bench_step_overhead.py parallel.use_distributed_optimizer=true
    python tools/bench_step_overhead.py --steps 5 --json

Two identical tiny models (one process, gloo) train on the same generated batches: one through the former step
path (a separate finiteness pass over every gradient buffer with its own all-reduce and sync, two loss syncs), one
through the current. Printed per step: host syncs (calls that block the host until the device queue drains when
the tensor is on a GPU), collectives, aten ops dispatched, and bytes of gradient buffer read by ops; host-side
syncs (the data iterator and the packed-sequence metadata, built on the host) are listed apart. See
genlip_mcore/train/overhead.py for what each count covers. No timings: on CPU they would say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile

try:
    import genlip_mcore  # noqa: F401
except ImportError:  # run from a checkout without installing
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROWS = ("syncs", "collectives", "aten_ops", "grad_bytes_read", "host_syncs")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="config overrides, section.key=value")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    from genlip_mcore import logs
    from genlip_mcore.parallel import init_distributed
    from genlip_mcore.train.overhead import compare

    logs.setup(stream="stderr")
    init_distributed()
    with tempfile.TemporaryDirectory() as tmp:
        out = compare(args.overrides, args.steps, tmp)
    if args.json:
        print(json.dumps(out, indent=1, default=str))
        return 0 if out["identical_results"] else 1
    before, after = out["before"], out["after"]
    keys = list(ROWS) + sorted(k for k in set(before) | set(after) if ":" in k)
    print(f"per training step, tiny model, {args.steps} steps, {' '.join(args.overrides) or 'defaults'}")
    print(f"{'count':44s} {'before':>12s} {'after':>12s} {'after/before':>13s}")
    for k in keys:
        b, a = before.get(k, 0), after.get(k, 0)
        ratio = f"{a / b:.3f}" if b else ("-" if not a else "new")
        print(f"{k:44s} {b:12.1f} {a:12.1f} {ratio:>13s}")
    print(f"losses, grad norms and skips identical: {out['identical_results']}")
    return 0 if out["identical_results"] else 1


if __name__ == "__main__":
    sys.exit(main())
