"""FP8 statistics of Transformer Engine runs (fp8_backend=te), written to fp8_stats.jsonl in the emulator's schema.

On the TE path the FP8 casts happen inside TE's kernels, so the statistics come from TE's own debug features, driven
by nvdlfw-inspect (PyPI `nvdlfw-inspect`, optional; only on clusters with TE):
- `LogFp8TensorStats`: underflows%, scale_inv_min, scale_inv_max, mse, and overflows% (TE computes it for delayed
  scaling only), of the recipe the run trains with;
- `LogTensorStats`: cur_amax (the high-precision tensor's max |x|).
for the activation, weight and gradient of every block linear (linear_qkv, linear_proj, linear_fc1, linear_fc2), every
`logging.fp8_stats_interval` iterations. TE reduces them over the ranks that share a layer (the tensor-and-data
parallel group here; weights over TP) when `debug_api.step()` runs.

Mapping to the schema (`model.fp8.stats`): amax = cur_amax; scale = 1 / scale_inv (scale_min = 1 / scale_inv_max,
scale_max = 1 / scale_inv_min); `scale` itself only for per-tensor recipes, where min and max are the one scale (TE
gives no median block scale); MXFP8's scale_inv is logged as E8M0 bytes (biased exponents), so scale = 2^(127 - byte);
overflow_pct on delayed scaling only; kurtosis and numel are not among TE's stats and stay null. `fp8` is true where
TE logged FP8 statistics for the tensor (a layer kept in high precision, by first_last_layers_bf16 or a quant_recipe,
only has amax). `dtype`: e5m2 for gradients under the hybrid format, else e4m3.

Use (the train loop; B's hook):

    hook = te_stats.init(cfg, run_dir)     # BEFORE the model is built: TE modules read the debug state at __init__
    ...build, wrap, load...
    if hook: hook.attach(chunks, start_iteration)
    for it in ...: train_step(...); hook and hook.step(it)
    hook and hook.close()

`convert_logs` turns the statistics files of nvdlfw-inspect's default file logger
(`<log_dir>/nvdlfw_inspect_statistics_logs/nvdlfw_inspect_globalrank-<r>.log`) into the same rows, for TE runs made
outside genlip (Megatron-LM, NeMo); note that logger prints 4 decimals, which rounds small scale_inv and mse values.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Optional

from genlip_mcore.config import Config, ConfigError, fp8_backend

log = logging.getLogger(__name__)

TENSORS = ("activation", "weight", "gradient")
GEMMS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
SECTION = "genlip_fp8_stats"
# Megatron module paths as nvdlfw-inspect names them (`infer_and_assign_layer_names`: "model." + the path, with a
# ModuleList child named by its `layer_number`, which Megatron makes global and 1-based).
LAYER_PATTERN = r"decoder\.layers\.\d+\.(self_attention\.linear_(qkv|proj)|mlp\.linear_fc[12])$"
# TE's recipe names in its statistics (for reading names that carry a recipe prefix).
TE_RECIPES = {"delayed": "fp8_delayed_scaling", "tensorwise": "fp8_current_scaling",
              "blockwise": "fp8_block_scaling", "mxfp8": "mxfp8"}
PER_TENSOR = ("delayed", "tensorwise")
ROW_KEYS = ("iteration", "layer", "gemm", "tensor", "fp8", "recipe", "dtype", "amax", "scale", "scale_min",
            "scale_max", "underflow_pct", "overflow_pct", "mse", "kurtosis", "numel")
FP8_STATS = ("underflows%", "overflows%", "scale_inv_min", "scale_inv_max", "mse")

# "<layer>_<tensor>_<stat>", the name TE's stats buffer logs under
_NAME = re.compile(r"decoder\.layers\.(?P<layer>\d+)\.(?:self_attention|mlp)\.(?P<gemm>" + "|".join(GEMMS) + r")_"
                   r"(?P<tensor>" + "|".join(TENSORS) + r")_(?P<stat>\S+)$")
# a line of nvdlfw-inspect's FileLogger: "<time> - INFO - <name> \t\t\t\t iteration=000010 \t\t\t\t value=0.1234"
_LINE = re.compile(r"(?P<name>\S+)\s+iteration=(?P<iteration>\d+)\s+value=(?P<value>\S+)\s*$")


# ------------------------------------------------------------------------------------------------------------------
# The debug config
# ------------------------------------------------------------------------------------------------------------------
def debug_config(recipe: str, interval: int, fp8_param: bool = False) -> dict:
    """nvdlfw-inspect's YAML (as a dict) for our statistics of the block linears under `recipe`."""
    fp8_stats = ["underflows%", "scale_inv_min", "scale_inv_max", "mse"]
    if recipe == "delayed":
        fp8_stats.append("overflows%")                    # TE rejects overflows% for every other recipe
    # FP8 parameters: TE has no high-precision weight to compare with, only its scales
    weight_stats = ["scale_inv_min", "scale_inv_max"] if fp8_param else fp8_stats
    return {SECTION: {
        "enabled": True,
        "layers": {"layer_name_regex_pattern": LAYER_PATTERN},
        "transformer_engine": {
            "LogTensorStats": {"enabled": True, "tensors": list(TENSORS), "stats": ["cur_amax"], "freq": interval},
            "LogFp8TensorStats": {"enabled": True, "freq": interval, "tensors_struct": [
                {"tensor": t, "stats": list(weight_stats if t == "weight" else fp8_stats), "freq": interval}
                for t in TENSORS]},
        },
    }}


