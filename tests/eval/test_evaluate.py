"""`evaluate` with a scripted engine against hand-computed metrics, the files it writes (samples.jsonl
loads with `datasets`), and the `r1pipe eval` command end to end on a tiny saved policy with the torch
engine (the real-vLLM run is test_vllm_eval.py)."""

from __future__ import annotations

import argparse
import json
from math import comb

import pytest

from r1pipe.data.task import arith_row
from r1pipe.evaluate import add_eval_parser, evaluate

EXPRS = ["3+4*5", "2*3+1", "9-2-3", "7+8*2-9"]
N_CORRECT = {"3+4*5": 4, "2*3+1": 2, "9-2-3": 0, "7+8*2-9": 1}


def script(prompt: str, j: int) -> str:
    row = arith_row(prompt)
    if j < N_CORRECT[prompt]:
        return row["cot"]
    wrong = int(row["solution"]) + 1 + (j % 2)  # two different wrong answers
    if prompt == "9-2-3" and j == 3:
        return f"\\boxed{{{wrong}}}"  # right shape of answer, but no <think>: a format failure
    return f"<think>hmm</think>\\boxed{{{wrong}}}"


def test_evaluate_matches_hand_computed_metrics(scripted_engine, tiny_tok, write_jsonl, tmp_path):
    import datasets

    data = write_jsonl([arith_row(e) for e in EXPRS])
    out = tmp_path / "eval"
    summary = evaluate(None, str(data), engine=scripted_engine(script), tokenizer=tiny_tok, n=4, max_tokens=64,
                       out_dir=out, name="scripted", progress=False)
    counts = [N_CORRECT[e] for e in EXPRS]
    assert summary["pass@1"] == pytest.approx(sum(c / 4 for c in counts) / 4)
    for k in (1, 2, 4):
        closed = sum(1 - comb(4 - c, k) / comb(4, k) for c in counts) / 4
        assert summary["pass@k"][str(k)] == pytest.approx(closed)
    # maj@4: 3+4*5 right (4 votes); 2*3+1: 2 right vs wrong answers split 1/1 -> right; 9-2-3 wrong;
    # 7+8*2-9: right 1, wrong {a: 2, b: 1} (j=1,3 give a, j=2 gives b) -> wrong
    assert summary["maj@k"]["4"] == pytest.approx(2 / 4)
    assert summary["format_rate"] == pytest.approx(15 / 16)
    tokens = [len(tiny_tok(script(e, j), add_special_tokens=False)["input_ids"]) for e in EXPRS for j in range(4)]
    assert summary["mean_length"] == pytest.approx(sum(tokens) / 16)
    assert summary["truncated_rate"] == 0.0
    assert summary["pass@1_by_bucket"]["2"]["n_prompts"] == 3
    assert summary["rewards"]["accuracy"] == pytest.approx(7 / 16)

    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["pass@k"] == summary["pass@k"] and on_disk["name"] == "scripted"
    assert "| scripted |" in (out / "summary.md").read_text()
    ds = datasets.load_dataset("json", data_files=str(out / "samples.jsonl"), split="train", cache_dir=str(tmp_path / "hf"))
    assert len(ds) == 16
    assert sum(ds["correct"]) == 7
    assert ds["completion"][:4] == [script("3+4*5", j) for j in range(4)]


def test_truncation_is_counted(scripted_engine, tiny_tok, write_jsonl):
    data = write_jsonl([arith_row(e) for e in EXPRS[:2]])
    summary = evaluate(None, str(data), engine=scripted_engine(script), tokenizer=tiny_tok, n=2, max_tokens=5, progress=False)
    assert summary["truncated_rate"] == 1.0 and summary["mean_length"] == 5.0
    assert summary["pass@1"] == 0.0  # a cut-off completion never reaches its answer


def test_eval_cli_on_a_tiny_policy_with_the_torch_engine(tmp_path, tiny_tok):
    from r1pipe.model import DeepSeekPolicy
    from r1pipe.model.tiny import tiny_config

    ckpt = DeepSeekPolicy.from_config(tiny_config(vocab_size=len(tiny_tok)), seed=0).save_pretrained(tmp_path / "ckpt", tokenizer=tiny_tok)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "reward/mean": s / 10}) + "\n" for s in range(5)))
    parser = argparse.ArgumentParser()
    add_eval_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "out"
    args = parser.parse_args(["eval", str(ckpt), "--data", "tiny_arith:test", "--limit", "3", "--n", "2", "--engine", "torch",
                              "--max-tokens", "6", "--out", str(out), "--plot", "--no-progress"])
    assert args.func(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_prompts"] == 3 and summary["n"] == 2 and summary["max_tokens"] == 6
    lines = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and all(0 < r["n_tokens"] <= 6 for r in lines)
    assert summary["mean_length"] == pytest.approx(sum(r["n_tokens"] for r in lines) / 6)
    # the metrics.jsonl next to the checkpoint is found for the reward plot
    for png in ("pass_at_k.png", "reward_curve.png", "accuracy_by_stage.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
