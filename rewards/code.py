"""The code accuracy reward (spec section 3: "code is checked by running test cases"): the last
Python block of the completion's answer runs in the sandbox (rewards/sandbox.py) on the dataset's
test cases; the reward is the fraction passed (or all-or-nothing).

Test columns, first present wins: `test_cases` (a list of {"input", "output"} stdin/stdout pairs per
sample), `verification_info` (open-r1's {"language", "test_cases"} dict), `tests` (Python asserts
appended to the program; one run that must exit 0).
"""

from __future__ import annotations

import logging
import re
from concurrent.futures import ThreadPoolExecutor

from .registry import register
from .sandbox import SandboxLimits, run_in_sandbox
from .text import completion_text, split_reasoning

log = logging.getLogger(__name__)
_FENCE = re.compile(r"```[ \t]*(?P<lang>[\w+-]*)[ \t]*\n(?P<code>.*?)```", re.S)
_PYTHON_TAGS = ("python", "py", "python3")


def extract_code(text: str) -> str | None:
    """The last ```python block of the answer part (after `</think>`; the whole text if there is
    none); else the last untagged block. None when there is no code block."""
    _cot, answer = split_reasoning(text)
    region = answer if answer.strip() else text
    blocks = [(m.group("lang").lower(), m.group("code")) for m in _FENCE.finditer(region)]
    for wanted in (_PYTHON_TAGS, ("",)):
        tagged = [code for lang, code in blocks if lang in wanted]
        if tagged:
            return tagged[-1]
    return None


def same_output(got: str, expected: str) -> bool:
    """Judge-style comparison: trailing spaces on each line and trailing blank lines do not matter."""
    norm = lambda s: "\n".join(line.rstrip() for line in s.strip().splitlines())  # noqa: E731
    return norm(got) == norm(expected)


def _sample_tests(i: int, test_cases, verification_info, tests):
    """(stdins, expected outputs or None, assert code or None) for sample i."""
    if test_cases is not None:
        cases = test_cases[i]
    elif verification_info is not None:
        info = verification_info[i] or {}
        language = str(info.get("language", "python")).lower()
        if language not in _PYTHON_TAGS:
            raise ValueError(f"verification_info[{i}].language is {language!r}; the sandbox runs python only")
        cases = info.get("test_cases") or []
    else:
        return [""], None, tests[i] or ""
    stdins = [str(c.get("input", "")) for c in cases]
    expected = [str(c.get("output", "")) for c in cases]
    return stdins, expected, None


def score_program(code: str, stdins, expected, asserts, limits: SandboxLimits, all_or_nothing: bool) -> float | None:
    program = code if asserts is None else f"{code}\n\n{asserts}\n"
    result = run_in_sandbox(program, stdins, limits)
    if result.error and not result.cases and not result.timed_out:
        log.warning("code_execution: sandbox failed: %s", result.error)
        return None  # the sandbox broke, not the program: no signal either way
    if expected is None:
        passed = [bool(result.cases) and result.cases[0].ok]
    else:
        passed = [i < len(result.cases) and result.cases[i].ok and same_output(result.cases[i].stdout, want)
                  for i, want in enumerate(expected)]
    if not passed:
        return 0.0
    if all_or_nothing:
        return float(all(passed))
    return sum(passed) / len(passed)


@register("code_execution")
def code_execution_reward(
    prompts=None,
    completions=(),
    test_cases=None,
    verification_info=None,
    tests=None,
    all_or_nothing: bool = False,
    case_timeout_s: float = 4.0,
    memory_mb: int = 1024,
    max_parallel: int = 2,
    **_,
) -> list[float | None]:
    """Fraction of test cases the completion's program passes (0.0 without a code block)."""
    if test_cases is None and verification_info is None and tests is None:
        raise ValueError("code_execution needs a dataset column 'test_cases', 'verification_info' or 'tests'")
    jobs = []
    for i, c in enumerate(completions):
        stdins, expected, asserts = _sample_tests(i, test_cases, verification_info, tests)
        jobs.append((extract_code(completion_text(c)), stdins, expected, asserts))

    def score(job):
        code, stdins, expected, asserts = job
        if code is None or (expected is not None and not expected):
            return 0.0
        limits = SandboxLimits(case_wall_s=case_timeout_s, wall_s=case_timeout_s * len(stdins) + 10.0, memory_mb=memory_mb)
        return score_program(code, stdins, expected, asserts, limits, all_or_nothing)

    with ThreadPoolExecutor(max_workers=max(1, max_parallel)) as ex:
        return list(ex.map(score, jobs))
