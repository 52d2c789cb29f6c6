"""The embedded verifiable task: seeded multi-step integer arithmetic ("3+4*5-2"), answer in \\boxed{}.

Rows are {"prompt", "solution", "cot", "id", "difficulty", "kind"}; `cot` is a correct step-by-step
chain for cold-start SFT, one line per operation: `<think>4*5=20\\n3+20=23\\n23-2=21</think>\\boxed{21}`
(ArithConfig.chain="steps") or `<think>3+20-2\\n23-2\\n21</think>\\boxed{21}` ("rewrite"). Splits are fixed by a
hash of the canonical expression, so train, dev and test can never share a problem whatever their sizes.
Also: "general" (non-reasoning) rows for the stage-3 mixture and the stage-4 alignment prompt mix.
Neighbours: `r1pipe.data.datasets` serves these as builtin datasets; `r1pipe.rewards` scores them.
"""

from __future__ import annotations

import ast
import hashlib
import operator
import random
import string
from dataclasses import dataclass

SPLITS = ("train", "dev", "test")
# Share of the problem space, by hash bucket out of 100, that each split may draw from.
_SPLIT_BUCKETS = {"test": range(0, 10), "dev": range(10, 15), "train": range(15, 100)}

_OPS = {ast.Add: ("+", operator.add), ast.Sub: ("-", operator.sub), ast.Mult: ("*", operator.mul),
        ast.FloorDiv: ("/", operator.floordiv)}
# Consecutive draws without a new valid problem after which the problem space counts as exhausted.
_GIVE_UP_AFTER_MISSES = 20_000
CHAIN_FORMATS = ("steps", "rewrite")


@dataclass(frozen=True)
class ArithConfig:
    """Difficulty knobs. `difficulty` of a row = its number of operations (= reasoning steps).

    Defaults are sized for the CPU demo: with operands 0-5 and results <= 30 a ~1M-parameter policy
    learns each step, so what RL can still improve is how reliably it chains them (operands 0-9 and
    results <= 99 left a small model failing at the arithmetic itself, where 200 GRPO steps gained
    almost nothing; measured, see the data report).
    """

    min_ops: int = 2
    max_ops: int = 3
    max_operand: int = 5  # operands drawn from [0, max_operand]
    ops: str = "+-*"  # any of "+-*/"; "/" only ever divides exactly
    paren_prob: float = 0.0  # chance of one non-redundant parenthesised group
    max_value: int = 30  # every intermediate result must satisfy |v| <= max_value
    allow_negative: bool = False  # allow negative intermediate results
    # How the chain of thought is written, one line per operation: "steps" writes the operation alone
    # ("4*5=20"), "rewrite" writes the whole expression with that operation done ("3+20-2"), so the
    # state the next step needs is on the page instead of held in the model's head.
    chain: str = "steps"

    def __post_init__(self):
        if not 1 <= self.min_ops <= self.max_ops:
            raise ValueError(f"ArithConfig: need 1 <= min_ops <= max_ops, got {self.min_ops}, {self.max_ops}")
        if not self.ops or set(self.ops) - set("+-*/"):
            raise ValueError(f"ArithConfig.ops must be a non-empty subset of '+-*/', got {self.ops!r}")
        if self.max_operand < 1 or self.max_value < 1:
            raise ValueError("ArithConfig.max_operand and max_value must be >= 1")
        if not 0.0 <= self.paren_prob <= 1.0:
            raise ValueError(f"ArithConfig.paren_prob must be in [0, 1], got {self.paren_prob}")
        if self.chain not in CHAIN_FORMATS:
            raise ValueError(f"ArithConfig.chain must be one of {', '.join(CHAIN_FORMATS)}, got {self.chain!r}")


def split_of(canonical: str) -> str:
    """The split a problem belongs to, from a stable hash of its canonical text (not Python's hash())."""
    bucket = int(hashlib.sha256(canonical.encode()).hexdigest()[:8], 16) % 100
    return next(name for name, buckets in _SPLIT_BUCKETS.items() if bucket in buckets)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")


