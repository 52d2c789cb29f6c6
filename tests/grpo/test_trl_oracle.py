"""Oracle: `r1pipe.grpo.clipped_policy_loss` equals TRL 1.16 GRPOTrainer's loss and gradient (spec section 2).

TRL's own `compute_loss` runs (fixture `trl_oracle` in conftest.py) on the same float64 inputs;
loss and d loss/d logp must agree to 1e-6 (in practice they agree to rounding, ~1e-16).
Name mapping: our "gspo" is TRL's loss_type "grpo" with importance_sampling_level "sequence".
TRL's other loss types (cispo, sapo, vespo, luspo) and its off-policy sequence mask are not in
r1pipe, so they are not compared.
"""

from __future__ import annotations

import pytest
import torch

from r1pipe.grpo import clipped_policy_loss, top_entropy_mask, truncated_is_weights

TOL = 1e-6
B, T = 6, 7
LENGTHS = [7, 5, 3, 1, 0, 6]  # one empty completion, as left by mask_truncated


def make_batch(seed: int = 0):
    """Float64 log-probs with ratios well outside the clip range, and mixed-sign advantages (one 0)."""
    g = torch.Generator().manual_seed(seed)
    logp = -3.0 * torch.rand(B, T, generator=g, dtype=torch.float64)
    # per-row shifts put whole sequences outside the clip range too (GSPO clips per sequence):
    # row 0 above with Â>0 (clipped), row 1 below with Â<0 (clipped), row 5 above with Â<0 (kept)
    shift = torch.tensor([0.45, -0.45, 0.0, 0.1, 0.0, 0.45], dtype=torch.float64).unsqueeze(1)
    old = logp - shift + 0.35 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    sign = torch.tensor([1.0, -1.0, 0.0, 1.0, 1.0, -1.0], dtype=torch.float64)
    adv = sign * (0.2 + torch.rand(B, generator=g, dtype=torch.float64))
    mask = (torch.arange(T).unsqueeze(0) < torch.tensor(LENGTHS).unsqueeze(1)).long()
    # float32-representable entropies so TRL's float32 quantile threshold sees the same values as ours
    ent = (2.0 * torch.rand(B, T, generator=g)).double()
    sampling = old + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    return dict(logp=logp, old=old, ref=ref, adv=adv, mask=mask, ent=ent, sampling=sampling)


def ours_loss_and_grads(batch, ours_kwargs, *, entropy_grad=False, old_is_none=False):
    logp = batch["logp"].clone().requires_grad_(True)
    ent = batch["ent"].clone().requires_grad_(entropy_grad)
    old = None if old_is_none else batch["old"]
    loss, metrics = clipped_policy_loss(
        logp, old, batch["adv"], batch["mask"], ref_logp=batch["ref"], entropies=ent, **ours_kwargs
    )
    grads = torch.autograd.grad(loss, [logp] + ([ent] if entropy_grad else []))
    return loss.detach(), grads[0], (grads[1] if entropy_grad else None), metrics


def to_trl_args(loss_type, level, beta, bias_kl, eps_low=0.2, eps_high=0.28, **extra):
    trl_type = "grpo" if loss_type == "gspo" else loss_type
    return dict(
        loss_type=trl_type,
        importance_sampling_level=level,
        beta=beta,
        use_bias_correction_kl=bias_kl,
        epsilon=eps_low,
        epsilon_high=eps_high,
        max_completion_length=T,
        num_generations=2,
        per_device_train_batch_size=B,
        **extra,
    )


def compare(trl_oracle, trl_args, ours_kwargs, *, batch=None, trl_extra=None, ours_extra=None, entropy_grad=False,
            old_is_none=False):
    batch = batch or make_batch()
    trl_extra = trl_extra or {}
    t_loss, t_grad, t_egrad, t_metrics = trl_oracle(
        trl_args, batch["logp"], None if old_is_none else batch["old"], batch["adv"], batch["mask"],
        ref_logp=batch["ref"] if trl_args["beta"] != 0.0 else None, entropies=batch["ent"], **trl_extra,
    )
    o_loss, o_grad, o_egrad, o_metrics = ours_loss_and_grads(
        batch, {**ours_kwargs, **(ours_extra or {})}, entropy_grad=entropy_grad, old_is_none=old_is_none
    )
    d_loss = (t_loss - o_loss).abs().item()
    d_grad = (t_grad - o_grad).abs().max().item()
    assert d_loss <= TOL, f"loss: TRL {t_loss.item()} vs ours {o_loss.item()}"
    assert d_grad <= TOL, f"grad max |Δ| {d_grad}"
    assert t_grad.abs().max() > 0, "degenerate case: zero gradient cannot discriminate"
    if not old_is_none:  # off-policy cases must exercise the clip (on-policy has ρ = 1 everywhere)
        assert t_metrics["clip_ratio/region_mean"] > 0, "degenerate case: no clipped token or sequence"
    if entropy_grad:
        assert (t_egrad - o_egrad).abs().max().item() <= TOL
    for key in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "clip_ratio/low_min",
                "clip_ratio/high_max", "kl", "entropy", "policy_loss"):
        if key in t_metrics:
            assert abs(t_metrics[key] - o_metrics[key].item()) <= TOL, f"{key}: {t_metrics[key]} vs {o_metrics[key]}"
    return d_loss, d_grad


