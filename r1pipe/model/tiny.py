"""Tiny DeepSeek configs for tests and the demo (same families as the published ones).

MLA keeps kv_lora_rank 512 and qk_rope_head_dim 64 because vLLM's CPU MLA decode kernel accepts only a
576-wide latent head (shared/spec/ENVIRONMENT.md); everything else is small.
"""
from __future__ import annotations

from r1pipe.model.config import DeepSeekConfig


def tiny_config(family: str = "deepseek_v3", vocab_size: int = 128, **overrides) -> DeepSeekConfig:
    """A ~1M-parameter config. family "deepseek_v3": sigmoid noaux_tc gating with 2 groups;
    "deepseek_v2": V2-Lite style (softmax greedy, no q compression, no renormalisation)."""
    base = dict(
        model_type=family,
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        q_lora_rank=32,
        kv_lora_rank=512,
        qk_nope_head_dim=16,
        qk_rope_head_dim=64,
        v_head_dim=16,
        max_position_embeddings=512,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        topk_method="noaux_tc",
        scoring_func="sigmoid",
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        first_k_dense_replace=1,
        rms_norm_eps=1e-6,
        # the ids of the shipped tiny tokenizer (r1pipe/assets/tiny_tokenizer)
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        initializer_range=0.02,
    )
    if family == "deepseek_v2":
        base.update(q_lora_rank=None, topk_method="greedy", scoring_func="softmax", norm_topk_prob=False,
                    routed_scaling_factor=1.0, n_group=1, topk_group=1)
    base.update(overrides)
    return DeepSeekConfig.from_dict(base, source="tiny_config")
