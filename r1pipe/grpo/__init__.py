"""GRPO objective as small pure torch functions (spec section 2): advantages, dynamic sampling,
loss masks, sampler-mismatch IS weights, and the clipped loss with its variants.

The GRPO step (rollout -> score -> advantages -> loss -> backward) calls these; no model here.
"""

from r1pipe.grpo.advantages import group_advantages, nan_std
from r1pipe.grpo.correction import truncated_is_weights
from r1pipe.grpo.loss import IMPORTANCE_SAMPLING, LOSS_TYPES, clipped_policy_loss, importance_ratio, k3_kl
from r1pipe.grpo.masks import mask_truncated, top_entropy_mask
from r1pipe.grpo.sampling import KeptGroups, dynamic_sampling_filter, zero_variance_groups

__all__ = [
    "IMPORTANCE_SAMPLING",
    "LOSS_TYPES",
    "KeptGroups",
    "clipped_policy_loss",
    "dynamic_sampling_filter",
    "group_advantages",
    "importance_ratio",
    "k3_kl",
    "mask_truncated",
    "nan_std",
    "top_entropy_mask",
    "truncated_is_weights",
    "zero_variance_groups",
]
