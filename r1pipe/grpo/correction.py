"""Truncated importance-sampling weights for the sampler/trainer log-prob mismatch (spec section 2).

vLLM samples with slightly different numerics than the trainer, so the rollout is off-policy even
before the first update. The weight π_old/π_sampler, capped (or masked outside [C_min, C_max]),
multiplies the policy term per token in `r1pipe.grpo.loss.clipped_policy_loss(is_weights=...)`.
"""

from __future__ import annotations

import math

import torch

MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def truncated_is_weights(
    old_logp: torch.Tensor,
    sampling_logp: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token_truncate",
    clip_min: float | None = None,
    clip_max: float | None = 2.0,
) -> torch.Tensor:
    """Detached weights w = π_old/π_sampler: [B, T] for token_* modes, [B, 1] for sequence_* modes.

    old_logp: trainer log-probs of the sampled tokens before the update; sampling_logp: the rollout
    engine's log-probs of the same tokens (NaN where it returned none: those tokens get weight 1).
    "*_truncate" clamps w into [clip_min, clip_max] (TIS); "*_mask" sets w to 0 outside it (MIS).
    "sequence_*" uses one weight per completion, exp(Σ_t masked log-ratio). Mode names and bounds
    follow TRL's `vllm_importance_sampling_mode` / `_clip_min` / `_clip_max`.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if old_logp.shape != sampling_logp.shape or old_logp.shape != mask.shape:
        raise ValueError(
            f"old_logp {tuple(old_logp.shape)}, sampling_logp {tuple(sampling_logp.shape)} and "
            f"mask {tuple(mask.shape)} must all be [B, T]"
        )
    with torch.no_grad():
        diff = torch.nan_to_num((old_logp - sampling_logp) * mask.to(old_logp.dtype), nan=0.0)
        if mode.startswith("sequence"):
            diff = diff.sum(dim=-1, keepdim=True)
        w = torch.exp(diff)
        if mode.endswith("truncate"):
            if clip_min is None and clip_max is None:
                return w
            return torch.clamp(w, min=clip_min, max=clip_max)
        lo = -math.inf if clip_min is None else clip_min
        hi = math.inf if clip_max is None else clip_max
        return w.masked_fill((w < lo) | (w > hi), 0.0)
