"""RNG state files of training checkpoints (genlip_mcore/train/checkpoint.py): they round-trip every generator, load
with weights_only=True (older files with a numpy array too), and a file that would run code on unpickling is
refused with one line naming it, without running anything."""

import os
import random

import numpy as np
import pytest
import torch

from genlip_mcore.train import checkpoint as ck


def draws():
    return (random.random(), float(np.random.rand()), torch.rand(3).tolist())


def test_rng_state_round_trips_through_a_weights_only_file(tp1, tmp_path):
    tp1()
    path = tmp_path / "rank00000.pt"
    state = ck._rng_state()
    assert torch.is_tensor(state["numpy"][1])                   # no ndarray: loads without numpy globals
    torch.save(state, path)
    want = draws()
    ck._set_rng_state(ck._read_rng(path))
    assert draws() == want


def test_rng_file_of_an_older_checkpoint_still_loads(tp1, tmp_path):
    """Checkpoints written before weights_only hold np.random.get_state() as an ndarray."""
    tp1()
    path = tmp_path / "rank00000.pt"
    state = dict(ck._rng_state(), numpy=np.random.get_state())
    torch.save(state, path)
    want = draws()
    ck._set_rng_state(ck._read_rng(path))
    assert draws() == want


class Planted:
    """What a hostile checkpoint would carry: unpickling it runs a command."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("wrap", ["bare", "inside_a_state"])
def test_a_planted_object_is_refused_and_never_runs(tmp_path, wrap):
    marker = tmp_path / "ran"
    path = tmp_path / "rank00000.pt"
    obj = Planted(marker)
    torch.save(obj if wrap == "bare" else {"python": random.getstate(), "numpy": np.random.get_state(),
                                           "torch": obj}, path)
    with pytest.raises(RuntimeError, match=r"rank00000\.pt: not a loadable RNG state file .*refusing to load it"):
        ck._read_rng(path)
    assert not marker.exists()


def test_a_truncated_rng_file_gets_one_line(tmp_path):
    path = tmp_path / "rank00000.pt"
    torch.save({"torch": torch.get_rng_state()}, path)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(RuntimeError, match="rank00000.pt: not a loadable RNG state file") as err:
        ck._read_rng(path)
    assert "\n" not in str(err.value)
