"""LoRA adapters on the policy through peft: `apply_lora` injects them (attention/FFN nn.Linear through
`target_modules`, the fused routed experts [E,2I,H]/[E,H,I] through peft's `target_parameters`), so only
adapters train. The rollout engine and every saved checkpoint get ordinary merged weights
(`merged_state_items`); the GRPO reference is the same modules with adapters off (`BaseReference`).
Neighbours: setup.py calls `lora_policy_for`; stages/grpo.py uses `rollout_weights` and `BaseReference`.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from r1pipe.model import DeepSeekPolicy

ADAPTER = "default"  # peft's adapter name; one adapter per policy
LORA_DIR = "lora"  # inside a saved policy dir: the adapter (peft format) and the un-merged targeted weights
# nn.Linear names of the policy a target may end with (spec section 5 attention, SwiGLU dense/shared FFN).
LINEAR_TARGETS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
                  "gate_proj", "up_proj", "down_proj")
EXPERT_PARAMS = ("gate_up_proj", "down_proj")  # fused routed-expert nn.Parameters of RoutedExperts


class LoRAPolicy(DeepSeekPolicy):
    """A DeepSeekPolicy carrying peft LoRA layers (made by `apply_lora`, never constructed directly).

    Its files are those of a plain policy with base+adapter merged, so `save_pretrained` output loads in
    `DeepSeekPolicy.from_pretrained`, transformers and vLLM; `<dir>/lora/` adds the adapter and the
    un-merged targeted weights (what an exact `--resume` needs).
    """

    @classmethod
    def from_pretrained(cls, path, dtype=None, device="cpu"):
        return DeepSeekPolicy.from_pretrained(path, dtype=dtype, device=device)  # the merged, plain policy

    def save_pretrained(self, path, tokenizer=None, max_shard_bytes: int = 4 << 30) -> Path:
        path = merged_policy(self).save_pretrained(path, tokenizer=tokenizer, max_shard_bytes=max_shard_bytes)
        save_adapter(self, Path(path) / LORA_DIR)
        return Path(path)


def _lora_layers(policy: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    for name, module in policy.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def _plain(name: str) -> str:
    """A parameter/module name as in the plain policy (peft inserts `.base_layer` when wrapping)."""
    return name.replace(".base_layer", "")


def _is_adapter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def is_lora(policy) -> bool:
    return isinstance(policy, LoRAPolicy)


def lora_config(rank: int, alpha: float, targets: list[str]):
    """peft LoraConfig for recipe-style target names (see `apply_lora`)."""
    from peft import LoraConfig

    if rank <= 0:
        raise ValueError(f"model.lora_rank must be > 0 to use LoRA, got {rank}")
    modules, params = [], []
    for t in targets:
        if not isinstance(t, str) or not t:
            raise ValueError(f"model.lora_targets: {t!r} is not a name")
        if t == "experts" or t.endswith(".experts"):
            params += [f"{t}.{p}" for p in EXPERT_PARAMS]
        elif any(t == f"experts.{p}" or t.endswith(f".experts.{p}") for p in EXPERT_PARAMS):
            params.append(t)
        elif t.rsplit(".", 1)[-1] in LINEAR_TARGETS:
            modules.append(t)
        else:
            raise ValueError(
                f"model.lora_targets: {t!r} is not a LoRA target; expected projections {list(LINEAR_TARGETS)} "
                f"(optionally prefixed, e.g. 'shared_experts.down_proj') or routed experts 'experts', "
                f"'experts.gate_up_proj', 'experts.down_proj'"
            )
    # lora_dropout stays 0: peft's LoRA on nn.Parameter (the fused experts) cannot apply dropout.
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                      target_modules=modules, target_parameters=params or None)


def _check_targets_exist(policy: nn.Module, config) -> None:
    linear = [n for n, m in policy.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    params = [n for n, _ in policy.named_parameters()]
    for t in config.target_modules or ():
        if not any(n == t or n.endswith(f".{t}") for n in linear):
            raise ValueError(f"model.lora_targets: {t!r} matches no projection of this model "
                             f"(e.g. q_a_proj/q_b_proj exist only when config.json has q_lora_rank, else q_proj)")
    for t in config.target_parameters or ():
        if not any(n == t or n.endswith(f".{t}") for n in params):
            raise ValueError(f"model.lora_targets: {t!r} matches no parameter (the model has no routed experts?)")


class _ConfigWithoutModelType:
    """The policy's config as peft sees it while injecting. peft renames targets of transformers-v5 MoE
    model types (deepseek_v3 included) as if written for v4: `gate_proj`/`up_proj`/`down_proj` would be
    moved to the fused routed experts and the dense/shared-expert nn.Linear left untouched. Without
    `model_type` peft takes the names as written."""

    def __init__(self, config):
        self._config = config

    def __getattr__(self, name):
        if name == "model_type":
            raise AttributeError(name)
        return getattr(self._config, name)

    def to_dict(self) -> dict:
        return {k: v for k, v in self._config.to_dict().items() if k != "model_type"}


def apply_lora(policy: DeepSeekPolicy, rank: int, alpha: float, targets: list[str], seed: int = 0) -> LoRAPolicy:
    """Inject LoRA (W + alpha/r · B A, B = 0 at start) into `policy` in place; return it as a LoRAPolicy.

    targets: nn.Linear names (`q_b_proj`, `kv_b_proj`, `o_proj`, `kv_a_proj_with_mqa`, `gate_proj`, ...;
    peft matches them as name suffixes) and `experts` / `experts.gate_up_proj` / `experts.down_proj` for
    the fused routed experts (peft's LoRA on nn.Parameter: per expert a rank-r A and B, used in the forward
    as a parametrisation W + ΔW of the [E, 2I, H] / [E, H, I] tensor). Afterwards only adapters require grad.
    """
    from peft import inject_adapter_in_model

    if type(policy) is not DeepSeekPolicy:
        raise TypeError(f"apply_lora: expected a plain DeepSeekPolicy, got {type(policy).__name__}")
    config = lora_config(rank, alpha, list(targets))
    _check_targets_exist(policy, config)
    model_config = policy.config
    policy.config = _ConfigWithoutModelType(model_config)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # A's init must not depend on (or consume) the run's RNG stream
            inject_adapter_in_model(config, policy, adapter_name=ADAPTER)
    finally:
        policy.config = model_config
    for name, p in policy.named_parameters():
        p.requires_grad_(_is_adapter(name))
        if _is_adapter(name) and p.dtype != torch.float32:
            p.data = p.data.float()  # Adam on bf16 adapters loses small updates; peft's usual upcast
    policy.__class__ = LoRAPolicy
    policy.lora_config = config
    return policy


# ---- merged weights: rollout engine, checkpoints ------------------------------------------------------


def _delta_by_key(policy: nn.Module) -> dict[str, nn.Module]:
    """plain state_dict key of each adapted weight -> its peft layer."""
    out = {}
    for name, layer in _lora_layers(policy):
        param = getattr(layer, "parameter_name", None) or "weight"
        out[f"{_plain(name)}.{param}"] = layer
    return out


@torch.no_grad()
def merged_state_items(policy: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) of the plain policy's state_dict, adapted weights merged (W + scale·B A, summed in
    float32, rounded once). Lazy and non-mutating: the training model keeps its adapters and base."""
    layers = _delta_by_key(policy)
    for key, tensor in policy.state_dict().items():
        if _is_adapter(key):
            continue
        key = _plain(key)
        layer = layers.get(key)
        if layer is not None and not layer.merged:
            delta = sum(layer.get_delta_weight(a).float() for a in layer.active_adapters if a in layer.lora_A)
            tensor = (tensor.float() + delta).to(tensor.dtype)
        yield key, tensor


