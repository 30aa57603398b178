"""Initialisation follows spec §5.2, checked on a g16-width layer (statistics) and exactly on constants."""

import math

import torch

from genlip_mcore import config as C


def test_init_matches_spec_5_2(tp1):
    model, cfg = tp1(C.Config(model=C.model_config("tiny", hidden_size=256, ffn_hidden_size=512,
                                                   num_attention_heads=4, text_embed_dim=128, num_layers=2,
                                                   mrope_section=[10, 10, 10])))
    D, hd = 256, 64
    sd = dict(model.named_parameters())
    qkv = sd["decoder.layers.0.self_attention.linear_qkv.weight"].detach().view(4, 4, hd, D)   # [head, q/g/k/v]
    qg, kv = qkv[:, :2], qkv[:, 2:]
    assert abs(qg.abs().max().item() - math.sqrt(6 / (3 * D))) < 2e-3        # Xavier bound of q_proj [2D, D]
    assert abs(kv.abs().max().item() - math.sqrt(6 / (2 * D))) < 2e-3        # Xavier bound of k/v [D, D]
    proj = sd["decoder.layers.0.self_attention.linear_proj.weight"]
    assert abs(proj.abs().max().item() - math.sqrt(6 / (2 * D))) < 2e-3
    for name in ("decoder.layers.1.mlp.linear_fc1.weight", "decoder.layers.1.mlp.linear_fc2.weight",
                 "embedding.patch_embed.weight", "embedding.word_embeddings.weight", "embedding.in_proj.weight",
                 "proj.weight", "output_layer.weight"):
        assert abs(sd[name].std().item() - 0.02) < 1.5e-3, name
        assert abs(sd[name].mean().item()) < 2e-3, name
    for name, p in sd.items():
        if name.endswith("bias"):
            assert torch.count_nonzero(p) == 0, name
        elif "layernorm" in name:
            assert torch.all(p == 1), name
        elif name.endswith(("ls_attn", "ls_mlp")):
            assert torch.allclose(p, torch.full_like(p, 0.1)), name
    # Different parameters draw different values (seeded per name, not one shared stream).
    a, b = sd["decoder.layers.0.mlp.linear_fc2.weight"], sd["decoder.layers.1.mlp.linear_fc2.weight"]
    assert not torch.equal(a, b)


def test_building_the_model_uses_no_deprecated_megatron_api(tp1):
    """Every megatron-core deprecation that building our model can trigger (a layer without its tp_group, an MLP
    without ffn_hidden_size, the "full" CUDA-graph scope) points at our code, and the next release makes it an
    error. pytest.ini must ignore the tp_group message at run time (megatron-core 0.16.1's own
    RowParallelLinear.forward passes tp_group=None), so construction is checked here, with every warning recorded."""
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        tp1()
    megatron = [f"{w.category.__name__}: {w.message}" for w in seen if "megatron" in w.filename]
    assert not megatron, megatron


def test_compiled_residual_chain_trains_like_eager(tp1):
    """model.compile fuses bias + LayerScale + DropPath + residual with torch.compile (inductor's CPU backend
    here; the CPU backend switches dynamo off for Megatron's own fusions, so it is switched on for this test and
    the compiled frames are counted). fp32, drop path on, one forward and backward of a packed row: the loss within
    1e-6 relative, every gradient within 1e-5 of its largest element (fused kernels may contract a multiply and an
    add)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from genlip_mcore.model.layer import compiled_residual_add
    from tests.packs import model_inputs, ref_config
    from tests.reference.genlip_ref import make_packed_row

    def run(compile_):
        model, cfg = tp1(C.Config(model=C.model_config("tiny", drop_path_rate=0.3, compile=compile_)))
        row = make_packed_row(ref_config(cfg.model), [(2, 3, 5), (3, 3, 7), (1, 4, 6)], pad_to=64,
                              generator=torch.Generator().manual_seed(0))
        model.train()
        loss = model(**model_inputs(row, seed=3)).mean()
        loss.backward()
        return loss.item(), {n: p.main_grad if getattr(p, "main_grad", None) is not None else p.grad
                             for n, p in model.named_parameters()}

    compiled_residual_add.cache_clear()
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(disable=False):
        # (Megatron's own torch.compile'd helpers may compile here too: both runs see them alike)
        eager_loss, eager_grads = run(False)
        assert compiled_residual_add.cache_info().currsize == 0
        frames = counters["frames"]["ok"]
        loss, grads = run(True)
    assert compiled_residual_add.cache_info().currsize == 1
    assert counters["frames"]["ok"] > frames                              # the residual chain really compiled
    compiled_residual_add.cache_clear()
    torch._dynamo.reset()
    assert abs(loss - eager_loss) <= 1e-6 * abs(eager_loss)
    for name, g in eager_grads.items():
        assert g is not None and grads[name] is not None, name
        assert (grads[name] - g).abs().max() <= 1e-5 * g.abs().max().clamp(min=1e-12), name
