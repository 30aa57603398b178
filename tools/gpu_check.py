"""The GPU check: correctness, attention kernels, training throughput and memory, the loader, FP8, in one report.

    bash scripts/gpu_check.sh --out DIR              # on the GPU machine (installs the carried .whl/ wheels first)
    bash scripts/gpu_check.sh --smoke --out DIR      # CPU, tiny sizes, the project's .venv (CI runs this)
    python tools/gpu_check.py --out DIR --only throughput --budgets throughput:g16=120

Writes DIR/gpu_report.json and DIR/gpu_report.md (and logs/, jobs/). The driver and the other stages live in
genlip_mcore/gpucheck. The throughput stage lives here because it runs the training step itself:
genlip_mcore.train may import the rest of the package but nothing in the package imports it (architecture.md §2,
tests/unit/test_imports.py), so this script, like `genlip-pretrain`, sits above both.

Throughput (one job per variant, one GPU, bf16, TP=PP=1 in a one-rank NCCL world): the variant at full depth with
the recompute and optimizer settings of its examples/configs/<variant>_stage1.yaml, but the local layer spec (no
Transformer Engine on the device), built once; then for a stage-1-like and a stage-2-like packed row
(genlip_mcore/gpucheck/packs.py) and each attention backend: warm-up steps, timed steps (median), one profiled
step. Every step is `train.step.train_step`, the loop's own step: Megatron's schedule, the finite check, the
optimizer and the LR schedule. The backend is switched on the built model (PrefixLMAttention reads it per call).
"""

from __future__ import annotations

import itertools
import statistics
import sys
import time
from pathlib import Path

try:
    import genlip_mcore  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from genlip_mcore.gpucheck import harness, stages

ROOT = Path(__file__).resolve().parents[1]
# The optimizer/DDP settings a one-GPU run keeps from the example configs (TP and SP are dropped: one GPU).
PARALLEL_KEYS = ("use_distributed_optimizer", "overlap_grad_reduce", "overlap_param_gather")
RECOMPUTE_KEYS = ("recompute_granularity", "recompute_method", "recompute_num_layers")


def example_settings(variant: str) -> tuple[dict, dict]:
    """(model recompute fields, parallel optimizer fields) of examples/configs/<variant>_stage1.yaml; empty for a
    variant without one (tiny)."""
    import yaml

    path = ROOT / "examples" / "configs" / f"{variant}_stage1.yaml"
    if not path.exists():
        return {}, {}
    tree = yaml.safe_load(path.read_text())
    model, par = tree.get("model") or {}, tree.get("parallel") or {}
    return ({k: model[k] for k in RECOMPUTE_KEYS if k in model},
            {k: par[k] for k in PARALLEL_KEYS if k in par})


def build_config(variant: str, tokens: int):
    from genlip_mcore import config as C

    recompute, par = example_settings(variant)
    cfg = C.Config(model=C.model_config(variant, transformer_impl="local", attention_backend="local", **recompute),
                   parallel=C.ParallelConfig(**par), precision=C.PrecisionConfig(bf16=True),
                   data=C.DataConfig(max_seq_len=tokens),
                   training=C.TrainingConfig(micro_batch_size=1, global_batch_size=1, train_iters=1000, seed=1234))
    return C.validate(cfg, world_size=1)


