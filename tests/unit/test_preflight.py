"""genlip_mcore.preflight and data/sources.py: what validate() cannot know (paths, disk, shards, tokenizer,
checkpoints to start from) fails at start-up in one line naming the field, or warns where the config allows it."""

import json
import logging
from collections import namedtuple
from pathlib import Path

import pytest

from genlip_mcore import config as C
from genlip_mcore import preflight
from genlip_mcore.data import sources

GIB = 2**30


def cfg_for(tmp_path, **sections):
    tree = {"model": {"variant": "tiny"}, "training": {"run_dir": str(tmp_path / "run")}}
    for k, v in sections.items():
        tree[k] = {**tree.get(k, {}), **v}
    return C.validate(C.from_dict(tree))


def raises(field, fn, *args):
    with pytest.raises(C.ConfigError) as err:
        fn(*args)
    msg = str(err.value)
    assert msg.startswith(field + ":") and "\n" not in msg, msg
    return msg


# ------------------------------------------------------------------------------------------------------------------
# Run and save dirs
# ------------------------------------------------------------------------------------------------------------------
def test_run_and_save_dirs_are_created_and_left_clean(tmp_path):
    cfg = cfg_for(tmp_path, training={"save_dir": str(tmp_path / "a" / "b" / "ckpt")})
    preflight.run(cfg)
    assert list((tmp_path / "a" / "b" / "ckpt").iterdir()) == []          # the probe file is gone
    assert (tmp_path / "run").is_dir()
    cfg.training.save_dir = None
    preflight.run(cfg)
    assert list((tmp_path / "run" / "checkpoints").iterdir()) == []       # default: <run_dir>/checkpoints


def test_unwritable_save_dir_names_it(tmp_path):
    """A path under a regular file cannot be created, even by root (for whom chmod does not stop writes)."""
    (tmp_path / "file").write_text("x")
    cfg = cfg_for(tmp_path, training={"save_dir": str(tmp_path / "file" / "ckpt")})
    msg = raises("training.save_dir", preflight.run, cfg)
    assert "file/ckpt" in msg and "Not a directory" in msg
    cfg = cfg_for(tmp_path, training={"run_dir": str(tmp_path / "file" / "run")})
    raises("training.run_dir", preflight.run, cfg)


def test_probe_write_failure_names_the_field(tmp_path, monkeypatch):
    """The directory exists but refuses files (a read-only mount, a full disk, quota)."""
    def refuse(self, data):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(Path, "write_bytes", refuse)
    (tmp_path / "ro").mkdir()
    msg = raises("training.save_dir", preflight.check_writable, tmp_path / "ro", "training.save_dir")
    assert "Read-only file system" in msg


# ------------------------------------------------------------------------------------------------------------------
# Disk space
# ------------------------------------------------------------------------------------------------------------------
SPEC_PARAMS = {"l16": 702_392_832, "so16": 817_301_376, "g16": 1_543_396_352}   # spec §1.3


@pytest.mark.parametrize("name", sorted(SPEC_PARAMS))
def test_parameter_count_is_the_spec_count(name):
    assert preflight.parameter_count(C.model_config(name)) == SPEC_PARAMS[name]


def test_checkpoint_size_counts_weights_and_adam_state():
    cfg = C.Config(model=C.model_config("g16"))
    assert preflight.checkpoint_bytes(cfg) == SPEC_PARAMS["g16"] * (4 + 8)              # fp32 weights, 2 moments
    cfg.precision.bf16 = True
    assert preflight.checkpoint_bytes(cfg) == SPEC_PARAMS["g16"] * (2 + 4 + 8)          # + fp32 master weights


def _free(monkeypatch, free):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: usage(10 * free, 9 * free, free))


def test_disk_without_room_for_one_checkpoint_fails(tmp_path, monkeypatch, caplog):
    cfg = cfg_for(tmp_path, model={"variant": "g16"}, precision={"bf16": True}, training={"keep_last": 2})
    size = preflight.checkpoint_bytes(cfg)                                                # ~20 GiB
    preflight.check_writable(preflight.save_dir(cfg.training), "training.save_dir")
    _free(monkeypatch, size - 1)
    msg = raises("training.save_dir", preflight.check_disk, cfg)
    assert "less than one checkpoint" in msg and f"{size / GIB:.2f} GiB" in msg
    _free(monkeypatch, 2 * size)                                  # the next save fits, keep_last + 1 = 3 do not
    with caplog.at_level(logging.WARNING, logger="genlip_mcore.preflight"):
        preflight.check_disk(cfg)
    assert "training.save_dir" in caplog.text and "keep_last=2" in caplog.text
    caplog.clear()
    _free(monkeypatch, 3 * size)
    with caplog.at_level(logging.WARNING, logger="genlip_mcore.preflight"):
        preflight.check_disk(cfg)
    assert caplog.text == ""


