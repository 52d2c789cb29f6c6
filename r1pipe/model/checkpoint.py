"""Checkpoint IO in the published DeepSeek layout (spec section 7): config.json + safetensors shards
(+ model.safetensors.index.json), per-expert keys `mlp.experts.{e}.{gate,up,down}_proj.weight`.

In memory the experts are fused ([E, 2I, H] / [E, H, I]); `to_checkpoint_tensors` splits them and
`fuse_expert_tensors` joins them back. Writes are atomic: a temp dir beside the target, then rename.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from r1pipe.model.config import DeepSeekConfig

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_EXPERT_KEY = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_FUSED_KEY = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be read; the message names the file or key."""


def to_checkpoint_tensors(state: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (published key, tensor): fused expert tensors split per expert, the rest unchanged."""
    for key, tensor in state.items():
        m = _FUSED_KEY.match(key)
        if m is None:
            yield key, tensor
            continue
        prefix, kind = m.groups()
        for e in range(tensor.shape[0]):
            if kind == "gate_up_proj":
                gate, up = tensor[e].chunk(2, dim=0)
                yield f"{prefix}.{e}.gate_proj.weight", gate
                yield f"{prefix}.{e}.up_proj.weight", up
            else:
                yield f"{prefix}.{e}.down_proj.weight", tensor[e]


def fuse_expert_tensors(tensors: dict[str, torch.Tensor], n_experts: int, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Inverse of `to_checkpoint_tensors`: per-expert keys -> fused [E, 2I, H] / [E, H, I] tensors."""
    out, experts = {}, {}
    for key, tensor in tensors.items():
        m = _EXPERT_KEY.match(key)
        if m is None:
            out[key] = tensor
        else:
            prefix, e, kind = m.groups()
            experts.setdefault(prefix, {})[(int(e), kind)] = tensor
    for prefix, parts in experts.items():
        missing = [f"{prefix}.{e}.{k}.weight" for e in range(n_experts) for k in ("gate_proj", "up_proj", "down_proj") if (e, k) not in parts]
        if missing:
            raise CheckpointError(f"{source}: missing expert tensor {missing[0]} (and {len(missing) - 1} more)")
        out[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([parts[(e, "gate_proj")], parts[(e, "up_proj")]]) for e in range(n_experts)])
        out[f"{prefix}.down_proj"] = torch.stack([parts[(e, "down_proj")] for e in range(n_experts)])
    return out


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint dir, checking that every file the index names exists."""
    index = path / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
        for name in files:
            if not (path / name).is_file():
                raise CheckpointError(f"{index}: names shard {name!r}, which is missing from {path}")
        return [path / f for f in files]
    if (path / SINGLE_NAME).is_file():
        return [path / SINGLE_NAME]
    found = sorted(path.glob("*.safetensors"))
    if not found:
        raise CheckpointError(f"{path}: no {INDEX_NAME}, {SINGLE_NAME} or *.safetensors files")
    return found


def read_tensors(path: str | Path, num_hidden_layers: int | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint dir, skipping layers past `num_hidden_layers` (V3's MTP module)."""
    path = Path(path)
    tensors = {}
    for file in checkpoint_files(path):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                m = _LAYER_KEY.match(key)
                if num_hidden_layers is not None and m and int(m.group(1)) >= num_hidden_layers:
                    continue
                tensors[key] = f.get_tensor(key)
    return tensors


def load_policy(cls, path: str | Path, dtype: torch.dtype | None = None, device="cpu"):
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    config = DeepSeekConfig.from_file(path / "config.json")
    tensors = fuse_expert_tensors(read_tensors(path, config.num_hidden_layers), config.n_routed_experts, str(path))
    with torch.device("meta"):
        policy = cls(config)
    expected = policy.state_dict()
    missing = [k for k in expected if k not in tensors]
    if config.tie_word_embeddings and "lm_head.weight" in missing:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
        missing.remove("lm_head.weight")
    if missing:
        raise CheckpointError(f"{path}: missing tensor {missing[0]} (and {len(missing) - 1} more)")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensor {unexpected[0]} (and {len(unexpected) - 1} more); is config.json the right one?")
    target = dtype or _config_dtype(config)
    for key, t in tensors.items():
        if expected[key].shape != t.shape:
            raise CheckpointError(f"{path}: tensor {key} has shape {tuple(t.shape)}, config.json implies {tuple(expected[key].shape)}")
        # The balancing bias stays float32 whatever the model dtype: ±γ steps of 1e-3 vanish in bf16.
        tensors[key] = t.to(device=device, dtype=torch.float32 if key.endswith("e_score_correction_bias") else target)
    policy.load_state_dict(tensors, assign=True)
    _materialise_buffers(policy, device)
    return policy


def _materialise_buffers(policy, device):
    from r1pipe.model.rope import rope_inv_freq

    inv_freq, _ = rope_inv_freq(policy.config)
    policy.rope_inv_freq = inv_freq.to(device)
    for moe in policy.moe_layers():
        moe.last_expert_load = torch.zeros(policy.config.n_routed_experts, device=device)


def _config_dtype(config: DeepSeekConfig) -> torch.dtype:
    name = config.raw.get("dtype") or config.raw.get("torch_dtype") or "float32"
    return getattr(torch, name) if isinstance(name, str) and hasattr(torch, name) else torch.float32


def save_policy(policy, path: str | Path, tokenizer=None, max_shard_bytes: int = 4 << 30) -> Path:
    """Write config.json + shards (+ index) + tokenizer into `path`, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in to_checkpoint_tensors(policy.state_dict())}
        write_shards(state, tmp, max_shard_bytes)
        config = policy.config.to_dict()
        config["dtype"] = str(next(policy.parameters()).dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def write_shards(state: dict[str, torch.Tensor], out: Path, max_shard_bytes: int) -> None:
    shards, current, size = [], {}, 0
    for key, t in state.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = t.clone() if t.storage_offset() or not t.is_contiguous() else t  # safetensors refuses views sharing storage
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], str(out / SINGLE_NAME), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        for key, t in shard.items():
            weight_map[key] = name
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def replace_dir(tmp: Path, path: Path) -> None:
    """Swap a fully written temp dir into place; a crash leaves either the old or the new dir whole."""
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, path)
