"""torchrun worker (4 ranks) for test_graceful_stop.py: the uninterrupted run, then each stopped run resumed in its
own run dir (so its metrics.jsonl holds the whole curve). The config is the one the stopped CLI runs used.
Usage: torchrun --nproc_per_node=4 stop_worker.py STRAIGHT_RUN_DIR STOPPED_RUN_DIR [STOPPED_RUN_DIR ...]
"""

import sys

CONFIG = "examples/configs/tiny_cpu.yaml"
ITERS = 6
OVERRIDES = ["data.max_seq_len=128", f"training.train_iters={ITERS}", "training.log_interval=1",
             "parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2"]


def main(straight, *stopped):
    import torch.distributed as dist

    from genlip_mcore import config as C
    from genlip_mcore.parallel import init_distributed
    from genlip_mcore.train.loop import train

    _, world = init_distributed()
    train(C.load(CONFIG, OVERRIDES + [f"training.run_dir={straight}"], world_size=world))
    for run_dir in stopped:
        train(C.load(CONFIG, OVERRIDES + [f"training.run_dir={run_dir}", f"training.load_dir={run_dir}/checkpoints"],
                     world_size=world))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
