"""Triton path of the fused MoE layer: tile configs, kernel launchers and the autograd Function.

Forward keeps only x, the gate/up pre-activations [TK, 2I] and the routing (moe_routing.py); backward
rebuilds h from them. Kernels live in moe_kernels.py; moe.py dispatches here on CUDA.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton

from r1pipe.kernels import moe_kernels as K
from r1pipe.kernels.moe_routing import Routing, route

# Read once, as Triton does when it decorates the kernels at import.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Tests set this: kernel outputs start as NaN, so an element no program wrote cannot pass as zero.
POISON_OUTPUTS = False


def _empty(*shape, like: torch.Tensor, dtype=None) -> torch.Tensor:
    t = torch.empty(*shape, device=like.device, dtype=dtype or like.dtype)
    return t.fill_(float("nan")) if POISON_OUTPUTS else t


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    fused_epilogue: bool = True  # down_bwd only: SwiGLU backward in the GEMM epilogue or its own pass
    tma: bool = False  # gate_up, down, dx: TMA descriptor loads of the weight / sorted-row operand tiles
    # gate_up, down, dx: an expert's last M-tile with at most block_m/2 rows runs at half height
    split_tail: bool = False
    # gate_up, down, dx, down_bwd: GROUP_M-tile groups stay inside one expert (moe_kernels._tile_of)
    expert_groups: bool = False

    def launch(self) -> dict:
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_K=self.block_k,
                    GROUP_M=self.group_m, num_warps=self.num_warps, num_stages=self.num_stages)


# Kernel names: gate_up (fwd 1), down (fwd 2), down_bwd, dx, dw (both weight gradients).
KERNELS = ("gate_up", "down", "down_bwd", "dx", "dw")
# Regimes by rows per expert (T*K/E): small batches are bound by reading the expert weights and want
# M-tiles that hold one expert's rows; large ones are bound by the tensor cores and want big tiles.
REGIMES = ((24, "tiny"), (64, "small"), (224, "medium"), (1024, "large"), (float("inf"), "xlarge"))

_T = TileConfig
# bf16/fp16 on an H100: the fastest of scripts/bench_moe.py --sweep/--explore (benchmarks/moe_h100.md;
# tma=True: weight tiles, and the sorted rows of down/dx, load through TMA descriptors; split_tail:
# an expert's last tile of <= block_m/2 rows runs at half height; expert_groups: the tiles that sweep
# N together stay inside one expert). The SwiGLU backward fused into the down-backward epilogue
# spills registers there, hence its own pass.
_SPLIT_EG = dict(split_tail=True, expert_groups=True)
_TUNED = {
    ("gate_up", "xlarge"): _T(128, 128, 64, 8, 8, 4, tma=True, expert_groups=True),
    ("gate_up", "large"): _T(128, 128, 64, 8, 8, 4, tma=True, **_SPLIT_EG),
    ("gate_up", "medium"): _T(128, 128, 64, 8, 8, 4, tma=True, **_SPLIT_EG),
    ("gate_up", "small"): _T(64, 64, 128, 8, 4, 4, tma=True),
    ("gate_up", "tiny"): _T(16, 64, 128, 8, 4, 4),
    ("down", "xlarge"): _T(128, 256, 64, 8, 8, 3, tma=True, split_tail=True),
    ("down", "large"): _T(128, 256, 64, 8, 8, 3, tma=True, **_SPLIT_EG),
    ("down", "medium"): _T(128, 256, 64, 8, 8, 4, tma=True, **_SPLIT_EG),
    ("down", "small"): _T(64, 128, 64, 8, 4, 4, tma=True),
    ("down", "tiny"): _T(16, 64, 128, 8, 4, 4),
    ("dx", "xlarge"): _T(128, 256, 64, 8, 8, 4, tma=True, split_tail=True),
    ("dx", "large"): _T(128, 256, 64, 8, 8, 4, **_SPLIT_EG),
    ("dx", "medium"): _T(128, 256, 64, 8, 8, 3), ("dx", "small"): _T(32, 128, 64, 8, 4, 4),
    ("dx", "tiny"): _T(32, 128, 64, 8, 4, 4),
    ("down_bwd", "xlarge"): _T(128, 256, 64, 8, 8, 3, fused_epilogue=False),
    ("down_bwd", "large"): _T(128, 256, 64, 8, 8, 3, fused_epilogue=False, expert_groups=True),
    ("down_bwd", "medium"): _T(128, 256, 64, 8, 8, 3, fused_epilogue=False),
    ("down_bwd", "small"): _T(32, 128, 64, 8, 4, 4, fused_epilogue=False),
    ("down_bwd", "tiny"): _T(32, 128, 64, 8, 4, 4, fused_epilogue=False),
}
_DW = _T(128, 128, 32, 8, 4, 5)  # its M, N are weight dims whatever the batch
_overrides: dict[tuple[str, str], TileConfig] = {}


def regime(rows_per_expert: float) -> str:
    return next(name for bound, name in REGIMES if rows_per_expert < bound)


def set_tile_configs(configs: dict[tuple[str, str], TileConfig] | None) -> None:
    """Pin tile configs by (kernel, regime) (benchmark sweeps, tests); None restores the table."""
    _overrides.clear()
    for kernel, reg in configs or {}:
        if kernel not in KERNELS or reg not in [name for _, name in REGIMES]:
            raise ValueError(f"unknown MoE tile key {(kernel, reg)}; expected a kernel of {KERNELS} "
                             f"and a regime of {[name for _, name in REGIMES]}")
    _overrides.update(configs or {})


def tile_config(kernel: str, rows_per_expert: float, dtype: torch.dtype) -> TileConfig:
    key = (kernel, regime(rows_per_expert))
    if key in _overrides:
        return _overrides[key]
    if _INTERPRET:  # each program is slow there: few, but still several tiles and masked edges
        if kernel == "dw":
            return TileConfig(32, 32, 16, group_m=2, num_warps=1, num_stages=1)
        return TileConfig(16, 32, 32, group_m=2, num_warps=1, num_stages=1, fused_epilogue=False)
    if dtype == torch.float32:  # exact fp32 runs on FMA units: small tiles, little shared memory
        return TileConfig(64, 64, 32, num_warps=4, num_stages=2)
    return _DW if kernel == "dw" else _TUNED[key]


def _common(x: torch.Tensor) -> dict:
    return dict(UPCAST=_INTERPRET and x.dtype != torch.float32, IEEE=x.dtype == torch.float32)


def _descriptor(t: torch.Tensor, rows: int, block: list[int], cfg: TileConfig):
    """A TMA descriptor over t viewed as [rows, t.numel() // rows] (row-major, contiguous), or None
    where cfg does not ask for one or the layout does not allow it (16-byte aligned rows)."""
    if not cfg.tma or not t.is_contiguous() or t.numel() == 0:
        return None
    cols = t.numel() // rows
    if t.data_ptr() % 16 or (cols * t.element_size()) % 16:
        return None
    from triton.tools.tensor_descriptor import TensorDescriptor
    return TensorDescriptor.from_tensor(t.view(rows, cols), block)


def gate_up_swiglu(x, gate_up_proj, r: Routing, save_gu: bool):
    """h [TK, I] = silu(gate) * up per sorted row; gu [TK, 2I] = (gate, up) pre-activations if save_gu."""
    E, two_i, H = gate_up_proj.shape
    I = two_i // 2
    cfg = tile_config("gate_up", r.num_pairs / E, x.dtype)
    h = _empty(r.num_pairs, I, like=x)
    gu = _empty(r.num_pairs, two_i, like=x) if save_gu else h
    tile_expert, tile_start = r.tiles(cfg.block_m)
    num_tiles = tile_expert.numel()
    grid = (num_tiles * triton.cdiv(I, cfg.block_n),)
    w_desc = _descriptor(gate_up_proj, E * two_i, [cfg.block_n, cfg.block_k], cfg)
    K.gate_up_swiglu_kernel[grid](
        x, gate_up_proj, gate_up_proj if w_desc is None else w_desc, h, gu, r.sorted_token, tile_expert,
        tile_start, r.expert_offsets, num_tiles, E, H, I, x.stride(0), *gate_up_proj.stride(),
        SAVE_GU=save_gu, W_TMA=w_desc is not None, EVEN_K=H % cfg.block_k == 0, SPLIT_TAIL=cfg.split_tail,
        EXPERT_GROUPS=cfg.expert_groups, **_common(x), **cfg.launch())
    return h, (gu if save_gu else None)


def rows_matmul(a, w, w_strides_enk, n: int, r: Routing, scale, kernel: str):
    """out [TK, n] in pair order: out[pair[r]] = scale[pair[r]] * a[r] @ W_e; W_e[k, j] = w[e] at strides."""
    E = w.shape[0]
    kd = a.shape[1]
    cfg = tile_config(kernel, r.num_pairs / E, a.dtype)
    out = _empty(r.num_pairs, n, like=a)
    tile_expert, tile_start = r.tiles(cfg.block_m)
    num_tiles = tile_expert.numel()
    grid = (num_tiles * triton.cdiv(n, cfg.block_n),)
    a_desc = _descriptor(a, a.shape[0], [cfg.block_m, cfg.block_k], cfg)
    # W_e[k, j] as a [E*n, kd] matrix (k contiguous): the down projection's own layout
    w_desc = _descriptor(w, E * n, [cfg.block_n, cfg.block_k], cfg) \
        if tuple(w_strides_enk) == (n * kd, kd, 1) else None
    K.rows_matmul_kernel[grid](
        a, a if a_desc is None else a_desc, w, w if w_desc is None else w_desc, out,
        scale if scale is not None else a, r.sorted_pair, tile_expert, tile_start,
        r.expert_offsets, num_tiles, E, n, kd, *w_strides_enk,
        HAS_SCALE=scale is not None, A_TMA=a_desc is not None, W_TMA=w_desc is not None,
        EVEN_K=kd % cfg.block_k == 0, SPLIT_TAIL=cfg.split_tail,
        EXPERT_GROUPS=cfg.expert_groups, **_common(a), **cfg.launch())
    return out


def down_backward(dout, down_proj, gu, topk_weights_flat, r: Routing, dgu_out):
    """dgu [TK, 2I] (written into dgu_out, which may be gu itself), hw = w*h [TK, I] and
    dw [TK] (fp32, pair order) for dout [T, H]."""
    E, H, I = down_proj.shape
    cfg = tile_config("down_bwd", r.num_pairs / E, dout.dtype)
    num_n = triton.cdiv(I, cfg.block_n)
    hw = _empty(r.num_pairs, I, like=dout)
    dw_part = _empty(num_n if cfg.fused_epilogue else 1, r.num_pairs, like=dout, dtype=torch.float32)
    tile_expert, tile_start = r.tiles(cfg.block_m)
    num_tiles = tile_expert.numel()
    # W_d[e] is [H, I]; dA = dout @ W_d[e]: k runs over H (stride I), n over I (stride 1)
    K.down_backward_kernel[(num_tiles * num_n,)](
        dout, down_proj, gu, topk_weights_flat, dgu_out, hw, dw_part,
        r.sorted_token, r.sorted_pair, tile_expert, tile_start, r.expert_offsets,
        num_tiles, E, H, I, r.num_pairs, dout.stride(0),
        down_proj.stride(0), down_proj.stride(2), down_proj.stride(1),
        FUSED=cfg.fused_epilogue, EVEN_K=H % cfg.block_k == 0, EXPERT_GROUPS=cfg.expert_groups,
        **_common(dout), **cfg.launch())
    if cfg.fused_epilogue:
        dw = _empty(r.num_pairs, like=dout, dtype=torch.float32)
        dw[r.sorted_pair.long()] = dw_part.sum(dim=0)
        return dgu_out, hw, dw
    block_r = 16 if not _INTERPRET else 8
    K.swiglu_backward_kernel[(triton.cdiv(r.num_pairs, block_r),)](
        gu, hw, topk_weights_flat, dgu_out, dw_part, r.sorted_pair, r.num_pairs, I,
        BLOCK_R=block_r, BLOCK_I=256 if not _INTERPRET else 16, num_warps=4)
    return dgu_out, hw, dw_part.view(-1)


def expert_weight_grad(a, a_gather: bool, b, b_gather: bool, r: Routing, num_experts: int):
    """[E, M, N]: per expert, the sum over its rows of A[row]^T B[row] (gathered rows use the token)."""
    M, N = a.shape[1], b.shape[1]
    cfg = tile_config("dw", r.num_pairs / num_experts, a.dtype)
    out = _empty(num_experts, M, N, like=a)
    grid = (num_experts * triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n),)
    K.expert_weight_grad_kernel[grid](
        a, b, out, r.sorted_token, r.expert_offsets, M, N, a.stride(0), b.stride(0),
        A_GATHER=a_gather, B_GATHER=b_gather, **_common(a), **cfg.launch())
    return out


def _sum_slots(pairs: torch.Tensor, r: Routing) -> torch.Tensor:
    # [TK, H] in pair order -> [T, H]; torch's reduction accumulates bf16 in fp32
    return pairs.view(r.num_tokens, r.top_k, -1).sum(dim=1)


def fused_forward(x, gate_up_proj, down_proj, topk_ids, topk_weights, save_gu: bool):
    """out [T, H], plus the routing and the gate/up pre-activations when save_gu (for backward)."""
    E = gate_up_proj.shape[0]
    r = route(topk_ids, E, tile_config("gate_up", topk_ids.numel() / E, x.dtype).block_m)
    h, gu = gate_up_swiglu(x, gate_up_proj, r, save_gu=save_gu)
    # W_d[e] is [H, I]; y = h @ W_d[e]^T: k runs over I (stride 1), n over H (stride I)
    y = rows_matmul(h, down_proj, (down_proj.stride(0), down_proj.stride(1), down_proj.stride(2)),
                    x.shape[1], r, topk_weights.contiguous().view(-1), "down")
    del h
    return _sum_slots(y, r), r, gu


class FusedMoEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate_up_proj, down_proj, topk_ids, topk_weights):
        T, H = x.shape
        ctx.empty = T * topk_ids.shape[1] == 0
        if ctx.empty:
            ctx.save_for_backward(x, gate_up_proj, down_proj, topk_weights)
            return x.new_zeros(T, H)
        x = x.contiguous()
        out, ctx.routing, gu = fused_forward(x, gate_up_proj, down_proj, topk_ids, topk_weights, True)
        ctx.backward_done = False
        ctx.save_for_backward(x, gate_up_proj, down_proj, topk_weights, gu)
        return out

    @staticmethod
    def backward(ctx, dout):
        need_x, need_gu, need_d, _, need_w = ctx.needs_input_grad
        if ctx.empty:
            x, gate_up_proj, down_proj, topk_weights = ctx.saved_tensors
            return (torch.zeros_like(x) if need_x else None,
                    torch.zeros_like(gate_up_proj) if need_gu else None,
                    torch.zeros_like(down_proj) if need_d else None, None,
                    torch.zeros_like(topk_weights) if need_w else None)
        if ctx.backward_done:
            raise RuntimeError("fused_moe: backward through the same forward ran twice; its saved "
                               "gate/up pre-activations are overwritten by the first (memory). Run "
                               "the forward again, or use r1pipe.kernels.moe_reference for retain_graph.")
        ctx.backward_done = True
        x, gate_up_proj, down_proj, topk_weights, gu = ctx.saved_tensors
        r: Routing = ctx.routing
        E = gate_up_proj.shape[0]
        dout = dout.contiguous()
        # dgu overwrites gu in place: each element is read, then written, by one program only
        dgu, hw, dw = down_backward(dout, down_proj, gu, topk_weights.contiguous().view(-1), r, gu)
        dx = d_gate_up = d_down = d_topk = None
        if need_w:
            d_topk = dw.view_as(topk_weights).to(topk_weights.dtype)
        if need_x:
            # W_gu[e] is [2I, H]; dx = dgu @ W_gu[e]: k runs over 2I (stride H), n over H (stride 1)
            strides = (gate_up_proj.stride(0), gate_up_proj.stride(2), gate_up_proj.stride(1))
            dx = _sum_slots(rows_matmul(dgu, gate_up_proj, strides, x.shape[1], r, None, "dx"), r)
        if need_gu:
            d_gate_up = expert_weight_grad(dgu, False, x, True, r, E)
        if need_d:
            d_down = expert_weight_grad(dout, True, hw, False, r, E)
        return dx, d_gate_up, d_down, None, d_topk


def fused_moe_triton(x, gate_up_proj, down_proj, topk_ids, topk_weights):
    gate_up_proj, down_proj = gate_up_proj.contiguous(), down_proj.contiguous()
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, gate_up_proj, down_proj, topk_weights)):
        return FusedMoEFunction.apply(x, gate_up_proj, down_proj, topk_ids, topk_weights)
    # no graph (log-probs of the old / reference policy, rollouts): skip saving the pre-activations,
    # which ctx.needs_input_grad would still ask for under torch.no_grad
    if x.shape[0] * topk_ids.shape[1] == 0:
        return x.new_zeros(x.shape)
    return fused_forward(x.contiguous(), gate_up_proj, down_proj, topk_ids, topk_weights, False)[0]
