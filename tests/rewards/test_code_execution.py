"""code_execution: completions' programs run in the sandbox on the dataset's test cases; hostile or
broken programs score 0, never crash the scorer."""

import pytest

from r1pipe.rewards import load_reward
from r1pipe.rewards.code import extract_code, same_output

ADD = "```python\nimport sys\na, b = map(int, sys.stdin.read().split())\nprint(a + b)\n```"
CASES = [{"input": "1 2", "output": "3"}, {"input": "40 2\n", "output": "42\n"}, {"input": "-1 1", "output": "0"}]


def answer(code_block: str) -> str:
    return f"<think>read two ints, print the sum</think>\nHere is the program:\n{code_block}"


def test_fraction_of_stdin_stdout_cases_passed():
    off_by_one = ADD.replace("print(a + b)", "print(a + b if a > 0 else a + b + 1)")
    completions = [answer(ADD), answer(off_by_one), "no code at all", answer("```python\nwhile True: pass\n```")]
    reward = load_reward("code_execution")
    tests = [CASES, CASES, CASES, CASES[:1]]  # one case for the endless loop: each costs a timeout
    out = reward(prompts=["q"] * 4, completions=completions, test_cases=tests, case_timeout_s=1.0)
    assert out == [1.0, pytest.approx(2 / 3), 0.0, 0.0]
    out = reward(prompts=["q"] * 2, completions=completions[:2], test_cases=[CASES] * 2, all_or_nothing=True)
    assert out == [1.0, 0.0]


def test_open_r1_verification_info_and_assert_tests():
    reward = load_reward("code_execution")
    info = {"language": "python", "test_cases": [{"input": "2 3", "output": "5", "type": "stdin_stdout"}]}
    assert reward(prompts=["q"], completions=[answer(ADD)], verification_info=[info]) == [1.0]
    func = "```python\ndef add(a, b):\n    return a + b\n```"
    wrong = "```python\ndef add(a, b):\n    return a - b\n```"
    tests = "assert add(1, 2) == 3\nassert add(-1, 1) == 0"
    assert reward(prompts=["q", "q"], completions=[answer(func), answer(wrong)], tests=[tests, tests]) == [1.0, 0.0]


def test_hostile_programs_score_zero():
    hostile = [
        "```python\nimport os\nwhile True:\n    try: os.fork()\n    except OSError: pass\n```",
        "```python\nx = bytearray(50 * 2**30)\nprint(3)\n```",
        "```python\nimport socket\nsocket.create_connection(('127.0.0.1', 22), timeout=1)\nprint(3)\n```",
        "```python\nimport os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nprint(3)\n```",
    ]
    reward = load_reward("code_execution")
    out = reward(prompts=["q"] * 4, completions=[answer(h) for h in hostile],
                 test_cases=[[{"input": "1 2", "output": "3"}]] * 4, case_timeout_s=1.0)
    assert out == [0.0, 0.0, 0.0, 0.0]


def test_extract_code_prefers_last_python_block_of_the_answer():
    text = "<think>```python\nprint('draft')\n```</think>```\nplain\n```\n```python\nprint('final')\n```"
    assert extract_code(text) == "print('final')\n"
    assert extract_code("<think>x</think>```\nonly plain\n```") == "only plain\n"
    assert extract_code("no code") is None


def test_output_comparison_ignores_trailing_whitespace_only():
    assert same_output("3  \n\n", "3")
    assert not same_output("3 4", "3  4")


def test_missing_test_column_names_the_columns():
    with pytest.raises(ValueError, match="test_cases"):
        load_reward("code_execution")(prompts=["q"], completions=[answer(ADD)])
