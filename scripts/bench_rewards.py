"""Throughput of the accuracy reward on one CPU core (target: >= 500 completions/s for typical
answers), ours vs TRL's `accuracy_reward` (math-verify per completion, no caches) on the same data.

Workloads are GRPO-shaped: groups of G completions share a prompt and its solution; every completion
has an R1-style CoT of ~1.5 kB before the boxed answer. Caches are cleared before each measurement.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_rewards.py [--groups 64] [--group-size 16]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import time

COT = (
    "Let me think about this carefully. First, I restate the problem in my own words and list the "
    "quantities it gives. Then I set up the equation, simplify both sides, and check the result by "
    "substituting back. Step 1: collect like terms. Step 2: divide both sides by the coefficient. "
)


def _integer_task(rng):
    gold = rng.randint(2, 999)
    wrong = [gold + rng.choice([-2, -1, 1, 2, 10]), gold * 2]
    return str(gold), [str(gold)] * 3 + [f"{gold}.0"] + wrong, "integers"


def _fraction_task(rng):
    p, q = rng.randint(1, 40), rng.randint(41, 90)
    return rf"\frac{{{p}}}{{{q}}}", [rf"\frac{{{p}}}{{{q}}}"] * 3 + [rf"\dfrac{{{2 * p}}}{{{2 * q}}}", f"{p}/{q + 1}"], "fractions"


def _expression_task(rng):
    a = rng.randint(2, 9)
    return rf"{a}\sqrt{{2}}", [rf"{a}\sqrt{{2}}"] * 3 + [rf"\sqrt{{{2 * a * a}}}", rf"{a + 1}\sqrt{{2}}"], "surds"


def make_workload(kind: str, groups: int, group_size: int, seed: int = 0):
    """(prompts, completions, solutions). kind: "typical" (70% integer, 20% fraction, 10% surd
    answers; a group repeats a few distinct answers), "distinct-int" / "distinct-latex" (every
    answer differs: the caches never hit)."""
    rng = random.Random(seed)
    prompts, completions, solutions = [], [], []
    serial = 0
    for g in range(groups):
        if kind == "typical":
            r = rng.random()
            task = _integer_task if r < 0.7 else _fraction_task if r < 0.9 else _expression_task
            gold, answers, _ = task(rng)
        for _ in range(group_size):
            serial += 1
            if kind == "typical":
                ans = rng.choice(answers)
            elif kind == "distinct-int":
                gold, ans = str(g), str(serial)
            else:
                gold, ans = rf"\frac{{{g + 1}}}{{97}}", rf"\frac{{{serial}}}{{{serial + 7}}}"
            cot = COT * rng.randint(3, 6)
            completions.append(f"<think>{cot}</think>\nSo the final answer is $\\boxed{{{ans}}}$.")
            prompts.append(f"problem {g}")
            solutions.append(gold)
    return prompts, completions, solutions


def clear_caches():
    from r1pipe.rewards import math as acc

    for fn in (acc.parse_gold, acc.parse_answer, acc._verdict):
        fn.cache_clear()


def measure(fn, prompts, completions, solutions, batch: int):
    clear_caches()
    start = time.perf_counter()
    out = []
    for i in range(0, len(completions), batch):
        out += fn(prompts=prompts[i:i + batch], completions=completions[i:i + batch], solution=solutions[i:i + batch])
    return time.perf_counter() - start, out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", type=int, default=64)
    ap.add_argument("--group-size", type=int, default=16)
    ap.add_argument("--batch", type=int, default=256, help="completions per reward call (one GRPO step's batch)")
    ap.add_argument("--no-trl", action="store_true", help="skip the TRL peer")
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core, as the target says

    from r1pipe.rewards import load_reward

    ours = load_reward("accuracy")
    peers = [("r1pipe accuracy", ours, False)]
    if not args.no_trl:
        try:
            from trl.rewards import accuracy_reward as trl_accuracy

            peers.append(("TRL accuracy_reward", trl_accuracy, True))
        except ImportError as e:
            print(f"(TRL peer skipped: {e})")

    # One-time costs (regex compiles, sympy's lazy imports on the first LaTeX parse) are paid once
    # per process, not per step: pay them before timing, on answers the workloads do not use.
    warm = [r"\boxed{1}", r"\boxed{\frac{1}{3}}", r"\boxed{2\sqrt{3}}", r"\boxed{5\text{ cm}}", "answer: 4"]
    for name, fn, chat in peers:
        comps = [[{"role": "assistant", "content": c}] for c in warm] if chat else warm
        fn(prompts=["warm-up"] * len(warm), completions=comps, solution=[r"\frac{1}{3}"] * len(warm))
    print(f"# accuracy reward throughput, 1 core of {platform.processor() or platform.machine()}, "
          f"python {platform.python_version()}, {time.strftime('%Y-%m-%d')}")
    print(f"# {args.groups} groups x {args.group_size} completions, {args.batch} per call, caches cleared per row\n")
    print(f"| workload | scorer | completions | seconds | completions/s | mean reward |")
    print(f"|---|---|---|---|---|---|")
    for kind in ("typical", "distinct-int", "distinct-latex"):
        prompts, completions, solutions = make_workload(kind, args.groups, args.group_size)
        results = {}
        for name, fn, chat in peers:
            comps = [[{"role": "assistant", "content": c}] for c in completions] if chat else completions
            seconds, out = measure(fn, prompts, comps, solutions, args.batch)
            results[name] = out
            mean = sum(v for v in out if v is not None) / max(1, sum(v is not None for v in out))
            print(f"| {kind} | {name} | {len(completions)} | {seconds:.2f} | {len(completions) / seconds:.0f} | {mean:.3f} |")
        if len(results) == 2:
            a, b = results.values()
            agree = sum(x == y for x, y in zip(a, b)) / len(a)
            print(f"| {kind} | verdict agreement ours vs TRL | | | | {agree:.3f} |")


if __name__ == "__main__":
    main()
