"""The stages of the check that need no training step: correctness (pytest -m gpu), the attention kernels against
each other, the Pillow loader's rate, and FP8 (its gpu tests and the GEMM benchmark, as subprocesses). The throughput stage runs the training
step, which nothing in the package may import, so it lives in tools/gpu_check.py.

Each stage is `fn(params, rec)`: `params` holds the mode's sizes ("sizes"), the output folder ("out"), the job's
budget in seconds ("budget_s") and stage-specific inputs; results go into `rec.data`, saved after every
measurement; `rec.data["status"]` / `["reason"]` say "failed" or "skipped" and why (default: ok).
"""

from __future__ import annotations

import importlib.util
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from genlip_mcore.gpucheck.harness import ROOT, Recorder, kill_group

FLEX_NEEDS_CUDA = ("flex attention runs on CUDA only here: torch has no flex backward on CPU "
                   "(model.attention_backend=flex is rejected without a GPU)")
# Agreement of a kernel with `local` against the fp32 truth, as tests/gpu/test_gpu_attention.py bounds it in bf16:
# relative max error under BOUND, and at most FACTOR x local's own error + FLOOR.
BOUND, FACTOR, FLOOR = 3e-2, 4.0, 2e-3
FP8_TESTS = "tests/gpu/test_gpu_fp8_*.py"      # run by the fp8 stage, not by correctness


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


# ------------------------------------------------------------------------------------------------------------------
# Correctness: the gpu-marked tests, one record per test.
# ------------------------------------------------------------------------------------------------------------------
_VERBOSE = re.compile(r"^(\S+::\S+)\s+(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)(?:\s+\((.*)\))?")
_OUTCOMES = {"PASSED": "passed", "FAILED": "failed", "SKIPPED": "skipped", "ERROR": "error", "XFAIL": "xfailed",
             "XPASS": "xpassed"}


def _junit_tests(path: Path) -> list[dict]:
    import xml.etree.ElementTree as ET

    tests = []
    for case in ET.parse(path).getroot().iter("testcase"):
        cls, name = case.get("classname", ""), case.get("name", "")
        test_id = f"{cls.replace('.', '/')}.py::{name}" if cls else name
        outcome, message = "passed", None
        for tag in ("failure", "error", "skipped"):
            child = case.find(tag)
            if child is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (child.get("message") or child.text or "").strip()[:600]
                break
        tests.append({"id": test_id, "outcome": outcome, "seconds": float(case.get("time") or 0), "message": message})
    return tests


def _verbose_tests(log: Path) -> list[dict]:
    """Outcomes from pytest -v lines: what is left when pytest was killed before writing its junit file."""
    tests = []
    for line in log.read_text(errors="replace").splitlines():
        m = _VERBOSE.match(line)
        if m:
            tests.append({"id": m.group(1), "outcome": _OUTCOMES[m.group(2)], "seconds": None,
                          "message": m.group(3)})
    return tests


def _pytest(params: dict, targets: list[str], stem: str, limit: float, extra: tuple[str, ...] = ()) -> dict:
    """`pytest -m gpu TARGETS` in its own process group under `limit` seconds: the command, exit code (None when
    killed), per-test records and their summary."""
    out = Path(params["out"])
    junit, log = out / "jobs" / f"{stem}.xml", out / "logs" / f"{stem}.log"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", *targets, *extra, "-v", "-p", "no:cacheprovider",
           f"--junitxml={junit}"]
    if _has("pytest_timeout"):
        cmd.append(f"--timeout={params['sizes']['test_timeout_s']}")
    junit.unlink(missing_ok=True)
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            kill_group(proc.pid)
            proc.wait()
    tests = _junit_tests(junit) if rc is not None and junit.exists() else _verbose_tests(log)
    summary = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "error", "skipped")}
    return {"command": " ".join(["python", *cmd[1:]]), "log": str(log.relative_to(out)), "limit_s": limit,
            "exit_code": rc, "summary": summary, "tests": tests}


def _pytest_problem(res: dict) -> Optional[tuple[str, str]]:
    """(status, reason) when a pytest run timed out or failed; None when it passed (or only skipped)."""
    s, rc = res["summary"], res["exit_code"]
    if rc is None:
        return "timeout", f"pytest ran past {res['limit_s']:.0f} s and was killed; outcomes up to then are read " \
                          "from its log"
    # 5: no test collected (every test deselected), which a tree without gpu-marked tests may give
    if s["failed"] or s["error"] or rc not in (0, 5):
        return "failed", f"pytest exit code {rc}: {s['failed']} failed, {s['error']} errors"
    return None


