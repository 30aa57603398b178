"""GenLIP ("Let ViT Speak") in the HF layout of the released checkpoints: one transformer over [image patches][text].

Self-contained on purpose (torch + transformers only): this file is copied into every export and loaded with
`trust_remote_code`. Module names and state-dict keys are exactly those of spec §8.1.

Dimension legend
    B   batch rows                    S    tokens per row in this call (image + text + padding)
    S_p tokens already in the cache   S_k  = S_p + S, keys visible to this call
    N   image patches of the call     n_i  = gh_i * gw_i patches of image i (raster order)
    D   hidden_size                   E    text_embed_dim (token embedding and lm_head width)
    H   heads, hd = D / H             F    intermediate_size (SwiGLU inner width)
    V   vocab_size                    L    num_hidden_layers
    C   num_channels                  P    patch_size

Inputs of `forward` (what differs from the reference, spec §11, and why):
    input_ids     [B, S]     any id at image positions (the reference's placeholder -200 included) is read as 0
    image_mask    [B, S]     True at patch positions; patches are spliced in flat order (rows, then positions)
    pixel_values  images [n, C, H, W] or a list of [C, H, W], or patches [N, C, P, P] / [N, C*P*P] with
                  image_grid_thw [n, 3] (t = 1, gh, gw)
    position_ids  [B, 3, S]  (t, h, w). Never [3, B, S]: guessing the layout misreads B == 3 (§2.1). Optional: when
                  absent they are computed from the image grids per sample (§4.1), never silently 1-D (§11.4)
    attention_mask / sample_ids  [B, S]: which sample each token belongs to (-1 = padding). Rows may be packed
                  with several samples; the prefix-LM rule (§3.1) is applied per sample with a [B, 1, S, S_k]
                  mask, so batches of any size are exact (the reference's dense mask is right only for B = 1, §11.2)
"""

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.utils import ModelOutput

from .configuration_genlip import GenLIPConfig

IGNORE_INDEX = -100
FEATURE_LAYERS = ("pre_norm", "post_norm", "post_proj")


# ---------------------------------------------------------------------------------------------------------------
# Images, positions and the attention rule
# ---------------------------------------------------------------------------------------------------------------
def _grid_list(grids) -> List[Tuple[int, int]]:
    """[[t, gh, gw], ...] (t must be 1) or [[gh, gw], ...], list or tensor -> [(gh, gw), ...]."""
    out = []
    for g in (grids.tolist() if torch.is_tensor(grids) else grids):
        g = [int(v) for v in g]
        if len(g) == 3:
            if g[0] != 1:
                raise ValueError(f"image_grid_thw: only single-frame images (t = 1) are supported, got {g}")
            g = g[1:]
        if len(g) != 2 or min(g) < 1:
            raise ValueError(f"bad image grid {g}")
        out.append((g[0], g[1]))
    return out


def to_patches(pixels, grids, patch_size: int, num_channels: int):
    """Any accepted pixel input -> (patches [N, C, P, P] in raster order per image, [(gh, gw)] per image).

    Images: a list of [C, H, W] (sizes may differ), one [C, H, W], or [n, C, H, W]. Patches: [N, C*P*P] or
    [N, C, P, P] (the layout of data.images.patchify) together with `grids`. A [N, C, P, P] tensor without grids
    is N one-patch images."""
    P, C = patch_size, num_channels
    if pixels is None:
        return None, []
    if isinstance(pixels, (list, tuple)) or pixels.dim() == 3:
        images = [pixels] if torch.is_tensor(pixels) else list(pixels)
        parts = [to_patches(im[None], None, P, C) for im in images]
        patches = torch.cat([p for p, _ in parts]) if parts else None
        found = [g for _, gs in parts for g in gs]
        if grids is not None and _grid_list(grids) != found:
            raise ValueError(f"image grids {_grid_list(grids)} do not match the image sizes {found}")
        return patches, found
    if pixels.dim() == 2:                                   # [N, C*P*P], (c, i, j) inside a patch
        if grids is None:
            raise ValueError("flattened patches need their image grids (image_grid_thw)")
        return pixels.reshape(-1, C, P, P), _grid_list(grids)
    n, c, h, w = pixels.shape
    if grids is not None and (h, w) == (P, P) and n == sum(a * b for a, b in _grid_list(grids)):
        return pixels, _grid_list(grids)                    # already patches
    if c != C or h % P or w % P:
        raise ValueError(f"images of shape {tuple(pixels.shape)}: expected [n, {C}, H, W] with H, W multiples of {P}")
    gh, gw = h // P, w // P
    x = pixels.reshape(n, C, gh, P, gw, P).permute(0, 2, 4, 1, 3, 5)     # [n, gh, gw, C, P, P]
    found = [(gh, gw)] * n
    if grids is not None and _grid_list(grids) != found:
        raise ValueError(f"image grids {_grid_list(grids)} do not match the image sizes {found}")
    return x.reshape(n * gh * gw, C, P, P), found


