"""Checkpoints that cannot hurt a run (genlip_mcore/ckpt.py, train/checkpoint.py): a damaged or foreign checkpoint
gives one line naming the file and the last complete checkpoint; a failed save removes its partial directory and
stops every rank; keep-last pruning survives a rollback; a changed LR schedule is refused unless overridden.

One tiny run (iterations 2, 4, 6 saved) is trained per module; each test damages a copy of its save dir."""

import json
import math
import pickle
import shutil

import pytest

from genlip_mcore import ckpt
from genlip_mcore import config as C
from genlip_mcore.ckpt import CheckpointError

BASE = ["model.variant=tiny", "data.max_seq_len=128", "training.global_batch_size=2", "training.train_iters=6",
        "optimizer.lr_warmup_fraction=0.2"]


def _cfg(run_dir, *extra):
    return C.load(None, BASE + [f"training.run_dir={run_dir}", *extra], world_size=1)


@pytest.fixture(scope="module")
def trained(mcore_world, tmp_path_factory):
    from genlip_mcore.train.loop import train

    run = tmp_path_factory.mktemp("ckpt_safety")
    train(_cfg(run, "training.save_interval=2", "training.keep_last=10"))
    return run / "checkpoints"


@pytest.fixture(scope="module")
def model(trained):
    """Model, optimizer and schedule of the same config, built once: the probes fail before anything is loaded."""
    return _build(_cfg(trained.parent / "load"))


def _build(cfg):
    from genlip_mcore.model import build_model_chunks
    from genlip_mcore.parallel import setup_model_parallel
    from genlip_mcore.train.optim import build_optimizer, build_scheduler, wrap_chunks

    setup_model_parallel(cfg.parallel, cfg.training.seed)
    chunks = wrap_chunks(cfg, build_model_chunks(cfg))
    opt = build_optimizer(cfg, chunks)
    return cfg, chunks, opt, build_scheduler(cfg, opt)


@pytest.fixture
def save_dir(trained, tmp_path):
    shutil.copytree(trained, tmp_path / "checkpoints")
    return tmp_path / "checkpoints"


def _load(path, model, cfg=None):
    from genlip_mcore.train.checkpoint import load_checkpoint

    c, chunks, opt, sched = model
    return load_checkpoint(str(path), chunks, opt, sched, cfg or c)


def _one_line(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg and "Traceback" not in msg, msg
    return msg


def _truncate(f):
    f.write_bytes(f.read_bytes()[:1000])


class Planted:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


PROBES = {   # name -> (damage iter_0000006, the file the message names)
    "truncated shard": (lambda d: _truncate(d / "__0_1.distcp"), "__0_1.distcp: truncated"),
    "missing shard": (lambda d: (d / "__0_0.distcp").unlink(), "__0_0.distcp: missing"),
    "missing common.pt": (lambda d: (d / "common.pt").unlink(), "common.pt: missing"),
    "missing .metadata": (lambda d: (d / ".metadata").unlink(), ".metadata: missing"),
    "missing metadata.json": (lambda d: (d / "metadata.json").unlink(), "metadata.json: missing"),
    "truncated .metadata": (lambda d: _truncate(d / ".metadata"), ".metadata: not readable checkpoint metadata"),
    "genlip.json not JSON": (lambda d: (d / "genlip.json").write_text("{not json"), "genlip.json: not readable JSON"),
    "genlip.json lacks keys": (
        lambda d: (d / "genlip.json").write_text(json.dumps({"iteration": 6, "config": {}})),
        "genlip.json: lacks consumed_rows, scheduler, layout, data"),
    "garbage shard": (lambda d: (d / "__0_0.distcp").write_bytes(b"x" * (d / "__0_0.distcp").stat().st_size),
                      "iter_0000006: could not be loaded"),
}


@pytest.mark.parametrize("probe", list(PROBES))
def test_a_damaged_checkpoint_names_the_file_and_the_last_complete_one(save_dir, model, probe):
    damage, names = PROBES[probe]
    damage(save_dir / "iter_0000006")
    with pytest.raises(CheckpointError) as err:
        _load(save_dir, model)
    msg = _one_line(err)
    assert names in msg
    assert f"the last complete checkpoint is {save_dir / 'iter_0000004'}" in msg


def test_latest_naming_a_missing_checkpoint(save_dir, model):
    (save_dir / "latest").write_text("iter_0000009\n")
    with pytest.raises(CheckpointError) as err:
        _load(save_dir, model)
    msg = _one_line(err)
    assert f"{save_dir / 'latest'} names 'iter_0000009'" in msg
    assert f"the last complete checkpoint is {save_dir / 'iter_0000006'}" in msg


def test_no_complete_checkpoint_left_says_so(save_dir, model):
    for d in ckpt.checkpoints(save_dir):
        (d / "common.pt").unlink()
    with pytest.raises(CheckpointError, match=f"no other complete checkpoint in {save_dir}$") as err:
        _load(save_dir / "iter_0000006", model)
    _one_line(err)


def test_a_hostile_metadata_pickle_is_refused_and_never_runs(save_dir, model, tmp_path):
    marker = tmp_path / "ran"
    (save_dir / "iter_0000006" / ".metadata").write_bytes(pickle.dumps(Planted(marker)))
    with pytest.raises(CheckpointError, match=r"\.metadata: not readable checkpoint metadata \(posix.system is not"):
        _load(save_dir, model)
    assert not marker.exists()


@pytest.mark.parametrize("field", ["load_dir", "init_from"])
def test_a_huggingface_export_points_at_genlip_convert(tmp_path, model, field):
    from genlip_mcore.train.checkpoint import load_weights_only

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError) as err:
        _load(hf, model) if field == "load_dir" else load_weights_only(str(hf), model[1])
    assert "HuggingFace export" in _one_line(err) and "genlip-convert from-hf" in str(err.value)


