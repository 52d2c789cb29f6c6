"""The accuracy reward on a table of answer pairs, with math-verify as the oracle.

Each row: (solution column, completion, expected reward). Expectations are what math-verify's
semantics give and are mathematically right, except the rows marked DELIBERATE (our reading of
where the answer is differs from running math-verify on the raw text) and LENIENT (math-verify's
verdict kept although a strict reader could disagree; the comment says why).
"""

import re

import pytest
from math_verify import LatexExtractionConfig, parse, verify

from r1pipe.rewards import load_reward
from r1pipe.rewards.math import BOXED_CONFIG, _verdict, extract_answer, final_boxed, parse_answer, parse_gold


def boxed(ans: str) -> str:
    return f"<think>Let me work it out step by step.</think> The answer is $\\boxed{{{ans}}}$."


TABLE = [
    # fractions and decimals
    (r"\frac{1}{2}", boxed("0.5"), 1.0),
    (r"\frac{1}{2}", boxed(r"\frac12"), 1.0),
    (r"\frac{1}{2}", boxed("1/2"), 1.0),
    (r"\frac{2}{4}", boxed(r"\frac{1}{2}"), 1.0),
    (r"\dfrac{3}{4}", boxed(r"\tfrac{3}{4}"), 1.0),
    ("0.5", boxed(r"\frac{1}{2}"), 1.0),
    ("1.5", boxed("1.50"), 1.0),
    (r"\frac{1}{3}", boxed("0.333"), 0.0),  # 0.333 is not 1/3
    (r"\frac{1}{3}", boxed("0.33"), 0.0),
    (r"\frac{\sqrt{3}}{3}", boxed(r"\frac{1}{\sqrt{3}}"), 1.0),
    (r"\sqrt{2}/2", boxed("0.7071"), 0.0),  # a 4-digit decimal is not the surd
    # percentages
    (r"50\%", boxed(r"50\%"), 1.0),
    (r"50\%", boxed("0.5"), 1.0),
    ("0.5", boxed(r"50\%"), 1.0),
    (r"12.5\%", boxed(r"\frac18"), 1.0),
    (r"50\%", boxed("50"), 1.0),  # LENIENT: "what percent?" answered with the bare number
    (r"50\%", boxed("5"), 0.0),
    # units and number formatting
    (r"5 \text{ cm}", boxed("5"), 1.0),
    ("5", boxed(r"5 \mathrm{cm}"), 1.0),
    (r"90^\circ", boxed("90"), 1.0),
    (r"\$18.90", boxed("18.90"), 1.0),
    ("1000", boxed("1,000"), 1.0),
    ("1000", boxed("1{,}000"), 1.0),
    ("-3", boxed("3"), 0.0),
    ("007", boxed("7"), 1.0),
    (r"2^{10}", boxed("1024"), 1.0),
    # intervals
    ("[1, 3)", boxed("[1,3)"), 1.0),
    ("[1, 3)", boxed("(1,3)"), 0.0),
    ("[0, 1]", boxed("[0,1)"), 0.0),
    (r"(-\infty, 2]", boxed(r"(-\infty,2]"), 1.0),
    (r"(-1,1)\cup(2,3)", boxed(r"(2,3)\cup(-1,1)"), 1.0),
    ("x > 2", boxed(r"(2, \infty)"), 1.0),
    (r"x \in [0,1]", boxed("[0,1]"), 1.0),
    # sets and lists
    (r"\{1,2,3\}", boxed(r"\{3,2,1\}"), 1.0),
    (r"\{1,2,3\}", boxed(r"\{1,2\}"), 0.0),
    ("1,2,3", boxed("3,2,1"), 1.0),
    # matrices
    (r"\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}", boxed(r"\begin{pmatrix}1&2\\3&4\end{pmatrix}"), 1.0),
    (r"\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}", boxed(r"\begin{pmatrix}1&2\\4&3\end{pmatrix}"), 0.0),
    (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", boxed(r"\begin{bmatrix}1\\2\end{bmatrix}"), 1.0),
    (r"\begin{pmatrix}1&0\\0&1\end{pmatrix}", boxed("1"), 0.0),
    # expressions, equations, constants
    ("x^2+2x+1", boxed("(x+1)^2"), 1.0),
    (r"2\pi", boxed(r"2 \pi"), 1.0),
    (r"\pi", boxed("3.14159"), 0.0),
    ("y = 2x + 1", boxed("y=1+2x"), 1.0),
    ("x=5", boxed("5"), 1.0),
    ("3+4i", boxed("4i+3"), 1.0),
    # several boxes
    ("2, 3", r"<think>x</think> The roots are $\boxed{2}$ and $\boxed{3}$.", 1.0),
    # DELIBERATE: math-verify on the raw text keeps only the last of un-delimited boxes; boxes joined
    # only by "and"/commas are one answer set for us, whatever the delimiters.
    ("2, 3", r"<think>x</think> The roots are \boxed{2} and \boxed{3}.", 1.0),
    ("3", r"<think>x</think> The roots are \boxed{2} and \boxed{3}.", 0.0),  # an extra wrong root
    ("3", r"<think>x</think> First \boxed{2}. Wait, that was wrong: it is \boxed{3}.", 1.0),
    ("2", r"<think>x</think> First \boxed{2}. Wait, that was wrong: it is \boxed{3}.", 0.0),
    # DELIBERATE: a box inside the CoT is a draft; the answer is what comes after </think>
    ("2", r"<think>maybe \boxed{2}</think> So the answer is \boxed{3}.", 0.0),
    # plain text, tags and chat form
    ("42", "<think>6 times 7</think> The final answer is 42.", 1.0),
    ("42", "<think>6 times 7</think><answer>42</answer>", 1.0),
    ("42", r"<think>6 times 7</think><answer> \boxed{42} </answer>", 1.0),
    ("42", [{"role": "assistant", "content": r"<think>6 times 7</think>\boxed{42}"}], 1.0),
    (r"\text{Monday}", boxed(r"\text{Monday}"), 1.0),
    (r"\text{Monday}", boxed(r"\text{Tuesday}"), 0.0),
    (r"\text{(B)}", boxed("B"), 1.0),
    ("The answer is $\\boxed{12}$: three times four.", boxed("12"), 1.0),  # a worked solution as gold
    # empty and garbage completions
    ("42", "", 0.0),
    ("42", "We get 42 apples and then 17 pears.", 0.0),  # no anchor: a stray number is not an answer
    ("42", "<think>I think it is 42</think>", 0.0),  # nothing after the CoT
    ("42", r"asdf }{ \boxed{", 0.0),
    ("42", r"\boxed{}", 0.0),
    ("42", r"<think>x</think> \boxed{42", 0.0),  # truncated box
    ("42", "<think>" + "blah " * 200, 0.0),
    ("42", "blah " * 1500 + "The final answer is 42.", 1.0),  # long, untagged: parsed uncached
    # LENIENT: math-verify lets an interval's endpoints match a two-element set; kept as is, a
    # GRPO group is rarely split by it.
    ("(0,1)", boxed(r"\{0,1\}"), 1.0),
]


def test_table_is_big_enough():
    assert len(TABLE) >= 40


@pytest.mark.parametrize("solution,completion,expected", TABLE, ids=[f"row{i}" for i in range(len(TABLE))])
def test_accuracy_table(solution, completion, expected):
    accuracy = load_reward("accuracy")
    assert accuracy(prompts=["q"], completions=[completion], solution=[solution]) == [expected]


def test_unparseable_gold_gives_none():
    accuracy = load_reward("accuracy")
    assert accuracy(prompts=["q", "q"], completions=[boxed("1"), boxed("1")], solution=["garbage ))))", ""]) == [None, None]


def test_missing_solution_column_names_it():
    with pytest.raises(ValueError, match="solution"):
        load_reward("accuracy")(prompts=["q"], completions=["x"])


@pytest.mark.parametrize("n", ["0", "-5", "007", "42", " 7 ", "123456789012345678"])
def test_integer_shortcut_matches_math_verify(n):
    """The integer fast path builds what math-verify's own LaTeX parse builds."""
    ours = parse_answer("boxed", f"\\boxed{{{n}}}")
    theirs = parse(f"\\boxed{{{n}}}", extraction_config=BOXED_CONFIG, extraction_mode="first_match")
    assert [type(x) for x in ours] == [type(x) for x in theirs]
    assert ours == theirs


@pytest.mark.parametrize("gold,answer", [("5", "5"), ("5", "7"), ("-3", "3"), ("0", "0"), ("007", "7"), ("1000", "1,000")])
def test_integer_verdict_shortcut_matches_verify(gold, answer):
    """Two integers skip verify's simplify; the verdict is the one verify gives."""
    text = f"\\boxed{{{answer}}}"
    assert _verdict(gold, "boxed", text) == verify(parse_gold(gold), parse_answer("boxed", text))


SINGLE_BOX_ROWS = [
    r for r in TABLE if isinstance(r[1], str) and extract_answer(r[1])[0] == "boxed" and not extract_answer(r[1])[1].startswith("$")
]


@pytest.mark.parametrize("solution,completion,expected", SINGLE_BOX_ROWS)
def test_boxed_answers_agree_with_plain_math_verify(solution, completion, expected):
    """Where the completion has one box, our verdict is math-verify's on the extracted box and the
    delimited gold (independent of our caches and shortcuts)."""
    _, text = extract_answer(completion)
    gold_text = solution if re.search(r"(?<!\\)\$", solution) else f"$\\boxed{{{solution}}}$"
    gold = parse(gold_text)
    answer = parse(text, extraction_config=[LatexExtractionConfig(boxed_match_priority=0)])
    assert float(verify(gold, answer)) == expected


def test_final_boxed_handles_nesting_and_escaped_braces():
    assert final_boxed(r"so \boxed{\{1,2\}} done") == r"\boxed{\{1,2\}}"
    assert final_boxed(r"\boxed{\frac{1}{\boxed{2}}}") == r"\boxed{\frac{1}{\boxed{2}}}"
    assert final_boxed(r"\boxed{1}, \boxed{2} and \boxed{3}") == r"$\boxed{1}$, $\boxed{2}$, $\boxed{3}$"
    assert final_boxed("no box") is None


def test_batch_with_repeated_solutions_uses_one_gold():
    """A GRPO group repeats its solution G times; every sample is scored against it."""
    accuracy = load_reward("accuracy")
    completions = [boxed(a) for a in ["7", "7", "8", r"\frac{14}{2}"]]
    assert accuracy(prompts=["q"] * 4, completions=completions, solution=["7"] * 4) == [1.0, 1.0, 0.0, 1.0]
