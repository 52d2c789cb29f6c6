"""The DeepSeekMoE/MLA causal LM (`DeepSeekPolicy`): embedding, blocks (MLA + dense or MoE FFN), final
norm, lm_head. Module names equal the checkpoint keys (`model.layers.{l}.self_attn...`), so checkpoint.py
only has to split/fuse the expert tensors.

Besides logits, the policy exposes `hidden_states` and `lm_head.weight` separately, and `token_logprobs`,
which feeds them to the fused log-prob kernel so training never materialises [tokens x vocab] logits.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from r1pipe.model.config import DeepSeekConfig
from r1pipe.model.mla import LatentCache, MultiHeadLatentAttention, RMSNorm, build_attention_mask
from r1pipe.model.moe import MLP, DeepSeekMoE
from r1pipe.model.rope import rope_inv_freq, rope_tables


@dataclass
class CausalLMOutput:
    logits: torch.Tensor
    hidden_states: torch.Tensor


class DecoderBlock(nn.Module):
    """Pre-norm block: h += MLA(norm(h)); h += FFN(norm(h)), FFN dense for the first k layers, else MoE."""

    def __init__(self, config: DeepSeekConfig, layer_idx: int):
        super().__init__()
        self.self_attn = MultiHeadLatentAttention(config, layer_idx)
        self.is_moe = config.is_moe_layer(layer_idx)
        self.mlp = DeepSeekMoE(config) if self.is_moe else MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, h, cos, sin, attn_mask=None, cache=None, token_mask=None):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, attn_mask, cache)
        normed = self.post_attention_layernorm(h)
        return h + (self.mlp(normed, token_mask) if self.is_moe else self.mlp(normed))


class DeepSeekBackbone(nn.Module):
    """`model.*` of the checkpoint: embed_tokens, layers, norm."""

    def __init__(self, config: DeepSeekConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class DeepSeekPolicy(nn.Module):
    """The policy. Call it on input_ids [B,T] for `.logits` [B,T,V]; see module docstring for the rest."""

    def __init__(self, config: DeepSeekConfig):
        super().__init__()
        self.config = config
        self.model = DeepSeekBackbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        inv_freq, self.rope_attention_factor = rope_inv_freq(config)
        self.register_buffer("rope_inv_freq", inv_freq, persistent=False)
        self.gradient_checkpointing = False

    # ---- forward ----------------------------------------------------------------------------------

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: LatentCache | None = None,
    ) -> torch.Tensor:
        """Final normed hidden states [B, T, H].

        attention_mask [B, T] (1 = real token) handles left/right padding; position_ids that restart at 0
        inside a row mark packed sequences (attention never crosses them). With a cache, attention_mask
        covers only the new tokens; the cache remembers the earlier ones.
        """
        static = getattr(cache, "static", False)
        if static:  # one decode token per row against a StaticLatentCache: no host syncs, no data-dependent
            # shapes, so the whole step can be captured as a CUDA graph
            position_ids, attn_mask, token_mask = cache.positions, cache.begin_step(), None
        else:
            position_ids, attn_mask, token_mask = self._attention_inputs(input_ids, attention_mask, position_ids, cache)
        h = self.model.embed_tokens(input_ids)
        cos, sin = rope_tables(self.rope_inv_freq, self.rope_attention_factor, position_ids, h.dtype)
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training:
                h = torch.utils.checkpoint.checkpoint(layer, h, cos, sin, attn_mask, None, token_mask, use_reentrant=False)
            else:
                h = layer(h, cos, sin, attn_mask, cache, token_mask)
        if static:
            cache.end_step()
        return self.model.norm(h)

    def _attention_inputs(self, input_ids, attention_mask, position_ids, cache):
        """(position_ids, attention mask for the layers, token mask for MoE load counts); records the new
        tokens' key mask in a growing LatentCache."""
        past = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = _default_positions(input_ids, attention_mask, cache)
        key_mask = attention_mask.bool() if attention_mask is not None else None
        if cache is not None:
            if key_mask is None:
                key_mask = torch.ones_like(input_ids, dtype=torch.bool)
            if cache.key_mask is not None:
                key_mask = torch.cat([cache.key_mask, key_mask], dim=1)
            cache.key_mask = key_mask
            if past == 0 and bool(key_mask.all()):
                key_mask = None
        elif key_mask is not None and bool(key_mask.all()):
            key_mask = None
        token_mask = attention_mask.bool() if attention_mask is not None else None
        return position_ids, build_attention_mask(position_ids, key_mask, past), token_mask

    def forward(
        self,
        input_ids,
        attention_mask=None,
        position_ids=None,
        cache=None,
        targets: torch.Tensor | None = None,
        temperature: float = 1.0,
        return_entropy: bool = False,
    ):
        """Logits (a `CausalLMOutput`), or with `targets` the per-token log-probs [B, T] (and entropy).

        targets[b, t] is the token that follows position t (-100 where no log-prob is wanted). That path
        goes through the fused log-prob kernel and never materialises [tokens x vocab] logits; it lives in
        forward so that DDP/FSDP wrappers see it.
        """
        hidden = self.hidden_states(input_ids, attention_mask, position_ids, cache)
        if targets is None:
            return CausalLMOutput(logits=self.lm_head(hidden), hidden_states=hidden)
        from r1pipe.kernels import fused_linear_logprobs

        b, t, h = hidden.shape
        flat_targets = targets.reshape(-1)
        # Only positions with a target go through the LM head: prompt positions of a packed GRPO row are a
        # quarter or more of its tokens, and the [tokens x vocab] product is the biggest GEMM of the model.
        rows = (flat_targets != -100).nonzero().squeeze(1)
        if rows.numel() == 0:  # nothing to score: zeros still joined to the graph (no empty kernel launch)
            zero = hidden.sum() * 0.0 + torch.zeros(b, t, device=hidden.device, dtype=torch.float32)
            return (zero, zero.clone()) if return_entropy else zero
        out = fused_linear_logprobs(
            hidden.reshape(b * t, h).index_select(0, rows), self.lm_head.weight, flat_targets.index_select(0, rows),
            temperature=temperature, return_entropy=return_entropy,
        )
        outs = out if return_entropy else (out,)
        full = [o.new_zeros(b * t).index_copy(0, rows, o).view(b, t) for o in outs]
        return tuple(full) if return_entropy else full[0]

    def token_logprobs(self, input_ids, targets, attention_mask=None, position_ids=None, temperature=1.0, return_entropy=False):
        """Per-token log π(targets) (see forward)."""
        return self(input_ids, attention_mask, position_ids, targets=targets, temperature=temperature, return_entropy=return_entropy)

    # ---- MoE balancing ----------------------------------------------------------------------------

    def moe_layers(self) -> list[DeepSeekMoE]:
        return [layer.mlp for layer in self.model.layers if layer.is_moe]

    def expert_loads(self) -> torch.Tensor:
        """[n_moe_layers, E] token counts of the last forward (sum them over micro-batches and ranks)."""
        layers = self.moe_layers()
        if not layers:
            return torch.zeros(0, 0)
        return torch.stack([m.last_expert_load for m in layers])

    def update_expert_bias(self, loads: torch.Tensor | None = None, gamma: float | None = None) -> None:
        for i, moe in enumerate(self.moe_layers()):
            moe.update_bias(None if loads is None else loads[i], gamma)

    def balance_loss(self) -> torch.Tensor | None:
        losses = [m.aux_loss for m in self.moe_layers() if m.aux_loss is not None]
        return torch.stack(losses).sum() if losses else None

    # ---- construction and files -------------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self, seed: int | None = None, std: float | None = None) -> "DeepSeekPolicy":
        """Random init (normal(0, initializer_range) matrices, unit norms), for from-scratch models.

        Draws on the parameters' device (a GPU-built model initialises there, fast): a seed gives the same
        weights on the same kind of device."""
        device = next(self.parameters()).device
        gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range if std is None else std
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32, device=device) * std)
        return self

    @classmethod
    def from_config(cls, config: DeepSeekConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> "DeepSeekPolicy":
        return cls(config).init_weights(seed).cast_parameters(dtype)

    def nonpersistent_buffers(self) -> list[tuple[str, torch.Tensor]]:
        """(name, buffer) of the buffers a state_dict leaves out: rope frequencies, expert loads."""
        persistent = set(self.state_dict())
        return [(name, b) for name, b in self.named_buffers() if name not in persistent]

    def cast_parameters(self, dtype: torch.dtype) -> "DeepSeekPolicy":
        """The parameters in `dtype`; the buffers stay float32, as a loaded checkpoint keeps them (rope
        frequencies; the balancing bias, whose ±γ steps of 1e-3 vanish in bf16; expert loads). `.to(dtype)`
        would cast those too."""
        for p in self.parameters():
            p.data = p.data.to(dtype)
        return self

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
        from r1pipe.model.checkpoint import load_policy

        return load_policy(cls, path, dtype=dtype, device=device)

    def save_pretrained(self, path: str | Path, tokenizer=None, max_shard_bytes: int = 4 << 30) -> Path:
        from r1pipe.model.checkpoint import save_policy

        return save_policy(self, path, tokenizer=tokenizer, max_shard_bytes=max_shard_bytes)


def _default_positions(input_ids, attention_mask, cache):
    past = cache.length if cache is not None else 0
    if attention_mask is None and (cache is None or cache.key_mask is None):
        return torch.arange(past, past + input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    # Left padding: a row's first real token is position 0, whatever padding precedes it.
    seen = cache.key_mask.long().sum(-1, keepdim=True) if cache is not None and cache.key_mask is not None else 0
    mask = attention_mask.long() if attention_mask is not None else torch.ones_like(input_ids)
    return (seen + mask.cumsum(-1) - 1).clamp(min=0)