# --------------------------------------------------------------------------------------------------------------
# A failed save
# --------------------------------------------------------------------------------------------------------------
def _save(model, save_dir, iteration, **kw):
    from genlip_mcore.train.checkpoint import save_checkpoint

    cfg, chunks, opt, sched = model
    cfg = _cfg(save_dir.parent, f"training.save_dir={save_dir}", *kw.pop("overrides", []))
    return save_checkpoint(cfg, chunks, opt, sched, iteration=iteration, consumed_rows=2 * iteration,
                           data_state={"iteration": iteration}, **kw)


def _disk_full(*a, **k):
    import errno

    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("where", ["shards", "rng", "publish"])
def test_a_failed_save_removes_its_partial_directory_and_names_the_intact_one(save_dir, model, monkeypatch, where):
    from megatron.core import dist_checkpointing

    if where == "shards":          # inside dist_checkpointing.save, after part of the files
        real = dist_checkpointing.save

        def half_then_full(state, path, *a, **k):
            real(state, path, *a, **k)
            _disk_full()
        monkeypatch.setattr(dist_checkpointing, "save", half_then_full)
    elif where == "rng":           # the fault point: one rank's disk fills after its shards are written
        monkeypatch.setenv("GENLIP_FAULT", "disk_full_during_save@7:0")
    else:                          # rank 0 publishing: the tokenizer copy
        monkeypatch.setattr(ckpt, "copy_tokenizer", _disk_full)
    with pytest.raises(CheckpointError) as err:
        _save(model, save_dir, 7, tokenizer="tok.model")
    msg = _one_line(err)
    assert f"saving checkpoint iter_0000007 (iteration 7) in {save_dir} failed" in msg
    assert "No space left on device" in msg
    assert f"the previous checkpoint {save_dir / 'iter_0000006'} is intact" in msg
    assert not (save_dir / ".tmp_iter_0000007").exists() and not (save_dir / "iter_0000007").exists()
    assert ckpt.resolve(save_dir).name == "iter_0000006"


def test_an_unusable_save_dir_is_one_line(tmp_path, model):
    (tmp_path / "file").write_text("")
    with pytest.raises(CheckpointError) as err:
        _save(model, tmp_path / "file" / "checkpoints", 7)
    assert "iter_0000007 (iteration 7)" in _one_line(err) and "no earlier complete checkpoint" in str(err.value)


# --------------------------------------------------------------------------------------------------------------
# Keep-last pruning after a rollback
# --------------------------------------------------------------------------------------------------------------
def _names(save_dir):
    return [p.name for p in ckpt.checkpoints(save_dir)]


