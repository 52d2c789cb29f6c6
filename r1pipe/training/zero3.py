"""DeepSpeed ZeRO-3: the policy, its AdamW state and the frozen reference partitioned over the processes by
DeepSpeed's engine, driven by r1pipe's own step (`accelerate launch --config_file recipes/accelerate/zero3.yaml`).

accelerate would let the engine own accumulation (a fixed count; r1pipe's token-budget micro-batches vary per
step and rank), so r1pipe builds the engine itself (`deepspeed.initialize`, one optimizer step per call of its
step) and marks each micro-batch's backward as the step's last or not. Clipping happens inside the engine's step
at `optim.max_grad_norm` (DeepSpeed's own default, 1.0, would clip silently otherwise); the norm the stages log
and check for NaN/inf is computed first from the gradient partitions, so a non-finite step is skipped before
the engine applies it. ZeRO-3 keeps float32 master copies of the weights in its optimizer whatever the model
dtype (DeepSpeed's design), unlike the single-process and FSDP2 paths, which step the model's own tensors.

Set-up, as for FSDP2, never puts the whole model on a GPU or on a host other than rank 0's: `partition_from_rank0`
(the policy, and a resumed run's saved reference), `partitioned_copy` (the reference, from the policy's partitions).
What leaves a rank whole, as for FSDP2: `full_state_items` (rollout weights, every rank), `unsharded_copy`
(checkpoints; the torch engine's copy), `gathered_optimizer` (the plain AdamW layout a one-process run
writes); `optimizer_loader` scatters such a state back into the partitions. The float32 master weights are not
saved: a resumed bf16 run restarts them from the checkpoint's bf16 weights (an fp32 run resumes exactly).
"""
from __future__ import annotations

import os
from types import SimpleNamespace

import torch
from torch import nn

from r1pipe.training.rank0 import model_spec, send_buffers, tensor_dtypes

# accelerate's DeepSpeed settings r1pipe does not apply: refused rather than ignored
_UNSUPPORTED = {
    "ACCELERATE_DEEPSPEED_CONFIG_FILE": "deepspeed_config_file (r1pipe builds DeepSpeed's config from the recipe)",
    "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "offload_optimizer_device",
    "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "offload_param_device",
}


