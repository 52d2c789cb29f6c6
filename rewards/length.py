"""Length-shaped rewards: `cosine_length` (correctness scaled by a cosine of the length, Yeo et al.
2025, "Demystifying Long Chain-of-Thought Reasoning") and `repetition_penalty` (repeated n-grams).

Length is counted in tokens when the trainer passes the `completion_ids` column (TRL does), else
in words (rewards/text.py). Correctness comes from the accuracy reward (rewards/math.py).
"""

from __future__ import annotations

import math
import re

from .math import is_correct
from .registry import register
from .text import completion_text, words

_MARKUP = re.compile(r"</?(?:think|answer)>|\\[A-Za-z]+")


def text_length(text: str) -> int:
    """Words of the text, not counting format tags and LaTeX commands (a stand-in for tokens)."""
    return len(words(_MARKUP.sub(" ", text)))


def cosine_schedule(length: float, max_len: float, value_at_zero: float, value_at_max: float) -> float:
    """value_at_max + ½(value_at_zero − value_at_max)(1 + cos(π·min(length, max_len)/max_len))."""
    progress = min(max(length, 0.0), max_len) / max_len
    return value_at_max + 0.5 * (value_at_zero - value_at_max) * (1.0 + math.cos(math.pi * progress))


@register("cosine_length")
def cosine_length_reward(
    prompts=None,
    completions=(),
    solution=None,
    completion_ids=None,
    max_len: int = 1000,
    min_value_correct: float = 0.5,
    max_value_correct: float = 1.0,
    min_value_wrong: float = -1.0,
    max_value_wrong: float = -0.5,
    **_,
) -> list[float | None]:
    """Correct answers earn more when short (max_value_correct at length 0, min_value_correct at
    max_len); wrong answers are punished less when long (min_value_wrong at 0, max_value_wrong at
    max_len), so a hard problem is worth thinking longer about. None where the solution is unparseable."""
    if solution is None:
        raise ValueError("cosine_length reward needs the dataset column 'solution' (the reference answer)")
    if max_len <= 0:
        raise ValueError(f"cosine_length: max_len={max_len}; expected a positive length")
    out = []
    for i, (c, sol) in enumerate(zip(completions, solution)):
        verdict = is_correct(c, sol)
        if verdict is None:
            out.append(None)
            continue
        length = len(completion_ids[i]) if completion_ids is not None else text_length(completion_text(c))
        if verdict:
            out.append(cosine_schedule(length, max_len, max_value_correct, min_value_correct))
        else:
            out.append(cosine_schedule(length, max_len, min_value_wrong, max_value_wrong))
    return out


def repeated_ngram_fraction(tokens: list[str], n: int) -> float:
    """1 − distinct n-grams / all n-grams (0 when shorter than one n-gram)."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


@register("repetition_penalty")
def repetition_penalty_reward(prompts=None, completions=(), ngram_size: int = 3, max_penalty: float = -1.0, **_) -> list[float]:
    """max_penalty × the fraction of repeated word n-grams: 0 for text without repeats, down to
    max_penalty for text that is one n-gram over and over."""
    if max_penalty > 0:
        raise ValueError(f"repetition_penalty: max_penalty={max_penalty}; expected a value <= 0")
    if ngram_size < 1:
        raise ValueError(f"repetition_penalty: ngram_size={ngram_size}; expected an integer >= 1")
    return [
        max_penalty * repeated_ngram_fraction([w.lower() for w in words(completion_text(c))], ngram_size)
        for c in completions
    ]
