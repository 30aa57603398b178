"""Checks of the plain-PyTorch GenLIP reference against the spec's own numbers."""

import pytest
import torch
import torch.nn.functional as F

from tests.reference.genlip_ref import (
    RefConfig,
    init_ref_state_dict,
    make_packed_row,
    prefix_lm_mask,
    ref_forward,
    ref_loss,
    ref_param_shapes,
    ref_token_mean_loss,
    rope_angles,
)

V_BIG = 151936
L16 = RefConfig(1152, 2752, 24, 16, text_embed_dim=1024, vocab_size=V_BIG, mrope_section=(8, 12, 12))
SO16 = RefConfig(1152, 3072, 27, 16, text_embed_dim=1152, vocab_size=V_BIG)
G16 = RefConfig(1536, 4096, 40, 16, text_embed_dim=1024, vocab_size=V_BIG, mrope_section=(16, 16, 16))
TINY = RefConfig(64, 96, 2, 4, text_embed_dim=48, vocab_size=101)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _run(sd, cfg, row):
    return ref_forward(sd, cfg, row["input_ids"], row["image_mask"], row["pixel_patches"],
                       row["position_ids"], row["sample_ids"])


# ---- section 4.5 worked example -------------------------------------------------------

def test_worked_example_positions():
    row = make_packed_row(L16, [(2, 3, 4)], generator=_gen())
    expected = torch.tensor([[0, 0, 0, 0, 0, 0, 3, 4, 5, 6],
                             [0, 0, 0, 1, 1, 1, 3, 4, 5, 6],
                             [0, 1, 2, 0, 1, 2, 3, 4, 5, 6]])
    assert torch.equal(row["position_ids"], expected)
    assert row["image_mask"].tolist() == [True] * 6 + [False] * 4


def test_worked_example_angles_and_cos():
    pos = make_packed_row(L16, [(2, 3, 4)], generator=_gen())["position_ids"]
    ang = rope_angles(pos, L16)
    assert ang.shape == (10, 72) and ang.dtype == torch.float32
    tok5 = torch.tensor([0, 0.77426, 1.19897, 0, 0.35938, 0.55651])
    tok6 = torch.tensor([3.0, 2.32279, 1.79845, 1.39248, 1.07814, 0.83477])
    torch.testing.assert_close(ang[5, :6], tok5, atol=1e-5, rtol=0)
    torch.testing.assert_close(ang[6, :6], tok6, atol=1e-5, rtol=0)
    cos5 = torch.tensor([1, 0.71494, 0.36332, 1, 0.93611, 0.84910])
    torch.testing.assert_close(ang[5].cos()[:6], cos5, atol=1e-5, rtol=0)
    assert torch.equal(ang[:, :36], ang[:, 36:])  # duplicated halves


def test_interleaved_slots_cover_g16():
    # Slot j of a text token at position p is p * inv_freq[j] regardless of axis;
    # for an image token at (0, h, w) the T slots are 0, H slots scale with h, W with w.
    pos = torch.tensor([[0], [2], [5]])
    ang = rope_angles(pos, G16)[0, :48]
    inv = 1.0 / (1e4 ** (torch.arange(0, 96, 2).float() / 96))
    j = torch.arange(48)
    mult = torch.where(j % 3 == 0, 0.0, torch.where(j % 3 == 1, 2.0, 5.0))
    torch.testing.assert_close(ang, mult * inv, atol=1e-6, rtol=1e-6)


# ---- section 3.1 mask --------------------------------------------------------------------

def test_mask_worked_example():
    row = make_packed_row(L16, [(2, 3, 4)], generator=_gen())
    m = prefix_lm_mask(row["sample_ids"], row["image_mask"])
    q = torch.arange(10)[:, None]
    k = torch.arange(10)[None, :]
    expected = torch.where(q <= 5, k <= 5, k <= q)
    assert torch.equal(m, expected)


def test_mask_two_samples_and_padding():
    row = make_packed_row(TINY, [(2, 3, 4), (3, 2, 5)], pad_to=24, generator=_gen())
    assert row["img_lens"] == [6, 6] and row["txt_lens"] == [4, 5] and row["pad_len"] == 3
    m = prefix_lm_mask(row["sample_ids"], row["image_mask"])
    assert not m[:10, 10:].any() and not m[10:, :10].any()      # samples isolated
    assert not m[21:].any() and not m[:, 21:].any()              # padding sees / is seen by nothing
    q = torch.arange(11)[:, None]
    k = torch.arange(11)[None, :]
    assert torch.equal(m[10:21, 10:21], torch.where(q <= 5, k <= 5, k <= q))


