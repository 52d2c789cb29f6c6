"""The GRPO policy-update step on one GPU and over several (FSDP2, DDP, ZeRO-3), launched through accelerate.

The same policy and synthetic global batch as `bench_grpo_step.py` (DeepSeek-V2-Lite's shape cut to `--layers`
layers, bf16, random weights; `--seqs` sequences in groups of `--group`). Each configuration runs in its own
`accelerate launch` of this script (`--worker`), which sets up like the GRPO stage's session does (shard the
policy with `r1pipe.training.fsdp` before the optimizer, the reference sharded over the same ranks; or ZeRO-3's
engine (`r1pipe.training.zero3`); or DDP
through `accelerator.prepare`), gives each rank whole groups of the batch (as the stage's prompt split does) and
runs the stage's own `update_policy`, then the MoE bias update from loads summed over ranks. Timed: median of
`--steps` steps after `--warmup`. Configurations (`--configs`):

- `1gpu`: one process, nothing sharded (the single-GPU baseline the speed-ups divide);
- `fsdp2x2`: `--config_file recipes/accelerate/fsdp2.yaml --num_processes 2`;
- `fsdp2x2-keep`: that with `--fsdp_reshard_after_forward false` (fewer all-gathers, full weights in memory);
- `ddp2`: `--config_file recipes/accelerate/ddp.yaml --num_processes 2` (replicated weights and optimizer);
- `zero3x2`: `--config_file recipes/accelerate/zero3.yaml --num_processes 2` (DeepSpeed ZeRO-3; not in the
  default list: it has not run on two GPUs yet);
- `zero3x1`, `fsdp2x1`: those configs in one process, with the engine / sharding forced on (a one-process launch
  of the GRPO stage trains unwrapped): each path's set-up, reference and step on one GPU, against `1gpu`.

Sharded configs start from rank 0's policy on the host, as the session loads it: it sends each rank its shards.

Equality: the step's loss and gradient norm (reduced over ranks like the stage's logged metrics) of the first
two steps, and every completion token's log-prob after one update (`--lr`, default 1e-4: large enough that
bf16 weights move; the table shows how far the update moved them, the scale a wrong step would show at), each
against the 1-GPU run on the same global batch.

    python scripts/bench_fsdp_step.py [--configs 1gpu,fsdp2x2,fsdp2x2-keep,ddp2] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_grpo_step import DEVICE, add_step_arguments, build_policy, synthetic_rollouts, sync  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {  # name -> accelerate launch flags
    "1gpu": ["--num_processes", "1"],
    "fsdp2x2": ["--config_file", str(ROOT / "recipes/accelerate/fsdp2.yaml"), "--num_processes", "2"],
    "ddp2": ["--config_file", str(ROOT / "recipes/accelerate/ddp.yaml"), "--num_processes", "2"],
    "zero3x2": ["--config_file", str(ROOT / "recipes/accelerate/zero3.yaml"), "--num_processes", "2"],
    "zero3x1": ["--config_file", str(ROOT / "recipes/accelerate/zero3.yaml"), "--num_processes", "1"],
    "fsdp2x1": ["--config_file", str(ROOT / "recipes/accelerate/fsdp2.yaml"), "--num_processes", "1"],
}
# the layers' gathered weights kept from each forward to its backward (and the reference's for good):
# fewer all-gathers for full weights' memory, sharded gradients and optimizer state (ZeRO-2-like)
CONFIGS["fsdp2x2-keep"] = CONFIGS["fsdp2x2"] + ["--fsdp_reshard_after_forward", "false"]


def rank_share(n_groups: int, group: int, rank: int, world: int) -> list[int]:
    """The sequence indices of this rank's whole groups (contiguous, as even as possible)."""
    first, last = n_groups * rank // world, n_groups * (rank + 1) // world
    return list(range(first * group, last * group))


