"""The GRPO stage (spec section 2). `run` sets up and loops; `grpo_step` is one step, top to bottom:

    rollout -> score (-> refill dropped groups) -> group advantages -> pack -> logprobs (old, ref)
    -> mu x (loss -> backward -> step) -> MoE bias update -> weight sync -> metrics (reduced over ranks)

The maths lives in `r1pipe.grpo` (pure functions), rollout+scoring+refill in `r1pipe.stages.grpo_sampling`,
rewards in `r1pipe.rewards`, engines in `r1pipe.rollout`.
"""
from __future__ import annotations

import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from r1pipe.grpo import clipped_policy_loss, group_advantages, truncated_is_weights
from r1pipe.rollout.types import logprob_mismatch
from r1pipe.training.lora import base_reference, is_lora, rollout_weights
from r1pipe.stages.grpo_sampling import all_sum, sample_stats, sample_step
from r1pipe.training.fsdp import (accumulating, backward, clip_grad_norm, copy_weights, is_sharded, placeholder_count,
                                  unsharded_copy)
from r1pipe.training.offload import is_offloaded, offload_layers
from r1pipe.training.packing import pack_sequences, placeholder_batch, placeholder_loss
from r1pipe.training.setup import frozen_reference
from r1pipe.training.stats import Max, Mean, Min, Sum, gather_over_ranks, merge_stats, reduce_stats


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
    bad_steps: int = 0  # non-finite steps in a row (train.max_bad_steps)
    data_position: int = 0  # prompts of the data order (r1pipe.training.state.rows_at) consumed so far
    policy_loads: torch.Tensor | None = None

    @property
    def model(self):
        return self.accelerator.unwrap_model(self.policy)

    def stage_state(self) -> dict:
        """What a checkpoint keeps besides weights, optimizer and step, so that --resume goes on exactly: the
        run of bad steps, and the data position (refills make it more than step x prompts_per_step)."""
        return {"bad_steps": self.bad_steps, "data_position": self.data_position}


def grpo_step(run: GRPORun, step: int) -> dict:
    rc, g = run.recipe, run.recipe.grpo.num_generations
    acc = run.accelerator
    # 1. rollout and 2. score: this rank's share of the step's prompts, G samples each; with dynamic sampling
    # zero-variance groups (no signal) are dropped and refilled from the next prompts
    groups, refill_rounds = sample_step(run, step)
    rollouts, keep = groups.rollouts, groups.keep
    # 3. advantages (group-normalised)
    advantages = group_advantages(groups.totals, g, scale=rc.grpo.scale_rewards)
    truncated = torch.tensor(rollouts.truncated)
    metrics = {**groups.stats, **sample_stats(groups, g), "refill_rounds": refill_rounds}

    # 4. pack the kept samples into token-budget micro-batches
    kept = [k for k in range(rollouts.num_samples) if keep[k]]
    prompts = [rollouts.prompt_token_ids[rollouts.prompt_index[k]] for k in kept]
    completions = [rollouts.completion_ids[k] for k in kept]
    batches = pack_sequences(prompts, completions, rc.train.micro_batch_tokens)
    n_seqs = all_sum(acc, len(kept))
    n_tokens = all_sum(acc, sum(len(c) for c in completions))
    t1 = time.time()
    metrics.update(update_policy(run, batches, kept, advantages, rollouts, truncated, n_seqs, n_tokens))
    train_s = time.time() - t1
    metrics["train_tokens_per_s"] = Sum(sum(b.num_tokens for b in batches) / max(train_s, 1e-9))

    # 5. aux-loss-free balancing from the loads of this step's forwards (summed over ranks), then sync
    model = run.model
    if run.policy_loads is not None:
        loads = acc.reduce(run.policy_loads, reduction="sum") if acc.num_processes > 1 else run.policy_loads
        model.update_expert_bias(loads, rc.train.bias_update_speed)
        ratio = loads.max(-1).values / loads.mean(-1).clamp(min=1e-9)
        metrics.update({f"expert_load_max_over_mean/layer{i}": r.item() for i, r in enumerate(ratio)})
    if rc.grpo.ref_reset_every and run.reference is not None and (step + 1) % rc.grpo.ref_reset_every == 0:
        copy_weights(run.reference, model)
    t2 = time.time()
    run.engine.sync_weights(rollout_weights(model))  # experts travel packed, per layer; LoRA merged
    metrics["sync_s"] = Max(time.time() - t2)
    metrics["lr"] = run.scheduler.get_last_lr()[0]
    metrics["peak_memory_gb"] = Max(_peak_memory_gb())
    # 6. every rank's stats into the step's values: one all-gather, none on one process
    return reduce_stats(metrics, gather_over_ranks(acc))


