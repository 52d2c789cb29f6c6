"""Shape rewards of the R1 output format: `format` (the CoT inside `<think>…</think>`, then an
answer), `tag_count` (partial credit per well-used tag) and `reasoning_steps` (explicit steps).

They read only the completion text (rewards/text.py); none needs a dataset column. A chat template
that opens `<think>` in the prompt is honoured: the completion then starts inside the CoT.
"""

from __future__ import annotations

import re

from .registry import register
from .text import ANSWER_CLOSE, ANSWER_OPEN, THINK_CLOSE, THINK_OPEN, completion_text, prompt_text, split_reasoning

_TAGGED_ANSWER = re.compile(r"\s*<answer>(?P<answer>.*?)</answer>\s*", re.S)
# A step marker opens a line: "Step 3", "3." / "3)", a bullet, or an ordinal transition word.
_STEP = re.compile(
    r"(?im)^[ \t]*(?:step\s*\d+|\d+[.)][ \t]|[-*\u2022][ \t]|(?:first|second|third|next|then|finally)\b[,:]?)"
)


def _with_prefilled_think(prompt, text: str, think_prefilled: bool = False) -> str:
    """Put back a `<think>` that the chat template already wrote: seen at the end of a text prompt,
    or declared with think_prefilled=True (a chat prompt's generation header is not in its messages)."""
    opened = think_prefilled or prompt_text(prompt).rstrip().endswith(THINK_OPEN)
    if opened and THINK_OPEN not in text:
        return THINK_OPEN + text
    return text


def follows_format(text: str, answer_tag: bool = False) -> bool:
    """`<think>` CoT `</think>` answer: each think tag exactly once, the CoT first and non-empty,
    a non-empty answer after it; with answer_tag the answer must be exactly one `<answer>…</answer>`."""
    if text.count(THINK_OPEN) != 1 or text.count(THINK_CLOSE) != 1:
        return False
    if not text.lstrip().startswith(THINK_OPEN) or text.find(THINK_CLOSE) < text.find(THINK_OPEN):
        return False
    cot, answer = split_reasoning(text)
    if not cot.strip() or not answer.strip():
        return False
    if answer_tag:
        m = _TAGGED_ANSWER.fullmatch(answer)
        return bool(m and m.group("answer").strip()) and answer.count(ANSWER_OPEN) == 1
    return True


@register("format")
def format_reward(prompts=None, completions=(), answer_tag: bool = False, think_prefilled: bool = False, **_) -> list[float]:
    """1.0 when the completion follows the R1 format (see follows_format), else 0.0."""
    prompts = prompts if prompts is not None else [None] * len(completions)
    return [
        float(follows_format(_with_prefilled_think(p, completion_text(c), think_prefilled), answer_tag))
        for p, c in zip(prompts, completions)
    ]


@register("tag_count")
def tag_count_reward(
    prompts=None, completions=(), tags=(THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE), think_prefilled: bool = False, **_
) -> list[float]:
    """Partial credit toward the format: 1/len(tags) for each tag that appears exactly once, so a
    policy that has learnt some of the tags still sees a gradient toward the rest."""
    prompts = prompts if prompts is not None else [None] * len(completions)
    out = []
    for p, c in zip(prompts, completions):
        text = _with_prefilled_think(p, completion_text(c), think_prefilled)
        out.append(sum(text.count(tag) == 1 for tag in tags) / len(tags))
    return out


@register("reasoning_steps")
def reasoning_steps_reward(prompts=None, completions=(), target_steps: int = 3, **_) -> list[float]:
    """min(1, steps / target_steps), counting step markers that open a line of the CoT."""
    if target_steps < 1:
        raise ValueError(f"reasoning_steps: target_steps={target_steps}; expected an integer >= 1")
    out = []
    for c in completions:
        cot, _answer = split_reasoning(completion_text(c))
        out.append(min(1.0, len(_STEP.findall(cot)) / target_steps))
    return out