def set_backend(chunks: list, backend: str) -> None:
    from genlip_mcore.model.attention import PrefixLMAttention

    mods = [m for c in chunks for m in c.modules() if isinstance(m, PrefixLMAttention)]
    if not mods:
        raise RuntimeError("no PrefixLMAttention module in the model")
    for m in mods:
        m.backend = backend


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def profiled_step(step, on_cuda: bool) -> tuple[dict, object]:
    """One step under torch.profiler, in the ranges that profile.py reads: the step, and the update in it (opened
    by train_step itself)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from genlip_mcore.gpucheck.profile import STEP_RANGE, breakdown

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    _sync()
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        with record_function(STEP_RANGE):
            result = step()
        _sync()
        ms = 1e3 * (time.perf_counter() - t0)
    return breakdown(prof, ms, on_cuda), result


def measure(chunks, optimizer, scheduler, batch, cfg, sizes: dict, peak_tflops) -> dict:
    import torch

    from genlip_mcore.data.batch import IGNORE_INDEX
    from genlip_mcore.gpucheck.packs import describe
    from genlip_mcore.train.metrics import memory_gib, step_flops
    from genlip_mcore.train.step import step_shape, train_step

    on_cuda = torch.cuda.is_available()
    shape = step_shape(cfg, dp_size=1)
    data = itertools.repeat(batch)

    def step():
        return train_step(chunks, optimizer, scheduler, data, **shape)

    results = [step() for _ in range(sizes["warmup"])]
    if on_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(sizes["steps"]):
        _sync()
        t0 = time.perf_counter()
        results.append(step())
        _sync()
        times.append(1e3 * (time.perf_counter() - t0))
    peak_gib = memory_gib()            # CUDA: peak allocated over the timed steps; CPU: the process RSS now
    prof, last = profiled_step(step, on_cuda)
    results.append(last)
    ms = statistics.median(times)
    n_lm = int((batch.targets != IGNORE_INDEX).sum())
    flops = step_flops(cfg.model, batch.img_lens, batch.txt_lens, n_lm=n_lm)
    tflops = flops / (ms / 1e3) / 1e12
    real = batch.num_tokens - describe(batch)["padding_tokens"]
    return {"ms_per_step": ms, "ms_all": times, "tokens_per_s": batch.num_tokens / ms * 1e3,
            "real_tokens_per_s": real / ms * 1e3, "samples_per_s": batch.num_samples / ms * 1e3,
            "model_tflop_per_step": flops / 1e12, "tflops": tflops,
            "mfu": tflops / peak_tflops if peak_tflops else None, "peak_memory_gib": peak_gib,
            "memory_basis": "torch.cuda.max_memory_allocated over the timed steps" if on_cuda else "process RSS",
            "losses": [r.loss for r in results], "updates": [r.update_successful for r in results],
            "profile": prof}


def throughput(params: dict, rec: harness.Recorder) -> None:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from genlip_mcore.gpucheck.packs import KINDS, describe, make_batch
    from genlip_mcore.model import build_model_chunks
    from genlip_mcore.parallel import init_distributed, setup_model_parallel
    from genlip_mcore.train.metrics import peak_for_device
    from genlip_mcore.train.optim import build_optimizer, build_scheduler, wrap_chunks

    s, variant = params["sizes"], params["variant"]
    on_cuda = torch.cuda.is_available()
    cfg = build_config(variant, s["tokens"])
    peak = peak_for_device(torch.cuda.get_device_name()) if on_cuda else None
    rec.data.update(variant=variant, device=stages.device_name(), tokens=s["tokens"], precision="bf16",
                    recompute={k: getattr(cfg.model, k) for k in RECOMPUTE_KEYS},
                    parallel={k: getattr(cfg.parallel, k) for k in PARALLEL_KEYS}, peak_tflops_bf16=peak,
                    runs=[])
    if peak is None:
        rec.data["mfu_note"] = "no bf16 peak known for this device (train/metrics.py PEAK_TFLOPS_BF16): MFU is null"
    rec.save()
    t0 = time.perf_counter()
    init_distributed()
    try:
        setup_model_parallel(cfg.parallel, cfg.training.seed)
        chunks = wrap_chunks(cfg, build_model_chunks(cfg))
        optimizer = build_optimizer(cfg, chunks)
        scheduler = build_scheduler(cfg, optimizer)
        rec.data.update(world=f"1 rank, {dist.get_backend()}", build_s=time.perf_counter() - t0,
                        parameters=sum(p.numel() for c in chunks for p in c.parameters()),
                        static_memory_gib=torch.cuda.memory_allocated() / 2**30 if on_cuda else None)
        rec.save()
        problems = []
        for i, kind in enumerate(KINDS):
            batch = make_batch(kind, s["tokens"], vocab_size=cfg.model.vocab_size, patch_dim=cfg.model.patch_dim,
                               seed=i)
            for backend in s["backends"]:
                run = {"pack": kind, "backend": backend, "row": describe(batch)}
                if backend == "flex" and not on_cuda:
                    run["skipped"] = stages.FLEX_NEEDS_CUDA
                else:
                    try:
                        set_backend(chunks, backend)
                        run.update(measure(chunks, optimizer, scheduler, batch, cfg, s, peak))
                        if not all(run["updates"]):
                            problems.append(f"{kind} {backend}: a step was skipped (non-finite loss or gradient)")
                    except Exception as e:        # recorded; the other backend and pack still run
                        run["error"] = f"{type(e).__name__}: {e}"
                        problems.append(f"{kind} {backend}: {run['error']}")
                        if on_cuda:
                            torch.cuda.empty_cache()
                rec.data["runs"].append(run)
                rec.save()
        if problems:
            rec.data.update(status="failed", reason="; ".join(problems))
        rec.save()
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def main(argv=None) -> int:
    all_stages = {"correctness": stages.correctness, "attention": stages.attention, "throughput": throughput,
                  "loader": stages.loader, "fp8": stages.fp8}
    return harness.main(argv, all_stages, worker=[sys.executable, str(Path(__file__).resolve())],
                        description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
