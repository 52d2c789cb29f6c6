"""The block's lean autograd ops: the same forward bits as the plain expressions they replace, gradients
equal to a float64 autograd reference, and less kept for backward (counted with saved-tensor hooks)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from r1pipe.model.lean_autograd import float32_linear, rms_norm, silu_mul


def plain_rms_norm(x, weight, eps):  # the expression RMSNorm used to trace (transformers' order)
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def plain_silu_mul(gate, up):
    return F.silu(gate) * up


def plain_float32_linear(x, weight):
    return F.linear(x.float(), weight.float())


OPS = {
    "rms_norm": (lambda x, w: rms_norm(x, w, 1e-6), lambda x, w: plain_rms_norm(x, w, 1e-6),
                 lambda g: ((2, 5, 48), g), lambda g: ((48,), g)),
    "silu_mul": (silu_mul, plain_silu_mul, lambda g: ((7, 40), g), lambda g: ((7, 40), g)),
    "float32_linear": (float32_linear, plain_float32_linear, lambda g: ((3, 6, 32), g), lambda g: ((9, 32), g)),
}


def _inputs(name, dtype, weight_dtype, seed):
    g = torch.Generator().manual_seed(seed)
    a_shape, _ = OPS[name][2](g)
    b_shape, _ = OPS[name][3](g)
    a = torch.randn(a_shape, generator=g) * 2
    b = torch.randn(b_shape, generator=g) + (1.0 if name == "rms_norm" else 0.0)
    return a.to(dtype), b.to(weight_dtype), torch.randn(a_shape[:-1] + (
        {"rms_norm": a_shape[-1], "silu_mul": a_shape[-1], "float32_linear": b_shape[0]}[name],), generator=g)


def _grads(fn, a, b, grad_out):
    a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
    out = fn(a, b)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), a.grad, b.grad


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("dtype,weight_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                (torch.bfloat16, torch.float32)])
def test_same_forward_and_float64_gradients(name, dtype, weight_dtype):
    lean, plain = OPS[name][:2]
    a, b, grad_out = _inputs(name, dtype, weight_dtype, seed=len(name))
    out, ga, gb = _grads(lean, a, b, grad_out)
    p_out, p_ga, p_gb = _grads(plain, a, b, grad_out)
    assert torch.equal(out, p_out)  # the same ops in the same order
    assert ga.dtype == a.dtype and gb.dtype == b.dtype
    # float64 autograd of the same maths on the same (rounded) inputs
    r_out, r_ga, r_gb = _grads(plain, a.double(), b.double(), grad_out.double())
    tol = 1e-5 if dtype == torch.float32 else 1.6e-2  # bf16: a few roundings of the gradient chain
    for mine, theirs, ref in ((ga, p_ga, r_ga), (gb, p_gb, r_gb)):
        err = (mine.double() - ref).norm() / ref.norm()
        plain_err = (theirs.double() - ref).norm() / ref.norm()
        assert err < tol and err <= 1.5 * plain_err + 1e-7, (err.item(), plain_err.item())
    assert torch.equal(ga, p_ga) and torch.equal(gb, p_gb)  # autograd's own backward ops, in its order


def _saved_bytes(fn, a, b) -> int:
    a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(a, b)
    return sum(seen.values())


@pytest.mark.parametrize("name,at_most", [("rms_norm", 0.4), ("silu_mul", 0.67), ("float32_linear", 0.55)])
def test_keeps_less_for_backward(name, at_most):
    lean, plain = OPS[name][:2]
    a, b, _ = _inputs(name, torch.bfloat16, torch.bfloat16, seed=1)
    # rms_norm: x (bf16) + 1/rms instead of x in float32 + the bf16 normalised x: a third (+ weight, 1/rms);
    # silu_mul: gate, up instead of gate, up, silu(gate); float32_linear: x (bf16) instead of x in float32
    assert _saved_bytes(lean, a, b) <= at_most * _saved_bytes(plain, a, b)
