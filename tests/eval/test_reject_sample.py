"""`reject_sample` with a scripted engine: the keep rule, filters and de-duplication end to end, jsonl
that `datasets` loads, resume that skips finished prompts (also ones with nothing accepted), a partial
last line from a killed run, and the acceptance table per bucket."""

from __future__ import annotations

import json

import pytest

from r1pipe.data.task import arith_row
from r1pipe.reject_sample import done_file, done_prompt_ids, parse_reward_list, reject_sample, reward_entries

EXPRS = ["3+4*5", "2*3+1", "9-2-3", "7+8*2-9", "6*6-5*5", "1+2+3+4"]
HOPELESS = "9-2-3"  # the script never answers this one right


def script(prompt: str, j: int) -> str:
    row = arith_row(prompt)
    cot = row["cot"]
    if prompt == HOPELESS:
        return "<think>no idea</think>\\boxed{1000}"
    return [
        cot,  # correct
        "<think>guess</think>\\boxed{999}",  # wrong
        cot.replace("\n", "\n  "),  # correct, same as sample 0 up to whitespace
        cot.replace("<think>", "<think>```\nprint(1)\n```\n"),  # correct, but a code block in the CoT
        # (mixed-language CoTs are checked in test_filters: the tiny tokenizer is ASCII only)
    ][j % 4]


@pytest.fixture
def prompts_file(write_jsonl):
    rows = [arith_row(e) for e in EXPRS]
    for r in rows:
        del r["cot"]  # a prompt file need not carry a reference CoT
    return write_jsonl(rows)


def run(engine, tiny_tok, prompts_file, out, **kw):
    args = dict(engine=engine, tokenizer=tiny_tok, n=4, rewards=["accuracy", "format"], keep="correct",
                max_per_prompt=4, max_tokens=64, progress=False, batch_prompts=2)
    args.update(kw)
    return reject_sample(None, str(prompts_file), out, **args)


def test_reject_sample_writes_accepted_rows_that_datasets_loads(scripted_engine, tiny_tok, prompts_file, tmp_path, capsys):
    import datasets

    engine = scripted_engine(script)
    out = tmp_path / "rs" / "samples.jsonl"
    stats = run(engine, tiny_tok, prompts_file, out, seed=7)
    # 5 answerable prompts x 1 kept (sample 0; 2 is its duplicate, 3 has code, 1 wrong); the hopeless one keeps none
    assert stats["kept"] == 5 and stats["samples"] == 24
    assert stats["reasons"] == {"not_correct": 1 * 5 + 4, "duplicate": 5, "code_block": 5}
    ds = datasets.load_dataset("json", data_files=str(out), split="train", cache_dir=str(tmp_path / "hf"))
    assert len(ds) == 5
    assert {"id", "prompt", "completion", "rewards", "reward", "model", "seed", "sample_seed", "solution"} <= set(ds.column_names)
    for row in ds:
        assert row["completion"] == arith_row(row["prompt"])["cot"]
        assert row["rewards"] == {"accuracy": 1.0, "format": 1.0} and row["reward"] == 2.0
        assert row["seed"] == 7 and row["sample"] == 0 and row["model"] == "ScriptedEngine"
    assert HOPELESS not in ds["prompt"]
    # the SFT stage reads it back through the project's own loader (prompt, solution, completion)
    from r1pipe.data.datasets import load_prompt_dataset

    assert load_prompt_dataset(str(out))["completion"] == ds["completion"]
    assert done_prompt_ids(out) == {arith_row(e)["id"] for e in EXPRS}
    printed = capsys.readouterr().out
    # difficulty = number of operations: 2 ops for the first three, 3 for the rest
    assert "difficulty=2" in printed and "difficulty=3" in printed
    assert stats["buckets"]["difficulty=2"] == {"prompts": 3, "samples": 12, "kept": 2, "prompts_kept": 2}
    assert stats["buckets"]["difficulty=3"] == {"prompts": 3, "samples": 12, "kept": 3, "prompts_kept": 3}


