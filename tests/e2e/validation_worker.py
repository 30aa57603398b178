"""torchrun worker (2 ranks) for tests/e2e/test_validation.py: train 2 steps at PP=2 with a validation pass at the
end, then evaluate that checkpoint at TP=2. Rank 0 writes both validation losses as JSON.
Usage: torchrun --nproc_per_node=2 validation_worker.py OUT_JSON OVERRIDES_JSON
"""

import json
import sys
from pathlib import Path


def main(out_path, overrides):
    import torch.distributed as dist

    from genlip_mcore import config as C
    from genlip_mcore.model import build_model_chunks
    from genlip_mcore.parallel import init_distributed, setup_model_parallel
    from genlip_mcore.train.checkpoint import load_weights_only
    from genlip_mcore.train.evaluate import Evaluator
    from genlip_mcore.train.loop import train
    from genlip_mcore.train.optim import wrap_chunks

    rank, world = init_distributed()
    cfg = C.load(None, overrides + ["parallel.pipeline_model_parallel_size=2"], world_size=world)
    train(cfg)
    dist.barrier()
    run_dir = Path(cfg.training.run_dir)
    rows = [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines()]
    res = {"pp2": next(r["valid_loss"] for r in rows if "valid_loss" in r)}
    cfg = C.load(None, overrides + ["parallel.tensor_model_parallel_size=2"], world_size=world)
    setup_model_parallel(cfg.parallel, cfg.training.seed)
    chunks = wrap_chunks(cfg, build_model_chunks(cfg, initialize=False))
    load_weights_only(str(run_dir / "checkpoints"), chunks)
    res["tp2"] = Evaluator(cfg, chunks, 0, 1).run()["valid_loss"]
    if rank == 0:
        Path(out_path).write_text(json.dumps(res))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]))
