"""The torch rollout engine samples what the policy says: token frequencies against the policy's own softmax
(an independent full forward), reported log-probs against log_softmax, nucleus respected, and a sample that
does not depend on the batch it shares."""
from __future__ import annotations

import pytest
import torch

from r1pipe.model import DeepSeekPolicy
from r1pipe.model.tiny import tiny_config
from r1pipe.rollout.torch_engine import TorchRolloutEngine

VOCAB = 24
PROMPT = [3, 7, 5, 11]


@pytest.fixture(scope="module")
def policy():
    # large weights: a next-token distribution far from uniform, so frequency errors would show
    return DeepSeekPolicy(tiny_config("deepseek_v3", vocab_size=VOCAB)).init_weights(seed=3, std=0.3).eval()


def next_token_probs(policy, prompt, temperature=1.0):
    with torch.no_grad():
        logits = policy(torch.tensor([prompt])).logits[0, -1].double()
    return torch.softmax(logits / temperature, -1), torch.log_softmax(logits, -1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_frequencies_follow_the_policy(policy, temperature):
    n = 6000
    out = TorchRolloutEngine(policy, max_batch=1024).generate([PROMPT], n=n, temperature=temperature, max_tokens=1, seed=5)
    counts = torch.bincount(torch.tensor([c[0] for c in out.completion_ids]), minlength=VOCAB).double()
    probs, logp = next_token_probs(policy, PROMPT, temperature)
    assert probs.max() > 0.15  # the test has teeth: far from uniform (1/24)
    tv = 0.5 * (counts / n - probs).abs().sum().item()
    assert tv < 0.04, f"total variation {tv:.3f} between sampled frequencies and the policy's softmax"
    reported = torch.tensor([lp[0] for lp in out.logprobs], dtype=torch.float64)
    expected = logp[torch.tensor([c[0] for c in out.completion_ids])]
    torch.testing.assert_close(reported, expected, atol=1e-4, rtol=0)  # raw log-probs, as vLLM reports


def test_top_p_draws_only_from_the_nucleus(policy):
    probs, _ = next_token_probs(policy, PROMPT)
    sorted_p, order = probs.sort(descending=True)
    nucleus = set(order[: int((sorted_p.cumsum(0) < 0.6).sum()) + 1].tolist())
    assert len(nucleus) < VOCAB // 2
    out = TorchRolloutEngine(policy).generate([PROMPT], n=500, top_p=0.6, max_tokens=1, seed=1)
    assert {c[0] for c in out.completion_ids} <= nucleus


def test_a_sample_does_not_depend_on_its_batch(policy):
    alone = TorchRolloutEngine(policy).generate([PROMPT], n=3, max_tokens=6, seed=9)
    shared = TorchRolloutEngine(policy).generate([[4, 4], PROMPT], n=3, max_tokens=6, seed=9, seed_prompt_index=[1, 0])
    assert shared.completion_ids[3:] == alone.completion_ids
    assert shared.completion_ids[:3] != alone.completion_ids


@pytest.mark.parametrize("family", ["deepseek_v3", "deepseek_v2"])
def test_static_cache_decode_matches_the_growing_cache(policy, family, monkeypatch):
    # "static" is the step a CUDA graph captures ("graph", the CUDA default), run eagerly: left-padded rows
    # of different prompt lengths, every token and log-prob as the concatenating cache gives them
    from r1pipe.model.mla import StaticLatentCache

    model = policy if family == "deepseek_v3" else DeepSeekPolicy(
        tiny_config("deepseek_v2", vocab_size=VOCAB)).init_weights(seed=4, std=0.3).eval()
    prompts = [PROMPT, [2, 9], [1, 6, 8, 3, 12, 5, 7]]
    built = []
    monkeypatch.setattr(StaticLatentCache, "from_prefill",
                        classmethod(lambda cls, cache, n, f=StaticLatentCache.from_prefill.__func__:
                                    built.append(n) or f(cls, cache, n)))
    kwargs = dict(n=3, max_tokens=12, seed=4, temperature=1.0)
    grown = TorchRolloutEngine(model, decode="dynamic").generate(prompts, **kwargs)
    assert not built
    static = TorchRolloutEngine(model, decode="static").generate(prompts, **kwargs)
    assert built == [7 + 12]  # the longest prompt plus max_tokens columns, built once for the batch
    assert static.completion_ids == grown.completion_ids
    assert len({tuple(c) for c in grown.completion_ids}) > 3  # varied samples: a real comparison
    for a, b in zip(static.logprobs, grown.logprobs):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=5e-5, rtol=0)  # fp32 sum order


def test_graph_decode_needs_cuda(policy):
    with pytest.raises(ValueError, match="CUDA"):
        TorchRolloutEngine(policy, decode="graph").generate([PROMPT], max_tokens=2)
    with pytest.raises(ValueError, match="decode="):
        TorchRolloutEngine(policy, decode="eager")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (the static twin is tested above)")
def test_graph_decode_replays_the_static_step_on_cuda():
    # The same comparison ran on the H100 (2026-11-23) at the 2-layer V2-Lite shape, 16 left-padded prompts,
    # 6/10/16/24 tokens: equal completions. (Before the engine kept the static cache alive for the graph,
    # replays wrote into freed memory: wrong samples, then an out-of-range cache column.) This test itself,
    # with the cache growing in chunks, is skipped in CI and has not yet run on the device.
    model = DeepSeekPolicy(tiny_config("deepseek_v2", vocab_size=VOCAB)).init_weights(seed=4, std=0.3)
    model = model.to("cuda", torch.bfloat16).eval()
    prompts = [PROMPT, [2, 9], [1, 6, 8, 3, 12, 5, 7]]
    kwargs = dict(n=4, max_tokens=20, seed=4)
    # static_chunk=2: the cache grows (and the graph is captured again) twice along the way
    static = TorchRolloutEngine(model, decode="static", static_chunk=2).generate(prompts, **kwargs)
    graph = TorchRolloutEngine(model, decode="graph", static_chunk=2).generate(prompts, **kwargs)
    assert graph.completion_ids == static.completion_ids
    for a, b in zip(graph.logprobs, static.logprobs):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-6, rtol=0)


def test_static_cache_grows_in_chunks_and_still_matches(policy, monkeypatch):
    # a 1-column first chunk past the 7-column prompt grows 8 -> 16 -> 19 (capped at prompt + max_tokens) in
    # 12 tokens: the grown copies must carry the cache, its valid mask and the positions on, traceless
    from r1pipe.model.mla import StaticLatentCache

    prompts = [PROMPT, [2, 9], [1, 6, 8, 3, 12, 5, 7]]
    kwargs = dict(n=2, max_tokens=12, seed=6, temperature=1.0)
    capacities = []
    grown = StaticLatentCache.grown
    monkeypatch.setattr(StaticLatentCache, "grown", lambda self, n: capacities.append(n) or grown(self, n))
    dynamic = TorchRolloutEngine(policy, decode="dynamic").generate(prompts, **kwargs)
    chunked = TorchRolloutEngine(policy, decode="static", static_chunk=1).generate(prompts, **kwargs)
    assert capacities == [16, 19]
    assert chunked.completion_ids == dynamic.completion_ids
    for a, b in zip(chunked.logprobs, dynamic.logprobs):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=5e-5, rtol=0)
