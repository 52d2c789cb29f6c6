"""The GRPO stage (spec section 2). `run` sets up and loops; `grpo_step` is one step, top to bottom:

    rollout -> score -> group advantages -> pack -> logprobs (old, ref) -> mu x (loss -> backward -> step)
    -> MoE bias update -> weight sync -> metrics

The maths lives in `r1pipe.grpo` (pure functions), rewards in `r1pipe.rewards`, engines in `r1pipe.rollout`.
"""
from __future__ import annotations

import contextlib
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from r1pipe.grpo import clipped_policy_loss, group_advantages, truncated_is_weights, zero_variance_groups
from r1pipe.rollout.types import logprob_mismatch
from r1pipe.training.lora import base_reference, is_lora, rollout_weights
from r1pipe.training.packing import pack_sequences, placeholder_batch
from r1pipe.training.state import select_rows, step_seed
from r1pipe.training.setup import frozen_copy


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class GRPORun:
    recipe: object
    accelerator: object
    policy: torch.nn.Module  # possibly wrapped by accelerate (DDP/FSDP)
    reference: torch.nn.Module | None
    tokenizer: object
    engine: object
    rewards: object
    optimizer: object
    scheduler: object
    rows: list[dict]
    prompt_ids: list[list[int]]
    bad_steps: int = 0
    policy_loads: torch.Tensor | None = None

    @property
    def model(self):
        return self.accelerator.unwrap_model(self.policy)


