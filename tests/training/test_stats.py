"""Mergeable step stats (r1pipe.training.stats): what two ranks report, reduced through a stand-in for the
all-gather, equals the statistic of all their values at once (a mean weighted by counts, a std from pooled
moments, max/min ignoring a rank that saw nothing, sums); one process runs no gather; ranks whose keys
differ are an error, not a silent mix-up."""
from __future__ import annotations

import math

import pytest
import torch

from r1pipe.training.stats import Max, Mean, Min, Spread, Sum, merge_stats, reduce_stats

RANK0 = [0.5, 2.0, 3.5]
RANK1 = [-1.0, 4.0]


def _stats(values: list[float]) -> dict:
    return {"mean": Mean.of_values(values), "std": Spread.of_values(values, ddof=1),
            "pop_std": Spread.of_values(values, ddof=0), "max": Max(max(values, default=math.nan)),
            "min": Min(min(values, default=math.nan)), "count": Sum(len(values)), "lr": 0.1}


def _packed(stats: dict) -> torch.Tensor:
    seen = []
    reduce_stats(stats, gather=lambda packed: seen.append(packed) or packed[None])
    return seen[0]


def _two_ranks(rank0: dict, rank1: dict) -> dict:
    """Rank 0's view: its own stats, reduced with what rank 1 packed."""
    return reduce_stats(rank0, gather=lambda packed: torch.stack([packed, _packed(rank1)]))


def test_two_ranks_reduce_to_the_statistics_of_all_values():
    got = _two_ranks(_stats(RANK0), _stats(RANK1))
    every = torch.tensor(RANK0 + RANK1, dtype=torch.float64)
    want = {"mean": every.mean().item(), "std": every.std().item(), "pop_std": every.std(correction=0).item(),
            "max": 4.0, "min": -1.0, "count": 5.0, "lr": 0.1}
    assert got == pytest.approx(want, rel=1e-12)
    assert list(got) == list(_stats(RANK0))  # in the order the step wrote them


def test_a_rank_that_saw_nothing_changes_nothing():
    got = _two_ranks(_stats(RANK0), _stats([]))
    assert got == pytest.approx(reduce_stats(_stats(RANK0)), rel=1e-12)
    nothing = reduce_stats(_stats([]))  # one process, nothing seen: NaN means, 0 spread
    assert math.isnan(nothing["mean"]) and math.isnan(nothing["max"]) and nothing["std"] == 0.0


def test_merging_micro_batches_equals_one_batch():
    merged = reduce_stats(merge_stats(_stats(RANK0[:1]), _stats(RANK0[1:])))
    assert merged == pytest.approx(reduce_stats(_stats(RANK0)), rel=1e-12)


def test_ranks_with_different_keys_fail_loudly():
    """Same packed size, other names: the layout fingerprint tells (a size mismatch fails in the gather)."""
    other = _stats(RANK1)
    other["counted"] = other.pop("count")
    with pytest.raises(RuntimeError, match="different metric keys"):
        _two_ranks(_stats(RANK0), other)
