"""Dynamic sampling for GRPO (spec section 2): find and drop prompt groups whose G rewards are all equal.

Such a group has advantage 0 for every sample, so it adds no policy gradient and only dilutes the
token-level mean (DAPO). The GRPO step calls `dynamic_sampling_filter` after scoring and refills the
batch with fresh prompts until it has enough kept groups. Advantages live in `advantages.py`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from r1pipe.grpo.advantages import as_groups


class KeptGroups(NamedTuple):
    """Result of dynamic sampling: which prompt groups and which flat samples survive."""

    group_indices: torch.Tensor  # [num_kept_groups] long, index into the B prompts
    sample_indices: torch.Tensor  # [num_kept_groups * G] long, index into the flat B*G samples
    zero_variance: torch.Tensor  # [B] bool, True for a dropped group (for the zero-variance metric)


def zero_variance_groups(rewards: torch.Tensor, group_size: int, atol: float = 1e-8) -> torch.Tensor:
    """[B] bool: True where all scorable rewards of a prompt's G samples are equal (spread <= atol).

    NaN rewards (unscorable samples) are ignored; a group with no scorable sample counts as
    zero-variance, since it carries no learning signal either.
    """
    grouped = as_groups(rewards, group_size)
    valid = ~torch.isnan(grouped)
    hi = torch.where(valid, grouped, torch.full_like(grouped, float("-inf"))).amax(dim=1)
    lo = torch.where(valid, grouped, torch.full_like(grouped, float("inf"))).amin(dim=1)
    spread = hi - lo  # -inf when the whole group is NaN
    return ~(spread > atol)


def dynamic_sampling_filter(rewards: torch.Tensor, group_size: int, atol: float = 1e-8) -> KeptGroups:
    """Keep exactly the groups whose rewards are not all equal (DAPO's dynamic sampling).

    Returns the kept group indices and the flat sample indices (G contiguous per kept group),
    ready for `tensor[sample_indices]` on any per-sample tensor of the rollout batch.
    """
    zero = zero_variance_groups(rewards, group_size, atol)
    kept = torch.nonzero(~zero, as_tuple=False).flatten()
    offsets = torch.arange(group_size, device=kept.device)
    samples = (kept.unsqueeze(1) * group_size + offsets).flatten()
    return KeptGroups(group_indices=kept, sample_indices=samples, zero_variance=zero)
