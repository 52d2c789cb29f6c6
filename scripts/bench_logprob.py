"""Benchmark fused_linear_logprobs against torch eager, torch.compile, Liger and Cut Cross-Entropy.

One run prints: GEMM ceiling, correctness vs float64 on slices, (optionally) a tile-config sweep,
median fwd+bwd / fwd times (triton.testing.do_bench), extra peak memory and max error per method.
Needs a CUDA GPU. Usage: python scripts/bench_logprob.py [--sweep] [--no-peers] [--out DIR]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
from dataclasses import replace

import torch
import triton

from r1pipe.kernels import logprob as lp_mod
from r1pipe.kernels import logprob_triton as lt
from r1pipe.kernels.logprob import fused_linear_logprobs

GIB = 2**30
RATE = 752e12  # measured bf16 matmul ceiling of the H100 (shared/spec/ENVIRONMENT.md)
LOG = []


def log(*a):
    s = " ".join(str(x) for x in a)
    print(s, flush=True)
    LOG.append(s)


def inputs(N, H, V, dtype=torch.bfloat16, seed=0, ignore_every=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    h = torch.randn(N, H, device="cuda", generator=g).to(dtype)
    w = (torch.randn(V, H, device="cuda", generator=g) * 0.05).to(dtype)
    t = torch.randint(0, V, (N,), device="cuda", generator=g)
    if ignore_every:
        t[::ignore_every] = -100
    return h, w, t, torch.randn(N, device="cuda", generator=g)


# ---- methods: f(h, w, t) -> per-token logprobs [N] (differentiable) ----
def eager(h, w, t):
    return torch.log_softmax((h @ w.T).float(), -1).gather(1, t[:, None])[:, 0]


def make_peers():
    peers = {"torch eager": eager, "torch.compile": torch.compile(eager, dynamic=False)}
    try:
        from liger_kernel.chunked_loss.fused_linear_ppo import _ChunkedSelectiveLogProbFunction as L

        peers["Liger chunked logprob"] = lambda h, w, t: L.apply(h, w, t, None, 1.0, 4096)
    except Exception as e:  # noqa: BLE001
        log("liger import failed:", repr(e)[:200])
    try:
        from liger_kernel.ops.fused_linear_cross_entropy import \
            LigerFusedLinearCrossEntropyFunction as F

        peers["Liger FLCE (none)"] = lambda h, w, t: -F.apply(h, w, t, None, None, -100, 0.0, 0.0,
                                                              "none")[0]
    except Exception as e:  # noqa: BLE001
        log("liger FLCE import failed:", repr(e)[:200])
    try:
        from cut_cross_entropy import linear_cross_entropy

        peers["Cut Cross-Entropy"] = lambda h, w, t: -linear_cross_entropy(h, w, t, reduction="none")
    except Exception as e:  # noqa: BLE001
        log("cce import failed:", repr(e)[:200])
    return peers


def ours(**kw):
    return lambda h, w, t: fused_linear_logprobs(h, w, t, **kw)


def ours_entropy(h, w, t):
    lp, ent = fused_linear_logprobs(h, w, t, return_entropy=True)
    return lp + 0.01 * ent


def bench(fn, h, w, t, g, mode, rep=1000):
    """(median ms, extra peak GiB, extra minus the grads every method must return)."""
    hh = h.detach().requires_grad_(mode == "fwd+bwd")
    ww = w.detach().requires_grad_(mode == "fwd+bwd")

    def step():
        hh.grad = ww.grad = None
        if mode == "fwd+bwd":
            out = fn(hh, ww, t)
            out.backward(g.to(out.dtype))
        else:
            with torch.no_grad():
                fn(hh, ww, t)

    step()
    torch.cuda.synchronize()
    hh.grad = ww.grad = None
    gc.collect()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    grads = sum(x.grad.numel() * x.grad.element_size() for x in (hh, ww) if x.grad is not None)
    ms = triton.testing.do_bench(step, warmup=100, rep=rep, return_mode="median")
    return ms, extra / GIB, (extra - grads) / GIB


def errors(fn, h, w, t, g, T=1.0, entropy=False):
    """Max abs error of logprobs (and entropy) vs float64, norm-relative error of dH, dW."""
    hh, ww = h.detach().requires_grad_(), w.detach().requires_grad_()
    out = fn(hh, ww, t)
    lp, ent = out if isinstance(out, tuple) else (out, None)
    (lp * g + (ent * g.flip(0) if ent is not None else 0)).sum().backward()
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    logp = torch.log_softmax((h64 @ w64.T) / T, -1)
    valid = t != -100
    r_lp = logp.gather(1, torch.where(valid, t, 0)[:, None])[:, 0] * valid
    r_ent = -(logp.exp() * logp).sum(-1) * valid
    (r_lp * g.double() + (r_ent * g.flip(0).double() if ent is not None else 0)).sum().backward()
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()  # noqa: E731
    res = {"lp_max": (lp.double() - r_lp).abs().max().item(), "dh_rel": rel(hh.grad, h64.grad),
           "dw_rel": rel(ww.grad, w64.grad), "finite": bool(torch.isfinite(lp).all())}
    if ent is not None:
        res["ent_max"] = (ent.double() - r_ent).abs().max().item()
    return res


def gemm_ceiling(N, H, V):
    a = torch.randn(N, H, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(V, H, device="cuda", dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ b.T, warmup=100, rep=500, return_mode="median")
    return ms, 2 * N * H * V / ms / 1e9


def correctness():
    log("## correctness vs float64 (ours, auto backend)")
    cases = [(1024, 2048, 102400, 1.0, torch.bfloat16, 0), (777, 520, 50257, 0.7, torch.bfloat16, 5),
             (600, 384, 32001, 1.3, torch.float16, 3), (300, 256, 5003, 0.8, torch.float32, 4)]
    ok = True
    for N, H, V, T, dt, ign in cases:
        h, w, t, g = inputs(N, H, V, dt, seed=N, ignore_every=ign)
        f = lambda hh, ww, tt: fused_linear_logprobs(hh, ww, tt, temperature=T,  # noqa: E731
                                                     return_entropy=True)
        for tma in (True, False):
            lt.HOPPER_FWD, lt.HOPPER_BWD = (replace(lt.HOPPER_FWD, use_tma=tma),
                                            replace(lt.HOPPER_BWD, use_tma=tma))
            e = errors(f, h, w, t, g, T)
            good = e["finite"] and e["lp_max"] < 1e-3 and e["ent_max"] < 1e-3 and \
                e["dh_rel"] < (2e-2 if dt != torch.float32 else 1e-4) and \
                e["dw_rel"] < (2e-2 if dt != torch.float32 else 1e-4)
            ok &= good
            log(f"  N={N} H={H} V={V} T={T} {str(dt)[6:]} tma={tma}: " +
                " ".join(f"{k}={v:.2e}" if isinstance(v, float) else f"{k}={v}" for k, v in e.items()),
                "OK" if good else "FAIL")
    lt.HOPPER_FWD, lt.HOPPER_BWD = replace(lt.HOPPER_FWD, use_tma=True), replace(lt.HOPPER_BWD, use_tma=True)
    return ok


def _pick(label, cfgs, fn, flops):
    best = None
    for cfg in cfgs:
        try:
            ms = triton.testing.do_bench(lambda: fn(cfg), warmup=50, rep=300, return_mode="median")
        except Exception as e:  # noqa: BLE001
            log(f"  {cfg}: failed {type(e).__name__}: {str(e)[:120]}")
            continue
        log(f"  {cfg}: {ms:.2f} ms {flops / ms / 1e9:.0f} TFLOP/s")
        best = min(best or (ms, cfg), (ms, cfg), key=lambda x: x[0])
    log(f"  chosen {label}: {best[1]}")
    return best[1]


def sweep(N, H, V):
    """Time the forward and dlogits kernels over Hopper tile configs, then the vocab chunk
    budget end to end; keep the best of each for the rest of the run."""
    h, w, t, g = inputs(N, H, V)
    t32 = t.to(torch.int32)
    base = replace(lt.HOPPER_FWD, flatten=False, persistent=0)
    log("## sweep: forward kernel (no entropy)")
    lt.HOPPER_FWD = _pick("fwd", [base, replace(base, tiles_per_prog=4),
                                  replace(base, flatten=True), replace(base, flatten=True, tiles_per_prog=4),
                                  replace(base, flatten=True, tiles_per_prog=16),
                                  replace(base, flatten=True, num_stages=4)],
                          lambda c: lt.lse_forward(h, w, t32, 1.0, False, c), 2 * N * H * V)
    lse_part, _, _ = lt.lse_forward(h, w, t32, 1.0, False)
    lse2 = torch.logsumexp(lse_part * math.log(2), 0) / math.log(2)
    width = lp_mod.vocab_chunk_width(N, V, 2, 256)
    dl = torch.empty((N, width), device="cuda", dtype=h.dtype)
    base = replace(lt.HOPPER_BWD, flatten=False, persistent=0)
    log(f"## sweep: dlogits kernel, one chunk of width {width}")
    lt.HOPPER_BWD = _pick("bwd", [base, replace(base, persistent=1),
                                  replace(base, persistent=1, flatten=True),
                                  replace(base, persistent=1, flatten=True, num_stages=4),
                                  replace(base, persistent=1, flatten=True, group_m=8)],
                          lambda c: lt.dlogits_chunk(h, w, t32, lse2, None, g, None, dl, 0, width,
                                                     1.0, c), 2 * N * H * width)
    del dl
    log("## sweep: dlogits chunk budget, fwd+bwd end to end")
    best = None
    for mib in (384, 512, 640, 768):
        lp_mod.DLOGITS_CHUNK_BYTES = mib * 2**20
        ms, extra, work = bench(ours(), h, w, t, g, "fwd+bwd", rep=500)
        log(f"  {mib} MiB (width {lp_mod.vocab_chunk_width(N, V, 2, 256)}): {ms:.2f} ms, "
            f"workspace {work:.2f} GiB")
        if work < 0.95:
            best = min(best or (ms, mib), (ms, mib))
    lp_mod.DLOGITS_CHUNK_BYTES = best[1] * 2**20
    log(f"  chosen budget {best[1]} MiB")
    del h, w, t, g
    h, w, t, g = inputs(65536, H, V)
    log("## sweep: minimum chunk width at N=65536")
    best = None
    for mw in (4096, 8192, 16384):
        lp_mod.MIN_CHUNK_WIDTH = mw
        ms, extra, work = bench(ours(), h, w, t, g, "fwd+bwd", rep=500)
        log(f"  min width {mw}: {ms:.2f} ms, workspace {work:.2f} GiB")
        best = min(best or (ms, mw), (ms, mw))
    lp_mod.MIN_CHUNK_WIDTH = best[1]
    log(f"  chosen min width {best[1]}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    torch.manual_seed(0)
    prop = torch.cuda.get_device_properties(0)
    log(f"# device {prop.name}, {prop.multi_processor_count} SMs; torch {torch.__version__}, "
        f"triton {triton.__version__}; {time.strftime('%Y-%m-%d %H:%M')}; cmd: {' '.join(sys.argv)}")
    N, H, V = 16384, 2048, 102400
    ms, tf = gemm_ceiling(N, H, V)
    log(f"cuBLAS [N,H]x[H,V] bf16: {ms:.2f} ms = {tf:.0f} TFLOP/s; floors at 752: fwd "
        f"{2 * N * H * V / RATE * 1e3:.1f} ms, fwd+bwd {8 * N * H * V / RATE * 1e3:.1f} ms (recompute)")
    if args.sweep:
        sweep(N, H, V)
    ok = correctness()
    rows = []

    def run(name, fn, shape, modes=("fwd+bwd", "fwd")):
        n, hd, v = shape
        h, w, t, g = inputs(n, hd, v)
        for mode in modes:
            try:
                ms, extra, work = bench(fn, h, w, t, g, mode)
            except Exception as e:  # noqa: BLE001
                log(f"  {name} {mode} {shape}: failed {type(e).__name__}: {str(e)[:160]}")
                torch.cuda.empty_cache()
                continue
            floor = (8 if mode == "fwd+bwd" else 2) * n * hd * v / RATE * 1e3
            rows.append(dict(method=name, shape=f"{n}x{hd}x{v}", mode=mode, ms=ms, extra_gib=extra,
                             work_gib=work, floor_frac=floor / ms))
            log(f"  {name:24s} {mode:8s} N={n} H={hd} V={v}: {ms:8.2f} ms  extra {extra:6.2f} GiB"
                f"  workspace {work:6.2f} GiB  floor/ms {floor / ms:.2f}")
        del h, w, t, g
        gc.collect()
        torch.cuda.empty_cache()

    log("## timings (median ms; extra = peak - before; workspace = extra - returned grads)")
    main_shape = (N, H, V)
    run("ours", ours(), main_shape)
    run("ours +entropy", ours_entropy, main_shape)
    peers = {} if args.no_peers else make_peers()
    for name, fn in peers.items():
        run(name, fn, main_shape)
    for shape in ((65536, 2048, 102400), (16384, 4096, 151936)):
        run("ours", ours(), shape)
        for name in ("torch.compile", "Cut Cross-Entropy"):
            if name in peers:
                run(name, peers[name], shape)
    run("ours", ours(), main_shape)  # second time: the spread between identical runs
    log("## max error vs float64 on a 1024-row slice of the main shape")
    h, w, t, g = inputs(1024, H, V, seed=7)
    errs = {}
    for name, fn in {"ours": ours(), **peers}.items():
        try:
            errs[name] = errors(fn, h, w, t, g)
            log(f"  {name:24s} " + " ".join(f"{k}={v:.2e}" if isinstance(v, float) else f"{k}={v}"
                                            for k, v in errs[name].items()))
        except Exception as e:  # noqa: BLE001
            log(f"  {name}: failed {type(e).__name__}: {str(e)[:160]}")
    log("\n| method | shape NxHxV | mode | median ms | extra peak GiB | workspace GiB | GEMM floor / time | lp max err |")
    log("|---|---|---|---|---|---|---|---|")
    for r in rows:
        e = errs.get(r["method"].replace(" +entropy", ""), {}).get("lp_max", float("nan"))
        log(f"| {r['method']} | {r['shape']} | {r['mode']} | {r['ms']:.2f} | {r['extra_gib']:.2f} | "
            f"{r['work_gib']:.2f} | {r['floor_frac']:.2f} | {e:.1e} |")
    log(f"correctness {'OK' if ok else 'FAILED'}; fp32-out addmm used: {lp_mod._fp32_out_mm_works}")
    os.makedirs(args.out, exist_ok=True)
    log(f"configs: fwd {lt.HOPPER_FWD}; bwd {lt.HOPPER_BWD}; chunk budget "
        f"{lp_mod.DLOGITS_CHUNK_BYTES / 2**20:.0f} MiB, min width {lp_mod.MIN_CHUNK_WIDTH}")
    with open(os.path.join(args.out, "bench_logprob.json"), "w") as f:
        json.dump(dict(rows=rows, errors=errs, fwd=str(lt.HOPPER_FWD), bwd=str(lt.HOPPER_BWD)), f)
    with open(os.path.join(args.out, "bench_logprob.log"), "w") as f:
        f.write("\n".join(LOG) + "\n")


if __name__ == "__main__":
    main()