def correctness(params: dict, rec: Recorder) -> None:
    """The gpu-marked tests but the FP8 ones, which the fp8 stage runs next to its benchmark."""
    limit = max(5.0, params["budget_s"] - 10)             # leave time to read the results before the job's end
    rec.data.update(command="pytest -m gpu tests/gpu (running)", limit_s=limit)
    rec.save()
    rec.data.update(_pytest(params, ["tests/gpu"], "pytest-gpu", limit, (f"--ignore-glob={FP8_TESTS}",)))
    problem = _pytest_problem(rec.data)
    if problem:
        rec.data.update(status=problem[0], reason=problem[1])
    rec.save()


# ------------------------------------------------------------------------------------------------------------------
# Attention kernels against each other on full rows.
# ------------------------------------------------------------------------------------------------------------------
def _fwd_bwd(fn, qkv, go, dtype):
    """Output and q/k/v gradients of fn in `dtype`, returned in fp32."""
    import torch

    leaves = [x.detach().to(dtype).requires_grad_() for x in qkv]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, go.to(dtype))
    return [t.float() for t in (out, *grads)]


def _rel_err(a, ref) -> float:
    return ((a - ref).abs().max() / ref.abs().max()).item()


def _timings(fn, qkv, go, dtype, warmup: int, repeats: int) -> dict:
    """Median forward and forward+backward ms (after `warmup` of each, which pays flex's compile), and on CUDA the
    memory one forward+backward adds."""
    import torch

    cuda = qkv[0].is_cuda
    leaves = [x.detach().to(dtype).requires_grad_() for x in qkv]
    go = go.to(dtype)

    def once(backward: bool) -> float:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        if backward:
            fn(*leaves).backward(go)
        else:
            with torch.no_grad():
                fn(*leaves)
        if cuda:
            torch.cuda.synchronize()
        for x in leaves:
            x.grad = None
        return 1e3 * (time.perf_counter() - t0)

    for _ in range(max(1, warmup)):
        once(False)
        once(True)
    res = {"fwd_ms": statistics.median(once(False) for _ in range(repeats)),
           "fwd_bwd_ms": statistics.median(once(True) for _ in range(repeats)), "peak_mib": None}
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        once(True)
        res["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return res


def attention(params: dict, rec: Recorder) -> None:
    """`local` and `flex` forward+backward in bf16 on one stage-1-like and one stage-2-like row, each against
    `local` in fp32, and their speed."""
    import torch

    from genlip_mcore.gpucheck.packs import KINDS, describe, make_batch
    from genlip_mcore.model.attention import attention_flex, attention_local, build_packed_params

    s = params["sizes"]
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    T, heads, hd = s["tokens"], s["attn_heads"], s["attn_head_dim"]
    scale = hd ** -0.5
    rec.data.update(device=device_name(), config={"tokens": T, "heads": heads, "head_dim": hd, "dtype": "bf16",
                                                  "truth": "local in fp32", "repeats": s["attn_repeats"],
                                                  "warmup": s["warmup"]}, packs={})
    problems = []
    for kind in KINDS:
        b = make_batch(kind, T, vocab_size=1000, patch_dim=1)          # only the lengths are used
        p = build_packed_params(b.img_lens, b.txt_lens, device=device)
        g = torch.Generator(device=device).manual_seed(0)
        qkv = [torch.randn(T, heads, hd, generator=g, device=device) for _ in range(3)]
        go = torch.randn(T, heads, hd, generator=g, device=device)
        kernels = {"local": lambda q, k, v, p=p: attention_local(q, k, v, p, scale),
                   "flex": lambda q, k, v, p=p: attention_flex(q, k, v, p, scale)}
        entry = {"row": describe(b), "kernels": {}}
        rec.data["packs"][kind] = entry
        truth = _fwd_bwd(kernels["local"], qkv, go, torch.float32)
        for name, fn in kernels.items():
            if name == "flex" and not cuda:
                entry["kernels"][name] = {"skipped": FLEX_NEEDS_CUDA}
                continue
            try:
                got = _fwd_bwd(fn, qkv, go, torch.bfloat16)
                res = {"rel_err": {w: _rel_err(x, t) for w, x, t in zip(("out", "dq", "dk", "dv"), got, truth,
                                                                       strict=True)}}
                del got
                res.update(_timings(fn, qkv, go, torch.bfloat16, s["warmup"], s["attn_repeats"]))
            except Exception as e:                        # recorded; the other kernel and row still run
                res = {"error": f"{type(e).__name__}: {e}"}
                problems.append(f"{kind} {name}: {res['error']}")
            entry["kernels"][name] = res
            rec.save()
        local, flex = entry["kernels"]["local"], entry["kernels"]["flex"]
        if "rel_err" in local and "rel_err" in flex:
            entry["flex_agrees"] = all(flex["rel_err"][w] < BOUND and
                                       flex["rel_err"][w] <= FACTOR * local["rel_err"][w] + FLOOR
                                       for w in flex["rel_err"])
            entry["flex_speedup_fwd_bwd"] = local["fwd_bwd_ms"] / flex["fwd_bwd_ms"]
            if not entry["flex_agrees"]:
                problems.append(f"{kind}: flex disagrees with local beyond the bf16 bounds")
        del truth, qkv, go
    if problems:
        rec.data.update(status="failed", reason="; ".join(problems))
    rec.save()


# ------------------------------------------------------------------------------------------------------------------
# The Pillow loader against what one GPU consumes.
# ------------------------------------------------------------------------------------------------------------------
def _loader_rate(d, window_s: float) -> dict:
    """Rows from the real DataLoader for `window_s` after one row per worker (start-up, packer buffer fill). The
    rate is read over the second half of the window, once the prefetch queue (4 rows per worker) has drained."""
    import gc

    from genlip_mcore.data.loader import DataLoader
    from genlip_mcore.data.packing import pack_efficiency

    loader = DataLoader(d, patch_size=16, seed=0, dp_rank=0, dp_size=1, micro_batch_size=1)
    try:
        t_start = time.perf_counter()
        for _ in range(max(1, d.num_workers)):
            next(loader)
        startup = time.perf_counter() - t_start
        marks, efficiency = [], []                         # rows are not kept: ~40 MB of patches each at 16k
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < window_s:
            b = next(loader)
            marks.append((time.perf_counter(), b.num_samples, b.num_tokens))
            efficiency.append(pack_efficiency([b]))        # every row has the same slots: the mean is the total's
    finally:
        del loader                                         # stops the worker processes
        gc.collect()
    half = t0 + window_s / 2
    late = [m for m in marks if m[0] > half] or marks
    start = half if late is not marks else t0
    span = late[-1][0] - start
    return {"samples_per_s": sum(m[1] for m in late) / span, "rows_per_s": len(late) / span,
            "tokens_per_s": sum(m[2] for m in late) / span, "rows": len(marks), "startup_s": startup,
            "window_s": window_s, "pack_efficiency": statistics.fmean(efficiency),
            "samples_per_row": sum(m[1] for m in marks) / len(marks)}


def loader(params: dict, rec: Recorder) -> None:
    """Samples/s of the Pillow path (stage 1 at 224 px, stage 2 NaViT) on generated shapes shards, for each worker
    count, next to the samples/s one GPU consumes at the throughput stage's step rate."""
    import shutil
    import tempfile

    from genlip_mcore.config import DataConfig
    from genlip_mcore.data.__main__ import _captions
    from genlip_mcore.data.shapes import make_shapes
    from genlip_mcore.data.tokenizer import train_sentencepiece

    s = params["sizes"]
    demand = params.get("gpu_demand") or {}
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_shapes_"))
    try:
        t0 = time.perf_counter()
        make_shapes(tmp, s["shapes_samples"], s["shapes_shards"], seed=0, heldout=0, max_side=s["shapes_max_side"])
        pattern = str(tmp / "train" / "*.tar")
        tok = train_sentencepiece(list(_captions([pattern])) + [DataConfig().prompt], tmp / "tok", 400)
        rec.data.update(shards={"samples": s["shapes_samples"], "shards": s["shapes_shards"],
                                "max_side_px": s["shapes_max_side"], "generate_s": time.perf_counter() - t0},
                        decoder="pil", max_seq_len=s["tokens"], gpu_demand=demand, runs=[])
        rec.save()
        for stage in (1, 2):
            for workers in s["loader_workers"]:
                d = DataConfig(sources=[pattern], tokenizer_path=str(tok), stage=stage, max_seq_len=s["tokens"],
                               num_workers=workers)
                run = {"stage": stage, "workers": workers, **_loader_rate(d, s["loader_window_s"])}
                run["samples_per_s_per_worker"] = run["samples_per_s"] / workers
                run["vs_one_gpu"] = {v: run["samples_per_s"] / r for v, r in demand.get(f"stage{stage}", {}).items()}
                rec.data["runs"].append(run)
                rec.save()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not demand:
        rec.data["note"] = "no throughput results to compare with (that stage did not run or measured nothing)"
    rec.save()


# ------------------------------------------------------------------------------------------------------------------
# FP8: its gpu-marked tests (emulator against hardware FP8, short FP8 training) and the GEMM benchmark.
# ------------------------------------------------------------------------------------------------------------------
BENCH = ("genlip_mcore.fp8", "bench")           # `python -m genlip_mcore.fp8 bench --variant V ...` (genlip-fp8)


def _bench_args(help_text: str, json_path: Path) -> list[str]:
    """--json FILE when the bench offers it (its figures then come back whole), else nothing (stdout only)."""
    return ["--json", str(json_path)] if "--json" in help_text else []


def _run(cmd: list[str], log: Path, limit: float) -> Optional[int]:
    """Exit code of cmd (None when killed at `limit`), its output in `log`, its process group killed after."""
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            return None
        finally:
            kill_group(proc.pid)
            proc.wait()


def fp8_bench(params: dict, limit: float) -> dict:
    """`genlip-fp8 bench` on the mode's variants: its figures (from --json where it has it) and its output's tail;
    {"skipped": why} where the tree has no bench."""
    if not (_has(".".join(BENCH)) or _has(BENCH[0] + ".__main__")):
        return {"skipped": "the FP8 benchmark has not landed: no genlip_mcore.fp8 bench in this tree"}
    out = Path(params["out"])
    variants = params["sizes"]["fp8_bench_variants"]
    base = [sys.executable, "-m", BENCH[0], BENCH[1]]
    t0 = time.perf_counter()
    help_log = out / "logs" / "fp8-bench-help.log"
    rc = _run([*base, "--help"], help_log, min(30.0, limit))
    help_text = help_log.read_text(errors="replace")
    if rc != 0:
        return {"skipped": f"`python -m {BENCH[0]} {BENCH[1]} --help` exited with {rc}: the bench is not usable "
                           f"here ({help_text.strip().splitlines()[-1][:200] if help_text.strip() else 'no output'})"}
    json_path = out / "jobs" / "fp8-bench.json"
    json_path.unlink(missing_ok=True)
    cmd = [*base, "--variant", *variants, *_bench_args(help_text, json_path)]
    log = out / "logs" / "fp8-bench.log"
    left = max(5.0, limit - (time.perf_counter() - t0))
    rc = _run(cmd, log, left)
    res = {"command": " ".join(["python", *cmd[1:]]), "log": str(log.relative_to(out)), "limit_s": left,
           "exit_code": rc, "wall_s": time.perf_counter() - t0,
           "output_tail": "\n".join(log.read_text(errors="replace").splitlines()[-40:])}
    if json_path.exists():
        import json

        try:
            res["figures"] = json.loads(json_path.read_text())
        except ValueError as e:
            res["figures_error"] = f"{json_path.name} is not JSON: {e}"
    return res


def fp8(params: dict, rec: Recorder) -> None:
    """The FP8 gpu tests, then the per-GEMM BF16-vs-FP8 benchmark in what is left of the budget (at least
    `fp8_bench_min_s` is kept for it when it exists). Skipped, with the reasons, when neither ran anything."""
    from importlib import metadata

    try:
        torchao = metadata.version("torchao")
    except metadata.PackageNotFoundError:
        torchao = None
    t0 = time.perf_counter()
    s = params["sizes"]
    rec.data.update(transformer_engine=_has("transformer_engine"), torchao=torchao,
                    nvdlfw_inspect=_has("nvdlfw_inspect"), device=device_name())
    rec.save()
    budget = params["budget_s"] - 5                      # leave time to write the results
    has_bench = _has(".".join(BENCH)) or _has(BENCH[0] + ".__main__")
    files = sorted(ROOT.glob(FP8_TESTS))
    problems = []
    if files:
        limit = max(5.0, budget - (s["fp8_bench_min_s"] if has_bench else 0.0))
        tests = _pytest(params, [str(f.relative_to(ROOT)) for f in files], "pytest-fp8", limit)
        problem = _pytest_problem(tests)
        if problem:
            problems.append(problem)
    else:
        tests = {"skipped": f"no {FP8_TESTS} in this tree"}
    rec.data["tests"] = tests
    rec.save()
    left = budget - (time.perf_counter() - t0)
    if left < 5:
        bench = {"skipped": f"only {max(left, 0):.0f} s left of the stage's budget after its tests"}
    else:
        bench = fp8_bench(params, left)
    rec.data["bench"] = bench
    if "exit_code" in bench and bench["exit_code"] is None:
        problems.append(("timeout", f"the bench ran past {bench['limit_s']:.0f} s and was killed"))
    elif bench.get("exit_code"):
        problems.append(("failed", f"the bench exited with {bench['exit_code']} (see {bench['log']})"))
    if problems:
        rec.data.update(status=max((p[0] for p in problems), key=["failed", "timeout"].index),
                        reason="; ".join(p[1] for p in problems))
    elif "exit_code" not in bench and not sum(tests.get("summary", {}).get(k, 0) for k in ("passed", "failed")):
        why = tests.get("skipped") or "every FP8 gpu test was skipped (reasons in the report)"
        rec.skip(f"FP8: {why}; {bench['skipped']}")
    rec.save()
