"""The routed-expert FFN of DeepSeekMoE (spec §4) as one call: fused Triton kernels on CUDA
(moe_triton.py), the pure-torch twin elsewhere (moe_torch.py).

r1pipe.model.moe.moe_forward calls fused_moe; tests compare both paths to a float64 expert loop.
"""
from __future__ import annotations

import torch

from r1pipe.kernels.dispatch import resolve

from r1pipe.kernels.moe_torch import moe_reference

__all__ = ["fused_moe", "moe_reference"]


def _check(x, gate_up_proj, down_proj, topk_ids, topk_weights) -> None:
    if x.dim() != 2:
        raise ValueError(f"fused_moe: x must be [T, H], got shape {tuple(x.shape)}")
    T, H = x.shape
    if gate_up_proj.dim() != 3 or gate_up_proj.shape[2] != H or gate_up_proj.shape[1] % 2:
        raise ValueError(f"fused_moe: gate_up_proj must be [E, 2I, H={H}] (gate rows then up rows), "
                         f"got {tuple(gate_up_proj.shape)}")
    E, two_i, _ = gate_up_proj.shape
    if tuple(down_proj.shape) != (E, H, two_i // 2):
        raise ValueError(f"fused_moe: down_proj must be [E={E}, H={H}, I={two_i // 2}], "
                         f"got {tuple(down_proj.shape)}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != T or topk_ids.dtype.is_floating_point:
        raise ValueError(f"fused_moe: topk_ids must be an integer [T={T}, K] tensor, "
                         f"got {topk_ids.dtype} {tuple(topk_ids.shape)}")
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(f"fused_moe: topk_weights must match topk_ids {tuple(topk_ids.shape)}, "
                         f"got {tuple(topk_weights.shape)}")
    if not (x.dtype == gate_up_proj.dtype == down_proj.dtype):
        raise TypeError(f"fused_moe: x, gate_up_proj, down_proj must share a dtype, got "
                        f"{x.dtype}, {gate_up_proj.dtype}, {down_proj.dtype}")


def _triton_ok(x: torch.Tensor) -> bool:
    if not x.is_cuda or x.dtype not in (torch.bfloat16, torch.float32):  # the dtypes measured there
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def fused_moe(x, gate_up_proj, down_proj, topk_ids, topk_weights, backend: str = "auto"):
    """Σ_k w_k · down_e(silu(gate_e(x)) * up_e(x)) for each token; x [T, H] -> [T, H].

    gate_up_proj [E, 2I, H] (rows 0:I gate, I:2I up) and down_proj [E, H, I] are transformers 5's
    fused `mlp.experts` weights, used as y = x W^T. topk_ids / topk_weights [T, K] are the router's
    choices. Differentiable in x, both weights and topk_weights. backend: "auto" (Triton on CUDA,
    else torch), "triton" (also runs on CPU tensors under TRITON_INTERPRET=1) or "torch".
    """
    _check(x, gate_up_proj, down_proj, topk_ids, topk_weights)
    backend = resolve(backend)
    if backend == "auto":
        backend = "triton" if _triton_ok(x) else "torch"
    if backend == "triton":
        from r1pipe.kernels.moe_triton import fused_moe_triton
        return fused_moe_triton(x, gate_up_proj, down_proj, topk_ids, topk_weights)
    if backend == "torch":
        return moe_reference(x, gate_up_proj, down_proj, topk_ids, topk_weights)
    raise ValueError(f"fused_moe: backend must be 'auto', 'triton' or 'torch', got {backend!r}")