def test_disk_forecast_counts_checkpoints_already_there(tmp_path, monkeypatch, caplog):
    """Resuming with keep_last checkpoints on disk: the next save needs room for one; pruning frees the rest."""
    cfg = cfg_for(tmp_path, model={"variant": "g16"}, training={"keep_last": 2})
    save = preflight.save_dir(cfg.training)
    for it in (100, 200):
        (save / f"iter_{it:07d}").mkdir(parents=True)
        (save / f"iter_{it:07d}" / "genlip.json").write_text("{}")
    _free(monkeypatch, preflight.checkpoint_bytes(cfg) + 1)
    with caplog.at_level(logging.WARNING, logger="genlip_mcore.preflight"):
        preflight.check_disk(cfg)
    assert caplog.text == ""


# ------------------------------------------------------------------------------------------------------------------
# Shards
# ------------------------------------------------------------------------------------------------------------------
def make_shards(root: Path, names):
    root.mkdir(parents=True, exist_ok=True)
    for n in names:
        (root / n).write_bytes(b"")


def test_brace_pattern_with_missing_members_fails_listing_them(tmp_path):
    make_shards(tmp_path / "d", [f"{i}.tar" for i in range(10) if i not in (3, 5, 7)])
    pattern = f"{tmp_path}/d/{{0..9}}.tar"
    d = C.DataConfig(sources=[str(tmp_path / "other.tar"), pattern])
    make_shards(tmp_path, ["other.tar"])
    msg = raises("data.sources[1]", preflight.check_sources, d)
    assert f"3 of 10 shards of '{pattern}' are missing: {tmp_path}/d/3.tar, {tmp_path}/d/5.tar, " \
           f"{tmp_path}/d/7.tar" in msg
    assert "data.allow_missing_shards" in msg


def test_allow_missing_shards_warns_with_the_count(tmp_path, caplog):
    make_shards(tmp_path / "d", [f"{i}.tar" for i in range(10) if i not in (3, 5, 7)])
    d = C.DataConfig(sources=[f"{tmp_path}/d/{{0..9}}.tar"], allow_missing_shards=True)
    with caplog.at_level(logging.WARNING, logger="genlip_mcore.preflight"):
        assert preflight.check_sources(d) == {"sources": 7, "valid_sources": 0}
    assert "data.sources[0]: 3 of 10 shards" in caplog.text


def test_long_missing_lists_are_cut(tmp_path):
    make_shards(tmp_path, ["0.tar"])
    e = sources.expand(f"{tmp_path}/{{0..99}}.tar")
    assert (len(e.files), e.members, len(e.missing)) == (1, 100, 99)
    assert e.describe_missing().endswith(f"{tmp_path}/5.tar and 94 more")


def test_pattern_matching_nothing_fails_naming_its_list(tmp_path):
    make_shards(tmp_path, ["a.tar"])
    raises("data.sources[0]", preflight.check_sources, C.DataConfig(sources=[f"{tmp_path}/*.tgz"]))
    msg = raises("data.valid_sources[0]", preflight.check_sources,
                 C.DataConfig(sources=[f"{tmp_path}/a.tar"], valid_sources=[f"{tmp_path}/{{x,y}}.tar"]))
    assert "matches no file" in msg
    d = C.DataConfig(sources=[f"{tmp_path}/*.tgz"], allow_missing_shards=True)          # no file at all: never allowed
    raises("data.sources[0]", preflight.check_sources, d)


def test_glob_members_of_a_brace_pattern(tmp_path):
    """A brace member may be a glob; one that matches nothing is a missing member, a plain glob is not."""
    make_shards(tmp_path / "a", ["1.tar", "2.tar"])
    (tmp_path / "b").mkdir()
    e = sources.expand(f"{tmp_path}/{{a,b}}/*.tar")
    assert e.files == [f"{tmp_path}/a/1.tar", f"{tmp_path}/a/2.tar"] and e.missing == [f"{tmp_path}/b/*.tar"]
    e = sources.expand(f"{tmp_path}/**/*.tar")
    assert (len(e.files), e.missing) == (2, [])


