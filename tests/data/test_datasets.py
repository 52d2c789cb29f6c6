"""Prompt-dataset loading (real files on disk, builtins) and chat formatting.

Malformed rows must fail up front with the file, row and field named; formatting must equal what
transformers' own chat-template rendering (with its assistant-token mask) produces."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from r1pipe.data.datasets import TASK_SYSTEM_PROMPT, format_prompt, format_prompt_text, format_sft, load_prompt_dataset
from r1pipe.data.tokenizer import load_tiny_tokenizer

GOOD = {"prompt": "3+4*5", "solution": "23"}


def _write_jsonl(path, lines):
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return path


@pytest.mark.parametrize("bad, row_where, field, expect", [
    ({"solution": "1"}, "row 2 (line 2)", "prompt", "missing"),
    ({"prompt": "1+1"}, "row 2 (line 2)", "solution", "missing"),
    ({"prompt": "1+1", "solution": 2}, "row 2 (line 2)", "solution", "must be a string"),
    ({"prompt": "  ", "solution": "2"}, "row 2 (line 2)", "prompt", "empty"),
    ({"prompt": ["1+1"], "solution": "2"}, "row 2 (line 2)", "prompt", "must be a string"),
    ({"prompt": "1+1", "solution": "2", "difficulty": "hard"}, "row 2 (line 2)", "difficulty", "must be int"),
])
def test_malformed_jsonl_row_names_file_row_and_field(tmp_path, bad, row_where, field, expect):
    path = _write_jsonl(tmp_path / "prompts.jsonl", [GOOD, bad, GOOD])
    with pytest.raises(ValueError) as err:
        load_prompt_dataset(path)
    msg = str(err.value)
    assert str(path) in msg and row_where in msg and f"'{field}'" in msg and expect in msg, msg


def test_invalid_json_and_non_object_rows_name_the_line(tmp_path):
    path = _write_jsonl(tmp_path / "a.jsonl", [GOOD, "", '{"prompt": "1+1", "solution": '])
    with pytest.raises(ValueError, match=r"a\.jsonl: row 2 \(line 3\): not valid JSON"):
        load_prompt_dataset(path)
    path = _write_jsonl(tmp_path / "b.jsonl", [GOOD, "[1, 2]"])
    with pytest.raises(ValueError, match=r"b\.jsonl: row 2 \(line 2\): expected a JSON object"):
        load_prompt_dataset(path)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="empty.jsonl: no rows"):
        load_prompt_dataset(tmp_path / "empty.jsonl")


def test_malformed_parquet_row_names_file_row_and_field(tmp_path):
    path = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"prompt": ["1+1", "2+2", "3+3"], "solution": ["2", "", "6"]}), path)
    with pytest.raises(ValueError, match=r"prompts\.parquet: row 2: field 'solution' is empty"):
        load_prompt_dataset(path)
    pq.write_table(pa.table({"prompt": ["1+1"], "answer": ["2"]}), path)
    with pytest.raises(ValueError, match=r"row 1: field 'solution' is missing"):
        load_prompt_dataset(path)


def test_good_files_load_with_all_columns(tmp_path):
    rows = [GOOD, {"prompt": "upper: ab", "solution": "AB", "kind": "general", "extra": 1}]
    ds = load_prompt_dataset(_write_jsonl(tmp_path / "p.jsonl", rows))
    assert ds.to_list() == [{**GOOD, "kind": None, "extra": None}, rows[1]]
    pq.write_table(pa.Table.from_pylist([GOOD, GOOD]), tmp_path / "p.parquet")
    assert load_prompt_dataset(tmp_path / "p.parquet").to_list() == [GOOD, GOOD]
    (tmp_path / "splits").mkdir()
    _write_jsonl(tmp_path / "splits" / "test.jsonl", [GOOD])
    assert len(load_prompt_dataset(tmp_path / "splits", "test")) == 1
    with pytest.raises(FileNotFoundError, match="no train.jsonl"):
        load_prompt_dataset(tmp_path / "splits")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_prompt_dataset(tmp_path / "nope.jsonl")


def test_builtins_split_size_options_and_errors():
    test = load_prompt_dataset("tiny_arith:test")
    train = load_prompt_dataset("tiny_arith?n=3000", "train")
    assert len(test) == 500 and len(train) == 3000
    assert not set(test["prompt"]) & set(train["prompt"])
    small = load_prompt_dataset("tiny_arith:train?n=50&seed=1&max_ops=2&min_ops=2")
    assert len(small) == 50 and set(small["difficulty"]) == {2}
    mix = load_prompt_dataset("tiny_align:train?n=40&general_fraction=0.5")
    assert sorted(mix["kind"]).count("general") == 20
    cold = load_prompt_dataset("tiny_cold_start?n=20&terse_fraction=0.5")
    assert sorted(cold["cot_style"]).count("terse") == 10
    with pytest.raises(ValueError, match="unknown split 'test'; expected one of train"):
        load_prompt_dataset("tiny_cold_start:test")
    with pytest.raises(ValueError, match="n='many' is not a valid int"):
        load_prompt_dataset("tiny_arith:train?n=many")
    with pytest.raises(ValueError, match="did you mean 'tiny_arith'"):
        load_prompt_dataset("tiny_arth:train")
    with pytest.raises(ValueError, match="did you mean 'max_ops'"):
        load_prompt_dataset("tiny_arith:train?max_op=2")
    with pytest.raises(ValueError, match="did you mean 'test'"):
        load_prompt_dataset("tiny_arith:tset")


def test_format_prompt_matches_chat_template_and_hand_written_text():
    tok = load_tiny_tokenizer()
    text = format_prompt_text(tok, "3+4*5")
    assert text == f"<|bos|><|system|>{TASK_SYSTEM_PROMPT}<|user|>3+4*5<|assistant|>"
    ids = format_prompt(tok, "3+4*5")
    assert tok.decode(ids) == text and ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.decode(format_prompt(tok, "1+1", system_prompt=None)) == "<|bos|><|user|>1+1<|assistant|>"


def test_format_sft_equals_transformers_assistant_mask():
    tok = load_tiny_tokenizer()
    response = "<think>4*5=20\n3+20=23</think>\\boxed{23}"
    ours = format_sft(tok, "3+4*5", response)
    messages = [{"role": "system", "content": TASK_SYSTEM_PROMPT}, {"role": "user", "content": "3+4*5"},
                {"role": "assistant", "content": response}]
    ref = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert ours["input_ids"] == list(ref["input_ids"])
    assert ours["completion_mask"] == list(ref["assistant_masks"])
    assert ours["input_ids"][-1] == tok.eos_token_id
    assert tok.decode([i for i, m in zip(ours["input_ids"], ours["completion_mask"]) if m]) == response + "<|eos|>"
