"""genlip-fp8 without training: sweep parsing and expansion, validation errors, resumability, report verdicts on
synthetic run dirs, plots, and the bench roofline against the study's hand-computed figures."""

import json
import math
import os
import sys
from pathlib import Path

import pytest

from genlip_mcore import config as C
from genlip_mcore.fp8 import bench
from genlip_mcore.fp8 import run as R
from genlip_mcore.fp8 import sweep as S
from genlip_mcore.fp8.__main__ import main
from genlip_mcore.fp8.report import write_report
from genlip_mcore.fp8.results import Rule, load, offenders, stats_matrix, summarize

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "examples" / "configs" / "tiny_cpu.yaml")


def sweep_tree(tmp_path, **extra):
    tree = {"base": TINY, "overrides": ["training.train_iters=4"],
            "sizes": {"w128": {"model.hidden_size": 128, "model.ffn_hidden_size": 256}},
            "precisions": {"fp32": {}, "fp8_block": {"precision.fp8": "e4m3", "precision.fp8_recipe": "blockwise",
                                                     "precision.fp8_backend": "emulate"}},
            "baseline": "fp32", "seeds": {"fp32": [1, 2, 3], "default": [1]}, "out": str(tmp_path / "out")}
    tree.update(extra)
    return tree


# ------------------------------------------------------------------------------------------------------------------
# Sweep file and cells.
# ------------------------------------------------------------------------------------------------------------------
def test_cells_expand_in_order_with_the_cells_own_keys_last(tmp_path):
    sw = S.from_dict(sweep_tree(tmp_path))
    cells = S.cells(sw)
    assert [c.name for c in cells] == ["w128/fp32/seed1", "w128/fp32/seed2", "w128/fp32/seed3",
                                       "w128/fp8_block/seed1"]
    c = cells[-1]
    assert c.run_dir == tmp_path / "out" / "w128" / "fp8_block" / "seed1"
    assert c.overrides == ("training.train_iters=4", "model.hidden_size=128", "model.ffn_hidden_size=256",
                           "precision.fp8=e4m3", "precision.fp8_recipe=blockwise", "precision.fp8_backend=emulate",
                           "training.seed=1", f"training.run_dir={c.run_dir}")


def test_list_forms_and_settings(tmp_path):
    tree = sweep_tree(tmp_path, sizes=[{"model.variant": "tiny"}, {"model.hidden_size": 128, "world_size": 2,
                                                                   "sbatch_args": ["--time=1:00:00"]}],
                      seeds=[7], overrides={"training.train_iters": 4})
    sw = S.from_dict(tree)
    assert list(sw.sizes) == ["tiny", "size1"]
    cells = S.cells(sw)
    assert {c.seed for c in cells} == {7}
    assert cells[-1].world_size == 2 and cells[-1].sbatch_args == ("--time=1:00:00",)
    assert cells[0].overrides[0] == "training.train_iters=4"


@pytest.mark.parametrize("value", ["hybrid", None, True, 3, 1e-3, [4, 4, 4], "1e-3", "null", "a b"])
def test_render_round_trips_through_the_override_parser(value):
    parsed = C._parse_scalar(S.render(value))
    assert parsed == value


@pytest.mark.parametrize("change,message", [
    ({"colour": 1}, "colour: unknown key"),
    ({"baseline": "bf16"}, "baseline: 'bf16' is not one of the precisions"),
    ({"overrides": ["training.seed=3"]}, "training.seed is set by genlip-fp8"),
    ({"sizes": {"a/b": {}}}, "sizes.a/b: a name becomes a directory"),
    ({"seeds": {"bf16": [1]}}, "seeds.bf16: not a precision"),
    ({"seeds": {"fp32": [1, 1]}}, "repeats a seed"),
    ({"launcher": "k8s"}, "launcher: 'k8s'"),
    ({"precisions": {"fp32": {"colour": 1}}}, "precisions.fp32.colour: unknown setting"),
    ({"sizes": {"w": {"training.run_dir": "x"}}}, "training.run_dir is set by genlip-fp8"),
])
def test_sweep_errors_name_the_key(tmp_path, change, message):
    with pytest.raises(S.SweepError, match=message.replace("(", r"\(").replace(")", r"\)")):
        S.from_dict(sweep_tree(tmp_path, **change))


