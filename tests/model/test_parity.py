"""DeepSeekPolicy equals transformers' DeepseekV3/V2ForCausalLM: logits, routing, gradients, checkpoints."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from r1pipe.model import DeepSeekPolicy
from tests.model.conftest import make_hf_model

torch.set_num_threads(1)


def test_logits_equal_transformers_on_its_checkpoint(family, tmp_path):
    hf = make_hf_model(family)
    hf.save_pretrained(tmp_path)
    ours = DeepSeekPolicy.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 128, (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = hf(ids).logits, ours(ids).logits
    assert ref.abs().max() > 0.5  # the weights are large enough that a wrong layer shows
    assert (ref - got).abs().max().item() <= 1e-4


def test_routing_picks_transformers_experts(tmp_path):
    hf = make_hf_model("deepseek_v3", n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)
    hf.save_pretrained(tmp_path)
    ours = DeepSeekPolicy.from_pretrained(tmp_path)
    x = torch.randn(500, 64, generator=torch.Generator().manual_seed(2))
    _, ref_w, ref_ids = hf.model.layers[1].mlp.gate(x)
    ids, w, _ = ours.model.layers[1].mlp.gate(x)
    assert torch.equal(ref_ids.sort(-1).values, ids.sort(-1).values)
    assert torch.equal(ref_w.gather(1, ref_ids.argsort(-1)), w.gather(1, ids.argsort(-1)))


def test_our_checkpoint_loads_in_transformers(family, tmp_path):
    hf = make_hf_model(family, seed=3)
    hf.save_pretrained(tmp_path / "hf")
    ours = DeepSeekPolicy.from_pretrained(tmp_path / "hf")
    ours.save_pretrained(tmp_path / "ours", max_shard_bytes=200_000)  # force several shards + index
    assert (tmp_path / "ours" / "model.safetensors.index.json").is_file()
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    if family == "deepseek_v3":
        assert config["topk_method"] == "noaux_tc" and config["scoring_func"] == "sigmoid"  # vLLM needs both
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32, attn_implementation="eager")
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (reloaded(ids).logits - hf(ids).logits).abs().max().item() <= 1e-5
    bias_key = "model.layers.1.mlp.gate.e_score_correction_bias"
    if family == "deepseek_v3":
        assert torch.equal(reloaded.state_dict()[bias_key], hf.state_dict()[bias_key])


def test_gradients_equal_transformers(family, tmp_path):
    hf = make_hf_model(family, seed=5)
    hf.save_pretrained(tmp_path)
    ours = DeepSeekPolicy.from_pretrained(tmp_path)
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(6))
    for model in (hf, ours):
        logits = model(ids).logits
        torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1)).backward()
    hf_grads = dict(hf.named_parameters())
    compared = 0
    for name, p in ours.named_parameters():
        ref = hf_grads[name].grad
        assert p.grad is not None and ref is not None, name
        rel = (p.grad - ref).norm() / ref.norm().clamp_min(1e-12)
        assert rel.item() <= 1e-4, (name, rel.item())
        compared += 1
    assert compared == len(hf_grads)


def test_yarn_rope_equals_transformers(tmp_path):
    yarn = {"type": "yarn", "rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 64,
            "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
    hf = make_hf_model("deepseek_v3", seed=7, rope_scaling=yarn, max_position_embeddings=2560)
    hf.save_pretrained(tmp_path)
    ours = DeepSeekPolicy.from_pretrained(tmp_path)
    assert ours.config.rope_scaling["factor"] == 40.0
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(8))
    pos = torch.arange(1000, 1040)[None]  # past the original context, where YaRN matters
    with torch.no_grad():
        ref = hf(ids, position_ids=pos).logits
        got = ours(ids, position_ids=pos).logits
    assert (ref - got).abs().max().item() <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_is_finite(dtype):
    from r1pipe.model.tiny import tiny_config

    policy = DeepSeekPolicy.from_config(tiny_config(), seed=0, dtype=dtype)
    ids = torch.randint(0, 128, (2, 16))
    policy(ids).logits.float().logsumexp(-1).mean().backward()
    grads = [p.grad for p in policy.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
