"""The R1 accuracy reward: the completion's final answer checked against the dataset's `solution`
column with math-verify (spec section 3).

Answer location: the last `<answer>…</answer>`, else the text after `</think>`, else the whole
completion (rewards/text.py). Inside it the last `\\boxed{}` wins; boxes joined only by `,`/and/or
are one answer set. Parsing is the slow part, so gold solutions, extracted answers and verdicts are
cached: a GRPO group repeats one solution G times and few distinct answers.
"""

from __future__ import annotations

import logging
import re
import threading
from functools import lru_cache

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
from sympy import Integer

from .registry import register
from .text import completion_text, final_answer_region

# The gold is a bare answer or a worked solution: math-verify's defaults (LaTeX, then plain expressions).
GOLD_CONFIG = (LatexExtractionConfig(), ExprExtractionConfig())
# A boxed answer: boxes first. Free text without a box: only anchored answers ("the answer is $3$"),
# so a stray number in the reasoning is never taken for the answer.
BOXED_CONFIG = (LatexExtractionConfig(boxed_match_priority=0, try_extract_without_anchor=False),)
FREE_TEXT_CONFIG = (
    LatexExtractionConfig(boxed_match_priority=0, try_extract_without_anchor=False),
    ExprExtractionConfig(try_extract_without_anchor=False),
)
# `<answer>` content is the answer itself: no anchor needed.
TAGGED_CONFIG = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())

# math-verify times parsing and verification with signal.alarm (seconds), which only works in the
# main thread; elsewhere the runner's worker timeout is the guard.
PARSE_TIMEOUT_S, VERIFY_TIMEOUT_S = 5, 5
CACHE_SIZE = 1 << 14
# Longer unboxed answer texts are parsed uncached: they rarely repeat, and would bloat the caches.
MAX_CACHED_TEXT = 4096
MAX_CHAINED_BOXES = 6  # math-verify reads at most 1 + 5 joined LaTeX environments

_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")
_PLAIN_INT = re.compile(r"-?\d{1,18}")
_DELIMITED = re.compile(r"(?<!\\)\$|\\\(|\\\[|\\boxed|\\fbox")
_CHAIN_GAP = re.compile(r"(?:[\s$,;]|\\[()\[\]])*(?:and|or)?(?:[\s$,;]|\\[()\[\]])*")

logging.getLogger("math_verify.parser").setLevel(logging.ERROR)  # a timeout is a 0, not a log line
logging.getLogger("math_verify.grader").setLevel(logging.ERROR)


def _timeouts() -> tuple[int | None, int | None]:
    if threading.current_thread() is threading.main_thread():
        return PARSE_TIMEOUT_S, VERIFY_TIMEOUT_S
    return None, None


def boxed_contents(text: str) -> list[tuple[int, int, str]]:
    """(start, end, content) of every complete `\\boxed{…}` / `\\fbox{…}`; LaTeX's escaped braces
    `\\{ \\}` do not count for nesting. An unclosed (truncated) box is skipped."""
    found = []
    for m in _BOX.finditer(text):
        depth, i = 1, m.end()
        while i < len(text):
            ch = text[i]
            if ch == "\\":
                i += 2
                continue
            depth += (ch == "{") - (ch == "}")
            if depth == 0:
                found.append((m.start(), i + 1, text[m.end():i]))
                break
            i += 1
    # A box inside another box is part of the outer one's content.
    outer = []
    for span in found:
        if not outer or span[0] >= outer[-1][1]:
            outer.append(span)
    return outer


def final_boxed(region: str) -> str | None:
    """The LaTeX that holds the final boxed answer: the last box, or the last run of boxes joined
    only by commas/and/or (an answer set such as two roots), written so math-verify reads a set."""
    boxes = boxed_contents(region)
    if not boxes:
        return None
    chain = [boxes[-1]]
    for prev in reversed(boxes[:-1]):
        if len(chain) == MAX_CHAINED_BOXES or not _CHAIN_GAP.fullmatch(region[prev[1]:chain[0][0]]):
            break
        chain.insert(0, prev)
    contents = [c for _, _, c in chain]
    if len(contents) > 1 and not any(("$" in c or "\n" in c) for c in contents):
        return ", ".join(f"$\\boxed{{{c}}}$" for c in contents)
    return f"\\boxed{{{contents[-1]}}}"


