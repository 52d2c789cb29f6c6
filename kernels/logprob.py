"""Token log-probs (and entropy) straight from final hidden states: lm_head GEMM, log-softmax and
gather fused, never materialising [tokens x vocab] float32 logits (spec section 2, hot path).

`fused_linear_logprobs` dispatches to the Triton kernels in `logprob_triton` (CUDA, or the
interpreter) or to the pure-torch chunked twin in `logprob_torch` (CPU). The Triton backward
recomputes logits one vocab chunk at a time and hands that chunk's dlogits to cuBLAS for dH, dW.
"""

from __future__ import annotations

import functools
import math
import os

import torch

from r1pipe.kernels.dispatch import resolve

from r1pipe.kernels.logprob_torch import ChunkedLinearLogprobs

LN2 = math.log(2.0)
# Bytes of the one dlogits chunk the Triton backward keeps alive; sets the vocab chunk width.
# 384..768 MiB ran within noise of each other on an H100 at N=16384; the smallest keeps memory low.
DLOGITS_CHUNK_BYTES = 384 * 2**20
# ...but never narrower than this: each chunk re-reads and re-writes the fp32 dH accumulator.
MIN_CHUNK_WIDTH = 4096
_TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_fp32_out_mm_works: bool | None = None


def fused_linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                          temperature: float = 1.0, return_entropy: bool = False,
                          ignore_index: int = -100, backend: str = "auto"):
    """log softmax(hidden @ weight.T / temperature)[i, targets[i]] for every row i.

    hidden [N, H], weight [V, H] (same dtype: bf16, fp16 or fp32), targets [N] integer.
    Returns logprobs [N] float32, plus entropy [N] float32 of the same tempered distribution
    when `return_entropy`. Rows with targets == ignore_index give 0 and get no gradient.
    Differentiable in hidden and weight; backend is "auto", "triton" or "torch".
    """
    backend = resolve(backend)
    _check_inputs(hidden, weight, targets, temperature, backend)
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    _check_target_range(safe_targets, weight.shape[0], ignore_index)
    inv_temp = 1.0 / float(temperature)
    if _use_triton(backend, hidden):
        _check_int32_indexing(hidden.shape[0], hidden.shape[1], weight.shape[0])
        return _TritonLinearLogprobs.apply(hidden, weight, safe_targets.to(torch.int32), valid,
                                           inv_temp, return_entropy)
    return ChunkedLinearLogprobs.apply(hidden, weight, safe_targets, valid, inv_temp,
                                       return_entropy)


def _check_inputs(hidden, weight, targets, temperature, backend):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"fused_linear_logprobs: expected hidden [N, H] and weight [V, H] with the "
                         f"same H, got hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1] or targets.dtype.is_floating_point:
        raise ValueError(f"fused_linear_logprobs: targets must be an integer tensor [N] = "
                         f"[{hidden.shape[0]}], got {targets.dtype} {tuple(targets.shape)}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"fused_linear_logprobs: hidden is {hidden.dtype} but weight is "
                         f"{weight.dtype}; cast one so both match (bf16, fp16 or fp32)")
    if hidden.device != weight.device or hidden.device != targets.device:
        raise ValueError("fused_linear_logprobs: hidden, weight and targets must be on one device, "
                         f"got {hidden.device}, {weight.device}, {targets.device}")
    if not temperature > 0:
        raise ValueError(f"fused_linear_logprobs: temperature must be > 0, got {temperature}")
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"fused_linear_logprobs: backend must be 'auto', 'triton' or 'torch', "
                         f"got {backend!r}")


def _check_target_range(safe_targets, V, ignore_index):
    bad = (safe_targets < 0) | (safe_targets >= V)
    if safe_targets.is_cuda:  # no host sync on the hot path: a device-side assert instead
        torch._assert_async(~bad.any())
    elif bad.any():
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"fused_linear_logprobs: targets[{i}] = {int(safe_targets[i])} is outside "
                         f"[0, {V}) and is not ignore_index={ignore_index}")


def _check_int32_indexing(N, H, V):
    # The kernels index hidden, weight and the dlogits chunk with 32-bit offsets.
    max_rows = (2**31 - 1) // max(H, MIN_CHUNK_WIDTH + 256)
    if N > max_rows or V * H >= 2**31:
        raise ValueError(f"fused_linear_logprobs: N={N}, H={H}, V={V} overflows the Triton kernels' "
                         f"32-bit offsets; call it on batches of at most {max_rows} rows "
                         f"(and V*H < 2**31)")


