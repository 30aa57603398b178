"""One optimizer step: Megatron's forward_backward_func over the micro-batches, then the optimizer.

The loss contract is Megatron's per-token one: the last stage returns (sum of caption-token losses, token count);
the schedule adds the counts and finalize_model_grads divides every gradient by the global count. The step's
gradient is therefore the exact mean over all caption tokens of the global batch, independent of how tokens fall
over micro-batches and data-parallel ranks.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
from megatron.core.pipeline_parallel import get_forward_backward_func
from torch.profiler import record_function

from genlip_mcore.data.batch import Batch
from genlip_mcore.model.attention import build_packed_params
from genlip_mcore.model.fp8.attach import begin_step, chunk_states, delayed_update, unwrap

# The profiler range around the update (finiteness decision, grad norm, clipping, optimizer, schedule); the GPU
# check's profile (genlip_mcore/gpucheck/profile.py) attributes everything inside it to the optimizer.
OPTIMIZER_RANGE = "genlip: optimizer"


@dataclass
class StepResult:
    loss: float               # global token-mean caption loss (every rank gets it)
    num_tokens: int           # caption tokens in the global batch
    grad_norm: float
    lr: float
    update_successful: bool   # False: the step was skipped (non-finite loss or gradient), nothing was changed


def _device():
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def loss_func(output_tensor: torch.Tensor):
    """Per-token losses [N_lm] -> (sum, count, reporting pair)."""
    loss_sum = output_tensor.sum()
    count = torch.tensor(output_tensor.numel(), dtype=torch.int, device=output_tensor.device)
    return loss_sum, count, {"lm loss": torch.stack([loss_sum.detach(), count.float().detach()])}


def forward_step(data_iterator, model):
    batch: Batch = next(data_iterator)
    device = _device()
    packed = build_packed_params(batch.img_lens, batch.txt_lens, device=device, seed=batch.seed,
                                 targets=batch.targets)
    batch = batch.to(device)
    if chunk_states(model):                       # FP8 in our linears: delayed scales move once per micro-batch
        delayed_update(model)
    output = model(batch.tokens, batch.patches, batch.position_ids, packed, targets=batch.targets)
    return output, loss_func


def step_shape(cfg, dp_size: int) -> dict:
    """Micro-batches per step on this DP rank, and the packed stream length each one has (static PP shapes)."""
    t = cfg.training
    return dict(num_microbatches=t.global_batch_size // (t.micro_batch_size * dp_size),
                seq_length=t.micro_batch_size * cfg.data.max_seq_len)


def train_step(chunks: list, optimizer, scheduler, data_iterator, *, num_microbatches: int,
               seq_length: int, _legacy: bool = False) -> StepResult:
    """Forward and backward over the step's micro-batches, then the update, or a skip that changes nothing.

    A non-finite loss or gradient skips the update. The gradient's verdict comes from the norm the optimizer
    computes for clipping anyway (`_optimizer_step`), not from a separate pass over every gradient.
    `_legacy` keeps the former path (separate finiteness check, two loss syncs) reachable for
    tools/bench_step_overhead.py and its test only.
    """
    for m in chunks:
        m.zero_grad_buffer()
    optimizer.zero_grad()
    if chunk_states(chunks[0]):
        begin_step(chunks)
    vpp = len(chunks)
    # Interleaved PP: every virtual chunk consumes every micro-batch, each through its own iterator.
    iterators = list(itertools.tee(data_iterator, vpp)) if vpp > 1 else data_iterator
    reduced = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iterators, model=chunks if vpp > 1 else chunks[0],
        num_microbatches=num_microbatches, seq_length=seq_length, micro_batch_size=1, forward_only=False)
    loss, count = _global_loss(reduced, legacy=_legacy)
    lr = optimizer.param_groups[0]["lr"]
    skipped = StepResult(loss=loss, num_tokens=count, grad_norm=float("nan"), lr=lr, update_successful=False)
    with record_function(OPTIMIZER_RANGE):
        split = not _legacy and _splittable(optimizer)
        if not math.isfinite(loss) or (not split and not _grads_finite(chunks)):
            # bf16 has no loss scaler to catch this: skip the update so the weights, optimizer moments and schedule
            # stay exactly as they were; the caller counts it and stops after several in a row.
            optimizer.zero_grad()
            return skipped
        if not split:
            update_successful, grad_norm, _ = optimizer.step()
        else:
            update_successful, grad_norm = _optimizer_step(optimizer, chunks)
            if update_successful is None:                     # non-finite gradient: nothing was changed
                optimizer.zero_grad()
                return skipped
        if update_successful:
            scheduler.step(increment=1)
    return StepResult(loss=loss, num_tokens=count, grad_norm=float(grad_norm or 0.0), lr=lr,
                      update_successful=bool(update_successful))


def forward_only_sums(chunks: list, data_iterator, *, num_microbatches: int, seq_length: int) -> torch.Tensor:
    """One global batch through the schedule, forward only (no autograd): this rank's (loss sum, token count) as
    float64, nonzero only where the loss is reported (last stage, TP rank 0). The caller reduces over the world."""
    vpp = len(chunks)
    iterators = list(itertools.tee(data_iterator, vpp)) if vpp > 1 else data_iterator
    with torch.no_grad():
        reduced = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iterators, model=chunks if vpp > 1 else chunks[0],
            num_microbatches=num_microbatches, seq_length=seq_length, micro_batch_size=1, forward_only=True)
    totals = torch.zeros(2, dtype=torch.float64, device=_device())
    if (parallel_state.is_pipeline_last_stage(ignore_virtual=True)
            and parallel_state.get_tensor_model_parallel_rank() == 0):
        for r in reduced:
            totals += r["lm loss"].to(totals)
    return totals


def _sub_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", None) or [optimizer])


def _splittable(optimizer) -> bool:
    """The optimizers whose step() `_optimizer_step` reproduces piece by piece (written against Megatron-Core
    0.16.1). Anything else, or a release whose optimizer lacks one of the pieces, takes optimizer.step() after the
    former full finiteness check: slower, never wrong."""
    from megatron.core.optimizer.optimizer import ChainedOptimizer, FP32Optimizer, MixedPrecisionOptimizer

    subs = _sub_optimizers(optimizer)
    known = (all(isinstance(o, (FP32Optimizer, MixedPrecisionOptimizer)) for o in subs)
             and (isinstance(optimizer, ChainedOptimizer) or len(subs) == 1))
    pieces = all(hasattr(optimizer, f) for f in ("prepare_grads", "get_grad_norm", "step_with_ready_grads"))
    return (known and pieces and not optimizer.config.log_num_zeros_in_grad
            and all(hasattr(o.config, "use_precision_aware_optimizer_no_fp8_or_ds_fp8") for o in subs))


def _optimizer_step(optimizer, chunks: list):
    """Megatron's optimizer.step() (prepare_grads, grad norm, clip, step_with_ready_grads), with the skip decided
    by the gradient norm in between. Returns (update_successful, grad_norm as step() reports it), or (None, None)
    when a gradient is non-finite; then only the gradients and their fp32 copies have been touched.

    Why the norm can decide: it is the square root of the sum of squares of every gradient element (each DP/TP
    replica counted once; the distributed optimizer sums every rank's shard of the reduced buffer, whose sums
    propagate a non-finite element of any rank's local gradient), reduced over the same group on every rank. Any
    NaN or inf element makes it NaN or inf on every rank. A finite norm therefore proves every gradient finite,
    with no pass of its own and no collective of its own. A non-finite norm from finite gradients (fp32 overflow of
    the sum of squares, norm > ~1.8e19) is told apart by the former full check, run only then, so the decision is
    the former one in every case.
    """
    if optimizer.prepare_grads():       # a loss scaler's own inf check (none here): step() returns (False, None)
        return False, None
    if getattr(unwrap(chunks[0]).config, "genlip_tp_invariant", False):      # precision.fp8_tp_invariant
        from genlip_mcore.model.fp8.invariant import grad_norm_fp64

        grad_norm = grad_norm_fp64(optimizer)
    else:
        grad_norm = optimizer.get_grad_norm()             # the value clip_grad_norm computes and step() reports
    if not math.isfinite(grad_norm) and not _grads_finite(chunks):
        return None, None
    chained = hasattr(optimizer, "chained_optimizers")
    for opt in _sub_optimizers(optimizer):
        if getattr(opt, "is_stub_optimizer", False) or opt.config.clip_grad <= 0.0:
            continue
        params = opt.get_parameters()
        if params:
            clip_grad_by_total_norm_fp32(params, max_norm=opt.config.clip_grad, total_norm=grad_norm,
                                         use_decoupled_grad=opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
    update_successful = optimizer.step_with_ready_grads()
    # step() of a single optimizer reports the norm only when it clipped; ChainedOptimizer.step() always does.
    reported = grad_norm if chained or optimizer.config.clip_grad > 0.0 else None
    return update_successful, reported


def _grads_finite(chunks: list) -> bool:
    """All gradient buffers finite on every rank: a full read of every buffer, one MIN all-reduce of a flag over
    the world and a host sync. Only for the rare non-finite grad norm, and the bench's former path."""
    ok = all(torch.isfinite(buf.grad_data).all() for m in chunks for buf in m.buffers)
    flag = torch.tensor([1.0 if ok else 0.0], device=_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _global_loss(reduced: list, legacy: bool = False) -> tuple[float, int]:
    """Sum the (loss, count) pairs of the last stage over DP; every rank of the world gets the result."""
    totals = torch.zeros(2, dtype=torch.float64, device=_device())
    is_reporter = (parallel_state.is_pipeline_last_stage(ignore_virtual=True)
                   and parallel_state.get_tensor_model_parallel_rank() == 0)
    if is_reporter:
        for r in reduced:
            totals += r["lm loss"].to(totals)
    dist.all_reduce(totals)
    if legacy:                                                               # the former two host syncs
        return (totals[0] / totals[1].clamp(min=1)).item(), int(totals[1].item())
    loss, count = torch.stack([totals[0] / totals[1].clamp(min=1), totals[1]]).tolist()   # one host sync
    return loss, int(count)
