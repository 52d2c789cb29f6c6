"""Sampling and scoring one GRPO step's groups (spec section 2, steps 1-2): this rank's share of the
step's prompts, G rollouts each, rewards, and with dynamic sampling (DAPO) the refill rounds that
replace zero-variance groups from the next prompts of the data order. Stats are `r1pipe.training.stats`
values, so they merge over refill rounds and ranks. `run` is the stage's `r1pipe.stages.grpo.GRPORun`.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import time
from dataclasses import dataclass

import torch

from r1pipe.grpo import zero_variance_groups
from r1pipe.rollout.types import Rollouts
from r1pipe.training.state import rows_at, step_seed
from r1pipe.training.stats import Max, Mean, Spread, Sum, merge_stats


def score(run, rows: list[dict], rollouts) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(total rewards [N], keep [N] bool, reward stats): None rewards are 0 or drop their group (recipe)."""
    g = run.recipe.grpo.num_generations
    texts = [decode_completion(run.tokenizer, ids, reason) for ids, reason in zip(rollouts.completion_ids, rollouts.finish_reason)]
    per_sample = [rows[i] for i in rollouts.prompt_index]
    columns = {k: [r.get(k) for r in per_sample] for k in per_sample[0] if k not in ("prompt", "completion")}
    out = run.rewards([r["prompt"] for r in per_sample], texts, group_size=g, **columns)
    totals = torch.tensor([t if t is not None else 0.0 for t in out.totals], dtype=torch.float32)
    keep = torch.tensor(out.keep, dtype=torch.bool)
    return totals, keep, reward_stats(out, totals[keep].tolist())


def reward_stats(out, kept_totals: list[float]) -> dict:
    """The reward metrics of one scored batch as stats that merge over refill rounds and ranks: per function
    (by label) mean and population std of its scorable values, None and error counts; the weighted total's
    mean and sample std over the samples kept. Every label gets its keys, scorable values or not."""
    stats = {"reward/mean": Mean.of_values(kept_totals), "reward/std": Spread.of_values(kept_totals, ddof=1),
             "rewards/total/mean": Mean.of_values(kept_totals),
             "rewards/dropped_samples": Sum(out.metrics.get("rewards/dropped_samples", 0))}
    for label, values in out.per_function.items():
        present = [v for v in values if v is not None]
        prefix = f"rewards/{label}/"
        stats.update({prefix + "mean": Mean.of_values(present), prefix + "std": Spread.of_values(present, ddof=0),
                      prefix + "none_count": Sum(len(values) - len(present)),
                      prefix + "error_count": Sum(out.metrics.get(prefix + "error_count", 0))})
        if prefix + "first_error" in out.metrics:  # text: logged as this rank has it
            stats[prefix + "first_error"] = out.metrics[prefix + "first_error"]
    if "accuracy" in out.per_function:
        stats["accuracy"] = stats["rewards/accuracy/mean"]
    return stats


def decode_completion(tokenizer, ids: list[int], finish_reason: str) -> str:
    if finish_reason == "stop" and ids:
        ids = ids[:-1]  # the stop token is not part of the answer
    return tokenizer.decode(ids, skip_special_tokens=False)


@dataclass
class SampledGroups:
    """This rank's groups of one step, over every generation round: G samples per prompt, prompt-major."""

    rows: list[dict]  # one per prompt
    rollouts: Rollouts
    totals: torch.Tensor  # [samples] weighted reward (0 where unscorable)
    keep: torch.Tensor  # [samples] bool: trained on (scored; with dynamic sampling, in a group with signal)
    flat: torch.Tensor  # [groups] bool: zero reward variance
    stats: dict  # reward stats (r1pipe.training.stats)
    rollout_s: float


