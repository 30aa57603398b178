"""FP8 quantize-dequantize with the scale rules of Transformer Engine's recipes and torchao's rowwise recipe.

Dimensions: R x C a 2-D operand; br x bc one scaling block (1xB "rowwise" usage, Bx1 "columnwise", 128x128 weight
tiles for `blockwise`, a whole row / column for `rowwise`); nR = ceil(R / br), nC = ceil(C / bc) blocks.

Convention: `scale` multiplies the high-precision value before the cast, dequantization divides by it (TE's
`scale`, torchao's `_scale`; the GEMM's dequantization factor, TE's `scale_inv`, is 1 / scale). Values whose scaled
magnitude exceeds the format's max are clipped explicitly: torch's CPU cast saturates for E4M3 but gives inf for E5M2.

Scale rules (amax over the tensor or block, FP8_MAX of the format used for the role):
  delayed     (FP8_MAX / amax_window) / 2**margin, from DelayedScales; 1.0 before the first update (TE)
  tensorwise  FP8_MAX / amax / 2**margin, optionally rounded down to a power of two; amax 0 -> 1
  blockwise   FP8_MAX / amax_block rounded down to a power of two; 1x128 activations and gradients, 128x128 weights
  mxfp8       E8M0: 1 / 2**ceil(log2(amax_block / FP8_MAX)) over 1x32 blocks (torchao's RCEIL, cuBLAS's rule)
  rowwise     FP8_MAX / amax_row rounded down to a power of two (torchao Float8LinearConfig "rowwise")
Zero blocks get scale 1 everywhere. FP8_MAX / amax is computed in float64 and rounded once to float32, as torchao
does; for FP8_MAX = 7 * 2**k that equals float32 division (TE), because the quotient can never be a float32 tie.
Power-of-two rounding and the E8M0 exponent are taken exactly from the float's exponent field (frexp); torchao's
eager path uses float32 log2, which can round a scale within ~1e-7 (relative) of a power of two the other way.
Known differences from torchao: it clamps amax to >= 1e-12 (so an all-zero tensor gets scale 448e12 where TE and we
use 1; the dequantized values are the same zeros), and only those near-power-of-two log2 cases. Margin applies to the
per-tensor recipes only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

ROLES = ("activation", "weight", "gradient")
FP8_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8", "rowwise")
FORMATS = ("e4m3", "hybrid")
AMAX_ALGOS = ("max", "most_recent")
USAGES = ("rowwise", "columnwise")

# Block length along the usage's dimension: 0 = per tensor, -1 = the whole row (rowwise usage) or column.
_BLOCK = {"delayed": 0, "tensorwise": 0, "blockwise": 128, "mxfp8": 32, "rowwise": -1}
_WEIGHT_TILE = {"blockwise": (128, 128)}      # 2-D weight tiles: one quantization serves both usages
_F32_MAX = torch.finfo(torch.float32).max


def fp8_max(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


def require_torchao():
    """Import torchao (the optional `fp8` extra) with an actionable message when it is missing."""
    try:
        import torchao
    except ImportError as e:
        raise ImportError("torchao is needed here: pip install genlip_mcore[fp8]") from e
    return torchao


@dataclass(frozen=True)
class Recipe:
    name: str                       # one of RECIPES
    fmt: str = "hybrid"             # "e4m3": every tensor E4M3 | "hybrid": E5M2 for gradients (TE's Format.HYBRID)
    margin: int = 0                 # per-tensor recipes: scale = (FP8_MAX / amax) / 2**margin
    amax_history_len: int = 1024    # delayed only
    amax_compute_algo: str = "max"  # delayed only: "max" | "most_recent"
    power_2_scales: bool = False    # tensorwise: round the scale down to a power of two
    fp8_wgrad: bool = True          # False: the wgrad GEMM uses high-precision operands

    def __post_init__(self):
        if self.name not in RECIPES:
            raise ValueError(f"fp8 recipe {self.name!r}: choose one of {RECIPES}")
        if self.fmt not in FORMATS:
            raise ValueError(f"fp8 format {self.fmt!r}: choose one of {FORMATS}")
        if self.amax_compute_algo not in AMAX_ALGOS:
            raise ValueError(f"fp8 amax_compute_algo {self.amax_compute_algo!r}: choose one of {AMAX_ALGOS}")
        if self.amax_history_len < 1:
            raise ValueError(f"fp8 amax_history_len must be >= 1, got {self.amax_history_len}")

    def dtype(self, role: str) -> torch.dtype:
        if role not in ROLES:
            raise ValueError(f"fp8 role {role!r}: choose one of {ROLES}")
        if self.fmt == "hybrid" and role == "gradient":
            return FP8_DTYPES["e5m2"]
        return FP8_DTYPES["e4m3"]

    @property
    def per_tensor(self) -> bool:
        return _BLOCK[self.name] == 0

    @property
    def block(self) -> int | None:
        """The block length that GEMM dimensions must be multiples of for TE's kernels (None: no constraint)."""
        b = _BLOCK[self.name]
        return b if b > 0 else None

    @classmethod
    def from_precision(cls, pr) -> "Recipe":
        """From genlip_mcore.config.PrecisionConfig (pr.fp8 must be set)."""
        return cls(name=pr.fp8_recipe, fmt=pr.fp8, margin=pr.fp8_margin, amax_history_len=pr.fp8_amax_history_len,
                   amax_compute_algo=pr.fp8_amax_compute_algo, power_2_scales=pr.fp8_power_2_scales,
                   fp8_wgrad=pr.fp8_wgrad)


