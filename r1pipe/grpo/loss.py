"""The clipped GRPO objective with k3 KL to the frozen reference, and its loss variants (spec section 2).

Pure torch on per-token log-probs [B, T] (computed elsewhere, by the fused log-prob kernel); no
model, no optimizer. The GRPO step calls `clipped_policy_loss` once per micro-batch and backprops
the returned loss. Advantages come from `advantages.py`, masks from `masks.py`, IS weights from
`correction.py`. TRL 1.16's GRPOTrainer is the oracle (tests/grpo/test_trl_oracle.py).
"""

from __future__ import annotations

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "gspo")
IMPORTANCE_SAMPLING = ("token", "sequence")


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(π_θ || π_ref): π_ref/π_θ - log(π_ref/π_θ) - 1 (spec section 2).

    Non-negative, zero where the two log-probs agree, and unbiased for the KL when the token was
    sampled from π_θ. Gradient flows into both arguments; pass a detached `ref_logp`.
    """
    log_r = ref_logp - logp
    return torch.exp(log_r) - log_r - 1


def importance_ratio(
    logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, level: str = "token"
) -> torch.Tensor:
    """ρ = π_θ/π_old: per token [B, T], or per sequence [B, 1] (GSPO: exp of the masked mean log-ratio).

    Spec section 2: ρ_{i,t} for GRPO; GSPO replaces it by the length-normalised sequence ratio
    (π_θ(o_i)/π_old(o_i))^(1/|o_i|), which keeps one clipping decision per completion.
    """
    log_ratio = logp - old_logp
    if level == "token":
        return torch.exp(log_ratio)
    if level == "sequence":
        mask_f = mask.to(log_ratio.dtype)
        seq = (log_ratio * mask_f).sum(-1) / mask_f.sum(-1).clamp(min=1.0)
        return torch.exp(seq).unsqueeze(-1)
    raise ValueError(f"importance_sampling must be one of {IMPORTANCE_SAMPLING}, got {level!r}")


def _check_inputs(logp, old_logp, advantages, mask, ref_logp, loss_type, level, beta, max_completion_length):
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if level not in IMPORTANCE_SAMPLING:
        raise ValueError(f"importance_sampling must be one of {IMPORTANCE_SAMPLING}, got {level!r}")
    if loss_type == "gspo" and level != "sequence":
        raise ValueError("loss_type='gspo' is the sequence-level ratio; leave importance_sampling unset or 'sequence'")
    if logp.dim() != 2 or mask.shape != logp.shape:
        raise ValueError(f"logp and mask must both be [B, T], got {tuple(logp.shape)} and {tuple(mask.shape)}")
    if old_logp is not None and old_logp.shape != logp.shape:
        raise ValueError(f"old_logp must be [B, T] like logp {tuple(logp.shape)}, got {tuple(old_logp.shape)}")
    if advantages.shape not in (logp.shape[:1], logp.shape):
        raise ValueError(f"advantages must be [B] or [B, T] with B={logp.shape[0]}, got {tuple(advantages.shape)}")
    if beta != 0.0 and (ref_logp is None or ref_logp.shape != logp.shape):
        raise ValueError("beta != 0 needs ref_logp [B, T] (the frozen reference's log-probs of the same tokens)")
    if loss_type == "dr_grpo" and not max_completion_length:
        raise ValueError(
            "loss_type='dr_grpo' needs max_completion_length (its constant normaliser: the rollout's max tokens)"
        )


def _aggregate(per_token_loss, mask_f, loss_type, max_completion_length, num_items_in_batch, num_processes):
    """Reduce [B, T] per-token losses to the micro-batch loss, before gradient-accumulation scaling."""
    masked = per_token_loss * mask_f
    if loss_type in ("grpo", "gspo"):  # 1/|o_i| per sequence, then the mean over sequences
        return (masked.sum(-1) / mask_f.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":  # token mean over this micro-batch
        return masked.sum() / mask_f.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":  # constant normaliser: no length bias
        return masked.sum() / (per_token_loss.shape[0] * max_completion_length)
    # dapo: token mean over the whole optimizer step; each process holds 1/num_processes of it and
    # DDP averages gradients over processes, hence the factor num_processes.
    total = torch.as_tensor(num_items_in_batch, dtype=mask_f.dtype, device=mask_f.device).clamp(min=1.0)
    return masked.sum() / (total / num_processes)


def clipped_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss_type: str = "grpo",
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    ref_logp: torch.Tensor | None = None,
    max_completion_length: int | None = None,
    importance_sampling: str | None = None,
    delta: float | None = None,
    is_weights: torch.Tensor | None = None,
    kl_bias_correction: bool = False,
    entropy_mask: torch.Tensor | None = None,
    entropies: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    num_items_in_batch: int | float | torch.Tensor | None = None,
    num_processes: int = 1,
    gradient_accumulation_steps: int = 1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO's clipped surrogate with β·k3-KL, as a loss to minimise (spec section 2).

    per-token: -min(ρ Â, clip(ρ, 1-ε_low, 1+ε_high) Â) · w_IS + β·KL, aggregated by `loss_type`:
      "grpo"/"gspo": mean over each sequence's tokens, then over sequences (gspo: sequence-level ρ);
      "bnpo": token mean over the micro-batch; "dr_grpo": sum / (B · max_completion_length);
      "dapo": sum / (num_items_in_batch / num_processes), a token mean over the optimizer step.

    logp [B, T] carries the gradient; old_logp [B, T] (π_old, detached; None means logp.detach(),
    i.e. one update per rollout batch: ρ = 1 in value, not in gradient); advantages [B] or [B, T];
    mask [B, T] 1 on completion tokens. `importance_sampling` "token" (default) or "sequence".
    `delta`: two-sided clip, ρ ≤ delta also for negative advantages (INTELLECT-2). `is_weights`
    [B, T] or [B, 1]: detached sampler-mismatch weights (`correction.truncated_is_weights`).
    `kl_bias_correction` multiplies the KL by ρ (DeepSeek-V3.2's unbiased KL gradient; TRL's
    `use_bias_correction_kl`). `entropy_mask` [B, T] restricts the policy term to those tokens
    (`masks.top_entropy_mask`). `entropies` + `entropy_coef`: subtract coef · mean entropy.
    `num_items_in_batch`: completion tokens of the whole optimizer step, all micro-batches and all
    processes (dapo only; None assumes every micro-batch holds as many tokens as this one).
    The grpo/gspo/bnpo/dr_grpo losses and the entropy bonus are divided by
    `gradient_accumulation_steps` so that summed micro-batch gradients give the mean; dapo's
    normaliser already spans the step. Pass float32 (or float64) log-probs, not bf16.

    Returns (loss, metrics): metrics are detached 0-dim tensors local to this micro-batch:
    clip_ratio/{low,high,region}_mean, clip_ratio/low_min, clip_ratio/high_max, ratio/{mean,min,max},
    policy_loss (before accumulation scaling and entropy bonus), kl (if beta != 0), entropy (if given).
    """
    level = importance_sampling or ("sequence" if loss_type == "gspo" else "token")
    _check_inputs(logp, old_logp, advantages, mask, ref_logp, loss_type, level, beta, max_completion_length)
    eps_high = epsilon_low if epsilon_high is None else epsilon_high
    mask_f = mask.to(logp.dtype)
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    old_logp = logp.detach() if old_logp is None else old_logp

    ratio = importance_ratio(logp, old_logp, mask, level)  # [B, T] or [B, 1]
    ratio_clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + eps_high)
    # With delta the unclipped branch is capped too, so a huge ρ cannot dominate a negative advantage.
    ratio_capped = ratio if delta is None else torch.clamp(ratio, max=delta)
    per_token_loss = -torch.min(ratio_capped * adv, ratio_clipped * adv)
    if entropy_mask is not None:
        per_token_loss = per_token_loss * entropy_mask.to(per_token_loss.dtype)
    if is_weights is not None:
        per_token_loss = per_token_loss * is_weights.detach()

    per_token_kl = None
    if beta != 0.0:
        per_token_kl = k3_kl(logp, ref_logp)
        if kl_bias_correction:
            per_token_kl = per_token_kl * ratio
        per_token_loss = per_token_loss + beta * per_token_kl
    if num_items_in_batch is None and loss_type == "dapo":
        num_items_in_batch = mask_f.sum() * gradient_accumulation_steps * num_processes

    policy_loss = _aggregate(
        per_token_loss, mask_f, loss_type, max_completion_length, num_items_in_batch, num_processes
    )
    loss = policy_loss if loss_type == "dapo" else policy_loss / gradient_accumulation_steps
    if entropies is not None and entropy_coef != 0.0:
        bonus_mask = mask_f if entropy_mask is None else mask_f * entropy_mask.to(mask_f.dtype)
        mean_entropy = (entropies * bonus_mask).sum() / bonus_mask.sum().clamp(min=1.0)
        loss = loss - entropy_coef * mean_entropy / gradient_accumulation_steps

    metrics = _metrics(ratio, ratio_capped, adv, mask_f, epsilon_low, eps_high, per_token_kl, entropies, policy_loss)
    return loss, metrics


