"""The prefix-LM kernels against a naive dense reference written here from spec §3.1.

The reference builds the full [T, T] mask from per-token sample ids and image/text indicators (the reference
implementation's rule, not our key_limit shortcut), then runs an explicit softmax. Packs are laid out as the model
receives them: every sample [image][text], a padding sample text-only and last. fp64 throughout, so the
tolerances are tight and any mask error shows.
"""

import math
from types import SimpleNamespace

import pytest
import torch

from genlip_mcore.model.attention import (
    PrefixLMAttention,
    attention_flex,
    attention_local,
    build_packed_params,
    sample_mask,
)

DT = torch.float64
TOL = 1e-10


# ------------------------------------------------------------------------------------------------------------------
# The reference.
# ------------------------------------------------------------------------------------------------------------------
def dense_mask(img_lens, txt_lens) -> torch.Tensor:
    """[T, T] bool from spec §3.1: (q >= k and same sample) or (both image tokens of the same sample)."""
    sid = torch.cat([torch.full((i + t,), s) for s, (i, t) in enumerate(zip(img_lens, txt_lens, strict=True))])
    f = torch.cat([torch.cat([torch.ones(i), torch.zeros(t)]) for i, t in zip(img_lens, txt_lens, strict=True)])
    pos = torch.arange(sid.numel())
    same = sid[:, None] == sid[None, :]
    causal = pos[:, None] >= pos[None, :]
    both_img = (f[:, None] > 0) & (f[None, :] > 0)
    return same & (causal | both_img)


