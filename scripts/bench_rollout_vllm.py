"""Rollout engine numbers on this machine: vLLM start time, sampling throughput (GRPO-step shape:
32 prompts x 8 samples x 32 tokens) against transformers `generate` as the peer, and weight-sync
seconds (one bucket, one bucket per layer, packed experts).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_rollout_vllm.py [--size tiny|medium] [--json OUT]

The tiny checkpoint comes from tests/rollout/conftest.py until r1pipe.model ships its factory.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

SIZES = {
    "tiny": {},
    # Wider MoE so that sync moves ~80 MB instead of ~1 MB.
    "medium": dict(hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=4,
                   n_routed_experts=64, num_experts_per_tok=6, n_group=8, topk_group=4, num_attention_heads=4,
                   num_key_value_heads=4),
}


def _fixtures():
    path = Path(__file__).resolve().parents[1] / "tests" / "rollout" / "conftest.py"
    spec = importlib.util.spec_from_file_location("rollout_fixtures", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from safetensors.torch import load_file
    from transformers import DeepseekV3ForCausalLM

    from r1pipe.rollout.vllm_engine import VLLMRolloutEngine

    work = Path(tempfile.mkdtemp(prefix="bench_rollout_"))
    ckpt = _fixtures().build_tiny_checkpoint(work / "ckpt", seed=0, **SIZES[args.size])
    published = list(load_file(str(ckpt / "model.safetensors")).items())
    n_params = sum(t.numel() for _, t in published)

    t0 = time.perf_counter()
    engine = VLLMRolloutEngine(ckpt, max_model_len=256, seed=0, max_num_seqs=args.prompts * args.samples)
    start_total = time.perf_counter() - t0

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 98, (16,), generator=g).tolist() for _ in range(args.prompts)]
    kw = dict(n=args.samples, max_tokens=args.tokens, stop_token_ids=[], temperature=1.0)
    engine.generate(prompts, seed=0, **kw)  # first call builds kernels and buffers
    tokens = []

    def vllm_step():
        tokens.append(engine.generate(prompts, seed=len(tokens), **kw).num_completion_tokens)

    vllm_s = _median_seconds(vllm_step, 3)
    vllm_tps = statistics.median(tokens) / vllm_s

    hf = DeepseekV3ForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    batch = torch.tensor(prompts)

    def hf_step():
        with torch.no_grad():
            hf.generate(batch, do_sample=True, num_return_sequences=args.samples, max_new_tokens=args.tokens,
                        min_new_tokens=args.tokens, top_k=0, pad_token_id=2)

    hf_step()
    hf_s = _median_seconds(hf_step, 2)
    hf_tps = args.prompts * args.samples * args.tokens / hf_s

    sync_one = _median_seconds(lambda: engine.sync_weights(published), 5)
    engine.bucket_bytes, saved = 1, engine.bucket_bytes
    sync_layers = _median_seconds(lambda: engine.sync_weights(published), 5)
    engine.bucket_bytes = saved
    packed = list(hf.state_dict().items())
    sync_packed = _median_seconds(lambda: engine.sync_weights(packed), 5)
    nbytes = sum(t.numel() * t.element_size() for _, t in published)

    rows = [
        ("model", f"{args.size}: {n_params / 1e6:.2f}M params, {nbytes / 2**20:.1f} MiB float32"),
        ("vLLM engine start (LLM() / incl. imports)", f"{engine.start_seconds:.2f} s / {start_total:.2f} s"),
        (f"vLLM sample {args.prompts}x{args.samples}x{args.tokens}", f"{vllm_s:.2f} s, {vllm_tps:.0f} tokens/s"),
        ("transformers generate (peer), same shape", f"{hf_s:.2f} s, {hf_tps:.0f} tokens/s"),
        ("sync, one bucket, per-expert keys", f"{sync_one * 1e3:.1f} ms"),
        ("sync, one bucket per layer", f"{sync_layers * 1e3:.1f} ms"),
        ("sync, packed experts (transformers state_dict)", f"{sync_packed * 1e3:.1f} ms"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"\n# bench_rollout_vllm  {platform.node()}  {os.cpu_count()} cpus  load {os.getloadavg()[0]:.1f}")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    if args.json:
        args.json.write_text(json.dumps(dict(rows), indent=2) + "\n")


if __name__ == "__main__":
    main()