def sample_positions(gh: int, gw: int, n_text: int) -> torch.Tensor:
    """[3, gh*gw + n_text] long: image (0, row, col) in raster order, then text t = h = w = max(gh, gw) + j (§4.1)."""
    k = torch.arange(gh * gw)
    image = torch.stack([torch.zeros_like(k), k // max(gw, 1), k % max(gw, 1)])
    start = max(gh, gw)
    return torch.cat([image, torch.arange(start, start + n_text).expand(3, -1)], dim=1)


def grid_positions(image_mask: torch.Tensor, sample_ids: torch.Tensor, grids) -> torch.Tensor:
    """[B, 3, S] positions of samples laid out [image][text], each sample a run of equal sample id (-1 = padding,
    position 0). Images are matched to samples in flat order; a text-only sample starts at position 0."""
    B, S = sample_ids.shape
    pos = torch.zeros(B, 3, S, dtype=torch.long)
    grids = list(grids)
    used = 0
    for b in range(B):
        runs, counts = torch.unique_consecutive(sample_ids[b].cpu(), return_counts=True)
        img = image_mask[b].cpu()
        start = 0
        for sid, count in zip(runs.tolist(), counts.tolist()):
            end = start + count
            n_img = int(img[start:end].sum())
            if sid >= 0:
                if n_img and not bool(img[start:start + n_img].all()):
                    raise ValueError(f"row {b}: the image tokens of a sample must come before its text")
                gh, gw = (0, 0)
                if n_img:
                    if used >= len(grids):
                        raise ValueError("more images in image_mask than image grids: pass image_grid_thw")
                    gh, gw = grids[used]
                    used += 1
                    if gh * gw != n_img:
                        raise ValueError(f"row {b}: a sample has {n_img} image tokens but its grid is {gh}x{gw}; "
                                         "pass image_grid_thw (or position_ids) that match")
                pos[b, :, start:end] = sample_positions(gh, gw, count - n_img)
            start = end
    if used != len(grids):
        raise ValueError(f"{len(grids)} image grids for {used} images in image_mask")
    return pos.to(sample_ids.device)


def prefix_lm_mask(sample_ids, is_image, past_sample_ids=None, past_is_image=None) -> torch.Tensor:
    """[B, S] (+ cached [B, S_p]) -> [B, 1, S, S_k] bool, True = may attend (spec §3.1, per sample).

    Within a sample: image tokens see all its image tokens; text sees the image and the earlier text (causal by
    index in the row). Samples never see each other; padding is never seen."""
    sid_k = sample_ids if past_sample_ids is None else torch.cat([past_sample_ids, sample_ids], 1)   # [B, S_k]
    img_k = is_image if past_is_image is None else torch.cat([past_is_image, is_image], 1)
    S, S_k = sample_ids.shape[1], sid_k.shape[1]
    q_idx = torch.arange(S_k - S, S_k, device=sample_ids.device)[:, None]        # [S, 1] absolute index
    k_idx = torch.arange(S_k, device=sample_ids.device)[None, :]                # [1, S_k]
    same = (sample_ids[:, :, None] == sid_k[:, None, :]) & (sample_ids[:, :, None] >= 0)
    allowed = same & ((k_idx <= q_idx) | (is_image[:, :, None] & img_k[:, None, :]))     # [B, S, S_k]
    # A padding query sees nothing, and SDPA returns NaN for a fully masked row. Let it see itself: its output
    # is never read (no real token attends to padding, its labels are ignored) and stays finite.
    alone = ~allowed.any(-1, keepdim=True)
    return (allowed | (alone & (k_idx == q_idx)))[:, None]


# ---------------------------------------------------------------------------------------------------------------
# Modules (names = the released checkpoint's, spec §2 / §8.1)
# ---------------------------------------------------------------------------------------------------------------
class GenLIPRotaryEmbedding(nn.Module):
    """Interleaved M-RoPE (spec §4.2-4.3): frequency slot j reads axis H if j % 3 == 1 and j < 3*section[1], W if
    j % 3 == 2 and j < 3*section[2], else T. No buffer: inv_freq is rebuilt in fp32 at every call, so neither
    `.to(bfloat16)` nor meta-device loading can change it (and the state dict stays exactly §8.1)."""

    def __init__(self, config: GenLIPConfig):
        super().__init__()
        self.head_dim, self.theta = config.head_dim, float(config.rope_theta)
        sec = config.mrope_section
        # plain Python (not a buffer, and no tensor op that a meta-device context would capture)
        self.axis = [1 if j % 3 == 1 and j < 3 * sec[1] else 2 if j % 3 == 2 and j < 3 * sec[2] else 0
                     for j in range(self.head_dim // 2)]

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype):
        """position_ids [B, 3, S] -> cos, sin [B, 1, S, hd]: fp32 angles and trig, then cast (spec §4.3)."""
        dev = position_ids.device
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=dev).float() / self.head_dim
        inv_freq = 1.0 / (self.theta ** exponent)                                          # [hd/2]
        axis = torch.tensor(self.axis, device=dev)
        per_slot = position_ids.float().index_select(1, axis)                              # [B, hd/2, S]
        angle = per_slot.transpose(1, 2) * inv_freq                                        # [B, S, hd/2]
        emb = torch.cat([angle, angle], dim=-1)[:, None]                                   # [B, 1, S, hd]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    # GPT-NeoX layout: channel j turns with channel j + hd/2 (not pairwise-interleaved, spec §4.4)
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class GenLIPVisionEmbeddings(nn.Module):
    def __init__(self, config: GenLIPConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size, config.patch_size,
                                         stride=config.patch_size)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """[N, C, P, P] -> [N, D]. flatten, not squeeze: one patch must stay [1, D] (spec §11.17)."""
        w = self.patch_embedding.weight
        return self.patch_embedding(patches.to(device=w.device, dtype=w.dtype)).flatten(1)


class GenLIPAttention(nn.Module):
    """Gated multi-head self-attention (spec §2.5): q_proj gives [query | gate], o = attn(q, k, v) * sigmoid(gate)."""

    def __init__(self, config: GenLIPConfig, layer_idx: int):
        super().__init__()
        D = config.hidden_size
        self.heads, self.head_dim, self.layer_idx = config.num_attention_heads, config.head_dim, layer_idx
        self.dropout = config.attention_dropout
        self.q_proj = nn.Linear(D, 2 * D)       # rows [0:D] query, [D:2D] output gate; head n owns n*hd..(n+1)*hd
        self.k_proj = nn.Linear(D, D)
        self.v_proj = nn.Linear(D, D)
        self.out_proj = nn.Linear(D, D)

    def forward(self, h, cos, sin, mask, cache=None):
        B, S, D = h.shape
        query, gate = self.q_proj(h).chunk(2, dim=-1)                         # [B, S, D] each

        def heads(t):
            return t.view(B, S, self.heads, self.head_dim).transpose(1, 2)     # [B, H, S, hd]

        q, k = heads(query), heads(self.k_proj(h))
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        v = heads(self.v_proj(h))
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)                          # [B, H, S_k, hd]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.head_dim ** -0.5,
                                           dropout_p=self.dropout if self.training else 0.0)
        # per-head, per-channel gate from the token's own LN1 output, not from the attention result
        o = o.transpose(1, 2) * torch.sigmoid(gate.view(B, S, self.heads, self.head_dim))   # [B, S, H, hd]
        return self.out_proj(o.reshape(B, S, D))


