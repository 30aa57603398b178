"""Training metrics: model FLOPs of a packed micro-batch, the device peak for MFU, and the one metrics sink.

Dimensions: L layers, D hidden, F FFN hidden, E text embedding (LM head) width, V vocabulary, H heads, hd head dim;
per sample i of a pack: n_i image tokens, t_i text tokens.

FLOPs are *model* FLOPs (spec §10, training = forward + backward = 3 x forward), the numerator of MFU:
  dense     6 * N_dense * T,  N_dense = L (5 D^2 + 3 D F) + 2 D E (when E != D: the text in/out projections)
  LM head   6 * V * E * n_lm  (the positions whose logits are computed: our model computes them only where a
                               target exists, so pass n_lm = (targets != -100).sum(); default: every token)
  attention 3 * 4 * hd * H * L * sum_i pairs_i,  pairs_i = n_i^2 + t_i n_i + t_i (t_i + 1) / 2
where pairs_i are the (query, key) pairs the prefix-LM rule allows inside sample i (image queries see the sample's
image; text queries see the image and the text up to themselves). T counts every token of the pack, the trailing
text-only padding sample included, and that sample's causal attention is counted too: the kernels compute both, and
a pack's shape is fixed, so this is what the hardware does for a row. The padding share is reported separately.
Activation recompute is not counted (it would make hardware FLOPs, not model FLOPs); nor is the patch embedding
(2 * 768 * D per image token, < 0.1% for g16).

MetricsLogger is the single sink of the training loop. Only the writer rank (last pipeline stage, TP rank 0, DP
rank 0) constructs anything: metrics.jsonl (always), TensorBoard and wandb (when enabled, imported only then), and a
tqdm bar (interactive runs only). Every `log()` also returns the Megatron-style line and emits it at INFO on the
`genlip_mcore.train` logger.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import re
import sys
import uuid
from pathlib import Path
from typing import Any, Optional, Union

from genlip_mcore.config import Config, ModelConfig, to_dict
from genlip_mcore.info import flops_per_token

log = logging.getLogger("genlip_mcore.train")

# Dense bf16 tensor-core peaks, TFLOP/s per device (no sparsity). Looked up by a whole word of the device name, so
# "A10" never matches "A100" and "L40" never matches "L40S". FP8 runs are measured against the bf16 peak too
# (Megatron's convention), so their MFU is comparable with a bf16 run of the same model.
PEAK_TFLOPS_BF16 = {
    "H100": 989.0, "H800": 989.0, "H200": 989.0, "GH200": 989.0,
    "A100": 312.0, "A800": 312.0,
    "L40S": 362.0, "L40": 181.0, "A10": 125.0,
    "B200": 2250.0,
}

REQUIRED_KEYS = ("loss", "lr", "grad_norm", "tokens_per_sec", "samples_per_sec")

# The log line, in order: (metric key, label, format). Missing or None metrics are left out of the line.
LINE_FIELDS = (
    ("consumed_samples", "consumed samples", "{:8d}"),
    ("elapsed_ms_per_iteration", "elapsed time per iteration (ms)", "{:.1f}"),
    ("lr", "learning rate", "{:.3E}"),
    ("loss", "lm loss", "{:.6E}"),
    ("grad_norm", "grad norm", "{:.3f}"),
    ("samples_per_sec", "samples/s", "{:.1f}"),
    ("tokens_per_sec", "tokens/s", "{:,.0f}"),
    ("tflops_per_gpu", "TFLOP/s/GPU", "{:.1f}"),
    ("mfu", "MFU", "percent"),
    ("padding_fraction", "padding", "percent"),
    ("data_wait_fraction", "data wait", "percent"),
    ("skipped", "skipped", "counts"),
    ("nonfinite_skips", "nonfinite skips", "{:d}"),
    ("memory_gib", "mem", "{:.1f} GiB"),
)


# ------------------------------------------------------------------------------------------------------------------
# FLOPs and peak
# ------------------------------------------------------------------------------------------------------------------
def step_flops(model_cfg: ModelConfig, img_lens: list[int], txt_lens: list[int], n_lm: Optional[int] = None) -> float:
    """Training model FLOPs (forward + backward) of one packed micro-batch; see the module docstring.

    img_lens/txt_lens: per sample, padding sample included (the Batch fields). n_lm: positions whose LM-head logits
    are computed; None counts every token (an upper bound: our model computes only positions with a target).
    """
    m = model_cfg
    if len(img_lens) != len(txt_lens):
        raise ValueError(f"step_flops: {len(img_lens)} image lengths for {len(txt_lens)} text lengths")
    tokens = sum(img_lens) + sum(txt_lens)
    n_lm = tokens if n_lm is None else int(n_lm)
    if not 0 <= n_lm <= tokens:
        raise ValueError(f"step_flops: n_lm={n_lm} outside [0, {tokens}] tokens")
    head = m.vocab_size * m.text_embed_dim
    # info.flops_per_token is the spec §10 formula for one sample: its n_eff and its pair count are reused here.
    n_dense = flops_per_token(m, 0, 1)["n_eff"] - head
    pairs = sum(flops_per_token(m, ni, nt)["sample"]["attention_pairs"]
                for ni, nt in zip(img_lens, txt_lens, strict=True) if ni + nt > 0)
    attention = 3 * 4 * m.head_dim * m.num_attention_heads * m.num_layers * pairs
    return float(6 * n_dense * tokens + 6 * head * n_lm + attention)


def peak_for_device(name: str) -> Optional[float]:
    """Dense bf16 TFLOP/s of a device from its name (torch.cuda.get_device_name), None when unknown."""
    words = re.findall(r"[A-Z0-9]+", name.upper())
    for word in words:
        if word in PEAK_TFLOPS_BF16:
            return PEAK_TFLOPS_BF16[word]
    return None


def peak_tflops(cfg_value: Optional[float]) -> Optional[float]:
    """The configured peak (logging.peak_tflops), else the current CUDA device's; None on CPU or an unknown device,
    and then MFU is reported as null rather than against a guessed peak."""
    if cfg_value is not None:
        if not cfg_value > 0:
            raise ValueError(f"logging.peak_tflops: must be > 0, got {cfg_value}")
        return float(cfg_value)
    import torch

    if not torch.cuda.is_available():
        return None
    return peak_for_device(torch.cuda.get_device_name())


def memory_gib() -> float:
    """Peak CUDA memory allocated by this process (GiB) on a GPU; the process resident set size on CPU."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30


