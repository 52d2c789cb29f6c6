"""NaN/inf loss (issue 4, "Running it"): the step is skipped (no optimizer step) and counted in
metrics.jsonl (`skipped_nonfinite`), training goes on after an isolated bad step, and after
`train.max_bad_steps` bad steps in a row the run aborts with a message naming that key, also when the
row spans a checkpoint and a resume (the count is saved with the trainer state).
GRPO gets its NaN from a patched loss; SFT from an absurd learning rate, as a user would.
"""
from __future__ import annotations

import json

import pytest
import torch

from r1pipe.stages import grpo
from tests.training.grad_dump import dumping_grads
from tests.training.helpers import Killed, grpo_recipe, kill_before_step, sft_recipe


def _poison(monkeypatch, bad_steps):
    """Make the GRPO loss NaN on the given (0-based) steps; the rest of the step runs as usual."""
    current = {}
    real_step, real_loss = grpo.grpo_step, grpo.clipped_policy_loss

    def step(run, index):
        current["step"] = index
        return real_step(run, index)

    def loss(*args, **kwargs):
        value, metrics = real_loss(*args, **kwargs)
        return (value * float("nan") if current["step"] in bad_steps else value), metrics

    monkeypatch.setattr(grpo, "grpo_step", step)
    monkeypatch.setattr(grpo, "clipped_policy_loss", loss)


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_grpo_isolated_nan_step_is_skipped_and_counted(tmp_path, monkeypatch):
    from r1pipe.train import main

    _poison(monkeypatch, bad_steps={1})
    recipe = grpo_recipe(tmp_path, "nan_once", train={"max_steps": 4, "max_bad_steps": 2})
    with dumping_grads([]) as optimizer_steps:
        main([str(recipe)])
    rows = _metrics(tmp_path / "nan_once")
    assert [r["skipped_nonfinite"] for r in rows] == [0.0, 1.0, 0.0, 0.0]
    assert len(optimizer_steps) == 3  # the bad step never reached AdamW
    assert rows[1]["loss"] is None  # NaN is written as null, not as a number
    assert all(isinstance(r["loss"], float) for r in rows[2:])
    assert (tmp_path / "nan_once" / "final").is_dir()


def test_grpo_aborts_after_max_bad_steps_in_a_row(tmp_path, monkeypatch):
    from r1pipe.train import main

    _poison(monkeypatch, bad_steps={0, 1, 2, 3, 4, 5})
    recipe = grpo_recipe(tmp_path, "nan_always", train={"max_steps": 6, "max_bad_steps": 3})
    with dumping_grads([]) as optimizer_steps, pytest.raises(grpo.NonFiniteLossError, match=r"3 steps in a row.*train\.max_bad_steps=3"):
        main([str(recipe)])
    assert not optimizer_steps
    assert [r["skipped_nonfinite"] for r in _metrics(tmp_path / "nan_always")] == [1.0, 1.0]  # step 3 raised
    assert not (tmp_path / "nan_always" / "final").exists()


def test_grpo_bad_step_count_survives_resume(tmp_path, monkeypatch):
    """Step 2 is NaN and checkpointed, the run dies; resumed, a NaN step 3 is the second in a row, so
    max_bad_steps=2 aborts there. A resume that forgot the count would take step 3 as the first and go on."""
    from r1pipe.train import main

    recipe = grpo_recipe(tmp_path, "nan_resume", train={"max_steps": 4, "max_bad_steps": 2, "save_every": 2})
    with monkeypatch.context() as first_run, pytest.raises(Killed):
        _poison(first_run, bad_steps={1})
        kill_before_step(first_run, 2)
        main([str(recipe)])
    checkpoint = tmp_path / "nan_resume" / "checkpoints" / "step-2"
    assert torch.load(checkpoint / "trainer_state.pt", weights_only=False)["stage_state"]["bad_steps"] == 1

    _poison(monkeypatch, bad_steps={2})
    with pytest.raises(grpo.NonFiniteLossError, match=r"2 steps in a row.*train\.max_bad_steps=2"):
        main([str(recipe), "--resume"])
    assert [r["skipped_nonfinite"] for r in _metrics(tmp_path / "nan_resume")] == [0.0, 1.0]  # step 3 raised
    assert not (tmp_path / "nan_resume" / "final").exists()


def test_sft_absurd_lr_skips_then_aborts(tmp_path):
    from r1pipe.train import main

    # one AdamW step of lr 1e30 moves every weight by ~1e30: every later forward is inf/NaN
    recipe = sft_recipe(tmp_path, "sft_nan", optim={"lr": 1.0e30},
                         train={"max_steps": 6, "max_bad_steps": 2, "epochs": 5.0})
    with dumping_grads([]) as optimizer_steps, pytest.raises(RuntimeError, match=r"2 steps in a row.*train\.max_bad_steps=2"):
        main([str(recipe)])
    assert len(optimizer_steps) == 1
    rows = _metrics(tmp_path / "sft_nan")
    assert [r["skipped_nonfinite"] for r in rows] == [0.0, 1.0]
    assert rows[0]["loss"] > 0 and rows[1]["loss"] is None


def test_sft_bad_step_count_survives_resume(tmp_path):
    """Steps 2 and 3 are NaN (lr 1e30 after step 1) and step 3 is checkpointed; resumed, NaN step 4 is the
    third in a row and max_bad_steps=3 aborts there. A resume that forgot the count would finish step 5."""
    from r1pipe.train import main

    recipe = sft_recipe(tmp_path, "sft_nan_resume", optim={"lr": 1.0e30},
                        train={"max_steps": 5, "max_bad_steps": 3, "epochs": 5.0, "save_every": 3})
    main([str(recipe), "--max-steps", "3"])
    checkpoint = tmp_path / "sft_nan_resume" / "checkpoints" / "step-3"
    assert torch.load(checkpoint / "trainer_state.pt", weights_only=False)["stage_state"]["bad_steps"] == 2
    with pytest.raises(RuntimeError, match=r"3 steps in a row.*train\.max_bad_steps=3"):
        main([str(recipe), "--resume"])
    assert [r["skipped_nonfinite"] for r in _metrics(tmp_path / "sft_nan_resume")] == [0.0, 1.0, 1.0]