def launcher_asks() -> bool:
    """`accelerate launch` with a DeepSpeed config (it exports ACCELERATE_USE_DEEPSPEED)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true")


def requested(recipe, num_processes: int) -> bool:
    """Partition with ZeRO-3 when the accelerate launcher asks for DeepSpeed (stage 3 only) and there is more
    than one process."""
    if not launcher_asks():
        return False
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "unset")
    if stage != "3":
        raise ValueError(f"the accelerate config asks for DeepSpeed ZeRO stage {stage}; r1pipe drives stage 3 only "
                         "(zero_stage: 3, as in recipes/accelerate/zero3.yaml); for data parallelism use ddp.yaml")
    for variable, setting in _UNSUPPORTED.items():
        if os.environ.get(variable, "none").lower() not in ("", "none"):
            raise ValueError(f"the accelerate DeepSpeed config sets {setting}, which r1pipe does not apply; remove it "
                             "(see recipes/accelerate/zero3.yaml)")
    if recipe.train.fsdp:
        raise ValueError("train.fsdp: true under a DeepSpeed launch: pick one of FSDP2 and ZeRO-3")
    if recipe.model.dtype == "float16":  # DeepSpeed's fp16 mode scales the loss and skips steps on its own
        raise ValueError("model.dtype: float16 under DeepSpeed ZeRO-3 is not supported; use bfloat16 or float32")
    if recipe.model.lora_rank > 0:
        raise ValueError("DeepSpeed ZeRO-3 with LoRA (model.lora_rank > 0) is not supported: launch LoRA runs with "
                         "recipes/accelerate/ddp.yaml (the adapters' optimizer state is small anyway)")
    return num_processes > 1


def engine_config(max_grad_norm: float, dtype: torch.dtype = torch.float32) -> dict:
    return {
        # bf16 weights: DeepSpeed's bf16 mode (bf16 compute and reduce-scatter, float32 master partitions)
        "bf16": {"enabled": dtype == torch.bfloat16},
        "train_micro_batch_size_per_gpu": 1,  # (bookkeeping only: r1pipe feeds packed micro-batches itself)
        "gradient_accumulation_steps": 1,  # every step's last micro-batch is marked as the boundary instead
        "gradient_clipping": float(max_grad_norm),
        "zero_optimization": {"stage": 3},
        "zero_allow_untested_optimizer": True,  # torch's AdamW, the same optimizer as every other path
        "steps_per_print": 2**31 - 1,
    }


def _built_partitioned(config, dtypes: dict[str, torch.dtype], gradient_checkpointing: bool, frozen: bool):
    """The policy constructed inside `zero.Init`: each submodule's parameters are cut into this rank's
    partitions as soon as it is built, so no rank holds the whole model. Weights to be filled; the buffers get
    back their dtypes of `dtypes` (zero.Init gives every floating tensor of the constructor the weights' dtype)
    and values to be filled. `frozen`: no gradients, eval mode (the KL reference)."""
    import deepspeed

    from r1pipe.model import DeepSeekPolicy

    weights = next(dtype for key, dtype in dtypes.items() if key.endswith(".weight"))
    # (the dtype comes from the config's bf16 setting: Init's own `dtype` argument is ignored off fp16-capable
    # devices, deepspeed 0.19.8)
    with deepspeed.zero.Init(config_dict_or_path=engine_config(0.0, weights), mem_efficient_linear=False):
        model = DeepSeekPolicy(config)
    for name, buffer in list(model.named_buffers()):
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._buffers[leaf] = buffer.to(dtypes[name])
    model.gradient_checkpointing = gradient_checkpointing
    return model.requires_grad_(False).eval() if frozen else model


def partition_from_rank0(full: nn.Module | None, frozen: bool = False) -> nn.Module:
    """The policy whose weights `full` holds on rank 0's host (None on the other ranks, which read no checkpoint
    and never hold the whole model), partitioned over the ranks: built partitioned, then rank 0's weights one
    parameter at a time (gathered, written by rank 0, partitioned again) and its buffers. Hand it to
    `partition` / `partition_frozen` for its engine."""
    import deepspeed

    model = _built_partitioned(*model_spec(full), frozen)
    with torch.no_grad():
        for name, param in model.named_parameters():
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                if full is not None:
                    param.data.copy_(full.get_parameter(name))
        send_buffers(model, full, [name for name, _ in model.named_buffers()])
    return model


def partitioned_copy(policy):
    """The frozen KL reference: a second engine partitioned like the policy (its engine or module), with its
    current weights: built partitioned, then each rank copies its own partitions; no full copy anywhere."""
    module = module_of(policy)
    engine = partition_frozen(_built_partitioned(module.config, tensor_dtypes(module), module.gradient_checkpointing,
                                                 True))
    copy_weights(engine, module)
    return engine


def partition(policy: nn.Module, optimizer, max_grad_norm: float):
    """The policy (built partitioned by `partition_from_rank0`; a whole model is moved to the GPU and partitioned
    by the engine) inside a ZeRO-3 engine stepping `optimizer` (a torch AdamW over its parameters)."""
    import deepspeed

    config = engine_config(max_grad_norm, next(policy.parameters()).dtype)
    engine, *_ = deepspeed.initialize(model=policy, optimizer=optimizer, config=config)
    return engine


def partition_frozen(model: nn.Module):
    """A frozen model (the KL reference) partitioned the same way, without an optimizer; returns its engine
    (forwards gather each layer's weights, as the policy's do)."""
    import deepspeed

    config = engine_config(0.0, next(model.parameters()).dtype)
    del config["zero_allow_untested_optimizer"]
    engine, *_ = deepspeed.initialize(model=model, config=config)
    return engine


def is_partitioned_param(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


def is_partitioned(model) -> bool:
    first = next(module_of(model).parameters(), None)
    return first is not None and is_partitioned_param(first)


def is_engine(model) -> bool:
    return hasattr(model, "module") and hasattr(model, "set_gradient_accumulation_boundary")


def module_of(model) -> nn.Module:
    return model.module if is_engine(model) else model


def full_state_items(model):
    """(key, full tensor) over the module's state_dict, each parameter gathered in turn (a collective per
    parameter: every rank iterates it whole)."""
    import deepspeed

    module = module_of(model)
    params = dict(module.named_parameters())
    buffers = dict(module.named_buffers())
    for key in module.state_dict():
        if key in params:
            with deepspeed.zero.GatheredParameters([params[key]]):
                yield key, params[key].detach().clone()
        else:
            yield key, buffers[key]


def unsharded_copy(model, device=None, keep: bool = True):
    """A plain frozen DeepSeekPolicy with the full weights (collective), on `device`; None where `keep` is False."""
    from r1pipe.training.setup import policy_from_state

    module = module_of(model)
    # copies, never views: a buffer (the balancing bias) is the model's own, and would follow its updates
    state = {}
    for key, tensor in full_state_items(module):
        if keep:
            state[key] = tensor.detach().to(device if device is not None else tensor.device, copy=True)
    if not keep:
        return None
    buffers = {name: b.detach().to(device if device is not None else b.device, copy=True) for name, b in module.named_buffers()}
    plain = policy_from_state(module.config, state, buffers)
    plain.gradient_checkpointing = module.gradient_checkpointing
    return plain


def copy_weights(reference, policy) -> None:
    """The reference takes the policy's current weights (`grpo.ref_reset_every`): both are partitioned alike
    (same shapes, same ranks), so each rank copies its own partitions, and the buffers; no communication."""
    target, source = module_of(reference), module_of(policy)
    with torch.no_grad():
        for (name, t), (other, s) in zip(target.named_parameters(), source.named_parameters(), strict=True):
            assert name == other and t.ds_tensor.shape == s.ds_tensor.shape, (name, other)
            t.ds_tensor.copy_(s.ds_tensor)
            # small ones stay gathered on every rank once used: their whole copy too (the policy's is current:
            # its engine gathers them after each step); a fresh reference gathers from the partitions
            if getattr(t, "ds_persist", False) and t.data.shape == s.data.shape:
                t.data.copy_(s.data)
        for (name, t), (other, s) in zip(target.named_buffers(), source.named_buffers(), strict=True):
            t.copy_(s)


class EngineStep:
    """What the stages step and zero: the engine's optimizer step (clipping at `gradient_clipping`, then AdamW
    on this rank's partitions). `param_groups` are the AdamW groups the learning-rate scheduler sets."""

    def __init__(self, engine, base_optimizer):
        self.engine, self.base = engine, base_optimizer

    @property
    def param_groups(self):
        return self.base.param_groups

    def step(self) -> None:
        self.engine.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.engine.optimizer.zero_grad(set_to_none=set_to_none)


