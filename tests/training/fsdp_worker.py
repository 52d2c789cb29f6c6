"""The 2-process side of test_fsdp.py and test_zero3.py, started by `accelerate launch --config_file
recipes/accelerate/fsdp2.yaml` (or zero3.yaml):

    fsdp_worker.py OUT RESUMED RECIPE.yaml [RECIPE.yaml ...]

runs every recipe and dumps its gradients and parameter shards (grad_dump.py), then resumes the first recipe
from its step-1 checkpoint, copied by rank 0 into RESUMED/checkpoints, and runs it to its last step there.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import yaml
from grad_dump import run_and_dump  # this file runs as a script: its folder is on sys.path


def main(out: Path, resumed: Path, recipes: list[str]) -> None:
    from accelerate import PartialState

    from r1pipe.train import main as train

    run_and_dump(out, recipes)
    first = Path(yaml.safe_load(Path(recipes[0]).read_text())["output_dir"])
    state = PartialState()
    if state.is_main_process:
        shutil.copytree(first / "checkpoints" / "step-1", resumed / "checkpoints" / "step-1")
        (resumed / "checkpoints" / "latest").write_text("step-1\n")
    state.wait_for_everyone()
    train([recipes[0], "--output-dir", str(resumed), "--resume"])


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:])