def old_policy_is_training_forward(grpo_config) -> bool:
    """With one pass and no TIS correction pi_old is the training forward's own policy (ratio 1, no
    clipping): its log-probs, entropy and expert loads can come from that forward, saving a no-grad pass."""
    return grpo_config.num_iterations == 1 and not grpo_config.tis_cap


def joined_reference_logprobs(reference, batches) -> list[torch.Tensor]:
    """pi_ref's log-probs, unpacked per micro-batch, from one forward over all the micro-batches' rows
    joined into one packed row: an offloaded reference (grpo.reference_offload) then streams its layers
    to the GPU once a step rather than once per micro-batch. Its no-grad activations are short-lived."""
    joined = {name: torch.cat([getattr(b, name) for b in batches], dim=1)
              for name in ("input_ids", "position_ids", "targets")}
    lp = reference(joined["input_ids"], position_ids=joined["position_ids"], targets=joined["targets"])
    return [b.unpack(part) for b, part in zip(batches, lp.split([b.num_tokens for b in batches], dim=1))]


def update_policy(run: GRPORun, batches, kept, advantages, rollouts, truncated, n_seqs, n_tokens) -> dict:
    """mu passes over the micro-batches; returns loss/KL/clip/entropy/mismatch metrics (stats and values)."""
    rc, acc, policy = run.recipe, run.accelerator, run.policy
    device = acc.device
    # each micro-batch's rows as indices into the step's sequences, read before the batches move to the
    # device: the loop below then waits for the GPU only once per pass (the skip decision), not per micro-batch
    sequences = [[kept[j] for j in b.seq_index.tolist()] for b in batches]
    batches = [b.to(device) for b in batches]
    mu = rc.grpo.num_iterations
    run.policy_loads = None
    old_from_training = old_policy_is_training_forward(rc.grpo)
    use_reference = run.reference is not None and bool(rc.grpo.beta)
    # FSDP2: every forward is a collective, so each rank runs as many as the rank with the most micro-batches
    pads = placeholder_count(acc, len(batches), is_sharded(policy))  # (a collective: before any forward)
    # pi_old = the sampling policy (this step's weights before any update), and pi_ref
    old, ref, entropies = [], [], []
    with torch.no_grad():  # the unwrapped model: a DDP forward here would join collectives other ranks skip
        for b in batches:
            if not old_from_training:
                lp, ent = run.model(b.input_ids, position_ids=b.position_ids, targets=b.targets, return_entropy=True)
                old.append(b.unpack(lp))
                entropies.append(b.unpack(ent))
                _add_loads(run)
            if use_reference and not is_offloaded(run.reference):  # (FSDP2: collectives stay interleaved)
                ref.append(b.unpack(run.reference(b.input_ids, position_ids=b.position_ids, targets=b.targets)))
        if use_reference and is_offloaded(run.reference):
            ref = joined_reference_logprobs(run.reference, batches)
        for _ in range(pads if is_sharded(policy) else 0):
            _placeholder_forwards(run, device, policy=not old_from_training, reference=use_reference)
    metrics = {}
    sampler = [_sampler_logprobs(b, rows, rollouts, device) for b, rows in zip(batches, sequences)]
    masks = [b.completion_mask * (1.0 - _truncated_rows(b, rows, truncated, rc.grpo.mask_truncated, device))
             for b, rows in zip(batches, sequences)]
    if n_seqs == 0:  # every rank dropped every sample (dynamic sampling): nothing to learn from this step
        mu = 0
    stats = loss_stat_template(rc) if mu else {}
    loss_sum = policy_loss_sum = 0.0
    local_nonfinite = False
    for _ in range(mu):
        nonfinite_loss = torch.zeros((), dtype=torch.bool, device=device)
        loss_metrics = []  # turned into floats after the pass, not per micro-batch
        for i, b in enumerate(batches):
            # DDP all-reduces on the last micro-batch only (ranks may hold different numbers of them); ZeRO-3's
            # step boundary is the last backward of all, a placeholder's where this rank runs some
            with accumulating(acc, policy, last=i == len(batches) - 1 and not pads):
                out = policy(b.input_ids, position_ids=b.position_ids, targets=b.targets, return_entropy=old_from_training)
                if old_from_training:
                    logp, ent = b.unpack(out[0]), b.unpack(out[1].detach())
                    old.append(logp.detach())
                    entropies.append(ent)
                    _add_loads(run)
                else:
                    logp = b.unpack(out)
                adv = advantages[sequences[i]].to(device)
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
                policy_loss_sum += loss.detach()  # summed on the device: no sync per micro-batch
                loss_metrics.append((m, masks[i]))
                balance = run.model.balance_loss()
                if balance is not None:
                    loss = loss + balance / len(batches)
                nonfinite_loss |= ~torch.isfinite(loss.detach())
                backward(acc, policy, loss)
                loss_sum += loss.detach()
        local_nonfinite |= bool(nonfinite_loss)
        for m, mask in loss_metrics:
            stats = merge_stats(stats, loss_metric_stats(m, mask, rc.grpo.loss_type == "gspo"))
        for j in range(pads):  # other ranks have more micro-batches: join their all-reduce (DDP: only a rank
            with accumulating(acc, policy, last=j == pads - 1):  # without any) or their sharded collectives
                backward(acc, policy, placeholder_loss(policy, run.tokenizer.pad_token_id or 0, device))
        grad_norm = clip_grad_norm(acc, policy.parameters(), rc.optim.max_grad_norm)
        # one rank's non-finite loss skips the step on every rank, or their weights would part
        nonfinite = all_sum(acc, int(local_nonfinite)) > 0
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
    if mu:
        # the loss each rank backpropagated, summed over its micro-batches, is num_processes x its share of
        # the step's loss: the mean over ranks and passes is the step's loss (policy_loss: without balancing)
        stats.update({"loss": Mean(float(loss_sum), mu), "policy_loss": Mean(float(policy_loss_sum), mu)})
    stats.update(_old_policy_stats(batches, sampler, old, entropies))
    metrics["skipped_nonfinite"] = metrics.get("skipped_nonfinite", 0.0)
    return {**stats, **metrics}


