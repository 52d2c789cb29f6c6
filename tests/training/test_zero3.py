"""DeepSpeed ZeRO-3 on two CPU processes (gloo) equals one process (issue 7, "DeepSpeed ZeRO-3 if it works with
our model"): `accelerate launch --config_file recipes/accelerate/zero3.yaml` with two processes of

- GRPO, 2 steps, gradient checkpointing, KL reference (partitioned too), gradient clipping active (norm ~1.7 > 1,
  done by the engine's step), a token budget at which rank 0 packs more micro-batches than rank 1 (rank 1 pads
  with placeholders and marks the step's boundary on the last of them), a checkpoint after every step;
- SFT of one row: rank 1 has no micro-batch at all;

and checks that the policy is partitioned (rank 0 holds half its elements); that the logged loss and gradient
norm of every step equal the 1-process run's; the final checkpoint tensor by tensor (the engine steps float32
master partitions with torch's AdamW: within 1e-4 after 2 steps), the step-2 checkpoint's reference exactly and
its gathered optimizer state (the plain AdamW layout); and that `--resume` from the 2-process step-1 checkpoint
ends bit for bit where the uninterrupted 2-process run did. Also: `grpo.ref_reset_every` under ZeRO-3 (the
reference equals the policy after each reset, and the 1-process run's reference); a skipped NaN step leaves no
gradient in the partitions; which DeepSpeed configs are refused (process-free).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.training.helpers import accelerate_launch, final_tensors, grpo_recipe, run_train, sft_recipe
from tests.training.test_fsdp import LR, _check_optimizer, _check_tensors, _recipes

pytest.importorskip("deepspeed")

CONFIG = Path(__file__).parents[2] / "recipes" / "accelerate" / "zero3.yaml"


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_zero3_two_processes_equal_one(tmp_path):
    two = _recipes(tmp_path / "two")
    one = _recipes(tmp_path / "one")
    dump, resumed = tmp_path / "dump", tmp_path / "resumed"
    worker = Path(__file__).with_name("fsdp_worker.py")
    with accelerate_launch("--config_file", str(CONFIG), str(worker), str(dump), str(resumed), *map(str, two)) as launched:
        for recipe in one:  # the same in one process, meanwhile
            run_train(recipe)
    assert "ZeRO-3: policy partitioned over 2 processes; rank 0 holds 254,224 of 508,448 parameters" in launched.output

    for name in ("grpo", "sft_one_row"):
        want, got = _metrics(tmp_path / "one" / name), _metrics(tmp_path / "two" / name)
        assert len(want) == len(got) >= 1, name
        for w, g in zip(want, got):
            for key in ("loss", "grad_norm"):
                assert math.isclose(w[key], g[key], rel_tol=1e-4, abs_tol=1e-7), f"{name} step {w['step']} {key}: {g[key]} (2) != {w[key]} (1)"
        _check_tensors(f"{name} final", final_tensors(tmp_path / "one" / name), final_tensors(tmp_path / "two" / name), atol=1e-4)
    assert max(m["grad_norm"] for m in _metrics(tmp_path / "one" / "grpo")) > 1.0, "clipping was not exercised"

    one_dir, two_dir = tmp_path / "one" / "grpo", tmp_path / "two" / "grpo"
    want, got = final_tensors(one_dir), final_tensors(two_dir)
    step2 = Path("checkpoints") / "step-2"
    reference = load_file(str(one_dir / step2 / "reference" / "model.safetensors"))
    assert max((want[k] - reference[k]).abs().max() for k in want) > LR / 2, "the weights did not move"
    _check_tensors("reference", reference, load_file(str(two_dir / step2 / "reference" / "model.safetensors")), atol=0)
    _check_optimizer(*(torch.load(d / step2 / "trainer_state.pt", weights_only=False)["optimizer"] for d in (one_dir, two_dir)))
    _check_tensors("resumed final", got, final_tensors(resumed), atol=0)


@pytest.mark.parametrize("variable, value, message", [
    ("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2", "ZeRO stage 2; r1pipe drives stage 3 only"),
    ("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "cpu", "sets offload_optimizer_device"),
    ("ACCELERATE_DEEPSPEED_CONFIG_FILE", "ds.json", "sets deepspeed_config_file"),
])
def test_deepspeed_settings_r1pipe_does_not_apply_are_refused(tmp_path, monkeypatch, variable, value, message):
    from r1pipe.recipe import load_recipe
    from r1pipe.training import zero3

    recipe = load_recipe(str(sft_recipe(tmp_path, "ds")))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    assert zero3.requested(recipe, 2) and not zero3.requested(recipe, 1)
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError, match=message):
        zero3.requested(recipe, 2)


def test_zero3_refuses_lora_and_a_second_sharding(tmp_path, monkeypatch):
    from r1pipe.recipe import load_recipe
    from r1pipe.training import zero3

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    lora = load_recipe(str(grpo_recipe(tmp_path, "lora", model={"init": "tiny", "lora_rank": 4})))
    with pytest.raises(ValueError, match="ZeRO-3 with LoRA.*ddp.yaml"):
        zero3.requested(lora, 2)
    both = load_recipe(str(sft_recipe(tmp_path, "both", train={"fsdp": True})))
    with pytest.raises(ValueError, match="pick one of FSDP2 and ZeRO-3"):
        zero3.requested(both, 2)


SKIP_CHECK = r'''
import os, torch
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
torch.distributed.init_process_group("gloo")
from r1pipe.model import DeepSeekPolicy
from r1pipe.model.tiny import tiny_config
from r1pipe.training import zero3
from r1pipe.training.fsdp import backward, clip_grad_norm
from r1pipe.training.packing import pack_sequences

def make():
    policy = DeepSeekPolicy(tiny_config("deepseek_v3")).init_weights(seed=3)
    return policy, torch.optim.AdamW(policy.parameters(), lr=1e-2)

batches = pack_sequences([[5, 6, 7, 8]] * 4, [[9, 10, 11]] * 4, 16)
def loss_of(model, b, poisoned):
    loss = -model(b.input_ids, position_ids=b.position_ids, targets=b.targets).sum()
    return loss * float("nan") if poisoned else loss

plain, adam = make()
for poisoned in (False, True, False):  # the plain path: a poisoned step never reaches AdamW
    if not poisoned:
        for b in batches:
            loss_of(plain, b, False).backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
        adam.step()
    adam.zero_grad()

policy, base = make()
engine = zero3.partition(policy, base, max_grad_norm=1.0)
step = zero3.EngineStep(engine, base)
for poisoned in (False, True, False):  # ZeRO-3: the poisoned step's gradients are computed, then dropped
    for i, b in enumerate(batches):
        engine.set_gradient_accumulation_boundary(i == len(batches) - 1)
        backward(None, engine, loss_of(engine, b, poisoned))
    norm = clip_grad_norm(None, engine.parameters(), 1.0)
    assert (norm != norm) == poisoned, norm
    if not poisoned:
        step.step()
    step.zero_grad()
full = dict(zero3.full_state_items(engine))
print("MAXDIFF", max((full[k] - v).abs().max().item() for k, v in plain.state_dict().items() if k in dict(plain.named_parameters())))
'''


def test_zero3_skipped_nonfinite_step_leaves_no_gradients_behind(tmp_path):
    # the stages skip a NaN/inf step by not stepping and zeroing; under ZeRO-3 the gradients live in the engine's
    # partitions: the next step must start from zero there too, as the plain path's AdamW does
    import os
    import subprocess
    import sys

    from tests.training.helpers import free_port, run_env

    proc = subprocess.run([sys.executable, "-c", SKIP_CHECK], env={**run_env(), "PORT": str(free_port())},
                          capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[2])
    assert proc.returncode == 0, proc.stderr[-4000:]
    diff = float(next(ln for ln in proc.stdout.splitlines() if ln.startswith("MAXDIFF")).split()[1])
    assert diff < 1e-5, f"after a skipped step ZeRO-3's weights are {diff:.2e} from the plain run's"


def test_zero3_reference_reset_equals_one_process(tmp_path):
    # grpo.ref_reset_every: each rank copies the policy's partitions (and its gathered small parameters) into
    # the reference's; step 2's forward then sees a reference equal to the policy (KL 0; ~0.02 without the reset)
    def recipe(root: Path) -> Path:
        root.mkdir()
        return grpo_recipe(root, "reset", model={"init": "tiny"}, grpo={"ref_reset_every": 1},
                           train={"max_steps": 2, "micro_batch_tokens": 98, "save_every": 1})

    two, one = recipe(tmp_path / "two"), recipe(tmp_path / "one")
    with accelerate_launch("--config_file", str(CONFIG), "-m", "r1pipe.train", str(two)):
        run_train(one)
    want, got = _metrics(tmp_path / "one" / "reset"), _metrics(tmp_path / "two" / "reset")
    assert abs(want[1]["kl"]) < 1e-9 and abs(got[1]["kl"]) < 1e-9, (want[1]["kl"], got[1]["kl"])
    assert math.isclose(want[1]["loss"], got[1]["loss"], rel_tol=1e-4, abs_tol=1e-7)
    step1, step2 = (tmp_path / "two" / "reset" / "checkpoints" / f"step-{s}" for s in (1, 2))
    policy1 = load_file(str(step1 / "policy" / "model.safetensors"))
    _check_tensors("reference after step 1", policy1, load_file(str(step1 / "reference" / "model.safetensors")), atol=0)
    _check_tensors("reference after step 2", load_file(str(step2 / "policy" / "model.safetensors")),
                   load_file(str(step2 / "reference" / "model.safetensors")), atol=0)
    one_ref = load_file(str(tmp_path / "one" / "reset" / "checkpoints" / "step-2" / "reference" / "model.safetensors"))
    _check_tensors("reference vs 1 process", one_ref, load_file(str(step2 / "reference" / "model.safetensors")), atol=1e-4)
