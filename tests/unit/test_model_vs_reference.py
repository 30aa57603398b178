"""GenLIPModel (Megatron-Core, TP=PP=1, CPU) against the plain-PyTorch reference of the spec (tests/reference).

Tolerance: 1e-5 absolute on logits and loss in fp32. Weights are random and perturbed (norms, biases, layer
scales), loaded through the declarative HF key map, so this also proves the fused layouts (query/gate/key/value
interleave, [gate_fc; fc1]) match the reference's q_proj split and SwiGLU branch order.
"""

import dataclasses

import pytest
import torch

from genlip_mcore.hf.keymap import load_megatron_tp1, megatron_to_hf
from genlip_mcore.model.attention import build_packed_params
from tests.packs import megatron_tensors, model_inputs, ref_config
from tests.reference.genlip_ref import init_ref_state_dict, make_packed_row, ref_forward, ref_loss

TOL = 1e-5
SAMPLES = [(2, 3, 5), (3, 2, 9), (4, 4, 6), (1, 5, 4)]     # (gh, gw, text tokens): different grids and captions


@pytest.fixture
def loaded(tp1):
    model, cfg = tp1()
    model.eval()
    rcfg = ref_config(cfg.model)
    sd = init_ref_state_dict(rcfg, torch.Generator().manual_seed(7))
    load_megatron_tp1(model, megatron_tensors(sd, cfg.model))
    row = make_packed_row(rcfg, SAMPLES, pad_to=96, generator=torch.Generator().manual_seed(3))
    return model, cfg, rcfg, sd, row


def _ref(rcfg, sd, row):
    return ref_forward(sd, rcfg, row["input_ids"], row["image_mask"], row["pixel_patches"],
                       row["position_ids"], row["sample_ids"])


def test_logits_and_loss_match_reference(loaded):
    model, cfg, rcfg, sd, row = loaded
    assert row["pad_len"] > 0 and len(SAMPLES) >= 3
    ref = _ref(rcfg, sd, row)
    inputs = model_inputs(row)
    real = row["sample_ids"] >= 0
    with torch.no_grad():
        logits = model(**{**inputs, "targets": None})                       # [T, V]
        losses = model(**inputs)                                             # [N_lm]
        hidden = model(**{**inputs, "targets": None}, output="hidden")      # [T, E]
    assert (logits[real] - ref["logits"][real]).abs().max() < TOL
    assert (hidden[real] - ref["hidden"][real]).abs().max() < TOL
    ref_sum, ref_n = ref_loss(ref["logits"], row["labels"])
    assert losses.numel() == ref_n > 0
    assert abs(losses.sum().item() - ref_sum.item()) < TOL * ref_n
    assert abs(losses.mean().item() - ref_sum.item() / ref_n) < TOL


def test_key_map_round_trip_is_exact(loaded):
    model, cfg, rcfg, sd, row = loaded
    back = megatron_to_hf(dict(model.state_dict()), cfg.model.num_layers, cfg.model.num_attention_heads, True)
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_changing_one_sample_leaves_the_others_unchanged(loaded):
    model, cfg, rcfg, sd, row = loaded
    inputs = model_inputs(row)
    changed = dict(inputs, tokens=inputs["tokens"].clone(), patches=inputs["patches"].clone())
    sid = row["sample_ids"]
    target = 1
    changed["tokens"][(sid == target) & ~row["image_mask"]] = 7             # new caption for sample 1
    first_patch = sum(h * w for h, w, _ in SAMPLES[:target])
    n = SAMPLES[target][0] * SAMPLES[target][1]
    changed["patches"][first_patch:first_patch + n] += 0.5                   # and a new image
    with torch.no_grad():
        a = model(**{**inputs, "targets": None})
        b = model(**{**changed, "targets": None})
    others = (sid >= 0) & (sid != target)
    assert torch.equal(a[others], b[others])
    assert (a[sid == target] - b[sid == target]).abs().max() > 1e-3        # the change did reach sample 1


def test_removing_the_caption_leaves_image_tokens_unchanged(tp1):
    model, cfg = tp1()
    model.eval()
    rcfg = ref_config(cfg.model)
    load_megatron_tp1(model, megatron_tensors(init_ref_state_dict(rcfg, torch.Generator().manual_seed(1)),
                                              cfg.model))
    full = make_packed_row(rcfg, [(3, 4, 9), (2, 2, 6)], generator=torch.Generator().manual_seed(5))
    a = model_inputs(full)
    # Same images and prompts (first 2 text tokens), captions removed.
    keep = torch.ones(full["input_ids"].numel(), dtype=torch.bool)
    start = 0
    for n_i, n_t in zip(full["img_lens"], full["txt_lens"], strict=True):
        keep[start + n_i + 2:start + n_i + n_t] = False
        start += n_i + n_t
    b = dict(a, tokens=a["tokens"][keep], position_ids=a["position_ids"][:, keep], targets=None,
             packed=build_packed_params(full["img_lens"], [2, 2]))
    with torch.no_grad():
        ha = model(**{**a, "targets": None}, output="hidden")
        hb = model(**b, output="hidden")
    img = full["image_mask"]
    assert (ha[img] - hb[img[keep]]).abs().max() < 1e-6


def test_drop_path_is_per_sample(loaded):
    """Dropping every branch of sample 0 leaves ln_post(proj) of its embeddings; the other samples are exact."""
    model, cfg, rcfg, sd, row = loaded
    inputs = model_inputs(row)
    packed = inputs["packed"]
    n_samples = len(packed.img_lens)
    scale = torch.ones(cfg.model.num_layers, 2, n_samples)
    scale[:, :, 0] = 0.0
    train_in = dict(inputs, targets=None, packed=dataclasses.replace(packed, drop_path_scale=scale))
    with torch.no_grad():
        eval_out = model(**{**inputs, "targets": None}, output="hidden")
        model.train()
        train_out = model(**train_in, output="hidden")
        model.eval()
        emb = model.embedding(inputs["tokens"], inputs["patches"], packed)[:, 0]
        skipped = model.proj(model.decoder.final_layernorm(emb))
    sid = row["sample_ids"]
    assert torch.equal(train_out[sid > 0], eval_out[sid > 0])
    assert (train_out[sid == 0] - skipped[sid == 0]).abs().max() < 1e-6


def test_drop_path_decisions_are_a_function_of_the_seed(tp1):
    from genlip_mcore.model.genlip import drop_path_scale

    a = drop_path_scale(42, 5, 24, 60, 0.2)
    assert torch.equal(a, drop_path_scale(42, 5, 24, 60, 0.2))
    assert not torch.equal(a, drop_path_scale(42, 6, 24, 60, 0.2))
    assert set(a.unique().tolist()) == {0.0, 1.0 / 0.8}
    assert abs((a == 0).float().mean().item() - 0.2) < 0.05
