"""Trainer-side half of the weight sync (no engine): buckets of whole layers, expert packing that
matches transformers' fused layout, and errors that name the offending keys."""

from __future__ import annotations

import pytest
import torch

from r1pipe.rollout.weight_sync import checkpoint_keys, group_of, pack_experts, plan_buckets


@pytest.fixture(scope="module")
def published(tiny_checkpoint) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(tiny_checkpoint / "model.safetensors"))


@pytest.fixture(scope="module")
def expected(tiny_checkpoint) -> set[str]:
    return checkpoint_keys(tiny_checkpoint, num_hidden_layers=2)


def test_group_of_names_layers_and_top_level_modules():
    assert group_of("model.layers.12.mlp.experts.3.gate_proj.weight") == "model.layers.12"
    assert group_of("model.embed_tokens.weight") == "model.embed_tokens"
    assert group_of("lm_head.weight") == "lm_head"


def test_packed_experts_equal_transformers_fused_layout(tiny_checkpoint, published):
    from transformers import DeepseekV3ForCausalLM

    fused = DeepseekV3ForCausalLM.from_pretrained(str(tiny_checkpoint), dtype=torch.float32).state_dict()
    layer1 = {k: v for k, v in published.items() if group_of(k) == "model.layers.1"}
    packed = pack_experts(layer1)
    for name in ("gate_up_proj", "down_proj"):
        key = f"model.layers.1.mlp.experts.{name}"
        torch.testing.assert_close(packed[key], fused[key], rtol=0, atol=0)
    assert not any(".experts.0." in k for k in packed)
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in packed


def test_buckets_hold_whole_layers_and_every_tensor_once(published, expected):
    buckets = plan_buckets(published.items(), expected, bucket_bytes=1)  # one group per bucket
    groups_per_bucket = [{group_of(k) for k, _ in b} for b in buckets]
    assert all(len(g) == 1 for g in groups_per_bucket)
    assert len(buckets) == len({group_of(k) for k in published})
    one_big = plan_buckets(published.items(), expected, bucket_bytes=1 << 40)
    assert len(one_big) == 1
    sent = sum(t.numel() for _, t in one_big[0])
    assert sent == sum(t.numel() for t in published.values())


def test_partial_layer_is_refused_with_the_missing_key(published, expected):
    partial = {k: v for k, v in published.items() if k != "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"}
    with pytest.raises(ValueError, match="kv_a_proj_with_mqa"):
        plan_buckets(partial.items(), expected, bucket_bytes=1 << 30)


def test_unknown_key_is_refused_by_name(published, expected):
    bad = dict(published)
    bad["model.layers.0.mlp.experts.w13_weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match="w13_weight"):
        plan_buckets(bad.items(), expected, bucket_bytes=1 << 30)


def test_mtp_layers_are_not_expected(tmp_path):
    # DeepSeek-V3 checkpoints append MTP modules as layer num_hidden_layers; vLLM skips them.
    from safetensors.torch import save_file

    names = ["model.layers.0.input_layernorm.weight", "model.layers.1.input_layernorm.weight", "lm_head.weight"]
    save_file({n: torch.zeros(2) for n in names + ["model.layers.2.eh_proj.weight"]}, str(tmp_path / "m.safetensors"))
    assert checkpoint_keys(tmp_path, num_hidden_layers=2) == set(names)


def test_missing_checkpoint_dir_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        checkpoint_keys(tmp_path, num_hidden_layers=2)
