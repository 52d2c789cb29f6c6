"""Group-relative advantages Â_i = (r_i - mean_group(r)) / (std(r) + eps) (spec section 2).

Pure torch, no model: the GRPO step scores a rollout batch, calls `group_advantages`, and hands
the result to `r1pipe.grpo.loss.clipped_policy_loss`. Dynamic sampling lives in `sampling.py`.
"""

from __future__ import annotations

import torch

SCALES = ("group", "batch", "none")


def as_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """View rewards [B*G] or [B, G] as [B, G] (G = group_size samples of one prompt, contiguous).

    Spec section 2: the G outputs of a prompt form one group; a flat batch keeps them adjacent.
    """
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int (samples per prompt, G), got {group_size!r}")
    if rewards.dim() == 2:
        if rewards.shape[1] != group_size:
            raise ValueError(
                f"rewards has shape {tuple(rewards.shape)} but group_size={group_size}: "
                "a 2-D rewards tensor must be [num_prompts, group_size]"
            )
        return rewards
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be [B*G] or [B, G], got shape {tuple(rewards.shape)}")
    if rewards.numel() % group_size != 0:
        raise ValueError(
            f"rewards has {rewards.numel()} entries, not a multiple of group_size={group_size}: "
            "each prompt must contribute exactly G samples"
        )
    return rewards.view(-1, group_size)


def nan_std(x: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Sample standard deviation (Bessel-corrected, n-1) ignoring NaNs; NaN where fewer than 2 values.

    Bessel's correction is what TRL's GRPOTrainer uses for the group std, so our advantages match it.
    """
    valid = ~torch.isnan(x)
    n = valid.sum(dim=dim, keepdim=True).to(x.dtype)
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    sq = torch.where(valid, (x - mean) ** 2, torch.zeros_like(x)).sum(dim=dim, keepdim=True)
    var = torch.where(n > 1, sq / (n - 1).clamp(min=1), torch.full_like(sq, float("nan")))
    std = var.sqrt()
    if dim is None:
        return std.reshape(()) if not keepdim else std
    return std if keepdim else std.squeeze(dim)


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    scale: str = "group",
    eps: float = 1e-4,
) -> torch.Tensor:
    """GRPO advantages, one per sample, in the shape `rewards` came in ([B*G] or [B, G]).

    Spec section 2: Â_i = (r_i - mean(r_1..r_G)) / (std(r_1..r_G) + eps), the same for every token.
    `scale` follows TRL's `scale_rewards`:
      - "group": divide by the std of the prompt's G rewards (the R1 formula);
      - "batch": subtract the group mean, divide by the std over the whole batch;
      - "none":  subtract the group mean only (Dr. GRPO: no std division).
    NaN rewards (unscorable samples) are left out of the group statistics and get advantage 0.
    A group of G=1, or with one scorable sample, has no baseline spread; "group"/"batch" then give 0
    for it as well (NaN std -> 0 advantage), like TRL.
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES} (TRL's scale_rewards), got {scale!r}")
    grouped = as_groups(rewards, group_size)
    centred = grouped - torch.nanmean(grouped, dim=1, keepdim=True)
    if scale == "group":
        std = nan_std(grouped, dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(centred[:, :1])
        adv = centred / (std + eps)
    elif scale == "batch":
        std = nan_std(grouped) if grouped.numel() > 1 else torch.zeros((), dtype=grouped.dtype)
        adv = centred / (std + eps)
    else:
        adv = centred
    # NaN here means: the sample itself was unscorable, or its group had no spread to scale by.
    adv = torch.nan_to_num(adv, nan=0.0)
    return adv.reshape(rewards.shape)
