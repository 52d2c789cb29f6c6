"""Resumable training state: `DIR/checkpoints/step-N/` holds the policy (published layout), the reference
policy, optimizer, scheduler, RNG states, the step and the stage's own counters (`stage_state`: GRPO's
run of bad steps and data position); written atomically (temp dir, then rename) and
`DIR/checkpoints/latest` names the newest complete one. `--resume` loads it and continues bit for bit:
each step's data order and sampling seeds derive from (run seed, step), never from consumed RNG state.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from r1pipe.model.checkpoint import replace_dir


def step_seed(run_seed: int, step: int, salt: int = 0) -> int:
    """A 31-bit seed for (run, step): what a resumed step samples equals what the uninterrupted one did."""
    return (run_seed * 1_000_003 + step * 7919 + salt * 104_729) % (2**31 - 1)


def select_rows(n_rows: int, per_step: int, step: int, seed: int) -> list[int]:
    """Row indices of a step: epoch-wise shuffles keyed by (seed, epoch), so any step is computable alone."""
    return rows_at(n_rows, step * per_step, per_step, seed)


def rows_at(n_rows: int, position: int, count: int, seed: int) -> list[int]:
    """`count` row indices from `position` on in the data order: the concatenated epoch-wise shuffles.
    A stage that consumes a varying number of rows a step (dynamic-sampling refills) keeps its position."""
    out = []
    while len(out) < count:
        epoch, offset = divmod(position, n_rows)
        order = list(range(n_rows))
        random.Random(step_seed(seed, epoch, salt=1)).shuffle(order)
        take = order[offset : offset + count - len(out)]
        out.extend(take)
        position += len(take)
    return out


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_train_state(out_dir: Path, step: int, policy, optimizer, scheduler, reference=None, tokenizer=None,
                     extra: dict | None = None, keep_last: int = 2, stage_state: dict | None = None) -> Path:
    """Write checkpoints/step-{step} atomically and point checkpoints/latest at it. `stage_state`: what the
    stage needs besides the step to go on exactly (counters, a data position); `load_trainer_state` returns it."""
    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"step-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{step}.tmp-", dir=root))
    try:
        policy.save_pretrained(tmp / "policy", tokenizer=tokenizer)
        if reference is not None:
            reference.save_pretrained(tmp / "reference")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state(),
                    "stage_state": dict(stage_state or {})}, tmp / "trainer_state.pt")
        (tmp / "meta.json").write_text(json.dumps({"step": step, **(extra or {})}, indent=2))
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_atomic(root / "latest", f"step-{step}\n")
    for old in sorted(root.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def latest_checkpoint(out_dir: Path) -> Path | None:
    pointer = Path(out_dir) / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if (path / "meta.json").is_file():
        return path
    # A kill inside replace_dir while a step was saved a second time (a resumed finished run) leaves the
    # pointer on a renamed-away dir; the newest complete checkpoint resumes just as exactly.
    complete = [p for p in pointer.parent.glob("step-*") if (p / "meta.json").is_file()]
    if complete:
        return max(complete, key=lambda p: int(p.name.split("-")[1]))
    raise FileNotFoundError(f"{pointer} names {path}, which is missing or incomplete (no meta.json), "
                            f"and {pointer.parent} holds no other complete step-* checkpoint")


def load_trainer_state(ckpt: Path, optimizer, scheduler) -> dict:
    """Restore optimizer, scheduler and RNG; returns meta.json's entries plus `stage_state` ({} when the
    checkpoint predates it)."""
    state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return {**json.loads((ckpt / "meta.json").read_text()), "stage_state": state.get("stage_state", {})}


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
