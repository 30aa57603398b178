"""Plain-PyTorch reference implementation of GenLIP, written from the spec
(/work/shared/spec/genlip.md, sections 1-5, 8.1 and 12). It is a test oracle:
one packed row at a time, dense masks, no fused kernels, no drop path.

Dimension legend
    T   tokens in the packed row (image + text + padding)
    N   image patches in the row (= number of True entries in image_mask)
    D   hidden_size (residual width)
    E   text_embed_dim (token embedding / lm_head width)
    V   vocab_size
    H   num_attention_heads,  hd = D // H (head_dim)
    F   intermediate_size (SwiGLU inner width)
    L   num_hidden_layers
    P   patch_size (16), C = num_channels (3)

State-dict keys follow the HF layout of spec section 8.1 exactly.
"""

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


@dataclass
class RefConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    patch_size: int = 16
    num_channels: int = 3
    text_embed_dim: int = 0  # 0 -> same as hidden_size (no in_proj/proj)
    vocab_size: int = 151936
    rope_theta: float = 1e4
    mrope_section: Tuple[int, int, int] = (12, 12, 12)
    layer_norm_eps: float = 1e-6
    ls_init_value: float = 0.1

    def __post_init__(self):
        if not self.text_embed_dim:
            self.text_embed_dim = self.hidden_size
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def has_text_proj(self) -> bool:
        # in_proj / proj exist only when E != D (Identity otherwise, spec 2.2/2.7).
        return self.text_embed_dim != self.hidden_size


# --------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------

def _layer_shapes(cfg: RefConfig, i: int) -> Dict[str, Tuple[int, ...]]:
    D, Fi = cfg.hidden_size, cfg.intermediate_size
    p = f"visual.layers.{i}."
    s = {p + "layer_norm1.weight": (D,), p + "layer_norm1.bias": (D,)}
    # q_proj rows [0:D] = query, rows [D:2D] = output gate (spec 2.5).
    s[p + "self_attn.q_proj.weight"] = (2 * D, D)
    s[p + "self_attn.q_proj.bias"] = (2 * D,)
    for name in ("k_proj", "v_proj", "out_proj"):
        s[p + f"self_attn.{name}.weight"] = (D, D)
        s[p + f"self_attn.{name}.bias"] = (D,)
    s[p + "layer_norm2.weight"] = (D,)
    s[p + "layer_norm2.bias"] = (D,)
    for name in ("fc1", "gate_fc"):
        s[p + f"mlp.{name}.weight"] = (Fi, D)
        s[p + f"mlp.{name}.bias"] = (Fi,)
    s[p + "mlp.fc2.weight"] = (D, Fi)
    s[p + "mlp.fc2.bias"] = (D,)
    s[p + "layer_scale1.lambda1"] = (D,)
    s[p + "layer_scale2.lambda1"] = (D,)
    return s


def ref_param_shapes(cfg: RefConfig) -> Dict[str, Tuple[int, ...]]:
    """HF key -> shape, in the key order of spec 8.1."""
    D, E, V = cfg.hidden_size, cfg.text_embed_dim, cfg.vocab_size
    P, C = cfg.patch_size, cfg.num_channels
    s: Dict[str, Tuple[int, ...]] = {
        "vision_embeddings.patch_embedding.weight": (D, C, P, P),
        "vision_embeddings.patch_embedding.bias": (D,),
    }
    for i in range(cfg.num_hidden_layers):
        s.update(_layer_shapes(cfg, i))
    s["ln_post.weight"] = (D,)
    s["ln_post.bias"] = (D,)
    s["embeddings.weight"] = (V, E)
    if cfg.has_text_proj:
        s["in_proj.weight"], s["in_proj.bias"] = (D, E), (D,)
        s["proj.weight"], s["proj.bias"] = (E, D), (E,)
    s["lm_head.weight"] = (V, E)
    return s


