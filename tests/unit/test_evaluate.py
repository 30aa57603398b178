"""Validation plumbing without a model: which held-out data a pass reads, when passes run, and how the result is
logged (a row, scalars and a console line of its own). The passes themselves: tests/e2e/test_validation.py."""

import json
import logging
import re

import pytest

from genlip_mcore import config as C
from genlip_mcore.train import evaluate as E
from genlip_mcore.train import metrics as M


def _shards(tmp_path, n, name="held"):
    d = tmp_path / name
    d.mkdir()
    for i in range(n):
        (d / f"{i}.tar").write_bytes(b"")
    return str(d / "*.tar")


def _cfg(sources, valid, **training):
    return C.Config(data=C.DataConfig(sources=sources, valid_sources=valid, num_workers=2),
                    training=C.TrainingConfig(**training))


def test_held_out_config_workers_follow_the_shards(tmp_path):
    train, held = _shards(tmp_path, 4, "train"), _shards(tmp_path, 3)
    d = E.valid_data_config(_cfg([train], [held]), dp_size=1)
    assert d.sources == [held] and d.source_weights == [] and d.num_workers == 2
    assert E.valid_data_config(_cfg([train], [held]), dp_size=2).num_workers == 0    # 3 shards: one slot per rank
    assert E.valid_data_config(_cfg([train], [held, train]), dp_size=1).sources == [held, train]


@pytest.mark.parametrize("sources, valid, training, message", [
    ([], ["HELD"], {}, r"data.valid_sources: needs data.sources \(generated data has no held-out shards\)"),
    (["TRAIN"], ["HELD", "NONE"], {}, r"data.valid_sources\[1\]: '.*missing/\*.tar' matches 0 shard"),
    (["TRAIN"], ["HELD"], {"eval_iters": 0}, "training.eval_iters: must be >= 1"),
])
def test_held_out_config_refusals_name_the_field(tmp_path, sources, valid, training, message):
    paths = {"TRAIN": _shards(tmp_path, 2, "train"), "HELD": _shards(tmp_path, 1),
             "NONE": str(tmp_path / "missing" / "*.tar")}
    cfg = _cfg([paths[s] for s in sources], [paths[s] for s in valid], **training)
    with pytest.raises(C.ConfigError, match=message):
        E.valid_data_config(cfg, dp_size=1)
    with pytest.raises(C.ConfigError, match="data.valid_sources\\[0\\]: .* each of the 2 data-parallel ranks"):
        E.valid_data_config(_cfg([paths["TRAIN"]], [paths["HELD"]]), dp_size=2)


def test_passes_every_interval_and_at_the_end(tmp_path):
    cfg = _cfg([_shards(tmp_path, 1, "train")], [_shards(tmp_path, 1)], eval_interval=3)
    ev = E.Evaluator(cfg, chunks=[], dp_rank=0, dp_size=1)
    assert [i for i in range(1, 8) if ev.due(i, last=i == 7)] == [3, 6, 7]
    cfg.training.eval_interval = 0
    assert [i for i in range(1, 8) if ev.due(i, last=i == 7)] == [7]
    assert E.build_evaluator(_cfg([], []), [], 0, 1) is None


class FakeWandb:
    def __init__(self):
        self.calls = []

    def log(self, scalars, step):
        self.calls.append((scalars, step))


def test_validation_row_scalars_and_line(tmp_path, caplog):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = {"valid_loss": 1.25, "valid_ppl": 3.4903429574618414, "valid_tokens": 512}
    with caplog.at_level(logging.INFO, logger="genlip_mcore.train"):
        with M.MetricsLogger(C.Config(logging=C.LoggingConfig(tensorboard=True)), tmp_path, True, 10) as ml:
            ml._wandb = wandb = FakeWandb()
            ml.log(4, {"loss": 2.0, "lr": 1e-3, "grad_norm": 0.5})
            line = ml.log_validation(4, result)
            ml._wandb = None
    assert line == " validation loss at iteration 4 | lm loss value: 1.250000E+00 | lm loss PPL: 3.490343E+00 |"
    assert not re.search(r"iteration +\d+/ *\d+ \||lm loss: ", line)          # never read as a training line
    assert caplog.messages[-3:] == ["-" * len(line), line, "-" * len(line)]
    rows = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[1] == {"iteration": 4, **result}                            # a row of its own, no training keys
    assert wandb.calls[-1] == ({"valid_loss": 1.25, "valid_ppl": result["valid_ppl"], "valid_tokens": 512.0}, 4)
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("valid_loss")] == [(4, 1.25)]


def test_non_writer_validation_writes_nothing(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="genlip_mcore.train"):
        with M.MetricsLogger(C.Config(), tmp_path / "run", False, 10) as ml:
            assert ml.log_validation(2, {"valid_loss": 1.0, "valid_ppl": None}).endswith("lm loss value: 1.000000E+00 |")
    assert not (tmp_path / "run").exists() and caplog.text == ""
