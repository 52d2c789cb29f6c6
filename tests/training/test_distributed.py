"""Two processes on the CPU (gloo) equal one (issue 4, "Running it"): `accelerate launch --multi_gpu
--num_processes 2` of one GRPO step (loss types grpo with mu=2 and dapo) and one SFT step gives the gradients
that one process computes on the same global batch, within 1e-5 relative; and a GRPO step logs the metrics
that one process logs (rewards, lengths, clip and ratio stats, KL, entropy, loss, ...), each rank's reduced
over both ranks in one collective, not rank 0's own shard.

On a machine without GPUs `--multi_gpu` starts torchrun workers whose Accelerator(cpu=True) joins a gloo
group (MULTI_CPU); `--cpu --num_processes 2` would start only one process in accelerate 1.15. The prompts
are sharded by rank, so this also checks that sampling seeds follow the global prompt index, that the loss
normalisation spans micro-batches and ranks, and that ranks with different micro-batch counts, or with none
at all (a dropped group, an SFT batch smaller than the world), stay in step. The dropped group is refilled
(dynamic sampling) by one prompt, which goes to rank 0: a refill round where a rank samples nothing.
"""
from __future__ import annotations

from pathlib import Path

import json
import math

import torch

from tests.training.grad_dump import gradients_of
from tests.training.helpers import accelerate_launch, grpo_recipe, sft_recipe

# a small token budget: several micro-batches per rank, usually a different number on each rank
TRAIN = {"max_steps": 1, "micro_batch_tokens": 120}
OPTIM = {"max_grad_norm": 1.0e9}  # compare raw gradients, not clipped ones
# wall-clock metrics differ between any two runs; everything else a GRPO step logs must match
TIMINGS = {"rollout_s", "rollout_tokens_per_s", "train_tokens_per_s", "sync_s", "peak_memory_gb"}


def _recipes(root: Path) -> list[Path]:
    root.mkdir()
    return [
        # mu=2: the second pass moves the ratio off 1, so the clip, ratio and KL stats are not trivially 0 or 1
        grpo_recipe(root, "grpo", grpo={"loss_type": "grpo", "num_iterations": 2}, train=TRAIN, optim=OPTIM),
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


def test_two_processes_equal_one(tmp_path):
    two = _recipes(tmp_path / "two")
    with accelerate_launch("--multi_gpu", str(Path(__file__).with_name("grad_dump.py")), str(tmp_path / "dump"), *map(str, two)):
        single = gradients_of(_recipes(tmp_path / "one"))  # the same in this process (one rank), meanwhile

    for name, want_steps in single.items():
        rank0 = torch.load(tmp_path / "dump" / f"{name}-rank0.pt")
        rank1 = torch.load(tmp_path / "dump" / f"{name}-rank1.pt")
        assert len(want_steps) == len(rank0) == len(rank1) >= 1, name  # one optimizer step per pass
        for want, got, other in zip(want_steps, rank0, rank1):
            _check_gradients(name, want, got, other)
    for name in ("grpo", "dapo", "grpo_rank1_dropped"):
        _check_metrics(name, _metric_rows(tmp_path / "one" / name), _metric_rows(tmp_path / "two" / name))
    # the compared numbers are not trivial: mu=2 clipped some tokens and moved off the reference; a refill ran
    mu2 = _metric_rows(tmp_path / "one" / "grpo")[0]
    assert mu2["clip_ratio/region_mean"] > 0 and mu2["kl"] > 0 and mu2["ratio/min"] < 1 < mu2["ratio/max"]
    assert _metric_rows(tmp_path / "one" / "grpo_rank1_dropped")[0]["refill_rounds"] >= 1, "the dropped group was not refilled"


def _check_gradients(name, want, got, other):
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
        # float32 sums in another order (two shards, then the all-reduce) after an Adam step (mu=2): up to
        # ~1e-5 here, wherever autograd's accumulation order moves (a custom Function in the block moved the
        # worst parameter from 8.4e-6 to 1.06e-5); a wrong scale or a missed all-reduce is off by >= 1e-2
        assert err <= 2e-5, f"{name}: parameter {i} {tuple(w.shape)}: 2-process gradient off by {err:.2e} relative"


def _metric_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _check_metrics(name, want_rows, got_rows):
    """Rank 0's metrics.jsonl of the 2-process run equals the 1-process run's, key for key (timings aside)."""
    assert len(want_rows) == len(got_rows) == 1, name
    want, got = want_rows[0], got_rows[0]
    assert set(want) == set(got), f"{name}: keys only in one run: {sorted(set(want) ^ set(got))}"
    off = [(key, want[key], got[key]) for key in sorted(set(want) - TIMINGS) if not _close(want[key], got[key])]
    assert not off, f"{name}: 2-process metrics differ from 1-process ones (key, want, got): {off}"


def _close(want, got) -> bool:
    """Equal, or floats as close as float32 sums in another order (other micro-batches) leave them: ~1e-7;
    a metric of rank 0's shard alone is far off."""
    if isinstance(want, float) and isinstance(got, float):
        return math.isclose(want, got, rel_tol=1e-4, abs_tol=1e-6)
    return want == got
