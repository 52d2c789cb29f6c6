"""Rotary position embedding for MLA's decoupled RoPE part, with DeepSeek's YaRN scaling (spec section 5).

`rope_tables` gives cos/sin for given positions; `apply_rope_interleaved` rotates the rope slice of q and
k. DeepSeek checkpoints store the rope dims as interleaved pairs (x0, x1), (x2, x3), ...; we rotate each pair
and emit [rotated evens; rotated odds], the layout transformers' DeepseekV3 uses. q and k get the same
permutation, so q·k (all attention ever reads) is the same as rotating in place (V2's complex form).
"""
from __future__ import annotations

import math

import torch

from r1pipe.model.config import DeepSeekConfig


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(dim: int, base: float, scaling: dict, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    factor = scaling.get("factor")
    original = scaling["original_max_position_embeddings"]
    if factor is None:
        factor = max_position_embeddings / original
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_get_mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # the ramp below would divide by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep_extrapolated = 1 - ramp  # high-frequency dims keep their original frequency
    inv_freq = interpolation * (1 - keep_extrapolated) + extrapolation * keep_extrapolated
    return inv_freq, float(attention_factor)


def rope_inv_freq(config: DeepSeekConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies of the rope dims and the cos/sin scale (YaRN's attention factor, else 1)."""
    dim, base = config.qk_rope_head_dim, config.rope_theta
    scaling = config.rope_scaling
    if scaling and scaling.get("type", scaling.get("rope_type")) == "yarn":
        return _yarn_inv_freq(dim, base, scaling, config.max_position_embeddings)
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)), 1.0


def softmax_scale(config: DeepSeekConfig) -> float:
    """1/sqrt(d_nope + d_rope), times YaRN's mscale(all_dim)^2 correction for long context."""
    scale = config.qk_head_dim**-0.5
    scaling = config.rope_scaling
    if scaling and scaling.get("type", scaling.get("rope_type")) == "yarn":
        mscale_all_dim = scaling.get("mscale_all_dim", 0)
        if mscale_all_dim:
            m = yarn_get_mscale(scaling["factor"], mscale_all_dim)
            scale = scale * m * m
    return scale


def rope_tables(inv_freq: torch.Tensor, attention_factor: float, position_ids: torch.Tensor, dtype: torch.dtype):
    """cos, sin of shape [B, T, d_rope/2] for integer positions [B, T]."""
    freqs = position_ids[..., None].float() * inv_freq.to(position_ids.device)
    return (freqs.cos() * attention_factor).to(dtype), (freqs.sin() * attention_factor).to(dtype)


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, d_rope] with interleaved pairs; cos/sin [B, T, d_rope/2]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.cat([even * cos - odd * sin, odd * cos + even * sin], dim=-1)
