"""format, tag_count, reasoning_steps, language_consistency, cosine_length and repetition_penalty
against hand-computed values and independent formulas."""

import math

import pytest

from r1pipe.rewards import load_reward

GOOD = "<think>\nadd them\n</think>\nThe sum is \\boxed{5}."
TAGGED = "<think>add them</think><answer>5</answer>"


def call(name, completions, **kw):
    return load_reward(name)(prompts=kw.pop("prompts", ["q"] * len(completions)), completions=completions, **kw)


@pytest.mark.parametrize(
    "text,plain,tagged",
    [
        (GOOD, 1.0, 0.0),
        (TAGGED, 1.0, 1.0),
        ("<think></think>5", 0.0, 0.0),  # empty CoT
        ("<think>x</think>   ", 0.0, 0.0),  # no answer
        ("5 <think>x</think> 5", 0.0, 0.0),  # text before the CoT
        ("<think>x</think><think>y</think>5", 0.0, 0.0),
        ("<think>x", 0.0, 0.0),
        ("</think>x<think>", 0.0, 0.0),
        ("<think>x</think><answer>5</answer> trailing", 1.0, 0.0),
        ("", 0.0, 0.0),
    ],
)
def test_format(text, plain, tagged):
    assert call("format", [text]) == [plain]
    assert call("format", [text], answer_tag=True) == [tagged]


def test_format_honours_a_think_tag_opened_by_the_chat_template():
    assert call("format", ["add them</think>5"], prompts=["<|assistant|><think>\n"]) == [1.0]
    assert call("format", ["add them</think>5"], prompts=["<|assistant|>"]) == [0.0]
    chat = [[{"role": "user", "content": "2+3?"}]]
    assert call("format", ["add them</think>5"], prompts=chat, think_prefilled=True) == [1.0]
    assert call("tag_count", ["add them</think>5"], prompts=chat, think_prefilled=True) == [0.5]


def test_format_reads_chat_messages():
    assert call("format", [[{"role": "assistant", "content": GOOD}]]) == [1.0]


def test_tag_count_partial_credit():
    out = call("tag_count", [TAGGED, GOOD, "<think>x</think></think>", "nothing", "<answer>a</answer><answer>b</answer>"])
    assert out == [1.0, 0.5, 0.25, 0.0, 0.0]


def test_reasoning_steps():
    cot = "<think>Step 1: read.\nStep 2: add.\n1. check\n- bullet\nFirst, note\nnot a step 3.</think>x"
    assert call("reasoning_steps", [cot], target_steps=5) == [1.0]
    assert call("reasoning_steps", ["<think>Step 1: a\nStep 2: b</think>"], target_steps=3) == [pytest.approx(2 / 3)]
    assert call("reasoning_steps", ["<think>just think</think>"]) == [0.0]


def test_language_consistency_en_and_zh():
    en = "<think>We add the two numbers to get five.</think>5"
    zh = "<think>我们把两个数相加得到五</think>5"
    mixed = "<think>We add 两个数 then done</think>"  # 4 English words, 3 Han characters
    maths = "<think>设 x = 3, 则 \\frac{x}{3} = 1</think>"  # x is a variable, \frac a command
    assert call("language_consistency", [en, zh, mixed], language="en") == [1.0, 0.0, pytest.approx(4 / 7)]
    assert call("language_consistency", [en, zh, mixed], language="zh") == [0.0, 1.0, pytest.approx(3 / 7)]
    assert call("language_consistency", [maths], language="zh") == [1.0]
    assert call("language_consistency", [en, zh], language=["en", "zh"]) == [1.0, 1.0]  # per-sample column
    assert call("language_consistency", ["<think>123 + 4</think>"]) == [0.0]
    with pytest.raises(ValueError, match="language 'xx'"):
        call("language_consistency", [en], language="xx")


def cosine_reference(t, T, lo, hi):
    """The schedule as written in Yeo et al. 2025: r = lo + (hi - lo)(1 + cos(pi t / T)) / 2."""
    return lo + (hi - lo) * (1 + math.cos(math.pi * min(t, T) / T)) / 2


def test_cosine_length_against_the_paper_formula():
    right, wrong = "<think>w w w</think> \\boxed{5}", "<think>w w w</think> \\boxed{4}"
    ids = [[0] * 0, [0] * 50, [0] * 100, [0] * 250]
    comps = [right, right, wrong, wrong]
    out = call("cosine_length", comps, solution=["5"] * 4, completion_ids=ids, max_len=200)
    want = [
        cosine_reference(0, 200, 0.5, 1.0),
        cosine_reference(50, 200, 0.5, 1.0),
        cosine_reference(100, 200, -0.5, -1.0),
        cosine_reference(250, 200, -0.5, -1.0),
    ]
    assert out == pytest.approx(want)
    assert out[0] == pytest.approx(1.0) and out[3] == pytest.approx(-0.5)
    # without completion_ids the length is in words: "w w w" (tags, \boxed and digits do not count)
    assert call("cosine_length", [right], solution=["5"], max_len=10) == [pytest.approx(cosine_reference(3, 10, 0.5, 1.0))]
    assert call("cosine_length", [right], solution=["garbage ))))"]) == [None]


def test_repetition_penalty():
    text = "a b c a b c a b c"  # 7 trigrams, 3 distinct
    out = call("repetition_penalty", [text, "one two three four", "short", "重复重复重复"], ngram_size=3, max_penalty=-0.5)
    assert out == [pytest.approx(-0.5 * (1 - 3 / 7)), 0.0, 0.0, pytest.approx(-0.5 * (1 - 2 / 4))]
