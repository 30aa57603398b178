"""Prefix-LM attention on one packed row: our kernels against the dense-mask SDPA baseline, side by side.

    python tools/bench_attention.py                       # CPU: local vs dense, fp32
    python tools/bench_attention.py --device cuda         # GPU: local, flex (compiled) and dense, bf16
    python tools/bench_attention.py --json                # one JSON object instead of the table

The row holds --samples samples summing to exactly --tokens tokens: image lengths drawn in [--img-min, --img-max],
the rest text, split at random (every sample keeps at least one text token). The baseline is what the reference's
dense path does: one SDPA call over the whole row with a [T, T] boolean mask (built once, outside the timing; its
build time is reported separately). Times are medians over --repeats after --warmup runs, contenders alternating
order every repeat. Peak memory: on CUDA torch.cuda.max_memory_allocated over one fwd+bwd; on CPU the RSS
high-water mark of one fwd+bwd in a fresh process per contender (/proc clear_refs), next to the analytic sizes of
the mask and of the score matrix a non-fused kernel would materialise.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

try:
    import genlip_mcore  # noqa: F401
except ImportError:  # run from a checkout without installing
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from genlip_mcore.model.attention import attention_flex, attention_local, build_packed_params

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ------------------------------------------------------------------------------------------------------------------
# The row and the contenders.
# ------------------------------------------------------------------------------------------------------------------
def row_lengths(tokens: int, samples: int, img_min: int, img_max: int, seed: int) -> tuple[list[int], list[int]]:
    g = torch.Generator().manual_seed(seed)
    img = torch.randint(img_min, img_max + 1, (samples,), generator=g).tolist()
    rest = tokens - sum(img)
    if rest < samples:
        raise SystemExit(f"--tokens {tokens} leaves {rest} text tokens for {samples} samples (need >= 1 each); "
                         f"lower --img-max or raise --tokens")
    # A random composition of `rest` into `samples` parts >= 1: cut points drawn without replacement.
    cuts = sorted((torch.randperm(rest - 1, generator=g)[:samples - 1] + 1).tolist())
    txt = [b - a for a, b in zip([0] + cuts, cuts + [rest], strict=True)]
    return img, txt


def dense_mask(p) -> torch.Tensor:
    """[T, T] bool, True = attend: the whole row's prefix-LM mask, as the dense reference path builds it."""
    k = torch.arange(p.total_len, device=p.key_limit.device)
    same = p.sample_of_token[:, None] == p.sample_of_token[None, :]
    return same & (k[None, :] <= p.key_limit[:, None])


def attention_dense(q, k, v, mask, scale):
    qh, kh, vh = (x.transpose(0, 1)[None] for x in (q, k, v))                    # [1, heads, T, hd]
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)                                                  # [T, heads, hd]


def contenders(args, p, scale) -> tuple[dict, dict]:
    """name -> fn(q, k, v), and name -> why it was left out."""
    fns, skipped = {"local": lambda q, k, v: attention_local(q, k, v, p, scale)}, {}
    if args.device == "cuda":
        fns["flex"] = lambda q, k, v: attention_flex(q, k, v, p, scale)
    else:
        skipped["flex"] = "cpu: torch has no flex backward on CPU, and eager CPU flex materialises the scores"
    mask = dense_mask(p)
    fns["dense"] = lambda q, k, v: attention_dense(q, k, v, mask, scale)
    return fns, skipped


# ------------------------------------------------------------------------------------------------------------------
# Measurements.
# ------------------------------------------------------------------------------------------------------------------
def make_inputs(args, T, device):
    g = torch.Generator(device=device).manual_seed(args.seed)
    dt = DTYPES[args.dtype]
    q = torch.randn(T, args.heads, args.head_dim, generator=g, device=device, dtype=dt)
    k = torch.randn(T, args.kv_heads, args.head_dim, generator=g, device=device, dtype=dt)
    v = torch.randn(T, args.kv_heads, args.head_dim, generator=g, device=device, dtype=dt)
    go = torch.randn(T, args.heads, args.head_dim, generator=g, device=device, dtype=dt)
    return [x.requires_grad_() for x in (q, k, v)], go


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def run_once(fn, qkv, go, backward: bool, device: str) -> float:
    _sync(device)
    t0 = time.perf_counter()
    if backward:
        out = fn(*qkv)
        out.backward(go)
    else:
        with torch.no_grad():
            fn(*qkv)
    _sync(device)
    dt = time.perf_counter() - t0
    for x in qkv:
        x.grad = None
    return dt