class GenLIPMLP(nn.Module):
    """SwiGLU (spec §2.6): fc2(act(gate_fc(h)) * fc1(h)). gate_fc is the activated branch, fc1 the linear one."""

    def __init__(self, config: GenLIPConfig):
        super().__init__()
        D, Fi = config.hidden_size, config.intermediate_size
        self.fc1 = nn.Linear(D, Fi)
        self.gate_fc = nn.Linear(D, Fi)
        self.fc2 = nn.Linear(Fi, D)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, h):
        return self.fc2(self.act(self.gate_fc(h)) * self.fc1(h))


class GenLIPLayerScale(nn.Module):
    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.init_value = init_value
        self.lambda1 = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x):
        return x * self.lambda1


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth, one draw per batch row (timm). Multiplies by zero instead of skipping the branch, so every
    parameter gets a gradient each step. Per sample only when each row holds one sample (spec §2.4, §11.11)."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


class GenLIPEncoderLayer(nn.Module):
    """Pre-LN block with LayerScale and DropPath (spec §2.4)."""

    def __init__(self, config: GenLIPConfig, layer_idx: int):
        super().__init__()
        D, eps = config.hidden_size, config.layer_norm_eps
        self.drop_path_rate = config.drop_path_rate
        self.layer_norm1 = nn.LayerNorm(D, eps=eps)
        self.self_attn = GenLIPAttention(config, layer_idx)
        self.layer_norm2 = nn.LayerNorm(D, eps=eps)
        self.mlp = GenLIPMLP(config)
        use_ls = config.ls_init_value > 1e-6                    # the reference's switch (spec §1.1)
        self.layer_scale1 = GenLIPLayerScale(D, config.ls_init_value) if use_ls else nn.Identity()
        self.layer_scale2 = GenLIPLayerScale(D, config.ls_init_value) if use_ls else nn.Identity()

    def forward(self, x, cos, sin, mask, cache=None):
        attn = self.layer_scale1(self.self_attn(self.layer_norm1(x), cos, sin, mask, cache))
        x = x + drop_path(attn, self.drop_path_rate, self.training)
        mlp = self.layer_scale2(self.mlp(self.layer_norm2(x)))
        return x + drop_path(mlp, self.drop_path_rate, self.training)