def dense_attention(q, k, v, img_lens, txt_lens, scale):
    """q [T, H, d], k/v [T, G, d] -> [T, H, d]; query head h reads kv head h // (H / G)."""
    rep = q.shape[1] // k.shape[1]
    k, v = (x.repeat_interleave(rep, dim=1) for x in (k, v))                       # [T, H, d]
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale                             # [H, T, T]
    scores = scores.masked_fill(~dense_mask(img_lens, txt_lens), float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def qkv(T, heads, kv_heads, hd, seed, requires_grad=True, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    shapes = [(T, heads, hd), (T, kv_heads, hd), (T, kv_heads, hd)]
    return [torch.randn(s, generator=g, dtype=dtype).requires_grad_(requires_grad) for s in shapes]


def random_pack(seed, samples=6, pad=True):
    """Image 0..9 tokens (at least one sample with 1), text 1..6 (at least one sample with 1), padding last."""
    g = torch.Generator().manual_seed(seed)
    img = torch.randint(1, 10, (samples,), generator=g).tolist()
    txt = torch.randint(1, 7, (samples,), generator=g).tolist()
    img[0], txt[1] = 1, 1
    if pad:
        img, txt = img + [0], txt + [int(torch.randint(1, 5, (1,), generator=g))]
    return img, txt


# (heads, kv heads, head_dim): MHA, GQA 2:1 and 4:1, a head_dim that is not a power of two (like 72).
SHAPES = [(4, 4, 16), (4, 2, 24), (4, 1, 24), (2, 2, 6)]


# ------------------------------------------------------------------------------------------------------------------
# The layout fields.
# ------------------------------------------------------------------------------------------------------------------
def test_build_packed_params_hand_example():
    # stream: s0 = [i i t] at 0-2, s1 = [i i t] at 3-5, padding s2 = [t t] at 6-7
    p = build_packed_params([2, 2, 0], [1, 1, 2], targets=torch.tensor([-100, 5, 6, -100, 7, -100, -100, -100]))
    assert p.total_len == 8 and p.qkv_format == "sbhd"
    assert p.sample_of_token.tolist() == [0, 0, 0, 1, 1, 1, 2, 2]
    assert p.key_limit.tolist() == [1, 1, 2, 4, 4, 5, 6, 7]
    assert p.img_idx.tolist() == [0, 1, 3, 4] and p.txt_idx.tolist() == [2, 5, 6, 7]
    assert p.inv_perm.tolist() == [0, 1, 4, 2, 3, 5, 6, 7]         # cat(img, txt)[inv_perm] = stream order
    assert torch.equal(torch.cat([p.img_idx, p.txt_idx])[p.inv_perm], torch.arange(8))
    assert p.cu_seqlens_img.tolist() == [0, 2, 4]                   # the padding sample has no image segment
    assert p.cu_seqlens_txt.tolist() == [0, 1, 2, 4]
    assert p.cu_seqlens_full.tolist() == [0, 3, 6, 8]
    assert {p.cu_seqlens_img.dtype, p.cu_seqlens_txt.dtype, p.cu_seqlens_full.dtype} == {torch.int32}
    assert (p.max_seqlen_img, p.max_seqlen_txt, p.max_seqlen_full) == (2, 2, 3)
    assert p.lm_idx.tolist() == [1, 2, 4]


@pytest.mark.parametrize("seed", range(5))
def test_key_limit_and_sample_ids_encode_the_rule(seed):
    img, txt = random_pack(seed)
    p = build_packed_params(img, txt)
    k = torch.arange(p.total_len)
    same = p.sample_of_token[:, None] == p.sample_of_token[None, :]
    assert torch.equal(same & (k[None, :] <= p.key_limit[:, None]), dense_mask(img, txt))


def test_sample_mask_by_hand():
    assert sample_mask(2, 4).int().tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert torch.equal(sample_mask(0, 3), torch.ones(3, 3).tril().bool())      # text-only: causal
    assert torch.equal(sample_mask(3, 3), torch.ones(3, 3).bool())             # image-only: bidirectional


@pytest.mark.parametrize("img, txt, match", [
    ([3, 2], [2, 0], "at least one text token"),       # a sample with zero text tokens
    ([0], [0], "at least one text token"),
    ([-1, 2], [1, 1], "at least one text token"),      # negative image length
    ([2], [1, 1], "equal length"),
    ([], [], "non-empty"),
])
def test_build_packed_params_rejects_bad_layouts(img, txt, match):
    with pytest.raises(ValueError, match=match):
        build_packed_params(img, txt)


# ------------------------------------------------------------------------------------------------------------------
# Kernels.
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("heads, kv_heads, hd", SHAPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_local_forward_and_backward_match_dense(heads, kv_heads, hd, seed):
    img, txt = random_pack(seed)
    p = build_packed_params(img, txt)
    scale = 1 / math.sqrt(hd)
    q, k, v = qkv(p.total_len, heads, kv_heads, hd, seed)
    grad_out = torch.randn(p.total_len, heads, hd, dtype=DT, generator=torch.Generator().manual_seed(seed + 99))

    out = attention_local(q, k, v, p, scale)
    ref = dense_attention(q, k, v, img, txt, scale)
    assert out.shape == (p.total_len, heads, hd)
    torch.testing.assert_close(out, ref, rtol=0, atol=TOL)
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    want = torch.autograd.grad(ref, (q, k, v), grad_out)
    for name, a, b in zip("qkv", got, want, strict=True):
        assert a.abs().max() > 0, name
        torch.testing.assert_close(a, b, rtol=0, atol=TOL, msg=f"grad of {name}")


def test_local_isolates_samples_and_hides_text_from_images():
    """Changing sample 1's text must leave sample 0 entirely, and sample 1's image tokens, unchanged."""
    img, txt = [4, 3, 0], [2, 3, 2]
    p = build_packed_params(img, txt)
    q, k, v = qkv(p.total_len, 2, 2, 8, 5, requires_grad=False)
    out = attention_local(q, k, v, p, 0.3)
    text_of_1 = slice(6 + 3, 6 + 3 + 3)
    k2, v2 = k.clone(), v.clone()
    k2[text_of_1] += 1.0
    v2[text_of_1] -= 2.0
    out2 = attention_local(q, k2, v2, p, 0.3)
    assert torch.equal(out[:9], out2[:9])                       # sample 0, and sample 1's image
    assert not torch.allclose(out[text_of_1], out2[text_of_1])
    assert torch.equal(out[12:], out2[12:])                     # padding sample


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("heads, kv_heads, hd", SHAPES)
def test_flex_forward_on_cpu_matches_dense(heads, kv_heads, hd):
    """flex compiles its kernel; the CPU backend (active once any test in this process has trained) switches dynamo
    off for Megatron's own fusions, so it is switched back on here, whatever ran before."""
    import torch._dynamo

    img, txt = random_pack(7 + hd, samples=5)
    p = build_packed_params(img, txt)
    scale = 1 / math.sqrt(hd)
    q, k, v = qkv(p.total_len, heads, kv_heads, hd, 3, requires_grad=False)
    with torch.no_grad(), torch._dynamo.config.patch(disable=False):
        out = attention_flex(q, k, v, p, scale)
    assert out.shape == (p.total_len, heads, hd) and out.dtype == DT
    torch.testing.assert_close(out, dense_attention(q, k, v, img, txt, scale), rtol=0, atol=TOL)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU start-up error")
def test_flex_backend_on_cpu_fails_at_build_with_a_clear_message(tp1):
    """torch 2.13 has no flex backward on CPU, so training with it would die at the first backward; the model
    refuses it when it is built instead, naming the field. CPU training uses `local`."""
    from genlip_mcore import config as C

    with pytest.raises(ValueError, match="model.attention_backend=flex needs a CUDA GPU"):
        tp1(C.Config(model=C.model_config("tiny", attention_backend="flex")))


def test_prefix_lm_module_local_backend():
    """The Megatron core-attention slot: [T, 1, np, hn] in, [T, 1, np*hn] out, packed params required."""
    cfg = SimpleNamespace(num_attention_heads=4, num_query_groups=2, kv_channels=12,
                          genlip_attention_backend="local", transformer_impl="local")
    attn = PrefixLMAttention(cfg, layer_number=1)
    img, txt = [5, 2, 0], [3, 1, 1]
    p = build_packed_params(img, txt)
    q, k, v = qkv(p.total_len, 4, 2, 12, 11, requires_grad=False)
    out = attn(q[:, None], k[:, None], v[:, None], None, packed_seq_params=p)
    assert out.shape == (p.total_len, 1, 4 * 12)
    ref = dense_attention(q, k, v, img, txt, 1 / math.sqrt(12))
    torch.testing.assert_close(out.view(p.total_len, 4, 12), ref, rtol=0, atol=TOL)
    with pytest.raises(ValueError, match="GenLIPPackedSeqParams"):
        attn(q[:, None], k[:, None], v[:, None], None, packed_seq_params=None)