def time_all(fns, qkv, go, args) -> dict:
    names = list(fns)
    for _ in range(args.warmup):                            # both modes: compiled flex traces each once
        for n in names:
            run_once(fns[n], qkv, go, False, args.device)
            run_once(fns[n], qkv, go, True, args.device)
    fwd = {n: [] for n in names}
    both = {n: [] for n in names}
    for r in range(args.repeats):
        for n in (names if r % 2 == 0 else names[::-1]):
            fwd[n].append(run_once(fns[n], qkv, go, False, args.device))
            both[n].append(run_once(fns[n], qkv, go, True, args.device))
    return {n: {"fwd_ms": 1e3 * statistics.median(fwd[n]), "fwd_bwd_ms": 1e3 * statistics.median(both[n]),
                "fwd_bwd_ms_all": [round(1e3 * t, 2) for t in both[n]]} for n in names}


def cuda_peak_bytes(fn, qkv, go) -> int:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn(*qkv).backward(go)
    torch.cuda.synchronize()
    for x in qkv:
        x.grad = None
    return torch.cuda.max_memory_allocated() - base


def _proc_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _cpu_peak_child(argv: list[str], name: str, conn) -> None:
    """In a fresh process: the RSS rise of one fwd+bwd of `name`, after a tiny warm-up that pays lazy init."""
    try:
        args = parse(argv)
        torch.set_num_threads(args.threads or torch.get_num_threads())
        scale = 1 / math.sqrt(args.head_dim)
        tiny = build_packed_params([3, 2], [2, 1])
        tiny_fns, _ = contenders(args, tiny, scale)
        qkv, go = make_inputs(args, tiny.total_len, "cpu")
        tiny_fns[name](*qkv).backward(go)
        img, txt = row_lengths(args.tokens, args.samples, args.img_min, args.img_max, args.seed)
        p = build_packed_params(img, txt)
        fns, _ = contenders(args, p, scale)
        qkv, go = make_inputs(args, p.total_len, "cpu")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                                     # reset the RSS high-water mark (Linux >= 4.0)
        base = _proc_kb("VmRSS")
        fns[name](*qkv).backward(go)
        conn.send(1024 * (_proc_kb("VmHWM") - base))
    except Exception as e:                                   # reported, not fatal: timings stand on their own
        conn.send(f"{type(e).__name__}: {e}")


def cpu_peak_bytes(argv: list[str], name: str):
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_cpu_peak_child, args=(argv, name, child))
    proc.start()
    result = parent.recv() if parent.poll(600) else "timed out"
    proc.join(10)
    return result


def analytic(p, args) -> dict:
    """Bytes of the mask each contender holds, and of the [heads, q, k] scores a non-fused kernel materialises."""
    elt = torch.finfo(DTYPES[args.dtype]).bits // 8
    full = [i + t for i, t in zip(p.img_lens, p.txt_lens, strict=True)]
    T, n_max = p.total_len, max(full)
    return {
        "dense": {"mask_bytes": T * T, "scores_bytes": args.heads * T * T * elt},
        # one [n, n] mask per sample, built and freed in turn; the block mask's
        "local": {"mask_bytes": n_max * n_max, "mask_bytes_all_samples": sum(n * n for n in full),
                  "scores_bytes": args.heads * n_max * n_max * elt},
        # flex: per-block indices of the [T/128, T/128] block grid (int32), no element mask in the kernel
        "flex": {"mask_bytes": None, "scores_bytes": 0},
    }


# ------------------------------------------------------------------------------------------------------------------
# CLI.
# ------------------------------------------------------------------------------------------------------------------
def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--img-min", type=int, default=128)
    ap.add_argument("--img-max", type=int, default=224)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=None, help="default: --heads (no GQA, as GenLIP)")
    ap.add_argument("--head-dim", type=int, default=72)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: fp32 on cpu, bf16 on cuda")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    args.kv_heads = args.kv_heads or args.heads
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    if args.heads % args.kv_heads:
        ap.error("--kv-heads must divide --heads")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device")
    return args


