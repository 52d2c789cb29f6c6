"""Rollouts record, per-sample seed rule and the trainer-vs-sampler mismatch metric."""

from __future__ import annotations

import pytest
import torch

from r1pipe.rollout.types import Rollouts, logprob_mismatch, sample_seed


def _rollouts() -> Rollouts:
    return Rollouts(
        prompt_token_ids=[[5, 6], [7]],
        prompt_index=[0, 0, 1, 1],
        sample_index=[0, 1, 0, 1],
        completion_ids=[[1], [3, 4, 1], [8, 9], [10]],
        logprobs=[[-0.1], [-1.0, -2.0, -0.5], [-0.3, -0.4], [-2.5]],
        finish_reason=["stop", "stop", "length", "stop"],
        seeds=[11, 12, 13, 14],
    )


def test_sample_seed_is_a_pure_function_with_distinct_values():
    grid = [(s, i, j) for s in range(3) for i in range(32) for j in range(16)]
    seeds = [sample_seed(*g) for g in grid]
    assert seeds == [sample_seed(*g) for g in grid]
    assert len(set(seeds)) == len(grid)
    assert all(0 <= s < 2**63 for s in seeds)
    assert sample_seed(0, 1, 0) != sample_seed(1, 0, 0)  # neighbouring steps do not share streams


def test_padded_tensors_and_lengths():
    r = _rollouts()
    ids, lps, mask = r.padded(pad_token_id=2)
    assert ids.tolist() == [[1, 2, 2], [3, 4, 1], [8, 9, 2], [10, 2, 2]]
    assert mask.sum(1).tolist() == r.completion_lengths == [1, 3, 2, 1]
    assert lps[1].tolist() == [-1.0, -2.0, -0.5] and lps[0, 1:].abs().sum() == 0
    assert r.num_completion_tokens == 7 and r.truncated == [False, False, True, False]


def test_inconsistent_rollouts_are_refused():
    with pytest.raises(ValueError, match="logprobs"):
        Rollouts([[1]], [0], [0], [[1, 2]], [[-0.1]], ["stop"], [1])
    with pytest.raises(ValueError, match="seeds"):
        Rollouts([[1]], [0], [0], [[1]], [[-0.1]], ["stop"], [])


def test_logprob_mismatch_counts_only_masked_tokens():
    sampler = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    trainer = torch.tensor([[-1.1, -1.7, 9.0], [-0.5, 9.0, 9.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    m = logprob_mismatch(sampler, trainer, mask)
    assert m["logprob_mismatch_max"] == pytest.approx(0.3, abs=1e-6)
    assert m["logprob_mismatch_mean"] == pytest.approx(0.4 / 3, abs=1e-6)