def test_plan_validates_every_cell_and_names_cell_and_field(tmp_path):
    tree = sweep_tree(tmp_path, sizes={"w96": {}, "w128": {"model.hidden_size": 128, "model.ffn_hidden_size": 256}},
                      precisions={"fp32": {}, "fp8_block": {"precision.fp8": "e4m3", "precision.fp8_recipe": "blockwise",
                                                            "precision.fp8_backend": "emulate"},
                                  "bad": {"optimizer.lr": -1}})
    with pytest.raises(S.SweepError) as e:
        S.plan(S.from_dict(tree))
    lines = str(e.value).splitlines()
    assert any(x.startswith("w96/fp8_block/seed1: model.hidden_size:") for x in lines), lines
    assert "w128/bad/seed1: optimizer.lr: must be > 0, got -1.0" in lines
    assert not any(x.startswith("w128/fp8_block") for x in lines)


def test_plan_refuses_a_precision_that_changes_the_data_order(tmp_path):
    tree = sweep_tree(tmp_path, precisions={"fp32": {}, "other": {"data.max_seq_len": 512 + 128}})
    with pytest.raises(S.SweepError, match=r"w128/other/seed1: data.max_seq_len: differs from w128/fp32/seed1"):
        S.plan(S.from_dict(tree))


def test_plan_cli(tmp_path, capsys):
    import yaml

    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep_tree(tmp_path)))
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert "4 cells, all valid" in out and "w128/fp8_block/seed1" in out and "e4m3/blockwise/emulate" in out
    path.write_text(yaml.safe_dump(sweep_tree(tmp_path, sizes={"w96": {}})))
    assert main(["plan", str(path)]) == 2
    assert "w96/fp8_block/seed1: model.hidden_size" in capsys.readouterr().err


def test_base_is_found_beside_the_sweep_file(tmp_path, monkeypatch):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "base.yaml").write_text("training:\n  train_iters: 3\n")
    monkeypatch.chdir(REPO)
    sw = S.from_dict(sweep_tree(tmp_path, base="base.yaml"), tmp_path / "cfg" / "sweep.yaml")
    assert sw.base == tmp_path / "cfg" / "base.yaml"
    sw = S.from_dict(sweep_tree(tmp_path, base="examples/configs/tiny_cpu.yaml"), tmp_path / "cfg" / "sweep.yaml")
    assert sw.base == REPO / "examples" / "configs" / "tiny_cpu.yaml"


def test_example_sweeps_plan(monkeypatch):
    monkeypatch.chdir(REPO)
    planned = S.plan(S.load_sweep("examples/fp8/cpu_sweep.yaml"))
    assert len(planned) >= 2 * (3 + 3)
    assert {p.cfg.precision.fp8_recipe for p in planned if p.cfg.precision.fp8} >= {"tensorwise", "delayed",
                                                                                     "blockwise"}
    # The cluster sweep needs Transformer Engine and DALI, which a CPU machine does not have: pretend, to check
    # the rest.
    monkeypatch.setattr(C, "_has_module", lambda name: True)
    sw = S.load_sweep("examples/fp8/g16_sweep.yaml")
    planned = S.plan(sw)
    assert sw.launcher == "slurm" and {p.cell.size for p in planned} == {"l16", "g16"}
    assert "l16/fp8_blockwise/seed1" not in {p.cell.name for p in planned}
    assert "g16/fp8_blockwise/seed1" in {p.cell.name for p in planned}
    assert any(p.cfg.precision.first_last_layers_bf16 for p in planned)
    assert "GPU-hours in all" in S.format_plan(sw, planned)


