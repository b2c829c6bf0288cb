"""Rotary position embeddings (RoPE) and their scalings for a longer context, all in one place.

Half-split layout, as Hugging Face Llama: an exported checkpoint needs no weight permutation.

A model trained at `original` positions can run longer with its frequencies rescaled. Each scaling
gives inverse frequencies and an attention factor (cos and sin are multiplied by it, so attention
logits by its square), with the same formulas and parameter names as `transformers`' RoPE
initialisation functions (tested equal):

    none         theta^(-2i/d); past the trained length the angles simply extrapolate
    linear       position interpolation (Chen et al. 2023): every frequency divided by the factor
    ntk          "NTK-aware": theta raised to theta * factor^(d/(d-2)); high frequencies kept, low
                 ones interpolated (transformers writes it as a plain rope_theta)
    dynamic-ntk  ntk with the factor grown from the current length L: base = theta *
                 (factor * L / original - (factor - 1))^(d/(d-2)) once L > original, plain before
    yarn         (Peng et al. 2023) frequencies that turn more than beta_fast times over the
                 original length are kept, those turning less than beta_slow times are divided by
                 the factor, a linear ramp between; attention factor 0.1 ln(factor) + 1
    clex         (Chen et al. 2024) a learned continuous scaling: the log-frequencies follow a small
                 neural ODE in the scale t = L / original, trained by sampling t at each step

Dynamic scalings (dynamic-ntk, clex) depend on the current length, so a KV cache written at one
length holds keys rotated with other frequencies than the next step uses: `Llama` re-rotates the
cached keys when the frequencies change (rotations compose), so cached decoding computes what a
full forward pass over the same tokens computes.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

SCALINGS = ("none", "linear", "ntk", "dynamic-ntk", "yarn", "clex")
DYNAMIC = ("dynamic-ntk", "clex")  # their frequencies depend on the current length


def rope_inv_freq(head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """theta^(-2i/d) for i < d/2, in float64."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))


def ntk_theta(theta: float, head_dim: int, factor: float) -> float:
    """NTK-aware scaling as a new base: theta * factor^(d/(d-2))."""
    return theta * factor ** (head_dim / (head_dim - 2))


def yarn_inv_freq(head_dim: int, theta: float, factor: float, original: int, beta_fast: float = 32.0,
                  beta_slow: float = 1.0) -> torch.Tensor:
    """YaRN's "NTK-by-parts" frequencies: dimension i is kept as it is (extrapolated) when its
    wavelength fits more than beta_fast times into the original length, divided by `factor`
    (interpolated) when it fits fewer than beta_slow times, linearly mixed between."""
    def dim_for_turns(turns: float) -> float:  # the dimension whose frequency turns `turns` times over `original`
        return head_dim * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(dim_for_turns(beta_fast)), 0)
    high = min(math.ceil(dim_for_turns(beta_slow)), head_dim - 1)
    if low == high:
        high += 0.001  # as transformers: a step, not a division by zero
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolated = rope_inv_freq(head_dim, theta)
    keep = 1 - ramp  # 1 for fast dimensions (kept), 0 for slow ones (interpolated)
    return extrapolated / factor * (1 - keep) + extrapolated * keep


