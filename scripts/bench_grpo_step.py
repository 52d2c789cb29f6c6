"""One GRPO policy-update step on a GPU: r1pipe against TRL 1.16's GRPOTrainer loss path, in one run.

The policy is DeepSeek-V2-Lite's published shape cut to `--layers` decoder layers (1 dense + the rest MoE),
bf16, random weights (no downloads). The batch is a fixed synthetic rollout: `--seqs` sequences in groups of
`--group`, prompt + completion <= `--seq-len` tokens with varied lengths, Bernoulli rewards -> group
advantages. One step = old-policy log-probs + reference log-probs (no grad) + loss forward/backward over the
micro-batches + grad clipping + AdamW (fused) step + the MoE balancing-bias update. Median of `--steps`
steps after `--warmup`, each implementation in its own process (clean peak memory):

- `r1pipe`: the GRPO stage's own `update_policy` (padding-free packed micro-batches of `--micro-tokens`,
  Triton MoE and fused log-prob kernels);
- `r1pipe-twins`: the same with `kernel_backend("torch")` (the pure-torch twins): what the kernels buy;
- `r1pipe-offload`: `r1pipe` with `grpo.reference_offload` (the reference's layers in pinned host memory,
  streamed to the GPU once a step); `r1pipe-lowmem`: that plus gradient checkpointing of the policy;
- `trl`: transformers' `DeepseekV2ForCausalLM` (same weights; its default grouped_mm experts and sdpa
  attention) driven through TRL's own `_get_per_token_logps_and_entropies` / `compute_loss`, with TRL's fused
  LM head (`add_fused_lm_head`) as GRPOTrainer installs it; padded micro-batches of `--trl-micro-seqs`;
  `trl-gc` with GRPOConfig's default gradient checkpointing on, `trl-liger` with Liger's DeepSeek-V2 kernels
  applied the way GRPOTrainer's `use_liger_kernel` does (layer kernels, no fused linear cross-entropy).

Tokens/s counts real (unpadded) prompt+completion tokens of the batch per step. MFU = model FLOPs of the step
(5 forward-equivalents: old, ref, loss forward, backward x2) / time / 752 TFLOP/s (measured H100 bf16 peak).
The first step's gradient norm and old log-probs are compared across implementations: the same computation.

    python scripts/bench_grpo_step.py [--impls r1pipe,r1pipe-twins,r1pipe-offload,r1pipe-lowmem,trl,trl-gc,trl-liger]
                                      [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_policy_gpu import V2_LITE  # noqa: E402  (the published DeepSeek-V2-Lite shape)

PEAK_TFLOPS = 752.0  # measured bf16 dense GEMM peak of the H100 here (ENVIRONMENT.md)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU runs only the `--tiny` smoke test


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def synthetic_rollouts(args, vocab: int):
    """(prompts, completions, advantages [N], sampler log-probs): seeded, identical in every process."""
    from r1pipe.grpo import group_advantages

    g = torch.Generator().manual_seed(args.seed)
    prompts, completions = [], []
    for _ in range(args.seqs):
        p = int(torch.randint(args.seq_len // 8, args.seq_len // 4 + 1, (1,), generator=g))
        c = int(torch.randint(args.seq_len // 8, args.seq_len - p + 1, (1,), generator=g))
        prompts.append(torch.randint(0, vocab, (p,), generator=g).tolist())
        completions.append(torch.randint(0, vocab, (c,), generator=g).tolist())
    rewards = torch.bernoulli(torch.full((args.seqs,), 0.5), generator=g)
    advantages = group_advantages(rewards, args.group)
    return prompts, completions, advantages


def model_flops_per_step(config, prompts, completions) -> float:
    """Forward FLOPs of the batch x 5 (old, ref, loss fwd, bwd = 2 fwd). Matmuls only: active parameters per
    token (attention projections, dense/shared/routed-top-k MLPs), causal attention scores, and the LM head
    on completion positions (both implementations compute log-probs there only)."""
    c = config
    h, heads = c.hidden_size, c.num_attention_heads
    qk = c.qk_nope_head_dim + c.qk_rope_head_dim
    q_proj = h * heads * qk if c.q_lora_rank is None else h * c.q_lora_rank + c.q_lora_rank * heads * qk
    kv_proj = h * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank * heads * (c.qk_nope_head_dim + c.v_head_dim)
    attn_params = q_proj + kv_proj + heads * c.v_head_dim * h
    dense_mlp = 3 * h * c.intermediate_size
    moe_mlp = 3 * h * c.moe_intermediate_size * (c.num_experts_per_tok + (c.n_shared_experts or 0)) + h * c.n_routed_experts
    n_dense = min(c.first_k_dense_replace, c.num_hidden_layers)
    per_token = 2 * (c.num_hidden_layers * attn_params + n_dense * dense_mlp + (c.num_hidden_layers - n_dense) * moe_mlp)
    total = 0.0
    for p, comp in zip(prompts, completions):
        n = len(p) + len(comp)
        total += per_token * n
        total += c.num_hidden_layers * 2 * heads * (qk + c.v_head_dim) * n * (n + 1) / 2  # QK^T and PV, causal
        total += 2 * h * c.vocab_size * len(comp)
    return 5 * total


def build_policy(args):
    from r1pipe.model import DeepSeekConfig, DeepSeekPolicy

    if args.tiny:
        from r1pipe.model.tiny import tiny_config

        config = tiny_config("deepseek_v2", vocab_size=512)
    else:
        config = DeepSeekConfig.from_dict({**V2_LITE, "num_hidden_layers": args.layers})
    with torch.device(DEVICE):
        policy = DeepSeekPolicy(config).init_weights(seed=args.seed, std=0.02)
    return policy.cast_parameters(torch.bfloat16), config


# ---- r1pipe: the GRPO stage's own update ------------------------------------------------------------------


def r1pipe_step_fn(args, policy, prompts, completions, advantages):
    from accelerate import Accelerator

    from r1pipe.recipe import Recipe
    from r1pipe.stages.grpo import GRPORun, joined_reference_logprobs, update_policy
    from r1pipe.training.offload import offload_layers
    from r1pipe.training.optim import build_optimizer
    from r1pipe.training.packing import pack_sequences
    from r1pipe.training.setup import frozen_copy

    recipe = Recipe()
    recipe.grpo.num_generations, recipe.grpo.beta, recipe.grpo.loss_type = args.group, 0.001, args.loss_type
    # TRL's step with vLLM computes old log-probs for its importance-sampling correction (cap 2); the same
    # here (without TIS and with mu = 1 r1pipe takes pi_old from the training forward: one forward fewer)
    recipe.grpo.tis_cap = 2.0
    recipe.rollout.max_tokens = max(len(c) for c in completions)
    recipe.train.micro_batch_tokens = args.micro_tokens
    acc = Accelerator()
    reference = frozen_copy(policy)
    offloaded = args.impl in ("r1pipe-offload", "r1pipe-lowmem")
    if offloaded:  # the reference's layers in pinned host memory, streamed in once a step
        offload_layers(reference, DEVICE)
        recipe.grpo.reference_offload = True
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    if args.impl == "r1pipe-lowmem":  # and the policy's decoder layers recomputed in backward
        policy.gradient_checkpointing = True
    optimizer, scheduler = build_optimizer(policy.parameters(), recipe.optim, 1000)
    run = GRPORun(recipe, acc, policy, reference, SimpleNamespace(pad_token_id=0), None, None, optimizer, scheduler,
                  rows=[], prompt_ids=[])
    batches = pack_sequences(prompts, completions, args.micro_tokens)
    kept = list(range(len(prompts)))
    rollouts = SimpleNamespace(logprobs=None)  # the sampler's log-probs: set below to the policy's own
    truncated = torch.zeros(len(prompts), dtype=torch.bool)
    n_tokens = sum(len(c) for c in completions)

    def step():
        metrics = update_policy(run, batches, kept, advantages, rollouts, truncated, len(prompts), n_tokens)
        if run.policy_loads is not None:
            policy.update_expert_bias(run.policy_loads, recipe.train.bias_update_speed)
        return metrics["grad_norm"]

    def by_sequence(per_batch):  # [real completion tokens], sequence by sequence
        per_seq = {}
        for b, lp in zip(batches, per_batch):
            for row, i in enumerate(b.seq_index.tolist()):
                per_seq[i] = lp[row, : len(completions[i])]
        return torch.cat([per_seq[i] for i in range(len(completions))]).float()

    def old_logps():  # before any update
        with torch.no_grad():
            return by_sequence([b.unpack(policy(b.input_ids, position_ids=b.position_ids, targets=b.targets))
                                for b in (b.to(DEVICE) for b in batches)])

    # as if the rollout engine's log-probs matched the trainer's: the first step's IS weights are exactly 1
    flat, lengths = old_logps().tolist(), [len(c) for c in completions]
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    rollouts.logprobs = [flat[s:s + n] for s, n in zip(starts, lengths)]
    checks = {}
    if offloaded:  # before any update the reference is the policy: the streamed layers must give its numbers
        with torch.no_grad():
            ref = by_sequence(joined_reference_logprobs(reference, [b.to(DEVICE) for b in batches]))
        checks["ref_vs_policy_max_diff"] = (ref - torch.tensor(flat, device=ref.device)).abs().max().item()
    return step, old_logps, len(batches), checks


# ---- TRL: GRPOTrainer's own loss path on transformers' model ----------------------------------------------


def trl_step_fn(args, policy, config, prompts, completions, advantages, impl):
    import copy

    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM
    from trl import GRPOConfig
    from trl.trainer.utils import add_fused_lm_head

    from r1pipe.grpo.trl_reference import SingleProcessAccelerator, grpo_trainer_skeleton

    hf_config = DeepseekV2Config(**{k: v for k, v in config.to_dict().items() if k != "architectures"})
    with torch.device(DEVICE):
        model = DeepseekV2ForCausalLM(hf_config).to(torch.bfloat16)
    model.load_state_dict(policy.state_dict())
    del policy
    n_micro = -(-len(prompts) // args.trl_micro_seqs)
    with tempfile.TemporaryDirectory() as out:
        targs = GRPOConfig(output_dir=out, report_to="none", bf16=True, loss_type=args.loss_type, beta=0.001,
                           epsilon=0.2, num_generations=args.group, per_device_train_batch_size=args.trl_micro_seqs,
                           gradient_accumulation_steps=n_micro, gradient_checkpointing=impl == "trl-gc",
                           max_completion_length=max(len(c) for c in completions), use_cpu=DEVICE == "cpu")
    if impl == "trl-liger":  # what Trainer.__init__ does for use_liger_kernel, with GRPOTrainer's config
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=model, fused_linear_cross_entropy=False)
    if impl == "trl-gc":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    model.train()
    add_fused_lm_head(model, temperature=1.0, cast_lm_head_to_fp32=targs.cast_lm_head_to_fp32,
                      outputs=("log_probs", "entropy"))
    add_fused_lm_head(ref_model, temperature=1.0, cast_lm_head_to_fp32=targs.cast_lm_head_to_fp32)

    # TRL's loss code without its Trainer (which would also time data loading and logging)
    trainer = grpo_trainer_skeleton(targs, SingleProcessAccelerator(autocast_device=DEVICE), model, ref_model)

    # TRL's batch layout: prompts left-padded, completions right-padded, to the generation batch's maxima
    pw, cw = max(len(p) for p in prompts), max(len(c) for c in completions)
    prompt_ids = torch.zeros(len(prompts), pw, dtype=torch.long)
    prompt_mask = torch.zeros_like(prompt_ids)
    completion_ids = torch.zeros(len(prompts), cw, dtype=torch.long)
    completion_mask = torch.zeros_like(completion_ids)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        prompt_ids[i, pw - len(p):], prompt_mask[i, pw - len(p):] = torch.tensor(p), 1
        completion_ids[i, : len(c)], completion_mask[i, : len(c)] = torch.tensor(c), 1
    prompt_ids, prompt_mask, completion_ids, completion_mask = (t.to(DEVICE) for t in (prompt_ids, prompt_mask, completion_ids, completion_mask))
    ids, attn = torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1)
    # TRL's default optimizer, adamw_torch_fused
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-6, betas=(0.9, 0.95), fused=DEVICE == "cuda")
    adv = advantages.to(DEVICE)
    mb = args.trl_micro_seqs

    def step():
        with torch.no_grad():  # _generate_and_score_completions with vLLM: old (IS correction) and ref log-probs
            old, _, _ = trainer._get_per_token_logps_and_entropies(model, ids, attn, cw, batch_size=mb)
            ref, _, _ = trainer._get_per_token_logps_and_entropies(ref_model, ids, attn, cw, batch_size=mb)
        for s in range(0, len(prompts), mb):
            inputs = {"prompt_ids": prompt_ids[s:s + mb], "prompt_mask": prompt_mask[s:s + mb],
                      "completion_ids": completion_ids[s:s + mb], "completion_mask": completion_mask[s:s + mb],
                      "advantages": adv[s:s + mb], "old_per_token_logps": old[s:s + mb],
                      "ref_per_token_logps": ref[s:s + mb], "num_items_in_batch": completion_mask.sum()}
            trainer.compute_loss(model, inputs).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), targs.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    def old_logps():
        with torch.no_grad():
            old, _, _ = trainer._get_per_token_logps_and_entropies(model, ids, attn, cw, batch_size=mb)
        return old[completion_mask.bool()].float()

    return step, old_logps, n_micro, {}


def memory_at_peak(step) -> str:
    """One more step with the CUDA allocator's history on: the tensors alive at the step's peak, summed by
    the line of our code (or TRL's, transformers', torch's) that allocated them."""
    sync()
    before = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(stacks="python", max_entries=4_000_000)
    step()
    sync()
    trace = torch.cuda.memory._snapshot()["device_traces"][torch.cuda.current_device()]
    torch.cuda.memory._record_memory_history(enabled=None)
    live, total, peak, at_peak, peak_event = {}, before, before, {}, None
    for e in trace:
        if e["action"] == "alloc":
            live[e["addr"]] = e
            total += e["size"]
            if total > peak:
                peak, at_peak, peak_event = total, dict(live), e
        elif e["action"] == "free_completed" and e["addr"] in live:
            total -= live.pop(e["addr"])["size"]

    def sites(frames, n=1):  # the innermost frames outside torch's own Python (or the innermost at all)
        ours = [f for f in frames if "/torch/" not in f["filename"] or "/optim/" in f["filename"]]
        return [f"{'/'.join(f['filename'].split('/')[-2:])}:{f['line']} {f['name']}"
                for f in (ours or frames or [{"filename": "?", "line": 0, "name": "?"}])[:n]]

    by_site = {}
    for e in at_peak.values():
        key = sites(e.get("frames", []))[0]
        n, b = by_site.get(key, (0, 0))
        by_site[key] = (n + 1, b + e["size"])
    lines = [f"peak {peak / 2**30:.2f} GiB = {before / 2**30:.2f} GiB alive before the step (weights, reference, "
             f"optimizer state) + {(peak - before) / 2**30:.2f} GiB allocated in it and alive at its peak:",
             "reached while allocating at: " + " <- ".join(sites((peak_event or {}).get("frames", []), 6)),
             "| GiB | tensors | allocated at |", "|---|---|---|"]
    for key, (n, b) in sorted(by_site.items(), key=lambda kv: -kv[1][1])[:30]:
        lines.append(f"| {b / 2**30:.2f} | {n} | {key} |")
    return "\n".join(lines) + "\n"


# ---- one implementation per process -----------------------------------------------------------------------


def run_one(args) -> dict:
    from r1pipe.kernels import kernel_backend

    torch.manual_seed(args.seed)
    policy, config = build_policy(args)
    prompts, completions, advantages = synthetic_rollouts(args, config.vocab_size)
    if args.impl.startswith("trl"):
        step, old_logps, n_micro, checks = trl_step_fn(args, policy, config, prompts, completions, advantages, args.impl)
        backend = nullcontext
    else:
        step, old_logps, n_micro, checks = r1pipe_step_fn(args, policy, prompts, completions, advantages)
        # a fresh context per use: the timed steps, then --profile / --memory (one cannot be entered twice)
        backend = (lambda: kernel_backend("torch")) if args.impl == "r1pipe-twins" else nullcontext
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, first = [], None
    with backend():
        first_old = old_logps()
        for i in range(args.warmup + args.steps):
            sync()
            t = time.perf_counter()
            grad_norm = step()
            sync()
            if i == 0:
                first = (grad_norm, first_old)
            if i >= args.warmup:
                times.append(time.perf_counter() - t)
    if args.profile:  # one more step under the profiler: where the time goes, by kernel
        from torch.profiler import ProfilerActivity, profile

        with backend(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            sync()
        table = prof.key_averages().table(sort_by="cuda_time_total" if DEVICE == "cuda" else "cpu_time_total", row_limit=25)
        (Path(args.out) / f"profile_{args.impl}.txt").write_text(table)
    if args.memory and DEVICE == "cuda":
        with backend():
            (Path(args.out) / f"memory_{args.impl}.txt").write_text(memory_at_peak(step))
    sec = statistics.median(times)
    tokens = sum(len(p) + len(c) for p, c in zip(prompts, completions))
    flops = model_flops_per_step(config, prompts, completions)
    out = {"impl": args.impl, "step_s": sec, "tokens_per_s": tokens / sec, "mfu": flops / sec / (PEAK_TFLOPS * 1e12),
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else 0.0, "micro_batches": n_micro,
           "first_grad_norm": first[0], "tokens": tokens}
    out.update(checks)  # numbers the implementation checked about itself (r1pipe-offload: its reference)
    torch.save(first[1].cpu(), Path(args.out) / f"old_logps_{args.impl}.pt")
    if args.rollout and args.impl == "r1pipe":
        out.update(rollout_tokens_per_s(args, policy, prompts))
    return out


def rollout_tokens_per_s(args, policy, prompts) -> dict:
    """The torch generation path (MLA latent KV cache, batched) on the same policy: `--rollout` prompts of
    this batch, `--rollout-tokens` new tokens each (random weights never stop early), with the decode step
    replayed as a CUDA graph (the engine's CUDA default) and eagerly with the growing cache, same seed."""
    from r1pipe.rollout.torch_engine import TorchRolloutEngine

    some = [p[:64] for p in prompts[: args.rollout]]
    fast = "graph" if DEVICE == "cuda" else "static"  # (static: the graph's step run eagerly, the CPU smoke)
    out, runs = {"rollout_batch": len(some), "rollout_fast_mode": fast}, {}
    for mode in (fast, "dynamic"):
        engine = TorchRolloutEngine(policy, decode=mode)
        engine.generate(some, max_tokens=8)  # warm-up at the measured batch size (kernels autotune per shape)
        sync()
        t = time.perf_counter()
        runs[mode] = engine.generate(some, max_tokens=args.rollout_tokens, seed=1)
        sync()
        out[f"rollout_tokens_per_s_{mode}"] = runs[mode].num_completion_tokens / (time.perf_counter() - t)
    out["rollout_tokens_per_s"] = out[f"rollout_tokens_per_s_{fast}"]
    # bf16: the graph's attention runs over the whole preallocated cache, so sums round differently and a
    # near-tie can flip a sample; until the first differing token both paths score the same tokens
    g, d = runs[fast], runs["dynamic"]
    out["rollout_first_tokens_equal"] = sum(a[0] == b[0] for a, b in zip(g.completion_ids, d.completion_ids))
    prefix = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
              for a, b in zip(g.completion_ids, d.completion_ids)]
    out["rollout_identical_completions"] = sum(n == len(a) == len(b) for n, a, b in zip(prefix, g.completion_ids, d.completion_ids))
    out["rollout_mean_common_prefix"] = sum(prefix) / len(prefix)
    out["rollout_logprob_max_diff_common_prefix"] = max(
        (abs(x - y) for n, a, b in zip(prefix, g.logprobs, d.logprobs) for x, y in zip(a[:n], b[:n])), default=0.0)
    return out


def add_step_arguments(ap: argparse.ArgumentParser, steps: int) -> None:
    """The policy, synthetic batch and timing options of a GRPO-step benchmark (this one, bench_fsdp_step.py)."""
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--seqs", type=int, default=64)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--micro-tokens", type=int, default=16384)  # the recipe default
    ap.add_argument("--loss-type", default="grpo")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny", action="store_true", help="the tiny V2 policy (a CPU smoke test of this script)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--impls", default="r1pipe,r1pipe-twins,r1pipe-offload,r1pipe-lowmem,trl,trl-gc,trl-liger")
    ap.add_argument("--impl", help=argparse.SUPPRESS)
    add_step_arguments(ap, steps=3)
    ap.add_argument("--trl-micro-seqs", type=int, default=32)  # ~the same tokens per micro-batch, padded
    ap.add_argument("--rollout", type=int, default=64, help="prompts for the GPU rollout measurement (0: skip)")
    ap.add_argument("--rollout-tokens", type=int, default=256)
    ap.add_argument("--profile", action="store_true", help="write a per-kernel profile of one step to OUT/profile_IMPL.txt")
    ap.add_argument("--memory", action="store_true", help="write what is alive at one step's peak memory to OUT/memory_IMPL.txt")
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.impl:
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return
    results = []
    for impl in args.impls.split(","):
        cmd = [sys.executable, __file__, "--impl", impl] + [a for a in sys.argv[1:]]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(f"{impl}: failed (exit {proc.returncode})\n{proc.stderr[-3000:]}", flush=True)
            continue
        results.append(json.loads(line[7:]))
        print(f"{impl}: {results[-1]}", flush=True)
    report(results, args)


