"""Checkpoint/resume at TP=2 x PP=2 on 4 CPU ranks: 2N steps straight == N steps + resume + N steps, bitwise.
The same mid-run checkpoint resumed at TP=1/PP=1 (resharded on load) continues the same curve (fp32 summation
order differs across layouts: 1e-5 relative)."""

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