def test_expand_shards_sorts_dedups_and_drops_missing_members(tmp_path):
    """The file list every reader uses: braces in order, each glob sorted, duplicates once, missing members gone."""
    make_shards(tmp_path / "a", ["2.tar", "1.tar"])
    make_shards(tmp_path / "b" / "c", ["3.tar"])
    a1, a2, c3 = f"{tmp_path}/a/1.tar", f"{tmp_path}/a/2.tar", f"{tmp_path}/b/c/3.tar"
    assert sources.expand_shards(f"{tmp_path}/{{a,b}}/**/*.tar") == [a1, a2, c3]
    assert sources.expand_shards(f"{tmp_path}/a/{{1..4}}.tar") == [a1, a2]
    assert sources.expand_shards(f"{tmp_path}/a/{{1,1,2}}.tar") == [a1, a2]
    assert sources.expand_shards(a1) == [a1]


# ------------------------------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    from genlip_mcore.data.tokenizer import train_sentencepiece

    texts = [f"a {c} {s} on a {b} background" for c in ("red", "blue", "green") for s in ("circle", "square")
             for b in ("white", "black")] * 4
    return train_sentencepiece(texts, tmp_path_factory.mktemp("tok"), vocab_size=300)


def test_tokenizer_that_is_not_a_tokenizer(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"this is not a sentencepiece model")
    msg = raises("data.tokenizer_path", preflight.check_tokenizer, C.DataConfig(tokenizer_path=str(bad)),
                 C.ModelConfig())
    assert "is not a sentencepiece tokenizer" in msg
    (tmp_path / "tokenizer.json").write_text('{"model": ')
    raises("data.tokenizer_path", preflight.check_tokenizer,
           C.DataConfig(tokenizer_kind="hf", tokenizer_path=str(tmp_path / "tokenizer.json")), C.ModelConfig())
    raises("data.tokenizer_path", preflight.check_tokenizer,
           C.DataConfig(tokenizer_path=str(tmp_path / "missing.model")), C.ModelConfig())


def test_tokenizer_vocab_must_fit_the_model(sp_model):
    d = C.DataConfig(tokenizer_path=str(sp_model))
    preflight.check_tokenizer(d, C.ModelConfig(vocab_size=512))
    raises("model.vocab_size", preflight.check_tokenizer, d, C.ModelConfig(vocab_size=256))


def test_run_checks_the_tokenizer_only_with_shards(tmp_path):
    cfg = cfg_for(tmp_path, data={"tokenizer_path": str(tmp_path / "missing.model")})
    preflight.run(cfg)                                                  # generated data: no tokenizer needed
    make_shards(tmp_path, ["0.tar"])
    cfg.data.sources = [str(tmp_path / "0.tar")]
    raises("data.tokenizer_path", preflight.run, cfg)


# ------------------------------------------------------------------------------------------------------------------
# Checkpoints to start from
# ------------------------------------------------------------------------------------------------------------------
def checkpoint(root: Path, **meta) -> Path:
    d = root / "iter_0000010"
    d.mkdir(parents=True)
    (d / "genlip.json").write_text(json.dumps({"iteration": 10, "config": {}, **meta}))
    (root / "latest").write_text("iter_0000010\n")
    return root


@pytest.mark.parametrize("name", ["load_dir", "init_from"])
def test_start_checkpoint_must_exist_and_resolve(tmp_path, name):
    field = f"training.{name}"
    t = C.TrainingConfig(**{name: str(tmp_path / "nope")})
    assert "is not a directory" in raises(field, preflight.check_checkpoints, t)
    (tmp_path / "empty").mkdir()
    setattr(t, name, str(tmp_path / "empty"))
    raises(field, preflight.check_checkpoints, t)
    setattr(t, name, str(checkpoint(tmp_path / "ok")))
    preflight.check_checkpoints(t)
    setattr(t, name, str(tmp_path / "ok" / "iter_0000010"))            # one checkpoint dir, not the save dir
    preflight.check_checkpoints(t)


@pytest.mark.parametrize("name", ["load_dir", "init_from"])
def test_hf_export_is_named_as_such(tmp_path, name):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    msg = raises(f"training.{name}", preflight.check_checkpoints, C.TrainingConfig(**{name: str(tmp_path)}))
    assert "HuggingFace export" in msg and "genlip-convert from-hf" in msg


def test_weights_only_checkpoint_starts_but_does_not_resume(tmp_path):
    root = checkpoint(tmp_path, weights_only=True)
    preflight.check_checkpoints(C.TrainingConfig(init_from=str(root)))
    msg = raises("training.load_dir", preflight.check_checkpoints, C.TrainingConfig(load_dir=str(root)))
    assert "training.init_from" in msg


def test_unreadable_checkpoint_metadata_is_one_line(tmp_path):
    root = checkpoint(tmp_path)
    (root / "iter_0000010" / "genlip.json").write_text('{"iteration": ')
    raises("training.init_from", preflight.check_checkpoints, C.TrainingConfig(init_from=str(root)))
