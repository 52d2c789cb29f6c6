"""Rollout generation for GRPO: the colocated vLLM engine with proven weight sync (`vllm_engine`,
`weight_sync`) and the `Rollouts` record the trainer consumes (`types`)."""

from r1pipe.rollout.types import Rollouts, logprob_mismatch, sample_seed

__all__ = ["Rollouts", "logprob_mismatch", "sample_seed"]
