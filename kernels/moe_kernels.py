"""Triton kernels of the fused MoE layer: grouped GEMMs over expert-sorted rows with fused epilogues.

Rows are (token, slot) pairs in expert order (moe_routing.py). Token rows of x / dout are gathered on
load, never copied into a permuted buffer. moe_triton.py launches these and holds the autograd Function.
  gate_up_swiglu:  h = silu(x W_g^T) * (x W_u^T)             (also keeps the pre-activations for backward)
  rows_matmul:     out[pair] = scale[pair] * (A_e W_e)         (down projection forward; dx backward)
  down_backward:   dA = dout W_d; SwiGLU backward; dw partials; h*w for the down weight gradient
  swiglu_backward: the SwiGLU backward as its own pass, for when down_backward only stores dA
  expert_weight_grad: dW_e = A_e^T B_e over the expert's rows (both weight gradients)
  routing_tiles:   expert offsets and the M-tile map from the sorted expert ids (moe_routing.py)
"""
import triton
import triton.language as tl


@triton.jit
def _mma(a, b, acc, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    # UPCAST: the CPU interpreter multiplies bf16 as raw uint16, so it gets fp32 operands instead
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _grouped_tile(pid, num_m, num_n, GROUP_M: tl.constexpr):
    # GROUP_M consecutive M-tiles sweep the N-blocks together, so weight tiles are re-read from L2
    width = GROUP_M * num_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def _tile_rows(tile_start_ptr, offsets_ptr, pid_m, e, BLOCK_M: tl.constexpr):
    row0 = tl.load(tile_start_ptr + pid_m)
    row_end = tl.load(offsets_ptr + e + 1)
    rows = row0 + tl.arange(0, BLOCK_M)
    return rows, rows < row_end


@triton.jit
def gate_up_swiglu_kernel(
    x_ptr, w_ptr, h_ptr, gu_ptr,
    sorted_token_ptr, tile_expert_ptr, tile_start_ptr, offsets_ptr,
    num_tiles, E, H, I,
    stride_x, stride_we, stride_wn, stride_wk,
    SAVE_GU: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """h[r, n] = silu(g) * u with g = x[tok[r]] . W[e, n], u = x[tok[r]] . W[e, I + n]."""
    pid_m, pid_n = _grouped_tile(tl.program_id(0), num_tiles, tl.cdiv(I, BLOCK_N), GROUP_M)
    e = tl.load(tile_expert_ptr + pid_m)
    if e >= E:  # a spare tile past the data-dependent tile count
        return
    rows, row_ok = _tile_rows(tile_start_ptr, offsets_ptr, pid_m, e, BLOCK_M)
    tok = tl.load(sorted_token_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < I
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + tok[:, None] * stride_x + ks[None, :]
    g_ptrs = w_ptr + e.to(tl.int64) * stride_we + cols[None, :] * stride_wn + ks[:, None] * stride_wk
    u_ptrs = g_ptrs + I * stride_wn
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            bg = tl.load(g_ptrs, mask=col_ok[None, :], other=0.0)
            bu = tl.load(u_ptrs, mask=col_ok[None, :], other=0.0)
        else:
            k_ok = (k0 + ks) < H
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            bg = tl.load(g_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            bu = tl.load(u_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc_g = _mma(a, bg, acc_g, UPCAST, IEEE)
        acc_u = _mma(a, bu, acc_u, UPCAST, IEEE)
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K * stride_wk
        u_ptrs += BLOCK_K * stride_wk
    out_ok = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)
    h = acc_g * tl.sigmoid(acc_g) * acc_u
    tl.store(h_ptr + rows64[:, None] * I + cols[None, :], h.to(h_ptr.dtype.element_ty), mask=out_ok)
    if SAVE_GU:
        gu_ptrs = gu_ptr + rows64[:, None] * (2 * I) + cols[None, :]
        tl.store(gu_ptrs, acc_g.to(gu_ptr.dtype.element_ty), mask=out_ok)
        tl.store(gu_ptrs + I, acc_u.to(gu_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def rows_matmul_kernel(
    a_ptr, w_ptr, out_ptr, scale_ptr,
    sorted_pair_ptr, tile_expert_ptr, tile_start_ptr, offsets_ptr,
    num_tiles, E, N, KD,
    stride_we, stride_wn, stride_wk,
    HAS_SCALE: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out[pair[r], n] = scale[pair[r]] * sum_k a[r, k] W[e, k, n]; a [TK, KD] in sorted-row order."""
    pid_m, pid_n = _grouped_tile(tl.program_id(0), num_tiles, tl.cdiv(N, BLOCK_N), GROUP_M)
    e = tl.load(tile_expert_ptr + pid_m)
    if e >= E:  # a spare tile past the data-dependent tile count
        return
    rows, row_ok = _tile_rows(tile_start_ptr, offsets_ptr, pid_m, e, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows.to(tl.int64)[:, None] * KD + ks[None, :]
    b_ptrs = w_ptr + e.to(tl.int64) * stride_we + cols[None, :] * stride_wn + ks[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, KD, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=col_ok[None, :], other=0.0)
        else:
            k_ok = (k0 + ks) < KD
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = _mma(a, b, acc, UPCAST, IEEE)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_wk
    pair = tl.load(sorted_pair_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    out_ptrs = out_ptr + pair[:, None] * N + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def down_backward_kernel(
    dout_ptr, w_ptr, gu_ptr, topk_w_ptr, dgu_ptr, hw_ptr, dw_part_ptr,
    sorted_token_ptr, sorted_pair_ptr, tile_expert_ptr, tile_start_ptr, offsets_ptr,
    num_tiles, E, H, I, TK,
    stride_do, stride_we, stride_wn, stride_wk,
    FUSED: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """dA[r, n] = dout[tok[r]] . W_d[e, :, n], then with the saved pre-activations g, u:
    dw partial = sum_n dA h,  dg = w dA u silu'(g),  du = w dA silu(g),  hw = w h.
    Not FUSED: only dA is stored, into hw; swiglu_backward_kernel does the rest (fewer live
    registers in this epilogue, one more pass over [TK, I])."""
    pid_m, pid_n = _grouped_tile(tl.program_id(0), num_tiles, tl.cdiv(I, BLOCK_N), GROUP_M)
    e = tl.load(tile_expert_ptr + pid_m)
    if e >= E:  # a spare tile past the data-dependent tile count
        return
    rows, row_ok = _tile_rows(tile_start_ptr, offsets_ptr, pid_m, e, BLOCK_M)
    tok = tl.load(sorted_token_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < I
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = dout_ptr + tok[:, None] * stride_do + ks[None, :]
    b_ptrs = w_ptr + e.to(tl.int64) * stride_we + cols[None, :] * stride_wn + ks[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=col_ok[None, :], other=0.0)
        else:
            k_ok = (k0 + ks) < H
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = _mma(a, b, acc, UPCAST, IEEE)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_wk
    ok = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)
    if FUSED:  # (a static branch: no `return` here, the compiler would keep what follows it)
        gu_ptrs = gu_ptr + rows64[:, None] * (2 * I) + cols[None, :]
        g = tl.load(gu_ptrs, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(gu_ptrs + I, mask=ok, other=0.0).to(tl.float32)
        pair = tl.load(sorted_pair_ptr + rows, mask=row_ok, other=0)
        w = tl.load(topk_w_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        dg, du, hw, dw_terms = _swiglu_backward(acc, g, u, w)
        tl.store(dw_part_ptr + pid_n.to(tl.int64) * TK + rows64, tl.sum(dw_terms, axis=1), mask=row_ok)
        dgu_ptrs = dgu_ptr + rows64[:, None] * (2 * I) + cols[None, :]
        tl.store(dgu_ptrs, dg.to(dgu_ptr.dtype.element_ty), mask=ok)
        tl.store(dgu_ptrs + I, du.to(dgu_ptr.dtype.element_ty), mask=ok)
        tl.store(hw_ptr + rows64[:, None] * I + cols[None, :], hw.to(hw_ptr.dtype.element_ty), mask=ok)
    else:
        tl.store(hw_ptr + rows64[:, None] * I + cols[None, :], acc.to(hw_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _swiglu_backward(da, g, u, w):
    # y = w * down(h), h = silu(g) u: dh = w dA, dg = dh u silu'(g), du = dh silu(g), dw = sum dA h
    sig = tl.sigmoid(g)
    silu = g * sig
    h = silu * u
    dh = da * w
    return dh * u * sig * (1.0 + g * (1.0 - sig)), dh * silu, h * w, da * h


@triton.jit
def swiglu_backward_kernel(
    gu_ptr, da_hw_ptr, topk_w_ptr, dgu_ptr, dw_ptr, sorted_pair_ptr, TK, I,
    BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr,
):
    """Rows r of the sorted order: dA (stored in da_hw) -> dg, du into dgu and w*h back into da_hw;
    dw[pair[r]] = sum_n dA h. Every element is read, then written, by this program only."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < TK
    rows64 = rows.to(tl.int64)
    pair = tl.load(sorted_pair_ptr + rows, mask=row_ok, other=0)
    w = tl.load(topk_w_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    dw = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for c0 in range(0, I, BLOCK_I):
        cols = c0 + tl.arange(0, BLOCK_I)
        ok = row_ok[:, None] & (cols < I)[None, :]
        gu_ptrs = gu_ptr + rows64[:, None] * (2 * I) + cols[None, :]
        g = tl.load(gu_ptrs, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(gu_ptrs + I, mask=ok, other=0.0).to(tl.float32)
        da_ptrs = da_hw_ptr + rows64[:, None] * I + cols[None, :]
        da = tl.load(da_ptrs, mask=ok, other=0.0).to(tl.float32)
        dg, du, hw, dw_terms = _swiglu_backward(da, g, u, w)
        dw += tl.sum(dw_terms, axis=1)
        dgu_ptrs = dgu_ptr + rows64[:, None] * (2 * I) + cols[None, :]
        tl.store(dgu_ptrs, dg.to(dgu_ptr.dtype.element_ty), mask=ok)
        tl.store(dgu_ptrs + I, du.to(dgu_ptr.dtype.element_ty), mask=ok)
        tl.store(da_ptrs, hw.to(da_hw_ptr.dtype.element_ty), mask=ok)
    tl.store(dw_ptr + pair, dw, mask=row_ok)


@triton.jit
def expert_weight_grad_kernel(
    a_ptr, b_ptr, out_ptr,
    sorted_token_ptr, offsets_ptr,
    M, N, stride_a, stride_b,
    A_GATHER: tl.constexpr, B_GATHER: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out[e, m, n] = sum over expert e's rows r of A[r, m] B[r, n]; a *_GATHER operand is indexed
    by the row's token (x, dout), otherwise by the sorted row itself (dgu, h*w)."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    # expert-major order: one expert's rows stay in L2 while all its weight tiles are made
    e = pid // (num_m * num_n)
    pid_m, pid_n = _grouped_tile(pid % (num_m * num_n), num_m, num_n, GROUP_M)
    r_begin = tl.load(offsets_ptr + e)
    r_end = tl.load(offsets_ptr + e + 1)
    ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = ms < M
    n_ok = ns < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(r_begin, r_end, BLOCK_K):
        rows = r0 + tl.arange(0, BLOCK_K)
        r_ok = rows < r_end
        tok = tl.load(sorted_token_ptr + rows, mask=r_ok, other=0).to(tl.int64)
        if A_GATHER:
            a_rows = tok
        else:
            a_rows = rows.to(tl.int64)
        if B_GATHER:
            b_rows = tok
        else:
            b_rows = rows.to(tl.int64)
        a = tl.load(a_ptr + a_rows[:, None] * stride_a + ms[None, :], mask=r_ok[:, None] & m_ok[None, :], other=0.0)
        b = tl.load(b_ptr + b_rows[:, None] * stride_b + ns[None, :], mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _mma(tl.trans(a), b, acc, UPCAST, IEEE)
    out_ptrs = out_ptr + e.to(tl.int64) * M * N + ms.to(tl.int64)[:, None] * N + ns[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def routing_tiles_kernel(
    sorted_expert_ptr, offsets_ptr, tile_expert_ptr, tile_start_ptr, valid_ptr,
    TK, E, max_tiles, search_steps,
    BLOCK_M: tl.constexpr, E_POW2: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """One program: expert_offsets by binary search in the sorted expert ids, then the M-tile map
    (tile_expert, tile_start; spare tiles get expert E). valid = ids lay in [0, E). Replaces a dozen
    small torch launches, which dominate at small batch."""
    es = tl.arange(0, E_POW2)
    lo = tl.zeros((E_POW2,), dtype=tl.int32)  # lower bound of e: first i with sorted[i] >= e
    hi = tl.zeros((E_POW2,), dtype=tl.int32) + TK
    lo1 = tl.zeros((E_POW2,), dtype=tl.int32)  # lower bound of e + 1
    hi1 = tl.zeros((E_POW2,), dtype=tl.int32) + TK
    for _ in range(search_steps):
        mid = (lo + hi) // 2
        below = tl.load(sorted_expert_ptr + mid, mask=mid < TK, other=0) < es
        lo, hi = tl.where((lo < hi) & below, mid + 1, lo), tl.where((lo < hi) & ~below, mid, hi)
        mid1 = (lo1 + hi1) // 2
        below1 = tl.load(sorted_expert_ptr + mid1, mask=mid1 < TK, other=0) < es + 1
        lo1, hi1 = tl.where((lo1 < hi1) & below1, mid1 + 1, lo1), tl.where((lo1 < hi1) & ~below1, mid1, hi1)
    tl.store(offsets_ptr + es, lo, mask=es <= E)
    first_below = tl.sum(tl.where(es == 0, lo, 0))  # ids < 0 sort before offsets[0]
    last_end = tl.sum(tl.where(es == E - 1, lo1, 0))  # ids >= E sort after offsets[E]
    tl.store(valid_ptr, ((first_below == 0) & (last_end == TK)).to(tl.int32))
    tiles = tl.where(es < E, (lo1 - lo + BLOCK_M - 1) // BLOCK_M, 0)
    tiles_end = tl.cumsum(tiles, 0)
    tiles_begin = tiles_end - tiles
    for t0 in range(0, max_tiles, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        past = (tiles_end[None, :] <= t[:, None]) & (es[None, :] < E)
        expert = tl.sum(past.to(tl.int32), axis=1)
        mine = es[None, :] == expert[:, None]
        start = tl.sum(tl.where(mine, lo[None, :] - tiles_begin[None, :] * BLOCK_M, 0), axis=1)
        tl.store(tile_expert_ptr + t, expert, mask=t < max_tiles)
        tl.store(tile_start_ptr + t, start + t * BLOCK_M, mask=t < max_tiles)