def report(results, args):
    ref = next((r for r in results if r["impl"] == "r1pipe"), None)
    base = next((r for r in results if r["impl"] == "trl"), None)
    device = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU"
    print(f"\n{device}, torch {torch.__version__}; DeepSeek-V2-Lite shape, {args.layers} layers, "
          f"{args.seqs} seqs x <= {args.seq_len} tokens ({results[0]['tokens'] if results else 0} real tokens), "
          f"loss_type {args.loss_type}, bf16, median of {args.steps} steps")
    print("| impl | step s | tokens/s | MFU | peak GiB | micro-batches | vs TRL speed | vs TRL memory | 1st grad norm | old logp max diff vs r1pipe |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    old_ref = torch.load(Path(args.out) / "old_logps_r1pipe.pt") if ref else None
    for r in results:
        diff = ""
        if old_ref is not None:
            other = torch.load(Path(args.out) / f"old_logps_{r['impl']}.pt")
            diff = f"{(other - old_ref).abs().max().item():.3f}" if other.shape == old_ref.shape else "shape differs"
        speed = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else ""
        mem = f"{r['peak_gib'] / base['peak_gib']:.2f}x" if base and base["peak_gib"] else ""
        print(f"| {r['impl']} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | {100 * r['mfu']:.1f}% | {r['peak_gib']:.1f} | "
              f"{r['micro_batches']} | {speed} | {mem} | {r['first_grad_norm']:.4f} | {diff} |")
    for r in results:
        if "ref_vs_policy_max_diff" in r:
            print(f"{r['impl']}: offloaded reference's log-probs vs the policy's before the first update (same "
                  f"weights): max diff {r['ref_vs_policy_max_diff']:.3f}")
    if ref and "rollout_tokens_per_s" in ref:
        print(f"\nGPU rollouts (torch engine, MLA latent cache): {ref['rollout_batch']} sequences x {args.rollout_tokens} "
              f"tokens: {ref['rollout_tokens_per_s']:,.0f} tokens/s with the decode step as a CUDA graph "
              f"({ref['rollout_fast_mode']}), "
              f"{ref['rollout_tokens_per_s_dynamic']:,.0f} eager with the growing cache; same seed: "
              f"{ref['rollout_first_tokens_equal']}/{ref['rollout_batch']} equal first tokens, "
              f"{ref['rollout_identical_completions']} identical completions, mean common prefix "
              f"{ref['rollout_mean_common_prefix']:.0f} tokens, log-probs there within "
              f"{ref['rollout_logprob_max_diff_common_prefix']:.3f}")


if __name__ == "__main__":
    main()
