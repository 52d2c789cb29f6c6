"""FSDP2 sharding of the policy, the frozen reference and the optimizer state, applied by r1pipe itself
(`torch.distributed.fsdp.fully_shard`), so that the CPU (gloo) and the GPU (NCCL) take the same code path:
accelerate 1.15 only takes its own FSDP path for GPU-like launches and would silently ignore the config
on the CPU. The launch asks for it (`accelerate launch --config_file recipes/accelerate/fsdp2.yaml`: the
launcher exports ACCELERATE_USE_FSDP=true, FSDP_VERSION=2) or the recipe does (`train.fsdp: true`).

Units: each decoder layer, then the root (embeddings, final norm and lm_head, which the policy's forward
reads directly). Every forward and backward of a sharded model is a collective, so ranks must run the same
number of them: the stages pad with placeholder micro-batches (`placeholder_count`) whose loss is zero.
Set-up: `shard_from_rank0` (rank 0 alone reads the checkpoint; each rank receives its shards), `sharded_copy`
(the KL reference, from each rank's policy shards). What leaves a rank whole: `full_state_items` (the rollout
engine's weights, every rank), `unsharded_copy` (checkpoints, rank 0; the torch engine's starting copy),
`gathered_optimizer` (checkpoints keep the full optimizer state in the plain layout, so a run resumes at any
world size).
Buffers (the MoE balancing bias) are not sharded: every rank updates its copy from all-reduced loads.

The stages call these same functions under DeepSpeed ZeRO-3 (`r1pipe.training.zero3`): `is_sharded`,
`full_state_items`, `unsharded_copy`, `gathered_optimizer`, `sharding_loader`, `clip_grad_norm`,
`parameter_counts`, `copy_weights`, `accumulating` and `backward` hand a ZeRO-3 model, engine or optimizer to
their twin there.
"""
from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from types import SimpleNamespace

import torch
from torch import nn

from r1pipe.training import zero3
from r1pipe.training.rank0 import model_spec, send_buffers, tensor_dtypes


def _launcher_asks(variable: str) -> bool:
    """A switch `accelerate launch` exports from its config file (ACCELERATE_USE_FSDP)."""
    return os.environ.get(variable, "false").lower() in ("1", "true")


def requested(recipe, num_processes: int) -> bool:
    """Shard when the recipe or the accelerate launcher asks for FSDP and there is more than one process."""
    from_launcher = _launcher_asks("ACCELERATE_USE_FSDP")
    if from_launcher and os.environ.get("FSDP_VERSION", "1") != "2":
        raise ValueError(f"the accelerate config asks for FSDP version {os.environ.get('FSDP_VERSION', '1')}; r1pipe "
                         "supports FSDP2 only (fsdp_version: 2, as in recipes/accelerate/fsdp2.yaml)")
    if not (from_launcher or recipe.train.fsdp):
        return False
    if recipe.model.lora_rank > 0:
        raise ValueError("FSDP2 sharding with LoRA (model.lora_rank > 0) is not supported: launch LoRA runs "
                         "with recipes/accelerate/ddp.yaml (the adapters' optimizer state is small anyway)")
    return num_processes > 1


def is_sharded(model) -> bool:
    """FSDP2 or DeepSpeed ZeRO-3 (`r1pipe.training.zero3`): weights spread over the ranks, forwards collective."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule) or zero3.is_partitioned(model)


def shard(model: nn.Module, mesh=None, device_type: str | None = None) -> nn.Module:
    """fully_shard each decoder layer, then the root (in place; returns the model). `mesh`: the policy's,
    to shard a second model (the reference) over the same ranks. A model on the host moves to the mesh's device
    one unit at a time as it is sharded (fully_shard moves what it manages), so load it there first."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from r1pipe.training.lora import is_lora

    if is_lora(model):
        raise ValueError("FSDP2 sharding of a LoRA policy is not supported")
    if mesh is None:
        device_type = device_type or next(model.parameters()).device.type
        mesh = init_device_mesh(device_type, (torch.distributed.get_world_size(),))
    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() != "false"
    layers = list(model.model.layers)
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh)  # the root: embed_tokens, norm, lm_head
    # explicit prefetch: layer i's forward starts the all-gather of layer i+1 (its backward: of layer i-1)
    # rather than the CPU reaching that layer's hook; a host sync inside a layer then no longer delays the
    # next gather (2 H200s, 11k tokens a rank: step 0.322 -> 0.303 s; no change at 43k tokens)
    for i, layer in enumerate(layers):
        layer.set_modules_to_forward_prefetch(layers[i + 1:i + 2])
        layer.set_modules_to_backward_prefetch(layers[i - 1:i])
    return model


