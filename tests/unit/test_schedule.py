"""The LR schedule of build_scheduler (train/optim.py) against spec §7's formula: linear warmup from 0 over
int(fraction * T) steps, then cosine to min_lr at T, min_lr after. And schedule_changes, which names what a
resume would change (train/checkpoint.py)."""

import math

import pytest
import torch

from genlip_mcore import config as C
from genlip_mcore.train.checkpoint import schedule_changes
from genlip_mcore.train.optim import build_scheduler

LR, MIN_LR, T, FRACTION = 1e-3, 1e-5, 100, 0.1


def _cfg(*extra):
    return C.load(None, ["model.variant=tiny", f"optimizer.lr={LR}", f"optimizer.min_lr={MIN_LR}",
                         f"training.train_iters={T}", f"optimizer.lr_warmup_fraction={FRACTION}", *extra],
                  world_size=1)


def _lrs(cfg, steps):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    sched = build_scheduler(cfg, opt)
    out, done = {}, 0
    for s in sorted(steps):
        if s > done:
            sched.step(increment=s - done)
            done = s
        out[s] = opt.param_groups[0]["lr"]
    return out


def test_warmup_then_cosine_at_known_steps():
    warmup = 10                                                     # int(0.1 * 100)
    want = {0: 0.0, 1: LR / 10, 5: LR / 2, 10: LR,                 # linear from 0
            55: (LR + MIN_LR) / 2,                                 # halfway through the decay: cos(pi/2) = 0
            25: MIN_LR + (LR - MIN_LR) * 0.5 * (1 + math.cos(math.pi * 15 / 90)),
            100: MIN_LR, 130: MIN_LR}
    got = _lrs(_cfg(), want)
    for s, lr in want.items():
        assert got[s] == pytest.approx(lr, rel=1e-12, abs=1e-15), s
    assert all(got[a] >= got[b] for a, b in [(10, 25), (25, 55), (55, 100)]) and warmup == int(FRACTION * T)


def test_schedule_changes_name_each_field_in_both_directions():
    saved = C.to_dict(_cfg())
    assert schedule_changes(saved, _cfg()) == []
    assert schedule_changes(saved, _cfg("training.train_iters=200")) == [
        "training.train_iters: 100 in the checkpoint, 200 now"]
    assert schedule_changes(saved, _cfg("training.train_iters=50")) == [
        "training.train_iters: 100 in the checkpoint, 50 now"]
    changed = schedule_changes(saved, _cfg("optimizer.min_lr=0", "optimizer.lr_decay_style=linear",
                                           "optimizer.weight_decay=0.1"))
    assert [c.split(":")[0] for c in changed] == ["optimizer.min_lr", "optimizer.lr_decay_style",
                                                  "optimizer.weight_decay"]
    # Not part of the schedule (it counts optimizer steps): a new batch size resumes.
    assert schedule_changes(saved, _cfg("training.global_batch_size=8")) == []