# ------------------------------------------------------------------------------------------------------------------
# Values and the log line
# ------------------------------------------------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    """JSON-safe value: tensors and numpy scalars to Python numbers, non-finite floats to None (strict JSON)."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value) if math.isfinite(value) else None
    return str(value)


def _scalars(metrics: dict) -> dict[str, float]:
    """Numeric metrics, dicts flattened one level as `<key>/<sub key>` (skipped/truncated_image)."""
    out = {}
    for k, v in metrics.items():
        items = [(f"{k}/{sk}", sv) for sk, sv in v.items()] if isinstance(v, dict) else [(k, v)]
        for name, x in items:
            if isinstance(x, numbers.Real) and not isinstance(x, bool):
                out[name] = float(x)
    return out


def _field(value: Any, fmt: str) -> str:
    if fmt == "percent":
        return f"{100 * value:.1f}%"
    if fmt == "counts":                                   # {reason: n} -> "3 (truncated_image 2, malformed_json 1)"
        nonzero = sorted(((r, n) for r, n in value.items() if n), key=lambda rn: (-rn[1], rn[0]))
        total = sum(n for _, n in nonzero)
        return f"{total} (" + ", ".join(f"{r} {n}" for r, n in nonzero) + ")" if nonzero else "0"
    if fmt.startswith("{:") and "d}" in fmt:
        value = int(value)
    return fmt.format(value)


def format_validation_line(iteration: int, metrics: dict) -> str:
    """Megatron's validation line ("lm loss value", not the training line's "lm loss"); None values left out."""
    parts = [f" validation loss at iteration {iteration} |"]
    for key, label in (("valid_loss", "lm loss value"), ("valid_ppl", "lm loss PPL")):
        if metrics.get(key) is not None:
            parts.append(f" {label}: {metrics[key]:.6E} |")
    return "".join(parts)


def format_line(iteration: int, total_iters: int, metrics: dict) -> str:
    parts = [f" iteration {iteration:8d}/{total_iters:8d} |"]
    for key, label, fmt in LINE_FIELDS:
        value = metrics.get(key)
        if value is not None:
            parts.append(f" {label}: {_field(value, fmt)} |")
    return "".join(parts)


