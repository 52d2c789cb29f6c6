"""Benchmark of r1pipe.kernels.fused_moe (Triton) against the expert loop, torch._grouped_mm and Liger's
fused MoE on one GPU, after a correctness pass against float64 on that GPU. Prints a table last.

  python scripts/bench_moe.py [--sweep] [--explore] [--out DIR]   (needs CUDA; Liger optional)
FLOPs count 6*T*K*H*I forward and 3x that forward+backward. Peers: tests/kernels/test_moe.py has the
float64 reference; kernels/moe_torch.py is the torch._grouped_mm peer.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import pathlib
import platform
import sys

import time

import torch
import torch.nn.functional as F
import triton
import triton.testing

from r1pipe.kernels import moe_reference, moe_triton
from r1pipe.kernels.moe_routing import route
from r1pipe.kernels.moe_triton import TileConfig, fused_moe_triton

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("test_moe", ROOT / "tests/kernels/test_moe.py")
test_moe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(test_moe)

V2_LITE = dict(T=16384, H=2048, I=1408, E=64, K=6)
V3 = dict(T=8192, H=7168, I=2048, E=256, K=8)
SHAPES = dict(v2=V2_LITE, v3=V3, small=(2048, 512, 128))
DEV = "cuda"  # --smoke: "cpu" under TRITON_INTERPRET=1, tiny shapes, to test this script itself


def do_bench(fn, warmup, rep, return_mode="median"):
    if DEV == "cuda":
        return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode=return_mode)
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def expert_loop(x, gate_up_proj, down_proj, topk_ids, topk_weights):
    """transformers-eager style: one pass per hit expert, torch.where to find its tokens."""
    out = torch.zeros_like(x)
    inter = down_proj.shape[-1]
    for e in torch.unique(topk_ids).tolist():
        tok, slot = torch.where(topk_ids == e)
        gate, up = F.linear(x[tok], gate_up_proj[e]).split(inter, dim=-1)
        y = F.linear(F.silu(gate) * up, down_proj[e]) * topk_weights[tok, slot, None]
        out = out.index_add(0, tok, y.to(x.dtype))
    return out


def grouped_mm(x, gate_up_proj, down_proj, topk_ids, topk_weights):
    return moe_reference(x, gate_up_proj, down_proj, topk_ids, topk_weights, grouped_mm=True)


def liger():
    try:
        from liger_kernel.ops.fused_moe import LigerFusedMoEFunction
    except Exception as err:  # not installed: the table says so
        print(f"liger-kernel unavailable: {err!r}")
        return None
    return lambda x, gu, d, ids, w: LigerFusedMoEFunction.apply(x, gu, d, ids.to(torch.int32), w)


def routing(kind: str, T: int, E: int, K: int, gen: torch.Generator) -> torch.Tensor:
    scores = torch.rand(T, E, generator=gen, device=DEV)
    if kind == "skewed":  # 4 hot experts in 75% of tokens' top-K: half of all pairs on 4 experts
        hot = torch.rand(T, generator=gen, device=DEV) < 0.75
        scores[hot, :4] += 2.0
    return scores.topk(K, dim=1).indices


def make_inputs(T, H, I, E, K, kind="balanced", seed=0, dtype=torch.bfloat16):
    gen = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(T, H, device=DEV, generator=gen).to(dtype)
    gu = (torch.randn(E, 2 * I, H, device=DEV, generator=gen) / H**0.5).to(dtype)
    d = (torch.randn(E, H, I, device=DEV, generator=gen) / I**0.5).to(dtype)
    ids = routing(kind, T, E, K, gen)
    w = torch.softmax(torch.randn(T, K, device=DEV, generator=gen), dim=1).to(dtype)
    return x, gu, d, ids, w


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


EXTRA_CASES = [("one_expert_most", "skewed", 333, 96, 80, 9, 4), ("wide", "balanced", 517, 256, 176, 10, 3)]


def check_correctness(log) -> bool:
    """Small shapes vs the float64 dense reference, then the V2-Lite shape at three batch sizes vs the
    float64 expert loop, with torch._grouped_mm's error beside ours (every output element of ours
    poisoned first)."""
    ok = True
    moe_triton.POISON_OUTPUTS = True
    for case in test_moe.CASES + EXTRA_CASES:
        for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
            errs = test_moe.relative_errors(lambda *a: fused_moe_triton(*[t.to(DEV) for t in a]).cpu(),
                                            case, dtype, seed=7)
            worst = max(v for k, v in errs.items() if k != "dtype_out")
            ok &= worst <= tol
            log(f"check {case[0]:16s} {str(dtype):15s} worst rel err {worst:.2e} "
                f"{'ok' if worst <= tol else 'FAIL'} {errs}")
    # the V2-Lite shape at three batch sizes, so each tuned regime's tiles (split tails, expert
    # groups, TMA boxes) meet the float64 expert loop: xlarge, large and medium
    for T in (SHAPES["v2"]["T"], SHAPES["v2"]["T"] // 4, SHAPES["v2"]["T"] // 8):
        x, gu, d, ids, w = make_inputs(**dict(SHAPES["v2"], T=T), seed=1)
        go = torch.randn_like(x)
        ref_in = [t.double().requires_grad_() for t in (x, gu, d, w)]
        ref = moe_reference(ref_in[0], ref_in[1], ref_in[2], ids, ref_in[3])
        ref_g = torch.autograd.grad(ref, ref_in, go.double())
        reg = moe_triton.regime(T * SHAPES["v2"]["K"] / SHAPES["v2"]["E"])
        for name, fn in (("ours", fused_moe_triton), ("grouped_mm", grouped_mm)):
            ins = [t.clone().requires_grad_() for t in (x, gu, d, w)]
            out = fn(ins[0], ins[1], ins[2], ids, ins[3])
            g = torch.autograd.grad(out, ins, go)
            errs = [rel(out, ref)] + [rel(a, b) for a, b in zip(g, ref_g)]
            log(f"check V2-Lite T={T} ({reg}) bf16 {name:10s} rel err out/dx/dgate_up/ddown/dweights: "
                + " ".join(f"{e:.2e}" for e in errs))
            if name == "ours":
                ok &= max(errs) <= 2e-2
    moe_triton.POISON_OUTPUTS = False
    del ref_in, ref, ref_g
    torch.cuda.empty_cache()
    return ok


def time_method(fn, inputs, backward: bool, rep_ms=400):
    x, gu, d, ids, w = inputs
    if not backward:
        with torch.no_grad():
            return do_bench(lambda: fn(x, gu, d, ids, w), warmup=100, rep=rep_ms, return_mode="median")
    ins = [t.detach().requires_grad_() for t in (x, gu, d, w)]
    go = torch.randn_like(x)
    step = lambda: torch.autograd.grad(fn(ins[0], ins[1], ins[2], ids, ins[3]), ins, go)  # noqa: E731
    return do_bench(step, warmup=100, rep=rep_ms, return_mode="median")


def extra_memory_gib(fn, inputs) -> float:
    """Peak allocated during forward+backward above what the inputs hold (weight grads included)."""
    x, gu, d, ids, w = inputs
    ins = [t.detach().requires_grad_() for t in (x, gu, d, w)]
    go = torch.randn_like(x)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    grads = torch.autograd.grad(fn(ins[0], ins[1], ins[2], ids, ins[3]), ins, go)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del grads
    return peak / 2**30


_T = TileConfig


def sweep_plan() -> dict:
    """label: (shape, {kernel: candidate configs}); the label's regime is the shape's (REGIMES)."""
    v2, v3 = SHAPES["v2"], SHAPES["v3"]
    return {
        "xlarge": (v2, {
            "gate_up": [_T(128, 128, 64, 8, 8, 4), _T(128, 128, 64, 8, 8, 3), _T(128, 128, 32, 8, 8, 5),
                        _T(256, 64, 64, 8, 8, 3), _T(128, 128, 64, 16, 8, 4)],
            "down": [_T(128, 256, 64, 8, 8, 3), _T(128, 256, 64, 8, 8, 4), _T(256, 128, 64, 8, 8, 3),
                     _T(128, 256, 32, 8, 8, 5)],
            "dx": [_T(128, 256, 64, 8, 8, 3), _T(128, 256, 64, 8, 8, 4), _T(128, 256, 32, 8, 8, 5),
                   _T(256, 128, 64, 8, 8, 4)],
            "down_bwd": [_T(128, 128, 64, 8, 8, 4, False), _T(128, 256, 64, 8, 8, 3, False),
                         _T(128, 128, 64, 8, 8, 3, False), _T(128, 256, 32, 8, 8, 4, False),
                         _T(128, 64, 64, 8, 4, 4, True), _T(128, 64, 64, 8, 8, 4, True)],
            "dw": [_T(128, 128, 32, 8, 4, 5), _T(128, 128, 64, 8, 8, 4), _T(128, 128, 32, 8, 8, 5),
                   _T(128, 256, 32, 8, 8, 4), _T(256, 128, 32, 8, 8, 4), _T(128, 128, 64, 8, 4, 3)]}),
        "large": (v3, {
            "gate_up": [_T(128, 128, 64, 8, 8, 4), _T(128, 128, 64, 8, 8, 3), _T(256, 64, 64, 8, 8, 4),
                        _T(128, 64, 64, 8, 4, 4), _T(64, 128, 64, 8, 4, 4)],
            "down": [_T(128, 256, 64, 8, 8, 3), _T(128, 128, 64, 8, 8, 4), _T(256, 128, 64, 8, 8, 3),
                     _T(128, 256, 64, 8, 8, 4), _T(64, 256, 64, 8, 4, 4)]}),
        "medium": (dict(v2, T=2048), {
            "gate_up": [_T(64, 128, 64, 8, 4, 4), _T(64, 64, 128, 8, 4, 4), _T(128, 128, 64, 8, 8, 4),
                        _T(32, 128, 64, 8, 4, 4), _T(64, 128, 64, 8, 8, 4)],
            "down": [_T(64, 128, 64, 8, 4, 4), _T(64, 256, 64, 8, 8, 3), _T(128, 256, 64, 8, 8, 3),
                     _T(32, 128, 128, 8, 4, 4), _T(64, 128, 128, 8, 4, 3)]}),
        "small": (dict(v2, T=512), {
            "gate_up": [_T(64, 64, 128, 8, 4, 4), _T(64, 128, 64, 8, 4, 4), _T(32, 128, 64, 8, 4, 5),
                        _T(32, 64, 128, 8, 4, 4), _T(64, 64, 128, 8, 4, 4, tma=True)],
            "down": [_T(64, 128, 64, 8, 4, 4), _T(64, 256, 64, 8, 8, 3), _T(32, 128, 64, 8, 4, 4),
                     _T(64, 128, 64, 8, 4, 4, tma=True)]}),
        "tiny": (dict(v2, T=128), {
            "gate_up": [_T(16, 128, 64, 8, 4, 5), _T(32, 128, 64, 8, 4, 5), _T(16, 64, 128, 8, 4, 4),
                        _T(16, 128, 64, 8, 4, 5, tma=True)],
            "down": [_T(16, 128, 64, 8, 4, 4), _T(32, 128, 64, 8, 4, 4), _T(16, 64, 128, 8, 4, 4),
                     _T(16, 128, 64, 8, 4, 4, tma=True)]}),
    }


def explore_plan() -> dict:
    """Candidates beyond the tuned table, timed and logged only (not applied): each table config
    with and without split_tail (an expert's last tile of <= block_m/2 rows at half height) and
    expert_groups (GROUP_M-tile groups inside one expert), where ~256 rows per expert (V3) leave
    half the experts a near-empty third 128-row tile; and at T=2048 one 256-row M-tile per expert.
    Its runs: moe_h100_split_explore.log (before the 256-row candidates, with the table before these
    flags, when gate_up "large" had num_stages=3) and moe_h100_m256_explore.log; the TMA-vs-plain-loads
    exploration of moe_h100_explore.log was this function at commit 7c08204."""
    v2, v3 = SHAPES["v2"], SHAPES["v3"]
    plan = {}
    for label, shape in (("medium T=2048", dict(v2, T=2048)), ("large T=4096", dict(v2, T=4096)),
                         ("large V3", v3), ("xlarge V2-Lite", v2)):
        rows = shape["T"] * shape["K"] / shape["E"]
        kernels = ("gate_up", "down") if "T=" in label else ("gate_up", "down", "dx", "down_bwd")
        per_kernel = {}
        for kernel in kernels:
            cfg = dataclasses.replace(moe_triton.tile_config(kernel, rows, torch.bfloat16), split_tail=False,
                                      expert_groups=False)
            flags = [dict(), dict(expert_groups=True)]
            if kernel != "down_bwd":
                flags += [dict(split_tail=True), dict(split_tail=True, expert_groups=True)]
            if label == "medium T=2048":  # one M-tile per expert (~192 rows): each weight tile read once
                n = 64 if kernel == "gate_up" else 128
                flags += [dict(block_m=256, block_n=n, num_stages=st, expert_groups=True, group_m=1)
                          for st in (3, 4)]
                flags += [dict(block_m=256, block_n=n, num_stages=3, expert_groups=True, group_m=1,
                               split_tail=True)]
            if label == "large V3" and kernel == "gate_up":
                flags += [dict(expert_groups=True, group_m=4), dict(split_tail=True, expert_groups=True, group_m=4),
                          dict(split_tail=True, expert_groups=True, num_stages=4)]
            per_kernel[kernel] = [dataclasses.replace(cfg, **f) for f in flags]
        plan[label] = (shape, per_kernel)
    return plan


def sweep(plan: dict, log) -> dict:
    """Time each kernel alone under its candidate tile configs; returns the best per (kernel, regime)."""
    best = {}
    for label, (shape, per_kernel) in plan.items():
        if DEV == "cpu":
            shape = dict(shape, T=max(4, shape["T"] // 400))
        T, H, I, E, K = (shape[k] for k in "THIEK")
        reg = moe_triton.regime(T * K / E)
        log(f"sweep {label}: T={T} H={H} I={I} E={E} K={K}, {T * K / E:.0f} rows per expert -> {reg}")
        x, gu, d, ids, w = make_inputs(**shape, seed=2)
        r = route(ids, E)
        wf = w.view(-1)
        dout = torch.randn_like(x)
        h, gu_act = moe_triton.gate_up_swiglu(x, gu, r, save_gu=True)
        dgu = torch.randn_like(gu_act)
        hw = torch.randn_like(h)
        calls = {
            "gate_up": lambda: moe_triton.gate_up_swiglu(x, gu, r, save_gu=True),
            "down": lambda: moe_triton.rows_matmul(h, d, (d.stride(0), d.stride(1), d.stride(2)), H, r, wf,
                                                   "down"),
            "dx": lambda: moe_triton.rows_matmul(dgu, gu, (gu.stride(0), gu.stride(2), gu.stride(1)), H, r,
                                                 None, "dx"),
            "down_bwd": lambda: moe_triton.down_backward(dout, d, gu_act, wf, r, dgu),
            "dw": lambda: (moe_triton.expert_weight_grad(dgu, False, x, True, r, E),
                           moe_triton.expert_weight_grad(dout, True, hw, False, r, E)),
        }
        # each candidate's output against the table config's (down_bwd writes into dgu: not compared)
        moe_triton.set_tile_configs(None)
        first = lambda out: out[0] if isinstance(out, tuple) else out  # noqa: E731
        expect = {k: first(calls[k]()).float() for k in ("gate_up", "down", "dx") if k in per_kernel}
        flops = {"gate_up": 4, "down": 2, "dx": 4, "down_bwd": 2, "dw": 6}
        weight_share = {"gate_up": 2 / 3, "down": 1 / 3, "dx": 2 / 3, "down_bwd": 1 / 3, "dw": 1}
        for kernel, configs in per_kernel.items():
            for cfg in configs:
                moe_triton.set_tile_configs({(kernel, reg): cfg})
                try:
                    err = rel(first(calls[kernel]()), expect[kernel]) if kernel in expect else 0.0
                    ms = do_bench(calls[kernel], warmup=25, rep=150, return_mode="median")
                except Exception as exc:  # e.g. out of shared memory: skip the config
                    log(f"sweep {reg} {kernel:8s} {cfg} failed: {type(exc).__name__}: {str(exc)[:120]}")
                    continue
                if not err <= 1e-2:
                    log(f"sweep {reg} {kernel:8s} {cfg} WRONG: rel err {err:.2e} against the table's config")
                    continue
                tflops = flops[kernel] * T * K * H * I / ms / 1e9
                tbs = weight_share[kernel] * 3 * E * H * I * 2 / ms / 1e9
                log(f"sweep {reg:6s} {kernel:8s} {ms:7.3f} ms {tflops:6.0f} TFLOP/s {tbs:5.2f} TB/s  {cfg}")
                if (kernel, reg) not in best or ms < best[kernel, reg][0]:
                    best[kernel, reg] = (ms, cfg)
        del x, gu, d, h, gu_act, dgu, hw, dout, calls, expect
        if DEV == "cuda":
            torch.cuda.empty_cache()
    moe_triton.set_tile_configs(None)
    return {k: v[1] for k, v in best.items()}


def main():
    global DEV
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true", help="time tile configs per kernel first")
    ap.add_argument("--explore", action="store_true", help="after the table's runs, time more tile configs")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="CPU + TRITON_INTERPRET=1, tiny shapes")
    ap.add_argument("--methods", default="all",
                    help="comma-separated subset of ours,grouped_mm,liger,loop for the table (default all)")
    args = ap.parse_args()
    if args.smoke:
        DEV = "cpu"
        SHAPES.update(v2=dict(T=40, H=64, I=32, E=6, K=2), v3=dict(T=24, H=96, I=64, E=9, K=3),
                      small=(16, 8))
    out_dir = pathlib.Path(args.out)
    lines = []

    def log(s):
        print(s, flush=True)
        lines.append(s)

    if DEV == "cuda":
        props = torch.cuda.get_device_properties(0)
        log(f"device {props.name}, {props.multi_processor_count} SMs")
    log(f"torch {torch.__version__}, triton {triton.__version__}, python {platform.python_version()}, "
        f"{datetime.date.today()}; command: python " + " ".join(sys.argv))
    if not args.skip_check:
        log(f"correctness: {'PASS' if check_correctness(log) else 'FAIL'}")
    if args.sweep:
        best = sweep(sweep_plan(), log)
        log("best configs: {" + ", ".join(f"{k!r}: {v!r}" for k, v in best.items()) + "}")
        moe_triton.set_tile_configs(best)

    methods = {"ours (Triton)": fused_moe_triton, "torch._grouped_mm": grouped_mm,
               "Liger fused MoE": liger(), "expert loop": expert_loop}
    if DEV == "cpu":  # neither grouped_mm nor Liger's kernels run there
        methods = {k: v for k, v in methods.items() if k in ("ours (Triton)", "expert loop")}
    if args.methods != "all":
        short = dict(ours="ours (Triton)", grouped_mm="torch._grouped_mm", liger="Liger fused MoE",
                     loop="expert loop")
        keep = {short[m.strip()] for m in args.methods.split(",")}
        methods = {k: v for k, v in methods.items() if k in keep}
    rows = []

    def bench(label, shape, kind="balanced", backward=True, peers=tuple(methods), memory=False):
        T, H, I, E, K = (shape[k] for k in "THIEK")
        inputs = make_inputs(**shape, kind=kind, seed=3)
        fwd_flop = 6 * T * K * H * I
        weight_bytes = 3 * E * H * I * inputs[0].element_size()
        for name in ["ours (Triton)"] + [p for p in peers if p != "ours (Triton)"]:
            fn = methods.get(name)
            if fn is None:
                continue
            slow = name == "expert loop"
            try:
                f = time_method(fn, inputs, False, rep_ms=1000 if slow else 400)
                b = time_method(fn, inputs, True, rep_ms=2000 if slow else 600) if backward else None
                mem = extra_memory_gib(fn, inputs) if memory and DEV == "cuda" else None
            except Exception as err:
                log(f"{label} {name}: failed {type(err).__name__}: {str(err)[:300]}")
                continue
            row = dict(case=label, method=name, fwd_ms=f, fwd_tflops=fwd_flop / f / 1e9,
                       weight_tb_s=weight_bytes / f / 1e9,
                       fwdbwd_ms=b, fwdbwd_tflops=3 * fwd_flop / b / 1e9 if b else None, mem_gib=mem)
            rows.append(row)
            log(json.dumps(row))
        del inputs
        if DEV == "cuda":
            torch.cuda.empty_cache()

    v2, v3 = SHAPES["v2"], SHAPES["v3"]
    bench(f"V2-Lite T={v2['T']} balanced", v2, memory=True)
    bench(f"V2-Lite T={v2['T']} skewed", v2, kind="skewed", peers=("torch._grouped_mm",))
    for T in SHAPES["small"]:
        bench(f"V2-Lite T={T}", dict(v2, T=T), backward=False)
    bench(f"V3 T={v3['T']} balanced", v3, backward=False)
    bench(f"V3 T={v3['T']} balanced", v3, peers=())

    if args.explore:
        best = sweep(explore_plan(), log)
        log("explore best: {" + ", ".join(f"{k!r}: {v!r}" for k, v in best.items()) + "}")

    table = ["| case | method | fwd ms | fwd TFLOP/s | weight TB/s | fwd+bwd ms | fwd+bwd TFLOP/s | extra GiB |",
             "|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, p: "–" if v is None else f"{v:.{p}f}"  # noqa: E731
    for r in rows:
        table.append(f"| {r['case']} | {r['method']} | {fmt(r['fwd_ms'], 3)} | {fmt(r['fwd_tflops'], 0)} | "
                     f"{fmt(r['weight_tb_s'], 2)} | {fmt(r['fwdbwd_ms'], 2)} | {fmt(r['fwdbwd_tflops'], 0)} | "
                     f"{fmt(r['mem_gib'], 2)} |")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "moe_bench.json").write_text(json.dumps(rows, indent=1))
    (out_dir / "moe_bench.log").write_text("\n".join(lines + table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