def test_rollback_keeps_the_new_save_and_the_one_resumed_from(save_dir, model, caplog):
    """Resume from iteration 2 while 4 and 6 of the abandoned run remain, keep_last=2: today's name sort deleted
    iteration 3 (just written) and 2 (resumed from), and `latest` dangled."""
    with caplog.at_level("WARNING"):
        resumed = _load(save_dir / "iter_0000002", model, _cfg(save_dir.parent, f"training.save_dir={save_dir}"))
    assert "iter_0000004, iter_0000006" in caplog.text                  # named at resume, left alone
    assert resumed.directory == save_dir / "iter_0000002"
    keep = dict(overrides=["training.keep_last=2"], resumed_from=resumed.directory)
    _save(model, save_dir, 3, **keep)
    assert _names(save_dir) == ["iter_0000002", "iter_0000003", "iter_0000004", "iter_0000006"]
    assert ckpt.resolve(save_dir).name == "iter_0000003"
    before = (save_dir / "iter_0000004" / "genlip.json").read_text()
    _save(model, save_dir, 4, **keep)                                    # reaches a future one: replaced
    assert (save_dir / "iter_0000004" / "genlip.json").read_text() != before
    assert ckpt.resolve(save_dir).name == "iter_0000004"
    assert _names(save_dir) == ["iter_0000002", "iter_0000003", "iter_0000004", "iter_0000006"]
    _save(model, save_dir, 5, **keep)               # 3 is the oldest beyond keep_last; 2 is kept: resumed from
    assert _names(save_dir) == ["iter_0000002", "iter_0000004", "iter_0000005", "iter_0000006"]
    assert ckpt.resolve(save_dir).name == "iter_0000005"


def test_pruning_sorts_by_iteration_number_and_spares_weights_only(tmp_path):
    for it, extra in [(9, {}), (10, {}), (100, {}), (0, {"weights_only": True}), (99999999, {})]:
        d = tmp_path / f"iter_{it:07d}"
        d.mkdir()
        (d / "genlip.json").write_text(json.dumps({"iteration": it, **extra}))
    assert [ckpt.iteration_of(p) for p in ckpt.checkpoints(tmp_path)] == [0, 9, 10, 100, 99999999]
    doomed = ckpt.prunable(tmp_path / "iter_0000100", keep_last=1, keep=[tmp_path / "iter_0000009"])
    assert [p.name for p in doomed] == ["iter_0000010"]


# --------------------------------------------------------------------------------------------------------------
# A changed LR schedule at resume
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("iters", [12, 5])
def test_a_changed_train_iters_is_refused_naming_both_values(save_dir, model, iters):
    with pytest.raises(CheckpointError) as err:
        _load(save_dir / "iter_0000004", model, _cfg(save_dir.parent, f"training.train_iters={iters}"))
    msg = _one_line(err)
    assert f"training.train_iters: 6 in the checkpoint, {iters} now" in msg
    assert "training.override_opt_param_scheduler=true" in msg


def test_every_schedule_field_is_named(save_dir, model):
    cfg = _cfg(save_dir.parent, "optimizer.lr=5e-4", "optimizer.min_lr=0", "optimizer.lr_decay_style=linear",
               "optimizer.lr_warmup_fraction=0.5")
    with pytest.raises(CheckpointError) as err:
        _load(save_dir / "iter_0000004", model, cfg)
    msg = _one_line(err)
    for field in ("optimizer.lr:", "optimizer.min_lr:", "optimizer.lr_decay_style: 'cosine' in the checkpoint, "
                  "'linear' now", "optimizer.lr_warmup_fraction: 0.2 in the checkpoint, 0.5 now"):
        assert field in msg


@pytest.mark.parametrize("iters", [12, 5])
def test_override_applies_the_new_schedule_from_the_resumed_step(save_dir, iters):
    """Megatron's override_opt_param_scheduler: the new config's warmup and decay, at the checkpoint's step."""
    cfg = _cfg(save_dir.parent, f"training.train_iters={iters}", "training.override_opt_param_scheduler=true")
    built = _build(cfg)
    _load(save_dir / "iter_0000004", built, cfg)
    sched, o = built[3], cfg.optimizer
    warmup = int(o.lr_warmup_fraction * iters)
    ratio = (4 - warmup) / (iters - warmup)
    want = o.min_lr + 0.5 * (math.cos(math.pi * ratio) + 1) * (o.lr - o.min_lr)
    assert sched.num_steps == 4 and sched.lr_decay_steps == iters
    assert built[2].param_groups[0]["lr"] == pytest.approx(want, rel=1e-12)