@lru_cache(maxsize=CACHE_SIZE)
def parse_gold(solution: str):
    """The parsed reference answer (empty list when math-verify cannot read it).

    A worked solution (it has `$`, `\\(`, `\\[` or a box) is read with math-verify's defaults. A bare
    answer such as `\\{1,2\\}` or `[1, 3)` is read as if boxed, the way completions' answers are:
    math-verify finds LaTeX only inside delimiters, and would read a bare `[1, 3)` as just `3`."""
    if not _DELIMITED.search(solution):
        parsed = parse_answer("boxed", f"\\boxed{{{solution.strip()}}}")
        if parsed:
            return parsed
    return parse(solution, extraction_config=GOLD_CONFIG, parsing_timeout=_timeouts()[0])


@lru_cache(maxsize=CACHE_SIZE)
def parse_answer(kind: str, text: str):
    """Parse the extracted answer text; `kind` is "boxed", "tagged" or "free" (see module doc)."""
    if kind == "boxed":
        inner = text[len("\\boxed{"):-1] if text.startswith("\\boxed{") else None
        if inner is not None and _PLAIN_INT.fullmatch(inner.strip()):
            # An integer is what math-verify would build too (Integer, string); skipping its LaTeX
            # grammar is most of the throughput for typical answers. tests/rewards checks they agree.
            return [Integer(int(inner.strip())), inner.strip()]
        config = BOXED_CONFIG
    else:
        config = TAGGED_CONFIG if kind == "tagged" else FREE_TEXT_CONFIG
    return parse(text, extraction_config=config, extraction_mode="first_match", parsing_timeout=_timeouts()[0])


def extract_answer(text: str) -> tuple[str, str]:
    """(kind, text) of the final answer of a completion, the key the caches use."""
    region, tagged = final_answer_region(text)
    boxed = final_boxed(region)
    if boxed is not None:
        return "boxed", boxed
    return ("tagged", region.strip()) if tagged else ("free", region)


def _verdict_uncached(solution: str, kind: str, text: str) -> bool:
    gold = parse_gold(solution)
    answer = parse_answer(kind, text) if len(text) <= MAX_CACHED_TEXT else parse_answer.__wrapped__(kind, text)
    if not answer:
        return False
    if _single_integer(gold) and _single_integer(answer):
        # Two integers are equal or not; sympy's simplify(a - b) inside verify is the slow way to
        # learn it. tests/rewards checks this agrees with verify.
        return gold[0] == answer[0]
    return bool(verify(gold, answer, timeout_seconds=_timeouts()[1]))


_verdict = lru_cache(maxsize=CACHE_SIZE)(_verdict_uncached)


def _single_integer(parsed) -> bool:
    return len(parsed) == 2 and isinstance(parsed[0], Integer) and isinstance(parsed[1], str)


def is_correct(completion, solution: str) -> bool | None:
    """True/False, or None when the gold itself cannot be parsed (nothing to check against)."""
    # A gold that math-verify could only keep as raw text (its string fallback) checks nothing.
    if solution is None or not any(not isinstance(g, str) for g in parse_gold(str(solution))):
        return None
    kind, text = extract_answer(completion_text(completion))
    if not text.strip():
        return False
    verdict = _verdict if len(text) <= MAX_CACHED_TEXT else _verdict_uncached
    return verdict(str(solution), kind, text)


@register("accuracy")
def accuracy_reward(prompts=None, completions=(), solution=None, **_) -> list[float | None]:
    """1.0 if the final answer equals the `solution` column under math-verify, else 0.0; None where
    the solution is unparseable (TRL's convention: such a sample carries no signal)."""
    if solution is None:
        raise ValueError("accuracy reward needs the dataset column 'solution' (the reference answer)")
    if len(solution) != len(completions):
        raise ValueError(f"column 'solution' has {len(solution)} values for {len(completions)} completions")
    out = []
    for completion, sol in zip(completions, solution):
        verdict = is_correct(completion, sol)
        out.append(None if verdict is None else float(verdict))
    return out