def score(run: GRPORun, rows: list[dict], rollouts) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(total rewards [N], keep [N] bool, metrics): None rewards are 0 or drop their group (recipe)."""
    g = run.recipe.grpo.num_generations
    texts = [decode_completion(run.tokenizer, ids, reason) for ids, reason in zip(rollouts.completion_ids, rollouts.finish_reason)]
    per_sample = [rows[i] for i in rollouts.prompt_index]
    columns = {k: [r.get(k) for r in per_sample] for k in per_sample[0] if k not in ("prompt", "completion")}
    out = run.rewards([r["prompt"] for r in per_sample], texts, group_size=g, **columns)
    totals = torch.tensor([t if t is not None else 0.0 for t in out.totals], dtype=torch.float32)
    keep = torch.tensor(out.keep, dtype=torch.bool)
    metrics = dict(out.metrics)
    metrics["reward/mean"] = totals[keep].mean().item() if keep.any() else float("nan")
    metrics["reward/std"] = totals[keep].std().item() if keep.sum() > 1 else 0.0
    if "accuracy" in out.per_function:
        acc = [v for v in out.per_function["accuracy"] if v is not None]
        metrics["accuracy"] = sum(acc) / max(len(acc), 1)
    return totals, keep, metrics


def decode_completion(tokenizer, ids: list[int], finish_reason: str) -> str:
    if finish_reason == "stop" and ids:
        ids = ids[:-1]  # the stop token is not part of the answer
    return tokenizer.decode(ids, skip_special_tokens=False)


def grpo_step(run: GRPORun, step: int) -> dict:
    rc, g = run.recipe, run.recipe.grpo.num_generations
    acc = run.accelerator
    # 1. rollout: this rank's share of the step's prompts, G samples each
    step_rows = select_rows(len(run.rows), rc.train.prompts_per_step, step, rc.train.seed)
    mine = list(range(acc.process_index, len(step_rows), acc.num_processes))
    chosen = [step_rows[k] for k in mine]
    rows = [run.rows[i] for i in chosen]
    # Seeds follow a prompt's place in the whole step, not the rank, so N processes sample what one does.
    placed = {"seed_prompt_index": mine} if acc.num_processes > 1 else {}
    t0 = time.time()
    rollouts = run.engine.generate([run.prompt_ids[i] for i in chosen], n=g, temperature=rc.rollout.temperature,
                                   top_p=rc.rollout.top_p, max_tokens=rc.rollout.max_tokens,
                                   stop_token_ids=[run.tokenizer.eos_token_id], seed=step_seed(rc.train.seed, step), **placed)
    rollout_s = time.time() - t0

    # 2. score and 3. advantages (group-normalised; zero-variance groups carry no signal)
    totals, keep, metrics = score(run, rows, rollouts)
    advantages = group_advantages(totals, g, scale=rc.grpo.scale_rewards)
    flat_groups = zero_variance_groups(totals, g)
    metrics["zero_variance_groups"] = flat_groups.float().mean().item()
    if rc.grpo.dynamic_sampling:
        keep &= ~flat_groups.repeat_interleave(g)
    truncated = torch.tensor(rollouts.truncated)
    lengths = torch.tensor(rollouts.completion_lengths, dtype=torch.float32)
    metrics.update({"completion_length": lengths.mean().item(), "truncation_rate": truncated.float().mean().item(),
                    "rollout_tokens_per_s": lengths.sum().item() / max(rollout_s, 1e-9), "rollout_s": rollout_s})

    # 4. pack the kept samples into token-budget micro-batches
    kept = [k for k in range(rollouts.num_samples) if keep[k]]
    prompts = [rollouts.prompt_token_ids[rollouts.prompt_index[k]] for k in kept]
    completions = [rollouts.completion_ids[k] for k in kept]
    batches = pack_sequences(prompts, completions, rc.train.micro_batch_tokens)
    n_seqs = _all_sum(acc, len(kept))
    n_tokens = _all_sum(acc, sum(len(c) for c in completions))
    t1 = time.time()
    train_metrics = update_policy(run, batches, kept, advantages, rollouts, truncated, n_seqs, n_tokens)
    metrics.update(train_metrics)
    train_s = time.time() - t1
    metrics["train_tokens_per_s"] = sum(b.num_tokens for b in batches) / max(train_s, 1e-9)

    # 5. aux-loss-free balancing from the loads of this step's forwards (summed over ranks), then sync
    model = run.model
    if run.policy_loads is not None:
        loads = acc.reduce(run.policy_loads, reduction="sum") if acc.num_processes > 1 else run.policy_loads
        model.update_expert_bias(loads, rc.train.bias_update_speed)
        ratio = loads.max(-1).values / loads.mean(-1).clamp(min=1e-9)
        metrics.update({f"expert_load_max_over_mean/layer{i}": r.item() for i, r in enumerate(ratio)})
    if rc.grpo.ref_reset_every and run.reference is not None and (step + 1) % rc.grpo.ref_reset_every == 0:
        run.reference.load_state_dict(model.state_dict())
    t2 = time.time()
    run.engine.sync_weights(rollout_weights(model))  # experts travel packed, per layer; LoRA merged
    metrics["sync_s"] = time.time() - t2
    metrics["lr"] = run.scheduler.get_last_lr()[0]
    metrics["peak_memory_gb"] = _peak_memory_gb()
    return metrics


def old_policy_is_training_forward(grpo_config) -> bool:
    """With one pass and no TIS correction pi_old is the training forward's own policy (ratio 1, no
    clipping): its log-probs, entropy and expert loads can come from that forward, saving a no-grad pass."""
    return grpo_config.num_iterations == 1 and not grpo_config.tis_cap


def update_policy(run: GRPORun, batches, kept, advantages, rollouts, truncated, n_seqs, n_tokens) -> dict:
    """mu passes over the micro-batches; returns loss/KL/clip/entropy/mismatch metrics."""
    rc, acc, policy = run.recipe, run.accelerator, run.policy
    device = acc.device
    batches = [b.to(device) for b in batches]
    mu = rc.grpo.num_iterations
    run.policy_loads = None
    old_from_training = old_policy_is_training_forward(rc.grpo)
    # pi_old = the sampling policy (this step's weights before any update), and pi_ref
    old, ref, entropies = [], [], []
    with torch.no_grad():  # the unwrapped model: a DDP forward here would join collectives other ranks skip
        for b in batches:
            if not old_from_training:
                lp, ent = run.model(b.input_ids, position_ids=b.position_ids, targets=b.targets, return_entropy=True)
                old.append(b.unpack(lp))
                entropies.append(b.unpack(ent))
                _add_loads(run)
            if run.reference is not None and rc.grpo.beta:
                ref.append(b.unpack(run.reference(b.input_ids, position_ids=b.position_ids, targets=b.targets)))
    metrics = {}
    sampler = [_sampler_logprobs(b, kept, rollouts, device) for b in batches]
    masks = [b.completion_mask * (1.0 - _truncated_rows(b, kept, truncated, rc.grpo.mask_truncated, device)) for b in batches]
    sums: dict[str, float] = {}
    if n_seqs == 0:  # every rank dropped every sample (dynamic sampling): nothing to learn from this step
        mu = 0
    for _ in range(mu):
        if not batches and acc.num_processes > 1:  # other ranks have sequences: join their all-reduce with zeros
            acc.backward(_zero_loss(policy, run.tokenizer, device))
        for i, b in enumerate(batches):
            # DDP all-reduces on the last micro-batch only: ranks may hold different numbers of them
            with contextlib.nullcontext() if i == len(batches) - 1 else acc.no_sync(policy):
                out = policy(b.input_ids, position_ids=b.position_ids, targets=b.targets, return_entropy=old_from_training)
                if old_from_training:
                    logp, ent = b.unpack(out[0]), b.unpack(out[1].detach())
                    old.append(logp.detach())
                    entropies.append(ent)
                    _add_loads(run)
                else:
                    logp = b.unpack(out)
                adv = advantages[[kept[j] for j in b.seq_index.tolist()]].to(device)
                is_w = truncated_is_weights(old[i], sampler[i], masks[i], clip_max=rc.grpo.tis_cap) if rc.grpo.tis_cap else None
                loss, m = clipped_policy_loss(
                    logp, old[i] if mu > 1 else None, adv, masks[i], loss_type=rc.grpo.loss_type,
                    epsilon_low=rc.grpo.epsilon_low, epsilon_high=rc.grpo.epsilon_high, beta=rc.grpo.beta,
                    ref_logp=ref[i] if ref else None, max_completion_length=rc.rollout.max_tokens, is_weights=is_w,
                    num_items_in_batch=n_tokens, num_processes=acc.num_processes,
                    # bnpo: the mean of the micro-batches' token means, whatever the token budget cut them into
                    gradient_accumulation_steps=len(batches) if rc.grpo.loss_type == "bnpo" else 1,
                )
                if rc.grpo.loss_type not in ("dapo", "bnpo"):
                    # a per-sequence mean over this micro-batch -> its share of the step's sequences
                    loss = loss * (b.gather_index.shape[0] * acc.num_processes / max(n_seqs, 1))
                balance = run.model.balance_loss()
                if balance is not None:
                    loss = loss + balance / len(batches)
                if not torch.isfinite(loss):
                    sums["nonfinite"] = 1.0
                acc.backward(loss)
                sums["loss"] = sums.get("loss", 0.0) + loss.item()
                for k, v in m.items():
                    sums[k] = sums.get(k, 0.0) + float(v) / len(batches)
        grad_norm = acc.clip_grad_norm_(policy.parameters(), rc.optim.max_grad_norm)
        # one rank's non-finite loss skips the step on every rank, or their weights would part
        nonfinite = _all_sum(acc, int("nonfinite" in sums)) > 0
        if nonfinite or not torch.isfinite(torch.as_tensor(grad_norm)):
            run.optimizer.zero_grad(set_to_none=True)
            run.bad_steps += 1
            metrics["skipped_nonfinite"] = 1.0
            if run.bad_steps >= rc.train.max_bad_steps:
                raise NonFiniteLossError(f"loss or gradient was NaN/inf for {run.bad_steps} steps in a row "
                                         f"(train.max_bad_steps={rc.train.max_bad_steps}); lower optim.lr or check the data")
            break
        run.bad_steps = 0
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        metrics["grad_norm"] = float(grad_norm)
    run.scheduler.step()
    if run.policy_loads is None and acc.num_processes > 1 and run.model.expert_loads().numel():
        run.policy_loads = torch.zeros_like(run.model.expert_loads())  # still joins the load all-reduce
    metrics.update(_old_policy_metrics(batches, sampler, old, entropies))
    metrics.update({k: v / mu for k, v in sums.items() if k != "nonfinite"})
    metrics["skipped_nonfinite"] = metrics.get("skipped_nonfinite", 0.0)
    return metrics


def _old_policy_metrics(batches, sampler, old, entropies) -> dict:
    """Sampler-vs-trainer log-prob mismatch and the completion tokens' mean entropy under pi_old."""
    metrics = {}
    mism = [logprob_mismatch(s, o, b.completion_mask.bool()) for s, o, b in zip(sampler, old, batches)]
    if mism:
        metrics["logprob_mismatch_max"] = max(m["logprob_mismatch_max"] for m in mism)
        metrics["logprob_mismatch_mean"] = sum(m["logprob_mismatch_mean"] for m in mism) / len(mism)
    ent_tokens = sum(float(b.completion_mask.sum()) for b in batches[: len(entropies)])
    if ent_tokens:
        metrics["entropy"] = sum(float((e * b.completion_mask).sum()) for e, b in zip(entropies, batches)) / ent_tokens
    return metrics


