"""Wrapping (Float16Module, DDP), the Megatron optimizer and the LR schedule (spec §7).

Weight decay: `optimizer.weight_decay_params = "all"` (our default) decays every parameter, as the reference does
(spec §5.3), so a run reproduces the published recipe; "matrices" switches to Megatron's rule (no decay on 1-D
parameters and biases: norms, biases, layer scales).
"""

from __future__ import annotations

from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import Float16Module

from genlip_mcore.config import Config


def wrap_chunks(cfg: Config, chunks: list) -> list:
    """Float16Module (bf16) then Megatron DDP around each chunk; installs the grad hooks on the config."""
    tconf = chunks[0].config
    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
        overlap_param_gather=cfg.parallel.overlap_param_gather,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer, check_for_nan_in_grad=False,
        average_in_collective=False)   # per-token loss: grads are summed, finalize divides by all tokens
    wrapped = []
    for i, chunk in enumerate(chunks):
        module = Float16Module(tconf, chunk) if cfg.precision.bf16 else chunk
        wrapped.append(DistributedDataParallel(tconf, ddp_cfg, module, disable_bucketing=i > 0))
    tconf.no_sync_func = [m.no_sync for m in wrapped] if len(wrapped) > 1 else wrapped[0].no_sync
    tconf.finalize_model_grads_func = finalize_model_grads
    if cfg.parallel.overlap_grad_reduce:
        tconf.grad_sync_func = [m.start_grad_sync for m in wrapped]
        if len(wrapped) == 1:
            tconf.grad_sync_func = tconf.grad_sync_func[0]
    if cfg.parallel.overlap_param_gather:
        tconf.param_sync_func = [m.start_param_sync for m in wrapped]
        if len(wrapped) == 1:
            tconf.param_sync_func = tconf.param_sync_func[0]
    return wrapped


def build_optimizer(cfg: Config, wrapped: list):
    o = cfg.optimizer
    mcfg = MegatronOptimizerConfig(
        optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay, adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2, adam_eps=o.adam_eps, clip_grad=o.clip_grad, bf16=cfg.precision.bf16,
        params_dtype=wrapped[0].config.params_dtype, use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        overlap_param_gather=cfg.parallel.overlap_param_gather, decoupled_weight_decay=True)
    overrides = None
    if o.weight_decay_params == "matrices":
        from megatron.core.optimizer import get_standard_config_overrides

        overrides = get_standard_config_overrides(mcfg)
    return get_megatron_optimizer(mcfg, wrapped, config_overrides=overrides)


def build_scheduler(cfg: Config, optimizer) -> OptimizerParamScheduler:
    """Linear warmup from 0 over int(fraction * T) steps, then cosine to min_lr (spec §7; lr is 0 at step 0).

    On resume, Megatron's scheduler keeps the checkpoint's values over ours; train/checkpoint.py refuses a changed
    schedule first, so that only training.override_opt_param_scheduler (ours win, from the resumed step) changes it."""
    o, total = cfg.optimizer, cfg.training.train_iters
    override = cfg.training.override_opt_param_scheduler
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=o.lr, min_lr=o.min_lr, lr_warmup_steps=int(o.lr_warmup_fraction * total),
        lr_decay_steps=total, lr_decay_style=o.lr_decay_style, start_wd=o.weight_decay, end_wd=o.weight_decay,
        wd_incr_steps=total, wd_incr_style="constant", override_opt_param_scheduler=override,
        use_checkpoint_opt_param_scheduler=not override)
