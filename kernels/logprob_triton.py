"""Triton kernels of the fused linear log-prob (lm_head GEMM -> log-softmax -> gather, + entropy).

`lse_forward` streams vocab tiles per row block with an online base-2 logsumexp; `dlogits_chunk`
recomputes one vocab chunk of logits and writes its bf16/fp16/fp32 logit gradient, which
`r1pipe.kernels.logprob` then feeds to cuBLAS for dH and dW. Imported lazily: importing triton
and decorating kernels happens only when the Triton path is used.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

LN2 = math.log(2.0)
LOG2E = 1.0 / LN2


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class TileConfig:
    """Block shape and launch knobs of one kernel (tiles_per_prog only matters in the forward)."""

    block_m: int = 128
    block_n: int = 256
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 3
    group_m: int = 8
    tiles_per_prog: int = 8
    use_tma: bool = True
    flatten: bool = False  # pipeline loads across tile boundaries (one flattened loop)
    persistent: int = 0  # backward: programs per SM looping over tiles; 0 = one tile each


# Picked on an H100 by `scripts/bench_logprob.py --sweep` (benchmarks/logprob_sweep_h100.txt):
# TMA beat plain loads by 6-8%; flattened / persistent loops won under 2%, inside the noise.
HOPPER_FWD = TileConfig(128, 256, 64, 8, 3, 16, 8, True)
HOPPER_BWD = TileConfig(128, 256, 64, 8, 3, 16, 1, True)
# The interpreter runs numpy per program: small tiles keep CI fast; fp32 tiles need half the smem.
INTERPRET = TileConfig(32, 64, 32, 4, 1, 2, 2, False, persistent=1)


def default_config(dtype: torch.dtype, backward: bool) -> TileConfig:
    if interpreting():
        return INTERPRET
    cfg = HOPPER_BWD if backward else HOPPER_FWD
    if dtype == torch.float32:  # 4-byte operands: halve K so three stages still fit in shared memory
        cfg = replace(cfg, block_k=32)
    if not _tma_ok():
        cfg = replace(cfg, use_tma=False)
    return cfg


def _tma_ok() -> bool:
    if interpreting() or not torch.cuda.is_available():
        return False
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.get_device_capability()[0] >= 9


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs follow torch's own matmul setting, so our logits match `hidden @ weight.T`.
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


@triton.jit
def _grouped_pid(pid, num_m, num_n, GROUP_M: tl.constexpr):
    # Neighbouring programs share row blocks and vocab tiles, so both stay in L2.
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def _logits_tile(h_ptr, w_ptr, h_desc, w_desc, off_m, off_n, N, V, H, stride_h, stride_w,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 USE_TMA: tl.constexpr, EVEN_K: tl.constexpr, DOT_F32: tl.constexpr,
                 PRECISION: tl.constexpr):
    """hidden[off_m:+BM] @ weight[off_n:+BN].T in fp32; rows/cols past N/V are garbage, never NaN."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # Wrapping out-of-range rows onto valid ones keeps the loads unmasked (callers mask results).
    rows = (off_m + tl.arange(0, BLOCK_M)) % N
    cols = (off_n + tl.arange(0, BLOCK_N)) % V
    ks = tl.arange(0, BLOCK_K)
    for k0 in range(0, H, BLOCK_K):
        if USE_TMA:
            a = h_desc.load([off_m, k0])
            b = w_desc.load([off_n, k0])
        elif EVEN_K:
            a = tl.load(h_ptr + rows[:, None] * stride_h + (k0 + ks)[None, :])
            b = tl.load(w_ptr + cols[:, None] * stride_w + (k0 + ks)[None, :])
        else:
            k_ok = (k0 + ks)[None, :] < H
            a = tl.load(h_ptr + rows[:, None] * stride_h + (k0 + ks)[None, :], mask=k_ok, other=0.0)
            b = tl.load(w_ptr + cols[:, None] * stride_w + (k0 + ks)[None, :], mask=k_ok, other=0.0)
        if DOT_F32:  # the interpreter multiplies bf16 bit patterns as integers (triton 3.9)
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _lse_fwd_kernel(h_ptr, w_ptr, h_desc, w_desc, tgt_ptr, lse_part_ptr, ent_part_ptr, tgt_logit_ptr,
                    N, V, H, stride_h, stride_w, scale2, tiles_per_prog,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    GROUP_M: tl.constexpr, WITH_ENTROPY: tl.constexpr, USE_TMA: tl.constexpr,
                    EVEN_K: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
                    FLATTEN: tl.constexpr):
    """One program: BLOCK_M rows x `tiles_per_prog` vocab tiles; writes that span's base-2 lse,
    entropy in bits (log2 s - E[z - m]: no cancellation between large logits) and, where the target
    falls in the span, the target logit."""
    span = BLOCK_N * tiles_per_prog
    pid_m, pid_g = _grouped_pid(tl.program_id(0), tl.cdiv(N, BLOCK_M), tl.cdiv(V, span), GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
    v_lo = pid_g * span
    v_hi = tl.minimum(v_lo + span, V)
    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_M,), dtype=tl.float32)
    a = tl.zeros((BLOCK_M,), dtype=tl.float32)
    t = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for off_n in tl.range(v_lo, v_hi, BLOCK_N, flatten=FLATTEN):
        acc = _logits_tile(h_ptr, w_ptr, h_desc, w_desc, pid_m * BLOCK_M, off_n, N, V, H,
                           stride_h, stride_w, BLOCK_M, BLOCK_N, BLOCK_K, USE_TMA, EVEN_K,
                           DOT_F32, PRECISION)
        cols = off_n + tl.arange(0, BLOCK_N)
        col_ok = cols < V
        z = tl.where(col_ok[None, :], acc * scale2, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 1))
        p = tl.exp2(z - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        if WITH_ENTROPY:  # a = sum p * (z - m), carried over to the new max (s = 0 on the first tile)
            shift = (tl.where(s > 0, m, m_new) - m_new) * s  # (no -inf * 0)
            a = (a + shift) * alpha + tl.sum(p * tl.where(col_ok[None, :], z - m_new[:, None], 0.0), 1)
        s = s * alpha + tl.sum(p, 1)
        t += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), 1)
        m = m_new
    out = pid_g * N + rows
    tl.store(lse_part_ptr + out, m + tl.log2(s), mask=row_ok)
    if WITH_ENTROPY:
        tl.store(ent_part_ptr + out, tl.log2(s) - a / s, mask=row_ok)
    tl.store(tgt_logit_ptr + rows, t, mask=row_ok & (tgt >= v_lo) & (tgt < v_hi))


