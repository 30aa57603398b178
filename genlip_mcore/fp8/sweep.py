"""The sweep file of `genlip-fp8`: model sizes x precisions x seeds, expanded into cells and validated up front.

```yaml
base: examples/configs/tiny_cpu.yaml     # any genlip config
overrides: [training.train_iters=60]     # genlip key=value, for every cell
sizes:                                   # name -> config overrides: variants or a width/depth ladder
  w128: {model.hidden_size: 128, model.ffn_hidden_size: 256}
precisions:                              # name -> config overrides
  fp32: {}
  fp8_tensorwise: {precision.fp8: hybrid, precision.fp8_recipe: tensorwise, precision.fp8_backend: emulate}
baseline: fp32                           # the reference precision: its seeds give the noise band
seeds: {fp32: [1, 2, 3], default: [1]}   # per precision name, `default` for the rest; or one list for all
exclude: [w128/fp8_tensorwise]           # cells left out: shell patterns on <size>/<precision>/seed<k>
launcher: local                          # local | slurm
jobs: 2                                  # local: cells run at once
out: runs/fp8_cpu_sweep                  # cell run dirs: <out>/<size>/<precision>/seed<k>/
```

Paths: `base` is looked up relative to the current directory (run the tool from the repository root, like every
genlip command), then relative to the sweep file's folder; `out` and `script` are relative to the current
directory. A size or precision entry is a mapping (or a list of `key=value` strings); keys with a dot are config
overrides, the dot-less keys `world_size` and `sbatch_args` are launch settings of that size or precision.

A cell's overrides are, in order (last wins): the sweep's, the size's, the precision's, then the cell's own
`training.seed` and `training.run_dir`, which the tool owns: a sweep that sets them (or `training.save_dir` or
`training.load_dir`, which would make cells share or reuse checkpoints) is refused. The same seed means the same
data order in every precision: generated packs and shard readers depend only on the seed, the data section and the
batch layout, and `plan` refuses a precision that changes any of those.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from genlip_mcore import config as C

LAUNCHERS = ("local", "slurm")
TOOL_KEYS = ("training.seed", "training.run_dir", "training.save_dir", "training.load_dir")
CELL_SETTINGS = ("world_size", "sbatch_args")
TOP_KEYS = ("base", "overrides", "sizes", "precisions", "baseline", "seeds", "exclude", "launcher", "jobs", "out",
            "gpus_per_node", "sbatch_args", "script")
DEFAULT_SCRIPT = "scripts/pretrain_genlip_g16.sh"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
# What makes two cells of one size and seed see the same rows in the same order (see the module docstring).
_DATA_ORDER_FIELDS = ("training.global_batch_size", "training.micro_batch_size", "model.patch_size",
                      "model.num_channels", "parallel.tensor_model_parallel_size",
                      "parallel.pipeline_model_parallel_size")


class SweepError(ValueError):
    """A sweep file that cannot run; the message names the sweep key or the cell and the config field."""


@dataclass(frozen=True)
class Cell:
    size: str
    precision: str
    seed: int
    overrides: tuple[str, ...]          # config overrides in order, the cell's own keys last
    run_dir: Path
    world_size: int = 1
    sbatch_args: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.size}/{self.precision}/seed{self.seed}"


@dataclass
class Sweep:
    base: Path
    sizes: dict[str, dict[str, Any]]        # name -> {"overrides": [...], "settings": {...}}
    precisions: dict[str, dict[str, Any]]
    baseline: str
    seeds: dict[str, list[int]]             # precision name (or "default") -> seeds
    out: Path
    overrides: list[str] = field(default_factory=list)
    launcher: str = "local"
    jobs: int = 1
    gpus_per_node: int = 8
    sbatch_args: list[str] = field(default_factory=list)
    script: Path = Path(DEFAULT_SCRIPT)
    exclude: list[str] = field(default_factory=list)
    path: Optional[Path] = None

    def seeds_of(self, precision: str) -> list[int]:
        return self.seeds.get(precision, self.seeds.get("default", [1]))

    def to_json(self) -> dict:
        """What `report` needs to read the run dirs on its own (written to <out>/sweep.json by `run`)."""
        return {"sweep_file": str(self.path) if self.path else None, "base": str(self.base),
                "overrides": self.overrides, "sizes": self.sizes, "precisions": self.precisions,
                "baseline": self.baseline, "seeds": self.seeds, "launcher": self.launcher}


# ------------------------------------------------------------------------------------------------------------------
# Reading the sweep file.
# ------------------------------------------------------------------------------------------------------------------
def load_sweep(path: str | Path) -> Sweep:
    path = Path(path)
    try:
        tree = C.read_yaml(path)
    except C.ConfigError as e:
        raise SweepError(str(e)) from None
    return from_dict(tree, path)


def from_dict(tree: dict[str, Any], path: Optional[Path] = None) -> Sweep:
    where = str(path) if path else "sweep"
    unknown = sorted(set(tree) - set(TOP_KEYS))
    if unknown:
        raise SweepError(f"{where}: {unknown[0]}: unknown key; a sweep has {', '.join(TOP_KEYS)}")
    for key in ("base", "sizes", "precisions", "baseline", "out"):
        if tree.get(key) in (None, "", {}, []):
            raise SweepError(f"{where}: {key}: required")
    sizes = _entries(tree["sizes"], "sizes", where)
    precisions = _entries(tree["precisions"], "precisions", where)
    baseline = str(tree["baseline"])
    if baseline not in precisions:
        raise SweepError(f"{where}: baseline: {baseline!r} is not one of the precisions {sorted(precisions)}")
    launcher = tree.get("launcher", "local")
    if launcher not in LAUNCHERS:
        raise SweepError(f"{where}: launcher: {launcher!r}; choose one of {LAUNCHERS}")
    jobs, gpus = tree.get("jobs", 1), tree.get("gpus_per_node", 8)
    for key, value in (("jobs", jobs), ("gpus_per_node", gpus)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SweepError(f"{where}: {key}: must be an integer >= 1, got {value!r}")
    overrides = _overrides(tree.get("overrides") or [], "overrides", where)
    base_dir = path.parent if path else Path.cwd()
    return Sweep(base=_find(str(tree["base"]), base_dir), sizes=sizes, precisions=precisions, baseline=baseline,
                 seeds=_seeds(tree.get("seeds"), precisions, where), out=Path(str(tree["out"])).absolute(),
                 overrides=overrides, launcher=launcher, jobs=jobs, gpus_per_node=gpus,
                 sbatch_args=_strings(tree.get("sbatch_args") or [], "sbatch_args", where),
                 script=Path(str(tree.get("script") or DEFAULT_SCRIPT)),
                 exclude=_strings(tree.get("exclude") or [], "exclude", where), path=path)


def _find(name: str, sweep_dir: Path) -> Path:
    p = Path(name)
    if p.is_absolute() or p.exists() or not (sweep_dir / p).exists():
        return p.absolute()          # a missing file is reported by config.load, naming it
    return (sweep_dir / p).absolute()


def _entries(tree: Any, key: str, where: str) -> dict[str, dict[str, Any]]:
    """name -> {"overrides": [k=v, ...], "settings": {...}}. A list of mappings (the study's form) is named by
    its model.variant, else `<key>{i}`."""
    if isinstance(tree, list):
        named = {}
        for i, entry in enumerate(tree):
            variant = entry.get("model.variant") if isinstance(entry, dict) else None
            named[str(variant) if variant else f"{key.rstrip('s')}{i}"] = entry
        tree = named
    if not isinstance(tree, dict):
        raise SweepError(f"{where}: {key}: expected a mapping of name -> overrides")
    out = {}
    for name, entry in tree.items():
        name = str(name)
        if not _NAME.match(name):
            raise SweepError(f"{where}: {key}.{name}: a name becomes a directory; use letters, digits, _ . + -")
        out[name] = _entry(entry, f"{key}.{name}", where)
    return out


def _entry(entry: Any, key: str, where: str) -> dict[str, Any]:
    if entry is None:
        entry = {}
    if isinstance(entry, list):
        return {"overrides": _overrides(entry, key, where), "settings": {}}
    if not isinstance(entry, dict):
        raise SweepError(f"{where}: {key}: expected a mapping of overrides, got {entry!r}")
    settings = {k: v for k, v in entry.items() if "." not in str(k)}
    for k, v in settings.items():
        if k not in CELL_SETTINGS:
            raise SweepError(f"{where}: {key}.{k}: unknown setting (config overrides are section.key; settings "
                             f"are {', '.join(CELL_SETTINGS)})")
        if k == "world_size" and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise SweepError(f"{where}: {key}.world_size: must be an integer >= 1, got {v!r}")
        if k == "sbatch_args":
            settings[k] = _strings(v, f"{key}.sbatch_args", where)
    items = [f"{k}={render(v)}" for k, v in entry.items() if "." in str(k)]
    return {"overrides": _overrides(items, key, where), "settings": settings}


def _overrides(items: Any, key: str, where: str) -> list[str]:
    if isinstance(items, dict):
        items = [f"{k}={render(v)}" for k, v in items.items()]
    items = _strings(items, key, where)
    for item in items:
        name, sep, _ = item.partition("=")
        if not sep or "." not in name:
            raise SweepError(f"{where}: {key}: {item!r} is not section.key=value")
        if name.strip() in TOOL_KEYS:
            raise SweepError(f"{where}: {key}: {name} is set by genlip-fp8 for each cell (seeds come from `seeds`, "
                             f"run dirs from `out`)")
    return items


def _strings(items: Any, key: str, where: str) -> list[str]:
    if not isinstance(items, list) or not all(isinstance(x, (str, int, float)) for x in items):
        raise SweepError(f"{where}: {key}: expected a list of strings")
    return [str(x) for x in items]


def _seeds(tree: Any, precisions: dict, where: str) -> dict[str, list[int]]:
    if tree is None:
        tree = {"default": [1]}
    if isinstance(tree, list):
        tree = {"default": tree}
    if not isinstance(tree, dict):
        raise SweepError(f"{where}: seeds: a list, or a mapping of precision name (or default) -> list")
    out = {}
    for name, seeds in tree.items():
        if name != "default" and name not in precisions:
            raise SweepError(f"{where}: seeds.{name}: not a precision of this sweep ({sorted(precisions)})")
        seeds = seeds if isinstance(seeds, list) else [seeds]
        if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**31 for s in seeds):
            raise SweepError(f"{where}: seeds.{name}: a non-empty list of integers in [0, 2**31)")
        if len(set(seeds)) != len(seeds):
            raise SweepError(f"{where}: seeds.{name}: {seeds} repeats a seed")
        out[str(name)] = list(seeds)
    return out


def render(value: Any) -> str:
    """A YAML value as the right-hand side of a `key=value` override that config.load parses back to it."""
    if isinstance(value, str):
        return value if C._parse_scalar(value) == value else json.dumps(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)


# ------------------------------------------------------------------------------------------------------------------
# Cells and the plan.
# ------------------------------------------------------------------------------------------------------------------
def cells(sweep: Sweep) -> list[Cell]:
    """Every (size, precision, seed), sizes outermost, in the sweep file's order."""
    out = []
    for size, s in sweep.sizes.items():
        for precision, p in sweep.precisions.items():
            settings = {**s["settings"], **p["settings"]}
            for seed in sweep.seeds_of(precision):
                if any(fnmatch.fnmatchcase(f"{size}/{precision}/seed{seed}", pat) or
                       fnmatch.fnmatchcase(f"{size}/{precision}", pat) for pat in sweep.exclude):
                    continue
                run_dir = sweep.out / size / precision / f"seed{seed}"
                own = [f"training.seed={seed}", f"training.run_dir={run_dir}"]
                out.append(Cell(size=size, precision=precision, seed=seed,
                                overrides=tuple(sweep.overrides + s["overrides"] + p["overrides"] + own),
                                run_dir=run_dir, world_size=settings.get("world_size", 0),
                                sbatch_args=tuple(sweep.sbatch_args + s["settings"].get("sbatch_args", [])
                                                  + p["settings"].get("sbatch_args", []))))
    return out


@dataclass
class Planned:
    cell: Cell
    cfg: C.Config


def plan(sweep: Sweep) -> list[Planned]:
    """Every cell's config loaded and validated (config.load: YAML, overrides, validate at the cell's world size),
    and the data order checked across precisions. All errors are gathered into one SweepError, one line each."""
    planned, errors = [], []
    for cell in cells(sweep):
        try:
            cfg = C.load(sweep.base, list(cell.overrides))
            world = cell.world_size or model_parallel_size(cfg)
            C.validate(cfg, world_size=world)
        except C.ConfigError as e:
            errors.append(f"{cell.name}: {e}")
            continue
        if sweep.launcher == "slurm" and world % nodes_for(world, sweep.gpus_per_node):
            errors.append(f"{cell.name}: world_size: {world} ranks do not fill whole nodes of gpus_per_node="
                          f"{sweep.gpus_per_node} evenly")
            continue
        cell = dataclasses.replace(cell, world_size=world)
        planned.append(Planned(cell, cfg))
    if not errors:
        errors = _data_order_errors(planned, sweep.baseline)
    if errors:
        raise SweepError("\n".join(errors))
    return planned


def model_parallel_size(cfg: C.Config) -> int:
    """The smallest world a config runs on (data parallel 1): the default world size of a cell."""
    p = cfg.parallel
    return p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size


def _get(cfg: C.Config, dotted: str) -> Any:
    section, name = dotted.split(".")
    return getattr(getattr(cfg, section), name)


def _data_order_errors(planned: list[Planned], baseline: str) -> list[str]:
    """Cells of one size and seed must see the same rows in the same order, or their gap is not FP8's."""
    errors, ref = [], {}
    for p in planned:
        key = (p.cell.size, p.cell.seed)
        if p.cell.precision == baseline or key not in ref:
            ref.setdefault(key, p)
    for p in planned:
        r = ref[(p.cell.size, p.cell.seed)]
        if r is p:
            continue
        diffs = [f for f in _DATA_ORDER_FIELDS if _get(p.cfg, f) != _get(r.cfg, f)]
        diffs += [f"data.{k}" for k, v in vars(p.cfg.data).items() if getattr(r.cfg.data, k) != v]
        if diffs:
            errors.append(f"{p.cell.name}: {diffs[0]}: differs from {r.cell.name}; a precision must not change the "
                          f"data order (data section, batch sizes, patch size, TP/PP)")
    return errors


def gpu_hours(cfg: C.Config, world_size: int, mfu: float = 0.35, peak_tflops: float = 989.0) -> float:
    """Rough GPU-hours of one cell: model FLOPs of its tokens (info.flops_per_token on a stage-1 sample) at `mfu`
    of the bf16 peak. Good for sizing a sweep, not for a budget."""
    from genlip_mcore.info import DEFAULT_SAMPLE, flops_per_token

    t = cfg.training
    tokens = t.train_iters * t.global_batch_size * cfg.data.max_seq_len
    flops = flops_per_token(cfg.model, *DEFAULT_SAMPLE)["flops_per_token"] * tokens
    seconds = flops / (world_size * peak_tflops * 1e12 * mfu)
    return world_size * seconds / 3600


def format_plan(sweep: Sweep, planned: list[Planned], mfu: float = 0.35) -> str:
    t0 = planned[0].cfg.training if planned else None
    lines = [f"sweep {sweep.path or '-'}: base {sweep.base}, baseline {sweep.baseline}, launcher {sweep.launcher}"
             + (f", {sweep.jobs} at once" if sweep.launcher == "local" else "") + f", out {sweep.out}"]
    if t0:
        lines.append(f"{len(planned)} cells, all valid")
    header = f"{'cell':40} {'world':>5} {'L x D / F':>14} {'fp8':<30} {'iters':>6} {'tokens':>10}"
    if sweep.launcher == "slurm":
        header += f" {'GPU-h':>8}"
    lines += ["", header]
    total = 0.0
    for p in planned:
        m, pr, t = p.cfg.model, p.cfg.precision, p.cfg.training
        fp8 = "-" if pr.fp8 is None else f"{pr.fp8}/{pr.fp8_recipe}/{C.fp8_backend(pr, m)}"
        if pr.fp8 is not None and pr.first_last_layers_bf16:
            fp8 += f" hp{pr.num_layers_at_start_in_bf16}+{pr.num_layers_at_end_in_bf16}"
        tokens = t.train_iters * t.global_batch_size * p.cfg.data.max_seq_len
        row = (f"{p.cell.name:40} {p.cell.world_size:5d} {f'{m.num_layers}x{m.hidden_size}/{m.ffn_hidden_size}':>14} "
               f"{fp8:<30} {t.train_iters:6d} {_si(tokens):>10}")
        if sweep.launcher == "slurm":
            hours = gpu_hours(p.cfg, p.cell.world_size, mfu)
            total += hours
            row += f" {hours:8.1f}"
        lines.append(row)
    if any(p.cfg.precision.fp8 and p.cfg.precision.first_last_layers_bf16 for p in planned):
        lines += ["(fp8 ... hpA+B: the first A and the last B transformer layers stay in high precision)"]
    if sweep.launcher == "slurm":
        lines += ["", f"about {total:,.0f} GPU-hours in all, at {100 * mfu:.0f}% MFU of 989 TFLOP/s (H100 bf16 dense): "
                      f"model FLOPs of a 196-image + 74-text-token sample; a sizing estimate, not a budget"]
    return "\n".join(lines)


def _si(n: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:g}"


def nodes_for(world_size: int, gpus_per_node: int) -> int:
    return max(1, math.ceil(world_size / gpus_per_node))