def _use_triton(backend: str, hidden: torch.Tensor) -> bool:
    if backend == "torch":
        return False
    # "auto" takes the interpreter never: CPU tensors go to the twin unless asked otherwise.
    on_device = hidden.is_cuda or (backend == "triton" and _interpreting())
    ok = hidden.dtype in _TRITON_DTYPES and on_device and _triton_available()
    if backend == "triton" and not ok:
        raise RuntimeError("fused_linear_logprobs(backend='triton') needs triton and CUDA tensors "
                           "(or TRITON_INTERPRET=1 for CPU tensors) in bf16/fp16/fp32, got "
                           f"{hidden.dtype} on {hidden.device}")
    return ok


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


class _TritonLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets_i32, valid, inv_temp, with_entropy):
        from r1pipe.kernels import logprob_triton as lt

        hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
        weight = weight if weight.stride(-1) == 1 else weight.contiguous()
        N = hidden.shape[0]
        if N == 0:
            lse2 = hidden.new_empty((0,), dtype=torch.float32)
            logprobs, entropy, ez2 = lse2.clone(), lse2.clone(), lse2.clone()
        else:
            lse_part, ent_part, tgt_z2 = lt.lse_forward(hidden, weight, targets_i32, inv_temp,
                                                        with_entropy)
            lse_parts = lse_part * LN2  # natural-log units from here on
            lse = torch.logsumexp(lse_parts, 0)
            logprobs = torch.where(valid, tgt_z2 * LN2 - lse, 0.0)
            lse2, ez2 = lse * (1.0 / LN2), None
            if with_entropy:  # H = sum_j w_j (H_j - log w_j), w_j a span's softmax mass: no cancellation
                log_w = lse_parts - lse
                entropy = torch.where(valid, (log_w.exp() * (ent_part * LN2 - log_w)).sum(0), 0.0)
                ez2 = (lse - entropy) * (1.0 / LN2)  # E[z] in base 2, what the backward needs
        ctx.save_for_backward(hidden, weight, targets_i32, valid, lse2, ez2)
        ctx.inv_temp = inv_temp
        ctx.set_materialize_grads(False)  # an unused output (often entropy) costs nothing
        return (logprobs, entropy) if with_entropy else logprobs

    @staticmethod
    def backward(ctx, grad_lp, grad_ent=None):
        from r1pipe.kernels import logprob_triton as lt

        hidden, weight, targets_i32, valid, lse2, ez2 = ctx.saved_tensors
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        N, V = hidden.shape[0], weight.shape[0]
        if not (need_dh or need_dw) or N == 0 or (grad_lp is None and grad_ent is None):
            return (torch.zeros_like(hidden) if need_dh else None,
                    torch.zeros_like(weight) if need_dw else None, None, None, None, None)
        g_lp = None if grad_lp is None else (grad_lp.float() * valid).contiguous()
        g_ent = None if grad_ent is None or ez2 is None else (grad_ent.float() * valid).contiguous()
        cfg = lt.default_config(hidden.dtype, backward=True)
        width = vocab_chunk_width(N, V, hidden.element_size(), cfg.block_n)
        dl = torch.empty((N, width), device=hidden.device, dtype=hidden.dtype)
        dh32 = torch.zeros(hidden.shape, device=hidden.device, dtype=torch.float32) if need_dh else None
        dw = torch.empty_like(weight) if need_dw else None
        for v0 in range(0, V, width):
            w = min(width, V - v0)
            lt.dlogits_chunk(hidden, weight, targets_i32, lse2, ez2, g_lp, g_ent, dl, v0, w,
                             ctx.inv_temp, cfg)
            d = dl[:, :w]
            if need_dw:  # every row contributes: this chunk of dW is final, written in place
                torch.mm(d.T, hidden, out=dw[v0:v0 + w])
            if need_dh:
                _addmm_fp32(dh32, d, weight[v0:v0 + w])
        return (dh32.to(hidden.dtype) if need_dh else None, dw, None, None, None, None)


def vocab_chunk_width(N: int, V: int, elt: int, block_n: int) -> int:
    """Widest multiple of block_n whose [N, width] dlogits fit DLOGITS_CHUNK_BYTES (at least
    MIN_CHUNK_WIDTH), balanced so the last chunk is not a sliver."""
    max_w = max(block_n, min(MIN_CHUNK_WIDTH, V),
                DLOGITS_CHUNK_BYTES // max(1, N * elt) // block_n * block_n)
    n_chunks = -(-V // max_w)
    per = -(-V // n_chunks)
    return -(-per // block_n) * block_n


def _addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with acc float32; cuBLAS accumulates in fp32 and adds into acc when it can."""
    global _fp32_out_mm_works
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    if a.is_cuda and _fp32_out_mm_works is not False:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            _fp32_out_mm_works = True
            return
        except (RuntimeError, TypeError):
            _fp32_out_mm_works = False
    if a.is_cuda:  # older torch: one bf16/fp16 rounding of each chunk's partial product
        acc += torch.mm(a, b)
    else:
        acc.addmm_(a.float(), b.float())
