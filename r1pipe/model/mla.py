"""Multi-head Latent Attention (spec section 5), plus the attention-mask builder it uses.

Keys and values are expanded from the shared latent c^KV (kv_lora_rank) and a single rope key k^R shared by
all heads; attention runs through `scaled_dot_product_attention`. The decode cache (`LatentCache`) keeps only
c^KV and k^R per token, as MLA inference does. Neighbours: rope.py (positions), transformer.py (the block).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from r1pipe.model.config import DeepSeekConfig
from r1pipe.model.lean_autograd import rms_norm
from r1pipe.model.rope import apply_rope_interleaved, softmax_scale


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, cast back before the weight (transformers' DeepseekV3RMSNorm order)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)  # keeps x and 1/rms for backward, not a float32 copy of x


class LatentCache:
    """Per-layer decode cache of (normalised c^KV [B,1,S,d_c], roped k^R [B,1,S,d_rope]), plus the key mask."""

    def __init__(self, num_layers: int):
        self.latent: list[torch.Tensor | None] = [None] * num_layers
        self.rope_key: list[torch.Tensor | None] = [None] * num_layers
        self.key_mask: torch.Tensor | None = None  # [B, S] bool, True where a real token sits

    @property
    def length(self) -> int:
        return 0 if self.latent[0] is None else self.latent[0].shape[2]

    def update(self, layer: int, latent: torch.Tensor, rope_key: torch.Tensor):
        if self.latent[layer] is not None:
            latent = torch.cat([self.latent[layer], latent], dim=2)
            rope_key = torch.cat([self.rope_key[layer], rope_key], dim=2)
        self.latent[layer], self.rope_key[layer] = latent, rope_key
        return latent, rope_key

    def reorder(self, index: torch.Tensor) -> None:
        """Keep only batch rows `index` (finished sequences leave the batch)."""
        self.latent = [t.index_select(0, index) if t is not None else None for t in self.latent]
        self.rope_key = [t.index_select(0, index) if t is not None else None for t in self.rope_key]
        if self.key_mask is not None:
            self.key_mask = self.key_mask.index_select(0, index)


def _widened(t: torch.Tensor, max_len: int) -> torch.Tensor:
    """t with its column dimension (dim 2 of a [B,1,S,d] cache tensor, dim 1 of a [B,S] mask) zero-padded
    to max_len."""
    dim = 2 if t.dim() == 4 else 1
    out = t.new_zeros(*t.shape[:dim], max_len, *t.shape[dim + 1:])
    out.narrow(dim, 0, t.shape[dim]).copy_(t)
    return out


class StaticLatentCache:
    """A decode cache whose tensors never move or change shape, so a decode step can be captured once as a
    CUDA graph and replayed: per layer [B,1,S_max,d] buffers written at a column held in a device tensor,
    the valid-key mask [B,S_max], and each row's next position [B,1]; the step itself advances them.
    Built from the LatentCache of the (dynamic-shape) prompt pass by `from_prefill`."""

    static = True

    def __init__(self, latent, rope_key, valid, column, positions):
        self.latent, self.rope_key = latent, rope_key
        self.valid = valid  # [B, S_max] bool: a real token sits there
        self.column = column  # [1] long: where this step's token goes
        self.positions = positions  # [B, 1] long: this step's rope position per row

    @classmethod
    def from_prefill(cls, cache: LatentCache, max_len: int) -> "StaticLatentCache":
        width = cache.latent[0].shape[2]
        if max_len < width:
            raise ValueError(f"max_len={max_len} is shorter than the prompt pass's {width} columns")
        valid = _widened(cache.key_mask, max_len)
        return cls([_widened(t, max_len) for t in cache.latent], [_widened(t, max_len) for t in cache.rope_key], valid,
                   torch.tensor([width], device=valid.device), cache.key_mask.long().sum(-1, keepdim=True))

    @property
    def capacity(self) -> int:
        return self.valid.shape[1]

    def grown(self, max_len: int) -> "StaticLatentCache":
        """A copy with room for max_len columns (the same contents, column and positions)."""
        return StaticLatentCache([_widened(t, max_len) for t in self.latent],
                                 [_widened(t, max_len) for t in self.rope_key], _widened(self.valid, max_len),
                                 self.column.clone(), self.positions.clone())

    def state(self) -> tuple[torch.Tensor, ...]:
        """What a step changes besides the written column (for undoing a warm-up step)."""
        return self.valid.clone(), self.column.clone(), self.positions.clone()

    def restore(self, state) -> None:
        for live, saved in zip((self.valid, self.column, self.positions), state):
            live.copy_(saved)

    def begin_step(self) -> torch.Tensor:
        """Marks this step's column valid; the [B,1,1,S_max] key mask of the step's attention."""
        self.valid.index_fill_(1, self.column, True)
        return self.valid[:, None, None, :]

    def update(self, layer: int, latent: torch.Tensor, rope_key: torch.Tensor):
        self.latent[layer].index_copy_(2, self.column, latent)
        self.rope_key[layer].index_copy_(2, self.column, rope_key)
        return self.latent[layer], self.rope_key[layer]

    def end_step(self) -> None:
        self.column.add_(1)
        self.positions.add_(1)


class PackedSegments:
    """Packed sequences as a padded view for attention: `index` [n·Lmax] into the flattened [B*T] tokens (row
    by row of the view) and `slot` [B*T], each token's row in it. Attention then costs Σ len² instead of
    (B·T)² with a block-diagonal mask. Both are plain row gathers (`index_select`): no boolean mask (a host
    sync per layer) and a backward that adds rows rather than sorting indices (`index_put_`)."""

    def __init__(self, position_ids: torch.Tensor):
        flat = position_ids.reshape(-1)
        starts = torch.ones_like(flat, dtype=torch.bool)
        starts[1:] = flat[1:] != flat[:-1] + 1
        row_starts = torch.zeros_like(starts)
        row_starts[:: position_ids.shape[1]] = True
        starts |= row_starts  # a new row always starts a new sequence
        begin = starts.nonzero().squeeze(1)
        lengths = torch.diff(torch.cat([begin, begin.new_tensor([flat.numel()])]))
        self.width = width = int(lengths.max())
        offsets = torch.arange(width, device=flat.device)
        # padding past a sequence's end reads the batch's last token: its queries are dropped by `slot`, and a
        # real query never sees its keys (causal), so their gradients are exact zeros
        self.index = (begin[:, None] + offsets[None, :]).clamp(max=flat.numel() - 1).reshape(-1)
        segment = torch.cumsum(starts, 0) - 1
        self.slot = segment * width + (torch.arange(flat.numel(), device=flat.device) - begin[segment])

    def attend(self, q, k, v, scale: float) -> torch.Tensor:
        """q, k, v [B, heads, T, d] -> attention output [B, T, heads*dv] within each sequence."""
        b, heads, t, _ = q.shape

        def to_segments(x):
            flat = x.transpose(1, 2).reshape(b * t, heads, x.shape[-1])
            return flat.index_select(0, self.index).view(-1, self.width, heads, x.shape[-1]).transpose(1, 2)

        # Plain causal attention, no mask: each segment is right-padded, so a real query's causal window holds
        # only its own sequence's keys; padded queries see padding and are dropped below. Mask-free SDPA can
        # take the fused flash/cuDNN paths, which a dense [n, Lmax, Lmax] mask rules out.
        out = F.scaled_dot_product_attention(to_segments(q), to_segments(k), to_segments(v), is_causal=True, scale=scale)
        out = out.transpose(1, 2).reshape(-1, heads, out.shape[-1]).index_select(0, self.slot)  # token order
        return out.reshape(b, t, -1)


def build_attention_mask(
    position_ids: torch.Tensor, key_mask: torch.Tensor | None, past_length: int = 0
) -> torch.Tensor | None:
    """Boolean SDPA mask [B,1,Tq,Tk]: causal, never across packed sequences, never onto padding.

    Packed rows are recognised the way flash-attention's varlen path does: a position id that does not
    continue the previous one (a reset to 0) starts a new sequence. Returns None when plain causal suffices.
    """
    batch, tq = position_ids.shape
    tk = past_length + tq
    device = position_ids.device
    packed = tq > 1 and past_length == 0 and bool((position_ids[:, 1:] != position_ids[:, :-1] + 1).any())
    if not packed and key_mask is None and past_length == 0:
        return None
    if packed and key_mask is None:
        return PackedSegments(position_ids)
    q_index = torch.arange(past_length, tk, device=device)
    k_index = torch.arange(tk, device=device)
    mask = (k_index[None, :] <= q_index[:, None]).expand(batch, tq, tk)
    if packed:
        starts = torch.ones_like(position_ids, dtype=torch.bool)
        starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
        segment = starts.cumsum(-1)
        mask = mask & (segment[:, :, None] == segment[:, None, :])
    if key_mask is not None:
        mask = mask & key_mask[:, None, :].bool()
    # A query on padding would see no key at all and turn softmax into NaN; let it see itself.
    mask = mask | (k_index[None, None, :] == q_index[None, :, None])
    return mask[:, None]


# Decode one token against the cache in latent space (below); False expands keys and values per step
# instead (the reference path the tests compare it with).
ABSORB_DECODE = True


class MultiHeadLatentAttention(nn.Module):
    """MLA block; parameter names are the checkpoint's (`q_a_proj`, `kv_a_proj_with_mqa`, `kv_b_proj`, ...).

    Attributes: q_proj (no q compression) or q_a_proj/q_a_layernorm/q_b_proj; kv_a_proj_with_mqa (h -> [c^KV; k^R]);
    kv_a_layernorm; kv_b_proj (c^KV -> per-head [k^C; v]); o_proj.
    """

    def __init__(self, config: DeepSeekConfig, layer_idx: int):
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.num_heads = c.num_attention_heads
        self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        self.kv_lora_rank = c.kv_lora_rank
        self.q_lora_rank = c.q_lora_rank
        q_out = self.num_heads * c.qk_head_dim
        if c.q_lora_rank is None:
            self.q_proj = nn.Linear(c.hidden_size, q_out, bias=False)
        else:
            self.q_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank, bias=c.attention_bias)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank)
            self.q_b_proj = nn.Linear(c.q_lora_rank, q_out, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim, bias=c.attention_bias)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank)
        self.kv_b_proj = nn.Linear(c.kv_lora_rank, self.num_heads * (c.qk_nope_head_dim + c.v_head_dim), bias=False)
        self.o_proj = nn.Linear(self.num_heads * c.v_head_dim, c.hidden_size, bias=c.attention_bias)
        self.scale = softmax_scale(c)

    def forward(self, h, cos, sin, attn_mask=None, cache: LatentCache | None = None):
        b, t, _ = h.shape
        q = self.q_proj(h) if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(h)))
        q = q.view(b, t, self.num_heads, -1).transpose(1, 2)
        q_nope, q_rope = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(h).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_layernorm(latent).view(b, 1, t, self.kv_lora_rank)
        k_rope = apply_rope_interleaved(k_rope.view(b, 1, t, self.qk_rope_head_dim), cos, sin)
        q_rope = apply_rope_interleaved(q_rope, cos, sin)
        if cache is not None:
            latent, k_rope = cache.update(self.layer_idx, latent, k_rope)
            if t == 1 and ABSORB_DECODE:
                return self.o_proj(self._absorbed_decode(q_nope, q_rope, latent, k_rope, attn_mask).reshape(b, 1, -1))
        s = latent.shape[2]
        kv = self.kv_b_proj(latent).view(b, s, self.num_heads, -1).transpose(1, 2)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(-1, self.num_heads, -1, -1)], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        if isinstance(attn_mask, PackedSegments):
            return self.o_proj(attn_mask.attend(q, k, v, self.scale))
        is_causal = attn_mask is None and t > 1  # build_attention_mask returns None only for plain causal
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))

    def _absorbed_decode(self, q_nope, q_rope, latent, k_rope, attn_mask) -> torch.Tensor:
        """Attention of one new token per row without expanding the cache: kv_b_proj's key half is folded
        into the query (q^C W_UK, d_c wide) and its value half applied after the weighted sum over c^KV, so a
        step costs O(S * d_c) per head instead of re-projecting all S cached latents (DeepSeek-V2 §2.1.3).
        q_nope [B,H,1,dn], q_rope [B,H,1,dr], latent [B,1,S,d_c], k_rope [B,1,S,dr] -> [B,1,H,dv]."""
        w = self.kv_b_proj.weight.view(self.num_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        w_uk, w_uv = w.split([self.qk_nope_head_dim, self.v_head_dim], dim=1)
        q_latent = torch.einsum("bhtd,hdc->bhtc", q_nope, w_uk).squeeze(2)  # [B,H,d_c]
        # batched [H, d] x [d, S] products: a broadcasting matmul of [B,H,1,d] with the cache's [B,1,d,S] would
        # first copy the cache once per head (the decode step's biggest memory traffic)
        lat, rope = latent.squeeze(1), k_rope.squeeze(1)  # [B,S,d_c], [B,S,dr]
        scores = (torch.bmm(q_latent, lat.transpose(1, 2)) + torch.bmm(q_rope.squeeze(2), rope.transpose(1, 2)))
        scores = scores.float().unsqueeze(2) * self.scale  # [B,H,1,S]
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
        probs = scores.softmax(-1).to(latent.dtype)
        out_latent = torch.bmm(probs.squeeze(2), lat).unsqueeze(2)  # [B,H,1,d_c]
        return torch.einsum("bhtc,hvc->bthv", out_latent, w_uv)
