"""Shared pieces of the training tests: tiny GRPO/SFT recipes written to tmp_path (with a plug-in reward
that is easy to learn), the environment and command line of a real `python -m r1pipe.train` run, and the
tensors of a run's `final/` policy. The tests themselves live next to this file.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

# Dense and easy to learn: the share of the completion's characters that are digits (the tiny tokenizer
# is character level, so a random policy scores ~0.1 and a policy that learned digits scores ~1).
REWARD_PLUGIN = '''
def digit_share(prompts, completions, **columns):
    return [sum(ch.isdigit() for ch in c) / 10.0 for c in completions]
'''

# What every run needs on 2 shared cores: one thread, vLLM in-process with a small KV cache.
RUN_ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
           "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONUNBUFFERED": "1"}


def grpo_recipe(tmp_path: Path, name: str = "grpo", **sections) -> Path:
    """A tiny GRPO recipe file; `sections` update its sections, e.g. train={"max_steps": 3}."""
    plugin = tmp_path / "digit_reward.py"
    plugin.write_text(REWARD_PLUGIN)
    recipe = {
        "stage": "grpo",
        "name": name,
        "output_dir": str(tmp_path / name),
        "model": {"init": "tiny"},
        "data": {"train": "tiny_arith:train?n=16", "eval": None},
        "rewards": [{"name": f"{plugin}:digit_share", "weight": 1.0, "isolation": "inline", "label": "digits"}],
        "rollout": {"engine": "torch", "temperature": 1.0, "max_tokens": 10, "max_model_len": 128},
        "grpo": {"num_generations": 4, "beta": 0.01, "loss_type": "grpo"},
        "optim": {"lr": 3.0e-3},
        "train": {"max_steps": 4, "prompts_per_step": 4, "micro_batch_tokens": 512, "save_every": 0, "seed": 0},
    }
    return _write(tmp_path, name, recipe, sections)


def sft_recipe(tmp_path: Path, name: str = "sft", **sections) -> Path:
    """A tiny SFT recipe on the embedded task's chain-of-thought column."""
    recipe = {
        "stage": "sft",
        "name": name,
        "output_dir": str(tmp_path / name),
        "model": {"init": "tiny"},
        "data": {"train": "tiny_arith:train?n=16", "eval": None},
        "optim": {"lr": 1.0e-3},
        "train": {"max_steps": 1, "batch_size": 8, "micro_batch_tokens": 512, "save_every": 0, "seed": 0},
    }
    return _write(tmp_path, name, recipe, sections)


def _write(tmp_path: Path, name: str, recipe: dict, sections: dict) -> Path:
    for section, values in sections.items():
        if isinstance(values, dict):
            recipe.setdefault(section, {}).update(values)
        else:
            recipe[section] = values
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def train_command(recipe: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "r1pipe.train", str(recipe), *args]


def run_env() -> dict:
    return {**os.environ, **RUN_ENV}


def run_train(recipe: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """A real training run in its own process; its output is in the assertion message on failure."""
    proc = subprocess.run(train_command(recipe, *args), env=run_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(train_command(recipe, *args))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def final_tensors(run_dir: Path) -> dict:
    """Every tensor of `run_dir/final/` as written (published checkpoint layout)."""
    from safetensors.torch import load_file

    files = sorted((run_dir / "final").glob("*.safetensors"))
    assert files, f"{run_dir / 'final'} holds no safetensors"
    out = {}
    for f in files:
        out.update(load_file(str(f)))
    return out
