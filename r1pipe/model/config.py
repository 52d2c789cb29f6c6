"""Typed view of a DeepSeek-V2/V3 `config.json` (spec sections 4, 5, 7).

`DeepSeekConfig.from_dict` reads the published files as written (V2-Lite's softmax gating without
renormalisation, V3's sigmoid `noaux_tc` routing) and refuses what the policy cannot run, naming the key.
The raw dict is kept so `save_pretrained` writes the file back unchanged in form.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("deepseek_v3", "deepseek_v2")
SUPPORTED_TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")
SUPPORTED_SCORING = ("sigmoid", "softmax")


class ConfigError(ValueError):
    """A config.json the policy cannot run; the message names the file and key."""


@dataclass
class DeepSeekConfig:
    """Architecture hyper-parameters, named as in the published config.json files."""

    model_type: str = "deepseek_v3"
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432  # dense FFN of the first `first_k_dense_replace` layers
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    # MLA (spec section 5)
    q_lora_rank: int | None = 1536  # None: no query compression (V2-Lite)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # YaRN: {"type": "yarn", "factor", "original_max_position_embeddings", ...}
    rope_interleave: bool = True  # V3 checkpoints store the rope dims interleaved (pairs), V2 likewise
    max_position_embeddings: int = 4096
    attention_bias: bool = False
    # DeepSeekMoE (spec section 4)
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    # training-only knobs (not in published files; defaults are V3's)
    bias_update_speed: float = 0.001  # gamma of aux-loss-free balancing
    seq_aux_loss_alpha: float = 0.0  # alpha of the sequence-wise balance loss; 0 disables it
    # misc
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = None
    initializer_range: float = 0.02
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def uses_sigmoid_gate(self) -> bool:
        return self.scoring_func == "sigmoid"

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            self.n_routed_experts > 0
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    # ---- reading and writing config.json -------------------------------------------------------

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json") -> "DeepSeekConfig":
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: model_type {model_type!r} is not supported; expected one of {SUPPORTED_MODEL_TYPES}"
            )
        names = {f.name for f in dataclasses.fields(cls)} - {"raw"}
        kwargs = {k: v for k, v in d.items() if k in names}
        if kwargs.get("rope_theta") is None:  # transformers 5 writes null here and keeps it in rope_parameters
            kwargs.pop("rope_theta", None)
        # transformers 5 writes rope settings as `rope_parameters`; older files use rope_theta/rope_scaling.
        rope_params = d.get("rope_parameters")
        if isinstance(rope_params, dict):
            kwargs.setdefault("rope_theta", rope_params.get("rope_theta", cls.rope_theta))
            if rope_params.get("rope_type", "default") not in ("default", None) and not d.get("rope_scaling"):
                kwargs["rope_scaling"] = dict(rope_params)
        if model_type == "deepseek_v2":
            # V2 files default to softmax gating and carry no scoring_func/topk_method keys when greedy.
            kwargs.setdefault("scoring_func", "softmax")
            kwargs.setdefault("topk_method", "greedy")
            kwargs.setdefault("norm_topk_prob", False)
            kwargs.setdefault("routed_scaling_factor", 1.0)
            kwargs.setdefault("n_group", d.get("n_group") or 1)
            kwargs.setdefault("topk_group", d.get("topk_group") or 1)
        for key in ("n_group", "topk_group", "n_shared_experts", "n_routed_experts"):
            if kwargs.get(key) is None:
                kwargs[key] = 1 if key in ("n_group", "topk_group") else 0
        cfg = cls(**kwargs, raw=dict(d))
        cfg.validate(source)
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> "DeepSeekConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from e
        return cls.from_dict(d, source=str(path))

    def validate(self, source: str = "config.json") -> None:
        def bad(key: str, why: str) -> ConfigError:
            return ConfigError(f"{source}: {key}={getattr(self, key)!r} {why}")

        if self.topk_method not in SUPPORTED_TOPK_METHODS:
            raise bad("topk_method", f"is not supported; expected one of {SUPPORTED_TOPK_METHODS}")
        if self.scoring_func not in SUPPORTED_SCORING:
            raise bad("scoring_func", f"is not supported; expected one of {SUPPORTED_SCORING}")
        if self.hidden_act != "silu":
            raise bad("hidden_act", "is not supported; DeepSeekMoE experts are SwiGLU ('silu')")
        if self.n_routed_experts and self.n_routed_experts % self.n_group:
            raise bad("n_group", f"must divide n_routed_experts={self.n_routed_experts}")
        if self.topk_group > self.n_group:
            raise bad("topk_group", f"must be <= n_group={self.n_group}")
        if self.n_routed_experts and self.num_experts_per_tok > self.n_routed_experts:
            raise bad("num_experts_per_tok", f"must be <= n_routed_experts={self.n_routed_experts}")
        if self.rope_scaling:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            if kind not in ("yarn", "default", None):
                raise ConfigError(f"{source}: rope_scaling type {kind!r} is not supported; expected 'yarn'")

    def to_dict(self) -> dict[str, Any]:
        """config.json content: the original keys, updated with ours, plus what vLLM needs."""
        out = dict(self.raw)
        for f in dataclasses.fields(self):
            if f.name not in ("raw", "bias_update_speed", "seq_aux_loss_alpha"):
                out[f.name] = getattr(self, f.name)
        out.setdefault("num_key_value_heads", self.num_attention_heads)  # MLA: every head has its own k/v
        out.pop("rope_parameters", None)  # rope_theta/rope_scaling above are read by every loader
        out.setdefault("architectures", ["DeepseekV3ForCausalLM" if self.model_type == "deepseek_v3" else "DeepseekV2ForCausalLM"])
        return out
