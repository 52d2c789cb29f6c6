"""Policy behaviour beyond parity: packing, padding, the decode cache, balancing, bad input."""
import json

import pytest
import torch

from r1pipe.model import CheckpointError, ConfigError, DeepSeekConfig, DeepSeekPolicy, LatentCache
from r1pipe.model.tiny import tiny_config

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def policy():
    return DeepSeekPolicy.from_config(tiny_config(), seed=0).eval()


def test_packed_row_equals_separate_sequences(policy):
    a, b = torch.randint(0, 128, (1, 7)), torch.randint(0, 128, (1, 5))
    packed = torch.cat([a, b], dim=1)
    pos = torch.cat([torch.arange(7), torch.arange(5)])[None]
    with torch.no_grad():
        got = policy(packed, position_ids=pos).logits
        ref = torch.cat([policy(a).logits, policy(b).logits], dim=1)
        crossing = policy(packed).logits  # without restarts b would attend to a
    assert (got - ref).abs().max().item() <= 1e-5
    assert (crossing[:, 7:] - ref[:, 7:]).abs().max().item() > 1e-3


def test_left_padding_matches_unpadded(policy):
    seq = torch.randint(3, 128, (1, 6))
    padded = torch.cat([torch.full((1, 3), 2), seq], dim=1)
    mask = torch.cat([torch.zeros(1, 3), torch.ones(1, 6)], dim=1).long()
    with torch.no_grad():
        ref = policy(seq).logits
        got = policy(padded, attention_mask=mask).logits[:, 3:]
    assert (got - ref).abs().max().item() <= 1e-5


def test_latent_cache_decode_equals_full_forward(policy):
    ids = torch.randint(3, 128, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # row 1 is left-padded
    with torch.no_grad():
        full = policy(ids, attention_mask=mask).logits
        cache = LatentCache(policy.config.num_hidden_layers)
        steps = [policy(ids[:, :5], attention_mask=mask[:, :5], cache=cache).logits]
        for t in range(5, 9):
            steps.append(policy(ids[:, t : t + 1], attention_mask=mask[:, t : t + 1], cache=cache).logits)
    got = torch.cat(steps, dim=1)
    assert cache.length == 9
    assert (got[0] - full[0]).abs().max().item() <= 1e-5
    assert (got[1, 2:] - full[1, 2:]).abs().max().item() <= 1e-5


def test_bias_balancing_reduces_imbalance():
    config = tiny_config(n_routed_experts=8, n_group=1, topk_group=1, num_experts_per_tok=2)
    policy = DeepSeekPolicy.from_config(config, seed=0).eval()
    moe = policy.moe_layers()[0]
    with torch.no_grad():  # skew the router: experts 0 and 1 win for most tokens
        moe.gate.weight[:2] += 0.5 * torch.randn(2, 64).sign()
    x = torch.randn(2048, 64, generator=torch.Generator().manual_seed(0))
    x = x + 0.3 * moe.gate.weight[:2].sum(0)
    imbalance = []
    for _ in range(120):
        with torch.no_grad():
            moe(x)
        load = moe.last_expert_load
        imbalance.append((load.max() / load.mean()).item())
        moe.update_bias(gamma=0.003)
    assert imbalance[0] > 2.0
    assert max(imbalance[-20:]) < 1.4  # from > 2x the mean load to within 40% of it
    assert moe.gate.e_score_correction_bias.requires_grad is False


def test_sequence_balance_loss_is_one_when_uniform():
    from r1pipe.model.moe import sequence_balance_loss

    config = tiny_config(seq_aux_loss_alpha=1.0, n_routed_experts=4, n_group=1, num_experts_per_tok=2)
    scores = torch.full((1, 4, 4), 0.5)
    topk = torch.tensor([[[0, 1], [2, 3], [0, 1], [2, 3]]])
    assert sequence_balance_loss(scores, topk, config).item() == pytest.approx(1.0)
    skewed = torch.tensor([[[0, 1]] * 4])
    peaked = torch.tensor([[[1.0, 1.0, 0.0, 0.0]] * 4])  # all affinity on the two chosen experts
    assert sequence_balance_loss(peaked, skewed, config).item() == pytest.approx(2.0)


def test_unsupported_model_type_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="model_type 'llama'.*deepseek_v3"):
        DeepSeekConfig.from_file(tmp_path)


