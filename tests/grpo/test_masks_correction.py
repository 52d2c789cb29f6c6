"""Truncation mask, top-entropy mask (vs TRL's `get_high_entropy_mask`) and truncated IS weights (spec section 2)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from r1pipe.grpo import mask_truncated, top_entropy_mask, truncated_is_weights


def test_mask_truncated_zeroes_length_finished_rows_only():
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1]])
    by_reason = mask_truncated(mask, ["length", "stop", "stop"])
    by_flag = mask_truncated(mask, torch.tensor([True, False, False]))
    assert by_reason.tolist() == [[0, 0, 0], [1, 1, 0], [1, 1, 1]]
    assert torch.equal(by_reason, by_flag) and by_reason.dtype == mask.dtype
    with pytest.raises(ValueError, match="one flag or finish reason"):
        mask_truncated(mask, [True, False])


def test_top_entropy_mask_keeps_the_top_fraction_of_valid_tokens():
    ent = torch.tensor([[0.1, 0.9, 0.5, 7.0], [0.3, 0.7, 0.2, 0.8]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    # valid entropies sorted: .1 .2 .3 .5 .7 .8 .9; the 0.5-quantile is 0.5 -> keep >= 0.5
    keep = top_entropy_mask(ent, mask, 0.5)
    assert keep.tolist() == [[False, True, True, False], [False, True, False, True]]
    assert torch.equal(top_entropy_mask(ent, mask, 1.0), mask.bool())
    assert not top_entropy_mask(ent, torch.zeros_like(mask), 0.2).any()


@pytest.mark.parametrize("quantile", [0.2, 0.5, 0.8])
def test_top_entropy_mask_matches_trl(quantile):
    pytest.importorskip("trl")
    from trl.trainer.grpo_trainer import GRPOTrainer

    g = torch.Generator().manual_seed(0)
    ent = torch.rand(5, 9, generator=g)  # float32, as a trainer's entropies are
    mask = (torch.rand(5, 9, generator=g) > 0.3).long()
    accel = SimpleNamespace(pad_across_processes=lambda x, dim, pad_index: x, gather=lambda x: x)
    trl_keep = GRPOTrainer.get_high_entropy_mask(SimpleNamespace(accelerator=accel), ent, mask, 1 - quantile)
    assert torch.equal(top_entropy_mask(ent, mask, quantile), trl_keep)


def reference_weights(old, samp, mask, mode, lo, hi):
    """Float loops over rows/tokens: w = exp(Σ or per-token masked (old - sampling)), NaN -> ratio 1."""
    lo = -math.inf if lo is None else lo
    hi = math.inf if hi is None else hi
    rows = []
    for o_row, s_row, m_row in zip(old, samp, mask):
        diffs = [0.0 if (not m or math.isnan(s)) else o - s for o, s, m in zip(o_row, s_row, m_row)]
        ws = [math.exp(sum(diffs))] if mode.startswith("sequence") else [math.exp(d) for d in diffs]
        if mode.endswith("truncate"):
            ws = [min(max(w, lo), hi) for w in ws]
        else:
            ws = [0.0 if (w < lo or w > hi) else w for w in ws]
        rows.append(ws)
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
@pytest.mark.parametrize("lo,hi", [(None, 2.0), (0.8, 1.25), (None, None)])
def test_truncated_is_weights_match_reference(mode, lo, hi):
    g = torch.Generator().manual_seed(3)
    old = -2 * torch.rand(4, 6, generator=g, dtype=torch.float64)
    samp = old + 0.3 * torch.randn(4, 6, generator=g, dtype=torch.float64)
    samp[1, 2] = math.nan  # token the sampler returned no log-prob for
    mask = (torch.arange(6).unsqueeze(0) < torch.tensor([[6], [4], [2], [5]])).long()
    w = truncated_is_weights(old, samp, mask, mode, lo, hi)
    expected = reference_weights(old.tolist(), samp.tolist(), mask.tolist(), mode, lo, hi)
    assert w.shape == ((4, 1) if mode.startswith("sequence") else (4, 6))
    assert torch.allclose(w, expected, atol=1e-14, rtol=1e-13)
    assert not torch.isnan(w).any()
