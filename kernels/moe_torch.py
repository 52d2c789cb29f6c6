"""Pure-torch twin of the fused MoE layer: sort pairs by expert, one matmul per expert (or one
torch._grouped_mm on CUDA), weighted index_add back to tokens. Autograd gives its backward.

The CPU path of r1pipe.kernels.fused_moe and the reference the Triton path is benchmarked against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _use_grouped_mm(x: torch.Tensor) -> bool:
    if not (hasattr(torch, "_grouped_mm") and x.is_cuda and x.dtype == torch.bfloat16):
        return False
    return torch.cuda.get_device_capability(x.device) >= (9, 0)


def moe_reference(x, gate_up_proj, down_proj, topk_ids, topk_weights, grouped_mm: bool | None = None):
    """Σ_k w_k · down_e(silu(gate_e(x)) * up_e(x)) for x [T, H]; see r1pipe.kernels.fused_moe."""
    T, H = x.shape
    E, two_i, _ = gate_up_proj.shape
    I = two_i // 2
    K = topk_ids.shape[1]
    flat = topk_ids.reshape(-1)
    if not x.is_cuda and flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= E):
        raise ValueError(f"topk_ids holds expert ids in [{int(flat.min())}, {int(flat.max())}]; "
                         f"expected [0, {E}) for gate_up_proj with {E} experts")
    order = torch.argsort(flat, stable=True)
    tokens = torch.div(order, K, rounding_mode="floor")
    xs = x[tokens]  # the permuted copy the fused kernel avoids
    if grouped_mm is None:
        grouped_mm = _use_grouped_mm(x)
    if grouped_mm:
        offs = torch.cumsum(torch.bincount(flat, minlength=E), 0).to(torch.int32)
        gu = torch._grouped_mm(xs, gate_up_proj.transpose(1, 2), offs=offs)
        h = F.silu(gu[:, :I]) * gu[:, I:]
        y = torch._grouped_mm(h, down_proj.transpose(1, 2), offs=offs)
    else:
        counts = torch.bincount(flat, minlength=E).tolist()
        parts, start = [], 0
        for e, c in enumerate(counts):  # empty experts too, so every weight stays in the graph
            gu = xs[start:start + c] @ gate_up_proj[e].T
            parts.append((F.silu(gu[:, :I]) * gu[:, I:]) @ down_proj[e].T)
            start += c
        y = torch.cat(parts) if parts else xs
    acc = torch.float32 if x.dtype in (torch.bfloat16, torch.float16) else x.dtype
    w = topk_weights.reshape(-1)[order].to(acc)
    out = torch.zeros(T, H, device=x.device, dtype=acc).index_add_(0, tokens, y.to(acc) * w[:, None])
    return out.to(x.dtype)
