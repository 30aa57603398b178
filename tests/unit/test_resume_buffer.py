"""Resume with samples waiting in the packer's buffer at the save (data/loader.py): the resumed run gets the
batches and losses of an uninterrupted one, and buffered samples whose shard has since vanished are counted skips.

The buffer (16 samples) is larger than what one row takes (about 3), so it is never empty at a save: a resume that
dropped or re-read it differently would change the rows that follow."""

import json
import shutil

import pytest
import torch

from genlip_mcore import config as C
from genlip_mcore.data.loader import DataLoader, RowStream
from genlip_mcore.data.shapes import make_shapes
from genlip_mcore.data.tokenizer import train_sentencepiece


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("buffer_shapes")
    make_shapes(root, samples=64, shards=4, seed=7, heldout=0, max_side=64)
    tok = train_sentencepiece([f"a {c} {s} in the {p}." for c in ("red", "green", "blue", "black")
                               for s in ("circle", "square", "star") for p in ("top", "left", "center")] * 4 +
                              ["Describe the image in detail."] * 20, root / "tok", 300)
    return root, str(tok)


def _data(shapes, **kw):
    root, tok = shapes
    return C.DataConfig(**{**dict(sources=[str(root / "train" / "*.tar")], tokenizer_path=tok, image_size=64,
                                  max_seq_len=128, pack_buffer=16, num_workers=0), **kw})


def _loader(shapes, state=None):
    return DataLoader(_data(shapes), patch_size=16, seed=5, dp_rank=0, dp_size=1, micro_batch_size=1, state=state)


def test_resumed_loader_gives_the_uninterrupted_batches_with_a_full_buffer(shapes):
    straight = _loader(shapes)
    want = [next(straight) for _ in range(8)]
    first = _loader(shapes)
    for _ in range(4):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))
    assert len(state["slots"]["0"]["buffer"]) >= 10                  # the buffer is what this test is about
    resumed = _loader(shapes, state)
    for w in want[4:]:
        got = next(resumed)
        assert got.sample_keys == w.sample_keys
        for name in ("tokens", "targets", "position_ids", "patches"):
            assert torch.equal(getattr(got, name), getattr(w, name)), name


def test_buffered_samples_of_a_vanished_shard_are_counted_skips(shapes, tmp_path):
    root, tok = shapes
    copy = tmp_path / "shapes"
    shutil.copytree(root / "train", copy)
    d = _data(shapes, sources=[str(copy / "*.tar")])
    stream = RowStream(d, 16, seed=5, slot=0, num_slots=1)
    for _ in range(3):
        _, state = stream.next_row()
    state = json.loads(json.dumps(state))
    gone = state["buffer"][0]["shard"]
    lost = sum(ref["shard"] == gone for ref in state["buffer"])
    before = state["skips"].get("unreadable_shard", 0)
    (copy / gone.rsplit("/", 1)[1]).unlink()
    resumed = RowStream(d, 16, seed=5, slot=0, num_slots=1)
    resumed.load_state_dict(state)                                    # was: FileNotFoundError
    assert resumed.counts()["unreadable_shard"] == before + lost
    assert len(resumed.packer.buffer) == len(state["buffer"]) - lost
    assert resumed.samples == state["samples"] - lost
    resumed.next_row()                                                # and the run goes on


def test_training_resume_with_a_full_buffer_repeats_the_losses(shapes, mcore_world, tmp_path):
    """Through the real save and load: 4 steps straight == 2 steps, save, resume, 2 steps (bitwise)."""
    from genlip_mcore import ckpt
    from genlip_mcore.train.loop import train

    root, tok = shapes
    base = ["model.variant=tiny", "data.max_seq_len=128", "data.image_size=64", "data.pack_buffer=16",
            "data.num_workers=0", f"data.sources={root}/train/*.tar", f"data.tokenizer_path={tok}",
            "training.train_iters=4", "training.global_batch_size=2", "optimizer.lr=2e-3"]

    def run(name, *extra):
        cfg = C.load(None, base + [f"training.run_dir={tmp_path / name}", *extra], world_size=1)
        return [(r.loss, r.grad_norm) for r in train(cfg)]

    straight = run("straight")
    first = run("first", "training.exit_interval=2")
    save_dir = tmp_path / "first" / "checkpoints"
    assert ckpt.read_meta(save_dir / "iter_0000002")["data"]["ranks"][0]["slots"]["0"]["buffer"]
    second = run("second", f"training.load_dir={save_dir}")
    assert first == straight[:2] and second == straight[2:]
