"""Reading completions: plain text out of strings or chat messages, the CoT / final-answer split of
the R1 output format, and a script-aware word splitter.

Every built-in reward reads completions through these helpers, so the meaning of "the CoT" and
"the final answer" is defined once (spec section 1: `<think>…</think>` then an answer or `<answer>…</answer>`).
"""

from __future__ import annotations

import re

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.S)
# One "word" is a run of letters of one alphabetic script, or a single CJK ideograph / kana /
# Hangul syllable (those scripts do not separate words by spaces, so a character is the unit).
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
_WORD = re.compile(rf"[{_CJK}]|[^\W\d_{_CJK}]+")


def completion_text(completion) -> str:
    """The generated text of one completion: a string, or TRL's chat form (a list of messages, or
    one message dict) where the assistant messages' contents are joined."""
    if completion is None:
        return ""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    parts = []
    for message in completion:
        if isinstance(message, str):
            parts.append(message)
            continue
        if message.get("role", "assistant") != "assistant":
            continue
        content = message.get("content") or ""
        if isinstance(content, list):  # multimodal content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        parts.append(content)
    return "".join(parts)


def prompt_text(prompt) -> str:
    """The prompt as text (chat prompts: all message contents joined), for rewards that look at it."""
    if prompt is None:
        return ""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, dict):
        prompt = [prompt]
    return "".join(str(m.get("content") or "") if isinstance(m, dict) else str(m) for m in prompt)


def split_reasoning(text: str) -> tuple[str, str]:
    """(CoT, answer part). The CoT ends at the last `</think>`; without one the whole text is CoT
    (a truncated or unformatted completion has no final answer part)."""
    close = text.rfind(THINK_CLOSE)
    if close < 0:
        cot, answer = text, ""
    else:
        cot, answer = text[:close], text[close + len(THINK_CLOSE):]
    start = cot.find(THINK_OPEN)
    if start >= 0:
        cot = cot[start + len(THINK_OPEN):]
    return cot, answer


def final_answer_region(text: str) -> tuple[str, bool]:
    """(text holding the final answer, whether it came from `<answer>` tags).

    The last `<answer>…</answer>` wins; else the text after the last `</think>`; else everything
    (models trained without the format still box their answer somewhere)."""
    tagged = _ANSWER_TAG.findall(text) if ANSWER_OPEN in text else None  # `in` is much faster than the scan
    if tagged:
        return tagged[-1], True
    close = text.rfind(THINK_CLOSE)
    if close >= 0:
        return text[close + len(THINK_CLOSE):], False
    return text, False


def words(text: str) -> list[str]:
    """Script-aware words: alphabetic runs (Latin, Cyrillic, …) and single CJK characters.
    Digits, punctuation and underscores are not words."""
    return _WORD.findall(text)


def column(columns: dict, name: str, n: int, default=None) -> list:
    """A per-sample column as a list of length n; a scalar (e.g. a reward kwarg) is broadcast."""
    value = columns.get(name, default)
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"column {name!r} has {len(value)} values for {n} completions")
        return list(value)
    return [value] * n
