"""Checkpoint/resume at TP=2 x PP=2 on 4 CPU ranks: 2N steps straight == N steps + resume + N steps, bitwise.
The same mid-run checkpoint resumed at TP=1/PP=1 (resharded on load) continues the same curve (fp32 summation
order differs across layouts: 1e-5 relative). A save that fails on one rank stops all four with the same line."""

import json

import pytest

from tests.distributed.launch import torchrun

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def losses(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    torchrun("resume_worker.py", 4, str(d / "out.json"), str(d))
    return json.loads((d / "out.json").read_text())


def test_resume_is_bitwise_identical(losses):
    n = len(losses["first_half"])
    assert losses["first_half"] == losses["straight"][:n]
    assert losses["second_half"] == losses["straight"][n:]          # loss and grad norm, exactly


def test_resume_at_another_layout_continues(losses):
    n = len(losses["first_half"])
    for (a, ga), (b, gb) in zip(losses["second_half_tp1"], losses["straight"][n:], strict=True):
        assert abs(a - b) <= 1e-5 * abs(b) and abs(ga - gb) <= 1e-5 * abs(gb)


def test_a_full_disk_on_one_rank_stops_every_rank_and_leaves_no_partial_save(losses):
    n = len(losses["first_half"])
    errors, left = losses["disk_full"]["errors"], losses["disk_full"]["left"]
    assert all(e and f"saving checkpoint iter_{2 * n:07d} (iteration {2 * n})" in e for e in errors), errors
    assert "No space left on device" in errors[1] and "another rank" in errors[0]
    assert all("there is no earlier complete checkpoint in" in e for e in errors)        # a fresh save dir
    assert not any(name.startswith(".tmp_") or name == f"iter_{2 * n:07d}" for name in left), left
