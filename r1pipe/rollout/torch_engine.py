"""Rollouts with plain torch: batched sampling with the policy's MLA latent KV cache. Same interface as the
vLLM engine (`generate` -> `Rollouts`, `sync_weights`); used where vLLM is absent (the GPU machine here) and
as a second opinion in tests. It samples from the live policy, so there is nothing to sync; given its own
copy (`own_weights`: an FSDP2-sharded trainer, whose forwards are collectives), `sync_weights` loads it.

Each sample draws from its own generator seeded by `sample_seed(seed, prompt, sample)`, so a sample does
not depend on which other samples share its batch, and a resumed step samples what the original did.

Decoding (`decode`): "dynamic" grows the cache by concatenation (any device); "static" decodes against a
preallocated StaticLatentCache (`StaticDecoder`); "graph" (the default on CUDA) captures that static step once per batch as
a CUDA graph and replays it per token, so a step costs one launch instead of a few hundred small kernels
and their Python. "static" is the same computation run eagerly: the CPU twin the tests compare. The static
cache starts a chunk past the prompt and doubles when full (the graph is captured again), so a long
max_tokens costs neither memory nor attention over columns no sequence has reached.
"""
from __future__ import annotations

import time

import torch

from r1pipe.model.mla import LatentCache, StaticLatentCache
from r1pipe.rollout.types import Rollouts, sample_seed


class TorchRolloutEngine:
    def __init__(self, policy, pad_token_id: int = 0, max_batch: int = 256, own_weights: bool = False,
                 decode: str = "auto", static_chunk: int = 256):
        if decode not in ("auto", "dynamic", "static", "graph"):
            raise ValueError(f"decode={decode!r}: expected auto, dynamic, static or graph")
        self.policy = policy
        self.own_weights = own_weights
        self.pad_token_id = pad_token_id
        self.max_batch = max_batch
        self.decode = decode
        self.static_chunk = static_chunk  # first columns of the static cache past the prompt (then it doubles)

    @torch.no_grad()
    def sync_weights(self, named_tensors=None) -> float:
        if not self.own_weights:
            return 0.0  # generation reads the trainer's own parameters
        t0 = time.perf_counter()
        self.policy.load_state_dict(dict(named_tensors))  # the trainer's state_dict keys, full tensors
        return time.perf_counter() - t0

    @torch.no_grad()
    def generate(self, prompt_token_ids, n: int = 1, temperature: float = 1.0, top_p: float = 1.0,
                 max_tokens: int = 64, stop_token_ids=(), seed: int = 0, seed_prompt_index=None) -> Rollouts:
        """`seed_prompt_index[p]`: the index that seeds prompt p's samples (default p). A data-parallel rank
        passes each prompt's place in the whole step, so that the ranks together sample what one process does."""
        where = list(range(len(prompt_token_ids))) if seed_prompt_index is None else list(seed_prompt_index)
        if len(where) != len(prompt_token_ids):
            raise ValueError(f"seed_prompt_index has {len(where)} entries for {len(prompt_token_ids)} prompts")
        jobs = [(p, k) for p in range(len(prompt_token_ids)) for k in range(n)]
        results = {}
        for start in range(0, len(jobs), self.max_batch):
            chunk = jobs[start : start + self.max_batch]
            out = self._generate_batch([prompt_token_ids[p] for p, _ in chunk],
                                       [sample_seed(seed, where[p], k) for p, k in chunk],
                                       temperature, top_p, max_tokens, set(stop_token_ids))
            results.update(zip(chunk, out))
        ordered = [results[j] for j in jobs]
        return Rollouts(
            prompt_token_ids=[list(p) for p in prompt_token_ids],
            prompt_index=[p for p, _ in jobs],
            sample_index=[k for _, k in jobs],
            completion_ids=[o[0] for o in ordered],
            logprobs=[o[1] for o in ordered],
            finish_reason=[o[2] for o in ordered],
            seeds=[sample_seed(seed, where[p], k) for p, k in jobs],
        )

    def _generate_batch(self, prompts, seeds, temperature, top_p, max_tokens, stop_ids):
        policy = self.policy
        was_training = policy.training
        policy.eval()
        device = next(policy.parameters()).device
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding: every row's next token lands in the last column
            ids[i, width - len(p):] = torch.tensor(p, device=device)
            mask[i, width - len(p):] = 1
        generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        cache = LatentCache(policy.config.num_hidden_layers)
        done = [False] * len(prompts)
        out_ids = [[] for _ in prompts]
        out_lps = [[] for _ in prompts]
        logits = policy(ids, attention_mask=mask, cache=cache).logits[:, -1].float()
        decode = self._decoder(policy, cache, width + max_tokens, device)
        for _ in range(max_tokens):
            logp = torch.log_softmax(logits, dim=-1)  # the raw distribution: what vLLM reports too
            probs = torch.softmax(logits / temperature, dim=-1) if temperature > 0 else None
            if probs is not None and top_p < 1.0:
                probs = _top_p(probs, top_p)
            if probs is None:
                step = logits.argmax(-1)
            else:
                # The exponential race: argmax(p / E), E ~ Exp(1) i.i.d., is an exact draw from p. Each row's noise
                # comes from its own generator (batch-independent samples), and the whole batch picks its tokens
                # in one kernel with one host sync per step (a per-row multinomial would sync once per row).
                noise = torch.stack([torch.empty(probs.shape[1], device=device).exponential_(generator=g) for g in generators])
                step = (probs / noise.clamp_min_(1e-30)).argmax(-1)
            picked = logp.gather(1, step[:, None]).squeeze(1)
            for i, (tok, lp) in enumerate(zip(step.tolist(), picked.tolist())):
                if not done[i]:
                    out_ids[i].append(tok)
                    out_lps[i].append(lp)
                    done[i] = tok in stop_ids
            if all(done):
                break
            logits = decode(step[:, None])
        policy.train(was_training)
        reasons = ["stop" if out_ids[i] and out_ids[i][-1] in stop_ids else "length" for i in range(len(prompts))]
        return list(zip(out_ids, out_lps, reasons))

    def _decoder(self, policy, prefill_cache: LatentCache, max_len: int, device):
        """tokens [B,1] -> next-token logits [B,V] (float32), one call per generated token."""
        mode = self.decode if self.decode != "auto" else ("graph" if device.type == "cuda" else "dynamic")
        if mode == "dynamic":
            return lambda step: policy(step, attention_mask=torch.ones_like(step), cache=prefill_cache).logits[:, -1].float()
        if mode == "graph" and device.type != "cuda":
            raise ValueError("decode='graph' needs a CUDA device; use 'static' (the same step, eagerly) elsewhere")
        return StaticDecoder(policy, prefill_cache, max_len, graph=mode == "graph", chunk=self.static_chunk)


