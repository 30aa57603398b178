"""Input side of the first pipeline stage: patch embedding, text embedding, and their splice into one stream.

Dimensions: T packed tokens, N_p image patches (= image tokens), P = C*p*p patch values, V vocab, E
text_embed_dim, D hidden.

The reference's Conv2d(3, D, k=16, s=16) equals a Linear over (c, i, j)-flattened patches with
W = conv.weight.reshape(D, C*p*p) (spec §2.3), so patches travel flattened and the embedding is a Linear.
Both embeddings are replicated over TP ranks except the vocab-parallel word table; their inputs and output
gradients are identical on every TP rank, so their gradients agree without any reduction.
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel.layers import VocabParallelEmbedding
from megatron.core.transformer.module import MegatronModule
from torch import Tensor

from genlip_mcore.model.layer import param_device, tp_group
from genlip_mcore.model.spec import _no_init


def replicated_linear(config, in_features: int, out_features: int, bias: bool = True) -> torch.nn.Linear:
    return torch.nn.Linear(in_features, out_features, bias=bias, dtype=config.params_dtype, device=param_device(config))


class GenLIPEmbedding(MegatronModule):
    def __init__(self, config, patch_dim: int, vocab_size: int, text_embed_dim: int):
        super().__init__(config=config)
        D = config.hidden_size
        self.patch_embed = replicated_linear(config, patch_dim, D)
        self.word_embeddings = VocabParallelEmbedding(vocab_size, text_embed_dim, init_method=_no_init,
                                                      config=config, reduce_scatter_embeddings=False,
                                                      tp_group=tp_group())
        # E == D (So16) has no projection at all, as in the reference (nn.Identity there).
        self.in_proj = replicated_linear(config, text_embed_dim, D) if text_embed_dim != D else None

    def forward(self, tokens: Tensor, patches: Tensor, packed) -> Tensor:
        """tokens [T] long, patches [N_p, P] -> hidden [T(/TP under SP), 1, D]."""
        img = self.patch_embed(patches.to(self.patch_embed.weight.dtype))          # [N_p, D]
        txt = self.word_embeddings(tokens.index_select(0, packed.txt_idx)[None])[0]  # [T_txt, E] (TP all-reduced)
        if self.in_proj is not None:
            txt = self.in_proj(txt)                                                 # [T_txt, D]
        if img.shape[0] != packed.img_idx.shape[0]:
            raise ValueError(f"{img.shape[0]} patches for {packed.img_idx.shape[0]} image positions in the pack")
        x = txt.new_zeros(packed.total_len, txt.shape[-1])
        x = x.index_copy(0, packed.img_idx, img.to(x.dtype)).index_copy(0, packed.txt_idx, txt)
        x = x[:, None, :]                                                           # [T, 1, D]
        if self.config.sequence_parallel:
            x = tensor_parallel.scatter_to_sequence_parallel_region(x)              # [T/TP, 1, D]
        return x
