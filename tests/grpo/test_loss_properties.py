"""Properties of `r1pipe.grpo.clipped_policy_loss` and `k3_kl` against float64 closed forms (spec section 2).

On-policy values, gradient sign and size, clipping zeroing exactly the right gradients, the
asymmetric clip, delta, GSPO's per-sequence clipping, and micro-batch / multi-process
normalisation of dapo and grpo.
"""

from __future__ import annotations

import math

import pytest
import torch

from r1pipe.grpo import LOSS_TYPES, clipped_policy_loss, k3_kl

F64 = torch.float64


def on_policy_batch(seed=0, b=4, t=6, lengths=(6, 4, 2, 5)):
    g = torch.Generator().manual_seed(seed)
    logp = (-2.0 * torch.rand(b, t, generator=g, dtype=F64)).requires_grad_(True)
    adv = torch.randn(b, generator=g, dtype=F64)
    mask = (torch.arange(t).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).to(F64)
    return logp, adv, mask


def grad_of(loss, x):
    return torch.autograd.grad(loss, x)[0]


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_on_policy_loss_is_minus_weighted_mean_advantage(loss_type):
    logp, adv, mask = on_policy_batch()
    b, t = mask.shape
    lens = mask.sum(1)
    loss, metrics = clipped_policy_loss(logp, None, adv, mask, loss_type=loss_type, max_completion_length=t)
    expected = {
        "grpo": -adv.mean(),
        "gspo": -adv.mean(),
        "bnpo": -(adv * lens).sum() / lens.sum(),
        "dapo": -(adv * lens).sum() / lens.sum(),
        "dr_grpo": -(adv * lens).sum() / (b * t),
    }[loss_type]
    assert torch.allclose(loss, expected, atol=1e-12, rtol=0)
    assert metrics["ratio/min"] == 1.0 and metrics["ratio/max"] == 1.0
    assert metrics["clip_ratio/region_mean"] == 0.0


def test_on_policy_grpo_gradient_is_minus_advantage_over_length():
    # d/dlogp of -ρÂ at ρ=1 is -Â; grpo averages over |o_i| tokens then over B sequences.
    logp, adv, mask = on_policy_batch()
    loss, _ = clipped_policy_loss(logp, None, adv, mask, loss_type="grpo")
    grad = grad_of(loss, logp)
    expected = -(adv / mask.sum(1)).unsqueeze(1) * mask / mask.shape[0]
    assert torch.allclose(grad, expected, atol=1e-15, rtol=0)
    on = mask.bool()
    assert (torch.sign(grad[on]) == -torch.sign(adv.unsqueeze(1).expand_as(mask)[on])).all()
    assert (grad[~on] == 0).all()


def ratio_batch(ratios, adv):
    """One token per row with the given ρ = exp(logp - old_logp)."""
    logp = torch.full((len(ratios), 1), -1.0, dtype=F64, requires_grad=True)
    old = logp.detach() - torch.log(torch.tensor(ratios, dtype=F64)).unsqueeze(1)
    return logp, old, torch.tensor(adv, dtype=F64), torch.ones(len(ratios), 1, dtype=F64)


def test_clipping_zeroes_exactly_the_gradients_outside_the_trust_region():
    # rows: above range & Â>0 (clipped), above & Â<0 (kept), below & Â<0 (clipped), below & Â>0 (kept), inside
    logp, old, adv, mask = ratio_batch([1.5, 1.5, 0.5, 0.5, 1.1], [1.0, -1.0, -1.0, 1.0, 1.0])
    loss, m = clipped_policy_loss(logp, old, adv, mask, loss_type="bnpo", epsilon_low=0.2, epsilon_high=0.2)
    grad = grad_of(loss, logp).squeeze(1)
    assert grad[0] == 0 and grad[2] == 0
    # unclipped rows: d(-ρÂ)/dlogp = -ρÂ, over 5 tokens
    assert torch.allclose(grad[[1, 3, 4]], torch.tensor([1.5, -0.5, -1.1], dtype=F64) / 5, atol=1e-15)
    assert m["clip_ratio/high_mean"] == pytest.approx(1 / 5)
    assert m["clip_ratio/low_mean"] == pytest.approx(1 / 5)
    assert m["clip_ratio/region_mean"] == pytest.approx(2 / 5)


def test_clip_higher_keeps_gradient_between_the_two_epsilons():
    logp, old, adv, mask = ratio_batch([1.25, 0.75], [1.0, -1.0])
    sym, _ = clipped_policy_loss(logp, old, adv, mask, loss_type="bnpo", epsilon_low=0.2, epsilon_high=0.2)
    asym, _ = clipped_policy_loss(logp, old, adv, mask, loss_type="bnpo", epsilon_low=0.2, epsilon_high=0.28)
    g_sym, g_asym = grad_of(sym, logp).squeeze(1), grad_of(asym, logp).squeeze(1)
    assert g_sym[0] == 0 and g_asym[0] == pytest.approx(-1.25 / 2)
    assert g_sym[1] == 0 and g_asym[1] == 0  # ρ=0.75 < 1-ε_low with Â<0 stays clipped


def test_delta_caps_the_ratio_for_negative_advantages():
    logp, old, adv, mask = ratio_batch([3.0, 1.5], [-1.0, -1.0])
    plain, _ = clipped_policy_loss(logp, old, adv, mask, loss_type="bnpo")
    capped, m = clipped_policy_loss(logp, old, adv, mask, loss_type="bnpo", delta=2.0)
    assert m["ratio/max"].item() == pytest.approx(3.0)  # the stats show the raw ratio
    assert plain.item() == pytest.approx((3.0 + 1.5) / 2)
    assert capped.item() == pytest.approx((2.0 + 1.5) / 2)
    g = grad_of(capped, logp).squeeze(1)
    assert g[0] == 0 and g[1] == pytest.approx(1.5 / 2)


