"""Runs recipes through `r1pipe.train` and saves the gradients the optimizer sees at each step (after the
DDP all-reduce, before AdamW), so test_distributed.py can compare a 2-process run with a 1-process run:

    accelerate launch --multi_gpu --num_processes 2 tests/training/grad_dump.py OUT RECIPE.yaml [RECIPE.yaml ...]

Files: OUT/<recipe stem>-rank<r>.pt, a list over steps of the list of gradients in parameter order (an
FSDP2-sharded gradient is gathered whole), and OUT/<recipe stem>-rank<r>-shards.pt: per step and parameter,
(elements this rank holds, elements of the whole parameter), or None for an unsharded parameter.
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch


@contextlib.contextmanager
def dumping_grads(store: list, shards: list | None = None):
    """Patch AdamW.step (before any optimizer or scheduler wraps it) to record the gradients first (whole:
    a sharded one is gathered, a collective every rank joins) and, into `shards`, how parameters are sharded."""
    from torch.distributed.tensor import DTensor

    original = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        params = [p for g in self.param_groups for p in g["params"]]
        store.append([None if p.grad is None else (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).detach().clone()
                      for p in params])
        if shards is not None:
            shards.append([(p.to_local().numel(), p.numel()) if isinstance(p, DTensor) else None for p in params])
        return original(self, *args, **kwargs)

    torch.optim.AdamW.step = step
    try:
        yield store
    finally:
        torch.optim.AdamW.step = original


def gradients_of(recipes: list[Path]) -> dict:
    """{recipe stem: gradients per step} of the recipes, run one after the other in this process."""
    from r1pipe.train import main

    out = {}
    for recipe in recipes:
        with dumping_grads([]) as grads:
            main([str(recipe)])
        out[Path(recipe).stem] = grads
    return out


def run_and_dump(out: Path, recipes: list[str], extra_args: tuple[str, ...] = ()) -> None:
    from accelerate import PartialState

    from r1pipe.train import main

    out.mkdir(parents=True, exist_ok=True)
    for recipe in recipes:
        shards = []
        with dumping_grads([], shards) as grads:
            main([recipe, *extra_args])
        name = f"{Path(recipe).stem}-rank{PartialState().process_index}"
        torch.save(grads, out / f"{name}.pt")
        torch.save(shards, out / f"{name}-shards.pt")


if __name__ == "__main__":
    run_and_dump(Path(sys.argv[1]), sys.argv[2:])
