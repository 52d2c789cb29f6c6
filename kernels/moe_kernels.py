"""Triton kernels of the fused MoE layer: grouped GEMMs over expert-sorted rows with fused epilogues.

Rows are (token, slot) pairs in expert order (moe_routing.py). Token rows of x / dout are gathered on
load, never copied into a permuted buffer. moe_triton.py launches these and holds the autograd Function.
  gate_up_swiglu:  h = silu(x W_g^T) * (x W_u^T)             (also keeps the pre-activations for backward)
  rows_matmul:     out[pair] = scale[pair] * (A_e W_e)         (down projection forward; dx backward)
  down_backward:   dA = dout W_d; SwiGLU backward; dw partials; h*w for the down weight gradient
  swiglu_backward: the SwiGLU backward as its own pass, for when down_backward only stores dA
  expert_weight_grad: dW_e = A_e^T B_e over the expert's rows (both weight gradients)
  routing_count / routing_scatter: a stable counting sort of the pairs by expert, expert offsets and
                   the M-tile map (moe_routing.py); routing_tiles: the tile map for another BLOCK_M
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
def _tile_of(tile_expert_ptr, tile_start_ptr, offsets_ptr, num_tiles, E, N, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr, EXPERT_GROUPS: tl.constexpr):
    """This program's (M-tile, N-block) and the M-tile's expert (E for a spare tile).
    EXPERT_GROUPS: the GROUP_M tiles that sweep the N-blocks together never straddle two experts, so
    each weight tile is read from HBM once and re-read from L2 by the expert's other M-tiles while it
    is still there (matters where one expert's weights outgrow L2, e.g. DeepSeek-V3's 58 MB gate_up)."""
    num_n = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    if EXPERT_GROUPS:
        # the expert's programs are those of its M-tiles: first*num_n up to (first+count)*num_n
        t = pid // num_n
        e = tl.load(tile_expert_ptr + t)
        e_ok = e < E
        row0 = tl.load(offsets_ptr + e, mask=e_ok, other=0)
        # a spare tile (returned from at once) is a group of its own: no division by zero
        first = tl.where(e_ok, t - (tl.load(tile_start_ptr + t) - row0) // BLOCK_M, t)
        count = tl.cdiv(tl.load(offsets_ptr + e + 1, mask=e_ok, other=1) - row0, BLOCK_M)
        m_local, pid_n = _grouped_tile(pid - first * num_n, count, num_n, GROUP_M)
        pid_m = first + m_local
    else:
        pid_m, pid_n = _grouped_tile(pid, num_tiles, num_n, GROUP_M)
        e = tl.load(tile_expert_ptr + pid_m)
    return pid_m, pid_n, e


@triton.jit
def _tile_rows(tile_start_ptr, offsets_ptr, pid_m, e, BLOCK_M: tl.constexpr):
    row0 = tl.load(tile_start_ptr + pid_m)
    row_end = tl.load(offsets_ptr + e + 1)
    rows = row0 + tl.arange(0, BLOCK_M)
    return rows, rows < row_end


@triton.jit
def _tile_operands(a_ptr, stride_a, w_ptr, stride_we, stride_wn, stride_wk, sorted_token_ptr,
                   tile_start_ptr, offsets_ptr, pid_m, pid_n, e, N,
                   GATHER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Row / column indices and masks of an (M-tile, N-block), with the first K step's pointers:
    A rows are the rows' tokens when GATHER (x, dout), else the sorted rows themselves."""
    rows, row_ok = _tile_rows(tile_start_ptr, offsets_ptr, pid_m, e, BLOCK_M)
    if GATHER:
        a_rows = tl.load(sorted_token_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    else:
        a_rows = rows.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_a + ks[None, :]
    w_ptrs = w_ptr + e.to(tl.int64) * stride_we + cols[None, :] * stride_wn + ks[:, None] * stride_wk
    return rows, row_ok, cols, cols < N, a_ptrs, w_ptrs


@triton.jit
def _tile_dot(a_ptrs, a_desc, a_row, row_ok, w_ptrs, w_desc, w_row, w2_rows, col_ok, KD, stride_wn,
              stride_wk, acc, acc2, TWO: tl.constexpr, A_TMA: tl.constexpr, W_TMA: tl.constexpr,
              EVEN_K: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, BLOCK_K: tl.constexpr):
    """The K loop all three row GEMMs share: acc += A W over KD, and with TWO also acc2 += A W2,
    W2 being W shifted by w2_rows weight rows (the up half of gate_up_proj).

    A [BM, BK]: pointers a_ptrs (step 1 along K, rows masked by row_ok), or with A_TMA the box of
    a_desc at (a_row, k). W [BK, BN]: pointers w_ptrs (step stride_wk, columns masked by col_ok), or
    with W_TMA the transposed [BN, BK] box of w_desc at (w_row, k); w_desc views W as [E*N, KD], K
    contiguous. Boxes read past an expert's rows only into rows/columns the caller never stores."""
    ks = tl.arange(0, BLOCK_K)
    for k0 in range(0, KD, BLOCK_K):
        k_ok = (k0 + ks) < KD
        if A_TMA:
            a = a_desc.load([a_row, k0])
        elif EVEN_K:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
        else:
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if W_TMA:
            b = tl.trans(w_desc.load([w_row, k0]))
        elif EVEN_K:
            b = tl.load(w_ptrs, mask=col_ok[None, :], other=0.0)
        else:
            b = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = _mma(a, b, acc, UPCAST, IEEE)
        if TWO:
            if W_TMA:
                b2 = tl.trans(w_desc.load([w_row + w2_rows, k0]))
            elif EVEN_K:
                b2 = tl.load(w_ptrs + w2_rows * stride_wn, mask=col_ok[None, :], other=0.0)
            else:
                b2 = tl.load(w_ptrs + w2_rows * stride_wn, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc2 = _mma(a, b2, acc2, UPCAST, IEEE)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk
    return acc, acc2


@triton.jit
def _tail_is_short(tile_start_ptr, offsets_ptr, pid_m, e, BLOCK_M: tl.constexpr):
    # an expert's last M-tile holding at most BLOCK_M/2 rows: it runs as a half-height tile, so the
    # tensor cores do not spend a full tile on padding (E=256 experts of ~256 rows each waste 26%
    # of the work at BLOCK_M=128 otherwise)
    return tl.load(offsets_ptr + e + 1) - tl.load(tile_start_ptr + pid_m) <= BLOCK_M // 2


@triton.jit
def gate_up_swiglu_kernel(
    x_ptr, w_ptr, w_desc, h_ptr, gu_ptr,
    sorted_token_ptr, tile_expert_ptr, tile_start_ptr, offsets_ptr,
    num_tiles, E, H, I,
    stride_x, stride_we, stride_wn, stride_wk,
    SAVE_GU: tl.constexpr, W_TMA: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr,
    IEEE: tl.constexpr, SPLIT_TAIL: tl.constexpr, EXPERT_GROUPS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """h[r, n] = silu(g) * u with g = x[tok[r]] . W[e, n], u = x[tok[r]] . W[e, I + n]."""
    pid_m, pid_n, e = _tile_of(tile_expert_ptr, tile_start_ptr, offsets_ptr, num_tiles, E, I, BLOCK_M, BLOCK_N,
                              GROUP_M, EXPERT_GROUPS)
    if e >= E:  # a spare tile past the data-dependent tile count
        return
    short = False  # a static False without SPLIT_TAIL: only the full-height tile is compiled
    if SPLIT_TAIL:
        short = _tail_is_short(tile_start_ptr, offsets_ptr, pid_m, e, BLOCK_M)
    if short:
        _gate_up_tile(x_ptr, w_ptr, w_desc, h_ptr, gu_ptr, sorted_token_ptr, tile_start_ptr, offsets_ptr,
                      pid_m, pid_n, e, H, I, stride_x, stride_we, stride_wn, stride_wk, SAVE_GU, W_TMA,
                      EVEN_K, UPCAST, IEEE, BLOCK_M // 2, BLOCK_N, BLOCK_K)
    else:
        _gate_up_tile(x_ptr, w_ptr, w_desc, h_ptr, gu_ptr, sorted_token_ptr, tile_start_ptr, offsets_ptr,
                      pid_m, pid_n, e, H, I, stride_x, stride_we, stride_wn, stride_wk, SAVE_GU, W_TMA,
                      EVEN_K, UPCAST, IEEE, BLOCK_M, BLOCK_N, BLOCK_K)


@triton.jit
def _gate_up_tile(x_ptr, w_ptr, w_desc, h_ptr, gu_ptr, sorted_token_ptr, tile_start_ptr, offsets_ptr,
                  pid_m, pid_n, e, H, I, stride_x, stride_we, stride_wn, stride_wk,
                  SAVE_GU: tl.constexpr, W_TMA: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr,
                  IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows, row_ok, cols, col_ok, a_ptrs, w_ptrs = _tile_operands(
        x_ptr, stride_x, w_ptr, stride_we, stride_wn, stride_wk, sorted_token_ptr, tile_start_ptr,
        offsets_ptr, pid_m, pid_n, e, I, True, BLOCK_M, BLOCK_N, BLOCK_K)
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_g, acc_u = _tile_dot(a_ptrs, x_ptr, 0, row_ok, w_ptrs, w_desc, e * 2 * I + pid_n * BLOCK_N, I,
                             col_ok, H, stride_wn, stride_wk, acc_g, tl.zeros_like(acc_g), True, False,
                             W_TMA, EVEN_K, UPCAST, IEEE, BLOCK_K)
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
    a_ptr, a_desc, w_ptr, w_desc, out_ptr, scale_ptr,
    sorted_pair_ptr, tile_expert_ptr, tile_start_ptr, offsets_ptr,
    num_tiles, E, N, KD,
    stride_we, stride_wn, stride_wk,
    HAS_SCALE: tl.constexpr, A_TMA: tl.constexpr, W_TMA: tl.constexpr, EVEN_K: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, SPLIT_TAIL: tl.constexpr, EXPERT_GROUPS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out[pair[r], n] = scale[pair[r]] * sum_k a[r, k] W[e, k, n]; a [TK, KD] in sorted-row order."""
    pid_m, pid_n, e = _tile_of(tile_expert_ptr, tile_start_ptr, offsets_ptr, num_tiles, E, N, BLOCK_M, BLOCK_N,
                              GROUP_M, EXPERT_GROUPS)
    if e >= E:  # a spare tile past the data-dependent tile count
        return
    short = False  # a static False without SPLIT_TAIL: only the full-height tile is compiled
    if SPLIT_TAIL:
        short = _tail_is_short(tile_start_ptr, offsets_ptr, pid_m, e, BLOCK_M)
    if short:
        # a_desc's boxes are BLOCK_M rows high: the half tile loads its rows through pointers
        _rows_matmul_tile(a_ptr, a_desc, w_ptr, w_desc, out_ptr, scale_ptr, sorted_pair_ptr, tile_start_ptr,
                          offsets_ptr, pid_m, pid_n, e, N, KD, stride_we, stride_wn, stride_wk, HAS_SCALE,
                          False, W_TMA, EVEN_K, UPCAST, IEEE, BLOCK_M // 2, BLOCK_N, BLOCK_K)
    else:
        _rows_matmul_tile(a_ptr, a_desc, w_ptr, w_desc, out_ptr, scale_ptr, sorted_pair_ptr, tile_start_ptr,
                          offsets_ptr, pid_m, pid_n, e, N, KD, stride_we, stride_wn, stride_wk, HAS_SCALE,
                          A_TMA, W_TMA, EVEN_K, UPCAST, IEEE, BLOCK_M, BLOCK_N, BLOCK_K)


@triton.jit
def _rows_matmul_tile(a_ptr, a_desc, w_ptr, w_desc, out_ptr, scale_ptr, sorted_pair_ptr, tile_start_ptr,
                      offsets_ptr, pid_m, pid_n, e, N, KD, stride_we, stride_wn, stride_wk,
                      HAS_SCALE: tl.constexpr, A_TMA: tl.constexpr, W_TMA: tl.constexpr,
                      EVEN_K: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows, row_ok, cols, col_ok, a_ptrs, w_ptrs = _tile_operands(
        a_ptr, KD, w_ptr, stride_we, stride_wn, stride_wk, sorted_pair_ptr, tile_start_ptr, offsets_ptr,
        pid_m, pid_n, e, N, False, BLOCK_M, BLOCK_N, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc, _ = _tile_dot(a_ptrs, a_desc, tl.load(tile_start_ptr + pid_m), row_ok, w_ptrs, w_desc,
                       e * N + pid_n * BLOCK_N, 0, col_ok, KD, stride_wn, stride_wk, acc, acc, False,
                       A_TMA, W_TMA, EVEN_K, UPCAST, IEEE, BLOCK_K)
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
    EXPERT_GROUPS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """dA[r, n] = dout[tok[r]] . W_d[e, :, n], then with the saved pre-activations g, u:
    dw partial = sum_n dA h,  dg = w dA u silu'(g),  du = w dA silu(g),  hw = w h.
    Not FUSED: only dA is stored, into hw; swiglu_backward_kernel does the rest (fewer live
    registers in this epilogue, one more pass over [TK, I])."""
    pid_m, pid_n, e = _tile_of(tile_expert_ptr, tile_start_ptr, offsets_ptr, num_tiles, E, I, BLOCK_M, BLOCK_N,
                              GROUP_M, EXPERT_GROUPS)
    if e >= E:  # a spare tile past the data-dependent tile count
        return
    rows, row_ok, cols, col_ok, a_ptrs, w_ptrs = _tile_operands(
        dout_ptr, stride_do, w_ptr, stride_we, stride_wn, stride_wk, sorted_token_ptr, tile_start_ptr,
        offsets_ptr, pid_m, pid_n, e, I, True, BLOCK_M, BLOCK_N, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc, _ = _tile_dot(a_ptrs, dout_ptr, 0, row_ok, w_ptrs, w_ptr, 0, 0, col_ok, H, stride_wn, stride_wk,
                       acc, acc, False, False, False, EVEN_K, UPCAST, IEEE, BLOCK_K)
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
def routing_count_kernel(ids_ptr, counts_ptr, TK, E, SUB,
                         BLOCK: tl.constexpr, E_POW2: tl.constexpr):
    """counts[c, e] = how many of chunk c's SUB*BLOCK pairs chose expert e (ids outside [0, E) none)."""
    c = tl.program_id(0)
    es = tl.arange(0, E_POW2)
    counts = tl.zeros((E_POW2,), dtype=tl.int32)
    for s in range(0, SUB):
        p = (c * SUB + s) * BLOCK + tl.arange(0, BLOCK)
        ids = tl.load(ids_ptr + p, mask=p < TK, other=-1)
        hit = (ids[:, None] == es[None, :]) & (es < E)[None, :]
        counts += tl.sum(hit.to(tl.int32), axis=0)
    tl.store(counts_ptr + c * E_POW2 + es, counts)


@triton.jit
def _write_tiles(tile_expert_ptr, tile_start_ptr, t_begin, t_end, starts, counts, E,
                 BLOCK_M: tl.constexpr, E_POW2: tl.constexpr, BLOCK_T: tl.constexpr):
    # tiles t_begin:t_end of the M-tile map, expert e's rows starts[e]:starts[e]+counts[e];
    # spare tiles past the data-dependent count get expert E
    es = tl.arange(0, E_POW2)
    tiles = tl.where(es < E, (counts + BLOCK_M - 1) // BLOCK_M, 0)
    tiles_end = tl.cumsum(tiles, 0)
    tiles_begin = tiles_end - tiles
    for t0 in range(t_begin, t_end, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        past = (tiles_end[None, :] <= t[:, None]) & (es[None, :] < E)
        expert = tl.sum(past.to(tl.int32), axis=1)
        mine = es[None, :] == expert[:, None]
        first_row = starts[None, :] + (t[:, None] - tiles_begin[None, :]) * BLOCK_M
        start = tl.sum(tl.where(mine, first_row, 0), axis=1)
        tl.store(tile_expert_ptr + t, expert, mask=t < t_end)
        tl.store(tile_start_ptr + t, start, mask=t < t_end)


@triton.jit
def routing_scatter_kernel(
    ids_ptr, counts_ptr, sorted_pair_ptr, sorted_token_ptr, offsets_ptr, valid_ptr,
    tile_expert_ptr, tile_start_ptr,
    TK, E, TOP_K, SUB, num_chunks, max_tiles, tiles_per_prog,
    BLOCK: tl.constexpr, E_POW2: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """A stable counting sort of the pairs by expert, after routing_count_kernel: chunk c's pairs
    of expert e go to offsets[e] + (expert e's pairs in chunks before c) + their rank in chunk c.
    Every program also writes its share of the M-tile map for BLOCK_M; program 0 writes
    expert_offsets [E+1] and valid (all ids lay in [0, E)). Two launches replace the sort, the
    casts and the offsets search."""
    c = tl.program_id(0)
    es = tl.arange(0, E_POW2)
    total = tl.zeros((E_POW2,), dtype=tl.int32)
    before = tl.zeros((E_POW2,), dtype=tl.int32)
    for c0 in range(0, num_chunks, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        cnt = tl.load(counts_ptr + cs[:, None] * E_POW2 + es[None, :], mask=(cs < num_chunks)[:, None],
                      other=0)
        total += tl.sum(cnt, axis=0)
        before += tl.sum(tl.where((cs < c)[:, None], cnt, 0), axis=0)
    starts = tl.cumsum(total, 0) - total
    base = starts + before
    for s in range(0, SUB):
        p = (c * SUB + s) * BLOCK + tl.arange(0, BLOCK)
        ids = tl.load(ids_ptr + p, mask=p < TK, other=-1)
        hit = ((ids[:, None] == es[None, :]) & (es < E)[None, :]).to(tl.int32)
        rank = tl.cumsum(hit, 0) - hit  # earlier pairs of the same expert in this block
        dest = tl.sum(hit * (base[None, :] + rank), axis=1)
        ok = tl.sum(hit, axis=1) > 0
        tl.store(sorted_pair_ptr + dest, p, mask=ok)
        tl.store(sorted_token_ptr + dest, p // TOP_K, mask=ok)
        base += tl.sum(hit, axis=0)
    n_valid = tl.sum(total)
    if c == 0:
        tl.store(offsets_ptr + es, starts, mask=es < E)
        tl.store(offsets_ptr + E, n_valid)
        tl.store(valid_ptr, (n_valid == TK).to(tl.int32))
    t_begin = c * tiles_per_prog
    _write_tiles(tile_expert_ptr, tile_start_ptr, t_begin, tl.minimum(t_begin + tiles_per_prog, max_tiles),
                 starts, total, E, BLOCK_M, E_POW2, BLOCK_T)


@triton.jit
def routing_tiles_kernel(offsets_ptr, tile_expert_ptr, tile_start_ptr, E, max_tiles,
                         BLOCK_M: tl.constexpr, E_POW2: tl.constexpr, BLOCK_T: tl.constexpr):
    """One program: the M-tile map for another BLOCK_M from expert_offsets."""
    es = tl.arange(0, E_POW2)
    starts = tl.load(offsets_ptr + es, mask=es < E, other=0)
    counts = tl.load(offsets_ptr + es + 1, mask=es < E, other=0) - starts
    _write_tiles(tile_expert_ptr, tile_start_ptr, 0, max_tiles, starts, counts, E, BLOCK_M, E_POW2, BLOCK_T)
