"""Megatron TransformerConfig and layer specs for GenLIP (local torch modules, or Transformer Engine).

The two specs build the same parameters under the same checkpoint keys: the local spec maps its separate norms
onto TE's fused names through `sharded_state_dict_keys_map`, so a checkpoint moves between them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayerSubmodules

from genlip_mcore.config import Config, fp8_backend
from genlip_mcore.model.attention import PrefixLMAttention
from genlip_mcore.model.layer import GenLIPTransformerLayer, SPLayerNorm


def _no_init(weight) -> None:
    """Leave the tensor as allocated; `model.init.initialize_weights` fills it afterwards."""


@dataclass
class GenLIPTransformerConfig(TransformerConfig):
    """TransformerConfig plus what Megatron does not have (the pattern Megatron-Bridge uses for Qwen3-VL)."""

    layer_scale_init: float = 0.1
    drop_path_rate: float = 0.0
    genlip_attention_backend: str = "auto"
    genlip_compile: bool = False          # model.compile: torch.compile the layers' residual chain (layer.py)
    # "emulate" | "torchao": the local spec builds FP8-capable linears (model/fp8/linear.py); None: megatron's own.
    # Megatron itself never sees fp8 set then, so its TE-only FP8 paths stay off.
    genlip_fp8_linears: Optional[str] = None
    # precision.fp8_tp_invariant: the LM head is an FP8-capable linear too (kept high precision, float64 sums) and
    # the cross-entropy runs in float64 (genlip.py)
    genlip_tp_invariant: bool = False


def _fp8_kwargs(cfg: Config) -> dict:
    """Megatron's FP8 fields, for the te backend only (the other backends do FP8 in our linears)."""
    pr = cfg.precision
    if pr.fp8 is None or fp8_backend(pr, cfg.model) != "te":
        return {}
    kw = dict(fp8=pr.fp8, fp8_recipe=pr.fp8_recipe, fp8_amax_history_len=pr.fp8_amax_history_len,
              fp8_amax_compute_algo=pr.fp8_amax_compute_algo, fp8_param=pr.fp8_param, fp8_margin=pr.fp8_margin,
              first_last_layers_bf16=pr.first_last_layers_bf16,
              num_layers_at_start_in_bf16=pr.num_layers_at_start_in_bf16,
              num_layers_at_end_in_bf16=pr.num_layers_at_end_in_bf16)
    if pr.quant_recipe_file:
        from megatron.core.quantization.utils import load_quantization_recipe

        kw["quant_recipe"] = load_quantization_recipe(pr.quant_recipe_file)
    return kw


def transformer_config(cfg: Config, *, use_cpu_initialization: bool | None = None) -> GenLIPTransformerConfig:
    m, p, pr = cfg.model, cfg.parallel, cfg.precision
    on_gpu = torch.cuda.is_available()
    te = m.transformer_impl == "transformer_engine"
    dtype = torch.bfloat16 if pr.bf16 else torch.float32
    batch_p2p = p.batch_p2p_comm if p.batch_p2p_comm is not None else on_gpu
    kw = _fp8_kwargs(cfg)
    ours = fp8_backend(pr, m) if pr.fp8 is not None else None
    if m.recompute_granularity is not None:
        kw.update(recompute_granularity=m.recompute_granularity)
        if m.recompute_granularity == "full":
            kw.update(recompute_method=m.recompute_method, recompute_num_layers=m.recompute_num_layers)
        else:
            kw.update(recompute_modules=list(m.recompute_modules))
    return GenLIPTransformerConfig(
        num_layers=m.num_layers, hidden_size=m.hidden_size, ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads, num_query_groups=m.num_attention_heads,
        kv_channels=m.head_dim, normalization="LayerNorm", layernorm_epsilon=m.layernorm_epsilon,
        add_bias_linear=True, add_qkv_bias=True, gated_linear_unit=True, activation_func=F.silu,
        attention_output_gate=True, hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
        sequence_parallel=p.sequence_parallel, context_parallel_size=1,
        bf16=pr.bf16, params_dtype=dtype, pipeline_dtype=dtype, autocast_dtype=dtype,
        use_cpu_initialization=(not on_gpu) if use_cpu_initialization is None else use_cpu_initialization,
        # Megatron's init helpers also tag TP-split weights (tensor_model_parallel, partition_dim), which the
        # grad-norm and our own init rely on; so they run, with no-op draws: model/init.py draws every weight.
        perform_initialization=True, init_method=_no_init, output_layer_init_method=_no_init,
        gradient_accumulation_fusion=False, bias_activation_fusion=False, masked_softmax_fusion=False,
        bias_dropout_fusion=False, apply_rope_fusion=False, persist_layer_norm=False,
        batch_p2p_comm=batch_p2p, variable_seq_lengths=False, calculate_per_token_loss=True,
        transformer_impl="transformer_engine" if te else "local",
        layer_scale_init=m.layer_scale_init, drop_path_rate=m.drop_path_rate,
        genlip_attention_backend=m.attention_backend, genlip_compile=m.compile,
        genlip_fp8_linears=ours if ours in ("emulate", "torchao") else None,
        genlip_tp_invariant=pr.fp8_tp_invariant,
        cuda_graph_scope=[],        # megatron-core's default "full" is deprecated in its favour (and warns)
        **kw,
    )


def layer_spec(transformer_impl: str, ffn_hidden_size: int, fp8_linears: Optional[str] = None) -> ModuleSpec:
    if transformer_impl == "transformer_engine":
        from megatron.core.extensions.transformer_engine import (
            TELayerNormColumnParallelLinear,
            TERowParallelLinear,
        )

        qkv, proj, fc1, fc2 = TELayerNormColumnParallelLinear, TERowParallelLinear, \
            TELayerNormColumnParallelLinear, TERowParallelLinear
        norm, keys_map = IdentityOp, {}
    else:
        col, row = ColumnParallelLinear, RowParallelLinear
        if fp8_linears:                    # same parameters and keys; FP8 GEMMs once model/fp8/attach.py runs
            from genlip_mcore.model.fp8.linear import EmuColumnParallelLinear, EmuRowParallelLinear

            col, row = EmuColumnParallelLinear, EmuRowParallelLinear
        qkv, proj, fc1, fc2 = col, row, col, row
        norm = SPLayerNorm
        keys_map = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}
    return ModuleSpec(
        module=GenLIPTransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.no_mask},     # the mask lives in PrefixLMAttention
                submodules=SelfAttentionSubmodules(linear_qkv=qkv, core_attention=PrefixLMAttention,
                                                   linear_proj=proj),
            ),
            self_attn_bda=get_bias_dropout_add,                     # replaced by the layer's residual add
            pre_mlp_layernorm=norm,
            # ffn_hidden_size given explicitly: megatron-core deprecates taking it from the config
            mlp=ModuleSpec(module=MLP, params={"ffn_hidden_size": ffn_hidden_size},
                           submodules=MLPSubmodules(linear_fc1=fc1, linear_fc2=fc2)),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=keys_map,
        ),
    )


def final_norm_cls(transformer_impl: str):
    if transformer_impl == "transformer_engine":
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    return SPLayerNorm


def block_spec(config: GenLIPTransformerConfig, vp_stage=None) -> TransformerBlockSubmodules:
    n = get_num_layers_to_build(config, vp_stage=vp_stage)
    spec = layer_spec(config.transformer_impl, config.ffn_hidden_size, getattr(config, "genlip_fp8_linears", None))
    return TransformerBlockSubmodules(layer_specs=[spec] * n,
                                      layer_norm=final_norm_cls(config.transformer_impl))