@dataclass
class QTensor:
    dq: torch.Tensor           # [R, C] float32 dequantized values: what the GEMM consumes
    scale: torch.Tensor        # float32 () per tensor, else [nR, nC] one per block
    amax: torch.Tensor         # float32 () max |x| of the high-precision input (local)
    dtype: torch.dtype         # FP8 dtype of the payload
    data: torch.Tensor         # [R, C] the FP8 payload
    n_underflow: torch.Tensor  # int64 (): non-zero inputs that became zero
    n_overflow: torch.Tensor   # int64 (): elements clipped at +-FP8_MAX
    recipe: str = ""
    usage: str = "rowwise"


def pow2_floor(s: torch.Tensor) -> torch.Tensor:
    """Largest power of two <= s (s > 0, finite), exact: s = m * 2**e with m in [0.5, 1) gives 2**(e-1)."""
    _, e = torch.frexp(s)
    return torch.ldexp(torch.full_like(s, 0.5), e)


def _ratio(amax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """FP8_MAX / amax in float32 (rounded once from float64); inf (tiny amax) becomes the float32 max as in TE."""
    r = (fp8_max(dtype) / amax.double()).float()
    return r.clamp(max=_F32_MAX)


def current_scale(amax: torch.Tensor, dtype: torch.dtype, margin: int = 0, power_2: bool = False) -> torch.Tensor:
    """Current (just-in-time) scaling of a tensor or of blocks: (FP8_MAX / amax) / 2**margin, amax 0 -> 1."""
    s = _ratio(amax, dtype) / 2.0**margin
    if power_2:
        s = pow2_floor(s)
    return torch.where(amax > 0, s, torch.ones_like(s))


def e8m0_scale(amax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """MXFP8 scale 2**-ceil(log2(amax / FP8_MAX)), the E8M0 exponent clamped to [-127, 127]; exponent -127 (zero or
    denormal blocks) multiplies by 1, as torchao and TE do."""
    descale = amax.float() / fp8_max(dtype)                    # float32 division, as both references
    m, e = torch.frexp(descale)
    exp = torch.where(m == 0.5, e - 1, e)                       # ceil(log2): exact powers of two keep their exponent
    exp = torch.where(descale > 0, exp, torch.full_like(exp, -127)).clamp(-127, 127)
    s = torch.ldexp(torch.ones_like(descale), -exp)
    return torch.where(exp == -127, torch.ones_like(s), s)


def _block_shape(recipe: Recipe, role: str, usage: str, rows: int, cols: int) -> tuple[int, int]:
    if usage not in USAGES:
        raise ValueError(f"fp8 usage {usage!r}: choose one of {USAGES}")
    if recipe.per_tensor:
        return rows, cols
    if role == "weight" and recipe.name in _WEIGHT_TILE:
        return _WEIGHT_TILE[recipe.name]
    b = _BLOCK[recipe.name]
    if usage == "rowwise":
        return 1, (cols if b < 0 else b)
    return (rows if b < 0 else b), 1


def _block_scale(recipe: Recipe, amax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if recipe.name == "mxfp8":
        return e8m0_scale(amax, dtype)
    return current_scale(amax, dtype, power_2=True)          # blockwise (TE) and rowwise (torchao): 2**k scales


def quantize(x: torch.Tensor, recipe: Recipe, role: str, usage: str = "rowwise",
             scale: torch.Tensor | None = None) -> QTensor:
    """Quantize-dequantize a 2-D [R, C] tensor for one GEMM operand. `usage` "rowwise" puts the blocks along C (1xB),
    "columnwise" along R (Bx1). `scale` (per-tensor recipes only, i.e. delayed scaling) is used as is; None means
    current scaling from x. Partial blocks at the edges are scaled from their real elements only."""
    if x.dim() != 2:
        raise ValueError(f"fp8 quantize expects a 2-D tensor, got shape {tuple(x.shape)}")
    if scale is not None and not recipe.per_tensor:
        raise ValueError(f"fp8 recipe {recipe.name!r} computes its own block scales; a given scale is per tensor")
    dtype = recipe.dtype(role)
    xf = x.detach().float()
    rows, cols = xf.shape
    amax = xf.abs().amax() if xf.numel() else xf.new_zeros(())
    br, bc = _block_shape(recipe, role, usage, rows, cols)
    nr, nc = -(-rows // br), -(-cols // bc)
    pad = (0, nc * bc - cols, 0, nr * br - rows)
    xp = F.pad(xf, pad) if any(pad) else xf                     # zeros never raise a block's amax
    xb = xp.reshape(nr, br, nc, bc)                              # [nR, br, nC, bc]
    if recipe.per_tensor:
        s = scale.to(device=x.device, dtype=torch.float32) if scale is not None else \
            current_scale(amax, dtype, recipe.margin, recipe.power_2_scales)
        s = s.reshape(())
        s_b = s.reshape(1, 1, 1, 1)
    else:
        s = _block_scale(recipe, xb.abs().amax(dim=(1, 3)), dtype)   # [nR, nC]
        s_b = s[:, None, :, None]
    scaled = xb * s_b
    limit = fp8_max(dtype)
    data_b = scaled.clamp(-limit, limit).to(dtype)
    dq_b = data_b.float() / s_b
    data = data_b.reshape(nr * br, nc * bc)[:rows, :cols]
    dq = dq_b.reshape(nr * br, nc * bc)[:rows, :cols]
    n_over = (scaled.abs() > limit).sum()
    n_under = ((xf != 0) & (dq == 0)).sum()
    return QTensor(dq=dq, scale=s, amax=amax, dtype=dtype, data=data, n_underflow=n_under, n_overflow=n_over,
                   recipe=recipe.name, usage=usage)


class DelayedScales:
    """TE's delayed scaling for one GEMM: an amax history per role ([L, 3], row 0 the most recent), the scales in
    use (1.0 and zero histories at the start, as TE) and the amaxes recorded since the last update."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.history = torch.zeros(recipe.amax_history_len, len(ROLES))
        self.scales = torch.ones(len(ROLES))
        self._pending = torch.zeros(len(ROLES))
        self._recorded = torch.zeros(len(ROLES), dtype=torch.bool)

    def scale(self, role: str) -> torch.Tensor:
        return self.scales[ROLES.index(role)].clone()

    def record(self, role: str, amax: torch.Tensor) -> None:
        i = ROLES.index(role)
        a = amax.detach().float().reshape(()).to(self._pending.device)
        self._pending[i] = torch.maximum(self._pending[i], a)
        self._recorded[i] = True

    def pending(self) -> torch.Tensor:
        return self._pending.clone()

    def update(self, amax: torch.Tensor) -> None:
        """Push one amax per role (ROLES order, possibly all-reduced with MAX) and recompute the scales. A role
        takes part when it was recorded here or the reduced amax is positive (recorded on another rank), so that
        ranks stay in step; other roles keep their history and scale."""
        amax = amax.detach().float().reshape(len(ROLES)).to(self.history.device)
        for i, role in enumerate(ROLES):
            if not (self._recorded[i] or amax[i] > 0):
                continue
            self.history[:, i] = torch.roll(self.history[:, i], 1)
            self.history[0, i] = amax[i]
            window = self.history[:, i].max() if self.recipe.amax_compute_algo == "max" else self.history[0, i]
            self.scales[i] = self._scale_from(window, self.recipe.dtype(role), self.scales[i])
        self._pending.zero_()
        self._recorded.zero_()

    def _scale_from(self, amax: torch.Tensor, dtype: torch.dtype, previous: torch.Tensor) -> torch.Tensor:
        # TE's default: a zero or non-finite amax keeps the previous scale; an infinite scale becomes the fp32 max.
        s = (fp8_max(dtype) / amax) / 2.0**self.recipe.margin
        s = torch.where(torch.isinf(s), torch.full_like(s, _F32_MAX), s)
        return torch.where((amax > 0) & torch.isfinite(amax), s, previous)

    def state_dict(self) -> dict:
        return {"history": self.history.clone(), "scales": self.scales.clone()}

    def load_state_dict(self, d: dict) -> None:
        if d["history"].shape != self.history.shape:
            raise ValueError(f"fp8 amax history shape {tuple(d['history'].shape)} != {tuple(self.history.shape)} "
                             "(precision.fp8_amax_history_len changed?)")
        self.history.copy_(d["history"])
        self.scales.copy_(d["scales"])
        self._pending.zero_()
        self._recorded.zero_()
