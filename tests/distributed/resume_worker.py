"""torchrun worker (4 ranks): 2N steps straight vs N steps + resume + N steps, at TP=2 x PP=2; then the same
mid-run checkpoint resumed at TP=1/PP=1 (DP=4); then that resume again with rank 1's disk full at the final save.
Rank 0 writes the per-step losses, and every rank's error of the failed save, as JSON.
Usage: torchrun --nproc_per_node=4 resume_worker.py OUT_JSON WORK_DIR
"""

import json
import os
import sys

N = 3
BASE = ["model.variant=tiny", "model.drop_path_rate=0.1", "data.max_seq_len=128", f"training.train_iters={2 * N}",
        "training.global_batch_size=4", "training.micro_batch_size=1", "optimizer.lr=2e-3",
        "optimizer.lr_warmup_fraction=0.2"]
TP2PP2 = ["parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2"]


def run(overrides, world):
    from genlip_mcore import config as C
    from genlip_mcore.train.loop import train

    cfg = C.load(None, BASE + overrides, world_size=world)
    return [(r.loss, r.grad_norm) for r in train(cfg)]


def main(out_path, work):
    import torch.distributed as dist

    from genlip_mcore.ckpt import CheckpointError
    from genlip_mcore.parallel import init_distributed

    rank, world = init_distributed()
    res = {
        "straight": run(TP2PP2 + [f"training.run_dir={work}/a"], world),
        "first_half": run(TP2PP2 + [f"training.run_dir={work}/b", f"training.exit_interval={N}"], world),
    }
    res["second_half"] = run(TP2PP2 + [f"training.run_dir={work}/c", f"training.load_dir={work}/b/checkpoints"],
                             world)
    res["second_half_tp1"] = run([f"training.run_dir={work}/d", f"training.load_dir={work}/b/checkpoints"], world)
    os.environ["GENLIP_FAULT"] = f"disk_full_during_save@{2 * N}:1"
    try:
        run(TP2PP2 + [f"training.run_dir={work}/e", f"training.load_dir={work}/b/checkpoints"], world)
        error = None
    except CheckpointError as e:            # on every rank, none left waiting in a collective
        error = str(e)
    del os.environ["GENLIP_FAULT"]
    errors = [None] * world
    dist.all_gather_object(errors, error)
    res["disk_full"] = {"errors": errors, "left": sorted(os.listdir(f"{work}/e/checkpoints"))}
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(res, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
