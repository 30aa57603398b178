"""A micro FP8 sweep through the real `genlip-fp8 run --report`: two cells (FP32 and emulated tensorwise FP8) of a
tiny model, trained by genlip-pretrain in two processes at once, then the report; a second run skips both."""

import json
from pathlib import Path

import yaml

from genlip_mcore.fp8.__main__ import main

REPO = Path(__file__).resolve().parents[2]


def test_micro_sweep_runs_reports_and_resumes(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    out = tmp_path / "sweep"
    sweep = {
        "base": "examples/configs/tiny_cpu.yaml",
        "overrides": ["model.num_layers=2", "data.max_seq_len=256", "training.train_iters=6",
                      "training.global_batch_size=2", "training.log_interval=1"],
        "sizes": {"w128": {"model.hidden_size": 128, "model.ffn_hidden_size": 256}},
        "precisions": {"fp32": {}, "fp8_tensorwise": {"precision.fp8": "hybrid", "precision.fp8_recipe": "tensorwise",
                                                      "precision.fp8_backend": "emulate",
                                                      "logging.fp8_stats_interval": 2}},
        "baseline": "fp32", "seeds": [1], "jobs": 2, "out": str(out)}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))

    assert main(["run", str(path), "--report", "--timeout", "240"]) == 0, capsys.readouterr()
    printed = capsys.readouterr().out
    assert "w128/fp32/seed1" in printed and "report:" in printed
    cells = {p: json.loads((out / "w128" / p / "seed1" / "cell.json").read_text()) for p in sweep["precisions"]}
    assert all(c["status"] == "done" and c["rc"] == 0 for c in cells.values()), cells
    assert cells["fp8_tensorwise"]["config"]["precision"]["fp8_recipe"] == "tensorwise"

    # Same seed, same data order and initialisation: the first step's loss differs only by FP8 rounding.
    first = {p: json.loads((out / "w128" / p / "seed1" / "metrics.jsonl").read_text().splitlines()[0])["loss"]
             for p in sweep["precisions"]}
    assert abs(first["fp32"] - first["fp8_tensorwise"]) < 0.05 * first["fp32"], first

    stats = [json.loads(x) for x in (out / "w128" / "fp8_tensorwise" / "seed1" / "fp8_stats.jsonl").read_text()
             .splitlines()]
    assert {r["iteration"] for r in stats} == {2, 4, 6}
    report = (out / "report.md").read_text()
    assert "| fp8_tensorwise | hybrid tensorwise (emulate) | 1/1 |" in report
    assert "one baseline seed: the floor alone applies" in report
    for png in ("loss_w128.png", "gap_w128.png", "throughput.png", "heatmap_w128_fp8_tensorwise.png"):
        assert (out / png).stat().st_size > 1000, png

    assert main(["run", str(path)]) == 0
    assert capsys.readouterr().out.count("done before") == 2
