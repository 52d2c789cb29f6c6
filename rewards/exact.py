"""Exact-text answers: `exact_match` compares the answer part (after `</think>`, boxes unwrapped) with the
`solution` column as text; `task_accuracy` routes each row by its `kind` column: math-verify `accuracy`
for reasoning rows, exact match for "general" rows, whose words math-verify would read as symbol products
(a boxed `b*a` passes for `ab`)."""
from __future__ import annotations

from .math import accuracy_reward, boxed_contents
from .registry import register
from .text import completion_text, final_answer_region


def answer_text(completion) -> str:
    region, _ = final_answer_region(completion_text(completion))
    boxes = boxed_contents(region)
    return (boxes[-1][2] if boxes else region).strip()


@register("exact_match")
def exact_match_reward(prompts=None, completions=(), solution=None, **_) -> list[float]:
    """1.0 when the answer text equals the solution after stripping whitespace, else 0.0."""
    if solution is None:
        raise ValueError("exact_match reward needs the dataset column 'solution' (the reference answer)")
    return [float(answer_text(c) == str(s).strip()) for c, s in zip(completions, solution)]


@register("task_accuracy")
def task_accuracy_reward(prompts=None, completions=(), solution=None, kind=None, **columns) -> list[float | None]:
    """`accuracy` for reasoning rows, `exact_match` for rows whose `kind` is "general"."""
    kinds = kind if kind is not None else ["reasoning"] * len(completions)
    out: list[float | None] = [None] * len(completions)
    general = [i for i, k in enumerate(kinds) if k == "general"]
    other = [i for i, k in enumerate(kinds) if k != "general"]
    if general:
        scores = exact_match_reward(completions=[completions[i] for i in general], solution=[solution[i] for i in general])
        for i, v in zip(general, scores):
            out[i] = v
    if other:
        scores = accuracy_reward(completions=[completions[i] for i in other], solution=[solution[i] for i in other])
        for i, v in zip(other, scores):
            out[i] = v
    return out
