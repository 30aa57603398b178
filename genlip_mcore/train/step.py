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
from megatron.core.pipeline_parallel import get_forward_backward_func

from genlip_mcore.data.batch import Batch
from genlip_mcore.model.attention import build_packed_params


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
    output = model(batch.tokens, batch.patches, batch.position_ids, packed, targets=batch.targets)
    return output, loss_func


def step_shape(cfg, dp_size: int) -> dict:
    """Micro-batches per step on this DP rank, and the packed stream length each one has (static PP shapes)."""
    t = cfg.training
    return dict(num_microbatches=t.global_batch_size // (t.micro_batch_size * dp_size),
                seq_length=t.micro_batch_size * cfg.data.max_seq_len)


def train_step(chunks: list, optimizer, scheduler, data_iterator, *, num_microbatches: int,
               seq_length: int) -> StepResult:
    for m in chunks:
        m.zero_grad_buffer()
    optimizer.zero_grad()
    vpp = len(chunks)
    # Interleaved PP: every virtual chunk consumes every micro-batch, each through its own iterator.
    iterators = list(itertools.tee(data_iterator, vpp)) if vpp > 1 else data_iterator
    reduced = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iterators, model=chunks if vpp > 1 else chunks[0],
        num_microbatches=num_microbatches, seq_length=seq_length, micro_batch_size=1, forward_only=False)
    loss, count = _global_loss(reduced)
    lr = optimizer.param_groups[0]["lr"]
    if not (math.isfinite(loss) and _grads_finite(chunks)):
        # bf16 has no loss scaler to catch this: skip the update so the weights, optimizer moments and schedule
        # stay exactly as they were; the caller counts it and stops after several in a row.
        optimizer.zero_grad()
        return StepResult(loss=loss, num_tokens=count, grad_norm=float("nan"), lr=lr, update_successful=False)
    update_successful, grad_norm, _ = optimizer.step()
    if update_successful:
        scheduler.step(increment=1)
    return StepResult(loss=loss, num_tokens=count, grad_norm=float(grad_norm or 0.0), lr=lr,
                      update_successful=bool(update_successful))


def _grads_finite(chunks: list) -> bool:
    """All gradient buffers finite on every rank (one MIN all-reduce of a flag over the world)."""
    ok = all(torch.isfinite(buf.grad_data).all() for m in chunks for buf in m.buffers)
    flag = torch.tensor([1.0 if ok else 0.0], device=_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _global_loss(reduced: list) -> tuple[float, int]:
    """Sum the (loss, count) pairs of the last stage over DP; every rank of the world gets the result."""
    totals = torch.zeros(2, dtype=torch.float64, device=_device())
    is_reporter = (parallel_state.is_pipeline_last_stage(ignore_virtual=True)
                   and parallel_state.get_tensor_model_parallel_rank() == 0)
    if is_reporter:
        for r in reduced:
            totals += r["lm loss"].to(totals)
    dist.all_reduce(totals)
    return (totals[0] / totals[1].clamp(min=1)).item(), int(totals[1].item())