@triton.jit
def _dlogits_kernel(h_ptr, w_ptr, h_desc, w_desc, tgt_ptr, lse2_ptr, ez2_ptr, g_lp_ptr, g_ent_ptr,
                    dl_ptr, N, V, H, v_start, width, stride_h, stride_w, stride_dl, scale2, inv_temp,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    GROUP_M: tl.constexpr, HAS_LP: tl.constexpr, HAS_ENT: tl.constexpr,
                    USE_TMA: tl.constexpr, EVEN_K: tl.constexpr, DOT_F32: tl.constexpr,
                    PRECISION: tl.constexpr, FLATTEN: tl.constexpr):
    """dL/dlogit for vocab columns [v_start, v_start + width):
    g_lp * (onehot - p) + g_ent * p * (E[z] - z), times 1/T for the temperature."""
    num_m = tl.cdiv(N, BLOCK_M)
    num_n = tl.cdiv(width, BLOCK_N)
    for tile in tl.range(tl.program_id(0), num_m * num_n, tl.num_programs(0), flatten=FLATTEN):
        pid_m, pid_n = _grouped_pid(tile, num_m, num_n, GROUP_M)
        off_n = v_start + pid_n * BLOCK_N
        acc = _logits_tile(h_ptr, w_ptr, h_desc, w_desc, pid_m * BLOCK_M, off_n, N, V, H,
                           stride_h, stride_w, BLOCK_M, BLOCK_N, BLOCK_K, USE_TMA, EVEN_K,
                           DOT_F32, PRECISION)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = off_n + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        z2 = acc * scale2
        p = tl.exp2(z2 - tl.load(lse2_ptr + rows, mask=row_ok, other=0.0)[:, None])
        d = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if HAS_LP:
            g = tl.load(g_lp_ptr + rows, mask=row_ok, other=0.0)[:, None]
            tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
            d = tl.where(cols[None, :] == tgt[:, None], g, 0.0) - g * p
        if HAS_ENT:
            ge = tl.load(g_ent_ptr + rows, mask=row_ok, other=0.0)[:, None]
            ez2 = tl.load(ez2_ptr + rows, mask=row_ok, other=0.0)[:, None]
            d += (ge * 0.6931471805599453) * p * (ez2 - z2)
        d = d * inv_temp
        mask = row_ok[:, None] & (cols < v_start + width)[None, :]
        tl.store(dl_ptr + rows[:, None] * stride_dl + (cols - v_start)[None, :],
                 d.to(dl_ptr.dtype.element_ty), mask=mask)