class GenLIPEncoder(nn.Module):
    def __init__(self, config: GenLIPConfig):
        super().__init__()
        self.layers = nn.ModuleList(GenLIPEncoderLayer(config, i) for i in range(config.num_hidden_layers))

    def forward(self, x, cos, sin, mask, cache=None, num_layers=None, collect=False):
        """-> (x after `num_layers` layers (all by default), (x before layer 0, after layer 1, ...) if collect)."""
        states = [x] if collect else None
        for layer in self.layers[:num_layers]:
            x = layer(x, cos, sin, mask, cache)
            if collect:
                states.append(x)
        return x, (tuple(states) if collect else None)


# ---------------------------------------------------------------------------------------------------------------
# KV cache and outputs
# ---------------------------------------------------------------------------------------------------------------
class GenLIPCache:
    """Keys/values of every layer, plus what masks and positions need about the cached tokens: their sample ids,
    image flags, and per row the next text position (max cached position + 1, on all three axes, spec §9)."""

    def __init__(self):
        self.keys: List[torch.Tensor] = []          # per layer [B, H, S_p, hd]
        self.values: List[torch.Tensor] = []
        self.sample_ids: Optional[torch.Tensor] = None   # [B, S_p]
        self.is_image: Optional[torch.Tensor] = None     # [B, S_p]
        self.next_position: Optional[torch.Tensor] = None   # [B]

    @property
    def seq_len(self) -> int:
        return 0 if self.sample_ids is None else self.sample_ids.shape[1]

    def add_tokens(self, sample_ids, is_image, position_ids) -> None:
        valid = sample_ids >= 0
        last = position_ids.amax(1).masked_fill(~valid, -1).amax(1) + 1            # [B]
        if self.sample_ids is None:
            self.sample_ids, self.is_image, self.next_position = sample_ids, is_image, last
        else:
            self.sample_ids = torch.cat([self.sample_ids, sample_ids], 1)
            self.is_image = torch.cat([self.is_image, is_image], 1)
            self.next_position = torch.maximum(self.next_position, last)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if layer == len(self.keys):
            self.keys.append(k)
            self.values.append(v)
        else:
            self.keys[layer] = torch.cat([self.keys[layer], k], dim=2)
            self.values[layer] = torch.cat([self.values[layer], v], dim=2)
        return self.keys[layer], self.values[layer]


