"""`r1pipe eval` and `reject-sample` through the real vLLM engine on a tiny saved policy: one engine
built once and passed in (as the demo does), reproducible per seed, greedy completions equal to our
own policy's greedy decoding (torch engine), and metrics that match a recount with math-verify."""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


@pytest.mark.vllm
def test_eval_and_reject_sample_with_vllm(tmp_path, tiny_tok):
    import torch
    from math_verify import parse, verify

    from r1pipe.evaluate import evaluate
    from r1pipe.model import DeepSeekPolicy
    from r1pipe.model.tiny import tiny_config
    from r1pipe.reject_sample import CotFilters, reject_sample
    from r1pipe.rollout.torch_engine import TorchRolloutEngine
    from r1pipe.rollout.vllm_engine import VLLMRolloutEngine

    policy = DeepSeekPolicy.from_config(tiny_config(vocab_size=len(tiny_tok)), seed=0).eval()
    with torch.no_grad():  # peaked next-token distributions, so greedy picks are not near-ties
        for name, p in policy.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.08, generator=torch.Generator().manual_seed(len(name)))
    ckpt = policy.save_pretrained(tmp_path / "ckpt", tokenizer=tiny_tok)
    engine = VLLMRolloutEngine(ckpt, max_model_len=256, seed=0)
    common = dict(engine=engine, data="tiny_arith:test", limit=8, max_tokens=16, progress=False)

    a = evaluate(ckpt, n=4, seed=1, out_dir=tmp_path / "a", **common)
    b = evaluate(ckpt, n=4, seed=1, out_dir=tmp_path / "b", **common)
    evaluate(ckpt, n=4, seed=2, out_dir=tmp_path / "c", **common)
    samples = {k: [json.loads(line) for line in (tmp_path / k / "samples.jsonl").read_text().splitlines()] for k in "abc"}
    assert [s["completion"] for s in samples["a"]] == [s["completion"] for s in samples["b"]]
    assert [s["completion"] for s in samples["a"]] != [s["completion"] for s in samples["c"]]
    assert len(samples["a"]) == 32 and a["n_prompts"] == 8
    for s in samples["a"]:
        assert 0 <= s["n_tokens"] <= 16 and s["truncated"] == (s["finish_reason"] == "length")
        assert s["correct"] == bool(verify(parse(s["solution"]), parse(s["completion"]))) or s["answer"] is None
    assert a["mean_length"] == pytest.approx(sum(s["n_tokens"] for s in samples["a"]) / 32)
    assert a["pass@1"] == pytest.approx(sum(s["correct"] for s in samples["a"]) / 32)

    # greedy through vLLM = greedy through our policy (same prompt rendering, same decoding)
    greedy = {k: evaluate(ckpt, n=1, temperature=0.0, out_dir=tmp_path / k, **{**common, "engine": e})
              for k, e in (("gv", engine), ("gt", TorchRolloutEngine(policy, pad_token_id=0)))}
    recs = {k: [json.loads(x) for x in (tmp_path / k / "samples.jsonl").read_text().splitlines()] for k in greedy}
    same = [(v["completion"], v["n_tokens"]) == (t["completion"], t["n_tokens"]) for v, t in zip(recs["gv"], recs["gt"])]
    assert sum(same) >= 7, [(v["completion"], t["completion"]) for v, t in zip(recs["gv"], recs["gt"])]

    stats = reject_sample(ckpt, "tiny_arith:train", tmp_path / "rs.jsonl", engine=engine, n=4, keep="all",
                          max_per_prompt=2, limit=4, max_tokens=16, progress=False, verbose=False,
                          filters=CotFilters(drop_truncated=False))
    rows = [json.loads(line) for line in (tmp_path / "rs.jsonl").read_text().splitlines()]
    assert stats["samples"] == 16 and len(rows) == stats["kept"] and 4 <= len(rows) <= 8
    assert all(r["model"] == str(ckpt) for r in rows)