def _operands(hidden, weight, cfg: TileConfig):
    """(h_desc, w_desc): TMA descriptors when cfg and the strides allow, else the tensors."""
    elt = hidden.element_size()
    if cfg.use_tma and (hidden.stride(0) * elt) % 16 == 0 and hidden.data_ptr() % 16 == 0 \
            and weight.data_ptr() % 16 == 0 and (weight.stride(0) * elt) % 16 == 0:
        from triton.tools.tensor_descriptor import TensorDescriptor
        return (True, TensorDescriptor.from_tensor(hidden, [cfg.block_m, cfg.block_k]),
                TensorDescriptor.from_tensor(weight, [cfg.block_n, cfg.block_k]))
    return False, hidden, weight


def _common(hidden, weight, cfg: TileConfig) -> dict:
    tma, h_desc, w_desc = _operands(hidden, weight, cfg)
    return dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
                USE_TMA=tma, EVEN_K=hidden.shape[1] % cfg.block_k == 0,
                DOT_F32=interpreting() and hidden.dtype != torch.float32,
                PRECISION=_dot_precision(hidden.dtype), FLATTEN=cfg.flatten, num_warps=cfg.num_warps,
                num_stages=cfg.num_stages), h_desc, w_desc


def lse_forward(hidden, weight, targets_i32, inv_temp: float, with_entropy: bool,
                cfg: TileConfig | None = None):
    """Base-2 per-span partials: (lse2 [G, N], entropy in bits [G, N] or None, target z2 [N]).

    Rows whose target is ignored (or out of range) keep target z2 = 0."""
    N, H = hidden.shape
    V = weight.shape[0]
    cfg = cfg or default_config(hidden.dtype, backward=False)
    span = cfg.block_n * cfg.tiles_per_prog
    G = triton.cdiv(V, span)
    lse_part = torch.empty((G, N), device=hidden.device, dtype=torch.float32)
    ent_part = torch.empty((G, N), device=hidden.device, dtype=torch.float32) if with_entropy else lse_part
    tgt_z2 = torch.zeros((N,), device=hidden.device, dtype=torch.float32)
    kw, h_desc, w_desc = _common(hidden, weight, cfg)
    grid = (triton.cdiv(N, cfg.block_m) * G,)
    _lse_fwd_kernel[grid](hidden, weight, h_desc, w_desc, targets_i32, lse_part, ent_part, tgt_z2,
                          N, V, H, hidden.stride(0), weight.stride(0), inv_temp * LOG2E,
                          cfg.tiles_per_prog, WITH_ENTROPY=with_entropy, **kw)
    return lse_part, (ent_part if with_entropy else None), tgt_z2


def dlogits_chunk(hidden, weight, targets_i32, lse2, ez2, g_lp, g_ent, out, v_start: int,
                  width: int, inv_temp: float, cfg: TileConfig | None = None):
    """Write dL/dlogits[:, v_start:v_start+width] into out[:, :width] (out's dtype)."""
    N, H = hidden.shape
    V = weight.shape[0]
    cfg = cfg or default_config(hidden.dtype, backward=True)
    kw, h_desc, w_desc = _common(hidden, weight, cfg)
    tiles = triton.cdiv(N, cfg.block_m) * triton.cdiv(width, cfg.block_n)
    if cfg.persistent:  # the interpreter's two "SMs" exercise the tile loop in CI
        sms = torch.cuda.get_device_properties(hidden.device).multi_processor_count \
            if hidden.is_cuda else 2
        tiles = min(tiles, cfg.persistent * sms)
    grid = (tiles,)
    dummy = lse2
    _dlogits_kernel[grid](hidden, weight, h_desc, w_desc, targets_i32, lse2,
                          ez2 if ez2 is not None else dummy, g_lp if g_lp is not None else dummy,
                          g_ent if g_ent is not None else dummy, out, N, V, H, v_start, width,
                          hidden.stride(0), weight.stride(0), out.stride(0), inv_temp * LOG2E,
                          inv_temp, HAS_LP=g_lp is not None, HAS_ENT=g_ent is not None, **kw)
    return out
