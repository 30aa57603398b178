"""GenLIPModel: one ViT over [image patches][caption tokens] with a prefix-LM mask and a caption-only LM loss.

Dimensions: T packed tokens (T_l = T/TP on this rank under SP), D hidden, E text_embed_dim, V vocab (V/TP per
rank), N_lm positions whose next token is a caption label, L layers.

Pipeline contract as Megatron's GPTModel: embeddings only on the first stage (`pre_process`), the final norm, `proj`
and the LM head only on the last (`post_process`), `set_input_tensor` for the rest. Every stage receives the same
packed params and positions (RoPE is recomputed per stage; it has no parameters).
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel.layers import ColumnParallelLinear
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock
from torch import Tensor

from genlip_mcore.config import ModelConfig
from genlip_mcore.model.attention import GenLIPPackedSeqParams
from genlip_mcore.model.embeddings import GenLIPEmbedding, replicated_linear
from genlip_mcore.model.layer import tp_group
from genlip_mcore.model.rope import mrope_angles
from genlip_mcore.model.spec import GenLIPTransformerConfig, _no_init, block_spec


def drop_path_scale(seed: int, micro_batch_seed: int, num_layers: int, num_samples: int, rate: float,
                    device=None) -> Tensor:
    """[L, 2, S]: 0 (dropped) or 1/(1-p) per layer, branch and sample. A pure function of the seeds, so every
    TP rank, every pipeline stage and every parallel layout draws the same decisions for the same data."""
    g = torch.Generator().manual_seed(zlib.crc32(f"droppath/{seed}/{micro_batch_seed}".encode()))
    keep = torch.rand(num_layers, 2, num_samples, generator=g) >= rate
    return (keep.float() / (1.0 - rate)).to(device)


class GenLIPModel(MegatronModule):
    def __init__(self, config: GenLIPTransformerConfig, model_cfg: ModelConfig, pre_process: bool = True,
                 post_process: bool = True, vp_stage: Optional[int] = None, seed: int = 0):
        super().__init__(config=config)
        self.model_type = ModelType.encoder_or_decoder
        self.share_embeddings_and_output_weights = False   # untied (spec §2.7); read by finalize_model_grads
        self.model_cfg = model_cfg
        self.pre_process, self.post_process, self.vp_stage = pre_process, post_process, vp_stage
        self.seed = seed
        D, E, V = config.hidden_size, model_cfg.text_embed_dim, model_cfg.vocab_size
        if pre_process:
            self.embedding = GenLIPEmbedding(config, model_cfg.patch_dim, V, E)
        # The block's final LayerNorm is the reference's ln_post (spec §2.7).
        self.decoder = TransformerBlock(config, block_spec(config, vp_stage), pre_process=pre_process,
                                        post_process=post_process, vp_stage=vp_stage)
        if post_process:
            self.proj = replicated_linear(config, D, E) if E != D else None
            # The head reads the full (SP-gathered) hidden states, so it is built as a plain TP column layer:
            # its input gradient is all-reduced over TP, making the gather's backward a plain split.
            head_cfg = dataclasses.replace(config, sequence_parallel=False)
            head_cls = ColumnParallelLinear
            if config.genlip_tp_invariant:                 # float64 head (model/fp8/attach.py); same parameters
                from genlip_mcore.model.fp8.linear import EmuColumnParallelLinear as head_cls
            self.output_layer = head_cls(E, V, config=head_cfg, init_method=_no_init, bias=False,
                                         gather_output=False, skip_bias_add=True, tp_group=tp_group())
        if config.quant_recipe is not None:
            # Per-module quantization recipes (precision.quant_recipe_file, te backend), as GPTModel applies them.
            from megatron.core.quantization.utils import get_quant_config_or_none

            for name, module in self.named_modules():
                if hasattr(module, "finish_init"):
                    module.finish_init(get_quant_config_or_none(name, config.quant_recipe))

    def set_input_tensor(self, input_tensor) -> None:
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.decoder.set_input_tensor(input_tensor)

    def forward(self, tokens: Optional[Tensor], patches: Optional[Tensor], position_ids: Tensor,
                packed: GenLIPPackedSeqParams, targets: Optional[Tensor] = None,
                logit_positions: Optional[Tensor] = None, output: str = "auto") -> Tensor:
        """One packed stream of T tokens.

        tokens [T] long (0 at image positions), patches [N_p, P], position_ids [3, T], targets [T] long: the
        token each position must predict, -100 where none (already shifted: targets[t] = labels[t+1]).
        Returns on the last stage: per-token fp32 losses [N_lm] at packed.lm_idx (with targets), else logits
        [N, V] at `logit_positions` (all positions by default), or the hidden states [T, E] after ln_post and
        proj with output="hidden". Other stages return their hidden states [T_l, 1, D].
        """
        if self.training and self.config.drop_path_rate > 0 and packed.drop_path_scale is None:
            packed = dataclasses.replace(packed, drop_path_scale=drop_path_scale(
                self.seed, packed.seed, self.config.num_layers, len(packed.img_lens),
                self.config.drop_path_rate, device=position_ids.device))
        hidden = self.embedding(tokens, patches, packed) if self.pre_process else None
        rotary = mrope_angles(position_ids, self.config.kv_channels, self.model_cfg.rope_theta,
                              self.model_cfg.mrope_section)                         # [T, 1, 1, hd] fp32
        hidden = self.decoder(hidden_states=hidden, attention_mask=None, rotary_pos_emb=rotary,
                              packed_seq_params=packed)                             # [T_l, 1, D]
        if not self.post_process:
            return hidden
        return self._head(hidden, packed, targets, logit_positions, output)

    def _head(self, hidden: Tensor, packed, targets, logit_positions, output: str) -> Tensor:
        if self.config.sequence_parallel:
            hidden = tensor_parallel.gather_from_sequence_parallel_region(
                hidden, tensor_parallel_output_grad=False)                         # [T, 1, D]
        hidden = hidden[:, 0]                                                       # [T, D]
        if output == "hidden":
            return self.proj(hidden) if self.proj is not None else hidden         # [T, E]
        if targets is not None and output in ("auto", "loss"):
            lm_idx = packed.lm_idx
            if lm_idx is None:
                lm_idx = torch.nonzero(targets != -100).flatten()
            h = hidden.index_select(0, lm_idx)                                      # [N_lm, D]
        else:
            h = hidden if logit_positions is None else hidden.index_select(0, logit_positions)
        if self.proj is not None:
            h = self.proj(h)                                                        # [N, E]
        logits, _ = self.output_layer(h[:, None, :])                                # [N, 1, V/TP]
        if targets is not None and output in ("auto", "loss"):
            labels = targets.index_select(0, lm_idx)[:, None]                       # [N_lm, 1]
            if logits.dtype == torch.float64:                                       # precision.fp8_tp_invariant
                from genlip_mcore.model.fp8.invariant import cross_entropy_fp64

                return cross_entropy_fp64(logits[:, 0], labels[:, 0]).float()      # [N_lm] fp32
            return tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels)[:, 0]   # [N_lm] fp32
        logits = logits.float() if logits.dtype == torch.float64 else logits
        return tensor_parallel.gather_from_tensor_model_parallel_region(logits)[:, 0]          # [N, V]