def test_gspo_clips_whole_sequences_with_the_geometric_mean_ratio():
    t = 4
    logp = torch.full((2, t), -1.0, dtype=F64, requires_grad=True)
    log_r = torch.tensor([[0.5, 0.5, 0.5, -0.3], [0.1, -0.1, 0.05, 0.0]], dtype=F64)
    old = logp.detach() - log_r
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=F64)
    adv = torch.tensor([1.0, 1.0], dtype=F64)
    loss, m = clipped_policy_loss(logp, old, adv, mask, loss_type="gspo")
    s0 = math.exp(1.2 / 4)  # 1.35 > 1.2: whole sequence clipped
    s1 = math.exp(0.05 / 3)
    assert loss.item() == pytest.approx(-(1.2 + s1) / 2, abs=1e-12)
    g = grad_of(loss, logp)
    assert (g[0] == 0).all()
    # d s1 / d logp_t = s1 / |o_1| for each valid token
    assert torch.allclose(g[1], -torch.tensor([1, 1, 1, 0], dtype=F64) * s1 / 3 / 2, atol=1e-15)
    assert m["clip_ratio/high_mean"] == pytest.approx(0.5)


def test_dapo_micro_batches_and_processes_sum_to_the_global_token_mean():
    logp, adv, mask = on_policy_batch(seed=3)
    g = torch.Generator().manual_seed(4)
    old = logp.detach() + 0.3 * torch.randn(logp.shape, generator=g, dtype=F64)
    n = mask.sum()
    full, _ = clipped_policy_loss(logp, old, adv, mask, loss_type="dapo", num_items_in_batch=n)
    parts = [clipped_policy_loss(logp[s], old[s], adv[s], mask[s], loss_type="dapo", num_items_in_batch=n)[0]
             for s in (slice(0, 1), slice(1, 4))]
    assert torch.allclose(sum(parts), full, atol=1e-14)
    assert torch.allclose(grad_of(sum(parts), logp), grad_of(full, logp), atol=1e-15)
    # two processes, one micro-batch each: DDP averages their gradients
    procs = [clipped_policy_loss(logp[s], old[s], adv[s], mask[s], loss_type="dapo", num_items_in_batch=n,
                                 num_processes=2)[0] for s in (slice(0, 2), slice(2, 4))]
    assert torch.allclose((procs[0] + procs[1]) / 2, full, atol=1e-14)


def test_grpo_gradient_accumulation_averages_micro_batch_means():
    logp, adv, mask = on_policy_batch(seed=5)
    full, _ = clipped_policy_loss(logp, None, adv, mask, loss_type="grpo")
    parts = [clipped_policy_loss(logp[s], None, adv[s], mask[s], loss_type="grpo", gradient_accumulation_steps=2)[0]
             for s in (slice(0, 2), slice(2, 4))]
    assert torch.allclose(sum(parts), full, atol=1e-14)


def test_kl_term_value_and_gradient_at_zero_advantage():
    logp, _, mask = on_policy_batch(seed=6)
    ref = logp.detach() + 0.4
    loss, m = clipped_policy_loss(logp, None, torch.zeros(4, dtype=F64), mask, loss_type="bnpo", beta=0.1,
                                  ref_logp=ref)
    kl_each = math.exp(0.4) - 0.4 - 1
    assert loss.item() == pytest.approx(0.1 * kl_each, abs=1e-14)
    assert m["kl"].item() == pytest.approx(kl_each, abs=1e-14)
    # d k3 / d logp = 1 - exp(ref - logp): pulls logp up toward the reference
    expected = 0.1 * (1 - math.exp(0.4)) * mask / mask.sum()
    assert torch.allclose(grad_of(loss, logp), expected, atol=1e-15)


def test_is_weights_scale_only_the_policy_term():
    logp, adv, mask = on_policy_batch(seed=7)
    w = torch.ones_like(mask)
    w[0] = 0.0
    loss, _ = clipped_policy_loss(logp, None, adv, mask, loss_type="grpo", is_weights=w)
    assert (grad_of(loss, logp)[0] == 0).all()
    ref = logp.detach() + 0.2
    loss_kl, _ = clipped_policy_loss(logp, None, adv, mask, loss_type="grpo", is_weights=w, beta=0.1, ref_logp=ref)
    assert (grad_of(loss_kl, logp)[0][mask[0].bool()] != 0).all()


def test_k3_is_an_unbiased_nonnegative_kl_estimator():
    g = torch.Generator().manual_seed(8)
    p = torch.softmax(torch.randn(11, generator=g, dtype=F64), 0)
    q = torch.softmax(torch.randn(11, generator=g, dtype=F64), 0)
    k3 = k3_kl(p.log(), q.log())
    assert (k3 >= 0).all()
    exact_kl = (p * (p.log() - q.log())).sum()  # KL(p || q), tokens sampled from p = π_θ
    assert torch.allclose((p * k3).sum(), exact_kl, atol=1e-15)
    assert (k3_kl(p.log(), p.log()) == 0).all()


@pytest.mark.parametrize("kwargs,needle", [
    (dict(loss_type="ppo"), "loss_type"),
    (dict(loss_type="gspo", importance_sampling="token"), "gspo"),
    (dict(loss_type="grpo", beta=0.1), "ref_logp"),
    (dict(loss_type="dr_grpo"), "max_completion_length"),
    (dict(loss_type="grpo", importance_sampling="seq"), "importance_sampling"),
])
def test_invalid_settings_name_the_field(kwargs, needle):
    logp, adv, mask = on_policy_batch()
    with pytest.raises(ValueError, match=needle):
        clipped_policy_loss(logp, None, adv, mask, **kwargs)