def _random_param(key: str, shape, cfg: RefConfig, gen: torch.Generator) -> torch.Tensor:
    # Deliberately non-trivial values so that every parameter affects the output:
    # norms != (1, 0), biases != 0, layer scales != constant 0.1.
    noise = torch.randn(shape, generator=gen, dtype=torch.float32)
    if key.endswith("lambda1"):
        return cfg.ls_init_value + 0.05 * noise
    if "norm" in key or key.startswith("ln_post"):
        return 1.0 + 0.1 * noise if key.endswith("weight") else 0.02 * noise
    if key.endswith("bias"):
        return 0.02 * noise
    big = key.startswith(("embeddings", "lm_head", "vision_embeddings"))
    return (0.02 if big else 0.04) * noise


def init_ref_state_dict(cfg: RefConfig, generator: Optional[torch.Generator] = None,
                        device="cpu", dtype: torch.dtype = torch.float32) -> Dict[str, torch.Tensor]:
    """Random HF-layout state dict. device='meta' builds shapes only (no RNG use)."""
    shapes = ref_param_shapes(cfg)
    if torch.device(device).type == "meta":
        return {k: torch.empty(s, device="meta", dtype=dtype) for k, s in shapes.items()}
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    return {k: _random_param(k, s, cfg, gen).to(device=device, dtype=dtype)
            for k, s in shapes.items()}


# --------------------------------------------------------------------------------------
# Positions, RoPE, mask
# --------------------------------------------------------------------------------------