def sample_round(run, step: int, first: int, count: int) -> SampledGroups | None:
    """Sample and score the `count` prompts at the step's places first.. (places count from the step's first
    prompt on, through its refills, in the data order). This rank takes every num_processes-th; None if none."""
    rc, acc, g = run.recipe, run.accelerator, run.recipe.grpo.num_generations
    order = rows_at(len(run.rows), run.data_position + first, count, rc.train.seed)
    mine = list(range(acc.process_index, count, acc.num_processes))
    if not mine:
        return None
    chosen = [order[k] for k in mine]
    # Seeds follow a prompt's place in the whole step, not the rank, so N processes sample what one does.
    places = [first + k for k in mine]
    placed = {"seed_prompt_index": places} if places != list(range(len(places))) else {}
    t0 = time.time()
    rollouts = run.engine.generate([run.prompt_ids[i] for i in chosen], n=g, temperature=rc.rollout.temperature,
                                   top_p=rc.rollout.top_p, max_tokens=rc.rollout.max_tokens,
                                   stop_token_ids=[run.tokenizer.eos_token_id], seed=step_seed(rc.train.seed, step), **placed)
    rollout_s = time.time() - t0
    rows = [run.rows[i] for i in chosen]
    totals, keep, stats = score(run, rows, rollouts)
    flat = zero_variance_groups(totals, g)
    if rc.grpo.dynamic_sampling:
        keep &= ~flat.repeat_interleave(g)
    return SampledGroups(rows, rollouts, totals, keep, flat, stats, rollout_s)


def sample_step(run, step: int) -> tuple[SampledGroups, int]:
    """The step's prompts_per_step groups, sampled and scored; returns them and the number of refill rounds.

    With dynamic sampling (DAPO) a round drops its zero-variance groups, and up to grpo.max_refill_rounds
    rounds sample the next prompts of the data order, as many as groups with signal are still missing over
    all ranks. The refills' places, hence data and seeds, follow from (seed, data position, step) alone, so
    any number of ranks samples the same; run.data_position moves past every prompt sampled."""
    rc, acc, g = run.recipe, run.accelerator, run.recipe.grpo.num_generations
    target = rc.train.prompts_per_step
    parts, placed, count, rounds = [], 0, target, 0
    while True:
        part = sample_round(run, step, placed, count)
        parts += [part] if part is not None else []
        placed += count
        if not rc.grpo.dynamic_sampling or rounds >= rc.grpo.max_refill_rounds:
            break
        missing = target - all_sum(acc, sum(groups_with_signal(p.keep, g) for p in parts))
        if missing <= 0:
            break
        rounds, count = rounds + 1, missing
    run.data_position += placed
    return concat_groups(parts), rounds


def groups_with_signal(keep: torch.Tensor, group_size: int) -> int:
    """Groups with a sample to train on (groups are kept or dropped whole)."""
    return int(keep.reshape(-1, group_size).any(1).sum())


def concat_groups(parts: list[SampledGroups]) -> SampledGroups:
    if len(parts) == 1:
        return parts[0]
    return SampledGroups(rows=[r for p in parts for r in p.rows], rollouts=concat_rollouts([p.rollouts for p in parts]),
                         totals=torch.cat([p.totals for p in parts]), keep=torch.cat([p.keep for p in parts]),
                         flat=torch.cat([p.flat for p in parts]), stats=functools.reduce(merge_stats, [p.stats for p in parts]),
                         rollout_s=sum(p.rollout_s for p in parts))


def concat_rollouts(parts: list[Rollouts]) -> Rollouts:
    """One Rollouts of several, in order: prompt indices move past the earlier parts' prompts."""
    joined = {f.name: [x for p in parts for x in getattr(p, f.name)] for f in dataclasses.fields(Rollouts)}
    offsets = itertools.accumulate((len(p.prompt_token_ids) for p in parts), initial=0)
    joined["prompt_index"] = [i + offset for p, offset in zip(parts, offsets) for i in p.prompt_index]
    return Rollouts(**joined)


def sample_stats(groups: SampledGroups, group_size: int) -> dict:
    """Length, truncation, group-signal and rollout-throughput stats of this rank's samples."""
    lengths = groups.rollouts.completion_lengths
    return {"completion_length": Mean.of_values(lengths),
            "truncation_rate": Mean.of_values(float(t) for t in groups.rollouts.truncated),
            "zero_variance_groups": Mean.of_values(groups.flat.float().tolist()),
            "groups_trained": Sum(groups_with_signal(groups.keep, group_size)),
            # ranks sample at the same time: their rates add up; the step waits for the slowest
            "rollout_tokens_per_s": Sum(sum(lengths) / max(groups.rollout_s, 1e-9)), "rollout_s": Max(groups.rollout_s)}


def all_sum(acc, value: int) -> int:
    if acc.num_processes == 1:
        return value
    return int(acc.reduce(torch.tensor(value, device=acc.device), reduction="sum").item())