def _render(operands: list[int], ops: list[str], group: tuple[int, int] | None) -> str:
    """Infix text; `group` = (first, last) operand index wrapped in parentheses."""
    out = []
    for i, value in enumerate(operands):
        if i:
            out.append(ops[i - 1])
        out.append(("(" if group and i == group[0] else "") + str(value) + (")" if group and i == group[1] else ""))
    return "".join(out)


def solve_steps(expr: str) -> list[tuple[int, str, int, int]]:
    """Evaluate `expr` one operation at a time in the usual order (innermost/leftmost, * and / first).

    Returns (left, op, right, result) per step. Raises ValueError on anything but integer arithmetic
    and on division that is not exact (the task's "/" means exact integer division).
    """
    steps: list[tuple[int, str, int, int]] = []

    def walk(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = walk(node.left), walk(node.right)
            symbol, fn = _OPS[type(node.op)]
            if symbol == "/" and (right == 0 or left % right):
                raise ValueError(f"{expr!r}: {left}/{right} is not an exact division")
            value = fn(left, right)
            steps.append((left, symbol, right, value))
            return value
        raise ValueError(f"{expr!r}: only integers, + - * / and parentheses are allowed")

    # "/" is parsed as floor division so the tree, precedence and associativity are Python's own.
    walk(ast.parse(expr.replace("/", "//"), mode="eval").body)
    return steps


def rewrite_states(expr: str, steps: list[tuple[int, str, int, int]] | None = None) -> list[str]:
    """The expression after each operation of `solve_steps`, in the same order, minimal parentheses:
    "3+4*5-2" -> ["3+20-2", "23-2", "21"]. The last state is the answer. `steps`: solve_steps(expr)
    when the caller has it already (it validates the expression and fixes the number of states)."""
    def reduce_one(node: ast.AST) -> tuple[ast.AST, bool]:
        # Post-order, like solve_steps: the first operation whose operands are both numbers goes first.
        if isinstance(node, ast.Constant):
            return node, False
        for side in ("left", "right"):
            child, done = reduce_one(getattr(node, side))
            if done:
                return ast.BinOp(**{"left": node.left, "op": node.op, "right": node.right, side: child}), True
        value = _OPS[type(node.op)][1](node.left.value, node.right.value)
        return ast.Constant(value), True

    tree = ast.parse(expr.replace("/", "//"), mode="eval").body
    states = []
    for _ in steps if steps is not None else solve_steps(expr):
        tree, _ = reduce_one(tree)
        states.append(ast.unparse(tree).replace(" ", "").replace("//", "/"))
    return states


def canonical(expr: str) -> str:
    """Minimal-parentheses spelling, so "(3*4)+5" and "3*4+5" are one problem."""
    return ast.unparse(ast.parse(expr.replace("/", "//"), mode="eval")).replace(" ", "").replace("//", "/")


def cot_text(steps: list[tuple[int, str, int, int]], rewritten: list[str] | None = None) -> str:
    """The cold-start chain of thought, one line per step, then the boxed answer: `a op b=c` lines, or
    the `rewritten` expression states (the "rewrite" chain) when given."""
    lines = "\n".join(rewritten if rewritten is not None else (f"{a}{op}{b}={c}" for a, op, b, c in steps))
    return f"<think>{lines}</think>\\boxed{{{steps[-1][3]}}}"


def _problem_id(kind: str, canon: str) -> str:
    return f"{kind}-{hashlib.sha256(canon.encode()).hexdigest()[:12]}"


def _draw_expression(rng: random.Random, cfg: ArithConfig) -> str:
    """One candidate expression text; `_arith_row_or_none` decides whether it is a valid problem."""
    n_ops = rng.randint(cfg.min_ops, cfg.max_ops)
    operands = [rng.randint(0, cfg.max_operand) for _ in range(n_ops + 1)]
    ops = [rng.choice(cfg.ops) for _ in range(n_ops)]
    group = None
    if n_ops >= 2 and rng.random() < cfg.paren_prob:
        first = rng.randint(0, n_ops - 1)
        last = rng.randint(first + 1, n_ops)
        group = None if (first, last) == (0, n_ops) else (first, last)
    return _render(operands, ops, group)


def _arith_row_or_none(expr: str, cfg: ArithConfig) -> dict | None:
    """The row for a drawn expression, or None when it breaks a constraint (the caller draws again)."""
    if "(" in expr and canonical(expr) != expr:  # redundant parentheses: same problem as without them
        return None
    try:
        steps = solve_steps(expr)
    except ValueError:
        return None
    for *_, value in steps:
        if abs(value) > cfg.max_value or (value < 0 and not cfg.allow_negative):
            return None
    return _row_from_steps(expr, steps, cfg.chain)


def arith_row(expr: str, chain: str = "steps") -> dict:
    """The row for one expression (also used by tests and by anyone with a hand-written problem)."""
    return _row_from_steps(canonical(expr), solve_steps(expr), chain)


def _row_from_steps(canon: str, steps: list[tuple[int, str, int, int]], chain: str) -> dict:
    cot = cot_text(steps, rewrite_states(canon, steps) if chain == "rewrite" else None)
    return {"prompt": canon, "solution": str(steps[-1][3]), "cot": cot,
            "id": _problem_id("arith", canon), "difficulty": len(steps), "kind": "reasoning"}


def _unique_rows(n: int, split: str, seed: int, draw, make_row, what: str, fewer_ok: bool = False) -> list[dict]:
    """Draw until n distinct valid problems of `split` are found; fail loudly if the space runs out.

    make_row(text) returns the row or None for an invalid draw. The split test runs first because
    it is a cheap hash and rejects most draws for the small splits.
    """
    _check_split(split)
    rng = random.Random(f"{what}:{split}:{seed}")  # str seeds hash with sha512: stable across runs
    seen: set[str] = set()
    rows: list[dict] = []
    misses = 0
    while len(rows) < n:
        text = draw(rng)
        row = None
        if text not in seen:
            seen.add(text)
            if split_of(text) == split:
                row = make_row(text)
        if row is None:
            misses += 1
            if misses > _GIVE_UP_AFTER_MISSES:
                if fewer_ok:
                    return rows
                raise ValueError(
                    f"{what}: found only {len(rows)} distinct {split} problems, asked for {n}; widen the "
                    "config (max_ops, max_operand, ops, max_value, allow_negative) or ask for fewer")
            continue
        misses = 0
        rows.append(row)
    return rows


def arith_rows(n: int, split: str = "train", seed: int = 0, config: ArithConfig = ArithConfig(),
               fewer_ok: bool = False) -> list[dict]:
    """n distinct arithmetic rows of `split`, deterministic in (n, split, seed, config).

    When the config's problem space holds fewer than n, raise (or, with fewer_ok, return all found).
    """
    return _unique_rows(n, split, seed, lambda rng: _draw_expression(rng, config),
                        lambda text: _arith_row_or_none(text, config), "arith", fewer_ok)


# --- non-reasoning rows (stage-3 mixture) and the stage-4 alignment mix ---------------------------

# Simple string tasks with one right answer: the tiny stand-in for R1's writing / QA / translation data.
GENERAL_TASKS = {
    "copy": lambda w: w,
    "reverse": lambda w: w[::-1],
    "upper": lambda w: w.upper(),
    "first": lambda w: w[0],
    "last": lambda w: w[-1],
}


def _draw_general(rng: random.Random) -> str:
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))
    return f"{rng.choice(sorted(GENERAL_TASKS))}: {word}"