def bench(argv=None) -> dict:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    img, txt = row_lengths(args.tokens, args.samples, args.img_min, args.img_max, args.seed)
    p = build_packed_params(img, txt, device=args.device)
    scale = 1 / math.sqrt(args.head_dim)
    t0 = time.perf_counter()
    dense_mask(p)
    _sync(args.device)
    mask_build_ms = 1e3 * (time.perf_counter() - t0)
    fns, skipped = contenders(args, p, scale)
    qkv, go = make_inputs(args, p.total_len, args.device)

    with torch.no_grad():                                     # the contenders must agree before we time them
        ref = fns["local"](*qkv).float()
        max_diff = {n: (fns[n](*qkv).float() - ref).abs().max().item() for n in fns if n != "local"}
    results = time_all(fns, qkv, go, args)
    sizes = analytic(p, args)
    for n in fns:
        results[n].update(sizes[n])
        if not args.no_memory:
            results[n]["peak_bytes"] = (cuda_peak_bytes(fns[n], qkv, go) if args.device == "cuda"
                                        else cpu_peak_bytes(sys.argv[1:] if argv is None else argv, n))
    return {
        "config": {k: getattr(args, k) for k in ("tokens", "samples", "heads", "kv_heads", "head_dim", "dtype",
                                                 "device", "repeats", "warmup", "seed")},
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "img_lens": img, "txt_lens": txt, "dense_mask_build_ms": mask_build_ms,
        "max_abs_diff_vs_local": max_diff, "results": results, "skipped": skipped,
        "peak_memory_method": None if args.no_memory else (
            "torch.cuda.max_memory_allocated - allocated before, one fwd+bwd" if args.device == "cuda"
            else "RSS high-water rise of one fwd+bwd in a fresh process (after a tiny warm-up)"),
    }


def _mb(b) -> str:
    return "-" if b is None else (b if isinstance(b, str) else f"{b / 1e6:.2f}")


def report(r: dict) -> str:
    c, res = r["config"], r["results"]
    lines = [
        f"prefix-LM attention, one packed row: T={c['tokens']} tokens in {c['samples']} samples "
        f"(image {min(r['img_lens'])}-{max(r['img_lens'])}, text {min(r['txt_lens'])}-{max(r['txt_lens'])}), "
        f"heads {c['heads']} (kv {c['kv_heads']}), head_dim {c['head_dim']}, {c['dtype']}, {r['device_name']}, "
        f"{r['threads']} threads, torch {r['torch']}",
        f"median of {c['repeats']} repeats after {c['warmup']} warm-up, order alternating; "
        f"dense mask built once in {r['dense_mask_build_ms']:.1f} ms (not timed below)",
        "",
        f"{'kernel':8} {'fwd ms':>10} {'fwd+bwd ms':>11} {'peak MB':>9} {'mask MB':>9} {'scores MB*':>11}  "
        "max|diff| vs local",
    ]
    for n, x in res.items():
        diff = r["max_abs_diff_vs_local"].get(n)
        lines.append(f"{n:8} {x['fwd_ms']:10.2f} {x['fwd_bwd_ms']:11.2f} {_mb(x.get('peak_bytes')):>9} "
                     f"{_mb(x['mask_bytes']):>9} {_mb(x['scores_bytes']):>11}  {'' if diff is None else f'{diff:.1e}'}")
    for n, why in r["skipped"].items():
        lines.append(f"{n:8} skipped: {why}")
    lines.append("* scores MB: the [heads, q, k] matrix a non-fused kernel would materialise (analytic); mask MB: "
                 "dense = the [T, T] bool, local = the largest per-sample [n, n] bool (built one at a time, "
                 f"{_mb(res['local']['mask_bytes_all_samples'])} MB over all samples)")
    if r["peak_memory_method"]:
        lines.append(f"peak MB: {r['peak_memory_method']}")
    d = res["dense"]
    for n in (k for k in res if k != "dense"):
        x = res[n]
        mem = ""
        if isinstance(x.get("peak_bytes"), int) and isinstance(d.get("peak_bytes"), int):
            mem = f", peak {_mb(x['peak_bytes'])} MB vs {_mb(d['peak_bytes'])} MB"
        mask = f", mask bytes {_mb(d['mask_bytes'])} MB vs {_mb(x['mask_bytes'])} MB" if x["mask_bytes"] else ""
        lines.append(f"{n} vs dense: {d['fwd_bwd_ms'] / x['fwd_bwd_ms']:.1f}x faster fwd+bwd "
                     f"({d['fwd_ms'] / x['fwd_ms']:.1f}x fwd){mask}{mem}")
    return "\n".join(lines)


def main(argv=None) -> int:
    r = bench(argv)
    print(json.dumps(r) if parse(argv).json else report(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