def yarn_attention_factor(factor: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0


def scaled_inv_freq(kind: str, head_dim: int, theta: float, factor: float = 1.0, original: int = 0,
                    length: int | None = None, beta_fast: float = 32.0, beta_slow: float = 1.0
                    ) -> tuple[torch.Tensor, float]:
    """(inverse frequencies in float64, attention factor) of a fixed-formula scaling; `length` is the
    current sequence length, which only dynamic-ntk reads. (clex is learned: `ClexScaling`.)"""
    if kind == "none":
        return rope_inv_freq(head_dim, theta), 1.0
    if kind == "linear":
        return rope_inv_freq(head_dim, theta) / factor, 1.0
    if kind == "ntk":
        return rope_inv_freq(head_dim, ntk_theta(theta, head_dim, factor)), 1.0
    if kind == "dynamic-ntk":
        length = max(length or original, original)
        base = theta * ((factor * length / original) - (factor - 1)) ** (head_dim / (head_dim - 2))
        return rope_inv_freq(head_dim, base), 1.0
    if kind == "yarn":
        return yarn_inv_freq(head_dim, theta, factor, original, beta_fast, beta_slow), yarn_attention_factor(factor)
    raise ValueError(f"unknown RoPE scaling {kind!r}; one of {', '.join(SCALINGS)}")


def cos_sin(inv_freq: torch.Tensor, length: int, attention_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (length, head_dim // 2) in float32 (angles in float64, then cast), times
    the attention factor."""
    angles = torch.outer(torch.arange(length, dtype=torch.float64, device=inv_freq.device), inv_freq.double())
    return (angles.cos() * attention_factor).float(), (angles.sin() * attention_factor).float()


def rope_cos_sin(head_dim: int, max_seq_len: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Unscaled tables of shape (max_seq_len, head_dim // 2)."""
    return cos_sin(rope_inv_freq(head_dim, theta), max_seq_len)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x of shape (batch, heads, seq, head_dim) by per-position angles (seq, head_dim // 2)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class ClexScaling(nn.Module):
    """CLEX's learned frequencies at scale t >= 1 (t = length / original).

    The log inverse frequencies z follow dz/du = -c * exp(g(z, u)) with u = ln t, c_i = 2i/(d-2)
    and g a small MLP whose output layer starts at zero. At the start g = 0, and integrating gives
    z(u) = z(0) - c u: exactly NTK-aware scaling with factor t, a sound training-free start.
    Training moves g; since exp(.) > 0, every frequency still falls as t grows (the scaling stays
    monotone in the factor whatever is learned). Integrated with fixed-step RK4, in float32.
    """

    def __init__(self, head_dim: int, theta: float, hidden: int = 0, steps_per_unit: int = 8):
        super().__init__()
        half = head_dim // 2
        self.register_buffer("z0", torch.log(rope_inv_freq(head_dim, theta)).float(), persistent=False)
        self.register_buffer("rate", (torch.arange(half, dtype=torch.float32) * 2 / (head_dim - 2)),
                             persistent=False)
        hidden = hidden or 2 * half
        self.up = nn.Linear(half + 1, hidden)
        self.down = nn.Linear(hidden, half)
        self.steps_per_unit = steps_per_unit
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.up.weight, std=0.02)
        nn.init.zeros_(self.up.bias)
        nn.init.zeros_(self.down.weight)  # g = 0: NTK scaling until trained
        nn.init.zeros_(self.down.bias)

    def _slope(self, z: torch.Tensor, u: float) -> torch.Tensor:
        # z is normalised by its start so the MLP sees values of order one
        features = torch.cat([z / self.z0.abs().clamp(min=1.0), z.new_full((1,), u)])
        return -self.rate * torch.exp(self.down(torch.tanh(self.up(features))))

    def inv_freq(self, scale: float) -> torch.Tensor:
        """Inverse frequencies (head_dim // 2,) at scale `scale` (below 1: the original ones)."""
        u_end = math.log(max(scale, 1.0))
        z = self.z0
        if u_end == 0:
            return torch.exp(z)
        steps = max(2, math.ceil(self.steps_per_unit * u_end))
        h = u_end / steps
        for k in range(steps):
            u = k * h
            k1 = self._slope(z, u)
            k2 = self._slope(z + h / 2 * k1, u + h / 2)
            k3 = self._slope(z + h / 2 * k2, u + h / 2)
            k4 = self._slope(z + h * k3, u + h)
            z = z + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        return torch.exp(z)


class RotaryEmbedding(nn.Module):
    """The model's rotary tables, scaled as its config says.

    Fixed scalings precompute cos/sin for `max_seq_len` positions (buffers, not saved: they follow
    from the config). Dynamic ones compute them for the current length on each call. CLEX owns
    parameters (its ODE), saved with the model as `rope.clex.*`.
    """

    def __init__(self, cfg):
        super().__init__()
        self.head_dim, self.theta = cfg.head_dim, cfg.rope_theta
        self.kind, self.factor = cfg.rope_scaling, cfg.rope_factor
        self.original = cfg.rope_original_len or cfg.max_seq_len
        self.beta_fast, self.beta_slow = cfg.rope_beta_fast, cfg.rope_beta_slow
        self.clex = ClexScaling(cfg.head_dim, cfg.rope_theta) if self.kind == "clex" else None
        self.clex_scale: float | None = None  # a training step's sampled CLEX scale (None: from the length)
        self.max_seq_len = cfg.max_seq_len
        inv, attention = self._fixed() if self.kind not in DYNAMIC else (rope_inv_freq(self.head_dim, self.theta), 1.0)
        cos, sin = cos_sin(inv, cfg.max_seq_len, attention)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @property
    def dynamic(self) -> bool:
        return self.kind in DYNAMIC

    def _fixed(self) -> tuple[torch.Tensor, float]:
        return scaled_inv_freq(self.kind, self.head_dim, self.theta, self.factor, self.original, None,
                               self.beta_fast, self.beta_slow)

    def inv_freq(self, length: int) -> torch.Tensor:
        """The inverse frequencies (float64) used for a sequence of `length` positions."""
        if self.kind == "clex":
            return self.clex.inv_freq(self._clex_scale(length)).double()
        if self.kind == "dynamic-ntk":
            return scaled_inv_freq(self.kind, self.head_dim, self.theta, self.factor, self.original, length)[0]
        return self._fixed()[0]

    def tables(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for positions 0 .. length - 1 of a sequence that is `length` long."""
        if not self.dynamic:
            if length > self.cos.shape[0]:
                self.extend(length)
            return self.cos[:length], self.sin[:length]
        if self.kind == "dynamic-ntk" and length <= self.original:
            return self.cos[:length], self.sin[:length]  # the plain frequencies, precomputed
        if self.kind == "clex":  # differentiable: its parameters train through the angles
            inv = self.clex.inv_freq(self._clex_scale(length)).to(self.cos.device)
            angles = torch.arange(length, device=self.cos.device, dtype=torch.float32)[:, None] * inv[None, :]
            return angles.cos(), angles.sin()
        return cos_sin(self.inv_freq(length).to(self.cos.device), length)

    def _clex_scale(self, length: int) -> float:
        """CLEX's scale: in training a fresh draw from [1, factor] at every step (its recipe: the
        dynamics learn every scale up to the factor, not just the training length's), else the
        length over the original (set `clex_scale` to fix it)."""
        if self.clex_scale is not None:
            return self.clex_scale
        if self.training:
            return 1.0 + (self.factor - 1.0) * float(torch.rand(()))
        return length / self.original

    def extend(self, length: int) -> None:
        """Room for `length` positions in the precomputed tables (same scaling)."""
        inv, attention = self._fixed() if not self.dynamic else (rope_inv_freq(self.head_dim, self.theta), 1.0)
        cos, sin = cos_sin(inv.to(self.cos.device), length, attention)
        self.cos, self.sin = cos.to(self.cos.device), sin.to(self.cos.device)
        self.max_seq_len = max(self.max_seq_len, length)


def rescale_rope(model: nn.Module, kind: str, factor: float = 1.0, original: int | None = None,
                 max_seq_len: int | None = None) -> None:
    """Give a built model another RoPE scaling (model.config.with_rope_scaling says how the
    original length and the context are chosen). A CLEX model keeps its learned ODE."""
    cfg = model.config.with_rope_scaling(kind, factor, original, max_seq_len)
    old = model.rope
    rope = RotaryEmbedding(cfg).to(old.cos.device)
    if kind == "clex" and old.clex is not None:
        rope.clex = old.clex
    rope.train(old.training)
    model.rope, model.config = rope, cfg
