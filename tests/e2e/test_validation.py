"""Validation loss on held-out shards (genlip_mcore/train/evaluate.py): logged every eval_interval and at the end
(exit_interval included), the same numbers on every run and after a resume, the mean token loss of the same batches
in eval mode, invisible to training, and the same at TP=2 and PP=2 as at TP=1."""

import json
from pathlib import Path

import pytest
import torch

from genlip_mcore import config as C
from tests.distributed.launch import torchrun


def _overrides(shapes_data, run_dir, *extra, valid=True):
    heldout = shapes_data[0].split("=", 1)[1].replace("/train/", "/heldout/")
    return [*shapes_data, "model.variant=tiny", "model.drop_path_rate=0.3", "precision.bf16=false",
            "data.image_size=64", "data.max_seq_len=128", "data.num_workers=0", "training.global_batch_size=2",
            "training.micro_batch_size=1", "training.eval_iters=2", f"training.run_dir={run_dir}",
            *([f"data.valid_sources={heldout}"] if valid else []), *extra]


def _train(overrides):
    from genlip_mcore.train.loop import train

    results = train(C.load(None, overrides, world_size=1))
    return [(r.loss, r.grad_norm) for r in results], torch.get_rng_state()   # the RNG a checkpoint would save


def _valid_rows(run_dir):
    rows = [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["iteration"]: r["valid_loss"] for r in rows if "valid_loss" in r}


def test_valid_loss_every_interval_and_at_the_end_reproducible_and_training_unchanged(mcore_world, shapes_data,
                                                                                     tmp_path):
    steps = ["training.train_iters=5", "training.eval_interval=2"]
    a = _train(_overrides(shapes_data, tmp_path / "a", *steps))
    b = _train(_overrides(shapes_data, tmp_path / "b", *steps))
    off = _train(_overrides(shapes_data, tmp_path / "off", *steps, valid=False))
    early = _train(_overrides(shapes_data, tmp_path / "early", *steps, "training.exit_interval=3"))
    va, vb = _valid_rows(tmp_path / "a"), _valid_rows(tmp_path / "b")
    assert sorted(va) == [2, 4, 5]                                   # every eval_interval, and the last iteration
    assert va == vb                                                  # same held-out batches, same numbers, exactly
    assert len(set(va.values())) == 3                                # the model moved between passes
    assert a[0] == b[0] == off[0]                                    # losses and grad norms, bitwise
    assert torch.equal(a[1], off[1])                                 # and the RNG stream where it was
    assert _valid_rows(tmp_path / "off") == {}
    ve = _valid_rows(tmp_path / "early")
    assert sorted(ve) == [2, 3] and ve[2] == va[2]                   # exit_interval ends with a pass too
    assert early[0] == a[0][:3]
    resumed = _train(_overrides(shapes_data, tmp_path / "resumed", *steps,
                                f"training.load_dir={tmp_path / 'early' / 'checkpoints'}"))
    assert resumed[0] == a[0][3:] and _valid_rows(tmp_path / "resumed") == {4: va[4], 5: va[5]}


def test_distributed_optimizer_with_overlapped_param_gather_trains_the_same(mcore_world, shapes_data, tmp_path):
    # The pass takes the param-gather forward hooks off and puts them back, as Megatron's loop does.
    steps = ["training.train_iters=4", "training.eval_interval=2", "parallel.use_distributed_optimizer=true",
             "parallel.overlap_param_gather=true", "parallel.overlap_grad_reduce=true"]
    on = _train(_overrides(shapes_data, tmp_path / "on", *steps))
    off = _train(_overrides(shapes_data, tmp_path / "off", *steps, valid=False))
    assert on[0] == off[0] and sorted(_valid_rows(tmp_path / "on")) == [2, 4]


def test_valid_loss_is_the_token_mean_over_the_same_batches_in_eval_mode(mcore_world, shapes_data, tmp_path):
    from genlip_mcore.model import build_model_chunks
    from genlip_mcore.model.attention import build_packed_params
    from genlip_mcore.parallel import setup_model_parallel
    from genlip_mcore.train.evaluate import Evaluator
    from genlip_mcore.train.optim import wrap_chunks
    from genlip_mcore.train.step import step_shape

    cfg = C.load(None, _overrides(shapes_data, tmp_path, "model.drop_path_rate=0.5"), world_size=1)
    setup_model_parallel(cfg.parallel, cfg.training.seed)
    chunks = wrap_chunks(cfg, build_model_chunks(cfg))
    ev = Evaluator(cfg, chunks, 0, 1)
    got = ev.run()
    assert all(m.training for m in chunks)                           # train mode is back

    def direct(training):
        chunks[0].train(training)
        data, loss, count = ev.batches(), 0.0, 0
        with torch.no_grad():
            for _ in range(cfg.training.eval_iters * step_shape(cfg, 1)["num_microbatches"]):
                b = next(data)
                packed = build_packed_params(b.img_lens, b.txt_lens, seed=b.seed, targets=b.targets)
                out = chunks[0](b.tokens, b.patches, b.position_ids, packed, targets=b.targets)
                loss, count = loss + out.double().sum().item(), count + out.numel()
        chunks[0].train(True)
        return loss / count, count

    loss, count = direct(training=False)
    assert got["valid_tokens"] == count
    # fp32 per micro-batch sums in the schedule, float64 here
    assert got["valid_loss"] == pytest.approx(loss, rel=1e-6)
    assert got["valid_ppl"] == pytest.approx(torch.tensor(loss).exp().item(), rel=1e-6)
    assert abs(direct(training=True)[0] - loss) > 1e-4       # train mode (drop path) differs by ~7e-4 here


@pytest.mark.distributed
def test_valid_loss_at_tp2_and_pp2_equals_tp1(mcore_world, shapes_data, tmp_path):
    from genlip_mcore.model import build_model_chunks
    from genlip_mcore.parallel import setup_model_parallel
    from genlip_mcore.train.checkpoint import load_weights_only
    from genlip_mcore.train.evaluate import Evaluator
    from genlip_mcore.train.optim import wrap_chunks

    base = _overrides(shapes_data, tmp_path / "pp2", "training.train_iters=2")
    torchrun(str(Path(__file__).with_name("validation_worker.py")), 2, str(tmp_path / "out.json"), json.dumps(base))
    out = json.loads((tmp_path / "out.json").read_text())
    cfg = C.load(None, base, world_size=1)
    setup_model_parallel(cfg.parallel, cfg.training.seed)
    chunks = wrap_chunks(cfg, build_model_chunks(cfg, initialize=False))
    load_weights_only(str(tmp_path / "pp2" / "checkpoints"), chunks)
    tp1 = Evaluator(cfg, chunks, 0, 1).run()["valid_loss"]
    assert out["pp2"] == _valid_rows(tmp_path / "pp2")[2]
    assert out["pp2"] == pytest.approx(tp1, rel=1e-6) and out["tp2"] == pytest.approx(tp1, rel=1e-6)
