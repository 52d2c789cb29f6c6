"""Dynamic-sampling refill (DAPO; issue 4, "The objective"): with `grpo.dynamic_sampling` a step drops its
zero-reward-variance groups and samples the next prompts of the data order, as many as groups are still
missing, for up to `grpo.max_refill_rounds` rounds; the next step starts after the last prompt sampled.

A plug-in reward is flat (0.5) on every prompt but a chosen set, so the test fixes each round's outcome:
3 steps of 4 prompts, 2 refill rounds at most, on the torch engine. It checks the logged `refill_rounds` and
`groups_trained`, the prompts the reward saw round by round against the data order, and that a run killed
after step 2 (checkpoint) and resumed ends with the uninterrupted run's weights: the data position after
refills travels in the checkpoint.
"""
from __future__ import annotations

import json

import pytest
import torch

from tests.training.helpers import Killed, final_tensors, grpo_recipe, kill_before_step

G, PER_STEP, ROWS = 4, 4, "tiny_arith:train?n=32"
# positions in the data order whose prompts have reward signal, and what the steps must do with them:
# step 1: 2 of 4 -> refill 2 prompts (1 signal) -> refill 1 (signal): 4 groups after 2 rounds
# step 2: 1 of 4 -> refill 3 (none) -> refill 3 (1 signal): 2 groups, the round cap reached
# step 3: 4 of 4, no refill
SIGNAL_POSITIONS = {0, 1, 4, 6, 7, 15, 17, 18, 19, 20}
ROUND_SIZES = [[4, 2, 1], [4, 3, 3], [4]]
WANT = [{"refill_rounds": 2, "groups_trained": 4.0, "zero_variance_groups": 3 / 7},
        {"refill_rounds": 2, "groups_trained": 2.0, "zero_variance_groups": 8 / 10},
        {"refill_rounds": 0, "groups_trained": 4.0, "zero_variance_groups": 0.0}]

# Signal prompts score their G samples 0, 1/4, 2/4, 3/4 (never flat, whatever the policy writes); every
# call appends the prompts it scored, one per group, to a log.
REWARD = '''
import json

SIGNAL = set(json.loads({signal!r}))


def signal_or_flat(prompts, completions, **columns):
    with open({log!r}, "a") as f:
        f.write(json.dumps(prompts[::{g}]) + "\\n")
    return [(i % {g}) / {g} if p in SIGNAL else 0.5 for i, p in enumerate(prompts)]
'''


def _data_order(count: int) -> list[str]:
    from r1pipe.data.datasets import load_prompt_dataset
    from r1pipe.training.state import rows_at

    rows = load_prompt_dataset(ROWS).to_list()
    return [rows[i]["prompt"] for i in rows_at(len(rows), 0, count, seed=0)]


def _recipe(tmp_path, name: str):
    order = _data_order(max(SIGNAL_POSITIONS) + 1)
    assert len(set(order)) == len(order), "the test needs distinct prompts"
    plugin, log = tmp_path / f"{name}_reward.py", tmp_path / f"{name}_scored.jsonl"
    plugin.write_text(REWARD.format(signal=json.dumps([order[p] for p in SIGNAL_POSITIONS]), log=str(log), g=G))
    rewards = [{"name": f"{plugin}:signal_or_flat", "isolation": "inline", "label": "signal"}]
    recipe = grpo_recipe(tmp_path, name, rewards=rewards, data={"train": ROWS},
                         grpo={"num_generations": G, "dynamic_sampling": True, "max_refill_rounds": 2},
                         train={"max_steps": len(WANT), "prompts_per_step": PER_STEP, "save_every": 2})
    return recipe, log


def _scored_rounds(log) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_refill_replaces_flat_groups_from_the_data_order_and_resumes_exactly(tmp_path, monkeypatch):
    from r1pipe.train import main

    whole, whole_log = _recipe(tmp_path, "whole")
    main([str(whole)])
    rows = _metrics(tmp_path / "whole")
    for step, (row, want) in enumerate(zip(rows, WANT), start=1):
        got = {k: row[k] for k in want}
        assert got == pytest.approx(want), f"step {step}: {got} != {want}"
    # the rounds sampled consecutive prompts of the data order, across steps too
    sizes = [n for step in ROUND_SIZES for n in step]
    order = _data_order(sum(sizes))
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    assert _scored_rounds(whole_log) == [order[s : s + n] for s, n in zip(starts, sizes)]

    killed, killed_log = _recipe(tmp_path, "killed")
    with monkeypatch.context() as m, pytest.raises(Killed):
        kill_before_step(m, 2)
        main([str(killed)])
    main([str(killed), "--resume"])
    # step 3 starts after step 2's last refill (position 17), not at 2 x prompts_per_step
    assert _scored_rounds(killed_log) == _scored_rounds(whole_log)
    want, got = final_tensors(tmp_path / "whole"), final_tensors(tmp_path / "killed")
    differ = [k for k in want if not torch.equal(want[k], got[k])]
    assert not differ, f"{len(differ)} of {len(want)} tensors differ after resume, e.g. {differ[:3]}"
    assert [r["refill_rounds"] for r in _metrics(tmp_path / "killed")] == [w["refill_rounds"] for w in WANT]