# ---- forward ---------------------------------------------------------------------------

def test_forward_shapes_and_finite_padding():
    sd = init_ref_state_dict(TINY, _gen(1))
    row = make_packed_row(TINY, [(2, 3, 4), (3, 2, 5)], pad_to=24, generator=_gen(2))
    out = _run(sd, TINY, row)
    assert out["hidden"].shape == (24, 48)
    assert out["last_hidden"].shape == (24, 64)
    assert out["logits"].shape == (24, 101)
    assert all(torch.isfinite(t).all() for t in out.values())


def test_image_outputs_independent_of_text():
    sd = init_ref_state_dict(TINY, _gen(1))
    row = make_packed_row(TINY, [(2, 3, 4)], generator=_gen(2))
    full = _run(sd, TINY, row)["last_hidden"][:6]
    img_only = {k: (v[..., :6] if k != "pixel_patches" else v)
                for k, v in row.items() if isinstance(v, torch.Tensor)}
    alone = _run(sd, TINY, img_only)["last_hidden"]
    torch.testing.assert_close(full, alone, atol=1e-6, rtol=0)


def test_samples_isolated_in_forward():
    sd = init_ref_state_dict(TINY, _gen(1))
    row = make_packed_row(TINY, [(2, 3, 4), (3, 2, 5)], pad_to=24, generator=_gen(2))
    packed = _run(sd, TINY, row)["hidden"]
    second = {k: (v[..., 10:21] if k != "pixel_patches" else v[6:])
              for k, v in row.items() if isinstance(v, torch.Tensor)}
    second["sample_ids"] = torch.zeros(11, dtype=torch.long)
    alone = _run(sd, TINY, second)["hidden"]
    torch.testing.assert_close(packed[10:21], alone, atol=1e-6, rtol=0)


def test_conv_patch_embedding_equals_linear_form():
    sd = init_ref_state_dict(TINY, _gen(1))
    pix = torch.rand((5, 3, 16, 16), generator=_gen(3)) * 2 - 1
    w = sd["vision_embeddings.patch_embedding.weight"]
    b = sd["vision_embeddings.patch_embedding.bias"]
    conv = F.conv2d(pix, w, b, stride=16).reshape(5, -1)
    lin = pix.reshape(5, -1) @ w.reshape(64, -1).t() + b      # (c, i, j) flattening
    torch.testing.assert_close(conv, lin, atol=1e-6, rtol=1e-6)


# ---- loss ------------------------------------------------------------------------------

def test_loss_shift_and_count():
    row = make_packed_row(TINY, [(2, 3, 4), (3, 2, 5)], pad_to=24, generator=_gen(2))
    labels = row["labels"]
    # Labelled = text tokens after the 2-token prompt: 2 + 3; first token can never be a target.
    assert int((labels != -100).sum()) == 5
    assert torch.equal(labels[8:10], row["input_ids"][8:10])
    logits = torch.randn((24, 101), generator=_gen(4))
    loss_sum, n = ref_loss(logits, labels)
    keep = labels[1:] != -100
    manual = -torch.log_softmax(logits[:-1][keep], -1).gather(1, labels[1:][keep, None]).sum()
    assert n == 5
    torch.testing.assert_close(loss_sum, manual)
    torch.testing.assert_close(ref_token_mean_loss(logits, labels), manual / 5)


# ---- section 1.3 / 8.1 parameter layout -------------------------------------------------

@pytest.mark.parametrize("cfg,total,nkeys", [
    (L16, 702_392_832, 490), (SO16, 817_301_376, 546), (G16, 1_543_396_352, 810)])
def test_param_counts(cfg, total, nkeys):
    sd = init_ref_state_dict(cfg, device="meta")
    assert len(sd) == nkeys
    assert sum(t.numel() for t in sd.values()) == total
    shapes = ref_param_shapes(cfg)
    assert {k: tuple(v.shape) for k, v in sd.items()} == shapes
    assert ("in_proj.weight" in sd) == (cfg.text_embed_dim != cfg.hidden_size)


def test_g16_key_shapes():
    s = ref_param_shapes(G16)
    assert s["vision_embeddings.patch_embedding.weight"] == (1536, 3, 16, 16)
    assert s["visual.layers.39.self_attn.q_proj.weight"] == (3072, 1536)
    assert s["visual.layers.0.mlp.fc2.weight"] == (1536, 4096)
    assert s["in_proj.weight"] == (1536, 1024) and s["proj.weight"] == (1024, 1536)
    assert s["embeddings.weight"] == s["lm_head.weight"] == (151936, 1024)