@torch.no_grad()
def _metrics(ratio, ratio_capped, adv, mask_f, eps_low, eps_high, per_token_kl, entropies, policy_loss):
    """Clip fractions (low: ρ < 1-ε_low with Â < 0; high: ρ > 1+ε_high with Â > 0), ratio and KL stats.

    The clip flags use the delta-capped ρ, as TRL's logged clip ratios do; ratio/* show the raw ρ.
    """
    ratio, ratio_capped, adv = ratio.detach(), ratio_capped.detach(), adv.detach()
    low = ((ratio_capped < 1 - eps_low) & (adv < 0)).to(mask_f.dtype)
    high = ((ratio_capped > 1 + eps_high) & (adv > 0)).to(mask_f.dtype)
    region = torch.maximum(low, high)
    n_tokens = mask_f.sum().clamp(min=1.0)
    rows = mask_f.sum(-1)

    def batch_mean(x):  # a sequence-level quantity [B, 1] counts once per sequence
        if x.shape[1] == 1:
            return x.sum() / max(x.shape[0], 1)
        return (x * mask_f).sum() / n_tokens

    def per_seq(x):  # NaN for an empty completion, skipped by the min/max below
        return x.squeeze(1) if x.shape[1] == 1 else (x * mask_f).sum(-1) / rows

    def nan_reduce(x, fn):
        x = x[~torch.isnan(x)]
        return fn(x) if x.numel() else torch.tensor(float("nan"), dtype=mask_f.dtype)

    valid_ratio = ratio.squeeze(1) if ratio.shape[1] == 1 else ratio[mask_f.bool()]
    out = {
        "clip_ratio/low_mean": batch_mean(low),
        "clip_ratio/high_mean": batch_mean(high),
        "clip_ratio/region_mean": batch_mean(region),
        "clip_ratio/low_min": nan_reduce(per_seq(low), torch.min),
        "clip_ratio/high_max": nan_reduce(per_seq(high), torch.max),
        "ratio/mean": nan_reduce(valid_ratio, torch.mean),
        "ratio/min": nan_reduce(valid_ratio, torch.min),
        "ratio/max": nan_reduce(valid_ratio, torch.max),
        "policy_loss": policy_loss.detach(),
    }
    if per_token_kl is not None:
        out["kl"] = (per_token_kl.detach() * mask_f).sum() / n_tokens
    if entropies is not None:
        out["entropy"] = (entropies.detach() * mask_f).sum() / n_tokens
    return out
