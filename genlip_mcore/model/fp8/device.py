"""Can this machine run the configured FP8 recipe? One check before any work, one line naming the field.

`config.validate` knows only the config; the device is known on the node a rank lands on. Without this check a
recipe the GPU lacks fails deep inside the first forward (a TE assertion, a cuBLASLt error, torch._scaled_mm's
capability check), after the model and the data are built. The minimum compute capability per backend and recipe:

| backend | recipe                        | needs                      | source                                   |
|---------|-------------------------------|----------------------------|------------------------------------------|
| te      | delayed, tensorwise           | SM89 (Ada) or later        | FP8 tensor cores                         |
| te      | blockwise                     | SM90 (Hopper) or later     | TE fp8_blockwise_scaling.rst (SM100: MX) |
| te      | mxfp8                         | SM100 (Blackwell) or later | TE mxfp8.rst                             |
| torchao | tensorwise, rowwise (on CUDA) | SM89 or later              | torch._scaled_mm                         |
| torchao | any (on CPU)                  | nothing                    | torch's CPU _scaled_mm (slow; checks)    |
| emulate | any                           | nothing                    | plain matmuls on FP8-rounded values      |

Transformer Engine has no CPU path at all. FP8 statistics of a TE run (logging.fp8_stats_interval) come from
nvdlfw-inspect (`te_stats`), an optional package checked here too, so a missing one fails before the model is built.
`preflight.run` calls `check_device(cfg)`.
"""

from __future__ import annotations

import importlib.util

from genlip_mcore.config import Config, ConfigError, fp8_backend

# (backend, recipe) -> minimum (major, minor) compute capability on CUDA; a backend missing here runs anywhere.
MIN_CAPABILITY = {
    ("te", "delayed"): (8, 9),
    ("te", "tensorwise"): (8, 9),
    ("te", "blockwise"): (9, 0),
    ("te", "mxfp8"): (10, 0),
    ("torchao", "tensorwise"): (8, 9),
    ("torchao", "rowwise"): (8, 9),
}
ARCH = {(8, 9): "Ada", (9, 0): "Hopper", (10, 0): "Blackwell"}


def check_device(cfg: Config) -> None:
    """Raise ConfigError when precision.fp8_recipe cannot run on precision.fp8_backend on this machine."""
    pr = cfg.precision
    if pr.fp8 is None:
        return
    backend = fp8_backend(pr, cfg.model)
    if backend == "emulate":
        return
    if backend == "te" and cfg.logging.fp8_stats_interval and importlib.util.find_spec("nvdlfw_inspect") is None:
        raise ConfigError("logging.fp8_stats_interval: on fp8_backend=te the FP8 statistics come from Transformer "
                          "Engine's debug features through nvdlfw-inspect, which is not installed (pip install "
                          "nvdlfw-inspect; or set logging.fp8_stats_interval=0)")
    import torch

    if not torch.cuda.is_available():
        if backend == "te":
            raise ConfigError("precision.fp8_backend: te runs FP8 in Transformer Engine, which needs a CUDA GPU; this "
                              "machine has none (fp8_backend=emulate runs the same recipes anywhere)")
        return                                        # torchao on CPU: torch's CPU _scaled_mm, slow but correct
    need = MIN_CAPABILITY.get((backend, pr.fp8_recipe))
    if need is None:
        return
    have = tuple(torch.cuda.get_device_capability())
    if have < need:
        arch = ARCH.get(need, "")
        raise ConfigError(
            f"precision.fp8_recipe: {pr.fp8_recipe} on fp8_backend={backend} needs compute capability "
            f"{need[0]}.{need[1]} ({arch}) or later; {torch.cuda.get_device_name()} is {have[0]}.{have[1]} "
            f"(fp8_backend=emulate runs it on any device)")
