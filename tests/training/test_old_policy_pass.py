"""The GRPO step's shortcut for mu = 1 without TIS (r1pipe.stages.grpo.old_policy_is_training_forward):
pi_old's log-probs, entropy and expert loads taken from the training forward must give the same step as
the separate no-grad pass they replace: same logged metrics, same weights after the steps.
"""
from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from r1pipe.stages import grpo
from tests.training.helpers import grpo_recipe

COMPARED = ["loss", "grad_norm", "kl", "entropy", "logprob_mismatch_max", "logprob_mismatch_mean",
            "expert_load_max_over_mean/layer0", "expert_load_max_over_mean/layer1", "reward/mean"]


def _run(tmp_path, name, monkeypatch, shortcut: bool):
    from r1pipe.train import main

    with monkeypatch.context() as m:
        if not shortcut:
            m.setattr(grpo, "old_policy_is_training_forward", lambda cfg: False)
        else:  # make sure the shortcut is really taken in this configuration
            assert grpo.old_policy_is_training_forward(type("G", (), {"num_iterations": 1, "tis_cap": None})())
        main([str(grpo_recipe(tmp_path, name, train={"max_steps": 3}))])
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    weights = {}
    for f in sorted((tmp_path / name / "final").glob("*.safetensors")):
        weights.update(load_file(f))
    return rows, weights


def test_old_logprobs_from_the_training_forward_match_a_separate_pass(tmp_path, monkeypatch):
    fast, fast_w = _run(tmp_path, "fast", monkeypatch, shortcut=True)
    full, full_w = _run(tmp_path, "full", monkeypatch, shortcut=False)
    assert len(fast) == len(full) == 3
    for a, b in zip(fast, full):
        for key in COMPARED:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key, a[key], b[key])
    assert fast[0]["entropy"] > 0 and fast[-1]["kl"] > 0  # the compared numbers are not trivially zero
    assert fast_w.keys() == full_w.keys()
    worst = max((fast_w[k].float() - full_w[k].float()).abs().max().item() for k in fast_w)
    assert worst < 1e-5, f"weights differ by {worst} after 3 steps"