def general_row(prompt: str) -> dict:
    """A non-reasoning row: R1 gives simple queries no chain of thought, so the think block is empty."""
    task, _, word = prompt.partition(": ")
    if task not in GENERAL_TASKS or not word:
        raise ValueError(f"general prompt {prompt!r}: expected '<task>: <word>' with task in {sorted(GENERAL_TASKS)}")
    answer = GENERAL_TASKS[task](word)
    return {"prompt": prompt, "solution": answer, "cot": f"<think></think>{answer}",
            "id": _problem_id("general", prompt), "difficulty": 0, "kind": "general"}


def general_rows(n: int, split: str = "train", seed: int = 0) -> list[dict]:
    """n distinct non-reasoning rows of `split` (same hash split rule as the arithmetic rows)."""
    return _unique_rows(n, split, seed, _draw_general, general_row, "general")


def alignment_rows(n: int, split: str = "train", seed: int = 0, general_fraction: float = 0.25,
                   config: ArithConfig = ArithConfig()) -> list[dict]:
    """Stage-4 prompts: rule-verifiable arithmetic ("reasoning") mixed with "general" prompts, shuffled."""
    if not 0.0 <= general_fraction <= 1.0:
        raise ValueError(f"general_fraction must be in [0, 1], got {general_fraction}")
    n_general = round(n * general_fraction)
    # Other seeds than the stage-1/2 sets of the same seed, so stage 4 brings new prompts.
    rows = arith_rows(n - n_general, split, seed + 1_000_003, config) + general_rows(n_general, split, seed + 1_000_003)
    random.Random(f"align:{split}:{seed}").shuffle(rows)
    return rows


