"""Pure-torch twin of the fused linear log-prob: same maths as `logprob_triton`, in chunks.

Used on the CPU and wherever Triton/CUDA is missing (dispatch lives in `r1pipe.kernels.logprob`).
Logits exist only as [row_chunk x vocab_chunk] float32 blocks; the backward recomputes them.
"""

from __future__ import annotations

import torch

ROW_CHUNK = 1024
VOCAB_CHUNK = 8192


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def chunked_lse_stats(hidden, weight, targets, inv_temp: float, with_entropy: bool,
                      row_chunk: int | None = None, vocab_chunk: int | None = None):
    """Per row: lse of z = hidden @ weight.T * inv_temp, the softmax entropy (or None) and z[target].

    `targets` must already be in [0, V) (ignored rows replaced by any valid index). The entropy is
    log(s) - E[z - m] with m the running max, not lse - E[z]: a peaked row with logits near 70 and an
    entropy near 0.5 would otherwise lose it to cancellation between two numbers near 70."""
    row_chunk, vocab_chunk = row_chunk or ROW_CHUNK, vocab_chunk or VOCAB_CHUNK
    N, V = hidden.shape[0], weight.shape[0]
    cd = _compute_dtype(hidden.dtype)
    lse = torch.empty(N, dtype=cd, device=hidden.device)
    ent = torch.empty(N, dtype=cd, device=hidden.device) if with_entropy else None
    for r0 in range(0, N, row_chunk):
        h = hidden[r0:r0 + row_chunk].to(cd)
        m = torch.full((h.shape[0],), float("-inf"), dtype=cd, device=h.device)
        s = torch.zeros_like(m)
        a = torch.zeros_like(m)
        for v0 in range(0, V, vocab_chunk):
            z = (h @ weight[v0:v0 + vocab_chunk].to(cd).T) * inv_temp
            m_new = torch.maximum(m, z.amax(1))
            alpha = torch.exp(m - m_new)
            p = torch.exp(z - m_new[:, None])
            if with_entropy:  # a = sum p * (z - m), carried over to the new max (s = 0 on the first chunk)
                shift = (torch.where(s > 0, m, m_new) - m_new) * s  # (no -inf * 0)
                a = (a + shift) * alpha + (p * (z - m_new[:, None])).sum(1)
            s = s * alpha + p.sum(1)
            m = m_new
        lse[r0:r0 + row_chunk] = m + torch.log(s)
        if with_entropy:
            ent[r0:r0 + row_chunk] = torch.log(s) - a / s
    tgt_logit = (hidden.to(cd) * weight[targets].to(cd)).sum(1) * inv_temp
    return lse, ent, tgt_logit


def chunked_grads(hidden, weight, targets, lse, ez, g_lp, g_ent, inv_temp: float,
                  need_dh: bool, need_dw: bool, row_chunk: int | None = None,
                  vocab_chunk: int | None = None):
    """(dhidden, dweight) of sum(g_lp * logprob + g_ent * entropy), logits recomputed per block.

    dlogit = g_lp * (onehot - p) + g_ent * p * (E[z] - z), times inv_temp."""
    row_chunk, vocab_chunk = row_chunk or ROW_CHUNK, vocab_chunk or VOCAB_CHUNK
    N, V = hidden.shape[0], weight.shape[0]
    cd = _compute_dtype(hidden.dtype)
    dh = torch.zeros(hidden.shape, dtype=cd, device=hidden.device) if need_dh else None
    dw = torch.zeros(weight.shape, dtype=cd, device=hidden.device) if need_dw else None
    for r0 in range(0, N, row_chunk):
        h = hidden[r0:r0 + row_chunk].to(cd)
        rows = torch.arange(h.shape[0], device=h.device)
        t = targets[r0:r0 + row_chunk]
        lse_c = lse[r0:r0 + row_chunk, None]
        for v0 in range(0, V, vocab_chunk):
            w = weight[v0:v0 + vocab_chunk].to(cd)
            z = (h @ w.T) * inv_temp
            p = torch.exp(z - lse_c)
            d = torch.zeros_like(z)
            if g_lp is not None:
                g = g_lp[r0:r0 + row_chunk].to(cd)
                d -= g[:, None] * p
                hit = (t >= v0) & (t < v0 + w.shape[0])
                d[rows[hit], t[hit] - v0] += g[hit]
            if g_ent is not None:
                ge = g_ent[r0:r0 + row_chunk].to(cd)
                d += ge[:, None] * p * (ez[r0:r0 + row_chunk, None] - z)
            d *= inv_temp
            if need_dh:
                dh[r0:r0 + row_chunk] += d @ w
            if need_dw:
                dw[v0:v0 + vocab_chunk] += d.T @ h
    return dh, dw


class ChunkedLinearLogprobs(torch.autograd.Function):
    """autograd over the chunked twin; `valid` marks rows whose target is not ignored."""

    @staticmethod
    def forward(ctx, hidden, weight, safe_targets, valid, inv_temp, with_entropy):
        lse, ent, tgt_logit = chunked_lse_stats(hidden, weight, safe_targets, inv_temp, with_entropy)
        zero = torch.zeros((), dtype=lse.dtype, device=lse.device)
        logprobs = torch.where(valid, tgt_logit - lse, zero).float()
        entropy = torch.where(valid, ent, zero).float() if with_entropy else None
        ez = lse - ent if with_entropy else None  # E[z], what the entropy's gradient needs
        ctx.save_for_backward(hidden, weight, safe_targets, valid, lse, ez)
        ctx.inv_temp = inv_temp
        ctx.set_materialize_grads(False)  # an unused output (often entropy) costs nothing
        return (logprobs, entropy) if with_entropy else logprobs

    @staticmethod
    def backward(ctx, grad_lp, grad_ent=None):
        hidden, weight, targets, valid, lse, ez = ctx.saved_tensors
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if grad_lp is None and grad_ent is None:
            return (torch.zeros_like(hidden) if need_dh else None,
                    torch.zeros_like(weight) if need_dw else None, None, None, None, None)
        if not (need_dh or need_dw):
            return None, None, None, None, None, None
        g_lp = None if grad_lp is None else grad_lp * valid
        g_ent = None if grad_ent is None or ez is None else grad_ent * valid
        dh, dw = chunked_grads(hidden, weight, targets, lse, ez, g_lp, g_ent, ctx.inv_temp,
                               need_dh, need_dw)
        return (dh.to(hidden.dtype) if need_dh else None,
                dw.to(weight.dtype) if need_dw else None, None, None, None, None)
