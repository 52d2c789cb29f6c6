"""exact_match / task_accuracy: general rows are compared as text, reasoning rows by math-verify."""
from r1pipe.rewards import load_reward


def test_exact_match_is_text_equality():
    fn = load_reward("exact_match")
    got = fn(completions=["<think></think>dcba", "<think></think>abcd", "<think>x</think>\\boxed{dcba}"],
             solution=["dcba", "dcba", "dcba"])
    assert got == [1.0, 0.0, 1.0]


def test_task_accuracy_routes_by_kind():
    fn = load_reward("task_accuracy")
    completions = ["<think></think>abcd", "<think>2*3=6</think>\\boxed{6}", "<think></think>\\boxed{6.0}"]
    got = fn(completions=completions, solution=["dcba", "6", "6"], kind=["general", "reasoning", "reasoning"])
    assert got == [0.0, 1.0, 1.0]
    # why general rows need it: math-verify reads letters as symbols, and products commute
    assert load_reward("accuracy")(completions=["<think></think>\\boxed{b*a}"], solution=["ab"]) == [1.0]
    assert fn(completions=["<think></think>\\boxed{b*a}"], solution=["ab"], kind=["general"]) == [0.0]
