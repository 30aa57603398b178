"""torchrun worker (4 ranks, TP=2 x PP=2) for the HF conversion tests (test_hf_convert.py).

  train WORK   trains the tiny model a few steps into WORK/run/checkpoints, then loads that checkpoint into fresh
               TP=2 x PP=2 chunks and writes their logits and per-token losses on the test pack to WORK/train.pt;
               and saves the same weights from a PP=2 x VPP=2 layout in WORK/vpp
  reload CKPT WORK
               loads CKPT (e.g. written by `genlip-convert from-hf`) at TP=2 x PP=2, writes logits and losses to
               WORK/reload.pt, and saves the chunks again as a model-only checkpoint in WORK/resaved

The forward runs through Megatron's own pipeline schedule (forward_only, collect_non_loss_data), so the numbers are
those of the sharded model (the last stage gathers its vocab-parallel logits over TP).
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.distributed.hf_pack import LAYOUT, TRAIN, conversion_pack  # noqa: E402


def megatron_outputs(cfg, chunks) -> dict:
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from tests.packs import model_inputs

    row, _ = conversion_pack(cfg.model)
    inputs = model_inputs(row)
    total = inputs["tokens"].numel()
    out = {}
    for kind in ("logits", "losses"):
        def step(data_iterator, model, kind=kind):
            x = next(data_iterator)
            y = model(x["tokens"], x["patches"], x["position_ids"], x["packed"],
                      targets=x["targets"] if kind == "losses" else None)   # logits: gathered over TP by the model

            def collect(output, non_loss_data=False):
                return output
            return y, collect

        res = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter([inputs]), model=chunks[0], num_microbatches=1,
            seq_length=total, micro_batch_size=1, forward_only=True, collect_non_loss_data=True)
        if parallel_state.is_pipeline_last_stage():
            out[kind] = res[0].detach().clone()
    return out


def build(cfg_overrides, world):
    from genlip_mcore import config as C
    from genlip_mcore.model import build_model_chunks
    from genlip_mcore.parallel import setup_model_parallel

    cfg = C.load(None, TRAIN + LAYOUT + cfg_overrides, world_size=world)
    setup_model_parallel(cfg.parallel, cfg.training.seed)
    chunks = build_model_chunks(cfg, initialize=False)
    for c in chunks:
        c.eval()
    return cfg, chunks


def save_outputs(cfg, chunks, path):
    import torch.distributed as dist
    from megatron.core import parallel_state

    out = megatron_outputs(cfg, chunks)
    if parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0 \
            and parallel_state.get_data_parallel_rank() == 0:
        torch.save(out, path)
    dist.barrier()


def main(mode, *args):
    import torch.distributed as dist

    from genlip_mcore import config as C
    from genlip_mcore.ckpt import load_model, save_weights_checkpoint
    from genlip_mcore.parallel import init_distributed
    from genlip_mcore.train.loop import train

    _, world = init_distributed()
    if mode == "train":
        work = Path(args[0])
        train(C.load(None, TRAIN + LAYOUT + [f"training.run_dir={work}/run"], world_size=world))
        cfg, chunks = build([], world)
        trained = str(sorted((work / "run" / "checkpoints").glob("iter_*"))[-1])
        load_model(chunks, trained)
        save_outputs(cfg, chunks, work / "train.pt")
        # the same weights saved from a PP=2 x VPP=2 layout (4 chunks of one layer): to-hf must not care
        cfg, chunks = build(["parallel.tensor_model_parallel_size=1", "parallel.virtual_pipeline_model_parallel_size=2"],
                            world)
        load_model(chunks, trained)
        save_weights_checkpoint(cfg, chunks, work / "vpp")
    elif mode == "reload":
        ckpt, work = Path(args[0]), Path(args[1])
        cfg, chunks = build([], world)
        from genlip_mcore.ckpt import resolve

        load_model(chunks, str(resolve(ckpt)))
        save_outputs(cfg, chunks, work / "reload.pt")
        save_weights_checkpoint(cfg, chunks, work / "resaved")
    else:
        raise SystemExit(f"unknown mode {mode}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