# --- stage-0 "base" corpus ------------------------------------------------------------------------


def base_corpus(n_docs: int, seed: int = 0, config: ArithConfig = ArithConfig(), facts_per_doc: int = 8) -> list[str]:
    """Plain-text documents for pretraining the tiny base model: single arithmetic facts ("4*5=20"),
    one per line, taken from the steps of train-split problems and shuffled across problems.

    Like a real base model, it knows the arithmetic but has never seen the prompt/<think>/\\boxed{}
    format or a whole problem worked in order; that is left to cold-start SFT and RL.
    """
    rows = arith_rows(max(200, n_docs * facts_per_doc // 3), "train", seed + 2_000_029, config, fewer_ok=True)
    facts = sorted({f"{a}{op}{b}={c}" for row in rows for a, op, b, c in solve_steps(row["prompt"])})
    rng = random.Random(f"base:{seed}")
    return ["\n".join(rng.choice(facts) for _ in range(facts_per_doc)) for _ in range(n_docs)]


def terse_cot(row: dict, chain: str = "steps") -> str:
    """The short-cut chain: the whole expression answered in one line, no intermediate steps
    (`prompt=answer` in the "steps" format; just the final state, the answer, in the "rewrite" one)."""
    line = row["solution"] if chain == "rewrite" else f"{row['prompt']}={row['solution']}"
    return f"<think>{line}</think>\\boxed{{{row['solution']}}}"


def cold_start_rows(n: int, seed: int = 0, config: ArithConfig = ArithConfig(), terse_fraction: float = 0.5) -> list[dict]:
    """Cold-start SFT rows of mixed quality: a `terse_fraction` of them skip the intermediate steps.

    Every answer is still correct; only the reasoning is thinner. R1's cold-start set is small and
    uneven; here the unevenness is controlled, so RL has a better habit to discover (always write
    the steps, which a small model gets right far more often) and its gain is measurable.
    """
    if not 0.0 <= terse_fraction <= 1.0:
        raise ValueError(f"terse_fraction must be in [0, 1], got {terse_fraction}")
    rows = arith_rows(n, "train", seed, config)
    terse = set(random.Random(f"terse:{seed}").sample(range(n), round(n * terse_fraction)))
    return [{**row, "cot": terse_cot(row, config.chain), "cot_style": "terse"} if i in terse else {**row, "cot_style": "full"}
            for i, row in enumerate(rows)]
