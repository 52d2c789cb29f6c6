"""Routing metadata for the fused MoE kernels: (token, slot) pairs sorted by expert, and M-tiles.

Built without a host synchronisation, so the CUDA stream never stalls: on CUDA two Triton launches
(moe_kernels.routing_count_kernel, routing_scatter_kernel: a stable counting sort that also writes
the offsets and the tile map), on plain CPU tensors torch ops, the reference for those kernels.
moe_triton.py launches its grouped GEMMs over these tiles; moe_torch.py needs none of it.
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
    _by_kernel: bool = field(default=False, repr=False)  # tile maps for other block_m by kernel too

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
    """Sort the [T, K] expert choices by expert (stable). Ids must lie in [0, num_experts).

    On CUDA (or under TRITON_INTERPRET=1) two Triton launches sort the pairs and write the expert
    offsets and the tile map for block_m; elsewhere torch ops do, as the reference for them."""
    num_tokens, top_k = topk_ids.shape
    flat = topk_ids.reshape(-1)
    r = Routing(sorted_pair=None, sorted_token=None, expert_offsets=None,
                num_tokens=num_tokens, top_k=top_k, num_experts=num_experts)
    device = flat.device
    if flat.numel() == 0:
        r.sorted_pair = r.sorted_token = torch.zeros(0, dtype=torch.int32, device=device)
        r.expert_offsets = torch.zeros(num_experts + 1, dtype=torch.int32, device=device)
    elif use_kernel if use_kernel is not None else _use_kernel(flat):
        _route_by_kernel(r, flat.contiguous(), block_m)
    else:
        sorted_expert, sorted_pair = torch.sort(flat, stable=True)
        r.sorted_pair = sorted_pair.to(torch.int32)
        r.sorted_token = torch.div(sorted_pair, top_k, rounding_mode="floor").to(torch.int32)
        # sorted, so the extremes are the ends: an out-of-range id would silently drop pairs
        torch._assert_async((sorted_expert[0] >= 0) & (sorted_expert[-1] < num_experts), _BAD_IDS)
        bounds = torch.arange(num_experts + 1, device=device, dtype=sorted_expert.dtype)
        r.expert_offsets = torch.searchsorted(sorted_expert, bounds).to(torch.int32)
    return r


_BAD_IDS = "topk_ids holds an expert id outside [0, num_experts)"


def _use_kernel(t: torch.Tensor) -> bool:
    return t.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _route_by_kernel(r: Routing, flat: torch.Tensor, block_m: int) -> None:
    import triton

    from r1pipe.kernels.moe_kernels import routing_count_kernel, routing_scatter_kernel

    num_pairs, num_experts, device = flat.numel(), r.num_experts, flat.device
    e_pow2 = triton.next_power_of_2(num_experts)
    # a [block, e_pow2] one-hot per step (4096 elements: no register spills at 4 warps); each program
    # takes sub steps, at most max_programs programs. The interpreter pays per step, not per element:
    # there a few programs of about four steps each, still more than one of each.
    if _interpreting():
        block, max_programs = max(16, triton.next_power_of_2(triton.cdiv(num_pairs, 12))), 3
    else:
        block, max_programs = max(16, 4096 // e_pow2), 128
    sub = triton.cdiv(triton.cdiv(num_pairs, block), max_programs)
    num_chunks = triton.cdiv(num_pairs, block * sub)
    n_tiles = max_tiles(num_pairs, num_experts, block_m)
    counts = torch.empty(num_chunks, e_pow2, dtype=torch.int32, device=device)
    r.sorted_pair = torch.empty(num_pairs, dtype=torch.int32, device=device)
    r.sorted_token = torch.empty(num_pairs, dtype=torch.int32, device=device)
    r.expert_offsets = torch.empty(num_experts + 1, dtype=torch.int32, device=device)
    tile_expert = torch.empty(n_tiles, dtype=torch.int32, device=device)
    tile_start = torch.empty(n_tiles, dtype=torch.int32, device=device)
    valid = torch.empty(1, dtype=torch.int32, device=device)
    routing_count_kernel[(num_chunks,)](flat, counts, num_pairs, num_experts, sub,
                                        BLOCK=block, E_POW2=e_pow2, num_warps=4)
    routing_scatter_kernel[(num_chunks,)](
        flat, counts, r.sorted_pair, r.sorted_token, r.expert_offsets, valid, tile_expert, tile_start,
        num_pairs, num_experts, r.top_k, sub, num_chunks, n_tiles, triton.cdiv(n_tiles, num_chunks),
        BLOCK=block, E_POW2=e_pow2, BLOCK_C=32 if not _interpreting() else 2, BLOCK_M=block_m,
        BLOCK_T=32, num_warps=4)
    torch._assert_async(valid, _BAD_IDS)
    r._by_kernel = True
    r._tiles[block_m] = (tile_expert, tile_start)


def _tile_map(r: Routing, block_m: int):
    num_experts, num_pairs = r.num_experts, r.num_pairs
    n_tiles = max_tiles(num_pairs, num_experts, block_m)
    device = r.expert_offsets.device
    if r._by_kernel:
        import triton

        from r1pipe.kernels.moe_kernels import routing_tiles_kernel

        tile_expert = torch.empty(n_tiles, dtype=torch.int32, device=device)
        tile_start = torch.empty(n_tiles, dtype=torch.int32, device=device)
        routing_tiles_kernel[(1,)](r.expert_offsets, tile_expert, tile_start, num_experts, n_tiles,
                                   BLOCK_M=block_m, E_POW2=triton.next_power_of_2(num_experts),
                                   BLOCK_T=32, num_warps=4)
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
