"""`bash scripts/gpu_check.sh --smoke`: the GPU check's stages on CPU at tiny sizes, so the script that a lent GPU
runs cannot rot between GPU runs. One run of the script (about a minute on 2 cores); the tests read its report:
every stage ran, or was skipped with the reason where it needs CUDA, and its numbers are there and plausible
(positive, consistent with each other). No timing bounds: speed is what the report is for.
"""

import json
import math
import subprocess

import pytest

from tests.distributed.launch import REPO

STAGES = ["correctness", "attention", "throughput", "loader", "fp8"]
PACKS = ("stage1", "stage2")
CUDA_ONLY = "flex attention runs on CUDA only"


@pytest.fixture(scope="module")
def check(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--smoke", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads((out / "gpu_report.json").read_text()), (out / "gpu_report.md").read_text(), out, proc.stdout


def test_every_stage_ran_or_was_skipped_with_a_reason(check):
    r, _, out, stdout = check
    assert r["mode"] == "smoke" and r["status"] == "ok"
    assert list(r["stages"]) == STAGES
    for name, st in r["stages"].items():
        assert st["status"] in ("ok", "skipped"), (name, st.get("reason"), st.get("error"))
        assert 0 <= st["wall_s"] <= st["budget_s"]
        assert st["status"] == "ok" or st["reason"]
        assert f"[gpu_check] {name}" in stdout
    assert r["environment"]["packages"]["megatron-core"] and r["environment"]["cpu_count"] >= 1
    assert (out / r["stages"]["attention"]["log"]).is_file()


def test_correctness_records_each_gpu_test_with_its_skip_reason(check):
    res = check[0]["stages"]["correctness"]["results"]
    assert res["exit_code"] == 0 and "-m gpu tests/gpu" in res["command"]
    tests = {t["id"]: t for t in res["tests"]}
    assert not any("test_gpu_fp8_" in i for i in tests)                 # the fp8 stage runs those
    assert any(i.startswith("tests/gpu/test_gpu_attention.py::test_flex_compiled_matches_local[") for i in tests)
    assert any(i.startswith("tests/gpu/test_gpu_model.py::") for i in tests)
    assert res["summary"]["skipped"] == len(tests) and res["summary"]["failed"] == res["summary"]["error"] == 0
    assert all(t["outcome"] == "skipped" and t["message"] for t in tests.values())


def test_attention_kernels_measured_and_checked_against_fp32(check):
    r = check[0]
    res = r["stages"]["attention"]["results"]
    assert res["config"]["tokens"] == r["sizes"]["tokens"] and res["device"] == "cpu"
    for kind in PACKS:
        entry = res["packs"][kind]
        row = entry["row"]
        assert row["tokens"] == res["config"]["tokens"] and row["samples"] >= 1
        assert row["image_tokens"] + row["text_tokens"] + row["padding_tokens"] == row["tokens"]
        local = entry["kernels"]["local"]
        assert local["fwd_ms"] > 0 and local["fwd_bwd_ms"] > 0
        # bf16 against fp32: a rounding error, neither zero nor large
        assert set(local["rel_err"]) == {"out", "dq", "dk", "dv"}
        assert all(0 < e < 3e-2 for e in local["rel_err"].values()), local["rel_err"]
        assert CUDA_ONLY in entry["kernels"]["flex"]["skipped"]
    assert res["packs"]["stage1"]["row"]["image_tokens_per_sample"] == [196, 196.0, 196]


def test_throughput_numbers_are_consistent(check):
    res = check[0]["stages"]["throughput"]["results"]["tiny"]
    assert res["parameters"] == 637_888 and res["world"] == "1 rank, gloo" and res["build_s"] > 0
    runs = {(x["pack"], x["backend"]): x for x in res["runs"]}
    assert set(runs) == {(k, b) for k in PACKS for b in ("local", "flex")}
    for kind in PACKS:
        run = runs[(kind, "local")]
        ms = run["ms_per_step"]
        assert ms > 0 and len(run["ms_all"]) == check[0]["sizes"]["steps"]
        assert run["tokens_per_s"] == pytest.approx(run["row"]["tokens"] / ms * 1e3)
        assert run["samples_per_s"] == pytest.approx(run["row"]["samples"] / ms * 1e3)
        assert 0 < run["real_tokens_per_s"] <= run["tokens_per_s"]
        assert run["tflops"] == pytest.approx(run["model_tflop_per_step"] / ms * 1e3) and run["tflops"] > 0
        assert run["mfu"] is None and res["mfu_note"]            # no known peak for a CPU
        assert run["peak_memory_gib"] > 0
        assert all(math.isfinite(x) for x in run["losses"]) and all(run["updates"])
        p = run["profile"]
        frac = p["fraction_of_step"]
        assert set(frac) == {"attention", "gemm", "optimizer", "other"}
        assert all(frac[c] > 0 for c in ("attention", "gemm", "optimizer")), frac
        assert 0.5 < sum(frac.values()) + p["idle_fraction"] < 1.1      # the categories split the step
        assert p["host_syncs"] >= 1 and p["top_ops"]
        assert CUDA_ONLY in runs[(kind, "flex")]["skipped"]


def test_loader_rates_against_what_the_model_consumes(check):
    r = check[0]
    res = r["stages"]["loader"]["results"]
    runs = {(x["stage"], x["workers"]): x for x in res["runs"]}
    assert set(runs) == {(s, w) for s in (1, 2) for w in r["sizes"]["loader_workers"]}
    for run in runs.values():
        assert run["samples_per_s"] > 0 and run["tokens_per_s"] > 0 and run["rows"] >= 1
        assert 0 < run["pack_efficiency"] <= 1
        assert run["vs_one_gpu"]["tiny"] > 0        # the demand comes from the throughput stage of this run
    assert set(res["gpu_demand"]) == set(PACKS)


def test_fp8_stage_runs_its_tests_and_the_bench_or_says_why_not(check):
    """On CPU every FP8 gpu test skips; the bench runs at tiny size where the tree has it. Whatever is missing is
    named in the report, and a stage that ran nothing is skipped with the reasons."""
    st = check[0]["stages"]["fp8"]
    res = st["results"]
    assert res["device"] == "cpu" and res["transformer_engine"] is False
    tests = res["tests"]
    if "skipped" in tests:
        assert "test_gpu_fp8_" in tests["skipped"]
    else:
        assert "tests/gpu/test_gpu_fp8_" in tests["command"] and tests["exit_code"] in (0, 5)
        assert all(t["id"].startswith("tests/gpu/test_gpu_fp8_") and t["outcome"] == "skipped" and t["message"]
                   for t in tests["tests"])
    bench = res["bench"]
    if "skipped" in bench:
        assert "bench" in bench["skipped"]
        assert st["status"] == "skipped" and st["reason"].startswith("FP8: ")
    else:
        assert bench["exit_code"] == 0 and "--variant tiny" in bench["command"], bench.get("output_tail")
        assert st["status"] == "ok"


def test_markdown_report_has_every_stage_and_table(check):
    md = check[1]
    for name in STAGES:
        assert f"## {name}: " in md
    for header in ("| test | outcome |", "| row | kernel | fwd ms |", "| variant | pack (samples) | attention | ms/step",
                   "| stage | workers | samples/s |", "### FP8 tests", "### GEMM benchmark"):
        assert header in md
    assert "skipped: " + CUDA_ONLY in md
