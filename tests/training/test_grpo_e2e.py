"""End-to-end GRPO on the tiny policy (issue 4, "Running it"): 12 steps on the torch engine with an easy
plug-in reward (share of digit characters) must raise the mean reward by a clear margin; metrics.jsonl has
one line per step with the documented keys; `final/` loads in DeepSeekPolicy and in transformers with the
same logits, and transformers' model puts more probability on digits than the initial policy did.
"""
from __future__ import annotations

import json
import math

import torch

from tests.training.helpers import grpo_recipe

STEPS = 12
# README "The step": what every GRPO step logs (reward per function, accuracy, KL, clip fractions, entropy,
# length, truncation, zero-variance groups, throughput, sync time, mismatch, expert load, peak memory)
DOCUMENTED = [
    "rewards/digits/mean", "rewards/digits/std", "rewards/accuracy/mean", "rewards/accuracy/std", "reward/mean",
    "reward/std", "accuracy", "kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "entropy", "completion_length",
    "truncation_rate", "zero_variance_groups", "rollout_tokens_per_s", "train_tokens_per_s", "sync_s",
    "logprob_mismatch_max", "expert_load_max_over_mean/layer0", "expert_load_max_over_mean/layer1",
    "peak_memory_gb", "loss", "grad_norm", "lr", "skipped_nonfinite",
]


def test_tiny_grpo_learns_the_reward(tmp_path):
    from r1pipe.train import main

    rewards = [{"name": f"{tmp_path / 'digit_reward.py'}:digit_share", "weight": 1.0, "isolation": "inline", "label": "digits"},
               {"name": "accuracy", "weight": 0.0}]  # logged, not trained on: the accuracy metric's path
    recipe = grpo_recipe(tmp_path, "e2e", rewards=rewards, optim={"lr": 1.0e-2}, train={"max_steps": STEPS})
    main([str(recipe)])

    rows = [json.loads(line) for line in (tmp_path / "e2e" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        missing = [k for k in DOCUMENTED if k not in r]
        assert not missing, f"step {r['step']} lacks {missing}"
        assert all(isinstance(r[k], (int, float)) and math.isfinite(r[k]) for k in DOCUMENTED), r
        assert r["kl"] >= 0 and 0 <= r["clip_ratio/low_mean"] <= 1 and 0 <= r["truncation_rate"] <= 1
        assert 0 <= r["zero_variance_groups"] <= 1 and r["skipped_nonfinite"] == 0
        assert r["rollout_tokens_per_s"] > 0 and r["train_tokens_per_s"] > 0 and r["peak_memory_gb"] > 0
        assert r["expert_load_max_over_mean/layer0"] >= 1.0
        assert abs(r["reward/mean"] - r["rewards/digits/mean"]) < 1e-6  # the accuracy reward has weight 0
        assert 0 < r["entropy"] <= math.log(108) + 1e-4  # the tiny vocabulary
    # the step-1 policy is the reference: KL 0 there, then it moves away
    assert rows[0]["kl"] == 0 and rows[-1]["kl"] > 0.05
    first = sum(r["reward/mean"] for r in rows[:3]) / 3
    last = sum(r["reward/mean"] for r in rows[-3:]) / 3
    assert first < 0.2, f"a random tiny policy should rarely write digits, got mean reward {first:.3f}"
    assert last > first + 0.25, f"reward {first:.3f} -> {last:.3f}: GRPO did not learn the easy reward"

    _check_final(tmp_path / "e2e" / "final", recipe)


def _check_final(final, recipe):
    from transformers import AutoModelForCausalLM

    from r1pipe.data.datasets import format_prompt
    from r1pipe.data.tokenizer import load_tiny_tokenizer
    from r1pipe.model import DeepSeekPolicy
    from r1pipe.recipe import load_recipe
    from r1pipe.training.setup import load_policy_for

    tok = load_tiny_tokenizer()
    ids = torch.tensor([format_prompt(tok, "1+2*3")])
    ours = DeepSeekPolicy.from_pretrained(final).eval()
    hf = AutoModelForCausalLM.from_pretrained(str(final), dtype=torch.float32).eval()
    initial, _ = load_policy_for(load_recipe(recipe).model, seed=0)
    with torch.no_grad():
        theirs = hf(ids).logits
        torch.testing.assert_close(ours(ids).logits, theirs, rtol=0, atol=1e-4)
        digits = [tok.convert_tokens_to_ids(str(d)) for d in range(10)]
        p_final = torch.softmax(theirs[0, -1], -1)[digits].sum()
        p_initial = torch.softmax(initial.eval()(ids).logits[0, -1], -1)[digits].sum()
    assert p_final > p_initial + 0.2, f"P(digit next) {p_initial:.3f} -> {p_final:.3f}"
