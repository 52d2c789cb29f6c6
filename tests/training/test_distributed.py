"""Two processes on the CPU (gloo) equal one (issue 4, "Running it"): `accelerate launch --multi_gpu
--num_processes 2` of one GRPO step (loss types grpo and dapo) and one SFT step gives the gradients that one
process computes on the same global batch, within 1e-5 relative.

On a machine without GPUs `--multi_gpu` starts torchrun workers whose Accelerator(cpu=True) joins a gloo
group (MULTI_CPU); `--cpu --num_processes 2` would start only one process in accelerate 1.15. The prompts
are sharded by rank, so this also checks that sampling seeds follow the global prompt index, that the loss
normalisation spans micro-batches and ranks, and that ranks with different micro-batch counts, or with none
at all (a dropped group, an SFT batch smaller than the world), stay in step.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import torch

from tests.training.grad_dump import dumping_grads
from tests.training.helpers import grpo_recipe, run_env, sft_recipe

# a small token budget: several micro-batches per rank, usually a different number on each rank
TRAIN = {"max_steps": 1, "micro_batch_tokens": 120}
OPTIM = {"max_grad_norm": 1.0e9}  # compare raw gradients, not clipped ones


def _free_port() -> int:
    with socket.socket() as s:  # other test runs share this machine: never assume 29500 is free
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _recipes(root: Path) -> list[Path]:
    root.mkdir()
    return [
        grpo_recipe(root, "grpo", grpo={"loss_type": "grpo"}, train=TRAIN, optim=OPTIM),
        grpo_recipe(root, "dapo", grpo={"loss_type": "dapo"}, train=TRAIN, optim=OPTIM),
        _rank1_dropped(root),
        sft_recipe(root, "sft", train=TRAIN, optim=OPTIM),
        sft_recipe(root, "sft_one_row", train={**TRAIN, "batch_size": 1}, optim=OPTIM),  # rank 1 gets no row
    ]


def _rank1_dropped(root: Path) -> Path:
    """Two prompts, one per rank; rank 1's gets a flat reward and dynamic sampling drops its group, so rank 1
    has no sequence to train on and must still join the all-reduces (gradients, expert loads)."""
    from r1pipe.data.datasets import load_prompt_dataset
    from r1pipe.training.state import select_rows

    rows = load_prompt_dataset("tiny_arith:train?n=16").to_list()
    flat = rows[select_rows(len(rows), 2, step=0, seed=0)[1]]["prompt"]
    (root / "flat_reward.py").write_text(
        f"def digits_or_flat(prompts, completions, **columns):\n"
        f"    return [0.5 if p == {flat!r} else sum(ch.isdigit() for ch in c) / 10.0 for p, c in zip(prompts, completions)]\n")
    rewards = [{"name": f"{root / 'flat_reward.py'}:digits_or_flat", "isolation": "inline", "label": "digits"}]
    return grpo_recipe(root, "grpo_rank1_dropped", rewards=rewards, grpo={"dynamic_sampling": True},
                       train={**TRAIN, "prompts_per_step": 2}, optim=OPTIM)


def _single_process(tmp_path) -> dict:
    """The same recipes in this process (one rank), while the two workers start."""
    from r1pipe.train import main

    single = {}
    for recipe in _recipes(tmp_path / "one"):
        with dumping_grads([]) as grads:
            main([str(recipe)])
        single[recipe.stem] = grads
    return single


def test_two_processes_equal_one(tmp_path):
    two = _recipes(tmp_path / "two")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           str(Path(__file__).with_name("grad_dump.py")), str(tmp_path / "dump"), *map(str, two)]
    # its own session: on a failure or hang the launcher and both workers go down together
    launched = subprocess.Popen(cmd, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    try:
        single = _single_process(tmp_path)
        out, _ = launched.communicate(timeout=400)
    finally:
        if launched.poll() is None:
            os.killpg(launched.pid, signal.SIGKILL)
            launched.wait()
    assert launched.returncode == 0, out[-8000:]

    for name, want_steps in single.items():
        rank0 = torch.load(tmp_path / "dump" / f"{name}-rank0.pt")
        rank1 = torch.load(tmp_path / "dump" / f"{name}-rank1.pt")
        assert len(want_steps) == len(rank0) == len(rank1) == 1, name
        want, got, other = want_steps[0], rank0[0], rank1[0]
        assert len(want) == len(got) == len(other)
        total = torch.sqrt(sum((w.double() ** 2).sum() for w in want if w is not None))
        assert total > 1e-3, f"{name}: the single-process gradient is ~0 ({total}); the comparison would be empty"
        for i, (w, g, o) in enumerate(zip(want, got, other)):
            assert (w is None) == (g is None) == (o is None), f"{name}: parameter {i} has a gradient in only some runs"
            if w is None:
                continue
            assert torch.equal(g, o), f"{name}: parameter {i}: the two ranks hold different gradients after all-reduce"
            scale = w.abs().max().clamp(min=1e-12)
            err = (g - w).abs().max() / scale
            assert err <= 1e-5, f"{name}: parameter {i} {tuple(w.shape)}: 2-process gradient off by {err:.2e} relative"