# ------------------------------------------------------------------------------------------------------------------
# Running: state, resumability, failures, slurm dry run.
# ------------------------------------------------------------------------------------------------------------------
FAKE_TRAINER = """
import json, os, sys
run_dir, iters, fail = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
os.makedirs(run_dir, exist_ok=True)
with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
    for it in range(1, iters + 1):
        f.write(json.dumps({"iteration": it, "loss": 1.0 / it, "tokens_per_sec": 100.0,
                            "omp": os.environ["OMP_NUM_THREADS"]}) + "\\n")
        if fail and it == 2:
            print("boom: loss went the wrong way", file=sys.stderr)
            sys.exit(3)
"""


def fake_trainer(fail_precisions):
    def command(base, cell, python=sys.executable):
        iters = next(int(o.split("=")[1]) for o in cell.overrides if o.startswith("training.train_iters="))
        return [python, "-c", FAKE_TRAINER, str(cell.run_dir), str(iters), "1" if cell.precision in fail_precisions
                else "0"]
    return command


def test_run_is_resumable_and_a_failed_cell_does_not_stop_the_others(tmp_path, monkeypatch):
    sw = S.from_dict(sweep_tree(tmp_path, jobs=2))
    planned = S.plan(sw)
    monkeypatch.setattr(R, "train_command", fake_trainer({"fp8_block"}))
    outcomes = R.run_sweep(sw, planned)
    assert [o.status for o in outcomes] == ["done", "done", "done", "failed"]
    assert "exit status 3" in outcomes[-1].detail and "boom" in outcomes[-1].detail
    rec = R.read_record(planned[0].cell.run_dir)
    assert rec["status"] == "done" and rec["rc"] == 0 and rec["config"]["training"]["seed"] == 1
    assert json.loads((sw.out / "sweep.json").read_text())["baseline"] == "fp32"
    cores = max(1, R.usable_cores() // 2)
    assert json.loads((planned[0].cell.run_dir / "metrics.jsonl").read_text().splitlines()[0])["omp"] == str(cores)
    assert R.read_record(planned[-1].cell.run_dir)["status"] == "failed"

    # Second run: the done cells are skipped, the failed one starts over in an emptied run dir.
    monkeypatch.setattr(R, "train_command", fake_trainer(set()))
    outcomes = R.run_sweep(sw, planned)
    assert [o.status for o in outcomes] == ["skipped", "skipped", "skipped", "done"]
    rows = (planned[-1].cell.run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 4                          # not 2 stale rows + 4
    assert [o.status for o in R.run_sweep(sw, planned, force=True)] == ["done"] * 4


def test_a_clean_exit_short_of_the_last_iteration_is_a_failure(tmp_path, monkeypatch):
    sw = S.from_dict(sweep_tree(tmp_path, precisions={"fp32": {}}, seeds=[1]))
    planned = S.plan(sw)

    def short(base, cell, python=sys.executable):
        return [python, "-c", FAKE_TRAINER, str(cell.run_dir), "2", "0"]
    monkeypatch.setattr(R, "train_command", short)
    (o,) = R.run_sweep(sw, planned)
    assert o.status == "failed" and "stops at iteration 2 of 4" in o.detail


def test_cell_state(tmp_path, monkeypatch):
    d = tmp_path / "cell"
    assert R.cell_state(d) == "new"
    R.write_record(d, {"status": "running", "pid": 2**22 + 12345, "tool_pid": os.getpid(), "train_iters": 2})
    assert R.cell_state(d) == "failed"                 # its trainer is gone
    R.write_record(d, {"status": "submitted", "job_id": "17", "train_iters": 2})
    monkeypatch.setattr(R, "_slurm_job_active", lambda job: True)
    assert R.cell_state(d) == "submitted"
    monkeypatch.setattr(R, "_slurm_job_active", lambda job: False)
    assert R.cell_state(d) == "failed"
    (d / "metrics.jsonl").write_text('{"iteration": 1, "loss": 2.0}\n{"iteration": 2, "loss": 1.0}\n{"iter')
    assert R.cell_state(d) == "done" and R.read_record(d)["status"] == "done"


def test_refuses_to_empty_a_directory_it_did_not_make(tmp_path, monkeypatch):
    sw = S.from_dict(sweep_tree(tmp_path, precisions={"fp32": {}}, seeds=[1]))
    planned = S.plan(sw)
    planned[0].cell.run_dir.mkdir(parents=True)
    (planned[0].cell.run_dir / "precious.txt").write_text("keep me")
    monkeypatch.setattr(R, "train_command", fake_trainer(set()))
    (o,) = R.run_sweep(sw, planned)
    assert o.status == "failed" and "not a genlip-fp8 cell" in o.detail
    assert (planned[0].cell.run_dir / "precious.txt").exists()


def test_local_command_uses_torchrun_for_several_ranks(tmp_path):
    cell = S.Cell("s", "p", 1, ("a.b=1",), tmp_path, world_size=2)
    cmd = R.train_command(Path("base.yaml"), cell, python="py")
    assert cmd[:6] == ["py", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m"]
    assert cmd[6:] == ["genlip_mcore.train", "--config", "base.yaml", "a.b=1"]
    assert R.train_command(Path("b.yaml"), S.Cell("s", "p", 1, (), tmp_path), python="py")[:3] == \
        ["py", "-m", "genlip_mcore.train"]


def test_slurm_dry_run_goes_through_the_script(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    tree = sweep_tree(tmp_path, launcher="slurm", gpus_per_node=4, sbatch_args=["--time=2:00:00"],
                      overrides=["training.global_batch_size=8"],
                      sizes={"w128": {"model.hidden_size": 128, "model.ffn_hidden_size": 256, "world_size": 8}},
                      precisions={"fp32": {}}, seeds=[1])
    sw = S.from_dict(tree)
    planned = S.plan(sw)
    cmd, env = R.sbatch_command(sw, planned[0].cell)
    assert cmd[:4] == ["sbatch", "--nodes=2", "--gpus-per-node=4", "--job-name=fp8-w128-fp32-s1"]
    assert "--time=2:00:00" in cmd and env == {"GPUS_PER_NODE": "4"}
    (o,) = R.run_sweep(sw, planned, dry_run=True)
    assert o.status == "dry-run", o.detail
    assert "dry run, nothing is started" in o.detail and "--nproc_per_node=4" in o.detail
    assert f"training.run_dir={planned[0].cell.run_dir}" in o.detail
    assert not planned[0].cell.run_dir.exists()


def test_slurm_world_must_fill_nodes_evenly(tmp_path):
    tree = sweep_tree(tmp_path, launcher="slurm", gpus_per_node=8, precisions={"fp32": {}}, seeds=[1],
                      overrides=["training.global_batch_size=18"],
                      sizes={"w": {"world_size": 9}})
    with pytest.raises(S.SweepError, match="w/fp32/seed1: world_size: 9 ranks"):
        S.plan(S.from_dict(tree))


# ------------------------------------------------------------------------------------------------------------------
# Report on synthetic run dirs.
# ------------------------------------------------------------------------------------------------------------------
def write_cell(out, size, precision, seed, losses, status="done", fp8=None, valid=None, tps=1000.0, stats=None):
    d = out / size / precision / f"seed{seed}"
    d.mkdir(parents=True)
    cfg = {"data": {"max_seq_len": 256}, "training": {"global_batch_size": 4, "train_iters": len(losses)},
           "model": {"num_layers": 2, "hidden_size": 128}, "precision": {"bf16": False, "fp8": fp8,
                                                                           "fp8_recipe": "tensorwise",
                                                                           "fp8_backend": "emulate"}}
    R.write_record(d, {"size": size, "precision": precision, "seed": seed, "status": status, "config": cfg,
                       "train_iters": len(losses), "wall_s": 12.0, "error": None if status == "done" else "rc 1"})
    with open(d / "metrics.jsonl", "w") as f:
        for i, loss in enumerate(losses, 1):
            f.write(json.dumps({"iteration": i, "consumed_samples": 4 * i, "loss": loss, "tokens_per_sec": tps,
                                "mfu": None, "memory_gib": 0.5}) + "\n")
        if valid is not None:
            f.write(json.dumps({"iteration": len(losses), "valid_loss": valid}) + "\n")
    if stats:
        with open(d / "fp8_stats.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in stats)
    return d


def stats_rows():
    rows = []
    for it in (5, 10, 15):
        for layer in (1, 2):
            for gemm in ("linear_qkv", "linear_fc2"):
                under = 0.5 * it if (layer, gemm) == (2, "linear_fc2") else 0.01
                kurt = 3.0 * (it / 5) ** 2 if (layer, gemm) == (1, "linear_qkv") else 3.0
                base = {"iteration": it, "layer": layer, "gemm": gemm, "fp8": True, "recipe": "tensorwise",
                        "numel": 100, "amax": 1.0, "scale": 1.0, "scale_min": 1.0, "scale_max": 1.0, "mse": 0.0}
                rows.append({**base, "tensor": "activation", "dtype": "e4m3", "underflow_pct": 0.0,
                             "overflow_pct": 0.2 if it == 10 and layer == 1 else 0.0, "kurtosis": kurt})
                rows.append({**base, "tensor": "gradient", "dtype": "e5m2", "underflow_pct": under,
                             "overflow_pct": 0.0, "kurtosis": 3.0})
    return rows


def synthetic_sweep(out, n=20):
    curve = [2.0 + 3.0 / i for i in range(1, n + 1)]
    (out).mkdir(parents=True)
    (out / "sweep.json").write_text(json.dumps({
        "baseline": "fp32", "base": "tiny.yaml", "overrides": ["training.train_iters=20"],
        "sizes": {"w128": {}, "w256": {}},
        "precisions": {p: {} for p in ("fp32", "fp8_ok", "fp8_bad", "fp8_nan", "fp8_failed", "fp8_low")}}))
    for size, shift in (("w128", 0.0), ("w256", -0.3)):
        for seed, noise in ((1, -0.01), (2, 0.0), (3, 0.01)):
            write_cell(out, size, "fp32", seed, [x + shift + noise for x in curve], tps=1000.0)
        write_cell(out, size, "fp8_ok", 1, [x + shift + 0.004 for x in curve], fp8="hybrid", tps=500.0,
                   stats=stats_rows())
        write_cell(out, size, "fp8_bad", 1, [x + shift + 0.05 for x in curve], fp8="hybrid")
        write_cell(out, size, "fp8_nan", 1, [x + shift for x in curve[:-1]] + [None], fp8="hybrid")
        write_cell(out, size, "fp8_failed", 1, [x + shift for x in curve[:5]], status="failed", fp8="hybrid")
        write_cell(out, size, "fp8_low", 1, [x + shift - 0.05 for x in curve], fp8="hybrid")
    return out


def test_verdicts_on_synthetic_run_dirs(tmp_path):
    sw = load(synthetic_sweep(tmp_path / "out"))
    (w128, w256) = summarize(sw, Rule(last_k=5))
    assert w128.size == "w128" and not w128.use_valid
    assert math.isclose(w128.sigma, 0.01, rel_tol=1e-6)
    rows = {r["precision"]: r for r in w128.rows}
    assert rows["fp32"]["verdict"] == "baseline" and rows["fp32"]["seeds"] == "3/3"
    assert rows["fp8_ok"]["verdict"] == "within noise"
    assert math.isclose(rows["fp8_ok"]["gap"], 0.004, abs_tol=1e-9)
    assert math.isclose(rows["fp8_ok"]["sigmas"], 0.4, rel_tol=1e-6)
    assert math.isclose(rows["fp8_ok"]["tps_ratio"], 0.5)
    assert rows["fp8_bad"]["verdict"] == "degraded"
    assert rows["fp8_nan"]["verdict"] == "diverged"
    assert rows["fp8_failed"]["verdict"] == "diverged" and rows["fp8_failed"]["seeds"] == "0/1"
    assert rows["fp8_low"]["verdict"] == "below band"
    assert {r["precision"]: r["verdict"] for r in w256.rows} == {k: r["verdict"] for k, r in rows.items()}


def test_rule_floor_and_divergence():
    rule = Rule(floor_rel=0.0025)
    # sigma 0 (identical seeds): the floor, 0.25% of the baseline, decides
    assert rule.verdict(0.004, 2.0, 0.0) == "within noise"
    assert rule.verdict(0.006, 2.0, 0.0) == "degraded"
    assert rule.verdict(0.004, 2.0, float("nan")) == "within noise"    # one baseline seed
    assert rule.verdict(0.25, 2.0, 0.01) == "diverged"                  # > 10% of the baseline
    assert rule.verdict(0.01, 2.0, 0.01, failed=True) == "diverged"
    assert rule.verdict(float("nan"), 2.0, 0.01) == "diverged"


def test_validation_loss_is_preferred_when_every_cell_has_it(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "sweep.json").write_text(json.dumps({"baseline": "fp32", "sizes": {"s": {}},
                                                "precisions": {"fp32": {}, "fp8": {}}}))
    for seed, v in ((1, 2.00), (2, 2.02)):
        write_cell(out, "s", "fp32", seed, [3.0, 2.5], valid=v)
    write_cell(out, "s", "fp8", 1, [9.0, 9.0], valid=2.03, fp8="hybrid")   # training loss would say diverged
    (s,) = summarize(load(out), Rule())
    assert s.use_valid
    fp8 = next(r for r in s.rows if r["precision"] == "fp8")
    assert math.isclose(fp8["gap"], 0.02) and fp8["verdict"] == "within noise"


def test_report_writes_tables_and_plots(tmp_path):
    out = synthetic_sweep(tmp_path / "out")
    path = write_report(out, Rule(last_k=5))
    text = path.read_text()
    assert "| precision | setting | seeds | final loss | gap | gap/σ | rel gap % | tokens/s ratio |" in text
    assert "| fp8_ok | hybrid tensorwise (emulate) | 1/1 |" in text and "**within noise**" in text
    assert "**degraded**" in text and "**diverged**" in text and "**below band**" in text
    assert "within noise**: |gap| ≤ max(2σ, 0.25% of the baseline mean)" in text
    for name in ("loss_w128.png", "gap_w128.png", "loss_w256.png", "throughput.png", "heatmap_w128_fp8_ok.png"):
        assert (out / name).stat().st_size > 1000, name
        assert f"]({name})" in text
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "### First offending layers" in text
    assert "layer 2 linear_fc2 gradient 7.5" in text and "layer 1 linear_qkv activation 9" in text
    assert "## Configurations" in text and "| w128/fp8_ok |" in text


def test_offenders_and_heatmap_matrix():
    rows = stats_rows()
    found = offenders(rows, top=1)
    (u,) = found["gradient underflow %"]
    assert (u["layer"], u["gemm"], u["value"], u["iteration"]) == (2, "linear_fc2", 7.5, 15)
    (k,) = found["activation kurtosis growth"]
    assert (k["layer"], k["gemm"], k["value"]) == (1, "linear_qkv", 9.0)
    (o,) = found["overflow %"]
    assert (o["layer"], o["value"], o["iteration"]) == (1, 0.2, 10)
    mat, layers, iters = stats_matrix(rows, "gradient", "underflow_pct")
    assert layers == [1, 2] and iters == [5, 10, 15]
    assert mat[1].tolist() == [2.5, 5.0, 7.5] and mat[0].tolist() == [0.01, 0.01, 0.01]


def test_report_cli_takes_the_out_dir_or_says_why_not(tmp_path, capsys):
    out = synthetic_sweep(tmp_path / "out")
    assert main(["report", str(out), "--last-k", "3"]) == 0
    assert (out / "report.md").exists()
    assert main(["report", str(tmp_path / "empty")]) == 1
    assert "no cell run dirs" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------------
# Bench.
# ------------------------------------------------------------------------------------------------------------------
def test_block_shapes():
    g = {x.name: (x.k, x.n) for x in bench.block_gemms("l16", 1)}
    assert g == {"linear_qkv": (1152, 4608), "linear_proj": (1152, 1152), "linear_fc1": (1152, 5504),
                 "linear_fc2": (2752, 1152)}
    g = {x.name: (x.k, x.n) for x in bench.block_gemms("g16", 2)}
    assert g == {"linear_qkv": (1536, 3072), "linear_proj": (768, 1536), "linear_fc1": (1536, 4096),
                 "linear_fc2": (2048, 1536)}
    with pytest.raises(ValueError, match="--tp 3"):
        bench.block_gemms("l16", 3)


def test_roofline_matches_the_hand_computed_h100_figures():
    # fp8-study e_shapes (M = 262144, H100 989/1979 TFLOP/s, 3.35 TB/s, unfused current-scaling casts), l16 TP=1:
    # these GEMMs are compute-bound, where the study's and this model's memory accounting agree.
    r = bench.roofline_block(bench.block_gemms("l16", 1), 262144)
    want = {"linear_qkv": 1.22, "linear_proj": 0.99, "linear_fc1": 1.24, "linear_fc2": 1.16}
    for name, ratio in want.items():
        x = r["gemms"][name]
        assert x["gemm_only"] == pytest.approx(1979 / 989)
        assert x["with_current_casts"] == pytest.approx(ratio, abs=0.011), name
        assert x["with_current_casts"] < x["with_delayed_casts"] < x["gemm_only"]
    assert r["block"]["with_current_casts"] == pytest.approx(1.19, abs=0.01)
    assert bench.roofline_block(bench.block_gemms("g16", 1), 262144)["block"]["with_current_casts"] == \
        pytest.approx(1.33, abs=0.01)
    # a small M is memory-bound: FP8 gains less than 2x even on the GEMM alone
    assert bench.roofline(bench.Gemm("x", 576, 1152), 262144)["gemm_only"] < 2.0


def test_bench_cpu_labels_itself_and_runs(capsys, tmp_path):
    assert main(["bench", "--variant", "tiny", "--cpu-tokens", "64", "--repeats", "1", "--warmup", "0",
                 "--json", str(tmp_path / "bench.json")]) == 0
    out = capsys.readouterr().out
    if not bench.fp8_hardware():
        assert "NOT meaningful for speed" in out and "H100 roofline estimate" in out
        assert "fp32/emulated_qdq" in out
    assert "linear_fc2" in out and "block" in out
    figures = json.loads((tmp_path / "bench.json").read_text())     # what the GPU check's fp8 stage reads
    assert figures == json.loads(json.dumps(figures)) and figures


def test_bench_takes_several_variants_after_one_flag(capsys):
    """The GPU check calls `bench --variant l16 so16 g16`; `--variant l16 --variant g16` works too."""
    from genlip_mcore.fp8.__main__ import _parser

    assert _parser().parse_args(["bench", "--variant", "l16", "so16", "--variant", "g16"]).variant == \
        ["l16", "so16", "g16"]


def test_quantize_saturates_and_scales():
    import torch

    x = torch.tensor([[1.0, -2.0], [1e-9, 448.0 * 4]])
    q, inv = bench.quantize(x, torch.float8_e4m3fn)
    back = q.float() * inv
    assert torch.isfinite(back).all() and back.abs().max() == pytest.approx(1792.0)
    q, inv = bench.quantize(x, torch.float8_e5m2, dim=1)
    assert inv.shape == (2, 1) and torch.isfinite(q.float()).all()


def test_without_a_finished_baseline_nothing_is_judged(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "sweep.json").write_text(json.dumps({"baseline": "fp32", "sizes": {"s": {}},
                                                "precisions": {"fp32": {}, "fp8": {}}}))
    write_cell(out, "s", "fp32", 1, [3.0, 2.5], status="failed")
    write_cell(out, "s", "fp8", 1, [3.0, 2.5], fp8="hybrid")
    (s,) = summarize(load(out), Rule())
    assert {r["precision"]: r["verdict"] for r in s.rows} == {"fp32": "diverged", "fp8": "no baseline"}
    assert "**no baseline**" in write_report(out).read_text()