def _zero_loss(policy, tokenizer, device) -> torch.Tensor:
    b = placeholder_batch(tokenizer.pad_token_id or 0).to(device)
    return policy(b.input_ids, position_ids=b.position_ids, targets=b.targets).sum() * 0.0


def _add_loads(run):
    loads = run.model.expert_loads()
    if loads.numel():
        run.policy_loads = loads.clone() if run.policy_loads is None else run.policy_loads + loads


def _sampler_logprobs(b, kept, rollouts, device):
    rows = [rollouts.logprobs[kept[j]] for j in b.seq_index.tolist()]
    out = torch.zeros_like(b.completion_mask)
    for r, lp in enumerate(rows):
        out[r, : len(lp)] = torch.tensor(lp, device=device)
    return out


def _truncated_rows(b, kept, truncated, enabled, device):
    if not enabled:
        return torch.zeros(b.completion_mask.shape[0], 1, device=device)
    return truncated[[kept[j] for j in b.seq_index.tolist()]].float().to(device)[:, None]


def _all_sum(acc, value: int) -> int:
    if acc.num_processes == 1:
        return value
    return int(acc.reduce(torch.tensor(value, device=acc.device), reduction="sum").item())


def _peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# ---- setting up and running the stage -------------------------------------------------------------


def make_engine(recipe, policy, tokenizer, out_dir: Path, rank: int = 0):
    """The rollout engine of `recipe.rollout.engine`; vLLM starts from a snapshot of the current policy."""
    if recipe.rollout.engine == "torch":
        from r1pipe.rollout.torch_engine import TorchRolloutEngine

        return TorchRolloutEngine(policy, pad_token_id=tokenizer.pad_token_id or 0)
    from r1pipe.rollout.vllm_engine import VLLMRolloutEngine

    # one snapshot per rank: ranks start their engines at the same time
    snapshot = policy.save_pretrained(out_dir / f"rollout_snapshot-rank{rank}", tokenizer=tokenizer)
    max_len = recipe.rollout.max_model_len or min(policy.config.max_position_embeddings, 4096)
    return VLLMRolloutEngine(snapshot, max_model_len=max_len, gpu_memory_utilization=recipe.rollout.gpu_memory_utilization,
                             seed=recipe.train.seed)


