"""Loss masks for GRPO (spec section 2): truncated completions and top-entropy tokens.

Both return a mask [B, T] that the GRPO step passes to `r1pipe.grpo.loss.clipped_policy_loss`
(`mask=` for truncation, `entropy_mask=` for the entropy filter).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def mask_truncated(
    completion_mask: torch.Tensor,
    truncated: torch.Tensor | Sequence[bool] | Sequence[str],
) -> torch.Tensor:
    """Zero the mask rows of completions that hit the length limit (DAPO's overlong masking).

    Spec section 2 "masking truncated completions": a cut-off answer is neither right nor wrong, so
    it must not push the policy. `truncated` is a [B] bool tensor/list, or the rollout's finish
    reasons per completion ("length" means truncated, anything else, e.g. "stop", is kept).
    """
    if completion_mask.dim() != 2:
        raise ValueError(f"completion_mask must be [B, T], got shape {tuple(completion_mask.shape)}")
    if not isinstance(truncated, torch.Tensor):
        items = list(truncated)
        if items and isinstance(items[0], str):
            items = [reason == "length" for reason in items]
        truncated = torch.tensor(items, dtype=torch.bool, device=completion_mask.device)
    truncated = truncated.to(device=completion_mask.device, dtype=torch.bool)
    if truncated.shape != completion_mask.shape[:1]:
        raise ValueError(
            f"truncated has shape {tuple(truncated.shape)}, expected [{completion_mask.shape[0]}] "
            "(one flag or finish reason per completion row of completion_mask)"
        )
    keep = (~truncated).unsqueeze(1)
    return completion_mask * keep.to(completion_mask.dtype)


def top_entropy_mask(entropies: torch.Tensor, mask: torch.Tensor, top_quantile: float) -> torch.Tensor:
    """[B, T] bool: the valid tokens whose entropy is in the top `top_quantile` fraction of the batch.

    The "80/20" high-entropy-minority filter (TRL's `top_entropy_quantile`): only forking tokens
    carry policy gradient. The threshold is the (1 - top_quantile) quantile of the entropies of the
    valid tokens of this batch (linear interpolation); top_quantile=1 keeps every valid token.
    Local to this process: a multi-process run that wants one global threshold gathers first.
    """
    if not 0.0 < top_quantile <= 1.0:
        raise ValueError(f"top_quantile must be in (0, 1], got {top_quantile}")
    if entropies.shape != mask.shape:
        raise ValueError(f"entropies {tuple(entropies.shape)} and mask {tuple(mask.shape)} must have the same shape")
    valid = mask.bool()
    if top_quantile == 1.0:
        return valid.clone()
    values = entropies.detach()[valid]
    if values.numel() == 0:
        return torch.zeros_like(valid)
    # torch.quantile takes float32/float64 only; half-precision entropies are upcast for the threshold.
    if values.dtype not in (torch.float32, torch.float64):
        values = values.float()
    threshold = torch.quantile(values, 1.0 - top_quantile)
    return (entropies.detach() >= threshold) & valid