def test_missing_shard_is_named(tmp_path):
    policy = DeepSeekPolicy.from_config(tiny_config(), seed=0)
    policy.save_pretrained(tmp_path / "ckpt", max_shard_bytes=300_000)
    shards = sorted((tmp_path / "ckpt").glob("model-*.safetensors"))
    shards[1].unlink()
    with pytest.raises(CheckpointError, match=shards[1].name):
        DeepSeekPolicy.from_pretrained(tmp_path / "ckpt")


def test_save_is_atomic_and_roundtrips(tmp_path, policy):
    target = tmp_path / "ckpt"
    policy.save_pretrained(target)
    policy.save_pretrained(target)  # overwrite in place
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp dirs left behind
    again = DeepSeekPolicy.from_pretrained(target)
    for (k, a), (_, b) in zip(policy.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


def test_absorbed_latent_decode_equals_expanded_keys(policy, monkeypatch):
    """The decode step in latent space (kv_b_proj folded into query and output) against expanding every
    cached latent into per-head keys and values: the same logits, step by step, with left padding."""
    from r1pipe.model import mla

    ids = torch.randint(3, 128, (3, 10))
    mask = torch.ones_like(ids)
    mask[2, :3] = 0

    def decode(absorb: bool) -> torch.Tensor:
        monkeypatch.setattr(mla, "ABSORB_DECODE", absorb)
        cache = LatentCache(policy.config.num_hidden_layers)
        with torch.no_grad():
            policy(ids[:, :4], attention_mask=mask[:, :4], cache=cache)
            return torch.cat([policy(ids[:, t : t + 1], attention_mask=mask[:, t : t + 1], cache=cache).logits
                              for t in range(4, 10)], dim=1)

    absorbed, expanded = decode(True), decode(False)
    assert expanded.abs().max() > 0.1  # logits of a real model, not zeros
    assert (absorbed - expanded).abs().max().item() <= 1e-5


def test_expert_load_counts_each_unmasked_choice_once():
    # histc over [-0.5, E - 0.5) with masked tokens moved to -1 (no host sync, CUDA-graph safe) must count
    # what bincount of the chosen experts of the real tokens counts
    config = tiny_config(n_routed_experts=8, n_group=1, topk_group=1, num_experts_per_tok=2)
    moe = DeepSeekPolicy.from_config(config, seed=0).eval().moe_layers()[0]
    x = torch.randn(37, 64, generator=torch.Generator().manual_seed(1))
    mask = torch.rand(37, generator=torch.Generator().manual_seed(2)) < 0.6
    with torch.no_grad():
        ids = moe.gate(x)[0]
        moe(x)
        assert torch.equal(moe.last_expert_load, torch.bincount(ids.reshape(-1), minlength=8).float())
        moe(x, token_mask=mask)
        assert torch.equal(moe.last_expert_load, torch.bincount(ids[mask].reshape(-1), minlength=8).float())
    assert 0 < mask.sum() < 37 and moe.last_expert_load.sum() == 2 * mask.sum()


def test_bf16_policy_keeps_float32_buffers_through_a_checkpoint(tmp_path):
    # a fresh bf16 policy holds its buffers as a loaded checkpoint does (float32 rope frequencies, balancing
    # bias and loads): a resumed run continues the same model; a blanket .to(bf16) would round them
    policy = DeepSeekPolicy.from_config(tiny_config("deepseek_v3", vocab_size=64), seed=1, dtype=torch.bfloat16)
    policy.moe_layers()[0].gate.e_score_correction_bias.add_(1e-3 * torch.arange(policy.config.n_routed_experts))
    assert {p.dtype for p in policy.parameters()} == {torch.bfloat16}
    assert {b.dtype for b in policy.buffers()} == {torch.float32}
    loaded = DeepSeekPolicy.from_pretrained(policy.save_pretrained(tmp_path / "ckpt"))
    for name, b in policy.named_buffers():
        assert torch.equal(loaded.get_buffer(name), b), name
    for name, p in policy.named_parameters():
        assert torch.equal(loaded.get_parameter(name), p), name
    ids = torch.randint(0, 64, (1, 12))
    assert torch.equal(loaded(ids).logits, policy(ids).logits)