def write_debug_config(path: Path, recipe: str, interval: int, fp8_param: bool = False) -> Path:
    """Write the YAML atomically (every rank writes the same text to the same place)."""
    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(yaml.safe_dump(debug_config(recipe, interval, fp8_param), sort_keys=False))
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------------------------------------
# Logged scalars -> fp8_stats.jsonl rows
# ------------------------------------------------------------------------------------------------------------------
def parse_name(name: str) -> Optional[tuple[int, str, str, str]]:
    """(layer, gemm, tensor, stat) of a logged statistic's name; None for names of other layers or tensors."""
    m = _NAME.search(name)
    if m is None:
        return None
    return int(m["layer"]), m["gemm"], m["tensor"], m["stat"]


def _plain_stat(stat: str, recipe: str) -> str:
    """A stat name without the recipe prefix TE allows ("fp8_current_scaling_mse" -> "mse")."""
    prefix = TE_RECIPES.get(recipe, "") + "_"
    return stat[len(prefix):] if stat.startswith(prefix) else stat


def _scale(scale_inv: Optional[float], recipe: str) -> Optional[float]:
    if scale_inv is None or not math.isfinite(scale_inv):
        return None
    if recipe == "mxfp8":                                  # an E8M0 byte: scale_inv = 2^(byte - 127)
        return 2.0 ** (127 - scale_inv)
    return 1.0 / scale_inv if scale_inv > 0 else None      # 0: a value the 4-decimal file format rounded away


def rows_from_scalars(scalars: Iterable[tuple[str, int, float]], recipe: str, fp8_format: str) -> list[dict]:
    """fp8_stats.jsonl rows from (name, iteration, value) triples, one row per iteration x layer x GEMM x tensor,
    in the order the emulator writes them. A statistic seen twice (several ranks' files) keeps its first value."""
    groups: dict[tuple, dict[str, float]] = defaultdict(dict)
    for name, iteration, value in scalars:
        key = parse_name(name)
        if key is None:
            continue
        layer, gemm, tensor, stat = key
        groups[(int(iteration), layer, gemm, tensor)].setdefault(_plain_stat(stat, recipe), float(value))
    rows = []
    for (iteration, layer, gemm, tensor), st in sorted(
            groups.items(), key=lambda kv: (kv[0][0], kv[0][1], GEMMS.index(kv[0][2]), TENSORS.index(kv[0][3]))):
        fp8 = any(s in st for s in FP8_STATS)
        inv_min, inv_max = st.get("scale_inv_min"), st.get("scale_inv_max")
        scale_min, scale_max = _scale(inv_max, recipe), _scale(inv_min, recipe)
        per_tensor = recipe in PER_TENSOR and scale_min is not None and scale_min == scale_max
        dtype = ("e5m2" if fp8_format == "hybrid" and tensor == "gradient" else "e4m3") if fp8 else None
        rows.append({"iteration": iteration, "layer": layer, "gemm": gemm, "tensor": tensor, "fp8": fp8,
                     "recipe": recipe if fp8 else None, "dtype": dtype, "amax": st.get("cur_amax"),
                     "scale": scale_min if per_tensor else None, "scale_min": scale_min, "scale_max": scale_max,
                     "underflow_pct": st.get("underflows%"), "overflow_pct": st.get("overflows%"),
                     "mse": st.get("mse"), "kurtosis": None, "numel": None})
    return rows


def read_log(path: Path) -> list[tuple[str, int, float]]:
    """(name, iteration, value) of every statistic line in one nvdlfw-inspect statistics file."""
    out = []
    for line in Path(path).read_text(errors="replace").splitlines():
        m = _LINE.search(line)
        if m:
            try:
                out.append((m["name"], int(m["iteration"]), float(m["value"])))
            except ValueError:
                continue
    return out


def convert_logs(paths: Iterable[Path], recipe: str, fp8_format: str) -> list[dict]:
    """Rows from the statistics files of every rank (ranks of other pipeline stages hold other layers)."""
    scalars = [s for p in paths for s in read_log(p)]
    return rows_from_scalars(scalars, recipe, fp8_format)


