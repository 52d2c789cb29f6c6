"""What a rollout engine hands the GRPO trainer: `Rollouts` (G completions per prompt, with the
sampler's per-token logprobs) plus the per-sample seed rule and the trainer-vs-sampler mismatch metric.
Filled by `vllm_engine.VLLMRolloutEngine` (and the torch fallback); read by `r1pipe.grpo`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """Sampling seed of completion `sample_index` of prompt `prompt_index` under a step seed.

    A hash rather than `seed + k`, so that neighbouring steps (seed, seed+1) never reuse a
    (prompt, sample) stream. 63 bits: what torch.Generator.manual_seed takes without wrapping.
    """
    h = _splitmix64(seed & _MASK64)
    h = _splitmix64(h ^ (prompt_index & _MASK64))
    h = _splitmix64(h ^ (sample_index & _MASK64))
    return h >> 1


def sample_requests(
    num_prompts: int, n: int, seed: int, seed_prompt_index: list[int] | None = None
) -> tuple[list[int], list[int], list[int]]:
    """(prompt_index, sample_index, seeds) of the n samples of each prompt, prompt-major: one seeded
    request each. `seed_prompt_index[i]` (default i) seeds prompt i: a data-parallel rank passes each
    prompt's place in the whole step, so the ranks together sample what one process would."""
    where = list(range(num_prompts)) if seed_prompt_index is None else list(seed_prompt_index)
    prompt_index = [i for i in range(num_prompts) for _ in range(n)]
    sample_index = [j for _ in range(num_prompts) for j in range(n)]
    seeds = [sample_seed(seed, where[i], j) for i, j in zip(prompt_index, sample_index)]
    return prompt_index, sample_index, seeds


@dataclass
class Rollouts:
    """G completions for each of P prompts, flattened prompt-major: sample k belongs to prompt
    `prompt_index[k]` (= k // G) and is its `sample_index[k]`-th completion (= k % G).

    completion_ids[k] includes the stop token when the sample stopped on one (finish_reason "stop");
    logprobs[k][t] is the sampler's log-probability of completion_ids[k][t] (raw model distribution
    unless the engine was built with another logprobs mode); seeds[k] reproduces sample k.
    """

    prompt_token_ids: list[list[int]]
    prompt_index: list[int]
    sample_index: list[int]
    completion_ids: list[list[int]]
    logprobs: list[list[float]]
    finish_reason: list[str]  # "stop" | "length"
    seeds: list[int]

    def __post_init__(self) -> None:
        n = len(self.prompt_index)
        for field in ("sample_index", "completion_ids", "logprobs", "finish_reason", "seeds"):
            if len(getattr(self, field)) != n:
                raise ValueError(f"Rollouts.{field} has {len(getattr(self, field))} entries, expected {n}")
        for k, (ids, lps) in enumerate(zip(self.completion_ids, self.logprobs)):
            if len(ids) != len(lps):
                raise ValueError(f"Rollouts sample {k}: {len(ids)} completion ids but {len(lps)} logprobs")

    @property
    def num_samples(self) -> int:
        return len(self.prompt_index)

    @property
    def completion_lengths(self) -> list[int]:
        return [len(ids) for ids in self.completion_ids]

    @property
    def num_completion_tokens(self) -> int:
        return sum(self.completion_lengths)

    @property
    def truncated(self) -> list[bool]:
        return [r == "length" for r in self.finish_reason]

    def padded(self, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(completion ids [N, T] long, sampler logprobs [N, T] float32, mask [N, T] bool), right-padded."""
        t_max = max(self.completion_lengths, default=0)
        ids = torch.full((self.num_samples, t_max), pad_token_id, dtype=torch.long)
        lps = torch.zeros((self.num_samples, t_max), dtype=torch.float32)
        mask = torch.zeros((self.num_samples, t_max), dtype=torch.bool)
        for k, (c, lp) in enumerate(zip(self.completion_ids, self.logprobs)):
            ids[k, : len(c)] = torch.tensor(c, dtype=torch.long)
            lps[k, : len(c)] = torch.tensor(lp, dtype=torch.float32)
            mask[k, : len(c)] = True
        return ids, lps, mask


def logprob_mismatch(
    sampler_logprobs: torch.Tensor, trainer_logprobs: torch.Tensor, mask: torch.Tensor
) -> dict[str, float]:
    """Per-step health metric of the weight sync: |trainer − sampler| logprob over completion tokens."""
    diff = (trainer_logprobs.float() - sampler_logprobs.float()).abs()[mask]
    if diff.numel() == 0:
        return {"logprob_mismatch_max": 0.0, "logprob_mismatch_mean": 0.0}
    return {"logprob_mismatch_max": diff.max().item(), "logprob_mismatch_mean": diff.mean().item()}
