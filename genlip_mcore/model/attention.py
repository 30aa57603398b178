"""The prefix-LM attention rule on packed (THD) rows, and its kernels. This module is its one owner.

Dimensions: T tokens in the packed stream (all micro-batch rows concatenated), S samples in it, n_i / n_t image /
text tokens of sample s, np heads on this TP rank, hn head_dim.

Every sample is laid out [image patches][text]; a trailing padding sample is text-only. The rule (spec §3.1):
- an image query sees the image keys of its own sample (bidirectional);
- a text query sees every earlier-or-equal key of its own sample (so the whole image, and causal text);
- nothing crosses samples.
Equivalently, query q at offset j of a sample with n_i image tokens sees offsets 0 .. max(j, n_i - 1).

Backends, all exact and none materialising a T x T mask:
- `local`: one SDPA call per sample with that sample's (n_i+n_t)^2 mask. Any device; the CPU path and the
  numerical reference for the others.
- `flex`: torch flex attention with a block-sparse mask built from sample ids (GPUs without TE).
- `te`: two Transformer Engine varlen calls (spec §3.3): image queries x image keys (`padding`), text queries x
  whole-sample keys (`padding_causal_bottom_right`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule
from torch import Tensor


@dataclass
class GenLIPPackedSeqParams(PackedSeqParams):
    """Sample boundaries of one packed stream. Megatron sees qkv_format 'sbhd' (a [T, 1] sequence), so its own
    code never reinterprets the fields below; our core attention and layers read them."""

    img_lens: list[int] = None            # per sample, padding sample last (n_i = 0)
    txt_lens: list[int] = None
    total_len: int = None                 # T
    sample_of_token: Tensor = None        # [T] long
    key_limit: Tensor = None              # [T] long: last absolute key index each query may see
    img_idx: Tensor = None                # [sum n_i] long, absolute positions of image tokens
    txt_idx: Tensor = None                # [sum n_t] long
    inv_perm: Tensor = None               # [T] long: cat(img_idx, txt_idx) -> stream order
    cu_seqlens_img: Tensor = None         # int32 over samples with n_i > 0
    cu_seqlens_txt: Tensor = None         # int32 over all samples (each has n_t >= 1)
    cu_seqlens_full: Tensor = None        # int32 over all samples (n_i + n_t)
    max_seqlen_img: int = None
    max_seqlen_txt: int = None
    max_seqlen_full: int = None
    seed: int = 0                         # identifies the micro-batch; drives drop path, layout-independent
    drop_path_scale: Optional[Tensor] = None   # [L, 2, S] 0 or 1/(1-p); set by the model in training
    lm_idx: Optional[Tensor] = None       # [N_lm] long: positions whose target is a label


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """Host -> device without blocking the host: from pinned memory to CUDA (a pageable source makes the copy
    synchronous); a no-op copy elsewhere."""
    if device.type == "cuda" and not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def build_packed_params(img_lens: list[int], txt_lens: list[int], *, device=None, seed: int = 0,
                        targets: Optional[Tensor] = None) -> GenLIPPackedSeqParams:
    """Everything the kernels need, computed once per micro-batch on the host from Python lengths."""
    if len(img_lens) != len(txt_lens) or not img_lens:
        raise ValueError("img_lens and txt_lens must be non-empty lists of equal length")
    if min(txt_lens) < 1 or min(img_lens) < 0:
        raise ValueError("every sample needs at least one text token (padding is a text-only sample)")
    img = torch.tensor(img_lens, dtype=torch.long)
    txt = torch.tensor(txt_lens, dtype=torch.long)
    full = img + txt
    starts = torch.cumsum(full, 0) - full                                           # [S]
    total = int(full.sum())
    sample = torch.repeat_interleave(torch.arange(len(full)), full)                # [T]
    offset = torch.arange(total) - starts[sample]                                  # [T] offset inside sample
    n_img_tok = img[sample]
    key_limit = starts[sample] + torch.maximum(offset, n_img_tok - 1)
    is_img = offset < n_img_tok
    img_idx = torch.nonzero(is_img).flatten()
    txt_idx = torch.nonzero(~is_img).flatten()
    inv_perm = torch.empty(total, dtype=torch.long)
    inv_perm[torch.cat([img_idx, txt_idx])] = torch.arange(total)

    def cu(lens: Tensor) -> Tensor:
        return F.pad(torch.cumsum(lens, 0), (1, 0)).to(torch.int32)

    lm_idx = None
    if targets is not None:                   # the batch's targets are still on the host here (no sync)
        lm_idx = torch.nonzero((targets if targets.device.type == "cpu" else targets.cpu()) != -100).flatten()
    to = functools.partial(_to_device, device=torch.device(device)) if device is not None else (lambda t: t)
    return GenLIPPackedSeqParams(
        qkv_format="sbhd",
        img_lens=list(img_lens), txt_lens=list(txt_lens), total_len=total,
        sample_of_token=to(sample), key_limit=to(key_limit),
        img_idx=to(img_idx), txt_idx=to(txt_idx), inv_perm=to(inv_perm),
        cu_seqlens_img=to(cu(img[img > 0])), cu_seqlens_txt=to(cu(txt)), cu_seqlens_full=to(cu(full)),
        max_seqlen_img=int(img.max()), max_seqlen_txt=int(txt.max()), max_seqlen_full=int(full.max()),
        seed=seed, lm_idx=to(lm_idx) if lm_idx is not None else None,
    )


def sample_mask(n_img: int, n_total: int, device=None) -> Tensor:
    """[n, n] bool, True = attend: query j sees keys 0 .. max(j, n_img - 1)."""
    j = torch.arange(n_total, device=device)
    limit = torch.clamp(j, min=n_img - 1)
    return j[None, :] <= limit[:, None]


# ------------------------------------------------------------------------------------------------------------------
# Kernels. Each takes q [T, np, hn], k/v [T, ng, hn] and returns [T, np, hn].
# ------------------------------------------------------------------------------------------------------------------
def _local_groups(p: GenLIPPackedSeqParams, device):
    """Samples of equal length, batched. Returns (groups, order, inv): per group (count g, length n, mask
    [g, 1, n, n]) in group order; `order` [T] gathers the stream into group order and `inv` puts it back (both None
    when the groups already lie in stream order). Built once per micro-batch, shared by every layer."""
    cached = getattr(p, "_local_groups", None)
    if cached is not None:
        return cached
    lens = [n_i + n_t for n_i, n_t in zip(p.img_lens, p.txt_lens, strict=True)]
    starts = [0]
    for n in lens[:-1]:
        starts.append(starts[-1] + n)
    by_len: dict[int, list[int]] = {}
    for s, n in enumerate(lens):
        by_len.setdefault(n, []).append(s)
    groups, order = [], []
    for n, members in by_len.items():
        mask = torch.stack([sample_mask(p.img_lens[s], n) for s in members])[:, None]
        groups.append((len(members), n, _to_device(mask, torch.device(device))))
        order += [torch.arange(starts[s], starts[s] + n) for s in members]
    order = torch.cat(order)
    inv = None
    if torch.equal(order, torch.arange(order.numel())):
        order = None
    else:
        inv = torch.empty_like(order)
        inv[order] = torch.arange(order.numel())
        order, inv = _to_device(order, torch.device(device)), _to_device(inv, torch.device(device))
    p._local_groups = (groups, order, inv)
    return p._local_groups


def attention_local(q: Tensor, k: Tensor, v: Tensor, p: GenLIPPackedSeqParams, scale: float) -> Tensor:
    """Exact prefix-LM attention with no padding: samples of the same length go through one batched SDPA call
    with their own [n, n] masks (a stage-1 micro-batch has a handful of distinct lengths, so a handful of calls
    instead of one per sample). One gather puts the stream in group order and one puts the output back; split/cat
    in between, so backward never allocates a full-stream gradient per group."""
    groups, order, inv = _local_groups(p, q.device)
    if order is not None:
        q, k, v = (x.index_select(0, order) for x in (q, k, v))
    sizes = [g * n for g, n, _ in groups]
    outs = []
    for (g, n, mask), qs, ks, vs in zip(groups, q.split(sizes), k.split(sizes), v.split(sizes), strict=True):
        qs, ks, vs = (x.view(g, n, *x.shape[1:]).transpose(1, 2) for x in (qs, ks, vs))     # [g, heads, n, hn]
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=True)
        outs.append(o.transpose(1, 2).reshape(g * n, o.shape[1], o.shape[3]))
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out if inv is None else out.index_select(0, inv)


_flex_compiled: dict = {}       # per device kind: compiled on CUDA, eager elsewhere (CPU flex is forward-only)


def _flex_block_mask(p: GenLIPPackedSeqParams, device):
    cached = getattr(p, "_flex_block_mask", None)
    if cached is not None:
        return cached
    from torch.nn.attention.flex_attention import create_block_mask

    sample, limit = p.sample_of_token, p.key_limit

    def mask_mod(b, h, q_idx, kv_idx):
        return (sample[q_idx] == sample[kv_idx]) & (kv_idx <= limit[q_idx])

    # _compile builds the block mask block by block; eager would form [T, T] intermediates once per micro-batch.
    block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=p.total_len, KV_LEN=p.total_len,
                                   device=device, _compile=device.type == "cuda")
    object.__setattr__(p, "_flex_block_mask", block_mask)   # reused by every layer of this micro-batch
    return block_mask


def attention_flex(q: Tensor, k: Tensor, v: Tensor, p: GenLIPPackedSeqParams, scale: float) -> Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    flex = _flex_compiled.get(q.is_cuda)
    if flex is None:
        flex = torch.compile(flex_attention, dynamic=False) if q.is_cuda else flex_attention
        _flex_compiled[q.is_cuda] = flex
    hn = q.shape[-1]
    padded = max(16, 1 << (hn - 1).bit_length())            # flex kernels want a power-of-two head dim
    qkv = [x.transpose(0, 1)[None] for x in (q, k, v)]      # [1, heads, T, hn]
    if padded != hn:                                         # zero channels change no score; sliced off below
        qkv = [F.pad(x, (0, padded - hn)) for x in qkv]
    out = flex(*qkv, block_mask=_flex_block_mask(p, q.device), scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    return out[0, ..., :hn].transpose(0, 1)


def _te_pair(num_heads: int, num_kv: int, hn: int, scale: float):
    """Two TE DotProductAttention modules, one per call: TE forbids reusing one inside an FP8 autocast region."""
    import transformer_engine.pytorch as te

    kw = dict(num_gqa_groups=num_kv, attention_dropout=0.0, qkv_format="thd", softmax_scale=scale,
              attention_type="self")
    return (te.DotProductAttention(num_heads, hn, attn_mask_type="padding", **kw),
            te.DotProductAttention(num_heads, hn, attn_mask_type="padding_causal_bottom_right", **kw))


def attention_te(te_img, te_txt, q: Tensor, k: Tensor, v: Tensor, p: GenLIPPackedSeqParams) -> Tensor:
    if p.img_idx.numel() > 0:
        qi, ki, vi = (x.index_select(0, p.img_idx) for x in (q, k, v))
        o_img = te_img(qi, ki, vi, qkv_format="thd", attn_mask_type="padding",
                         cu_seqlens_q=p.cu_seqlens_img, cu_seqlens_kv=p.cu_seqlens_img,
                         max_seqlen_q=p.max_seqlen_img, max_seqlen_kv=p.max_seqlen_img)
    else:                                                    # an all-text pack: call 1 has nothing to do
        o_img = q.new_zeros(0, q.shape[1] * q.shape[2])
    qt = q.index_select(0, p.txt_idx)
    o_txt = te_txt(qt, k, v, qkv_format="thd", attn_mask_type="padding_causal_bottom_right",
                     cu_seqlens_q=p.cu_seqlens_txt, cu_seqlens_kv=p.cu_seqlens_full,
                     max_seqlen_q=p.max_seqlen_txt, max_seqlen_kv=p.max_seqlen_full)
    out = torch.cat([o_img.view(o_img.shape[0], -1), o_txt.view(o_txt.shape[0], -1)])
    return out.index_select(0, p.inv_perm).view_as(q)


def resolve_backend(name: str, transformer_impl: str) -> str:
    if name != "auto":
        return name
    if transformer_impl == "transformer_engine":
        return "te"
    return "flex" if torch.cuda.is_available() else "local"


class PrefixLMAttention(MegatronModule):
    """Megatron core-attention module (SelfAttention's `core_attention` slot) applying the prefix-LM rule."""

    def __init__(self, config, layer_number: int, attn_mask_type=None, attention_type: str = "self",
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None):
        super().__init__(config=config)
        tp = pg_collection.tp.size() if pg_collection is not None else 1
        self.num_heads = config.num_attention_heads // tp
        self.num_kv = config.num_query_groups // tp
        self.head_dim = config.kv_channels
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.backend = resolve_backend(config.genlip_attention_backend, config.transformer_impl)
        if self.backend == "flex" and not torch.cuda.is_available():
            raise ValueError("model.attention_backend=flex needs a CUDA GPU (torch has no flex backward on CPU); "
                             "use 'local' or 'auto'")
        if self.backend == "te":
            # Registered submodules, so train/eval, device moves and FP8 extra state follow the model.
            self.te_img, self.te_txt = _te_pair(self.num_heads, self.num_kv, self.head_dim, self.scale)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask=None, attn_mask_type=None,
                attention_bias=None, packed_seq_params: Optional[GenLIPPackedSeqParams] = None) -> Tensor:
        if not isinstance(packed_seq_params, GenLIPPackedSeqParams):
            raise ValueError("PrefixLMAttention needs GenLIPPackedSeqParams (sample boundaries of the pack)")
        # Megatron hands sbhd tensors with b = 1: [T, 1, np, hn]; the pack is one sequence.
        q, k, v = (x.squeeze(1) for x in (query, key, value))                    # [T, heads, hn]
        if self.backend == "local":
            out = attention_local(q, k, v, packed_seq_params, self.scale)
        elif self.backend == "flex":
            out = attention_flex(q, k, v, packed_seq_params, self.scale)
        elif self.backend == "te":
            out = attention_te(self.te_img, self.te_txt, q, k, v, packed_seq_params)
        else:
            raise ValueError(f"unknown attention backend {self.backend!r}")
        return out.reshape(out.shape[0], 1, -1)                                   # [T, 1, np*hn]
