"""GenLIPModel on a GPU: the torch-native path (flex attention) and, where installed, the Transformer Engine spec,
against the CPU-exact `local` attention and the spec reference. Runs on a lent device; skipped elsewhere."""

import importlib.util

import pytest
import torch

from genlip_mcore import config as C
from genlip_mcore.hf.keymap import load_megatron_tp1
from tests.packs import megatron_tensors, model_inputs, ref_config
from tests.reference.genlip_ref import init_ref_state_dict, make_packed_row, ref_forward

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
HAS_TE = importlib.util.find_spec("transformer_engine") is not None
SAMPLES = [(14, 14, 74), (10, 12, 40), (3, 20, 90), (16, 8, 12)]

# TE's fused norms live inside the following linear: local-spec names -> TE names.
TE_NAMES = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_",
            "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}


def _te_rename(name):
    for a, b in TE_NAMES.items():
        name = name.replace(a, b)
    return name


def _build(tp1, backend, impl="local", bf16=False):
    cfg = C.Config(model=C.model_config("tiny", hidden_size=256, ffn_hidden_size=512, num_attention_heads=4,
                                        text_embed_dim=128, num_layers=3, mrope_section=[10, 10, 10],
                                        attention_backend=backend, transformer_impl=impl),
                   precision=C.PrecisionConfig(bf16=bf16))
    model, cfg = tp1(cfg)
    return model.cuda().eval(), cfg


@pytest.mark.parametrize("backend,impl", [("flex", "local")] + ([("te", "transformer_engine")] if HAS_TE else []))
def test_gpu_path_matches_reference_fp32(tp1, backend, impl):
    model, cfg = _build(tp1, backend, impl)
    rcfg = ref_config(cfg.model)
    sd = init_ref_state_dict(rcfg, torch.Generator().manual_seed(0))
    load_megatron_tp1(model, {k: v.cuda() for k, v in megatron_tensors(sd, cfg.model).items()},
                      rename=_te_rename if impl == "transformer_engine" else (lambda n: n))
    row = make_packed_row(rcfg, SAMPLES, pad_to=1024, generator=torch.Generator().manual_seed(1))
    ref = ref_forward(sd, rcfg, row["input_ids"], row["image_mask"], row["pixel_patches"], row["position_ids"],
                      row["sample_ids"])
    inputs = model_inputs(row)
    from genlip_mcore.model import build_packed_params

    inputs["packed"] = build_packed_params(inputs["packed"].img_lens, inputs["packed"].txt_lens, device="cuda")
    inputs = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in inputs.items()}
    with torch.no_grad():
        logits = model(**{**inputs, "targets": None}).cpu()
    real = row["sample_ids"] >= 0
    # TF32 matmuls and fused kernels: a looser bound than CPU fp32.
    assert (logits[real] - ref["logits"][real]).abs().max() < 2e-3


@pytest.mark.skipif(not HAS_TE, reason="Transformer Engine not installed")
def test_te_fp8_forward_backward_runs(tp1):
    """FP8 (delayed scaling) through the TE spec: finite loss and gradients on an FP8-aligned pack."""
    cfg = C.Config(model=C.model_config("tiny", hidden_size=256, ffn_hidden_size=512, num_attention_heads=4,
                                        text_embed_dim=128, num_layers=2, mrope_section=[10, 10, 10],
                                        attention_backend="te", transformer_impl="transformer_engine"),
                   precision=C.PrecisionConfig(bf16=True, fp8="hybrid"), data=C.DataConfig(max_seq_len=1024))
    model, cfg = tp1(cfg)
    model = model.cuda().bfloat16().train()
    rcfg = ref_config(cfg.model)
    row = make_packed_row(rcfg, SAMPLES, pad_to=1024, generator=torch.Generator().manual_seed(2))
    inputs = model_inputs(row)
    from genlip_mcore.model import build_packed_params

    inputs["packed"] = build_packed_params(inputs["packed"].img_lens, inputs["packed"].txt_lens, device="cuda",
                                           targets=inputs["targets"])
    inputs = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in inputs.items()}
    loss = model(**inputs).mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
