"""Fixtures for the eval / reject-sample tests: the shipped tiny tokenizer and a scripted engine.

`ScriptedEngine` has the rollout engines' `generate(...) -> Rollouts` API but returns completions
written by the test (a function of the prompt text and the sample index), so the metrics and the
keep/filter rules can be checked against hand-computed values. The real-vLLM test is in test_vllm_eval.py.
"""

from __future__ import annotations

import json
import os
import re

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

_USER_TURN = re.compile(r"<\|user\|>(.*?)<\|assistant\|>", re.S)


class ScriptedEngine:
    """script(prompt_text, sample_index) -> completion text. Records every call's prompt texts."""

    def __init__(self, tokenizer, script):
        self.tokenizer, self.script, self.calls = tokenizer, script, []

    def generate(self, prompt_token_ids, *, n, temperature=1.0, top_p=1.0, max_tokens, stop_token_ids=None, seed):
        from r1pipe.rollout.types import Rollouts, sample_seed

        texts = [_USER_TURN.search(self.tokenizer.decode(ids, skip_special_tokens=False)).group(1) for ids in prompt_token_ids]
        self.calls.append(texts)
        ids, reasons, p_idx, s_idx, seeds = [], [], [], [], []
        for i, text in enumerate(texts):
            for j in range(n):
                toks = self.tokenizer(self.script(text, j), add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
                reasons.append("stop" if len(toks) <= max_tokens else "length")
                ids.append(toks[:max_tokens])
                p_idx.append(i)
                s_idx.append(j)
                seeds.append(sample_seed(seed, i, j))
        return Rollouts(prompt_token_ids=[list(p) for p in prompt_token_ids], prompt_index=p_idx, sample_index=s_idx,
                        completion_ids=ids, logprobs=[[0.0] * len(t) for t in ids], finish_reason=reasons, seeds=seeds)


@pytest.fixture(scope="session")
def tiny_tok():
    from r1pipe.data.tokenizer import load_tiny_tokenizer

    return load_tiny_tokenizer()


@pytest.fixture
def scripted_engine(tiny_tok):
    return lambda script: ScriptedEngine(tiny_tok, script)


@pytest.fixture
def write_jsonl(tmp_path):
    def write(rows, name="prompts.jsonl"):
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    return write
