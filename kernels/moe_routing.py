"""Routing metadata for the fused MoE kernels: (token, slot) pairs sorted by expert, and M-tiles.

Built without a host synchronisation, so the CUDA stream never stalls: torch.sort, then one Triton
program (moe_kernels.routing_tiles_kernel) or, on plain CPU tensors, torch ops. moe_triton.py
launches its grouped GEMMs over these tiles; moe_torch.py needs none of it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch


@dataclass
class Routing:
    """Token-expert pairs in expert order. A pair p = t*K + k is token t's k-th choice.

    sorted_pair [TK] int32: pair ids sorted by expert (stable, so ties keep token order).
    sorted_token [TK] int32: the token of each sorted row (sorted_pair // K).
    expert_offsets [E+1] int32: rows expert_offsets[e]:expert_offsets[e+1] belong to expert e.
    """

    sorted_pair: torch.Tensor
    sorted_token: torch.Tensor
    expert_offsets: torch.Tensor
    num_tokens: int
    top_k: int
    num_experts: int
    _tiles: dict = field(default_factory=dict, repr=False)
    _sorted_expert: torch.Tensor | None = field(default=None, repr=False)  # set: tiles by kernel

    @property
    def num_pairs(self) -> int:
        return self.num_tokens * self.top_k

    def tiles(self, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(tile_expert, tile_start), each [max_tiles] int32, for M-tiles of block_m rows.

        A tile never crosses an expert boundary. The tile count is data-dependent, so the
        arrays have the static upper bound cdiv(TK, block_m) + E and unused tiles carry
        tile_expert == E: kernels return at once for them instead of the host reading counts.
        """
        if block_m not in self._tiles:
            self._tiles[block_m] = _tile_map(self, block_m)
        return self._tiles[block_m]


def max_tiles(num_pairs: int, num_experts: int, block_m: int) -> int:
    # sum_e ceil(c_e / B) <= (TK + E (B - 1)) / B < cdiv(TK, B) + E
    return -(-num_pairs // block_m) + num_experts


def route(topk_ids: torch.Tensor, num_experts: int, block_m: int = 128,
          use_kernel: bool | None = None) -> Routing:
    """Sort the [T, K] expert choices by expert. Ids must lie in [0, num_experts).

    On CUDA (or under TRITON_INTERPRET=1) one Triton program finds the expert offsets and the
    tile map for block_m; elsewhere torch ops do, as the reference for that kernel."""
    num_tokens, top_k = topk_ids.shape
    flat = topk_ids.reshape(-1)
    sorted_expert, sorted_pair = torch.sort(flat, stable=True)
    r = Routing(
        sorted_pair=sorted_pair.to(torch.int32),
        sorted_token=torch.div(sorted_pair, top_k, rounding_mode="floor").to(torch.int32),
        expert_offsets=None,
        num_tokens=num_tokens,
        top_k=top_k,
        num_experts=num_experts,
    )
    if flat.numel() == 0:
        r.expert_offsets = torch.zeros(num_experts + 1, dtype=torch.int32, device=flat.device)
    elif use_kernel if use_kernel is not None else _use_kernel(flat):
        r._sorted_expert = sorted_expert
        r.expert_offsets = torch.empty(num_experts + 1, dtype=torch.int32, device=flat.device)
        r.tiles(block_m)
    else:
        # sorted, so the extremes are the ends: an out-of-range id would silently drop pairs
        torch._assert_async((sorted_expert[0] >= 0) & (sorted_expert[-1] < num_experts), _BAD_IDS)
        bounds = torch.arange(num_experts + 1, device=flat.device, dtype=sorted_expert.dtype)
        r.expert_offsets = torch.searchsorted(sorted_expert, bounds).to(torch.int32)
    return r


_BAD_IDS = "topk_ids holds an expert id outside [0, num_experts)"


def _use_kernel(t: torch.Tensor) -> bool:
    return t.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"


def _tile_map(r: Routing, block_m: int):
    num_experts, num_pairs = r.num_experts, r.num_pairs
    n_tiles = max_tiles(num_pairs, num_experts, block_m)
    device = r.expert_offsets.device
    if getattr(r, "_sorted_expert", None) is not None:
        import triton

        from r1pipe.kernels.moe_kernels import routing_tiles_kernel

        tile_expert = torch.empty(n_tiles, dtype=torch.int32, device=device)
        tile_start = torch.empty(n_tiles, dtype=torch.int32, device=device)
        valid = torch.empty(1, dtype=torch.int32, device=device)
        routing_tiles_kernel[(1,)](
            r._sorted_expert, r.expert_offsets, tile_expert, tile_start, valid,
            num_pairs, num_experts, n_tiles, num_pairs.bit_length() + 1,
            BLOCK_M=block_m, E_POW2=triton.next_power_of_2(num_experts + 1), BLOCK_T=32, num_warps=4)
        torch._assert_async(valid, _BAD_IDS)
        return tile_expert, tile_start
    offsets = r.expert_offsets.to(torch.int64)
    tiles_per_expert = (offsets[1:] - offsets[:-1] + block_m - 1) // block_m
    tiles_end = torch.cumsum(tiles_per_expert, 0)
    tile = torch.arange(n_tiles, device=device)
    expert = torch.searchsorted(tiles_end, tile, right=True)
    e = expert.clamp(max=num_experts - 1)
    first_tile_of_expert = tiles_end[e] - tiles_per_expert[e]
    start = offsets[e] + (tile - first_tile_of_expert) * block_m
    return expert.to(torch.int32), start.to(torch.int32)