def worker(args) -> None:
    from accelerate import Accelerator, DistributedDataParallelKwargs

    from r1pipe.recipe import Recipe
    from r1pipe.stages.grpo import GRPORun, update_policy
    from r1pipe.stages.grpo_sampling import all_sum
    from r1pipe.training import fsdp, zero3
    from r1pipe.training.optim import build_optimizer
    from r1pipe.training.packing import pack_sequences, placeholder_batch
    from r1pipe.training.setup import frozen_reference
    from r1pipe.training.stats import gather_over_ranks, reduce_stats

    acc = Accelerator(cpu=DEVICE == "cpu", kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
    torch.manual_seed(args.seed)
    policy, config = build_policy(args)  # seeded: the same weights on every rank
    prompts, completions, advantages = synthetic_rollouts(args, config.vocab_size)
    mine = rank_share(args.seqs // args.group, args.group, acc.process_index, acc.num_processes)
    n_seqs, n_tokens = len(prompts), sum(len(c) for c in completions)  # the global batch's
    prompts, completions, advantages = [prompts[i] for i in mine], [completions[i] for i in mine], advantages[mine]

    recipe = Recipe()  # the same settings as bench_grpo_step's r1pipe (TIS on: old log-probs get their own pass)
    recipe.grpo.num_generations, recipe.grpo.beta, recipe.grpo.loss_type = args.group, 0.001, args.loss_type
    recipe.grpo.tis_cap = 2.0
    recipe.rollout.max_tokens = args.seq_len
    recipe.train.micro_batch_tokens = args.micro_tokens
    recipe.optim.lr = args.lr
    # as the session decides; zero3x1 / fsdp2x1 force the sharding the session skips at one process
    partitioned = zero3.requested(recipe, acc.num_processes) or args.config == "zero3x1"
    sharded = partitioned or fsdp.requested(recipe, acc.num_processes) or args.config == "fsdp2x1"
    if sharded:  # rank 0's host copy sends each rank its shards, before the optimizer, as the session does
        full = policy.cpu() if acc.is_main_process else None
        policy = zero3.partition_from_rank0(full) if partitioned else fsdp.shard_from_rank0(full, acc.device)
        del full
    optimizer, scheduler = build_optimizer(policy.parameters(), recipe.optim, 1000,
                                           device=acc.device if partitioned else None)
    wrapped = policy if sharded or acc.num_processes == 1 else acc.prepare(policy)
    if partitioned:
        wrapped = zero3.partition(policy, optimizer, recipe.optim.max_grad_norm)
        optimizer = zero3.EngineStep(wrapped, optimizer)
    reference = frozen_reference(policy)
    run = GRPORun(recipe, acc, wrapped, reference, SimpleNamespace(pad_token_id=0), None, None, optimizer, scheduler,
                  rows=[], prompt_ids=[])
    batches = pack_sequences(prompts, completions, args.micro_tokens)
    pads = fsdp.placeholder_count(acc, len(batches), sharded)

    def logprobs_by_sequence() -> dict[int, torch.Tensor]:
        """{global sequence index: completion log-probs} of this rank's sequences, with no grad."""
        out = {}
        with torch.no_grad():
            for b in batches:
                d = b.to(acc.device)
                lp = d.unpack(policy(d.input_ids, position_ids=d.position_ids, targets=d.targets))
                for row, i in enumerate(b.seq_index.tolist()):
                    out[mine[i]] = lp[row, : len(completions[i])].float().cpu()
            if sharded:  # the forwards are collectives: as many as the rank with the most micro-batches
                p = placeholder_batch(0).to(acc.device)
                for _ in range(pads):
                    policy(p.input_ids, position_ids=p.position_ids, targets=p.targets)
        return out

    # the sampler's log-probs = the policy's own before any update: the first step's IS weights are exactly 1
    before = logprobs_by_sequence()
    rollouts = SimpleNamespace(logprobs=[before[i].tolist() for i in mine])
    truncated = torch.zeros(len(prompts), dtype=torch.bool)
    kept = list(range(len(prompts)))

    def step() -> dict:
        metrics = update_policy(run, batches, kept, advantages, rollouts, truncated, n_seqs, n_tokens)
        if run.policy_loads is not None:  # the stage's bias update: loads summed over ranks
            loads = acc.reduce(run.policy_loads, reduction="sum") if acc.num_processes > 1 else run.policy_loads
            policy.update_expert_bias(loads, recipe.train.bias_update_speed)
        return reduce_stats(metrics, gather_over_ranks(acc))

    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, logged, after_one = [], [], None
    for i in range(args.warmup + args.steps):
        sync()
        t = time.perf_counter()
        metrics = step()
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
        if i < 2:
            logged.append({k: float(metrics[k]) for k in ("loss", "grad_norm", "kl") if k in metrics})
        if i == 0:
            after_one = logprobs_by_sequence()  # (not timed)
    if args.profile and acc.is_main_process:  # one more step under the profiler (rank 0): where the time goes
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            sync()
        table = prof.key_averages().table(sort_by="cuda_time_total" if DEVICE == "cuda" else "cpu_time_total", row_limit=30)
        (Path(args.out) / f"profile_{args.config}.txt").write_text(table)
    elif args.profile:
        step()
    peak = torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else 0.0
    # every rank's numbers: the slowest step and the fullest GPU count; log-probs to the driver by file
    worst = torch.tensor([statistics.median(times), peak], dtype=torch.float64, device=acc.device)
    if acc.num_processes > 1:
        torch.distributed.all_reduce(worst, op=torch.distributed.ReduceOp.MAX)
    out = Path(args.out)
    torch.save({"before": before, "after_one": after_one}, out / f"logprobs_{args.config}_rank{acc.process_index}.pt")
    if acc.is_main_process:
        local, whole = fsdp.parameter_counts(policy)
        result = {"config": args.config, "processes": acc.num_processes, "sharded": sharded, "step_s": float(worst[0]),
                  "peak_gib": float(worst[1]), "micro_batches": len(batches), "steps": logged,
                  "rank0_parameters": local, "parameters": whole,
                  "tokens": all_sum(acc, sum(len(p) + len(c) for p, c in zip(prompts, completions)))}
        print("RESULT " + json.dumps(result), flush=True)
    else:
        all_sum(acc, sum(len(p) + len(c) for p, c in zip(prompts, completions)))
    acc.end_training()


def launch(config: str, args) -> dict | None:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *CONFIGS[config], "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(args.port),
           __file__, "--worker", "--config", config, *sys.argv[1:]]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    (Path(args.out) / f"launch_{config}.log").write_text(proc.stdout + proc.stderr)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        print(f"{config}: failed (exit {proc.returncode})\n{(proc.stdout + proc.stderr)[-4000:]}", flush=True)
        return None
    return json.loads(line[7:])


def merged_logprobs(out: Path, config: str, processes: int) -> dict:
    parts = [torch.load(out / f"logprobs_{config}_rank{r}.pt") for r in range(processes)]
    return {key: {i: t for p in parts for i, t in p[key].items()} for key in ("before", "after_one")}


def flat(by_seq: dict) -> torch.Tensor:
    return torch.cat([by_seq[i] for i in sorted(by_seq)])


def report(results: list[dict], args) -> None:
    out = Path(args.out)
    base = next((r for r in results if r["config"] == "1gpu"), None)
    device = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU"
    tokens = results[0]["tokens"] if results else 0
    print(f"\n{device} x{torch.cuda.device_count() if DEVICE == 'cuda' else 1}, torch {torch.__version__}; "
          f"DeepSeek-V2-Lite shape, {args.layers} layers, {args.seqs} seqs x <= {args.seq_len} tokens ({tokens} real "
          f"tokens), micro-batches of {args.micro_tokens} tokens, loss_type {args.loss_type}, bf16, lr {args.lr}, "
          f"median of {args.steps} steps after {args.warmup}")
    print("| config | GPUs | step s | tokens/s | speed-up vs 1 GPU | peak GiB/GPU | params on rank 0 | micro-batches "
          "(rank 0) | loss 1, 2 | grad norm 1, 2 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        speed = f"{base['step_s'] / r['step_s']:.2f}x" if base else ""
        losses = ", ".join(f"{s['loss']:.6f}" for s in r["steps"])
        norms = ", ".join(f"{s['grad_norm']:.4f}" for s in r["steps"])
        print(f"| {r['config']} | {r['processes']} | {r['step_s']:.3f} | {r['tokens'] / r['step_s']:,.0f} | {speed} | "
              f"{r['peak_gib']:.1f} | {r['rank0_parameters'] / 1e6:,.1f}M of {r['parameters'] / 1e6:,.1f}M | "
              f"{r['micro_batches']} | {losses} | {norms} |")
    if base is None:
        return
    one = merged_logprobs(out, "1gpu", 1)
    moved = (flat(one["after_one"]) - flat(one["before"])).abs()
    print(f"\nOne update (lr {args.lr}) moved the 1-GPU run's completion log-probs by mean {moved.mean():.4f}, max "
          f"{moved.max():.3f}. Against the 1-GPU run on the same global batch:")
    print("| config | loss diff (step 1, 2) | grad norm rel diff (1, 2) | log-prob diff before: mean, max | "
          "after one update: mean, max |")
    print("|---|---|---|---|---|")
    for r in results:
        if r is base:
            continue
        other = merged_logprobs(out, r["config"], r["processes"])
        # (the first step's loss is ~0 at ratio 1, whatever the model: its difference is absolute)
        loss = ", ".join(f"{abs(s['loss'] - b['loss']):.1e}" for s, b in zip(r["steps"], base["steps"]))
        norm = ", ".join(f"{abs(s['grad_norm'] - b['grad_norm']) / b['grad_norm']:.1e}" for s, b in zip(r["steps"], base["steps"]))
        diffs = [(flat(other[k]) - flat(one[k])).abs() for k in ("before", "after_one")]
        print(f"| {r['config']} | {loss} | {norm} | {diffs[0].mean():.4f}, {diffs[0].max():.3f} | "
              f"{diffs[1].mean():.4f}, {diffs[1].max():.3f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="1gpu,fsdp2x2,fsdp2x2-keep,ddp2")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    add_step_arguments(ap, steps=5)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--port", type=int, default=29533)
    ap.add_argument("--profile", action="store_true", help="write rank 0's per-kernel profile of one step to OUT/profile_CONFIG.txt")
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.worker:
        worker(args)
        return
    results = []
    for config in args.configs.split(","):
        result = launch(config, args)
        if result is not None:
            results.append(result)
            print(f"{config}: {result}", flush=True)
    (Path(args.out) / "results.json").write_text(json.dumps(results, indent=1))
    report(results, args)


if __name__ == "__main__":
    main()
