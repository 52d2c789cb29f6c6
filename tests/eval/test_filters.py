"""R1's readability filters on crafted chains of thought, and the per-prompt keep rule."""

from __future__ import annotations

import pytest

from r1pipe.generation import Sample
from r1pipe.reject_sample import (
    CotFilters,
    dedupe_key,
    foreign_word_fraction,
    has_code_block,
    longest_paragraph,
    rejection_reason,
    select,
)

EN = CotFilters()

ARITH = "<think>4*5=20\n3+20=23\n23-2=21</think>\\boxed{21}"
ENGLISH = "<think>First multiply 4 by 5 to get 20.\n\nThen add 3, which gives 23.</think>\\boxed{23}"
MIXED = "<think>First multiply 4 by 5, 然后加上 3, which gives 23.</think>\\boxed{23}"
LATEX_VARS = "<think>Let $x = \\frac{a}{b}$ and set \\alpha = 2, so x \\cdot y = 6.</think>\\boxed{6}"
CODE_IN_COT = "<think>Let me compute it:\n```python\nprint(3 + 4 * 5)\n```\nThat prints 23.</think>\\boxed{23}"
CODE_IN_ANSWER = "<think>Write a loop.</think>\n```python\nfor i in range(3):\n    print(i)\n```"
LONG = "<think>" + "word " * 500 + "</think>\\boxed{1}"
LONG_SPLIT = "<think>" + ("word " * 100 + "\n\n") * 5 + "</think>\\boxed{1}"


@pytest.mark.parametrize("text,reason", [
    (ARITH, None),
    (ENGLISH, None),
    (MIXED, "mixed_language"),
    (LATEX_VARS, None),
    (CODE_IN_COT, "code_block"),
    (CODE_IN_ANSWER, None),  # code in the final answer is fine; R1 filters the CoT only
    (LONG, "long_paragraph"),
    (LONG_SPLIT, None),
])
def test_rejection_reason_on_crafted_cots(text, reason):
    assert rejection_reason(text, CotFilters(max_paragraph_chars=1000)) == reason


def test_foreign_fraction_counts_only_scripted_words():
    assert foreign_word_fraction("4*5=20", "en") == 0.0
    # words: First multiply by which gives (5 English) + 然 后 加 上 (4 Han characters)
    cot = MIXED[len("<think>"):MIXED.index("</think>")]
    assert foreign_word_fraction(cot, "en") == pytest.approx(4 / 9)
    assert foreign_word_fraction(cot, "zh") == pytest.approx(5 / 9)
    assert foreign_word_fraction("设 x = 3, 所以 y = 6", "zh") == 0.0  # one-letter variables are maths, not English


def test_foreign_fraction_threshold_and_truncation():
    assert rejection_reason(MIXED, CotFilters(max_foreign_fraction=0.5)) is None
    assert rejection_reason(ARITH, EN, truncated=True) == "truncated"
    assert rejection_reason(ARITH, CotFilters(drop_truncated=False), truncated=True) is None
    assert rejection_reason(CODE_IN_COT, CotFilters(drop_code_blocks=False)) is None
    assert rejection_reason(LONG, CotFilters(max_paragraph_chars=0)) is None
    with pytest.raises(ValueError, match="--language"):
        CotFilters(language="xx")


def test_paragraph_and_code_helpers():
    assert longest_paragraph("ab\n\n  abcd  \n \nabc") == 4
    assert longest_paragraph("ab\ncd") == 5  # a single newline does not end a paragraph
    assert has_code_block("x\n  ~~~\ny") and not has_code_block("inline `code` only")


def _s(text, acc, total=None, finish="stop", i=0):
    return Sample(row=0, prompt_id="p", sample_index=i, completion=text, n_tokens=len(text), finish_reason=finish,
                  seed=i, rewards={"accuracy": acc, "format": 1.0}, total=acc + 1.0 if total is None else total)


def test_select_keep_rules():
    good = "<think>2+2=4</think>\\boxed{4}"
    samples = [
        _s(good, 1.0, i=0),
        _s("<think>2+2=5</think>\\boxed{5}", 0.0, i=1),
        _s(good.replace("2+2", "2 + 2"), 1.0, total=1.5, i=2),
        _s(" <think>2+2=4</think>\\boxed{4}\n", 1.0, i=3),  # same as sample 0 up to whitespace
        _s(MIXED, 1.0, i=4),
        _s(good + "!", 1.0, finish="length", i=5),
        _s(good + "?", 1.0, i=6),
        _s(good + ".", None, total=1.0, i=7),  # accuracy could not score it
    ]
    kept, why = select(samples, "correct", 2, "accuracy", EN)
    assert [s.sample_index for s in kept] == [0, 2]
    assert why == {"not_correct": 2, "duplicate": 1, "mixed_language": 1, "truncated": 1, "over_max_per_prompt": 1}
    kept, why = select(samples, "correct", 10, "accuracy", EN)
    assert [s.sample_index for s in kept] == [0, 2, 6]
    kept, _ = select(samples, "best", 10, "accuracy", EN)  # top total 2.0; sample 2 (1.5) is not best
    assert [s.sample_index for s in kept] == [0, 6]
    kept, why = select(samples, "all", 10, "accuracy", EN)
    assert [s.sample_index for s in kept] == [0, 1, 2, 6, 7]
    assert dedupe_key(" a \n b ") == dedupe_key("a b")
    with pytest.raises(ValueError, match="keep"):
        select(samples, "most", 1, "accuracy", EN)
