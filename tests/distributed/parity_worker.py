"""torchrun worker: train the same data under several parallel layouts and record loss and grad norm per step.

All layouts start from one dist checkpoint saved at TP=PP=1 (so loading reshards it), and see the same global
batches (rows are numbered globally). Launched by test_parallel_parity.py; rank 0 writes a JSON file.
Usage: torchrun --nproc_per_node=4 parity_worker.py OUT_JSON CKPT_DIR [LAYOUT ...]
"""

import json
import sys

import torch

BASE = ["model.variant=tiny", "model.drop_path_rate=0.1", "data.max_seq_len=128", "training.train_iters=5",
        "training.global_batch_size=8", "training.micro_batch_size=1", "optimizer.lr=1e-3",
        "optimizer.lr_warmup_fraction=0.0", "optimizer.min_lr=1e-4"]

LAYOUTS = {
    "tp1pp1": [],
    "tp2": ["parallel.tensor_model_parallel_size=2"],
    "pp2": ["parallel.pipeline_model_parallel_size=2"],
    "tp2_sp": ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"],
    "pp2_vpp2": ["parallel.pipeline_model_parallel_size=2", "parallel.virtual_pipeline_model_parallel_size=2"],
    "tp2_dp2_distopt": ["parallel.tensor_model_parallel_size=2", "parallel.use_distributed_optimizer=true"],
    "dp4_distopt_overlap": ["parallel.use_distributed_optimizer=true", "parallel.overlap_grad_reduce=true",
                            "parallel.overlap_param_gather=true"],
    "tp2_pp2_sp": ["parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2",
                   "parallel.sequence_parallel=true"],
    # Activation recompute replays the same drop-path decisions (they travel with the batch): same numbers.
    "tp2_pp2_recompute_full": ["parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2",
                               "model.recompute_granularity=full", "model.recompute_method=uniform",
                               "model.recompute_num_layers=1"],
    "tp2_sp_recompute_selective": ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true",
                                   "model.recompute_granularity=selective"],
    # bf16 params and activations (Float16Module) with fp32 main weights: close to fp32, not equal.
    "tp2_pp2_sp_bf16_distopt": ["parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2",
                                "parallel.sequence_parallel=true", "precision.bf16=true",
                                "parallel.use_distributed_optimizer=true"],
}


def run_layout(name, overrides, ckpt_dir, world):
    from genlip_mcore import config as C
    from genlip_mcore.ckpt import load_model
    from genlip_mcore.data.synthetic import SyntheticPacks
    from genlip_mcore.model import build_model_chunks
    from genlip_mcore.parallel import data_parallel_info, setup_model_parallel
    from genlip_mcore.train.optim import build_optimizer, build_scheduler, wrap_chunks
    from genlip_mcore.train.step import step_shape, train_step

    cfg = C.load(None, BASE + overrides, world_size=world)
    setup_model_parallel(cfg.parallel, cfg.training.seed)
    chunks = build_model_chunks(cfg)                       # layout's own init ...
    own = [{k: v.clone() for k, v in c.state_dict().items() if torch.is_tensor(v)} for c in chunks]
    load_model(chunks, ckpt_dir)                           # ... must equal the TP=1 checkpoint
    init_equal = all(torch.equal(o[k], c.state_dict()[k]) for o, c in zip(own, chunks, strict=True) for k in o)
    wrapped = wrap_chunks(cfg, chunks)
    optimizer = build_optimizer(cfg, wrapped)
    scheduler = build_scheduler(cfg, optimizer)
    dp_rank, dp = data_parallel_info()
    data = SyntheticPacks.for_config(cfg, dp_rank, dp)
    out = {"loss": [], "grad_norm": [], "lr": [], "tokens": [], "init_equal": init_equal}
    for _ in range(cfg.training.train_iters):
        r = train_step(wrapped, optimizer, scheduler, data, **step_shape(cfg, dp))
        out["loss"].append(r.loss)
        out["grad_norm"].append(r.grad_norm)
        out["lr"].append(r.lr)
        out["tokens"].append(r.num_tokens)
    return out


def main(out_path, ckpt_dir, names):
    import torch.distributed as dist

    from genlip_mcore import config as C
    from genlip_mcore.ckpt import save_model
    from genlip_mcore.model import build_model_chunks
    from genlip_mcore.parallel import init_distributed, setup_model_parallel

    rank, world = init_distributed()
    cfg = C.load(None, BASE, world_size=world)
    setup_model_parallel(cfg.parallel, cfg.training.seed)
    save_model(build_model_chunks(cfg), ckpt_dir)
    dist.barrier()
    results = {}
    for name in names:
        results[name] = run_layout(name, LAYOUTS[name], ckpt_dir, world)
        if rank == 0:
            print(name, results[name]["loss"], flush=True)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:] or list(LAYOUTS))