def test_resume_skips_finished_prompts(scripted_engine, tiny_tok, prompts_file, tmp_path, capsys):
    out = tmp_path / "samples.jsonl"
    first = scripted_engine(script)
    run(first, tiny_tok, prompts_file, out, limit=3)
    assert [p for call in first.calls for p in call] == EXPRS[:3]
    lines_before = out.read_text().splitlines()
    assert len(lines_before) == 2  # the hopeless prompt is done but wrote nothing
    with out.open("a") as f:
        f.write('{"id": "killed mid-wri')  # what a kill during a write leaves behind
    second = scripted_engine(script)
    stats = run(second, tiny_tok, prompts_file, out)
    assert [p for call in second.calls for p in call] == EXPRS[3:]  # the hopeless prompt was not redone
    assert stats["prompts_skipped"] == 3 and stats["prompts"] == 3
    lines = out.read_text().splitlines()
    assert lines[:2] == lines_before and len(lines) == 5
    assert all(json.loads(line)["id"] for line in lines)
    third = scripted_engine(script)
    stats = run(third, tiny_tok, prompts_file, out)
    assert third.calls == [] and stats["samples"] == 0
    assert "resuming" in capsys.readouterr().out


def test_keep_all_and_best(scripted_engine, tiny_tok, prompts_file, tmp_path):
    stats = run(scripted_engine(script), tiny_tok, prompts_file, tmp_path / "all.jsonl", keep="all", max_per_prompt=8)
    # per answerable prompt: wrong + correct kept, duplicate and code block dropped; hopeless: 4 identical -> 1
    assert stats["kept"] == 5 * 2 + 1
    stats = run(scripted_engine(script), tiny_tok, prompts_file, tmp_path / "best.jsonl", keep="best",
                rewards=["accuracy", {"name": "format", "weight": 0.5}])
    # best = total 1.5 (three correct samples); the hopeless prompt's best is its (wrong) formatted answer
    assert stats["kept"] == 5 + 1
    rows = [json.loads(line) for line in (tmp_path / "best.jsonl").read_text().splitlines()]
    assert sorted({r["reward"] for r in rows}) == [0.5, 1.5]


def test_length_quantile_buckets_when_no_difficulty(scripted_engine, tiny_tok, write_jsonl, tmp_path):
    rows = [{"prompt": e, "solution": arith_row(e)["solution"]} for e in EXPRS]
    stats = run(scripted_engine(script), tiny_tok, write_jsonl(rows, "nodiff.jsonl"), tmp_path / "o.jsonl")
    assert sum(b["prompts"] for b in stats["buckets"].values()) == 6
    assert all(name.startswith("len q") for name in stats["buckets"])
    # ids are hashes of the prompt when the file has none, so resume still works
    assert len(done_prompt_ids(tmp_path / "o.jsonl")) == 6 and done_file(tmp_path / "o.jsonl").is_file()


def test_reward_entries_accept_the_recipe_forms():
    assert reward_entries("accuracy") == ["accuracy"]
    assert reward_entries({"accuracy": 1.0, "format": {"weight": 0.5}}) == [
        {"name": "accuracy", "weight": 1.0}, {"name": "format", "weight": 0.5}]
    assert reward_entries(["accuracy", {"name": "format"}]) == ["accuracy", {"name": "format"}]


def test_parse_reward_list():
    assert parse_reward_list("accuracy, format=0.5") == ["accuracy", {"name": "format", "weight": 0.5}]
    with pytest.raises(SystemExit):
        parse_reward_list("format=x")


def test_reject_sample_cli_on_a_tiny_policy_with_the_torch_engine(tmp_path, tiny_tok):
    import argparse

    from r1pipe.model import DeepSeekPolicy
    from r1pipe.model.tiny import tiny_config
    from r1pipe.reject_sample import add_reject_parser

    ckpt = DeepSeekPolicy.from_config(tiny_config(vocab_size=len(tiny_tok)), seed=0).save_pretrained(tmp_path / "ckpt", tokenizer=tiny_tok)
    parser = argparse.ArgumentParser()
    add_reject_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "rs.jsonl"
    args = parser.parse_args(["reject-sample", "--model", str(ckpt), "--prompts", "tiny_arith:train", "--limit", "2",
                              "--n", "3", "--rewards", "accuracy,format", "--keep", "all", "--keep-truncated",
                              "--max-per-prompt", "2", "--max-tokens", "4", "--engine", "torch", "--out", str(out),
                              "--no-progress"])
    assert args.func(args) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    stats = json.loads((tmp_path / "rs.jsonl.stats.json").read_text())
    assert stats["samples"] == 6 and stats["kept"] == len(rows) and 2 <= len(rows) <= 4
    assert all(r["model"] == str(ckpt) and r["seed"] == 0 and set(r["rewards"]) == {"accuracy", "format"} for r in rows)