def rollout_weights(model: nn.Module):
    """What the rollout engine loads after a step: merged weights for a LoRA policy, else the state_dict
    (full tensors of an FSDP2-sharded policy, gathered as the engine consumes them: every rank's engine
    needs the whole model)."""
    from r1pipe.training.fsdp import full_state_items

    return merged_state_items(model) if is_lora(model) else full_state_items(model)


def merged_policy(policy: LoRAPolicy) -> DeepSeekPolicy:
    """A frozen plain DeepSeekPolicy with the merged weights; untouched tensors share storage with
    `policy` (read-only use: saving, evaluation)."""
    from r1pipe.training.setup import policy_from_state

    return policy_from_state(policy.config, dict(merged_state_items(policy)), {_plain(n): b for n, b in policy.named_buffers()})


# ---- the reference policy: adapters off -------------------------------------------------------------


@contextmanager
def adapters_disabled(policy: nn.Module):
    """Run the base model: every LoRA layer bypassed, adapters' requires_grad restored afterwards."""
    layers = [layer for _, layer in _lora_layers(policy)]
    grads = {p: p.requires_grad for layer in layers for n, p in layer.named_parameters() if _is_adapter(f".{n}")}
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield policy
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for p, g in grads.items():
            p.requires_grad_(g)


class BaseReference:
    """π_ref of a LoRA policy: the policy's own base weights (adapters off), so no second model in memory.

    Called like the policy. It keeps the policy's train/eval mode and MoE bookkeeping (expert loads, the
    balance loss) as they were, so reference forwards never count as training forwards. It shares the
    balancing bias e_score_correction_bias with the policy (a frozen copy would keep the initial one).
    """

    def __init__(self, policy: LoRAPolicy):
        self.policy = policy

    @torch.no_grad()
    def __call__(self, *args, **kwargs):
        policy, moes = self.policy, self.policy.moe_layers()
        training = policy.training
        kept = [(m.last_expert_load, m.aux_loss) for m in moes]
        policy.eval()
        try:
            with adapters_disabled(policy):
                return policy(*args, **kwargs)
        finally:
            policy.train(training)
            for m, (load, aux) in zip(moes, kept):
                m.last_expert_load, m.aux_loss = load, aux

    def save_pretrained(self, path, tokenizer=None, **_):
        """Nothing to write: the base weights travel with the policy (`<policy dir>/lora/base_weights`)."""
        return None