def loss_metric_stats(m: dict, mask: torch.Tensor, sequence_level: bool) -> dict:
    """One micro-batch's `clipped_policy_loss` metrics as stats: *_min/*_max as min/max, the others as means
    weighted by what they averaged: completion tokens, or sequences for the clip and ratio means of a
    sequence-level ratio (gspo). Its policy_loss is left out: the step logs the loss it backpropagated."""
    tokens, seqs = float(mask.sum()), float(mask.shape[0])
    out = {}
    for key, value in m.items():
        if key == "policy_loss":
            continue
        value = float(value)
        if key.endswith(("_max", "/max")):
            out[key] = Max(value)
        elif key.endswith(("_min", "/min")):
            out[key] = Min(value)
        else:
            out[key] = Mean.of(value, seqs if sequence_level and key.startswith(("clip_ratio/", "ratio/")) else tokens)
    return out


def loss_stat_template(rc) -> dict:
    """Every metric `clipped_policy_loss` reports under this recipe, empty (from a call on zero sequences):
    a rank without sequences still packs the keys the other ranks do."""
    empty = torch.zeros(0, 1)
    _, m = clipped_policy_loss(empty, None, torch.zeros(0), empty, loss_type=rc.grpo.loss_type, beta=rc.grpo.beta,
                               ref_logp=empty, max_completion_length=rc.rollout.max_tokens)
    return loss_metric_stats(m, empty, rc.grpo.loss_type == "gspo")


def _old_policy_stats(batches, sampler, old, entropies) -> dict:
    """Sampler-vs-trainer log-prob mismatch and the completion tokens' mean entropy under pi_old, as stats
    (the keys also where this rank has no micro-batch)."""
    stats = {"logprob_mismatch_max": Max(), "logprob_mismatch_mean": Mean(), "entropy": Mean()}
    for s, o, b in zip(sampler, old, batches):
        mism, tokens = logprob_mismatch(s, o, b.completion_mask.bool()), float(b.completion_mask.sum())
        stats = merge_stats(stats, {"logprob_mismatch_max": Max(mism["logprob_mismatch_max"]),
                                    "logprob_mismatch_mean": Mean.of(mism["logprob_mismatch_mean"], tokens)})
    for e, b in zip(entropies, batches):
        stats["entropy"] += Mean(float((e * b.completion_mask).sum()), float(b.completion_mask.sum()))
    return stats


def _placeholder_forwards(run, device, policy: bool, reference: bool) -> None:
    """The no-grad forwards of one placeholder micro-batch (outputs and expert loads dropped)."""
    b = placeholder_batch(run.tokenizer.pad_token_id or 0).to(device)
    for model in ([run.model] if policy else []) + ([run.reference] if reference else []):
        model(b.input_ids, position_ids=b.position_ids, targets=b.targets)


def _add_loads(run):
    loads = run.model.expert_loads()
    if loads.numel():
        run.policy_loads = loads.clone() if run.policy_loads is None else run.policy_loads + loads