def _adam_step(engine) -> torch.Tensor | None:
    states = list(engine.optimizer.optimizer.state.values())
    return states[0]["step"].detach().clone() if states and "step" in states[0] else None


def gathered_optimizer(optimizer: EngineStep, keep: bool = True):
    """The optimizer's state in the layout of a plain torch AdamW over the module's parameters (collective)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    engine = optimizer.engine
    params = list(module_of(engine).parameters())
    step = _adam_step(engine)  # None before AdamW's first step (its state is created then), on every rank alike
    state = {}
    for i, p in enumerate(params if step is not None else []):
        entries = {k: safe_get_full_optimizer_state(p, k) for k in ("exp_avg", "exp_avg_sq")}
        if keep:
            state[i] = {"step": step.clone(), **{k: v.detach().cpu().clone() for k, v in entries.items()}}
    if not keep:
        return None
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": list(range(len(params)))}
              for g in optimizer.base.param_groups]
    saved = {"state": state, "param_groups": groups}
    return SimpleNamespace(state_dict=lambda: saved)


def optimizer_loader(optimizer: EngineStep):
    """An object whose `load_state_dict(full)` scatters a plain AdamW state (gathered, or single-process) into
    the engine's partitions."""
    from deepspeed.utils import safe_set_full_optimizer_state

    def load_state_dict(saved: dict) -> None:
        if saved["state"]:
            _create_adam_state(optimizer)
        params = list(module_of(optimizer.engine).parameters())
        for i, p in enumerate(params):
            entries = saved["state"].get(i, saved["state"].get(str(i)))
            if entries is None:
                continue
            for key in ("exp_avg", "exp_avg_sq"):
                safe_set_full_optimizer_state(p, entries[key].to(p.device), key)
        steps = [e["step"] for e in saved["state"].values() if "step" in e]
        for s in optimizer.engine.optimizer.optimizer.state.values():
            if steps:
                s["step"] = torch.as_tensor(steps[0], dtype=s["step"].dtype, device=s["step"].device).clone()
        for group, loaded in zip(optimizer.base.param_groups, saved["param_groups"]):
            group.update({k: v for k, v in loaded.items() if k != "params"})

    return SimpleNamespace(load_state_dict=load_state_dict)


def _create_adam_state(optimizer: EngineStep) -> None:
    """torch's AdamW creates its state at the first step; a resumed run fills it before that: create it (zeros)
    for each of the engine's float32 partitions, as AdamW would."""
    base, zero = optimizer.base, optimizer.engine.optimizer
    for sub_group, flat in enumerate(zero.fp32_partitioned_groups_flat):
        group = base.param_groups[zero.sub_group_to_group_id[sub_group]]
        on_device = bool(group.get("fused") or group.get("capturable"))
        state = base.state[flat]
        if "exp_avg" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=flat.device if on_device else "cpu")
            state["exp_avg"] = torch.zeros_like(flat, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(flat, memory_format=torch.preserve_format)


def local_grads(parameters) -> list[torch.Tensor]:
    """This rank's partitions of the step's gradients (after the last micro-batch's backward)."""
    from deepspeed.utils import safe_get_local_grad

    return [g for g in (safe_get_local_grad(p) for p in parameters) if g is not None]


def parameter_counts(model) -> tuple[int, int]:
    """(elements this rank holds, elements of the whole model)."""
    params = list(module_of(model).parameters())
    return sum(p.ds_tensor.numel() for p in params), sum(p.ds_numel for p in params)
