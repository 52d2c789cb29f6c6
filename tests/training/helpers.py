"""Shared pieces of the training tests: tiny GRPO/SFT recipes written to tmp_path (with a plug-in reward
that is easy to learn), the environment and command line of a real `python -m r1pipe.train` run, and the
tensors of a run's `final/` policy. The tests themselves live next to this file.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
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


class Killed(Exception):
    """Stands for a kill between two steps (see `kill_before_step`)."""


def kill_before_step(monkeypatch, index: int) -> None:
    """Make an in-process GRPO run die (Killed) as its step `index` (0-based) would start: what the last
    checkpoint holds is all a resume has, as after a kill -9 between steps."""
    from r1pipe.stages import grpo

    real_step = grpo.grpo_step

    def step(run, i):
        if i == index:
            raise Killed(f"before step {i}")
        return real_step(run, i)

    monkeypatch.setattr(grpo, "grpo_step", step)


def free_port() -> int:
    with socket.socket() as s:  # other test runs share this machine: never assume 29500 is free
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def accelerate_launch(*args: str, timeout: float = 400, must_succeed: bool = True):
    """`accelerate launch` of 2 processes (its flags, then the script and its arguments in `args`), in its own
    session: on a failure or hang the launcher and both workers go down together. The body runs while the
    workers do (the one-process side of a comparison); on leaving, the launch must have succeeded (unless
    `must_succeed` is False: then `.returncode` and `.output` are for the caller to check)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), *args]
    launched = subprocess.Popen(cmd, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    try:
        yield launched
        launched.output, _ = launched.communicate(timeout=timeout)
    finally:
        if launched.poll() is None:
            os.killpg(launched.pid, signal.SIGKILL)
            launched.wait()
    assert launched.returncode == 0 or not must_succeed, launched.output[-8000:]


def final_tensors(run_dir: Path) -> dict:
    """Every tensor of `run_dir/final/` as written (published checkpoint layout)."""
    from safetensors.torch import load_file

    files = sorted((run_dir / "final").glob("*.safetensors"))
    assert files, f"{run_dir / 'final'} holds no safetensors"
    out = {}
    for f in files:
        out.update(load_file(str(f)))
    return out