@dataclass
class GenLIPOutput(ModelOutput):
    """hidden_states is proj(ln_post(last layer)) [B, S, E], one tensor as in the reference (spec §2.7).
    layer_hidden_states (with output_hidden_states): (embeddings, after layer 1, ..., after layer L), [B, S, D] each.
    kv_cache (with use_cache): the GenLIPCache to pass back as `past_key_values`; also readable as
    `.past_key_values` and `.cache`.

    The cache field is deliberately not named `past_key_values` or `cache`: transformers renames those keywords in
    every ModelOutput's __init__ from 5.24 on (past_key_values -> cache), and may rename them again, while 4.x has no
    `cache`. A name it never touches works on every version; the two properties below keep both spellings readable."""

    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    hidden_states: Optional[torch.Tensor] = None
    layer_hidden_states: Optional[Tuple[torch.Tensor, ...]] = None
    kv_cache: Optional[GenLIPCache] = None

    # plain properties (no annotation, so not dataclass fields); they override ModelOutput's own deprecation shims
    past_key_values = property(lambda self: self.kv_cache, doc="The KV cache (alias of kv_cache).")
    cache = property(lambda self: self.kv_cache, doc="The KV cache (alias of kv_cache).")


def caption_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token CE: position t predicts labels[t + 1] within its row; fp32; token mean over every non-ignored
    target of the batch (Liger's reduction, spec §2.8); 0 when nothing is labelled."""
    tgt = labels[:, 1:].reshape(-1)
    total = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), tgt,
                            ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (tgt != IGNORE_INDEX).sum().clamp(min=1)