GRID = [
    (lt, level, beta, bias_kl)
    for lt in ("grpo", "bnpo", "dr_grpo", "dapo")
    for level in ("token", "sequence")
    for beta, bias_kl in ((0.0, False), (0.04, False), (0.04, True))
]


@pytest.mark.parametrize("loss_type,level,beta,bias_kl", GRID, ids=lambda v: str(v))
def test_loss_and_grad_match_trl(trl_oracle, loss_type, level, beta, bias_kl):
    ours_type = "gspo" if (loss_type == "grpo" and level == "sequence") else loss_type
    ours = dict(loss_type=ours_type, importance_sampling=level, beta=beta, kl_bias_correction=bias_kl,
                epsilon_low=0.2, epsilon_high=0.28, max_completion_length=T)
    compare(trl_oracle, to_trl_args(loss_type, level, beta, bias_kl), ours)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_gradient_accumulation_normalisation_matches_trl(trl_oracle, loss_type):
    # TRL: num_items_in_batch spans the generation batch (steps_per_generation micro-batches);
    # ours spans one optimizer step (gradient_accumulation_steps micro-batches): N * GA / SPG.
    n_gen = 40.0
    trl_args = to_trl_args(loss_type, "token", 0.04, False, gradient_accumulation_steps=2, steps_per_generation=4)
    ours = dict(loss_type=loss_type, beta=0.04, epsilon_low=0.2, epsilon_high=0.28, gradient_accumulation_steps=2,
                num_items_in_batch=n_gen * 2 / 4)
    compare(trl_oracle, trl_args, ours, trl_extra=dict(num_items_in_batch=n_gen))


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_two_sided_clip_delta_matches_trl(trl_oracle, level):
    trl_args = to_trl_args("grpo", level, 0.04, False, delta=1.3)
    ours = dict(loss_type="grpo", importance_sampling=level, beta=0.04, epsilon_low=0.2, epsilon_high=0.28, delta=1.3)
    compare(trl_oracle, trl_args, ours)


@pytest.mark.parametrize("loss_type,mode,clip_min,clip_max", [
    ("dapo", "token_truncate", None, 1.1),
    ("grpo", "token_mask", 0.9, 1.1),
    ("bnpo", "sequence_truncate", 0.5, 1.2),
    ("grpo", "sequence_mask", None, 1.5),
])
def test_sampler_mismatch_is_correction_matches_trl(trl_oracle, loss_type, mode, clip_min, clip_max):
    batch = make_batch(1)
    w = truncated_is_weights(batch["old"], batch["sampling"], batch["mask"], mode, clip_min, clip_max)
    assert (w != 1).any() and w.requires_grad is False
    trl_args = to_trl_args(loss_type, "token", 0.04, True)
    ours = dict(loss_type=loss_type, beta=0.04, kl_bias_correction=True, epsilon_low=0.2, epsilon_high=0.28,
                is_weights=w)
    compare(trl_oracle, trl_args, ours, batch=batch, trl_extra=dict(importance_sampling_ratio=w))


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo"])
def test_top_entropy_mask_and_entropy_bonus_match_trl(trl_oracle, loss_type):
    # TRL builds its entropy mask internally from the entropies; ours comes from top_entropy_mask.
    batch = make_batch(2)
    keep = top_entropy_mask(batch["ent"], batch["mask"], 0.4)
    assert 0 < keep.sum() < batch["mask"].sum()
    trl_args = to_trl_args(loss_type, "token", 0.04, False, top_entropy_quantile=0.4, entropy_coef=0.01)
    ours = dict(loss_type=loss_type, beta=0.04, epsilon_low=0.2, epsilon_high=0.28, entropy_mask=keep,
                entropy_coef=0.01)
    compare(trl_oracle, trl_args, ours, batch=batch, entropy_grad=True)


def test_on_policy_old_logp_none_matches_trl(trl_oracle):
    # One update per rollout batch: TRL and we take π_old = π_θ.detach(), so ρ = 1 in value only.
    trl_args = to_trl_args("grpo", "token", 0.04, True)
    ours = dict(loss_type="grpo", beta=0.04, kl_bias_correction=True, epsilon_low=0.2, epsilon_high=0.28)
    compare(trl_oracle, trl_args, ours, old_is_none=True)
