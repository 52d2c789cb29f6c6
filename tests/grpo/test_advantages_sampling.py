"""`group_advantages` vs Python's `statistics` (float64), and dynamic sampling's group filter (spec section 2)."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from r1pipe.grpo import dynamic_sampling_filter, group_advantages, zero_variance_groups

EPS = 1e-4


def reference_advantages(rows: list[list[float]], scale: str) -> list[list[float]]:
    """Independent float reference: statistics.mean/stdev (n-1), NaN rewards left out and given 0."""
    flat_valid = [r for row in rows for r in row if not math.isnan(r)]
    out = []
    for row in rows:
        valid = [r for r in row if not math.isnan(r)]
        mean = statistics.mean(valid) if valid else math.nan
        if scale == "group":
            div = (statistics.stdev(valid) if len(valid) > 1 else math.nan) + EPS
        elif scale == "batch":
            div = statistics.stdev(flat_valid) + EPS
        else:
            div = 1.0
        adv = [(r - mean) / div for r in row]
        out.append([0.0 if math.isnan(a) else a for a in adv])
    return out


REWARDS = [[1.0, 0.0, 0.5, 2.0], [0.3, 0.3, 0.3, 0.3], [-1.0, 4.0, math.nan, 0.25], [math.nan, 2.0, math.nan, math.nan]]


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_match_statistics_reference(scale):
    expected = torch.tensor(reference_advantages(REWARDS, scale), dtype=torch.float64)
    r2d = torch.tensor(REWARDS, dtype=torch.float64)
    adv2d = group_advantages(r2d, 4, scale=scale, eps=EPS)
    adv1d = group_advantages(r2d.flatten(), 4, scale=scale, eps=EPS)
    assert adv2d.shape == (4, 4) and adv1d.shape == (16,)
    assert torch.allclose(adv2d, expected, atol=1e-12, rtol=0)
    assert torch.equal(adv1d, adv2d.flatten())


def test_advantages_centre_each_group_and_vanish_for_equal_rewards():
    g = torch.Generator().manual_seed(0)
    r = torch.randint(0, 3, (8, 5), generator=g).double()
    r[3] = 1.0
    for scale in ("group", "batch", "none"):
        adv = group_advantages(r, 5, scale=scale)
        assert torch.allclose(adv.sum(1), torch.zeros(8, dtype=torch.float64), atol=1e-12)
        assert (adv[3] == 0).all()
    # "group": unit sample std per group, up to eps
    adv = group_advantages(r, 5, scale="group", eps=0.0)
    spread = r.std(1) > 0
    assert torch.allclose(adv[spread].std(1), torch.ones(int(spread.sum()), dtype=torch.float64), atol=1e-12)


def test_group_of_one_sample_gets_zero_advantage():
    assert (group_advantages(torch.tensor([1.0, 3.0]), 1) == 0).all()


@pytest.mark.parametrize("rewards,group_size,needle", [
    (torch.zeros(7), 3, "multiple of group_size"),
    (torch.zeros(2, 4), 3, "group_size"),
    (torch.zeros(2, 2, 2), 2, r"\[B\*G\]"),
    (torch.zeros(4), 0, "positive int"),
])
def test_shape_errors_name_the_problem(rewards, group_size, needle):
    with pytest.raises(ValueError, match=needle):
        group_advantages(rewards, group_size)
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(4), 2, scale="std")


def test_dynamic_sampling_drops_exactly_the_zero_variance_groups():
    g = torch.Generator().manual_seed(1)
    num_groups, size = 12, 4
    r = torch.rand(num_groups, size, generator=g)
    constant = [0, 5, 6, 11]
    for i in constant:
        r[i] = float(i % 2)
    r[7, 2] = math.nan  # a NaN in a varied group: still kept
    r[5, 1] = math.nan  # a NaN in an equal group: still dropped
    r[9] = torch.tensor([2.0, math.nan, 2.0, 2.5])  # varied among the scorable ones
    flat = r.flatten()
    kept = dynamic_sampling_filter(flat, size)
    expected_groups = [i for i in range(num_groups) if i not in constant]
    assert kept.group_indices.tolist() == expected_groups
    assert kept.zero_variance.tolist() == [i in constant for i in range(num_groups)]
    expected_samples = [i * size + j for i in expected_groups for j in range(size)]
    assert kept.sample_indices.tolist() == expected_samples
    assert torch.equal(flat[kept.sample_indices].view(-1, size).nan_to_num(-9), r[expected_groups].nan_to_num(-9))


def test_zero_variance_tolerance_and_all_nan_group():
    r = torch.tensor([[1.0, 1.0 + 1e-12], [1.0, 1.001], [math.nan, math.nan]], dtype=torch.float64)
    assert zero_variance_groups(r, 2).tolist() == [True, False, True]
    assert zero_variance_groups(r, 2, atol=0.0).tolist() == [False, False, True]
    # the advantages of a zero-variance group are zero, so dropping it removes no gradient signal
    assert (group_advantages(r[:1], 2, eps=1e-4).abs() < 1e-7).all()
