"""grpo.reference_offload (r1pipe.training.offload): the reference's decoder layers live in host memory
and are copied in layer by layer. On the CPU the copies are real copies too, so these tests see the
hooks do their job: each layer computes on a fresh copy (not its host tensors), the host tensors are
back after the forward, every layer crosses once per step, and the numbers equal a resident reference.
The CUDA streams are exercised on the device by scripts/bench_grpo_step.py (impl r1pipe-offload).
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from r1pipe.model import DeepSeekPolicy
from r1pipe.model.tiny import tiny_config
from r1pipe.recipe import RecipeError, load_recipe
from r1pipe.stages.grpo import joined_reference_logprobs
from r1pipe.training.offload import is_offloaded, offload_layers
from r1pipe.training.packing import pack_sequences
from r1pipe.training.setup import frozen_copy
from tests.training.helpers import grpo_recipe


def _batches(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, vocab, (int(n),), generator=g).tolist() for n in torch.randint(3, 9, (7,), generator=g)]
    completions = [torch.randint(1, vocab, (int(n),), generator=g).tolist() for n in torch.randint(1, 12, (7,), generator=g)]
    return pack_sequences(prompts, completions, token_budget=40)


def test_offloaded_reference_computes_on_streamed_copies_and_matches_a_resident_one():
    policy = DeepSeekPolicy(tiny_config("deepseek_v3")).init_weights(seed=3)
    batches = _batches(policy.config.vocab_size)
    assert len(batches) >= 3  # the joined pass really joins several micro-batches
    resident = frozen_copy(policy)
    with torch.no_grad():
        expected = [b.unpack(resident(b.input_ids, position_ids=b.position_ids, targets=b.targets)) for b in batches]

    reference = frozen_copy(policy)
    offload = offload_layers(reference, "cpu")
    assert is_offloaded(reference) and not is_offloaded(resident)
    host_ptrs = [{p.data_ptr() for p in layer.parameters()} for layer in reference.model.layers]
    seen = []  # per layer forward: did it compute on copies, not on its host tensors?
    for i, layer in enumerate(reference.model.layers):
        layer.mlp.register_forward_pre_hook(
            lambda m, a, i=i, layer=layer: seen.append(
                (i, not ({p.data_ptr() for p in layer.parameters()} & host_ptrs[i]))))
    stages = []
    original_stage = offload._stage
    offload._stage = lambda i: (stages.append(i), original_stage(i))[1]

    with torch.no_grad():
        got = joined_reference_logprobs(reference, batches)
    n_layers = len(reference.model.layers)
    assert seen == [(i, True) for i in range(n_layers)], seen
    assert stages == list(range(n_layers))  # one pass for all micro-batches: each layer copied once
    assert [{p.data_ptr() for p in layer.parameters()} for layer in reference.model.layers] == host_ptrs
    assert not offload.staged  # nothing left behind on the device between steps
    for a, b in zip(got, expected):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
    assert max(a.abs().max().item() for a in got) > 1.0  # real log-probs, not zeros


def test_offload_refuses_a_trainable_model():
    policy = DeepSeekPolicy(tiny_config("deepseek_v3")).init_weights(seed=3)
    with pytest.raises(ValueError, match="frozen"):
        offload_layers(policy, "cpu")


def _grpo_run(tmp_path, name, offload: bool):
    from r1pipe.train import main

    # several micro-batches a step, and a reference reset (a load into the offloaded host tensors)
    main([str(grpo_recipe(tmp_path, name, train={"max_steps": 3, "micro_batch_tokens": 96},
                          grpo={"reference_offload": offload, "ref_reset_every": 2}))])
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    weights = {}
    for f in sorted((tmp_path / name / "final").glob("*.safetensors")):
        weights.update(load_file(f))
    return rows, weights


def test_grpo_with_an_offloaded_reference_matches_a_resident_reference(tmp_path):
    off, off_w = _grpo_run(tmp_path, "offload", True)
    res, res_w = _grpo_run(tmp_path, "resident", False)
    assert len(off) == len(res) == 3
    for a, b in zip(off, res):
        for key in ("loss", "kl", "grad_norm", "entropy"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), (a["step"], key, a[key], b[key])
    assert off[1]["kl"] > 0  # after one update the policy has left the reference: the KL term is live
    worst = max((off_w[k].float() - res_w[k].float()).abs().max().item() for k in off_w)
    assert off_w.keys() == res_w.keys() and worst < 1e-5


def test_reference_offload_without_kl_is_a_recipe_error(tmp_path):
    path = grpo_recipe(tmp_path, "nokl", grpo={"beta": 0.0, "reference_offload": True})
    with pytest.raises(RecipeError, match="reference_offload"):
        load_recipe(path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the copy stream and pinned memory need a GPU")
def test_offloaded_reference_on_cuda_matches_a_resident_one():
    # the CUDA side (pinned host tensors, a copy stream one layer ahead, record_stream) on a tiny bf16 policy;
    # at the V2-Lite shape the GPU benchmark compares it with the policy's own log-probs (r1pipe-offload)
    policy = DeepSeekPolicy(tiny_config("deepseek_v3")).init_weights(seed=3).to("cuda", torch.bfloat16)
    batches = [b.to("cuda") for b in _batches(policy.config.vocab_size)]
    resident = frozen_copy(policy)
    reference = frozen_copy(policy)
    offload_layers(reference, "cuda")
    assert all(p.device.type == "cpu" and p.is_pinned() for layer in reference.model.layers for p in layer.parameters())
    with torch.no_grad():
        expected = [b.unpack(resident(b.input_ids, position_ids=b.position_ids, targets=b.targets)) for b in batches]
        got = joined_reference_logprobs(reference, batches)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=5e-2, rtol=0)  # bf16; the joined pass takes other kernel tiles


def test_reference_offload_with_lora_is_refused_naming_why(tmp_path):
    # a LoRA policy's reference is its own base weights: there is no second copy to offload
    from r1pipe.stages import grpo

    path = grpo_recipe(tmp_path, "lora", model={"init": "tiny", "lora_rank": 4}, grpo={"reference_offload": True})
    with pytest.raises(ValueError, match="reference_offload with LoRA.*no second copy"):
        grpo.run(load_recipe(path), max_steps=1)
