"""Prefix-LM kernels on CUDA at a realistic size: compiled flex and Transformer Engine against `local`.

Each kernel's error is measured against an fp64 run of `local` (itself checked against a dense reference in
tests/unit/test_attention.py); the kernel under test must be within a fixed bound and no worse than a small factor
of `local`'s own error in the same dtype, for the output and the q/k/v gradients.
"""

import importlib.util
import math

import pytest
import torch

from genlip_mcore.model.attention import attention_flex, attention_local, build_packed_params

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

HEADS, HD = 16, 96                                    # g16
# Relative max error (to the fp64 tensor's max magnitude): a hard bound for any kernel, and the allowance over
# `local`'s own error in the same dtype (FACTOR x local + FLOOR; flex runs fp32 as IEEE unless TF32 is enabled).
BOUND = {torch.float32: 2e-3, torch.bfloat16: 3e-2}
FLOOR = {torch.float32: 2e-5, torch.bfloat16: 2e-3}
FACTOR = 4.0


def uniform_pack():
    return [196] * 16, [74] * 16                      # 16 samples of 224 px + 74 caption tokens: T = 4320


def varied_pack():
    g = torch.Generator().manual_seed(0)
    img = torch.randint(64, 400, (15,), generator=g).tolist()
    txt = torch.randint(1, 120, (15,), generator=g).tolist()
    return img + [0], txt + [37]                      # trailing text-only padding sample


def inputs(T, kv_heads, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(T, HEADS, HD, device="cuda", generator=g, dtype=torch.float64)
    k = torch.randn(T, kv_heads, HD, device="cuda", generator=g, dtype=torch.float64)
    v = torch.randn(T, kv_heads, HD, device="cuda", generator=g, dtype=torch.float64)
    go = torch.randn(T, HEADS, HD, device="cuda", generator=g, dtype=torch.float64)
    return (q, k, v), go


def run(fn, qkv64, go64, dtype):
    """Output and q/k/v gradients of fn in `dtype`, returned in fp64."""
    leaves = [x.detach().to(dtype).requires_grad_() for x in qkv64]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, go64.to(dtype))
    return [t.double() for t in (out, *grads)]


def rel_err(a, ref):
    return ((a - ref).abs().max() / ref.abs().max()).item()


def check(name, got, local, truth, dtype):
    for what, g, l, t in zip(("out", "dq", "dk", "dv"), got, local, truth, strict=True):
        e_got, e_local = rel_err(g, t), rel_err(l, t)
        assert e_got < BOUND[dtype], f"{name} {what} {dtype}: rel err {e_got:.2e}"
        assert e_got <= FACTOR * e_local + FLOOR[dtype], f"{name} {what} {dtype}: {e_got:.2e} vs local {e_local:.2e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("pack, kv_heads", [(uniform_pack, HEADS), (varied_pack, HEADS), (varied_pack, 4)],
                         ids=["uniform", "varied", "varied-gqa"])
def test_flex_compiled_matches_local(pack, kv_heads, dtype):
    img, txt = pack()
    p = build_packed_params(img, txt, device="cuda")
    scale = 1 / math.sqrt(HD)
    qkv, go = inputs(p.total_len, kv_heads, dtype)
    truth = run(lambda q, k, v: attention_local(q, k, v, p, scale), qkv, go, torch.float64)
    local = run(lambda q, k, v: attention_local(q, k, v, p, scale), qkv, go, dtype)
    flex = run(lambda q, k, v: attention_flex(q, k, v, p, scale), qkv, go, dtype)
    check("flex", flex, local, truth, dtype)


def test_te_backend_matches_local():
    if importlib.util.find_spec("transformer_engine") is None:
        pytest.skip("Transformer Engine not installed")
    from genlip_mcore import config as C
    from genlip_mcore.model.attention import PrefixLMAttention
    from genlip_mcore.model.spec import transformer_config

    cfg = C.Config(model=C.model_config("g16", attention_backend="te", transformer_impl="transformer_engine"),
                   precision=C.PrecisionConfig(bf16=True))
    C.validate(cfg)
    attn = PrefixLMAttention(transformer_config(cfg), layer_number=1).cuda()
    assert attn.backend == "te"
    dtype = torch.bfloat16                              # TE's fused/flash THD kernels take bf16/fp16 only
    for img, txt in (uniform_pack(), varied_pack()):
        p = build_packed_params(img, txt, device="cuda")
        qkv, go = inputs(p.total_len, HEADS, dtype)
        scale = 1 / math.sqrt(HD)
        truth = run(lambda q, k, v, p=p, scale=scale: attention_local(q, k, v, p, scale), qkv, go, torch.float64)
        local = run(lambda q, k, v, p=p, scale=scale: attention_local(q, k, v, p, scale), qkv, go, dtype)
        te = run(lambda q, k, v, p=p: attn(q[:, None], k[:, None], v[:, None], None, packed_seq_params=p)
                 .view(p.total_len, HEADS, HD), qkv, go, dtype)
        check("te", te, local, truth, dtype)
