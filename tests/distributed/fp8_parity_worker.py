"""torchrun worker: FP8 training under several parallel layouts, loss and grad norm per step.

Every run starts from one dist checkpoint saved at TP=PP=1 and sees the same global batches. Layouts: "tp1"
(DP=2 on 2 ranks, DP=1 on 1 rank), "tp2_sp" (TP=2 + SP) and "pp2" (PP=2); recipes on the emulate backend. Model
dims hold whole 128-blocks per TP shard (hidden 256, FFN 512; the packed length 256 keeps whole token blocks on
each SP shard). Two ways to run a layout: free ("tp2_sp"), its own 5 steps; forced ("tp2_sp@forced"), each step
taken from the weights that the TP=1 run had at that step (saved by it after every step), so each of the 5 steps
compares the layouts' numerics from identical weights, with no drift carried from earlier steps.
Launched twice by test_fp8_parity.py: on 1 rank (RUNS_1: the DP=1 baselines of the TP-invariant recipes; it saves
the initial checkpoint), then on 2 ranks (RUNS_2, loading it). Rank 0 writes a JSON file
{"<recipe>/<layout>": {"loss": [...], "grad_norm": [...]}}.
Usage: torchrun --nproc_per_node=N fp8_parity_worker.py OUT_JSON CKPT_DIR
"""

import json
import sys

BASE = ["model.variant=tiny", "model.num_layers=2", "model.hidden_size=256", "model.ffn_hidden_size=512",
        "model.num_attention_heads=4", "model.mrope_section=[8,8,8]", "model.drop_path_rate=0.0",
        "data.max_seq_len=256", "training.train_iters=5", "training.global_batch_size=4",
        "training.micro_batch_size=1", "optimizer.lr=1e-3", "optimizer.lr_warmup_fraction=0.0",
        "optimizer.min_lr=1e-4", "precision.fp8_backend=emulate"]

RECIPES = {
    "blockwise": ["precision.fp8=e4m3", "precision.fp8_recipe=blockwise"],
    "mxfp8": ["precision.fp8=e4m3", "precision.fp8_recipe=mxfp8"],
    "tensorwise": ["precision.fp8=hybrid", "precision.fp8_recipe=tensorwise"],
    "tensorwise_pow2": ["precision.fp8=hybrid", "precision.fp8_recipe=tensorwise", "precision.fp8_power_2_scales=true"],
    "delayed": ["precision.fp8=hybrid", "precision.fp8_recipe=delayed", "precision.fp8_amax_history_len=16"],
}
# precision.fp8_tp_invariant (with the default clipping, active every step: grad norms 1.9-3.9 > clip_grad 1.0)
TP_INVARIANT = ["precision.fp8_tp_invariant=true"]
RECIPES.update({f"{r}_tpinv": RECIPES[r] + TP_INVARIANT for r in ("blockwise", "mxfp8")})
LAYOUTS = {
    "tp1": [],
    "tp2_sp": ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"],
    "pp2": ["parallel.pipeline_model_parallel_size=2"],
}
RUNS_1 = [("blockwise_tpinv", "tp1"), ("mxfp8_tpinv", "tp1")]
RUNS_2 = [(r, lay) for r in ("blockwise_tpinv", "mxfp8_tpinv") for lay in ("tp2_sp", "pp2")] + \
         [(r, lay) for r in ("blockwise", "mxfp8") for lay in ("tp1", "tp2_sp", "pp2", "tp2_sp@forced", "pp2@forced")] + \
         [("tensorwise", "tp1"), ("tensorwise", "tp2_sp"), ("tensorwise_pow2", "tp1"), ("tensorwise_pow2", "tp2_sp"),
          ("tensorwise_pow2", "tp2_sp@forced"), ("delayed", "tp2_sp"), ("delayed", "pp2")]


def run(recipe, layout, ckpt_dir, world):
    from genlip_mcore import config as C
    from genlip_mcore.ckpt import load_model, save_model
    from genlip_mcore.data.synthetic import SyntheticPacks
    from genlip_mcore.model import build_model_chunks
    from genlip_mcore.parallel import data_parallel_info, setup_model_parallel
    from genlip_mcore.train.optim import build_optimizer, build_scheduler, wrap_chunks
    from genlip_mcore.train.step import step_shape, train_step

    layout, _, mode = layout.partition("@")
    trajectory = f"{ckpt_dir}_{recipe}_tp1_step"        # the TP=1 run's weights before each step
    cfg = C.load(None, BASE + RECIPES[recipe] + LAYOUTS[layout], world_size=world)
    setup_model_parallel(cfg.parallel, cfg.training.seed)
    chunks = build_model_chunks(cfg, initialize=False)
    load_model(chunks, ckpt_dir)
    wrapped = wrap_chunks(cfg, chunks)
    optimizer = build_optimizer(cfg, wrapped)
    scheduler = build_scheduler(cfg, optimizer)
    dp_rank, dp = data_parallel_info()
    data = SyntheticPacks.for_config(cfg, dp_rank, dp)
    out = {"loss": [], "grad_norm": []}
    for step in range(cfg.training.train_iters):
        if layout == "tp1":
            save_model(chunks, f"{trajectory}{step}")
        elif mode == "forced":
            load_model(chunks, f"{trajectory}{step}")     # in place: the optimizer holds the same tensors
        r = train_step(wrapped, optimizer, scheduler, data, **step_shape(cfg, dp))
        out["loss"].append(r.loss)
        out["grad_norm"].append(r.grad_norm)
    return out


def main(out_path, ckpt_dir):
    import torch.distributed as dist

    from genlip_mcore import config as C
    from genlip_mcore.ckpt import save_model
    from genlip_mcore.model import build_model_chunks
    from genlip_mcore.parallel import init_distributed, setup_model_parallel

    rank, world = init_distributed()
    cfg = C.load(None, BASE, world_size=world)                 # high precision: FP8 does not change the weights
    setup_model_parallel(cfg.parallel, cfg.training.seed)
    if world == 1:
        save_model(build_model_chunks(cfg), ckpt_dir)
    dist.barrier()
    results = {}
    for recipe, layout in (RUNS_1 if world == 1 else RUNS_2):
        results[f"{recipe}/{layout}"] = res = run(recipe, layout, ckpt_dir, world)
        if rank == 0:
            print(recipe, layout, res["loss"], flush=True)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
