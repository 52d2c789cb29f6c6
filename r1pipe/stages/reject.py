"""The rejection-sampling stage (R1 stage 3, first half): sample `reject.n` completions per prompt from the
recipe's model, keep the correct, clean ones (`r1pipe.reject_sample`), and write `output_dir/samples.jsonl`
for the SFT stage that follows (`data.train: stage:<this stage>`)."""
from __future__ import annotations

from pathlib import Path


def run(recipe, resume: bool = False, max_steps: int | None = None) -> Path:
    from r1pipe.reject_sample import CotFilters, reject_sample

    if not recipe.model.path:
        raise ValueError(f"{recipe.source}: a reject stage samples from a checkpoint; set model.path")
    out = Path(recipe.output_dir) / "samples.jsonl"
    max_len = recipe.rollout.max_model_len or recipe.rollout.max_tokens + 4096  # room for prompt + completion
    reject_sample(
        recipe.model.path, recipe.reject.prompts, out, n=recipe.reject.n, rewards=recipe.rewards,
        keep=recipe.reject.keep, max_per_prompt=recipe.reject.max_per_prompt, temperature=recipe.rollout.temperature,
        top_p=recipe.rollout.top_p, max_tokens=recipe.rollout.max_tokens, seed=recipe.train.seed,
        limit=recipe.reject.limit, engine_kwargs={"max_model_len": max_len},
        filters=CotFilters(drop_truncated=not recipe.reject.keep_truncated),
    )
    return out  # resume is built in: prompts already in samples.jsonl are skipped
