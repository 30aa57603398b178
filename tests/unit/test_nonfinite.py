"""A non-finite loss or gradient skips the step (nothing changes) and is counted; several in a row stop the run
with the last checkpoint intact."""

import dataclasses

import pytest
import torch

from genlip_mcore import config as C
from genlip_mcore.data.synthetic import SyntheticPacks


def _cfg(tmp_path, **training):
    return C.load(None, ["model.variant=tiny", "data.max_seq_len=128", "training.global_batch_size=2",
                         f"training.run_dir={tmp_path}", *[f"training.{k}={v}" for k, v in training.items()]],
                  world_size=1)


class Poisoned:
    """Generated packs, with NaN pixels in the micro-batches whose index is in `bad`."""

    def __init__(self, cfg, bad):
        self.packs, self.bad, self.n = SyntheticPacks.for_config(cfg, 0, 1), set(bad), 0

    @property
    def iteration(self):                  # the loop saves this as the data position of generated packs
        return self.packs.iteration

    def __iter__(self):
        return self

    def __next__(self):
        b = next(self.packs)
        self.n += 1
        return dataclasses.replace(b, patches=torch.full_like(b.patches, float("nan"))) if self.n in self.bad else b


def test_a_nonfinite_step_changes_nothing_and_training_goes_on(mcore_world, tmp_path):
    from genlip_mcore.model import build_model_chunks
    from genlip_mcore.parallel import setup_model_parallel
    from genlip_mcore.train.optim import build_optimizer, build_scheduler, wrap_chunks
    from genlip_mcore.train.step import step_shape, train_step

    cfg = _cfg(tmp_path)
    setup_model_parallel(cfg.parallel, 0)
    chunks = wrap_chunks(cfg, build_model_chunks(cfg))
    opt = build_optimizer(cfg, chunks)
    sched = build_scheduler(cfg, opt)
    data = Poisoned(cfg, bad={1})                                    # the first micro-batch of step 1
    before = {k: v.clone() for k, v in chunks[0].state_dict().items() if torch.is_tensor(v)}
    r = train_step(chunks, opt, sched, data, **step_shape(cfg, 1))
    assert not r.update_successful and r.loss != r.loss              # NaN loss, skipped
    assert all(torch.equal(v, chunks[0].state_dict()[k]) for k, v in before.items())
    assert sched.num_steps == 0
    r = train_step(chunks, opt, sched, data, **step_shape(cfg, 1))
    assert r.update_successful and r.loss == r.loss and sched.num_steps == 1
    assert any(not torch.equal(v, chunks[0].state_dict()[k]) for k, v in before.items())


def test_consecutive_nonfinite_steps_stop_the_run_and_keep_the_last_checkpoint(mcore_world, tmp_path):
    from genlip_mcore import ckpt
    from genlip_mcore.train.loop import train

    cfg = _cfg(tmp_path, train_iters=8, save_interval=2, max_nonfinite_steps=2)
    with pytest.raises(RuntimeError, match="2 consecutive steps with a non-finite loss"):
        train(cfg, data_override=Poisoned(cfg, bad=range(5, 100)))   # steps 1-2 fine, 3 onwards poisoned
    save_dir = tmp_path / "checkpoints"
    assert ckpt.resolve(save_dir).name == "iter_0000002"
    assert ckpt.read_meta(save_dir / "iter_0000002")["iteration"] == 2