def base_reference(policy: LoRAPolicy, ref_reset_every: int = 0) -> BaseReference:
    if ref_reset_every:
        raise ValueError(
            f"grpo.ref_reset_every={ref_reset_every}: with model.lora_rank > 0 the reference is the base model "
            "with adapters off and cannot be reset to the policy; set grpo.ref_reset_every: 0 or model.lora_rank: 0"
        )
    return BaseReference(policy)


# ---- files: adapter + un-merged targeted weights; exact resume -----------------------------------------


def save_adapter(policy: LoRAPolicy, out: Path) -> Path:
    """Write `out/` atomically: adapter_config.json + adapter_model.safetensors (peft's format and key
    names, loadable by `PeftModel.from_pretrained` on transformers' DeepSeek model) + base_weights.safetensors
    (the un-merged targeted weights, plain keys)."""
    import shutil
    import tempfile

    from safetensors.torch import save_file

    from r1pipe.model.checkpoint import replace_dir

    out = Path(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        state = policy.state_dict()
        adapter = {"base_model.model." + k.replace(f".{ADAPTER}.", "."): v.detach().contiguous().cpu()
                   for k, v in state.items() if _is_adapter(k)}
        targeted = set(_delta_by_key(policy))
        base = {_plain(k): v.detach().contiguous().cpu() for k, v in state.items() if _plain(k) in targeted}
        save_file(adapter, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        save_file(base, str(tmp / "base_weights.safetensors"), metadata={"format": "pt"})
        policy.lora_config.save_pretrained(str(tmp))
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_lora_checkpoint(policy: DeepSeekPolicy, lora_dir: Path, rank: int, alpha: float, targets, seed: int = 0):
    """Rebuild the exact training state from `<dir>/lora`: `policy` holds the merged weights read from
    `<dir>`; its targeted weights are put back to their un-merged values, then the adapter is loaded."""
    from safetensors.torch import load_file

    lora_dir = Path(lora_dir)
    saved = json.loads((lora_dir / "adapter_config.json").read_text())
    want = lora_config(rank, alpha, list(targets))
    for field in ("r", "lora_alpha", "target_modules", "target_parameters"):
        a, b = saved.get(field), getattr(want, field)
        same = sorted(a or []) == sorted(b or []) if field.startswith("target") else a == b
        if not same:
            raise ValueError(f"{lora_dir}/adapter_config.json: {field}={a!r} but the recipe's model section "
                             f"asks for {b!r} (model.lora_rank / lora_alpha / lora_targets must match to resume)")
    plain = policy.state_dict()
    for key, t in load_file(str(lora_dir / "base_weights.safetensors")).items():
        if key not in plain:
            raise ValueError(f"{lora_dir}/base_weights.safetensors: {key} is not a tensor of the policy")
        plain[key].copy_(t)
    policy = apply_lora(policy, rank, alpha, targets, seed=seed)
    params = {k: p for k, p in policy.named_parameters() if _is_adapter(k)}
    adapter = {k.removeprefix("base_model.model."): t for k, t in load_file(str(lora_dir / "adapter_model.safetensors")).items()}
    by_saved_name = {k.replace(f".{ADAPTER}.", "."): p for k, p in params.items()}
    if set(adapter) != set(by_saved_name):
        missing = sorted(set(by_saved_name) - set(adapter)) or sorted(set(adapter) - set(by_saved_name))
        raise ValueError(f"{lora_dir}/adapter_model.safetensors does not fit the policy's adapters (first mismatch: {missing[0]})")
    with torch.no_grad():
        for k, t in adapter.items():
            by_saved_name[k].copy_(t)
    return policy


def is_resume_checkpoint(path: Path) -> bool:
    """`<out>/checkpoints/step-N/policy` (training/state.py's layout): resume the adapter, not start one."""
    return path.name == "policy" and path.parent.name.startswith("step-") and path.parent.parent.name == "checkpoints"


def lora_policy_for(policy: DeepSeekPolicy, model_section, seed: int = 0) -> LoRAPolicy:
    """The recipe's LoRA: fresh adapters on the loaded weights (a stage's `final/` is a plain merged
    model, so the next stage starts new adapters on it), or, when resuming, the saved adapter and base."""
    path = Path(model_section.path) if model_section.path else None
    args = (model_section.lora_rank, model_section.lora_alpha, model_section.lora_targets)
    if path is not None and is_resume_checkpoint(path):
        if not (path / LORA_DIR / "adapter_config.json").is_file():
            raise ValueError(f"{path}: resuming with model.lora_rank={model_section.lora_rank}, but this checkpoint "
                             f"has no {LORA_DIR}/ adapter (it was trained without LoRA; keep the recipe's model section)")
        return load_lora_checkpoint(policy, path / LORA_DIR, *args, seed=seed)
    return apply_lora(policy, *args, seed=seed)
