"""Fixtures for the rollout tests: a tiny DeepSeek-V3 checkpoint on disk in the published layout.

`build_tiny_checkpoint` makes it with transformers' own DeepseekV3ForCausalLM and save_pretrained, not
with r1pipe's tiny factory and writer, on purpose: what the rollout tests load into vLLM is then a
checkpoint no r1pipe code wrote, so they test the engine and the weight sync, not our own round trip.
The vLLM engine fixture lives in the test module (one engine per module).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

SPECIAL_TOKENS = ["<bos>", "<eos>", "<pad>"]  # ids 0, 1, 2
CHARACTERS = [chr(c) for c in range(32, 127)]  # printable ASCII, ids 3..97


def write_char_tokenizer(model_dir: Path) -> int:
    """Write a character-level WordLevel tokenizer (what vLLM needs to start); return its size."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<pad>"
    )
    fast.save_pretrained(model_dir)
    return len(vocab)


def tiny_config(vocab_size: int = 128, **overrides):
    """DeepSeek-V3 architecture at toy size. kv_lora_rank=512 and qk_rope_head_dim=64 are what
    vLLM's CPU MLA decode kernel accepts; everything else is small."""
    from transformers import DeepseekV3Config

    fields = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        first_k_dense_replace=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        n_shared_experts=1,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        routed_scaling_factor=2.5,
        kv_lora_rank=512,
        q_lora_rank=32,
        qk_rope_head_dim=64,
        qk_nope_head_dim=32,
        v_head_dim=32,
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        tie_word_embeddings=False,
    )
    fields.update(overrides)
    return DeepseekV3Config(**fields)


@torch.no_grad()
def _init_peaked(model: torch.nn.Module, generator: torch.Generator) -> None:
    # transformers' default init (std 0.02) gives near-uniform next-token distributions, where
    # logprob errors are invisible; unit-gain weights and a larger lm_head give peaked ones.
    for name, p in model.named_parameters():
        if p.ndim == 1:  # RMSNorm gains
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=generator))
        else:
            fan_in = p.shape[-1]
            gain = 4.0 if name.startswith("lm_head") else 1.0
            p.copy_(torch.randn(p.shape, generator=generator) * gain / fan_in**0.5)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.1 * torch.randn(b.shape, generator=generator))


def build_tiny_checkpoint(model_dir: Path, seed: int = 0, **config_overrides) -> Path:
    """Write config.json, model.safetensors (published per-expert keys) and a tokenizer."""
    from transformers import DeepseekV3ForCausalLM

    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    vocab_size = 128
    n_tokens = write_char_tokenizer(model_dir)
    assert n_tokens <= vocab_size
    model = DeepseekV3ForCausalLM(tiny_config(vocab_size, **config_overrides))
    _init_peaked(model, torch.Generator().manual_seed(seed))
    model.save_pretrained(model_dir)  # transformers 5.19 splits fused experts back into per-expert keys
    config_path = model_dir / "config.json"
    config = json.loads(config_path.read_text())
    # vLLM builds mlp.gate.e_score_correction_bias only for noaux_tc; transformers omits these keys.
    config.update(topk_method="noaux_tc", scoring_func="sigmoid", num_nextn_predict_layers=0)
    config_path.write_text(json.dumps(config, indent=2))
    return model_dir


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny_dsv3"), seed=0)
