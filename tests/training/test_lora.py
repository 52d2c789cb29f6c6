"""LoRA through peft (issue 4, "Efficiency and adapters"): only adapters train, the rollout engine and the saved
files get merged weights, the reference is the base with adapters off, and vLLM's logprobs after syncing the
merged weights agree with the trainer's as well as a fresh engine load does.

Oracles: a plain DeepSeekPolicy and transformers' DeepseekV3ForCausalLM loading the merged weights, peft's own
PeftModel on transformers' model with our saved adapter, an uninterrupted run (resume), a real vLLM engine.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from r1pipe.model import DeepSeekPolicy
from r1pipe.model.tiny import tiny_config
from r1pipe.recipe import ModelSection
from r1pipe.training.lora import apply_lora, base_reference, is_lora, merged_state_items
from r1pipe.training.setup import load_policy_for

# every kind of target: MLA projections (kv_a_proj_with_mqa is fused with q_a_proj in vLLM), the dense and
# shared-expert SwiGLU nn.Linear, and the fused routed experts [E, 2I, H] / [E, H, I]
ALL_TARGETS = ["q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "shared_experts.down_proj", "experts"]
PORTABLE_TARGETS = ["q_b_proj", "kv_b_proj", "o_proj", "experts"]  # what peft on transformers also reads as written


def _policy(vocab_size: int = 100, seed: int = 0, **overrides) -> DeepSeekPolicy:
    """A tiny policy with weights big enough for peaked next-token distributions and non-uniform routing."""
    policy = DeepSeekPolicy.from_config(tiny_config(vocab_size=vocab_size, **overrides), seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.08)
        for moe in policy.moe_layers():
            bias = moe.gate.e_score_correction_bias  # None for V2's softmax gating
            if bias is not None:
                bias.copy_(torch.randn(bias.shape, generator=g) * 0.05)
    return policy


def _randomize_adapters(policy, seed: int = 1, std: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted((n, p) for n, p in policy.named_parameters() if p.requires_grad):
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _ids(vocab_size: int = 100, shape=(2, 11), seed: int = 3) -> torch.Tensor:
    return torch.randint(3, vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def _base_state(policy) -> dict:
    return {k: v.clone() for k, v in policy.state_dict().items() if ".lora_" not in k}


def test_merged_weights_are_the_adapted_model():
    policy = _policy(moe_intermediate_size=24)  # 2I = 48 != H = 64: a transposed expert delta could not fit
    ids = _ids()
    base_logits = policy(ids).logits
    plain_state = {k: v.clone() for k, v in policy.state_dict().items()}
    lora = apply_lora(policy, rank=4, alpha=8.0, targets=ALL_TARGETS)
    _randomize_adapters(lora)
    before = {k: v.clone() for k, v in lora.state_dict().items()}

    merged = dict(merged_state_items(lora))
    assert list(merged) == list(plain_state)  # the plain policy's keys, in its order
    assert all(merged[k].shape == plain_state[k].shape and merged[k].dtype == plain_state[k].dtype for k in merged)
    plain = DeepSeekPolicy(lora.config)
    plain.load_state_dict(merged)
    lora_logits = lora(ids).logits
    torch.testing.assert_close(plain(ids).logits, lora_logits, atol=1e-5, rtol=0)
    assert (lora_logits - base_logits).abs().max() > 0.5  # the adapters matter, so the check above can fail

    adapted = ["model.layers.0.self_attn.kv_a_proj_with_mqa.weight", "model.layers.0.mlp.gate_proj.weight",
               "model.layers.1.mlp.shared_experts.gate_proj.weight", "model.layers.1.mlp.shared_experts.down_proj.weight",
               "model.layers.2.mlp.experts.gate_up_proj", "model.layers.2.mlp.experts.down_proj"]
    untouched = ["model.layers.0.self_attn.q_a_proj.weight", "model.layers.0.mlp.down_proj.weight",
                 "model.layers.1.mlp.gate.weight", "model.layers.1.mlp.gate.e_score_correction_bias", "lm_head.weight"]
    assert all(not torch.allclose(merged[k], plain_state[k]) for k in adapted)
    assert all(torch.equal(merged[k], plain_state[k]) for k in untouched)
    assert all(torch.equal(before[k], v) for k, v in lora.state_dict().items())  # merging mutated nothing


def test_only_adapters_train_and_the_reference_is_the_base():
    policy = _policy()
    ids = _ids()
    base_logits = policy(ids).logits.detach()
    lora = apply_lora(policy, rank=4, alpha=8.0, targets=ALL_TARGETS)
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert any("mlp.experts" in n for n in trainable)
    base = _base_state(lora)
    targets = torch.roll(ids, -1, dims=1)
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=2e-2)
    for _ in range(3):
        loss = -lora.token_logprobs(ids, targets).mean()
        loss.backward()
        assert all(p.grad is None for n, p in lora.named_parameters() if n not in trainable)
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(base[k], v) for k, v in _base_state(lora).items())  # only adapters moved
    trained_logits = lora(ids).logits.detach()
    assert (trained_logits - base_logits).abs().max() > 0.1

    reference = base_reference(lora)
    lora.train()
    loads = [m.last_expert_load.clone() for m in lora.moe_layers()]
    torch.testing.assert_close(reference(ids).logits, base_logits, atol=1e-6, rtol=0)
    assert lora.training and [n for n, p in lora.named_parameters() if p.requires_grad] == trainable
    assert all(torch.equal(a, m.last_expert_load) for a, m in zip(loads, lora.moe_layers()))
    torch.testing.assert_close(lora(ids).logits, trained_logits, atol=0, rtol=0)  # adapters back on
    with pytest.raises(ValueError, match="ref_reset_every"):
        base_reference(lora, ref_reset_every=5)


def test_saved_policy_is_a_plain_merged_checkpoint_and_the_adapter_loads_in_peft(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    policy = _policy()
    policy.save_pretrained(tmp_path / "base")
    lora = apply_lora(policy, rank=4, alpha=8.0, targets=PORTABLE_TARGETS)
    _randomize_adapters(lora)
    ids = _ids()
    want = lora(ids).logits.detach()
    out = lora.save_pretrained(tmp_path / "final")

    ours = DeepSeekPolicy.from_pretrained(out)
    assert type(ours) is DeepSeekPolicy
    torch.testing.assert_close(ours(ids).logits, want, atol=1e-5, rtol=0)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    torch.testing.assert_close(hf(ids).logits, want, atol=1e-4, rtol=0)
    hf_base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32).eval()
    with torch.no_grad():
        assert (hf_base(ids).logits - want).abs().max() > 0.5
    with_adapter = PeftModel.from_pretrained(hf_base, str(out / "lora")).eval()
    with torch.no_grad():
        torch.testing.assert_close(with_adapter(ids).logits, want, atol=1e-4, rtol=0)


def test_resume_restores_base_and_adapter_exactly_and_a_new_stage_starts_fresh_adapters(tmp_path):
    lora = apply_lora(_policy(), rank=4, alpha=8.0, targets=ALL_TARGETS)
    _randomize_adapters(lora)
    ckpt = lora.save_pretrained(tmp_path / "run" / "checkpoints" / "step-3" / "policy")
    section = dict(lora_rank=4, lora_alpha=8.0, lora_targets=ALL_TARGETS)

    resumed, _ = load_policy_for(ModelSection(path=str(ckpt), **section), seed=0)
    assert is_lora(resumed)
    want, got = lora.state_dict(), resumed.state_dict()
    assert list(want) == list(got)
    assert all(torch.equal(want[k], got[k]) for k in want)  # base and adapters, bit for bit
    with pytest.raises(ValueError, match="lora_alpha"):
        load_policy_for(ModelSection(path=str(ckpt), **{**section, "lora_alpha": 4.0}), seed=0)

    final = lora.save_pretrained(tmp_path / "run" / "final")
    fresh, _ = load_policy_for(ModelSection(path=str(final), **section), seed=0)
    merged, fresh_merged = dict(merged_state_items(lora)), dict(merged_state_items(fresh))
    assert all(torch.equal(merged[k], fresh_merged[k]) for k in merged)  # new adapters start at B = 0
    assert all(not p.any() for n, p in fresh.named_parameters() if ".lora_B." in n)


def test_target_names_mean_what_they_say():
    # peft renames gate_proj/up_proj/down_proj to the routed experts for transformers-v5 MoE model types;
    # ours stay the dense / shared-expert nn.Linear
    from peft.tuners.lora import LoraLayer

    lora = apply_lora(_policy(), rank=2, alpha=4.0, targets=["down_proj"])
    adapted = sorted(n for n, m in lora.named_modules() if isinstance(m, LoraLayer))
    assert adapted == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.shared_experts.down_proj",
                       "model.layers.2.mlp.shared_experts.down_proj"]
    with pytest.raises(ValueError, match="'lm_head' is not a LoRA target"):
        apply_lora(_policy(), rank=2, alpha=4.0, targets=["lm_head"])
    with pytest.raises(ValueError, match="'q_a_proj' matches no projection"):
        apply_lora(_policy(family="deepseek_v2"), rank=2, alpha=4.0, targets=["q_a_proj"])


DIGIT_REWARD = "def digit_share(prompts, completions, **columns):\n    return [sum(c.isdigit() for c in t) / 10 for t in completions]\n"


def _grpo_recipe(tmp_path, name: str):
    """A tiny LoRA GRPO recipe (torch rollouts, a dense plug-in reward so the adapters get a signal)."""
    import yaml

    from r1pipe.recipe import load_recipe

    (tmp_path / "digit_reward.py").write_text(DIGIT_REWARD)
    recipe = {
        "stage": "grpo", "name": name, "output_dir": str(tmp_path / name),
        "model": {"init": "tiny", "lora_rank": 4, "lora_alpha": 16.0, "lora_targets": PORTABLE_TARGETS},
        "data": {"train": "tiny_arith:train?n=16", "eval": None},
        "rewards": [{"name": f"{tmp_path / 'digit_reward.py'}:digit_share", "isolation": "inline"}],
        "rollout": {"engine": "torch", "max_tokens": 10, "max_model_len": 128},
        "grpo": {"num_generations": 4, "beta": 0.01},
        "optim": {"lr": 1e-2},
        "train": {"max_steps": 2, "prompts_per_step": 4, "micro_batch_tokens": 512, "save_every": 0, "seed": 0},
    }
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(recipe))
    return load_recipe(tmp_path / f"{name}.yaml")


def _final_tensors(run_dir) -> dict:
    from safetensors.torch import load_file

    return {k: v for f in sorted((run_dir / "final").glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def test_grpo_with_lora_trains_adapters_against_the_base_and_resumes_exactly(tmp_path):
    from r1pipe.data.tokenizer import load_tiny_tokenizer
    from r1pipe.model.checkpoint import to_checkpoint_tensors
    from r1pipe.stages import grpo

    final = grpo.run(_grpo_recipe(tmp_path, "whole"))
    grpo.run(_grpo_recipe(tmp_path, "cut"), max_steps=1)  # ends with checkpoints/step-1
    grpo.run(_grpo_recipe(tmp_path, "cut"), resume=True)

    want, got = _final_tensors(tmp_path / "whole"), _final_tensors(tmp_path / "cut")
    assert sorted(want) == sorted(got) and all(torch.equal(want[k], got[k]) for k in want)
    assert (final / "lora" / "adapter_model.safetensors").is_file()
    assert type(DeepSeekPolicy.from_pretrained(final)) is DeepSeekPolicy
    rows = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["kl"] == 0 and rows[-1]["kl"] > 0  # pi_ref = the base: the adapters moved away from it

    config = tiny_config(vocab_size=len(load_tiny_tokenizer()))
    init = dict(to_checkpoint_tensors(DeepSeekPolicy.from_config(config, seed=0).state_dict()))
    changed = {k for k in want if not torch.equal(want[k], init[k])}
    targeted = ("q_b_proj", "kv_b_proj", "o_proj", "mlp.experts.")
    assert changed and all(any(t in k for t in targeted) or k.endswith("e_score_correction_bias") for k in changed)
    assert any("mlp.experts." in k for k in changed)


# ---- the rollout engine gets the merged weights (real vLLM) ----------------------------------------------

N_SAMPLES, MAX_TOKENS, SEED = 4, 16, 1234
PROMPTS = ("12+7=", "3*4-1=", "<think>", "What is 9*9?")


@torch.no_grad()
def _max_logprob_diff(model, rollouts) -> float:
    """max |vLLM's logprob - the trainer's recomputed one| over every sampled token (trainer's log-prob path)."""
    worst = 0.0
    for k in range(rollouts.num_samples):
        prompt, ids = rollouts.prompt_token_ids[rollouts.prompt_index[k]], rollouts.completion_ids[k]
        seq = torch.tensor([prompt + ids])
        targets = torch.full_like(seq, -100)
        targets[0, len(prompt) - 1 : -1] = torch.tensor(ids)
        ours = model.token_logprobs(seq, targets)[0, len(prompt) - 1 : -1]
        worst = max(worst, (ours - torch.tensor(rollouts.logprobs[k])).abs().max().item())
    return worst


@pytest.mark.vllm
def test_vllm_samples_from_the_merged_weights_after_sync(tmp_path):
    pytest.importorskip("vllm")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from r1pipe.data.tokenizer import load_tiny_tokenizer
    from r1pipe.rollout.vllm_engine import VLLMRolloutEngine

    tok = load_tiny_tokenizer()
    policy = _policy(vocab_size=len(tok))
    base = DeepSeekPolicy(policy.config)
    base.load_state_dict(policy.state_dict())
    lora = apply_lora(policy, rank=4, alpha=8.0, targets=ALL_TARGETS)
    # train the adapters a few steps (NLL of fixed sequences through the trainer's log-prob path)
    ids = _ids(len(tok), shape=(4, 24))
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=3e-2)
    for _ in range(4):
        (-lora.token_logprobs(ids, torch.roll(ids, -1, dims=1)).mean()).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(p.abs().max() > 1e-3 for n, p in lora.named_parameters() if ".lora_B." in n)
    lora.eval()

    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    engine = VLLMRolloutEngine(lora.save_pretrained(tmp_path / "merged", tokenizer=tok), max_model_len=128,
                               seed=0, max_num_seqs=32, cpu_kv_cache_bytes=64 << 20)

    def sample():
        return engine.generate(prompts, n=N_SAMPLES, max_tokens=MAX_TOKENS, seed=SEED)

    fresh = sample()  # a fresh engine load of the merged weights: the yardstick
    d_fresh = _max_logprob_diff(lora, fresh)
    # a real update each way: back to the base weights, then the merged ones again through the sync
    engine.sync_weights(base.state_dict().items())
    on_base = sample()
    d_base, d_base_vs_lora = _max_logprob_diff(base, on_base), _max_logprob_diff(lora, on_base)
    stats = engine.sync_weights(merged_state_items(lora))
    synced = sample()
    d_sync, d_sync_vs_base = _max_logprob_diff(lora, synced), _max_logprob_diff(base, synced)
    print(f"\nvLLM vs trainer (LoRA, adapters on): fresh load {d_fresh:.3g}, after merged sync {d_sync:.3g} "
          f"(vs un-adapted {d_sync_vs_base:.3g}); after base sync {d_base:.3g} (vs LoRA {d_base_vs_lora:.3g}); "
          f"sync {stats.seconds * 1e3:.0f} ms, {stats.tensors} tensors")
    assert d_sync <= 2 * d_fresh
    assert synced.completion_ids == fresh.completion_ids  # same seeds, same weights, same samples
    tolerance = 2 * d_fresh
    assert d_sync_vs_base > max(0.2, 20 * tolerance)  # the adapted model differs clearly from the base
    assert d_base_vs_lora > max(0.2, 20 * tolerance)
    assert d_base < d_base_vs_lora / 1000  # in between, the engine really held the base weights
