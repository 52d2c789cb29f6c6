"""Recipes: typed dataclasses whose defaults are the published R1 settings, filled from YAML and
validated before any work starts (unknown keys fail with a "did you mean"). One YAML file is one stage.

`load_recipe(path)` is the only entry point; stages read the sections they need (`recipe.grpo`, ...).
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

STAGES = ("sft", "grpo", "reject", "align")


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the file and the key."""


@dataclass
class ModelSection:
    path: str | None = None  # checkpoint dir; "previous" = the previous stage's output in a pipeline
    init: str | None = None  # "tiny" / "tiny_v2": build a fresh tiny policy instead of loading one
    family: Literal["deepseek_v3", "deepseek_v2"] | None = None  # for --dry-run when `path` is not on disk
    tiny_overrides: dict = field(default_factory=dict)  # config overrides for init=tiny (e.g. for --dry-run)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    gradient_checkpointing: bool = False
    lora_rank: int = 0  # > 0: train LoRA adapters only (peft)
    lora_alpha: float = 16.0
    lora_targets: list = field(default_factory=lambda: ["q_b_proj", "kv_b_proj", "o_proj"])


@dataclass
class DataSection:
    train: str = "tiny_arith:train"  # a builtin task split, or a local .jsonl/.parquet file
    eval: str | None = "tiny_arith:test"
    limit: int | None = None  # use only the first N rows
    mix: list = field(default_factory=list)  # extra sources [{"source": ..., "limit": N}] (SFT mixtures)


@dataclass
class RolloutSection:
    # vllm: colocated in the trainer; vllm_server: a `vllm serve` process (started here, or at server_url)
    engine: Literal["vllm", "vllm_server", "torch"] = "vllm"
    server_url: str | None = None  # vllm_server: http://HOST:PORT of a running server on this host
    temperature: float = 1.0  # R1
    top_p: float = 1.0
    max_tokens: int = 32768
    gpu_memory_utilization: float = 0.3
    max_model_len: int | None = None

    def __post_init__(self):
        if self.server_url is not None and self.engine != "vllm_server":
            raise RecipeError(f"server_url is set but engine={self.engine!r}; set engine: vllm_server to use it")


@dataclass
class GRPOSection:
    num_generations: int = 16  # G, R1
    beta: float = 0.001  # KL coefficient, R1
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2  # > epsilon_low: "clip-higher" (DAPO)
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo", "gspo"] = "grpo"
    scale_rewards: Literal["group", "batch", "none"] = "group"
    num_iterations: int = 1  # mu: policy updates per rollout batch
    dynamic_sampling: bool = False  # drop groups whose rewards are all equal
    # with dynamic_sampling: rounds of the next prompts that replace dropped groups, until a step has
    # train.prompts_per_step groups with signal (DAPO); 0: train on the groups left
    max_refill_rounds: int = 3
    mask_truncated: bool = False
    ref_reset_every: int = 0  # copy the policy into the reference every N steps (0: never)
    # keep the reference's decoder layers in host memory, streamed to the GPU layer by layer in its one
    # forward a step (r1pipe.training.offload): one model copy less on the GPU for one PCIe pass a step
    reference_offload: bool = False
    tis_cap: float | None = None  # truncated importance sampling for the vLLM/trainer mismatch
    failed_reward: Literal["zero", "drop_group"] = "zero"
    reward_timeout_s: float = 30.0

    def __post_init__(self):
        if self.max_refill_rounds < 0:
            raise RecipeError(f"max_refill_rounds={self.max_refill_rounds}: expected 0 (no refill) or more")
        if self.reference_offload and not self.beta:
            raise RecipeError("reference_offload is set but beta is 0: without the KL term there is no reference model")


@dataclass
class OptimSection:
    lr: float = 3e-6  # R1
    weight_decay: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 0
    scheduler: Literal["constant", "cosine", "linear"] = "constant"
    max_grad_norm: float = 1.0


@dataclass
class TrainSection:
    max_steps: int = 1000
    prompts_per_step: int = 32
    micro_batch_tokens: int = 16384  # token budget of one packed micro-batch
    save_every: int = 50
    log_every: int = 1
    seed: int = 0
    max_bad_steps: int = 5  # abort after this many NaN/inf steps in a row
    bias_update_speed: float = 0.001  # gamma of aux-loss-free balancing (V3)
    epochs: float = 1.0  # SFT: passes over the data (max_steps caps it)
    batch_size: int = 32  # SFT: sequences per optimizer step
    # FSDP2: shard policy, reference and optimizer state over the processes (r1pipe.training.fsdp); also on
    # when the accelerate launcher asks for FSDP (recipes/accelerate/fsdp2.yaml)
    fsdp: bool = False


@dataclass
class RejectSection:
    n: int = 16
    keep: Literal["correct", "all", "best"] = "correct"
    max_per_prompt: int = 4
    keep_truncated: bool = False  # R1 keeps only finished chains
    prompts: str = "tiny_arith:train"
    limit: int | None = None


@dataclass
class Recipe:
    stage: Literal["sft", "grpo", "reject", "align"] = "grpo"
    name: str = ""
    output_dir: str = "runs/default"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    # [{name, weight, kwargs, isolation, timeout_s, label}], checked by r1pipe.rewards.parse_reward_specs
    rewards: list = field(default_factory=lambda: [{"name": "accuracy", "weight": 1.0}, {"name": "format", "weight": 1.0}])
    rollout: RolloutSection = field(default_factory=RolloutSection)
    grpo: GRPOSection = field(default_factory=GRPOSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    reject: RejectSection = field(default_factory=RejectSection)
    source: str = field(default="", repr=False)


def load_recipe(path: str | Path, overrides: dict | None = None) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: expected a mapping of sections at the top level")
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    recipe = build(Recipe, raw, f"{path}")
    recipe.source = str(path)
    from r1pipe.rewards import parse_reward_specs

    try:  # every reward name must resolve before any work starts
        parse_reward_specs(recipe.rewards, base_dir=path.parent)
    except ValueError as e:
        raise RecipeError(f"{path}: {e}") from e
    return recipe


def build(cls, data: Any, where: str):
    """Dataclass `cls` from a dict, checking keys and types; errors name `where` + the key path."""
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            hint = difflib.get_close_matches(str(key), list(fields), n=1)
            suggestion = f"; did you mean {hint[0]!r}?" if hint else f"; known keys: {', '.join(fields)}"
            raise RecipeError(f"{where}: unknown key {key!r}{suggestion}")
        kwargs[key] = _convert(typing.get_type_hints(cls)[key], value, f"{where}: {key}")
    try:
        return cls(**kwargs)
    except RecipeError as e:  # a section's own check (__post_init__): name the file and section
        raise RecipeError(f"{where}: {e}") from e


def _convert(hint, value, where):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, where)
            except RecipeError as e:
                errors.append(str(e))
        raise RecipeError(errors[0])
    if origin is Literal:
        if value not in args:
            hint_ = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            extra = f"; did you mean {hint_[0]!r}?" if hint_ else ""
            raise RecipeError(f"{where}={value!r} is not one of {list(args)}{extra}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{where}: expected a list, got {value!r}")
        return [_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)] if args else value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool, dict) and not (isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        raise RecipeError(f"{where}: expected {hint.__name__}, got {value!r}")
    if hint is float and not isinstance(value, float):
        raise RecipeError(f"{where}: expected a number, got {value!r}")
    return value
