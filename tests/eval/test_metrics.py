"""pass@k against the closed form and brute-force subset counting, maj@k on hand-made votes, the
math-verify answer key against math-verify's own equivalence, and `summarise` on hand-made records."""

from __future__ import annotations

import itertools
from fractions import Fraction
from math import comb

import pytest

from r1pipe.evaluate import default_ks, maj_at_k, majority_is_correct, markdown_table, pass_at_k, summarise
from r1pipe.generation import answer_classes, answer_key


@pytest.mark.parametrize("n", [1, 2, 5, 8, 16])
def test_pass_at_k_matches_closed_form(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            exact = 1 - Fraction(comb(n - c, k), comb(n, k))
            assert pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-12), (n, c, k)


def test_pass_at_k_is_the_chance_a_random_k_subset_holds_a_correct_sample():
    outcomes = [True, False, False, True, False, False]  # n = 6, c = 2
    for k in range(1, 7):
        subsets = list(itertools.combinations(outcomes, k))
        brute = sum(any(s) for s in subsets) / len(subsets)
        assert pass_at_k(6, 2, k) == pytest.approx(brute, abs=1e-12)


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError, match="0 <= c <= n"):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_majority_vote_hand_cases():
    assert majority_is_correct(["3", "3", "5"], [True, True, False])
    assert not majority_is_correct(["5", "5", "3"], [False, False, True])
    assert majority_is_correct(["5", "3"], [True, False])  # tie: the answer seen first wins
    assert not majority_is_correct(["3", "5"], [False, True])
    assert majority_is_correct([None, None, "7"], [False, False, True])  # no answer casts no vote
    assert not majority_is_correct([None, None], [False, False])


def test_maj_at_k_averages_disjoint_blocks():
    keys = ["1", "1", "2", "9", "9", "2", "2", "1"]
    correct = [k == "2" for k in keys]
    assert maj_at_k(keys, correct, 1) == pytest.approx(3 / 8)  # maj@1 = pass@1
    # blocks of 2: (1,1) wrong, (2,9) right (tie, 2 first), (9,2) wrong, (2,1) right
    assert maj_at_k(keys, correct, 2) == pytest.approx(0.5)
    assert maj_at_k(keys, correct, 4) == pytest.approx(0.5)  # (1,1,2,9) wrong, (9,2,2,1) right
    assert maj_at_k(keys, correct, 8) == 0.0  # 1 and 2 tie at 3 votes; 1 came first
    with pytest.raises(ValueError):
        maj_at_k(keys, correct, 9)


def test_default_ks():
    assert default_ks(1) == [1]
    assert default_ks(8) == [1, 2, 4, 8]
    assert default_ks(6) == [1, 2, 4, 6]


PAIRS = [
    ("<think>a</think>\\boxed{21}", "<think>b</think>\\boxed{21.0}"),
    ("\\boxed{\\frac{1}{2}}", "\\boxed{0.5}"),
    ("\\boxed{1,2}", "\\boxed{2,1}"),
    ("\\boxed{21}", "\\boxed{12}"),
    ("<think>x</think>The answer is $4$", "\\boxed{4}"),
    ("\\boxed{x^2}", "\\boxed{x*x}"),
]


@pytest.mark.parametrize("a,b", PAIRS)
def test_vote_classes_group_what_math_verify_calls_equal(a, b):
    from math_verify import parse, verify

    same = verify(parse(a), parse(b))
    classes = answer_classes([a, b])
    assert (classes[0] == classes[1]) == same, (answer_key(a), answer_key(b))


def test_vote_classes_of_a_group():
    texts = ["\\boxed{3}", "no answer here", "\\boxed{3.0}", "\\boxed{4}", "\\boxed{\\frac{6}{2}}"]
    assert answer_classes(texts) == [0, None, 0, 1, 0]


def test_answer_key_without_answer_is_none():
    assert answer_key("<think>2+2=4</think>") is None
    assert answer_key("") is None
    assert answer_key("<think>a</think>\\boxed{foo bar}") == answer_key("\\boxed{foo  bar}")


def _rec(correct, fmt=True, answer="1", n_tokens=10, truncated=False, rewards=None):
    return {"correct": correct, "format_ok": fmt, "answer": answer, "n_tokens": n_tokens, "truncated": truncated,
            "rewards": rewards if rewards is not None else {"accuracy": None if correct is None else float(correct)}}


def test_summarise_hand_made():
    groups = [
        [_rec(True, n_tokens=4), _rec(False, fmt=False, answer="2", n_tokens=8), _rec(True, n_tokens=6), _rec(False, answer="2", n_tokens=2)],
        [_rec(False, answer="5")] * 4,
        [_rec(None, answer=None, truncated=True)] * 4,  # no checkable reference: left out of accuracy
    ]
    s = summarise(groups, ks=[1, 2, 4], buckets=["a", "b", "b"])
    assert s["n_prompts"] == 3 and s["n_samples"] == 12 and s["n_unscored_prompts"] == 1
    assert s["pass@1"] == pytest.approx((2 / 4 + 0) / 2)
    assert s["pass@k"]["2"] == pytest.approx((1 - comb(2, 2) / comb(4, 2)) / 2)
    assert s["pass@k"]["4"] == pytest.approx(0.5)
    # prompt 1 votes "1" (2 votes, seen first) vs "2" (2 votes): right; prompt 2 wrong
    assert s["maj@k"]["4"] == pytest.approx(0.5)
    assert s["format_rate"] == pytest.approx(11 / 12)
    assert s["mean_length"] == pytest.approx((4 + 8 + 6 + 2 + 8 * 10) / 12)
    assert s["truncated_rate"] == pytest.approx(4 / 12)
    assert s["rewards"]["accuracy"] == pytest.approx(2 / 8)
    assert s["pass@1_by_bucket"] == {"a": {"n_prompts": 1, "pass@1": 0.5}, "b": {"n_prompts": 1, "pass@1": 0.0}}
    table = markdown_table([{"name": "grpo", "data": "d", **s}])
    assert "| grpo | d | 4 | 25.0 | 50.0 (k=4) | 50.0 (k=4) | 91.7 | 8.3 |" in table