# ---------------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------------
class GenLIPModel(PreTrainedModel):
    config_class = GenLIPConfig
    base_model_prefix = "genlip"
    main_input_name = "input_ids"
    _no_split_modules = ["GenLIPEncoderLayer"]
    _supports_sdpa = True

    def __init__(self, config: GenLIPConfig):
        super().__init__(config)
        D, E = config.hidden_size, config.text_embed_dim
        self.vision_embeddings = GenLIPVisionEmbeddings(config)
        self.visual = GenLIPEncoder(config)
        self.rotary_emb = GenLIPRotaryEmbedding(config)
        self.ln_post = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.embeddings = nn.Embedding(config.vocab_size, E)
        self.in_proj = nn.Linear(E, D) if E != D else nn.Identity()
        self.proj = nn.Linear(D, E) if E != D else nn.Identity()
        self.lm_head = nn.Linear(E, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module):
        """Spec §5.2. Children are initialised before parents, so the attention rule overrides the Linear one."""
        std = self.config.initializer_range
        if isinstance(module, GenLIPAttention):
            for lin in (module.q_proj, module.k_proj, module.v_proj, module.out_proj):
                nn.init.xavier_uniform_(lin.weight)
                nn.init.zeros_(lin.bias)
        elif isinstance(module, GenLIPLayerScale):
            nn.init.constant_(module.lambda1, module.init_value)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)

    def get_input_embeddings(self):
        return self.embeddings

    def set_input_embeddings(self, value):
        self.embeddings = value

    def get_output_embeddings(self):
        return self.lm_head

    # -- the pieces of a forward ---------------------------------------------------------------------------------
    def embed(self, input_ids, image_mask=None, patches=None) -> torch.Tensor:
        """[B, S] ids (+ [N, C, P, P] patches at image_mask) -> [B, S, D]. Image tokens bypass in_proj (§2.3)."""
        if image_mask is not None:
            input_ids = input_ids.masked_fill(image_mask, 0)   # placeholders (-200, ...) are not vocabulary ids
        x = self.in_proj(self.embeddings(input_ids))
        n_img = 0 if image_mask is None else int(image_mask.sum())
        n_patches = 0 if patches is None else patches.shape[0]
        if n_img != n_patches:
            raise ValueError(f"{n_img} image positions in image_mask but {n_patches} image patches")
        if n_img == 0:
            return x
        img = self.vision_embeddings(patches).to(x.dtype)                     # [N, D]
        return x.masked_scatter(image_mask[..., None].expand_as(x), img)

    def prepare(self, input_ids, image_mask=None, pixel_values=None, image_grid_thw=None, position_ids=None,
                attention_mask=None, sample_ids=None, cache: Optional[GenLIPCache] = None):
        """Everything the layers need: x [B, S, D], cos/sin [B, 1, S, hd], mask [B, 1, S, S_k]. Records the new
        tokens in `cache` (their keys/values are added by the layers)."""
        B, S = input_ids.shape
        dev = input_ids.device
        if image_mask is None:
            image_mask = torch.zeros(B, S, dtype=torch.bool, device=dev)
        image_mask = image_mask.bool()
        if sample_ids is None:
            sample_ids = (torch.zeros(B, S, dtype=torch.long, device=dev) if attention_mask is None
                          else torch.where(attention_mask[:, -S:].bool(), 0, -1))
        sample_ids = sample_ids.long()
        patches, grids = to_patches(pixel_values, image_grid_thw, self.config.patch_size, self.config.num_channels)
        x = self.embed(input_ids, image_mask, patches)
        position_ids = self._positions(position_ids, image_mask, sample_ids, grids, cache, B, S)
        cos, sin = self.rotary_emb(position_ids, x.dtype)
        past = (None, None) if cache is None else (cache.sample_ids, cache.is_image)
        mask = prefix_lm_mask(sample_ids, image_mask, *past)
        if cache is not None:
            cache.add_tokens(sample_ids, image_mask, position_ids)
        return x, cos, sin, mask

    def _positions(self, position_ids, image_mask, sample_ids, grids, cache, B, S) -> torch.Tensor:
        if position_ids is not None:
            if position_ids.dim() == 2 and B == 1:
                position_ids = position_ids[None]
            if tuple(position_ids.shape) != (B, 3, S):
                raise ValueError(f"position_ids must be [B, 3, S] = [{B}, 3, {S}], got {tuple(position_ids.shape)}")
            return position_ids.long()
        if cache is not None and cache.seq_len:
            # continuing a cached sequence: text only, next position on all three axes (spec §9)
            if bool(image_mask.any()):
                raise ValueError("image tokens after cached tokens need explicit position_ids")
            steps = torch.arange(S, device=sample_ids.device)
            return (cache.next_position[:, None] + steps).unsqueeze(1).expand(B, 3, S)
        return grid_positions(image_mask, sample_ids, grids)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Last layer [.., D] -> proj(ln_post(x)) [.., E] (spec §2.7)."""
        return self.proj(self.ln_post(x))

    def forward(self, input_ids, image_mask=None, pixel_values=None, image_grid_thw=None, position_ids=None,
                attention_mask=None, sample_ids=None, labels=None, past_key_values=None, use_cache=False,
                output_hidden_states=False, return_dict=None, cache=None) -> GenLIPOutput:
        """`past_key_values` (or its transformers >= 5.24 spelling `cache`): a GenLIPCache from an earlier call's
        output, whose tokens this call continues; `use_cache` starts a new one. Both are returned as `kv_cache`."""
        if past_key_values is not None and cache is not None:
            raise ValueError("pass the KV cache as past_key_values or as cache, not both")
        cache = past_key_values if past_key_values is not None else cache
        if cache is None and use_cache:
            cache = GenLIPCache()
        x, cos, sin, mask = self.prepare(input_ids, image_mask, pixel_values, image_grid_thw, position_ids,
                                         attention_mask, sample_ids, cache)
        x, states = self.visual(x, cos, sin, mask, cache, collect=output_hidden_states)
        hidden = self.head(x)
        logits = self.lm_head(hidden)
        loss = caption_loss(logits, labels) if labels is not None else None
        out = GenLIPOutput(loss=loss, logits=logits, hidden_states=hidden, layer_hidden_states=states,
                           kv_cache=cache)
        return out if return_dict is not False else out.to_tuple()

    # -- features ----------------------------------------------------------------------------------------------------
    def encode_images(self, images=None, *, patches=None, grids=None, layer="post_proj",
                      batch_size: Optional[int] = None) -> List[torch.Tensor]:
        """Patch features of each image, alone (image tokens never see text, spec §3.1): a list of [n_i, D or E].

        images: a list of [C, H, W] in [-1, 1] or [n, C, H, W]; or patches [N, C*P*P] / [N, C, P, P] with grids
        [(gh, gw)] or [[1, gh, gw]]. layer: "post_proj" (the reference's hidden_states, width E), "post_norm"
        (ln_post, D), "pre_norm" (last layer, D), or an int k in [-(L+1), L]: the residual stream after k layers
        (0 = patch embeddings, L or -1 = "pre_norm"). Images of different sizes are batched with padding; pass
        batch_size to bound memory."""
        L = self.config.num_hidden_layers
        if isinstance(layer, int):
            if not -(L + 1) <= layer <= L:
                raise ValueError(f"layer {layer} is outside [-{L + 1}, {L}]")
            num_layers = layer % (L + 1)
        elif layer in FEATURE_LAYERS:
            num_layers = L
        else:
            raise ValueError(f"layer must be an int or one of {FEATURE_LAYERS}, got {layer!r}")
        patches, grids = to_patches(patches if images is None else images, grids, self.config.patch_size,
                                    self.config.num_channels)
        dev = self.lm_head.weight.device
        sizes = [gh * gw for gh, gw in grids]
        step = batch_size or max(len(grids), 1)
        feats, start = [], 0
        for i in range(0, len(grids), step):
            chunk, chunk_sizes = grids[i:i + step], sizes[i:i + step]
            batch = self._prefix_batch(chunk, [[]] * len(chunk), dev)
            n = sum(chunk_sizes)
            x, cos, sin, mask = self.prepare(batch["input_ids"], batch["image_mask"], patches[start:start + n].to(dev),
                                             chunk, sample_ids=batch["sample_ids"])
            start += n
            x, _ = self.visual(x, cos, sin, mask, num_layers=num_layers)
            if layer == "post_norm":
                x = self.ln_post(x)
            elif layer == "post_proj":
                x = self.head(x)
            feats += [x[b, :s] for b, s in enumerate(chunk_sizes)]
        return feats

    @staticmethod
    def _prefix_batch(grids, texts, device):
        """Right-padded rows [image n_i][text_i]: input_ids, image_mask, sample_ids (-1 on padding) [B, S]; lengths."""
        lengths = [gh * gw + len(t) for (gh, gw), t in zip(grids, texts)]
        B, S = len(grids), max(lengths, default=0)
        ids = torch.zeros(B, S, dtype=torch.long)
        image_mask = torch.zeros(B, S, dtype=torch.bool)
        sample_ids = torch.full((B, S), -1, dtype=torch.long)
        for b, ((gh, gw), text) in enumerate(zip(grids, texts)):
            n = gh * gw
            image_mask[b, :n] = True
            ids[b, n:lengths[b]] = torch.tensor(list(text), dtype=torch.long)
            sample_ids[b, :lengths[b]] = 0
        return {"input_ids": ids.to(device), "image_mask": image_mask.to(device),
                "sample_ids": sample_ids.to(device), "lengths": torch.tensor(lengths, device=device)}

    # -- captions ------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_captions(self, images=None, prompt_ids: Sequence[int] = (), max_new_tokens: int = 64,
                          end_ids: Sequence[int] = (), *, patches=None, grids=None,
                          stop_at_first_end_id: bool = False) -> List[List[int]]:
        """Greedy captions for a batch of images, with a KV cache. Returns the generated ids of each image, without
        the end ids.

        Prefill: right-padded rows [image patches][prompt] under the prefix-LM mask; then one token per step for
        every row, at position last + 1 on all three axes (spec §9). A row stops when its output ends with the full
        `end_ids` (or with end_ids[0] when stop_at_first_end_id); a row cut by max_new_tokens loses a trailing
        partial end sequence too. images / patches / grids: as in `encode_images`."""
        patches, grids = to_patches(patches if images is None else images, grids, self.config.patch_size,
                                    self.config.num_channels)
        dev = self.lm_head.weight.device
        end = [int(t) for t in end_ids]
        batch = self._prefix_batch(grids, [list(prompt_ids)] * len(grids), dev)
        if not grids or max_new_tokens <= 0:
            return [[] for _ in grids]
        cache = GenLIPCache()
        x, cos, sin, mask = self.prepare(batch["input_ids"], batch["image_mask"], patches.to(dev), grids,
                                         sample_ids=batch["sample_ids"], cache=cache)
        x, _ = self.visual(x, cos, sin, mask, cache)
        last = x[torch.arange(len(grids), device=dev), batch["lengths"] - 1]     # [B, D]: last real token per row
        outs, done = [[] for _ in grids], [False] * len(grids)
        for step in range(max_new_tokens):
            next_ids = self.lm_head(self.head(last)).argmax(-1)                    # [B]
            for b, t in enumerate(next_ids.tolist()):
                if not done[b]:
                    outs[b].append(t)
                    done[b] = _ends(outs[b], end, stop_at_first_end_id)
            if all(done) or step + 1 == max_new_tokens:
                break
            # finished rows keep decoding (their tokens are dropped): the batch keeps one shape
            x, cos, sin, mask = self.prepare(next_ids[:, None], cache=cache)
            x, _ = self.visual(x, cos, sin, mask, cache)
            last = x[:, -1]
        return [_strip_end(o, end, d, stop_at_first_end_id) for o, d in zip(outs, done)]


def _ends(ids: List[int], end: List[int], first_only: bool) -> bool:
    if not end:
        return False
    if first_only:
        return ids[-1] == end[0]
    return len(ids) >= len(end) and ids[-len(end):] == end


def _strip_end(ids: List[int], end: List[int], done: bool, first_only: bool) -> List[int]:
    if done:
        return ids[:-1] if first_only else ids[:-len(end)]
    for k in range(min(len(end) - 1, len(ids)), 0, -1):      # cut short inside the end sequence
        if ids[-k:] == end[:k]:
            return ids[:-k]
    return ids
