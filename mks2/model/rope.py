"""Rotary position embeddings with the HF ``rope_scaling`` variants (default, linear, dynamic, llama3, yarn).

The inverse frequencies are computed here from the formulas (not imported from ``transformers``);
``tests/model/test_rope.py`` checks them against transformers' own functions.

Two deliberate differences from HF's rotary module:
- ``inv_freq`` is NOT a registered buffer. Engines that cast a whole module to bf16 (DeepSpeed does
  ``module.bfloat16()``) would otherwise round the frequencies and shift every angle at long positions.
  It is kept in fp32 per device in a small cache instead.
- ``dynamic`` NTK scaling is stateless: the frequencies follow ``max(position_ids) + 1`` of the current
  call (HF caches the largest length seen so far). For a single forward the two agree.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


def normalize_rope_scaling(rope_scaling: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Return a plain dict with ``rope_type`` set (legacy key ``type`` accepted), or None for plain RoPE.

    Raises ValueError for unsupported types or missing required fields, naming them.
    """
    if rope_scaling is None:
        return None
    rs = {str(k): v for k, v in dict(rope_scaling).items()}
    rope_type = rs.pop("rope_type", None) or rs.pop("type", None) or "default"
    rs.pop("type", None)
    rs.pop("rope_theta", None)  # transformers 5 keeps theta inside rope_parameters; we keep it apart
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope_scaling: unsupported rope_type {rope_type!r} (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    if rope_type == "default":
        return None
    required = {
        "linear": ("factor",),
        "dynamic": ("factor",),
        "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
        "yarn": ("factor",),
    }[rope_type]
    missing = [k for k in required if rs.get(k) is None]
    if missing:
        raise ValueError(f"rope_scaling: rope_type {rope_type!r} needs {', '.join(missing)}")
    return {"rope_type": rope_type, **rs}


def _base_inv_freq(theta: float | torch.Tensor, dim: int, device: torch.device | None = None) -> torch.Tensor:
    # [dim/2] fp32: theta^(-2i/dim)
    exponent = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    return 1.0 / (theta**exponent)


def _llama3(inv_freq: torch.Tensor, rs: dict[str, Any], max_pos: int) -> torch.Tensor:
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend smoothly in between.
    factor = float(rs["factor"])
    low, high = float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
    old_ctx = float(rs.get("original_max_position_embeddings") or max_pos)
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


def _yarn(theta: float, dim: int, rs: dict[str, Any], max_pos: int) -> tuple[torch.Tensor, float]:
    # YaRN (arXiv 2309.00071): interpolate low frequencies, extrapolate high ones, ramp in between;
    # cos/sin are scaled by an attention factor ~ 0.1 ln(s) + 1.
    orig = int(rs.get("original_max_position_embeddings") or max_pos)
    factor = rs.get("factor")
    factor = float(factor) if factor is not None else max_pos / orig

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = rs.get("attention_factor")
    if attn is None:
        m, m_all = rs.get("mscale"), rs.get("mscale_all_dim")
        attn = mscale(factor, m) / mscale(factor, m_all) if (m and m_all) else mscale(factor)
    beta_fast = rs.get("beta_fast") or 32
    beta_slow = rs.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    if lo == hi:
        hi += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolate = 1 - ramp  # 1 -> keep the original frequency
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv_freq, float(attn)


def rope_inv_freq(
    *, head_dim: int, theta: float, rope_scaling: Mapping[str, Any] | None, max_position_embeddings: int
) -> tuple[torch.Tensor, float]:
    """Static inverse frequencies [head_dim/2] (fp32, CPU) and the cos/sin scale for a rope config.

    For ``dynamic`` this is the unscaled set; the scaled one depends on the sequence length and is
    computed per call by :class:`RotaryEmbedding`.
    """
    rs = normalize_rope_scaling(rope_scaling)
    kind = rs["rope_type"] if rs else "default"
    if kind in ("default", "dynamic"):
        return _base_inv_freq(theta, head_dim), 1.0
    if kind == "linear":
        # Scaling the positions by 1/factor equals scaling the frequencies.
        return _base_inv_freq(theta, head_dim) / float(rs["factor"]), 1.0
    if kind == "llama3":
        return _llama3(_base_inv_freq(theta, head_dim), rs, max_position_embeddings), 1.0
    if kind == "yarn":
        return _yarn(theta, head_dim, rs, max_position_embeddings)
    raise AssertionError(kind)  # normalize_rope_scaling rejected everything else


def dynamic_ntk_inv_freq(
    seq_len: torch.Tensor, *, head_dim: int, theta: float, factor: float, max_position_embeddings: int
) -> torch.Tensor:
    """NTK-aware 'dynamic' frequencies for a sequence length given as a 0-d tensor (no host sync)."""
    seq_len = torch.clamp(seq_len.float(), min=float(max_position_embeddings))
    base = theta * ((factor * seq_len / max_position_embeddings) - (factor - 1)) ** (head_dim / (head_dim - 2))
    return _base_inv_freq(base, head_dim, device=seq_len.device)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given position ids. No parameters and no state-dict entries."""

    def __init__(
        self,
        *,
        head_dim: int,
        theta: float = 10000.0,
        rope_scaling: Mapping[str, Any] | None = None,
        max_position_embeddings: int = 4096,
    ):
        super().__init__()
        self.head_dim = head_dim
        self.theta = float(theta)
        self.max_position_embeddings = max_position_embeddings
        self.rope_scaling = normalize_rope_scaling(rope_scaling)
        self.rope_type = self.rope_scaling["rope_type"] if self.rope_scaling else "default"
        inv_freq, self.attention_scaling = rope_inv_freq(
            head_dim=head_dim, theta=self.theta, rope_scaling=self.rope_scaling,
            max_position_embeddings=max_position_embeddings,
        )  # fmt: skip
        self._inv_freq_cpu = inv_freq  # [hd/2] fp32
        self._inv_freq_by_device: dict[torch.device, torch.Tensor] = {}

    def inv_freq(self, position_ids: torch.Tensor) -> torch.Tensor:
        """[hd/2] fp32 on position_ids' device (dynamic NTK: for this call's length)."""
        if self.rope_type == "dynamic":
            return dynamic_ntk_inv_freq(
                position_ids.max() + 1, head_dim=self.head_dim, theta=self.theta,
                factor=float(self.rope_scaling["factor"]), max_position_embeddings=self.max_position_embeddings,
            )  # fmt: skip
        dev = position_ids.device
        if dev not in self._inv_freq_by_device:
            self._inv_freq_by_device[dev] = self._inv_freq_cpu.to(dev)
        return self._inv_freq_by_device[dev]

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, S] -> (cos, sin), each [B, S, head_dim] in ``dtype``."""
        freqs = position_ids[..., None].float() * self.inv_freq(position_ids)  # [B, S, hd/2] fp32
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, S, hd]: rotate-half layout, as HF
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, S, H, hd] by cos/sin [B, S, hd] (broadcast over heads)."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # [B, S, 1, hd]
    return x * cos + _rotate_half(x) * sin