def rope_axis_of_slot(cfg: RefConfig) -> torch.Tensor:
    """[hd/2] long: 0=T, 1=H, 2=W per frequency slot (interleaved M-RoPE, spec 4.3)."""
    j = torch.arange(cfg.head_dim // 2)
    sec = cfg.mrope_section
    axis = torch.zeros_like(j)
    axis[(j % 3 == 1) & (j < 3 * sec[1])] = 1
    axis[(j % 3 == 2) & (j < 3 * sec[2])] = 2
    return axis


def rope_inv_freq(cfg: RefConfig) -> torch.Tensor:
    # fp32 from an int64 arange cast to float, as HF does: theta^(-2j/hd).
    hd = cfg.head_dim
    exps = torch.arange(0, hd, 2, dtype=torch.int64).float() / hd
    return 1.0 / (cfg.rope_theta ** exps)


def rope_angles(position_ids: torch.Tensor, cfg: RefConfig) -> torch.Tensor:
    """position_ids [3,T] int -> angles [T, hd] fp32, duplicated as concat(a, a)."""
    pos = position_ids.to(torch.float32)                    # [3, T]
    per_slot = pos[rope_axis_of_slot(cfg)]                  # [hd/2, T]
    angle = per_slot.t() * rope_inv_freq(cfg)[None, :]      # [T, hd/2], exact fp32 products
    return torch.cat([angle, angle], dim=-1)


def prefix_lm_mask(sample_ids: torch.Tensor, is_image: torch.Tensor) -> torch.Tensor:
    """[T] sample ids (-1 = pad), [T] bool -> [T,T] bool, True = q may attend k (spec 3.1)."""
    sid = sample_ids.long()
    T = sid.shape[0]
    idx = torch.arange(T, device=sid.device)
    same = (sid[:, None] == sid[None, :]) & (sid[:, None] >= 0)
    causal = idx[:, None] >= idx[None, :]
    both_img = is_image[:, None] & is_image[None, :]
    return same & (causal | both_img)


# --------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------

def _linear(x, sd, name, bias=True):
    return F.linear(x, sd[name + ".weight"], sd[name + ".bias"] if bias else None)


def _layer_norm(x, sd, name, eps):
    w = sd[name + ".weight"]
    return F.layer_norm(x, (w.shape[0],), w, sd[name + ".bias"], eps)


def _rotate_half(x):
    # GPT-NeoX style: channel j pairs with j + hd/2 (not pairwise-interleaved).
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _apply_rope(x, cos, sin):
    return x * cos + _rotate_half(x) * sin


def _masked_softmax_attention(q, k, v, mask, scale):
    """q,k,v [H,T,hd]; mask [T,T] bool. Fully masked rows give 0 (flex semantics)."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    # Softmax in at least fp32 (fp64 stays fp64), then back to the activation dtype.
    acc = torch.promote_types(scores.dtype, torch.float32)
    probs = torch.softmax(scores, dim=-1, dtype=acc).to(v.dtype)
    # softmax of an all -inf row is NaN; zero those rows instead.
    probs = probs.masked_fill(~mask.any(-1)[:, None], 0.0)
    return torch.matmul(probs, v)


def _attention(h, sd, p, cfg, cos, sin, mask):
    T, D = h.shape
    H, hd = cfg.num_attention_heads, cfg.head_dim
    qg = _linear(h, sd, p + "self_attn.q_proj")
    q, gate = qg[:, :D], qg[:, D:]                 # query first, gate second

    def heads(t):
        return t.reshape(T, H, hd).transpose(0, 1)  # [H,T,hd]

    q = _apply_rope(heads(q), cos, sin)
    k = _apply_rope(heads(_linear(h, sd, p + "self_attn.k_proj")), cos, sin)
    v = heads(_linear(h, sd, p + "self_attn.v_proj"))
    o = _masked_softmax_attention(q, k, v, mask, hd ** -0.5).transpose(0, 1)  # [T,H,hd]
    # Per-head, per-channel output gate from the token's own LN1 output.
    o = o * torch.sigmoid(gate.reshape(T, H, hd))
    return _linear(o.reshape(T, D), sd, p + "self_attn.out_proj")


def _swiglu(h, sd, p):
    # gate_fc is the activated branch, fc1 the linear one (spec 2.6).
    act = F.silu(_linear(h, sd, p + "mlp.gate_fc")) * _linear(h, sd, p + "mlp.fc1")
    return _linear(act, sd, p + "mlp.fc2")


def _encoder_layer(x, sd, i, cfg, cos, sin, mask):
    p = f"visual.layers.{i}."
    eps = cfg.layer_norm_eps
    h = _layer_norm(x, sd, p + "layer_norm1", eps)
    x = x + sd[p + "layer_scale1.lambda1"] * _attention(h, sd, p, cfg, cos, sin, mask)
    h = _layer_norm(x, sd, p + "layer_norm2", eps)
    return x + sd[p + "layer_scale2.lambda1"] * _swiglu(h, sd, p)


# --------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------

def _embed(sd, cfg, input_ids, image_mask, pixel_patches):
    x = F.embedding(input_ids, sd["embeddings.weight"])              # [T,E]
    if cfg.has_text_proj:
        x = _linear(x, sd, "in_proj")                                  # in_proj on all positions
    w = sd["vision_embeddings.patch_embedding.weight"]
    pix = pixel_patches.to(w.dtype)
    img = F.conv2d(pix, w, sd["vision_embeddings.patch_embedding.bias"], stride=cfg.patch_size)
    img = img.reshape(img.shape[0], -1)                                # [N,D] (1x1 spatial)
    if int(image_mask.sum()) != img.shape[0]:
        raise ValueError("number of image positions != number of pixel patches")
    # Splice in order; image tokens get no in_proj.
    return x.masked_scatter(image_mask[:, None].expand_as(x), img.to(x.dtype))


def ref_forward(sd: Dict[str, torch.Tensor], cfg: RefConfig, input_ids: torch.Tensor,
                image_mask: torch.Tensor, pixel_patches: torch.Tensor,
                position_ids: torch.Tensor, sample_ids: torch.Tensor,
                training: bool = False) -> Dict[str, torch.Tensor]:
    """One packed row. Returns hidden [T,E] (ln_post+proj), logits [T,V], last_hidden [T,D].

    `training` is accepted for API symmetry only: RefConfig has no drop-path rate and
    attention dropout is 0, so train and eval forwards are identical here.
    """
    del training
    image_mask = image_mask.bool()
    x = _embed(sd, cfg, input_ids, image_mask, pixel_patches)
    angles = rope_angles(position_ids, cfg)                # fp32
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)  # fp32 trig, then cast
    mask = prefix_lm_mask(sample_ids, image_mask)
    for i in range(cfg.num_hidden_layers):
        x = _encoder_layer(x, sd, i, cfg, cos, sin, mask)
    hidden = _layer_norm(x, sd, "ln_post", cfg.layer_norm_eps)
    if cfg.has_text_proj:
        hidden = _linear(hidden, sd, "proj")
    logits = F.linear(hidden, sd["lm_head.weight"])        # no bias, untied
    return {"hidden": hidden, "logits": logits, "last_hidden": x}


# --------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------

def ref_loss(logits: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """Next-token CE: position t predicts labels[t+1]. Returns (fp32 sum, #non-ignored)."""
    tgt = labels[1:].long()
    acc = torch.promote_types(logits.dtype, torch.float32)   # fp32 CE (fp64 stays fp64)
    loss_sum = F.cross_entropy(logits[:-1].to(acc), tgt, ignore_index=IGNORE_INDEX,
                               reduction="sum")
    return loss_sum, int((tgt != IGNORE_INDEX).sum())


def ref_token_mean_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token mean over non-ignored targets (0 when there are none)."""
    loss_sum, n = ref_loss(logits, labels)
    return loss_sum / max(n, 1)


# --------------------------------------------------------------------------------------
# Synthetic packed rows
# --------------------------------------------------------------------------------------

def _sample_tokens(cfg, gh, gw, n_text, sid, gen):
    n_img = gh * gw
    text = torch.randint(1, cfg.vocab_size, (n_text,), generator=gen)
    ids = torch.cat([torch.zeros(n_img, dtype=torch.long), text])
    labels = torch.cat([torch.full((n_img,), IGNORE_INDEX), text.clone()])
    labels[n_img:n_img + min(2, n_text)] = IGNORE_INDEX   # 2-token unlabelled prompt
    r = torch.arange(n_img) // max(gw, 1)
    c = torch.arange(n_img) % max(gw, 1)
    img_pos = torch.stack([torch.zeros_like(r), r, c])     # (t=0, h=row, w=col), raster
    txt_pos = (max(gh, gw) + torch.arange(n_text)).expand(3, n_text)
    pos = torch.cat([img_pos, txt_pos], dim=1)
    is_img = torch.arange(n_img + n_text) < n_img
    return ids, labels, pos, is_img, torch.full((n_img + n_text,), sid)


def make_packed_row(cfg: RefConfig, samples: Sequence[Tuple[int, int, int]],
                    pad_to: Optional[int] = None,
                    generator: Optional[torch.Generator] = None) -> Dict[str, object]:
    """samples: list of (gh, gw, n_text). Builds one packed row per spec 4.1 / 6.3 / 6.6."""
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    parts = [_sample_tokens(cfg, gh, gw, nt, s, gen) for s, (gh, gw, nt) in enumerate(samples)]
    ids, labels, pos, is_img, sids = (torch.cat(t, dim=-1) for t in zip(*parts, strict=True))
    n = ids.shape[0]
    pad_len = 0 if pad_to is None else pad_to - n
    if pad_len < 0:
        raise ValueError(f"row has {n} tokens > pad_to={pad_to}")
    # Padding: id 0, label -100, position 0 (keeps RoPE finite), sample id -1, not image.
    ids = F.pad(ids, (0, pad_len), value=0)
    labels = F.pad(labels, (0, pad_len), value=IGNORE_INDEX)
    pos = F.pad(pos, (0, pad_len), value=0)
    is_img = F.pad(is_img, (0, pad_len), value=False)
    sids = F.pad(sids, (0, pad_len), value=-1)
    n_patches = int(is_img.sum())
    P, C = cfg.patch_size, cfg.num_channels
    pixels = torch.rand((n_patches, C, P, P), generator=gen) * 2 - 1   # in [-1, 1]
    return {
        "input_ids": ids, "image_mask": is_img, "pixel_patches": pixels,
        "position_ids": pos, "sample_ids": sids, "labels": labels,
        "img_lens": [gh * gw for gh, gw, _ in samples],
        "txt_lens": [nt for _, _, nt in samples],
        "pad_len": pad_len,
    }
