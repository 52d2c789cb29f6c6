"""Exact resume after `kill -9` (issue 4, "Running it"): a real `python -m r1pipe.train` run is SIGKILLed
mid-run, resumed with `--resume`, and its `final/` must equal an uninterrupted run's bit for bit, with one
metrics.jsonl line per step. Checkpoints every 2 steps and the kill after step 3 is logged, so the resumed
run must also drop step 3's line and redo that step from the step-2 checkpoint.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import torch

from tests.training.helpers import final_tensors, grpo_recipe, run_env, run_train, train_command

STEPS = 4


def _logged_steps(run_dir) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if line.endswith("}")]


def _kill_after_step(recipe, run_dir, step: int, timeout: float = 300) -> None:
    """Start a run, SIGKILL it as soon as `step` is logged (the next step is running), check it was alive."""
    proc = subprocess.Popen(train_command(recipe), env=run_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    try:
        while step not in _logged_steps(run_dir):
            if proc.poll() is not None:
                pytest.fail(f"run ended (rc {proc.returncode}) before step {step} was logged:\n{proc.stderr.read()[-4000:]}")
            if time.time() > deadline:
                pytest.fail(f"step {step} not logged within {timeout} s")
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended by itself before the kill landed"
    assert not (run_dir / "final").exists()


@pytest.mark.parametrize("engine", ["torch", pytest.param("vllm", marks=pytest.mark.vllm)])
def test_kill9_then_resume_equals_uninterrupted(tmp_path, engine):
    sections = dict(rollout={"engine": engine}, train={"max_steps": STEPS, "save_every": 2})
    whole = grpo_recipe(tmp_path, "whole", **sections)
    killed = grpo_recipe(tmp_path, "killed", **sections)
    # The uninterrupted reference runs on the other core while the victim is started and killed.
    reference = subprocess.Popen(train_command(whole), env=run_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _kill_after_step(killed, tmp_path / "killed", step=3)
        assert (tmp_path / "killed" / "checkpoints" / "latest").read_text().strip() == "step-2"
        assert _logged_steps(tmp_path / "killed") == [1, 2, 3]
        run_train(killed, "--resume")
        _, err = reference.communicate(timeout=300)
    finally:
        if reference.poll() is None:
            reference.kill()
            reference.wait()
    assert reference.returncode == 0, err[-4000:]

    want, got = final_tensors(tmp_path / "whole"), final_tensors(tmp_path / "killed")
    assert sorted(want) == sorted(got)
    differ = [k for k in want if not torch.equal(want[k], got[k])]
    assert not differ, f"{len(differ)} of {len(want)} tensors differ after resume, e.g. {differ[:3]}"
    # the run must have learned something, or equality would be trivial
    init = grpo_recipe(tmp_path, "init", **sections)
    assert not all(torch.equal(want[k], v) for k, v in _initial_tensors(init, tmp_path).items())

    assert _logged_steps(tmp_path / "killed") == list(range(1, STEPS + 1))
    rows = [json.loads(line) for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    # what the steps sampled and scored is the same too (timings aside)
    for key in ("rewards/digits/mean", "completion_length", "loss", "kl"):
        assert [r[key] for r in rows] == [r[key] for r in ref_rows], key


def _initial_tensors(recipe, tmp_path) -> dict:
    """The tiny policy's initial weights, in checkpoint layout, built the way a run builds them."""
    from r1pipe.model.checkpoint import to_checkpoint_tensors
    from r1pipe.recipe import load_recipe
    from r1pipe.training.setup import load_policy_for

    rc = load_recipe(recipe)
    policy, _ = load_policy_for(rc.model, rc.train.seed)
    return {k: v.contiguous() for k, v in to_checkpoint_tensors(policy.state_dict())}


def test_resumed_metrics_drop_redone_and_torn_lines(tmp_path):
    """A kill can land after a step was logged but before it was checkpointed, or mid-write of a line."""
    from r1pipe.training.metrics import MetricsLogger

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 0.5}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo')
    logger = MetricsLogger(tmp_path, total_steps=5, start_step=2, backends=())
    logger.log(3, {"loss": 0.25})
    logger.close()
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.5}, {"step": 3, "loss": 0.25}]


def test_latest_checkpoint_skips_a_dir_renamed_away_mid_save(tmp_path):
    """`latest` names step-4 but a kill inside replace_dir left only `.step-4.old-PID`: resume from step-2."""
    from r1pipe.training.state import latest_checkpoint

    root = tmp_path / "checkpoints"
    for name in ("step-2", ".step-4.old-123", ".step-4.tmp-abc", "step-3-incomplete"):
        (root / name).mkdir(parents=True)
    (root / "step-2" / "meta.json").write_text('{"step": 2}')
    (root / ".step-4.old-123" / "meta.json").write_text('{"step": 4}')
    (root / "latest").write_text("step-4\n")
    assert latest_checkpoint(tmp_path) == root / "step-2"
    (root / "step-4").mkdir()
    (root / "step-4" / "meta.json").write_text('{"step": 4}')
    assert latest_checkpoint(tmp_path) == root / "step-4"
    assert latest_checkpoint(tmp_path / "nothing") is None
