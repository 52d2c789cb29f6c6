"""Building what every stage starts from: the policy of a recipe's `model` section (a checkpoint, or a
fresh tiny one), its tokenizer, and the frozen reference copy."""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from r1pipe.model import DeepSeekPolicy
from r1pipe.model.tiny import tiny_config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(model_path: str | None):
    from transformers import AutoTokenizer

    from r1pipe.data.tokenizer import load_tiny_tokenizer

    if model_path and (Path(model_path) / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(model_path)
    return load_tiny_tokenizer()


def tokenizer_for(model_section):
    """The tokenizer of a recipe's model section: the checkpoint's own, or the tiny one."""
    return load_tokenizer(None if model_section.init else model_section.path)


def load_policy_for(model_section, seed: int, device="cpu") -> tuple[DeepSeekPolicy, object]:
    """(policy, tokenizer) for a recipe's model section."""
    dtype = DTYPES[model_section.dtype]
    tokenizer = tokenizer_for(model_section)
    if model_section.init:
        family = {"tiny": "deepseek_v3", "tiny_v2": "deepseek_v2"}.get(model_section.init)
        if family is None:
            raise ValueError(f"model.init={model_section.init!r}: expected 'tiny' or 'tiny_v2' (or set model.path)")
        config = tiny_config(family, vocab_size=len(tokenizer), **model_section.tiny_overrides)
        policy = DeepSeekPolicy.from_config(config, seed=seed, dtype=dtype).to(device)
    else:
        if not model_section.path:
            raise ValueError("model: set either `path` (a checkpoint dir) or `init: tiny`")
        policy = DeepSeekPolicy.from_pretrained(model_section.path, dtype=dtype, device=device)
    policy.gradient_checkpointing = model_section.gradient_checkpointing
    if model_section.lora_rank > 0:  # only adapters train; files and rollouts get merged weights
        from r1pipe.training.lora import lora_policy_for

        policy = lora_policy_for(policy, model_section, seed)
    return policy, tokenizer


def frozen_copy(policy: DeepSeekPolicy) -> DeepSeekPolicy:
    reference = copy.deepcopy(policy).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    return reference


def frozen_reference(policy, saved: Path | None = None, device="cpu"):
    """The frozen KL reference: the one saved with a resumed checkpoint (`saved`), else a copy of the policy;
    sharded over the policy's ranks when the policy is (FSDP2 or ZeRO-3: no optimizer, forwards are collectives)."""
    from r1pipe.training import fsdp, zero3

    if fsdp.is_sharded(policy):  # sharded over the policy's ranks (ZeRO-3: its own engine); no rank holds it whole
        partitioned = zero3.is_partitioned(policy)
        if saved is None:  # each rank copies the policy's shards it holds
            return zero3.partitioned_copy(policy) if partitioned else fsdp.sharded_copy(policy)
        # read by rank 0 alone, which sends each rank its shards
        full = DeepSeekPolicy.from_pretrained(saved) if torch.distributed.get_rank() == 0 else None
        if partitioned:
            return zero3.partition_frozen(zero3.partition_from_rank0(full, frozen=True))
        return fsdp.shard_from_rank0(full, next(policy.parameters()).device, frozen=True)
    if saved is not None:
        reference = DeepSeekPolicy.from_pretrained(saved, device=device)
    else:
        reference = frozen_copy(policy)
    return reference.requires_grad_(False).eval()


def policy_from_state(config, state: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor]) -> DeepSeekPolicy:
    """A frozen plain DeepSeekPolicy holding `state` (its state_dict's tensors, not copied) and, from
    `buffers` (name -> tensor), the non-persistent buffers a state_dict leaves out (rope, expert loads)."""
    with torch.device("meta"):
        plain = DeepSeekPolicy(config)
    plain.load_state_dict(state, assign=True)
    for name, _ in plain.nonpersistent_buffers():
        owner, _, leaf = name.rpartition(".")
        setattr(plain.get_submodule(owner) if owner else plain, leaf, buffers[name].clone())
    return plain.requires_grad_(False).eval()