def run(recipe, resume: bool = False, max_steps: int | None = None) -> Path:
    """Train, checkpointing every `train.save_every` steps; returns `output_dir/final`."""
    from r1pipe.data.datasets import format_prompt, load_prompt_dataset
    from r1pipe.rewards import RewardRunner
    from r1pipe.training.session import open_session

    rc = recipe
    session = open_session(rc, resume, max_steps)
    acc, policy = session.accelerator, session.policy
    if rc.train.prompts_per_step < acc.num_processes:
        raise ValueError(f"train.prompts_per_step={rc.train.prompts_per_step} is smaller than the {acc.num_processes} "
                         "processes: prompts are sharded by rank, so every rank needs at least one a step")
    reference = None
    if rc.grpo.beta and is_lora(policy):  # the base with adapters off: no second model in memory
        reference = base_reference(policy, rc.grpo.ref_reset_every)
    elif rc.grpo.beta:
        reference = (type(policy).from_pretrained(session.checkpoint / "reference", device=acc.device)
                     if session.checkpoint is not None else frozen_copy(policy))
        reference.requires_grad_(False).eval()
    rows = load_prompt_dataset(rc.data.train).to_list()[: rc.data.limit]
    prompt_ids = [format_prompt(session.tokenizer, r["prompt"]) for r in rows]
    engine = make_engine(rc, policy, session.tokenizer, session.out_dir, acc.process_index)
    rewards = RewardRunner(rc.rewards, none_policy="drop_group" if rc.grpo.failed_reward == "drop_group" else "zero",
                           base_dir=Path(rc.source).parent if rc.source else None)
    state = GRPORun(rc, acc, session.wrapped, reference, session.tokenizer, engine, rewards, session.optimizer,
                    session.scheduler, rows, prompt_ids)
    try:
        for step in range(session.start_step, session.total_steps):
            session.wrapped.train()
            session.logger.log(step + 1, grpo_step(state, step))
            session.maybe_save(step + 1, reference)
    finally:
        rewards.close()
    return session.finish(reference)
