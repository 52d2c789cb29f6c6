"""fused_moe (r1pipe.kernels) against a float64 dense expert reference: output and the gradients of
x, gate_up_proj, down_proj and topk_weights, over balanced, skewed, empty-expert and T=0 routings.

The torch twin runs in-process; the Triton kernels run on the CPU under TRITON_INTERPRET=1 in a
subprocess (the variable must be set before triton decorates the kernels). Speed: scripts/bench_moe.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

GRADS = ("dx", "dgate_up", "ddown", "dweights")


def reference_f64(x, gate_up_proj, down_proj, topk_ids, topk_weights):
    """Every expert on every token (einsum, no sorting), then pick each token's K outputs."""
    I = down_proj.shape[2]
    gate = torch.einsum("th,eih->tei", x, gate_up_proj[:, :I])
    up = torch.einsum("th,eih->tei", x, gate_up_proj[:, I:])
    y = torch.einsum("tei,ehi->teh", F.silu(gate) * up, down_proj)  # [T, E, H]
    picked = y[torch.arange(x.shape[0])[:, None], topk_ids]  # [T, K, H]
    return (picked * topk_weights[..., None]).sum(dim=1)


def make_case(routing: str, T: int, H: int, I: int, E: int, K: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    gate_up = torch.randn(E, 2 * I, H, generator=g) / H**0.5
    down = torch.randn(E, H, I, generator=g) / I**0.5
    scores = torch.rand(T, E, generator=g)
    if routing == "skewed":  # expert 1 is in 90% of the tokens' top-K
        scores[torch.rand(T, generator=g) < 0.9, 1] = 2.0
    elif routing == "empty":  # experts 0 and E-1 are never chosen
        scores[:, 0] = scores[:, -1] = -1.0
    topk_w, topk_ids = scores.topk(K, dim=1)
    return x, gate_up, down, topk_ids, torch.softmax(topk_w, dim=1)


# (name, routing, T, H, I, E, K): E not a power of two; H, I not multiples of the interpreter tiles
CASES = [
    ("balanced", "balanced", 21, 40, 24, 5, 2),
    ("skewed", "skewed", 24, 40, 24, 6, 3),
    ("empty_experts", "empty", 17, 32, 32, 7, 2),
    ("no_tokens", "balanced", 0, 40, 24, 5, 2),
]


def relative_errors(fn, case, dtype: torch.dtype, seed: int = 0) -> dict:
    """‖ours − ref‖ / ‖ref‖ for the output and the four gradients, ref in float64 on the same
    dtype-rounded inputs. Returns {"out": e, "dx": e, ...}."""
    _, routing, T, H, I, E, K = case
    x, gate_up, down, ids, w = make_case(routing, T, H, I, E, K, seed)
    ins = [t.to(dtype).requires_grad_() for t in (x, gate_up, down, w)]
    out = fn(ins[0], ins[1], ins[2], ids, ins[3])
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    grads = torch.autograd.grad(out, ins, grad_out)
    ref_ins = [t.detach().double().requires_grad_() for t in ins]
    ref = reference_f64(ref_ins[0], ref_ins[1], ref_ins[2], ids, ref_ins[3])
    ref_grads = torch.autograd.grad(ref, ref_ins, grad_out.double())

    def rel(a, b):
        if not torch.isfinite(a).all():
            return float("inf")
        return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item() if b.numel() else 0.0

    errs = {"out": rel(out, ref), "dtype_out": str(out.dtype)}
    errs.update({n: rel(a, b) for n, a, b in zip(GRADS, grads, ref_grads)})
    return errs


# bf16 operands with fp32 accumulation land near 5e-3 here; the interpreter also rounds fp32 -> bf16
# by truncation (twice the error of the GPU's round-to-nearest), hence its looser bound.
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
TOL_INTERPRET = {torch.float32: 1e-5, torch.bfloat16: 4e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_torch_twin_matches_float64(case, dtype):
    from r1pipe.kernels import moe_reference

    errs = relative_errors(moe_reference, case, dtype)
    assert errs["dtype_out"] == str(dtype)
    for name in ("out",) + GRADS:
        assert errs[name] <= TOL[dtype], f"{name}: {errs}"


def test_cpu_dispatch_uses_torch_twin():
    from r1pipe.kernels import fused_moe, moe_reference

    x, gate_up, down, ids, w = make_case("balanced", 9, 16, 8, 3, 2, seed=3)
    assert torch.equal(fused_moe(x, gate_up, down, ids, w), moe_reference(x, gate_up, down, ids, w))


def test_errors_name_the_bad_argument():
    from r1pipe.kernels import fused_moe

    x, gate_up, down, ids, w = make_case("balanced", 4, 16, 8, 3, 2, seed=0)
    with pytest.raises(ValueError, match="down_proj"):
        fused_moe(x, gate_up, down.transpose(1, 2), ids, w)
    with pytest.raises(ValueError, match="gate_up_proj"):
        fused_moe(x, gate_up[:, :, :8], down, ids, w)
    with pytest.raises(ValueError, match="topk_ids"):
        fused_moe(x, gate_up, down, ids + 3, w)


def test_routing_tiles_cover_every_row_once():
    from r1pipe.kernels.moe_routing import route

    _, _, _, ids, _ = make_case("skewed", 50, 8, 8, 7, 3, seed=5)
    r = route(ids, 7)
    expert_of_row = ids.reshape(-1)[r.sorted_pair.long()]
    assert torch.equal(expert_of_row, torch.sort(ids.reshape(-1)).values)
    assert torch.equal(r.sorted_token.long(), r.sorted_pair.long() // 3)
    counts = torch.bincount(ids.reshape(-1), minlength=7)
    assert torch.equal(r.expert_offsets.long(), F.pad(torch.cumsum(counts, 0), (1, 0)))
    for block_m in (4, 16):
        tile_expert, tile_start = r.tiles(block_m)
        seen = torch.zeros(150, dtype=torch.long)
        for e, s in zip(tile_expert.tolist(), tile_start.tolist()):
            if e == 7:
                continue
            end = min(s + block_m, int(r.expert_offsets[e + 1]))
            assert int(r.expert_offsets[e]) <= s < end  # a tile never leaves its expert
            seen[s:end] += 1
        assert torch.equal(seen, torch.ones(150, dtype=torch.long))


# ---- Triton kernels under the CPU interpreter, in a subprocess ----------------------------------

# each fp32/bf16 difference in the kernels shows in one run; seconds per run in the interpreter
INTERPRET_RUNS = [("balanced", "bf16"), ("skewed", "fp32"), ("empty_experts", "bf16"),
                  ("no_tokens", "fp32"), ("no_tokens", "bf16"), ("fused_epilogue", "bf16"), ("tma", "bf16"),
                  ("split_tail", "bf16"), ("split_tail", "fp32")]


@pytest.fixture(scope="module")
def interpreter_results():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name,dtype", INTERPRET_RUNS, ids=[f"{n}-{d}" for n, d in INTERPRET_RUNS])
def test_triton_kernels_match_float64(interpreter_results, name, dtype):
    errs = interpreter_results[f"{name}-{dtype}"]
    tol = TOL_INTERPRET[torch.float32 if dtype == "fp32" else torch.bfloat16]
    for key in ("out",) + GRADS:
        assert errs[key] <= tol, f"{key}: {errs}"


def test_split_tail_case_has_short_and_long_tails(interpreter_results):
    # the split_tail runs above check both kinds of an expert's last tile only if the case has both
    assert interpreter_results["split_tail_tails"] == ["long", "short"]


def test_triton_second_backward_is_refused(interpreter_results):
    assert interpreter_results["second_backward"] == "refused"


def test_triton_no_grad_forward_matches(interpreter_results):
    assert interpreter_results["no_grad_same"] is True


def test_routing_kernel_matches_torch_tile_map(interpreter_results):
    assert interpreter_results["routing_kernel"] == "match"


def test_routing_kernel_refuses_out_of_range_ids(interpreter_results):
    assert interpreter_results["bad_ids"] == ["refused", "refused"]


def _interpreter_main():
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from r1pipe.kernels import fused_moe, moe_triton

    moe_triton.POISON_OUTPUTS = True
    triton_path = lambda *a: fused_moe(*a, backend="triton")  # noqa: E731
    results = {}
    cases = {c[0]: c for c in CASES}
    cases["fused_epilogue"] = ("fused_epilogue", "skewed", 19, 40, 24, 5, 2)
    # TMA boxes of the weights and sorted rows; I < BLOCK_N and H % BLOCK_K != 0, so boxes run past
    # an expert's rows, into the next expert and past the tensor's end
    cases["tma"] = ("tma", "skewed", 23, 40, 24, 5, 3)
    # experts whose last 32-row tile holds <= 16 rows (run at half height) and > 16 rows, with TMA
    # boxes in the full-height tiles and pointer loads in the half-height ones; tile groups kept
    # inside an expert (expert_groups), as in the fused_epilogue run's down-backward
    cases["split_tail"] = ("split_tail", "skewed", 37, 40, 24, 5, 3)
    for name, dname in INTERPRET_RUNS:
        dtype = torch.float32 if dname == "fp32" else torch.bfloat16
        if name == "fused_epilogue":  # the SwiGLU backward inside the down-backward GEMM epilogue
            cfg = moe_triton.TileConfig(16, 32, 32, group_m=2, num_warps=1, num_stages=1, expert_groups=True)
            moe_triton.set_tile_configs({("down_bwd", reg): cfg for _, reg in moe_triton.REGIMES})
        if name == "tma":
            cfg = moe_triton.TileConfig(16, 32, 32, group_m=2, num_warps=1, num_stages=1, tma=True)
            moe_triton.set_tile_configs({(k, reg): cfg for k in ("gate_up", "down", "dx")
                                         for _, reg in moe_triton.REGIMES})
        if name == "split_tail":
            cfg = moe_triton.TileConfig(32, 32, 32, group_m=2, num_warps=1, num_stages=1, tma=True,
                                        split_tail=True, expert_groups=True)
            moe_triton.set_tile_configs({(k, reg): cfg for k in ("gate_up", "down", "dx")
                                         for _, reg in moe_triton.REGIMES})
        results[f"{name}-{dname}"] = relative_errors(triton_path, cases[name], dtype, seed=11)
        moe_triton.set_tile_configs(None)
    x, gate_up, down, ids, w = make_case("balanced", 6, 32, 32, 3, 2, seed=2)
    x.requires_grad_()
    out_rows = triton_path(x, gate_up, down, ids, w)
    out = out_rows.sum()
    out.backward(retain_graph=True)
    try:
        out.backward()
        results["second_backward"] = "ran"
    except RuntimeError as err:
        results["second_backward"] = "refused" if "twice" in str(err) else repr(err)
    with torch.no_grad():  # inference skips saving the pre-activations: the same numbers
        again = triton_path(x, gate_up, down, ids, w)
    results["no_grad_same"] = bool(torch.equal(again, out_rows))
    results["routing_kernel"] = _compare_routing_kernel()
    _, routing, T, H, I, E, K = cases["split_tail"]
    tails = torch.bincount(make_case(routing, T, H, I, E, K, seed=11)[3].flatten(), minlength=E) % 32
    results["split_tail_tails"] = sorted({"short" if 0 < t <= 16 else "long" for t in tails.tolist() if t})
    results["bad_ids"] = []
    for bad in (-1, 7):
        ids = torch.tensor([[0, 2], [bad, 1], [3, 4]])
        try:
            from r1pipe.kernels.moe_routing import route

            route(ids, 7).tiles(4)
            results["bad_ids"].append("ran")
        except RuntimeError as err:
            results["bad_ids"].append("refused" if "topk_ids" in str(err) else repr(err))
    print(json.dumps(results))


def _compare_routing_kernel() -> str:
    from r1pipe.kernels.moe_routing import route

    for routing, T, E, K, block_m in (("skewed", 50, 7, 3, 4), ("empty", 33, 9, 2, 16),
                                      ("balanced", 5, 64, 6, 8), ("balanced", 1, 3, 1, 2),
                                      ("skewed", 97, 5, 4, 16)):
        ids = make_case(routing, T, 4, 4, E, K, seed=T)[3]
        by_kernel, by_torch = route(ids, E, block_m, use_kernel=True), route(ids, E, block_m, use_kernel=False)
        if not torch.equal(by_kernel.expert_offsets, by_torch.expert_offsets):
            return f"offsets differ for {routing} T={T} E={E}"
        # both sorts are stable: the same row order, so results do not depend on the path
        if not (torch.equal(by_kernel.sorted_pair, by_torch.sorted_pair)
                and torch.equal(by_kernel.sorted_token, by_torch.sorted_token)):
            return f"sorted pairs differ for {routing} T={T} E={E}"
        for bm in (block_m, 32):
            (ek, sk), (et, st) = by_kernel.tiles(bm), by_torch.tiles(bm)
            used = et < E
            if not (torch.equal(ek, et) and torch.equal(sk[used], st[used])):
                return f"tiles differ for {routing} T={T} E={E} block_m={bm}"
    return "match"


if __name__ == "__main__":
    _interpreter_main()
