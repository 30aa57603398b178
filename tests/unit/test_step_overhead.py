"""What one training step costs besides its math (genlip_mcore/train/overhead.py), pinned so that a change that
brings back a host sync or a collective fails; and the gradient-norm skip decision against the former check."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def counts():
    """Counted in a fresh process: the counter's dispatch and function modes leave torch.compile state behind that
    breaks a later flex_attention call in the same process (tests/unit/test_attention.py)."""
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, str(root / "tools" / "bench_step_overhead.py"), "--steps", "1", "--json"],
                         capture_output=True, text=True, timeout=300, cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def test_the_step_drops_the_finiteness_pass_its_collective_and_two_syncs(counts):
    before, after = counts["before"], counts["after"]
    assert counts["identical_results"]
    assert after["collectives:all_reduce"] == before["collectives:all_reduce"] - 1     # no finiteness flag
    assert after["syncs"] == before["syncs"] - 3              # flag .item(), bool() per buffer, second loss .item()
    assert after.get("syncs:tolist") == 1                     # the loss and token count, one read
    assert after["grad_bytes_read"] < before["grad_bytes_read"]


def test_one_step_sync_and_collective_counts_are_pinned(counts):
    after = counts["after"]
    # Tiny model, one rank, DDP optimizer. Collectives: the DDP bucket, finalize_model_grads' token count, the
    # loss, the grad norm and Megatron's own (schedule and optimizer) ones; none of ours besides the loss.
    assert after["collectives"] == 11, after
    # Syncs: 66 per-parameter reads of Megatron's fallback grad norm (no apex/TE) and 66 of torch Adam's CPU `step`
    # counters, 2 more in the norm, 1 in finalize_model_grads, 1 for the loss. Any new one fails here.
    assert after["syncs"] == 136, after
    assert after.get("syncs:nonzero", 0) == 0 and after.get("syncs:cpu", 0) == 0


def _setup(tmp_path, hook_scale):
    from genlip_mcore import config as C
    from genlip_mcore.data.synthetic import SyntheticPacks
    from genlip_mcore.model import build_model_chunks
    from genlip_mcore.parallel import setup_model_parallel
    from genlip_mcore.train.optim import build_optimizer, build_scheduler, wrap_chunks
    from genlip_mcore.train.step import step_shape

    cfg = C.load(None, ["model.variant=tiny", "data.max_seq_len=128", "training.global_batch_size=2",
                        f"training.run_dir={tmp_path}"], world_size=1)
    setup_model_parallel(cfg.parallel, 0)
    chunks = wrap_chunks(cfg, build_model_chunks(cfg))
    opt = build_optimizer(cfg, chunks)
    p = next(p for p in chunks[0].parameters() if p.requires_grad)
    p.register_hook(lambda g: g * hook_scale)
    return chunks, opt, build_scheduler(cfg, opt), SyntheticPacks.for_config(cfg, 0, 1), step_shape(cfg, 1)


@pytest.mark.parametrize("legacy", [False, True])
def test_a_nonfinite_gradient_under_a_finite_loss_skips_the_step(mcore_world, tmp_path, legacy):
    from genlip_mcore.train.step import train_step

    chunks, opt, sched, data, shape = _setup(tmp_path, float("nan"))
    before = {k: v.clone() for k, v in chunks[0].state_dict().items() if torch.is_tensor(v)}
    r = train_step(chunks, opt, sched, data, _legacy=legacy, **shape)
    assert math.isfinite(r.loss) and not r.update_successful and math.isnan(r.grad_norm)
    assert all(torch.equal(v, chunks[0].state_dict()[k]) for k, v in before.items())
    assert sched.num_steps == 0


def test_an_overflowing_norm_of_finite_gradients_steps_as_before(mcore_world, tmp_path):
    """A norm > ~1.8e19 overflows fp32 to inf while every gradient is finite: the former check let the step go on
    (clipped by max_norm / inf); the norm decision falls back to that check, so both paths end in the same state."""
    from genlip_mcore.train.step import train_step

    states = []
    for legacy in (True, False):
        chunks, opt, sched, data, shape = _setup(tmp_path / str(legacy), 1e30)
        r = train_step(chunks, opt, sched, data, _legacy=legacy, **shape)
        assert r.update_successful and math.isinf(r.grad_norm)
        states.append(({k: v.clone() for k, v in chunks[0].state_dict().items() if torch.is_tensor(v)}, r))
    (a, ra), (b, rb) = states
    assert ra == rb and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_gpu_check_profiles_the_range_that_train_step_opens():
    """profile.py cannot import train (the import rule), so it names the range by its string: the same one."""
    from genlip_mcore.gpucheck import profile
    from genlip_mcore.train import step

    assert profile.OPTIMIZER_RANGE == step.OPTIMIZER_RANGE