def _meta_twin(config, dtypes: dict[str, torch.dtype], gradient_checkpointing: bool, frozen: bool) -> nn.Module:
    """The policy's structure on the meta device (no memory), each tensor in `dtypes`' dtype (bf16 weights,
    the float32 balancing bias); `frozen`: no gradients, eval mode, before sharding (the KL reference)."""
    from r1pipe.model import DeepSeekPolicy

    with torch.device("meta"):
        model = DeepSeekPolicy(config)
    for key, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if key in dtypes:
            tensor.data = tensor.data.to(dtypes[key])
    model.gradient_checkpointing = gradient_checkpointing
    return model.requires_grad_(False).eval() if frozen else model


def _allocate_sharded(model: nn.Module, device: torch.device, mesh=None) -> nn.Module:
    """Shard a meta model, then give each rank uninitialised storage for its own shards (and the buffers)."""
    shard(model, mesh=mesh, device_type=device.type)
    return model.to_empty(device=device)


def shard_from_rank0(full: nn.Module | None, device: torch.device, frozen: bool = False) -> nn.Module:
    """The FSDP2-sharded model whose weights `full` holds on rank 0's host (None on the other ranks, which read
    no checkpoint and never hold the whole model): every rank builds its meta twin, shards it, allocates its own
    shards on `device` and receives them from rank 0, which broadcasts one tensor at a time."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    model = _allocate_sharded(_meta_twin(*model_spec(full), frozen), device)
    set_model_state_dict(model, full.state_dict() if full is not None else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    send_buffers(model, full, [name for name, _ in model.nonpersistent_buffers()])  # (the state_dict had the rest)
    return model


def sharded_copy(model: nn.Module) -> nn.Module:
    """A frozen second model sharded like the FSDP2 `model` over its mesh, with its current weights and buffers
    (the KL reference): each rank copies its own shards, no communication and no full copy anywhere."""
    twin = _allocate_sharded(_meta_twin(model.config, tensor_dtypes(model), model.gradient_checkpointing, True),
                             next(model.parameters()).device, mesh=mesh_of(model))
    copy_weights(twin, model)
    for name, buffer in twin.nonpersistent_buffers():
        buffer.copy_(model.get_buffer(name))
    return twin


def mesh_of(model: nn.Module):
    return next(model.parameters()).device_mesh


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def full_state_items(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, full tensor) over the state_dict; a collective per sharded tensor: every rank iterates it whole."""
    if zero3.is_partitioned(model):
        yield from zero3.full_state_items(model)
        return
    for key, tensor in model.state_dict().items():
        yield key, _full(tensor.detach())


def unsharded_copy(model: nn.Module, device=None, keep: bool = True):
    """A plain frozen DeepSeekPolicy with the sharded model's full weights (collective), on `device`;
    None where `keep` is False (the gather still runs there)."""
    from torch.distributed.tensor import DTensor

    from r1pipe.training.setup import policy_from_state

    if zero3.is_partitioned(model):
        return zero3.unsharded_copy(model, device, keep)
    state = {}
    for key, tensor in model.state_dict().items():
        # a buffer (the balancing bias) is the model's own: copied, or the copy would follow its updates
        full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor.detach().clone()
        if keep:
            state[key] = full.to(device) if device is not None else full
    if not keep:
        return None
    buffers = {name: b.to(device) if device is not None else b for name, b in model.named_buffers()}
    plain = policy_from_state(model.config, state, buffers)
    plain.gradient_checkpointing = model.gradient_checkpointing
    return plain


def gathered_optimizer(optimizer, keep: bool = True):
    """The optimizer's state_dict with full tensors, in the layout of an unsharded optimizer (collective);
    an object with `state_dict()` for `save_train_state`, None where `keep` is False."""
    if isinstance(optimizer, zero3.EngineStep):
        return zero3.gathered_optimizer(optimizer, keep)
    state = optimizer.state_dict()
    full = {i: {k: _full(v).cpu() if torch.is_tensor(v) else v for k, v in s.items()} for i, s in state["state"].items()}
    if not keep:
        return None
    saved = {"state": full, "param_groups": state["param_groups"]}
    return SimpleNamespace(state_dict=lambda: saved)