class StaticDecoder:
    """Decode steps against a StaticLatentCache, eagerly or as a replayed CUDA graph. The cache starts
    `chunk` columns past the prompt and doubles (copied, and the graph captured again) when full, up to
    max_len: attention runs over the preallocated columns, so a 32k max_tokens must not mean 32k columns
    from the first token on."""

    def __init__(self, policy, prefill_cache: LatentCache, max_len: int, graph: bool, chunk: int):
        self.policy, self.max_len, self.graph = policy, max_len, graph
        self.column = prefill_cache.latent[0].shape[2]  # the host's copy of the cache's write column
        self.cache = StaticLatentCache.from_prefill(prefill_cache, min(max_len, self.column + chunk))
        self._captured = None
        if graph:
            self._capture()

    def _eager(self, step: torch.Tensor) -> torch.Tensor:
        return self.policy(step, cache=self.cache).logits[:, -1].float()

    def _capture(self) -> None:
        device = self.cache.valid.device
        tokens = torch.zeros(self.cache.valid.shape[0], 1, dtype=torch.long, device=device)
        before = self.cache.state()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up off the capture: Triton compiles, the allocator settles
            self._eager(tokens)
        torch.cuda.current_stream(device).wait_stream(side)
        self.cache.restore(before)  # the warm-up wrote the column its first replay rewrites
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self._eager(tokens)
        # The graph holds raw addresses: self.cache keeps its buffers alive as long as the graph is used
        # (a first version let them go after capture, and the replays wrote into the sampling's tensors)
        self._captured = (graph, tokens, logits)

    def __call__(self, step: torch.Tensor) -> torch.Tensor:
        if self.column == self.cache.capacity:
            self.cache = self.cache.grown(min(self.max_len, 2 * self.cache.capacity))
            if self.graph:
                self._capture()
        self.column += 1
        if not self.graph:
            return self._eager(step)
        graph, tokens, logits = self._captured
        tokens.copy_(step)
        graph.replay()
        return logits  # overwritten by the next replay; the caller samples from it first


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    drop = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keep the smallest prefix reaching top_p
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter(-1, order, sorted_probs)
