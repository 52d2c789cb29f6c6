"""Runs recipes through `r1pipe.train` and saves the gradients the optimizer sees at each step (after the
DDP all-reduce, before AdamW), so test_distributed.py can compare a 2-process run with a 1-process run:

    accelerate launch --multi_gpu --num_processes 2 tests/training/grad_dump.py OUT RECIPE.yaml [RECIPE.yaml ...]

Files: OUT/<recipe stem>-rank<r>.pt, a list over steps of the list of gradients in parameter order.
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch


@contextlib.contextmanager
def dumping_grads(store: list):
    """Patch AdamW.step (before any optimizer or scheduler wraps it) to record the gradients first."""
    original = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        store.append([None if p.grad is None else p.grad.detach().clone() for g in self.param_groups for p in g["params"]])
        return original(self, *args, **kwargs)

    torch.optim.AdamW.step = step
    try:
        yield store
    finally:
        torch.optim.AdamW.step = original


def run_and_dump(out: Path, recipes: list[str], extra_args: tuple[str, ...] = ()) -> None:
    from accelerate import PartialState

    from r1pipe.train import main

    out.mkdir(parents=True, exist_ok=True)
    for recipe in recipes:
        with dumping_grads([]) as grads:
            main([recipe, *extra_args])
        torch.save(grads, out / f"{Path(recipe).stem}-rank{PartialState().process_index}.pt")


if __name__ == "__main__":
    run_and_dump(Path(sys.argv[1]), sys.argv[2:])
