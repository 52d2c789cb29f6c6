"""`pack_sequences` (padding-free micro-batches, issue 4 "Efficiency"): the token budget holds, every
sequence lands exactly once, targets are the next completion token at the right packed position, values
unpack back to [n, Tc], and packed positions equal an unpacked forward of each sequence (no cross-talk).
"""
from __future__ import annotations

import random

import pytest
import torch

from r1pipe.training.packing import IGNORE, pack_sequences


def _random_sequences(n: int, seed: int = 0):
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 100) for _ in range(rng.randint(1, 12))] for _ in range(n)]
    completions = [[rng.randrange(3, 100) for _ in range(rng.randint(0, 9))] for _ in range(n)]
    return prompts, completions


@pytest.mark.parametrize("budget", [1, 16, 40, 10_000])
def test_budget_and_coverage(budget):
    prompts, completions = _random_sequences(30)
    batches = pack_sequences(prompts, completions, budget)
    seen = [i for b in batches for i in b.seq_index.tolist()]
    # every non-empty completion exactly once, in the caller's order; empty ones are skipped
    assert seen == [i for i, c in enumerate(completions) if c]
    for b in batches:
        lengths = [len(prompts[i]) + len(completions[i]) for i in b.seq_index.tolist()]
        assert b.num_tokens == sum(lengths)
        # within budget, unless a single sequence is longer than the whole budget
        assert b.num_tokens <= budget or len(lengths) == 1
        assert b.input_ids.shape == b.position_ids.shape == b.targets.shape == (1, b.num_tokens)
    if budget == 10_000:
        assert len(batches) == 1
    # greedy first fit: a batch is closed only when the next sequence would not fit
    for b, nxt in zip(batches, batches[1:]):
        first = nxt.seq_index[0].item()
        assert b.num_tokens + len(prompts[first]) + len(completions[first]) > budget


def test_layout_targets_and_unpack_round_trip():
    prompts, completions = _random_sequences(12, seed=1)
    for b in pack_sequences(prompts, completions, 48):
        ids, pos, tgt = b.input_ids[0].tolist(), b.position_ids[0].tolist(), b.targets[0].tolist()
        start = 0
        for row, i in enumerate(b.seq_index.tolist()):
            p, c = prompts[i], completions[i]
            n = len(p) + len(c)
            assert ids[start : start + n] == p + c
            assert pos[start : start + n] == list(range(n))  # positions restart per sequence
            # position t predicts token t+1: only positions predicting completion tokens carry a target
            assert tgt[start : start + n] == [IGNORE] * (len(p) - 1) + c + [IGNORE]
            # gather_index points at the positions whose target is completion token j
            g = b.gather_index[row, : len(c)].tolist()
            assert [tgt[k] for k in g] == c
            assert b.completion_mask[row].tolist() == [1.0] * len(c) + [0.0] * (b.completion_mask.shape[1] - len(c))
            start += n
        # unpack of per-position values: row r, column j = value at the position predicting token j
        values = torch.arange(b.num_tokens, dtype=torch.float32)[None] * 10 + 7
        unpacked = b.unpack(values)
        assert unpacked.shape == b.completion_mask.shape
        expected = (b.gather_index.float() * 10 + 7) * b.completion_mask
        assert torch.equal(unpacked, expected)
        # the targets themselves survive the round trip
        assert torch.equal(b.unpack(b.targets.float()), _padded([completions[i] for i in b.seq_index.tolist()]))


def _padded(rows):
    width = max(len(r) for r in rows)
    return torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.float32)


def test_empty_prompt_is_an_error():
    with pytest.raises(ValueError, match="empty prompt"):
        pack_sequences([[5], []], [[6], [7]], 100)


def test_packed_logprobs_equal_per_sequence_forward():
    """The policy on one packed row gives each sequence the log-probs it gets alone (attention and
    positions never cross sequences): the reference is a plain forward + log_softmax + gather."""
    from r1pipe.model import DeepSeekPolicy
    from r1pipe.model.tiny import tiny_config

    policy = DeepSeekPolicy.from_config(tiny_config(vocab_size=100), seed=0).eval()
    prompts, completions = _random_sequences(5, seed=2)
    completions = [c or [4] for c in completions]
    (batch,) = pack_sequences(prompts, completions, 10_000)
    with torch.no_grad():
        packed = batch.unpack(policy(batch.input_ids, position_ids=batch.position_ids, targets=batch.targets))
        for row, i in enumerate(batch.seq_index.tolist()):
            seq = torch.tensor([prompts[i] + completions[i]])
            logp = torch.log_softmax(policy(seq).logits[0].double(), -1)
            n = len(completions[i])
            want = logp[len(prompts[i]) - 1 : len(prompts[i]) - 1 + n].gather(-1, torch.tensor(completions[i])[:, None])[:, 0]
            torch.testing.assert_close(packed[row, :n].double(), want, rtol=0, atol=2e-5)
