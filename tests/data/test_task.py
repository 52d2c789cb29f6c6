"""The embedded arithmetic task: deterministic, splits never overlap, every chain of thought is right
(checked with Python's own eval and with math-verify's answer extraction), knobs are honoured."""

import re

import pytest

from r1pipe.data import task
from r1pipe.data.tokenizer import load_tiny_tokenizer

CONFIGS = [
    task.ArithConfig(),
    task.ArithConfig(min_ops=1, max_ops=4, ops="+-*/", paren_prob=0.6, allow_negative=True, max_value=200),
    task.ArithConfig(min_ops=2, max_ops=2, max_operand=20, ops="*/", max_value=400),
]
STEP = re.compile(r"^(-?\d+)([-+*/])(-?\d+)=(-?\d+)$")
BOXED = re.compile(r"^<think>(.*)</think>\\boxed\{(-?\d+)\}$", re.S)


def test_rows_are_deterministic_and_seed_dependent():
    assert task.arith_rows(200, "train", 7) == task.arith_rows(200, "train", 7)
    assert task.arith_rows(200, "train", 7) != task.arith_rows(200, "train", 8)
    assert task.general_rows(50, "dev", 1) == task.general_rows(50, "dev", 1)
    assert task.alignment_rows(40, "train", 2) == task.alignment_rows(40, "train", 2)


@pytest.mark.parametrize("config", CONFIGS)
def test_splits_never_overlap(config):
    by_split = {s: task.arith_rows(n, s, 0, config) for s, n in [("train", 1000), ("dev", 200), ("test", 250)]}
    for rows in by_split.values():
        assert len({r["prompt"] for r in rows}) == len(rows)  # deduplicated within a split
    prompts = {s: {r["prompt"] for r in rows} for s, rows in by_split.items()}
    ids = {s: {r["id"] for r in rows} for s, rows in by_split.items()}
    for a, b in [("train", "test"), ("train", "dev"), ("dev", "test")]:
        assert not prompts[a] & prompts[b] and not ids[a] & ids[b]
    # A different seed for train draws other problems, still never a test one.
    other = {r["prompt"] for r in task.arith_rows(1000, "train", 99, config)}
    assert other != prompts["train"] and not other & prompts["test"]


@pytest.mark.parametrize("config", CONFIGS)
def test_cot_is_correct_by_independent_eval(config):
    for row in task.arith_rows(400, "train", 3, config):
        expected = eval(row["prompt"], {"__builtins__": {}})  # Python's own precedence and true division
        assert float(row["solution"]) == expected, row
        m = BOXED.match(row["cot"])
        assert m and m.group(2) == row["solution"], row
        steps = m.group(1).split("\n")
        assert len(steps) == row["difficulty"]
        assert config.min_ops <= row["difficulty"] <= config.max_ops
        for line in steps:
            a, op, b, c = STEP.match(line).groups()
            assert eval(f"({a}){op}({b})") == int(c), line  # each written step is true arithmetic
            assert abs(int(c)) <= config.max_value and (config.allow_negative or int(c) >= 0)
        assert steps[-1].endswith(f"={row['solution']}")
        operands = [int(x) for x in re.findall(r"\d+", row["prompt"])]
        assert max(operands) <= config.max_operand


@pytest.mark.parametrize("config", CONFIGS)
def test_rewrite_chain_does_one_operation_per_line(config):
    """chain="rewrite": line i is the expression with i operations done, in solve_steps' order; the
    value never changes, each line has one operator fewer, the last line is the answer."""
    config = task.ArithConfig(**{**config.__dict__, "chain": "rewrite"})
    n_ops = lambda text: len(re.findall(r"(?<=[\d)])[-+*/]", text))  # binary operators, not signs
    for row in task.arith_rows(300, "train", 5, config):
        m = BOXED.match(row["cot"])
        assert m and m.group(2) == row["solution"], row
        lines = m.group(1).split("\n")
        assert len(lines) == row["difficulty"] and lines[-1] == row["solution"]
        value = eval(row["prompt"], {"__builtins__": {}})
        previous = row["prompt"]
        for line, (_, _, _, result) in zip(lines, task.solve_steps(row["prompt"])):
            assert eval(line, {"__builtins__": {}}) == value, (row["prompt"], line)
            assert n_ops(line) == n_ops(previous) - 1, (previous, line)
            assert str(result) in line  # the result of this step's operation is written into the line
            previous = line
    # the same problems and splits as the "steps" chain: only the cot column differs
    plain = task.arith_rows(50, "dev", 1, task.ArithConfig(**{**config.__dict__, "chain": "steps"}))
    rewrite = task.arith_rows(50, "dev", 1, config)
    assert [r["prompt"] for r in plain] == [r["prompt"] for r in rewrite]
    assert task.rewrite_states("3+4*5-2") == ["3+20-2", "23-2", "21"]
    assert task.rewrite_states("(2+3)*4") == ["5*4", "20"]
    with pytest.raises(ValueError, match="chain"):
        task.ArithConfig(chain="tree")


