"""FSDP2 on two CPU processes (gloo) equals one process (issue 7, "Two GPUs: accelerate + FSDP2", proven on
the CPU; the GPU speed-up is not measured here): `accelerate launch --config_file recipes/accelerate/fsdp2.yaml`
with two processes of

- GRPO, 2 steps, gradient checkpointing, KL reference (sharded too), gradient clipping active (norm ~1.7
  > 1), a token budget at which rank 0 packs more micro-batches than rank 1 (rank 1 pads with
  placeholders), a checkpoint after step 1;
- SFT of one row: rank 1 has no micro-batch at all;

and checks that every parameter is a DTensor of which each rank holds a part (the parts add up to the whole);
that the gradients the optimizer steps with (clipped, gathered) are the same on both ranks and equal the
1-process run's within 1e-5 relative at step 1 (step 2 starts from weights that differ by float32 rounding
amplified by Adam: 1e-3); the logged loss per step; the final checkpoint and the step-2 checkpoint's
reference, tensor by tensor, and its gathered optimizer state against the 1-process run's; and that
`--resume` from the 2-process step-1 checkpoint (full tensors, re-sharded on load) ends bit for bit where
the uninterrupted 2-process run did. A second, process-free test: when FSDP2 turns on, and that FSDP1 configs
and LoRA policies are refused; a third: a 2-process launch with `grpo.reference_offload` is refused by name;
a fourth: a checkpoint with a missing shard, which only rank 0 reads (FSDP2 and ZeRO-3), ends the launch
naming the file.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.training.grad_dump import gradients_of
from tests.training.helpers import accelerate_launch, final_tensors, grpo_recipe, sft_recipe

CONFIG = Path(__file__).parents[2] / "recipes" / "accelerate" / "fsdp2.yaml"
LR = 3.0e-3  # grpo_recipe's


def _recipes(root: Path) -> list[Path]:
    root.mkdir()
    # rank 0's prompts are 40 tokens, rank 1's 38, completions mostly 10: 98 tokens hold two of rank 1's
    # samples but one of rank 0's, which packs about twice the micro-batches
    # the GRPO run recomputes its decoder layers in backward (gradient checkpointing inside the per-layer
    # FSDP2 units: the recompute all-gathers the layer again); the SFT run does not
    return [grpo_recipe(root, "grpo", model={"init": "tiny", "gradient_checkpointing": True},
                        train={"max_steps": 2, "micro_batch_tokens": 98, "save_every": 1}),
            sft_recipe(root, "sft_one_row", train={"max_steps": 1, "batch_size": 1, "micro_batch_tokens": 120})]


def test_fsdp2_two_processes_equal_one(tmp_path):
    two = _recipes(tmp_path / "two")
    dump, resumed = tmp_path / "dump", tmp_path / "resumed"
    worker = Path(__file__).with_name("fsdp_worker.py")
    with accelerate_launch("--config_file", str(CONFIG), str(worker), str(dump), str(resumed), *map(str, two)) as launched:
        single = gradients_of(_recipes(tmp_path / "one"))  # the same in this process, meanwhile
    assert "FSDP2: policy sharded over 2 processes" in launched.output

    for name, want_steps in single.items():
        got_steps, other_steps = (torch.load(dump / f"{name}-rank{r}.pt") for r in (0, 1))
        assert len(want_steps) == len(got_steps) == len(other_steps) >= 1, name
        for step, (want, got, other) in enumerate(zip(want_steps, got_steps, other_steps), 1):
            _check_gradients(f"{name} step {step}", want, got, other, tolerance=1e-5 if step == 1 else 1e-3)
        _check_sharded(name, *(torch.load(dump / f"{name}-rank{r}-shards.pt") for r in (0, 1)))

    one, two_dir = tmp_path / "one" / "grpo", tmp_path / "two" / "grpo"
    for want, got in zip(_losses(one), _losses(two_dir), strict=True):
        assert math.isclose(want, got, rel_tol=1e-4, abs_tol=1e-7), f"loss {got} (2 processes) != {want} (1 process)"
    assert sorted(p.name for p in (two_dir / "final").iterdir()) == sorted(p.name for p in (one / "final").iterdir())
    want, got = final_tensors(one), final_tensors(two_dir)
    reference = load_file(str(one / "checkpoints" / "step-2" / "reference" / "model.safetensors"))
    _check_tensors("final", want, got, atol=1e-4)  # 2 Adam steps of lr 3e-3: a wrong update is off by ~lr
    assert max((want[k] - reference[k]).abs().max() for k in want) > LR / 2, "the weights did not move"
    _check_tensors("reference", reference, load_file(str(two_dir / "checkpoints" / "step-2" / "reference" / "model.safetensors")), atol=0)
    _check_optimizer(*(torch.load(d / "checkpoints" / "step-2" / "trainer_state.pt", weights_only=False)["optimizer"]
                       for d in (one, two_dir)))
    _check_tensors("resumed final", got, final_tensors(resumed), atol=0)


def _check_gradients(name, want, got, other, tolerance):
    assert len(want) == len(got) == len(other), name
    assert torch.sqrt(sum((w.double() ** 2).sum() for w in want if w is not None)) > 1e-3, f"{name}: gradient ~0"
    for i, (w, g, o) in enumerate(zip(want, got, other)):
        assert (w is None) == (g is None) == (o is None), f"{name}: parameter {i} has a gradient in only some runs"
        if w is not None:
            assert torch.equal(g, o), f"{name}: parameter {i}: the ranks step with different gradients"
            err = (g - w).abs().max() / w.abs().max().clamp(min=1e-12)
            assert err <= tolerance, f"{name}: parameter {i} {tuple(w.shape)}: off by {err:.2e} relative"


def _check_sharded(name, rank0, rank1):
    """Every optimizer step saw DTensor parameters, each rank holding part of each, together all of it."""
    for step0, step1 in zip(rank0, rank1, strict=True):
        assert all(s is not None for s in step0 + step1), f"{name}: a parameter is not a DTensor"
        for i, ((local0, full), (local1, full1)) in enumerate(zip(step0, step1)):
            assert full == full1 and local0 + local1 == full and local0 < full and local1 < full, (
                f"{name}: parameter {i}: ranks hold {local0} + {local1} of {full} elements")


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _check_tensors(what, want: dict, got: dict, atol: float):
    assert want.keys() == got.keys(), f"{what}: keys differ: {sorted(want.keys() ^ got.keys())[:5]}"
    for key, w in want.items():
        g = got[key]
        assert g.dtype == w.dtype and g.shape == w.shape, f"{what}: {key}: {g.dtype}{tuple(g.shape)} vs {w.dtype}{tuple(w.shape)}"
        err = (g.double() - w.double()).abs().max().item()
        assert err <= atol, f"{what}: {key} off by {err:.2e} (allowed {atol})"


def _check_optimizer(want: dict, got: dict):
    """The gathered AdamW state is the 1-process one: same layout (parameter indices, groups), close values."""
    assert want["param_groups"] == got["param_groups"] and want["state"].keys() == got["state"].keys()
    for i, entries in want["state"].items():
        for key, w in entries.items():
            g = got["state"][i][key]
            assert type(g) is type(w) and torch.allclose(g, w, rtol=1e-3, atol=1e-7), f"optimizer state {i}.{key} differs"


def test_reference_offload_with_fsdp_is_refused_naming_why(tmp_path):
    # a sharded reference is spread over the ranks already: streaming it from host memory too is refused
    recipe = grpo_recipe(tmp_path, "offload", model={"init": "tiny"}, grpo={"reference_offload": True})
    with accelerate_launch("--config_file", str(CONFIG), "-m", "r1pipe.train", str(recipe), must_succeed=False) as launched:
        pass
    assert launched.returncode != 0
    assert "grpo.reference_offload with FSDP (FSDP2 or ZeRO-3): the reference is already sharded" in launched.output, launched.output[-3000:]


def test_when_fsdp2_is_on_and_what_it_refuses(tmp_path, monkeypatch):
    """On with more than one process when the launcher (fsdp2.yaml) or the recipe asks; FSDP1 configs and
    LoRA policies are refused with a message saying what to use instead."""
    from r1pipe.recipe import load_recipe
    from r1pipe.training.fsdp import requested

    plain = load_recipe(str(sft_recipe(tmp_path, "plain")))
    lora = load_recipe(str(sft_recipe(tmp_path, "lora", model={"init": "tiny", "lora_rank": 4})))
    on = load_recipe(str(sft_recipe(tmp_path, "on", train={"fsdp": True})))
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert not requested(plain, 2) and requested(on, 2) and not requested(on, 1)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert requested(plain, 2)
    with pytest.raises(ValueError, match="LoRA.*ddp.yaml"):
        requested(lora, 2)
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ValueError, match="FSDP2 only.*fsdp2.yaml"):
        requested(plain, 2)


@pytest.mark.parametrize("launch_config", ["fsdp2.yaml", "zero3.yaml"])
def test_checkpoint_read_by_rank0_alone_names_a_missing_shard(tmp_path, launch_config):
    # sharded (FSDP2, ZeRO-3), only rank 0 reads the checkpoint and the others wait for its broadcast: its error
    # must end the whole launch (no rank left waiting) and name the missing file
    from r1pipe.model import DeepSeekPolicy
    from r1pipe.model.tiny import tiny_config
    from r1pipe.training.setup import load_tokenizer

    tokenizer = load_tokenizer(None)
    policy = DeepSeekPolicy.from_config(tiny_config("deepseek_v3", vocab_size=len(tokenizer)), seed=0)
    policy.save_pretrained(tmp_path / "ckpt", tokenizer=tokenizer, max_shard_bytes=300_000)
    shards = sorted((tmp_path / "ckpt").glob("model-*.safetensors"))
    shards[1].unlink()
    recipe = grpo_recipe(tmp_path, "missing", model={"init": None, "path": str(tmp_path / "ckpt")})
    if launch_config == "zero3.yaml":
        pytest.importorskip("deepspeed")
    with accelerate_launch("--config_file", str(CONFIG.parent / launch_config), "-m", "r1pipe.train", str(recipe),
                           timeout=200, must_succeed=False) as launched:
        pass
    assert launched.returncode != 0
    assert shards[1].name in launched.output, launched.output[-3000:]