# ------------------------------------------------------------------------------------------------------------------
# The sink
# ------------------------------------------------------------------------------------------------------------------
class MetricsLogger:
    """metrics.jsonl + optional TensorBoard, wandb and progress bar, on the writer rank only.

    `log(iteration, metrics)` takes the keys of LINE_FIELDS (fractions for mfu/padding/data wait, `skipped` a dict
    reason -> count) and anything else numeric or JSON-able. MFU is filled in from `tflops_per_gpu` and the peak
    when not given, and is null when the peak is unknown. Validation results go through `log_validation`, into rows
    of their own. A resumed run appends to metrics.jsonl (rows after the resumed checkpoint may then appear twice:
    readers keep the last row of each kind per iteration), purges TensorBoard events after `start_iteration`, and
    continues the wandb run whose id is kept in <run_dir>/wandb_id.
    """

    def __init__(self, cfg: Config, run_dir: Union[str, Path], is_writer: bool, total_iters: int,
                 start_iteration: int = 0):
        self.run_dir, self.is_writer, self.total_iters = Path(run_dir), is_writer, total_iters
        self.peak = peak_tflops(cfg.logging.peak_tflops)
        self._jsonl = self._tb = self._wandb = self.bar = None
        if not is_writer:
            return
        lc = cfg.logging
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)    # line-buffered: a crash keeps rows
        if lc.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a previous attempt wrote after the checkpoint we resume from.
            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"),
                                     purge_step=start_iteration + 1 if start_iteration else None)
        if lc.wandb_mode != "disabled":
            self._wandb = self._init_wandb(cfg)
        if lc.progress_bar or (lc.progress_bar is None and sys.stdout.isatty()):
            from tqdm import tqdm

            self.bar = tqdm(total=total_iters, initial=start_iteration, file=sys.stderr, dynamic_ncols=True,
                            unit="it", desc="train")

    def _init_wandb(self, cfg: Config):
        import wandb

        id_file = self.run_dir / "wandb_id"
        if id_file.exists():
            run_id = id_file.read_text().strip()
        else:
            run_id = uuid.uuid4().hex[:16]
            id_file.write_text(run_id + "\n")
        return wandb.init(project=cfg.logging.wandb_project, name=cfg.logging.wandb_name, dir=str(self.run_dir),
                          mode=cfg.logging.wandb_mode, config=to_dict(cfg), id=run_id, resume="allow")

    def log(self, iteration: int, metrics: dict) -> str:
        given = {k: _plain(v) for k, v in metrics.items() if k != "iteration"}   # the step is the argument
        metrics = {**dict.fromkeys(REQUIRED_KEYS), **given}
        if metrics.get("tflops_per_gpu") is not None and "mfu" not in metrics:
            metrics["mfu"] = metrics["tflops_per_gpu"] / self.peak if self.peak else None
        line = format_line(iteration, self.total_iters, metrics)
        if not self.is_writer:
            return line
        self._write(iteration, metrics)
        if self.bar is not None:
            self.bar.update(max(0, iteration - self.bar.n))
            if metrics["loss"] is not None:
                self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
            self.bar.refresh()
        log.info(line)
        return line

    def log_validation(self, iteration: int, metrics: dict) -> str:
        """A validation result (`valid_loss`, `valid_ppl`, `valid_tokens`): a row of its own in metrics.jsonl (no
        training keys: readers tell the two kinds of row apart by `valid_loss`), the same scalars in TensorBoard and
        wandb, and Megatron's validation line framed by rules on the console."""
        metrics = {k: _plain(v) for k, v in metrics.items() if k != "iteration"}
        line = format_validation_line(iteration, metrics)
        if not self.is_writer:
            return line
        self._write(iteration, metrics)
        rule = "-" * len(line)
        for text in (rule, line, rule):
            log.info(text)
        return line

    def _write(self, iteration: int, metrics: dict) -> None:
        """One row of metrics.jsonl, and its numbers to TensorBoard and wandb."""
        self._jsonl.write(json.dumps({"iteration": iteration, **metrics}) + "\n")
        scalars = _scalars(metrics)
        if self._tb is not None:
            for name, value in scalars.items():
                self._tb.add_scalar(name, value, global_step=iteration)
        if self._wandb is not None:
            self._wandb.log(scalars, step=iteration)

    def close(self, exit_code: int = 0) -> None:
        if self.bar is not None:
            self.bar.close()
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish(exit_code=exit_code)
        if self._jsonl is not None:
            self._jsonl.close()
        self._jsonl = self._tb = self._wandb = self.bar = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(exit_code=0 if exc_type is None else 1)