def _sampler_logprobs(b, rows, rollouts, device):
    out = torch.zeros(b.completion_mask.shape, dtype=b.completion_mask.dtype)  # filled on the host, copied once
    for r, j in enumerate(rows):
        lp = rollouts.logprobs[j]
        out[r, : len(lp)] = torch.tensor(lp, dtype=out.dtype)
    return out.to(device)


def _truncated_rows(b, rows, truncated, enabled, device):
    if not enabled:
        return torch.zeros(b.completion_mask.shape[0], 1, device=device)
    return truncated[rows].float().to(device)[:, None]


def _peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# ---- setting up and running the stage -------------------------------------------------------------


def make_engine(recipe, policy, tokenizer, out_dir: Path, rank: int = 0):
    """The rollout engine of `recipe.rollout.engine`; vLLM starts from a snapshot of the current policy."""
    sharded = is_sharded(policy)
    if sharded:  # the engine generates alone, with whole weights (a gather on every rank), synced after each step;
        # the torch engine keeps them on the GPU, vLLM's snapshot is written from the host
        policy = unsharded_copy(policy, None if recipe.rollout.engine == "torch" else "cpu")
    if recipe.rollout.engine == "torch":
        from r1pipe.rollout.torch_engine import TorchRolloutEngine

        return TorchRolloutEngine(policy, pad_token_id=tokenizer.pad_token_id or 0, own_weights=sharded)
    # one snapshot per rank: ranks start their engines at the same time
    snapshot = policy.save_pretrained(out_dir / f"rollout_snapshot-rank{rank}", tokenizer=tokenizer)
    max_len = recipe.rollout.max_model_len or min(policy.config.max_position_embeddings, 4096)
    settings = dict(max_model_len=max_len, gpu_memory_utilization=recipe.rollout.gpu_memory_utilization,
                    seed=recipe.train.seed)
    if recipe.rollout.engine == "vllm":
        from r1pipe.rollout.vllm_engine import VLLMRolloutEngine

        return VLLMRolloutEngine(snapshot, **settings)
    from r1pipe.rollout.vllm_server import VLLMServerEngine

    url = recipe.rollout.server_url
    engine = VLLMServerEngine(snapshot, server_url=url, **settings)
    if url is not None:  # a running server holds whatever it was started on: give it the policy's weights
        engine.sync_weights(rollout_weights(policy))
    return engine


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
    if rc.rollout.server_url is not None and acc.num_processes > 1:
        raise ValueError("rollout.server_url with several processes: every rank would push its weights into one "
                         "server; leave server_url unset (each rank starts its own) or train with one process")
    reference = None
    if rc.grpo.beta and is_lora(policy):  # the base with adapters off: no second model in memory
        reference = base_reference(policy, rc.grpo.ref_reset_every)
    elif rc.grpo.beta:
        reference = frozen_reference(policy, session.checkpoint / "reference" if session.checkpoint is not None else None,
                                     acc.device)
    if rc.grpo.reference_offload:
        if is_lora(policy):
            raise ValueError("grpo.reference_offload with LoRA (model.lora_rank > 0): the reference is the base "
                             "model itself, there is no second copy to offload")
        if is_sharded(policy):
            raise ValueError("grpo.reference_offload with FSDP (FSDP2 or ZeRO-3): the reference is already sharded "
                             "over the ranks; turn one of them off")
        offload_layers(reference, acc.device)
    rows = load_prompt_dataset(rc.data.train).to_list()[: rc.data.limit]
    prompt_ids = [format_prompt(session.tokenizer, r["prompt"]) for r in rows]
    engine = make_engine(rc, policy, session.tokenizer, session.out_dir, acc.process_index)
    rewards = RewardRunner(rc.rewards, none_policy="drop_group" if rc.grpo.failed_reward == "drop_group" else "zero",
                           base_dir=Path(rc.source).parent if rc.source else None)
    # a checkpoint from before stage_state was saved: no bad steps, and no refills moved the data position
    resumed = {"bad_steps": 0, "data_position": session.start_step * rc.train.prompts_per_step, **session.resumed_state}
    state = GRPORun(rc, acc, session.wrapped, reference, session.tokenizer, engine, rewards, session.optimizer,
                    session.scheduler, rows, prompt_ids, bad_steps=resumed["bad_steps"], data_position=resumed["data_position"])
    try:
        for step in range(session.start_step, session.total_steps):
            session.wrapped.train()
            session.logger.log(step + 1, grpo_step(state, step))
            session.maybe_save(step + 1, reference, stage_state=state.stage_state())
    finally:
        rewards.close()
        getattr(engine, "close", lambda: None)()  # stops a `vllm serve` process the engine started
    return session.finish(reference, stage_state=state.stage_state())