def sharding_loader(optimizer):
    """An object whose `load_state_dict(full)` loads a full (gathered or single-process) optimizer state into
    the sharded optimizer: every rank slices its own shard, no communication."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(optimizer, zero3.EngineStep):
        return zero3.optimizer_loader(optimizer)

    def load_state_dict(saved: dict) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        state = {}
        for i, entries in saved["state"].items():
            p = params[int(i)]
            state[i] = {k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
                        if isinstance(p, DTensor) and torch.is_tensor(v) and v.shape == p.shape else v
                        for k, v in entries.items()}
        optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})

    return SimpleNamespace(load_state_dict=load_state_dict)


def clip_grad_norm(acc, parameters, max_norm: float) -> float:
    """Clip to `max_norm` like torch's clip_grad_norm_; returns the total norm as a float, the same on every
    rank. Sharded gradients (DTensors, Shard(0) over one mesh) add their local squares over the ranks."""
    from torch.distributed.tensor import DTensor

    parameters = list(parameters)
    if parameters and zero3.is_partitioned_param(parameters[0]):  # the engine's step clips at gradient_clipping
        return _global_norm(zero3.local_grads(parameters), group=None)
    grads = [p.grad for p in parameters if p.grad is not None]
    if not any(isinstance(g, DTensor) for g in grads):
        return float(acc.clip_grad_norm_(parameters, max_norm))
    local = [_local(g) for g in grads]
    total = _global_norm(local, group=grads[0].device_mesh.get_group())
    coef = min(max_norm / (total + 1e-6), 1.0)
    if coef < 1.0:
        torch._foreach_mul_(local, coef)
    return total


def _global_norm(local: list[torch.Tensor], group) -> float:
    """The L2 norm over every rank's gradient pieces `local` (the same on every rank). One fused pass over
    them (float32 norms, whatever their dtype), squared in float64: not a float64 copy of every gradient (at
    1.7B parameters a rank that was 10 ms of a 0.3 s step on an H200)."""
    norms = torch._foreach_norm(local, 2, dtype=torch.float32)
    squares = torch.stack(norms).double().pow(2).sum()
    torch.distributed.all_reduce(squares, group=group)
    return math.sqrt(float(squares))


def parameter_counts(model) -> tuple[int, int]:
    """(elements of the parameters this rank holds, elements of the whole model): FSDP2 or ZeRO-3."""
    if zero3.is_partitioned(model):
        return zero3.parameter_counts(model)
    params = list(model.parameters())
    return sum(_local(p).numel() for p in params), sum(p.numel() for p in params)


def copy_weights(reference, policy) -> None:
    """The reference takes the policy's current weights (`grpo.ref_reset_every`), sharded alike or not."""
    if zero3.is_partitioned(policy):  # (a partitioned state_dict holds no weights)
        zero3.copy_weights(reference, policy)
    else:
        reference.load_state_dict(policy.state_dict())


def placeholder_count(acc, n_batches: int, sharded: bool) -> int:
    """Placeholder micro-batches this rank runs after its own: sharded, up to the most any rank has (each
    forward/backward is a collective); unsharded (DDP), one where a rank has none, to join the all-reduce."""
    if acc.num_processes == 1:
        return 0
    if not sharded:
        return int(n_batches == 0)
    counts = acc.gather(torch.tensor([n_batches], device=acc.device))
    return int(counts.max()) - n_batches


def accumulating(acc, model, last: bool):
    """The context of one micro-batch's backward: DDP syncs on the last only; FSDP2 reduce-scatters every
    backward (ranks run the same number of them), keeping gradients sharded; ZeRO-3's engine is told whether
    this backward ends the step."""
    if zero3.is_engine(model):
        model.set_gradient_accumulation_boundary(last)
        return contextlib.nullcontext()
    if last or is_sharded(model):
        return contextlib.nullcontext()
    return acc.no_sync(model)


def backward(acc, model, loss: torch.Tensor) -> None:
    """loss.backward() as the wrapper of `model` wants it: accelerate's (DDP, FSDP2) or ZeRO-3's engine's."""
    if zero3.is_engine(model):
        model.backward(loss)
    else:
        acc.backward(loss)