def append_rows(rows: list[dict], path: Path) -> None:
    if not rows:
        return
    with open(path, "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))


# ------------------------------------------------------------------------------------------------------------------
# The training hook
# ------------------------------------------------------------------------------------------------------------------
def te_feature_dir() -> str:
    """Transformer Engine's debug features (`transformer_engine/debug/features`), which nvdlfw-inspect loads."""
    import importlib.util

    spec = importlib.util.find_spec("transformer_engine")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("precision.fp8_backend: te statistics need Transformer Engine, which is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "debug" / "features"
    if not path.is_dir():
        raise ConfigError(f"logging.fp8_stats_interval: this Transformer Engine has no debug features ({path}); "
                          f"FP8 statistics on fp8_backend=te need TE 2.2 or later")
    return str(path)


def _collector():
    """A statistics logger for nvdlfw-inspect that keeps every value at full precision in memory."""
    from nvdlfw_inspect.logging import BaseLogger

    class Collector(BaseLogger):
        def __init__(self):
            super().__init__()
            self.scalars: list[tuple[str, int, float]] = []

        def log_scalar(self, name, value, iteration, **kwargs):
            self.scalars.append((name, int(iteration), float(value)))

        def drain(self) -> list[tuple[str, int, float]]:
            out, self.scalars = self.scalars, []
            return out

    return Collector()


class TEStats:
    """The live hook of one run (one per process; nvdlfw-inspect is process-global)."""

    def __init__(self, cfg: Config, run_dir: Path, api, collector):
        self.recipe, self.fp8_format = cfg.precision.fp8_recipe, cfg.precision.fp8
        self.interval = cfg.logging.fp8_stats_interval
        self.out = Path(run_dir) / "fp8_stats.jsonl"
        self.api, self.collector = api, collector
        self.pending: list[tuple[str, int, float]] = []

    def attach(self, chunks, start_iteration: int) -> None:
        """Name the built model's modules for the debug config, set the reduction group and the iteration counter
        (the next step is `start_iteration + 1`, as the loop numbers steps)."""
        self.api.infer_and_assign_layer_names(list(chunks))
        if _parallel():
            from megatron.core import parallel_state as ps

            # ranks holding the same layers: under PP a world-wide reduction would pair different layers' buffers
            self.api.set_tensor_reduction_group(ps.get_tensor_and_data_parallel_group(with_context_parallel=True))
        self.api.initialize_training_step(start_iteration + 1)

    def step(self, iteration: int) -> None:
        """After train_step of `iteration` (every rank): TE reduces and logs that step's statistics here; every
        `interval` steps the rows go to fp8_stats.jsonl (on the writer rank)."""
        self.api.step()
        self.pending += self.collector.drain()
        if iteration % self.interval == 0:
            self._flush()

    def close(self, flush: bool = True) -> None:
        """Write what is pending and stop nvdlfw-inspect. flush=False when leaving on an error: the pipeline
        stages' gather would wait for ranks that may be gone."""
        self.pending += self.collector.drain()
        if flush:
            self._flush()
        self.api.end_debug()

    def _flush(self) -> None:
        """Rows of every pipeline stage to global rank 0. Within a stage, TE has reduced the statistics over the
        tensor-and-data-parallel group, so that group's first rank speaks for the stage."""
        rows = rows_from_scalars(self.pending, self.recipe, self.fp8_format)
        self.pending = []
        if not _parallel():
            append_rows(rows, self.out)
            return
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        if ps.get_tensor_model_parallel_rank() != 0 or ps.get_data_parallel_rank(with_context_parallel=True) != 0:
            return
        if ps.get_pipeline_model_parallel_world_size() > 1:
            group = ps.get_pipeline_model_parallel_group()
            gathered = [None] * dist.get_world_size(group) if dist.get_rank() == 0 else None
            dist.gather_object(rows, gathered, dst=0, group=group)
            if dist.get_rank() != 0:
                return
            rows = sorted((r for part in gathered for r in part),
                          key=lambda r: (r["iteration"], r["layer"], GEMMS.index(r["gemm"]),
                                         TENSORS.index(r["tensor"])))
        if dist.get_rank() == 0:
            append_rows(rows, self.out)


def _parallel() -> bool:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    return dist.is_available() and dist.is_initialized() and ps.model_parallel_is_initialized()


def init(cfg: Config, run_dir: Path) -> Optional[TEStats]:
    """Start nvdlfw-inspect with our debug config when this run logs FP8 statistics on fp8_backend=te; None
    otherwise. Every rank, before the model is built."""
    pr = cfg.precision
    if pr.fp8 is None or not cfg.logging.fp8_stats_interval or fp8_backend(pr, cfg.model) != "te":
        return None
    try:
        import nvdlfw_inspect.api as debug_api
    except ImportError:
        raise ConfigError("logging.fp8_stats_interval: on fp8_backend=te the FP8 statistics come from "
                          "nvdlfw-inspect, which is not installed (pip install nvdlfw-inspect)") from None
    where = Path(run_dir) / "nvdlfw_inspect"
    config_file = write_debug_config(where / "te_debug.yaml", pr.fp8_recipe, cfg.logging.fp8_stats_interval,
                                     pr.fp8_param)
    collector = _collector()
    debug_api.initialize(config_file=str(config_file), feature_dirs=[te_feature_dir()],
                         statistics_logger=collector, log_dir=str(where))
    log.info(f"FP8 statistics from Transformer Engine (nvdlfw-inspect, {config_file}) every "
             f"{cfg.logging.fp8_stats_interval} iterations to {Path(run_dir) / 'fp8_stats.jsonl'}")
    return TEStats(cfg, run_dir, debug_api, collector)