def test_math_verify_reads_the_boxed_answer():
    from math_verify import parse, verify

    for row in task.arith_rows(30, "test", 0):
        assert verify(parse(row["solution"]), parse(row["cot"])), row
    wrong = task.arith_rows(1, "test", 0)[0]
    assert not verify(parse(str(int(wrong["solution"]) + 1)), parse(wrong["cot"]))


def test_rows_are_short_in_tokens_and_builtin_test_split_is_large():
    tok = load_tiny_tokenizer()
    for row in task.arith_rows(500, "train", 0) + task.general_rows(100, "train", 0):
        n = len(tok.encode(row["prompt"] + row["cot"], add_special_tokens=False))
        assert n < 64, row
    assert len(task.arith_rows(500, "test", 0)) == 500


def test_general_rows_answer_their_instruction():
    for row in task.general_rows(200, "train", 0):
        instruction, word = row["prompt"].split(": ")
        answer = {"copy": word, "reverse": "".join(reversed(word)), "upper": word.upper(),
                  "first": word[:1], "last": word[-1:]}[instruction]
        assert row["solution"] == answer and row["cot"] == "<think></think>" + answer
        assert row["kind"] == "general"


def test_alignment_mix_and_its_disjointness():
    rows = task.alignment_rows(400, "train", 0, general_fraction=0.25)
    kinds = [r["kind"] for r in rows]
    assert kinds.count("general") == 100 and kinds.count("reasoning") == 300
    assert kinds[:100].count("general") not in (0, 100)  # shuffled, not two blocks
    test_prompts = {r["prompt"] for r in task.arith_rows(500, "test", 0)} | {
        r["prompt"] for r in task.general_rows(200, "test", 0)}
    assert not {r["prompt"] for r in rows} & test_prompts


def test_canonical_spelling_dedupes_redundant_parentheses():
    assert task.canonical("(3*4)+5") == "3*4+5" and task.canonical("3-(4+5)") == "3-(4+5)"
    assert task.arith_row("(3*4)+5")["id"] == task.arith_row("3*4+5")["id"]
    assert task.arith_row("8/2*3")["solution"] == "12"


def test_bad_knobs_and_exhausted_space_name_the_fix():
    with pytest.raises(ValueError, match="min_ops"):
        task.ArithConfig(min_ops=3, max_ops=2)
    with pytest.raises(ValueError, match="ops"):
        task.ArithConfig(ops="+%")
    with pytest.raises(ValueError, match="widen the config"):
        task.arith_rows(1000, "test", 0, task.ArithConfig(min_ops=1, max_ops=1))
    with pytest.raises(ValueError, match="unknown split 'valid'"):
        task.arith_rows(10, "valid")
    with pytest.raises(ValueError, match="not an exact division"):
        task.solve_steps("7/2")


@pytest.mark.parametrize("chain", task.CHAIN_FORMATS)
def test_cold_start_rows_mix_terse_and_full_chains_all_correct(chain):
    config = task.ArithConfig(chain=chain)
    rows = task.cold_start_rows(200, seed=4, config=config, terse_fraction=0.3)
    assert rows == task.cold_start_rows(200, seed=4, config=config, terse_fraction=0.3)
    styles = [r["cot_style"] for r in rows]
    assert styles.count("terse") == 60 and styles.count("full") == 140
    full = {r["prompt"]: r for r in task.arith_rows(200, "train", 4, config)}
    for row in rows:
        m = BOXED.match(row["cot"])
        assert m and m.group(2) == row["solution"] and float(row["solution"]) == eval(row["prompt"])
        if row["cot_style"] == "terse":  # one line: the whole expression at once, or only its final state
            assert m.group(1) == (row["solution"] if chain == "rewrite" else f"{row['prompt']}={row['solution']}")
        else:
            assert row["cot"] == full[row["prompt"]]["cot"]
    test_prompts = {r["prompt"] for r in task.arith_rows(500, "test", 0)}
    assert not {r["prompt"] for r in rows} & test_prompts


def test_base_corpus_holds_only_true_single_facts():
    docs = task.base_corpus(100, seed=0)
    assert docs == task.base_corpus(100, seed=0) and len(docs) == 100
    for doc in docs:
        assert "<" not in doc and "\\boxed" not in doc  # no output format before cold start
        for line in doc.split("\n"):
            a, op, b, c = STEP.match(line).groups()
            assert eval(f"({a}){op}({b})") == int(c), line
