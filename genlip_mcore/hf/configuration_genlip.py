"""GenLIP configuration in the HF layout of the released checkpoints (`model_type: genlip`, spec §1.1 and §8.2).

Self-contained on purpose: this file is copied into every export and loaded with `trust_remote_code`, so it imports
nothing but transformers.

Defaults are the reference's (hidden 1152, FFN 4304, 27 layers, 16 heads) except for the switches that change the
computation, which default to the values of all shipped configs because they are the only ones implemented:
SwiGLU with a silu gate branch, gated attention, LayerScale 0.1, interleaved M-RoPE.

`rope_scaling` / `rope_parameters` are accepted in every spelling seen in the wild ({"type": "mrope" | "default",
"rope_type": ..., "mrope_section": [...]}), and None is fine: the reference crashes on None (spec §11.8), here it
means "every frequency slot interleaved T, H, W" (the section a shipped config would use for this head_dim). The
section that counts is always available as the plain attribute `mrope_section`.
"""

from transformers import PretrainedConfig

DEFAULT_PROMPT = "Describe the image in detail."


def default_mrope_section(head_dim: int) -> list:
    """[T, H, W] covering all head_dim/2 slots in interleaved mode: [12, 12, 12] for hd 72, [16, 16, 16] for hd 96.

    Interleaved M-RoPE reads only entries 1 and 2 (slot j is H when j % 3 == 1 and j < 3*sec[1], W likewise with
    j % 3 == 2); entry 0 takes the rest, so the three sum to head_dim/2 as the shipped sections do."""
    slots = head_dim // 2
    hw = (slots + 2) // 3       # ceil(slots/3): every slot j < slots with j % 3 in (1, 2) is below 3*hw
    return [max(0, slots - 2 * hw), hw, hw]


class GenLIPConfig(PretrainedConfig):
    model_type = "genlip"
    # the section is not a rope-scaling parameter of HF's default rope; do not warn about it
    ignore_keys_at_rope_validation = {"mrope_section"}

    def __init__(
        self,
        hidden_size: int = 1152,
        intermediate_size: int = 4304,
        num_hidden_layers: int = 27,
        num_attention_heads: int = 16,
        num_key_value_heads: int = None,    # only stored: K/V are always full multi-head (spec §1.1)
        patch_size: int = 16,
        num_channels: int = 3,
        hidden_act: str = "silu",           # activation of the SwiGLU gate branch (gate_fc)
        use_swiglu_ffn: bool = True,
        gated_attention: bool = True,
        ls_init_value: float = 0.1,         # LayerScale is on when > 1e-6
        drop_path_rate: float = 0.0,
        layer_norm_eps: float = 1e-6,
        text_embed_dim: int = None,         # E; None means E = hidden_size (no in_proj / proj)
        vocab_size: int = 151936,
        rope_theta: float = 10000.0,
        rope_scaling: dict = None,
        mrope_section: list = None,         # shortcut for rope_scaling["mrope_section"]
        mrope_interleaved: bool = True,
        max_position_embeddings: int = 16384,   # not a position limit (spec §1.1)
        attention_dropout: float = 0.0,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = False,
        # preprocessing and captioning metadata (not read by the forward)
        image_size: int = 224,              # stage 1: every image resized to image_size x image_size
        image_stage: int = 1,               # 1: fixed image_size square; 2: native resolution (smart_resize)
        min_pixels: int = 4096,
        max_pixels: int = 262144,
        image_mean: list = None,            # default 0.5 per channel: pixels in [-1, 1]
        image_std: list = None,
        prompt: str = DEFAULT_PROMPT,       # the unlabelled prompt the model was trained with
        end_text: str = None,               # the labelled end of every caption; None = the tokenizer's default
        **kwargs,
    ):
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.hidden_act = hidden_act
        self.use_swiglu_ffn = use_swiglu_ffn
        self.gated_attention = gated_attention
        self.ls_init_value = ls_init_value
        self.drop_path_rate = drop_path_rate
        self.layer_norm_eps = layer_norm_eps
        self.text_embed_dim = hidden_size if text_embed_dim is None else text_embed_dim
        self.vocab_size = vocab_size
        self.rope_theta = rope_theta
        self.mrope_interleaved = mrope_interleaved
        self.max_position_embeddings = max_position_embeddings
        self.attention_dropout = attention_dropout
        self.initializer_range = initializer_range
        self.image_size = image_size
        self.image_stage = image_stage
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.image_mean = [0.5] * num_channels if image_mean is None else list(image_mean)
        self.image_std = [0.5] * num_channels if image_std is None else list(image_std)
        self.prompt = prompt
        self.end_text = end_text

        # transformers >= 5 stores rope settings as `rope_parameters` (rope_scaling is an alias of it); older
        # versions keep `rope_scaling`. Read whichever came in, write the released form to `rope_parameters`.
        rope = rope_scaling or kwargs.pop("rope_parameters", None) or {}
        kwargs.pop("rope_parameters", None)
        section = mrope_section or rope.get("mrope_section") or default_mrope_section(self.head_dim)
        self.mrope_section = [int(s) for s in section]
        self.rope_parameters = {"rope_type": "default", "type": "default", "rope_theta": float(rope_theta),
                                "mrope_section": list(self.mrope_section)}
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        self.tie_word_embeddings = tie_word_embeddings
        self._check()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def _check(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                             f"{self.num_attention_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if len(self.mrope_section) != 3:
            raise ValueError(f"mrope_section must have 3 entries (T, H, W), got {self.mrope_section}")
        # Only the shipped architecture is implemented; say so instead of computing something else.
        unsupported = [name for name, ok in (("use_swiglu_ffn", self.use_swiglu_ffn),
                                             ("gated_attention", self.gated_attention),
                                             ("mrope_interleaved", self.mrope_interleaved),
                                             ("tie_word_embeddings", not self.tie_word_embeddings)) if not ok]
        if unsupported:
            raise ValueError(f"GenLIPConfig: {', '.join(unsupported)} other than the shipped value is not "
                             "implemented (use_swiglu_ffn, gated_attention, mrope_interleaved True; "
                             "tie_word_embeddings False)")
