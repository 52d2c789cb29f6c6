"""Three small ops of the decoder block as autograd functions that keep less for backward than autograd's
own trace of the same expressions. Forward runs the same ops, and backward recomputes what it did not keep,
then runs the ops autograd's own backward would, in its order: outputs and gradients are equal bit for bit
(tests/model/test_lean_autograd.py). Only where a tensor feeds several ops can the order in which autograd sums
their gradient contributions change, with it the last float32 bits.

- `rms_norm`: autograd's trace keeps the float32 copy of x and the normalised x in x's dtype; this keeps x
  and the per-row 1/rms.
- `silu_mul`: silu(g) * u keeps g and u (autograd's trace keeps silu(g) as well).
- `float32_linear`: the router's float32 GEMM keeps its input in the caller's dtype, not the float32 copy.

Measured at the step's peak on the H100 (V2-Lite shape, a 16k-token micro-batch, scripts/bench_grpo_step.py
--memory): the RMSNorm's float32 copies alone held 1.7 GiB of the 14.2 GiB of activations.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float):
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        normed = (xf * rstd).to(x.dtype)
        ctx.save_for_backward(x, weight, rstd)
        return weight * normed

    @staticmethod
    def backward(ctx, grad_out):
        # autograd's own backward of the forward's ops, one for one (so the gradients are the same bits):
        # weight * normed, the cast, xf * rstd, rsqrt, + eps, mean, pow(2), x.float()
        x, weight, rstd = ctx.saved_tensors
        xf = x.float()  # recomputed once, for both gradients
        grad_x = grad_w = None
        if ctx.needs_input_grad[1]:
            prod = grad_out * (xf * rstd).to(x.dtype)
            grad_w = prod.sum(tuple(range(prod.dim() - 1))).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            g = (grad_out * weight).to(x.dtype).float()
            grad_var = -0.5 * (g * xf).sum(-1, keepdim=True) * rstd.pow(3)
            grad_x = (g * rstd + grad_var.expand_as(xf) / xf.shape[-1] * (2 * xf)).to(x.dtype)
        return grad_x, grad_w, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x * rsqrt(mean(x^2) + eps)) in float32, cast to x's dtype before the weight."""
    return _RMSNorm.apply(x, weight, eps)


class _SiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad_out):
        gate, up = ctx.saved_tensors
        grad_gate = grad_up = None
        if ctx.needs_input_grad[0]:
            # the kernel autograd itself calls, on the gradient cast to silu(gate)'s dtype as autograd casts it
            grad_gate = torch.ops.aten.silu_backward((grad_out * up).to(gate.dtype), gate)
        if ctx.needs_input_grad[1]:
            grad_up = (grad_out * F.silu(gate)).to(up.dtype)
        return grad_gate, grad_up


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, the SwiGLU product."""
    return _SiluMul.apply(gate, up)


class _Float32Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return F.linear(x.float(), weight.float())

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_out @ weight.float()).to(x.dtype)
        if ctx.needs_input_grad[1]:
            flat = grad_out.reshape(-1, grad_out.shape[-1])
            grad_w = (flat.t() @ x.reshape(-1, x.shape[-1]).float()).to(weight.dtype)
        return grad_x, grad_w


def float32_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T in float32 whatever the inputs' dtype (the router's logits)."""
    return _Float32Linear.apply(x, weight)
