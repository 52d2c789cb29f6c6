"""The shipped tiny tokenizer: exact round trip, loads through AutoTokenizer and raw `tokenizers`, and the
committed asset equals a fresh deterministic rebuild."""

from pathlib import Path

import pytest
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from r1pipe.data import task
from r1pipe.data.tokenizer import ALPHABET, FORMAT_TOKENS, TINY_TOKENIZER_DIR, load_tiny_tokenizer, save_tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tiny_tokenizer()


def _task_texts():
    rows = task.arith_rows(50, "train", 0, task.ArithConfig(min_ops=1, max_ops=4, ops="+-*/", paren_prob=0.5,
                                                             allow_negative=True))
    rows += task.general_rows(20, "test", 0)
    return [r["prompt"] for r in rows] + [r["cot"] for r in rows] + ["".join(ALPHABET), "a\n\nb  c\\boxed{-3}"]


def test_vocab_is_small_and_specials_are_set(tok):
    assert len(tok) == 108 <= 128
    ids = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id}
    assert None not in ids and len(ids) == 4
    assert tok.pad_token_id == 0


def test_round_trip_is_exact_and_character_level(tok):
    for text in _task_texts():
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.unk_token_id not in ids, text
        assert tok.decode(ids) == text
        # format markers survive skip_special_tokens: the reward functions read that text
        assert tok.decode(ids, skip_special_tokens=True) == text
    assert len(tok.encode("".join(ALPHABET), add_special_tokens=False)) == len(ALPHABET)


def test_format_markers_are_single_tokens_and_roles_are_special(tok):
    for marker in FORMAT_TOKENS:
        assert len(tok.encode(marker, add_special_tokens=False)) == 1, marker
    ids = tok.encode("<|user|>1+1<|assistant|><think>1+1=2</think>\\boxed{2}<|eos|>", add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=True) == "1+1<think>1+1=2</think>\\boxed{2}"
    assert tok.encode("x", add_special_tokens=True) == tok.encode("x", add_special_tokens=False)


def test_autotokenizer_matches_raw_tokenizers_file(tok):
    # Independent reader of the same tokenizer.json: the Rust library with no transformers layer.
    raw = Tokenizer.from_file(str(TINY_TOKENIZER_DIR / "tokenizer.json"))
    auto = AutoTokenizer.from_pretrained(str(TINY_TOKENIZER_DIR))
    for text in _task_texts():
        assert auto.encode(text, add_special_tokens=False) == raw.encode(text, add_special_tokens=False).ids
        assert raw.decode(raw.encode(text).ids, skip_special_tokens=False) == text
    assert auto.chat_template == tok.chat_template and auto.chat_template


def test_committed_asset_equals_rebuild(tmp_path):
    save_tiny_tokenizer(tmp_path)
    committed = sorted(p.name for p in Path(TINY_TOKENIZER_DIR).iterdir())
    assert committed == sorted(p.name for p in tmp_path.iterdir())
    for name in committed:
        assert (tmp_path / name).read_bytes() == (TINY_TOKENIZER_DIR / name).read_bytes(), (
            f"{name} differs from a rebuild; run `python -m r1pipe.data.tokenizer --rebuild`")
