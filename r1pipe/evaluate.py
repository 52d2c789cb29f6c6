"""`r1pipe eval`: sample n completions per held-out prompt and report pass@1 (mean over n), unbiased
pass@k, maj@k, format rate and mean completion length; writes per-sample jsonl, a summary json and a
markdown table (and with --plot, PNGs via `r1pipe.plots`).

The metrics are pure functions at the top; sampling and scoring live in `r1pipe.generation` (shared
with `r1pipe reject-sample`).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

from r1pipe.generation import (
    DEFAULT_SYSTEM_PROMPT,
    EVAL_TEMPERATURE,
    EVAL_TOP_P,
    add_sampling_args,
    answer_classes,
    answer_key,
    engine_from_args,
    is_full_marks,
    load_rows,
    open_engine,
    sample_and_score,
    sampling_from_args,
)
from r1pipe.rewards import RewardSpec

SUMMARY_FILE, SAMPLES_FILE, TABLE_FILE = "summary.json", "samples.jsonl", "summary.md"


# --- metrics ------------------------------------------------------------------------------------

def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one prompt with c correct among n samples: 1 - C(n-c, k) / C(n, k)
    (Chen et al. 2021), as a running product so large n never builds huge binomials."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def majority_is_correct(keys: list, correct: list[bool]) -> bool:
    """Majority vote over extracted answers: the most frequent non-None key wins, ties go to the key
    seen first; the vote is right when a sample giving that answer was judged correct. No answer at
    all counts as wrong."""
    counts = Counter(k for k in keys if k is not None)
    if not counts:
        return False
    top = max(counts.values())
    winner = next(k for k in keys if k is not None and counts[k] == top)
    return any(ok for k, ok in zip(keys, correct) if k == winner)


def maj_at_k(keys: list, correct: list[bool], k: int) -> float:
    """maj@k of one prompt from its n samples: the mean majority-vote correctness over the n // k
    disjoint blocks of k consecutive samples (samples are i.i.d., so every block is a fair draw)."""
    n = len(keys)
    if not 1 <= k <= n:
        raise ValueError(f"maj_at_k needs 1 <= k <= n, got k={k}, n={n}")
    blocks = [range(b * k, (b + 1) * k) for b in range(n // k)]
    return sum(majority_is_correct([keys[i] for i in blk], [correct[i] for i in blk]) for blk in blocks) / len(blocks)


def default_ks(n: int) -> list[int]:
    """1, 2, 4, ... up to n, and n itself."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]


def summarise(groups: list[list[dict]], ks: list[int] | None = None, buckets: list | None = None) -> dict:
    """The metrics of scored samples. `groups[p]` holds prompt p's n sample records (keys `correct`
    True/False/None, `format_ok`, `answer` (or `vote`, its equivalence class, if present), `n_tokens`,
    `truncated`, `rewards`). A prompt with any correctness None (no checkable reference, or the reward
    failed) is left out of pass@k and maj@k and counted in `n_unscored_prompts`; `buckets[p]` (e.g.
    the difficulty column) breaks pass@1 down."""
    if not groups or not groups[0]:
        raise ValueError("summarise: no samples to summarise")
    n = len(groups[0])
    if any(len(g) != n for g in groups):
        raise ValueError("summarise: every prompt needs the same number of samples")
    ks = sorted({k for k in (ks or default_ks(n)) if 1 <= k <= n})
    scored = [g for g in groups if all(s["correct"] is not None for s in g)]
    flat = [s for g in groups for s in g]
    out: dict = {"n": n, "n_prompts": len(groups), "n_samples": len(flat), "n_unscored_prompts": len(groups) - len(scored)}
    correct_counts = [sum(bool(s["correct"]) for s in g) for g in scored]
    out["pass@1"] = _mean([c / n for c in correct_counts])
    out["pass@k"] = {str(k): _mean([pass_at_k(n, c, k) for c in correct_counts]) for k in ks}
    out["maj@k"] = {str(k): _mean([maj_at_k([s.get("vote", s["answer"]) for s in g], [bool(s["correct"]) for s in g], k)
                                   for g in scored])
                    for k in ks}
    out["format_rate"] = _mean([float(bool(s["format_ok"])) for s in flat])
    out["mean_length"] = _mean([s["n_tokens"] for s in flat])
    out["truncated_rate"] = _mean([float(bool(s["truncated"])) for s in flat])
    labels = sorted({label for s in flat for label in s["rewards"]})
    out["rewards"] = {label: _mean([s["rewards"][label] for s in flat if s["rewards"].get(label) is not None])
                      for label in labels}
    if buckets is not None:
        by_bucket: dict = {}
        for g, b in zip(groups, buckets):
            if all(s["correct"] is not None for s in g):
                by_bucket.setdefault(str(b), []).append(sum(bool(s["correct"]) for s in g) / n)
        out["pass@1_by_bucket"] = {b: {"n_prompts": len(v), "pass@1": _mean(v)} for b, v in sorted(by_bucket.items())}
    return out


def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


# --- the eval job ----------------------------------------------------------------------------

def evaluate(model=None, data: str = "tiny_arith:test", *, engine=None, tokenizer=None, n: int = 8,
             ks: list[int] | None = None, temperature: float = EVAL_TEMPERATURE, top_p: float = EVAL_TOP_P,
             max_tokens: int | None = None, seed: int = 0, limit: int | None = None,
             rewards: list[str] | None = None, correct_reward: str = "accuracy", format_reward: str = "format",
             out_dir: str | Path | None = None, bucket_by: str | None = "difficulty", name: str | None = None,
             batch_prompts: int = 64, progress: bool = True, engine_kwargs: dict | None = None,
             system_prompt=DEFAULT_SYSTEM_PROMPT) -> dict:
    """Evaluate a checkpoint (`model`: a path; the engine is built here and released after) or an
    already-built `engine` (anything with the `generate(...) -> Rollouts` API; `model` then only names
    it). `correct_reward` decides pass@k/maj@k (full marks = correct), `format_reward` the format rate;
    `rewards` adds more rewards whose means are reported. Returns the summary dict; with `out_dir`
    also writes samples.jsonl, summary.json and summary.md there."""
    t0 = time.perf_counter()
    rows = load_rows(data, limit=limit)
    reward_names = list(dict.fromkeys([correct_reward, format_reward, *(rewards or [])]))
    correct_label, format_label = RewardSpec(correct_reward).column, RewardSpec(format_reward).column
    session = open_engine(model, engine=engine, tokenizer=tokenizer, **(engine_kwargs or {}))
    try:
        groups, stats = sample_and_score(
            session, rows, reward_names, n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
            seed=seed, batch_prompts=batch_prompts, progress=progress, desc=f"eval {name or session.name}",
            system_prompt=system_prompt)
    finally:
        session.close()
    records = []
    for row, group in zip(rows, groups):
        votes = answer_classes([s.completion for s in group])
        records.append([{**sample_record(row, s, correct_label, format_label), "vote": v} for s, v in zip(group, votes)])
    buckets = [row.get(bucket_by) for row in rows] if bucket_by and all(bucket_by in r for r in rows) else None
    summary = {"name": name or session.name, "model": session.name, "data": data, **summarise(records, ks, buckets)}
    summary.update(temperature=temperature, top_p=top_p, max_tokens=stats["max_tokens"], seed=seed,
                   generation_s=round(stats["generation_s"], 3), wall_s=round(time.perf_counter() - t0, 3))
    if out_dir is not None:
        write_outputs(Path(out_dir), summary, [r for group in records for r in group])
    return summary


def sample_record(row: dict, s, correct_label: str, format_label: str) -> dict:
    """The per-sample jsonl line: what was generated, how it scored, and the answer it voted for."""
    return {
        "id": s.prompt_id, "sample": s.sample_index, "prompt": row.get("prompt"), "solution": row.get("solution"),
        "completion": s.completion, "n_tokens": s.n_tokens, "finish_reason": s.finish_reason,
        "truncated": s.finish_reason == "length", "seed": s.seed, "answer": answer_key(s.completion),
        "correct": is_full_marks(s.rewards.get(correct_label)),
        "format_ok": bool(is_full_marks(s.rewards.get(format_label))), "rewards": s.rewards,
    }


def write_outputs(out_dir: Path, summary: dict, records: list[dict]) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"samples": out_dir / SAMPLES_FILE, "summary": out_dir / SUMMARY_FILE, "table": out_dir / TABLE_FILE}
    with paths["samples"].open("w") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    paths["summary"].write_text(json.dumps(summary, indent=2) + "\n")
    paths["table"].write_text(markdown_table([summary]) + "\n")
    return paths


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def markdown_table(summaries: list[dict]) -> str:
    """One row per summary (an eval, or a pipeline stage): pass@1, the largest pass@k and maj@k,
    format rate and mean length; rates in percent."""
    lines = ["| name | data | n | pass@1 % | pass@k % | maj@k % | format % | mean length | wall s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s in summaries:
        ks = sorted(int(k) for k in s.get("pass@k") or {})
        k = str(ks[-1]) if ks else None
        pass_k = f"{_pct(s['pass@k'][k])} (k={k})" if k else "n/a"
        maj_k = f"{_pct(s['maj@k'][k])} (k={k})" if k and k in (s.get("maj@k") or {}) else "n/a"
        length, wall = s.get("mean_length"), s.get("wall_s")
        lines.append(f"| {s.get('name', '')} | {s.get('data', '')} | {s.get('n', '')} | {_pct(s.get('pass@1'))} | "
                     f"{pass_k} | {maj_k} | {_pct(s.get('format_rate'))} | "
                     f"{'n/a' if length is None else f'{length:.1f}'} | {'' if wall is None else f'{wall:.1f}'} |")
    return "\n".join(lines)


# --- CLI ----------------------------------------------------------------------------------------

def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """`r1pipe eval CKPT --data FILE --n 8 [--plot]`."""
    p = subparsers.add_parser("eval", help="pass@1 / pass@k / maj@k, format rate and length of a checkpoint",
                              description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="checkpoint directory (config.json, safetensors, tokenizer)")
    p.add_argument("--data", default="tiny_arith:test",
                   help="prompts: a .jsonl/.parquet file or a builtin split such as tiny_arith:test (default)")
    p.add_argument("--n", type=int, default=8, help="samples per prompt (default 8)")
    p.add_argument("--k", default=None, help="comma-separated k for pass@k and maj@k (default 1,2,4,...,n)")
    p.add_argument("--out", default=None, help="output directory (default runs/eval/<checkpoint>-<data>)")
    p.add_argument("--name", default=None, help="row name in the table (default: the checkpoint path)")
    p.add_argument("--rewards", default="", help="extra rewards to report, comma-separated (registry names or plug-ins)")
    p.add_argument("--correct-reward", default="accuracy", help="reward whose full marks mean correct (default accuracy)")
    p.add_argument("--format-reward", default="format", help="reward whose full marks mean well-formatted (default format)")
    p.add_argument("--bucket-by", default="difficulty", help="column to break pass@1 down by (default difficulty)")
    p.add_argument("--plot", action="store_true", help="also write PNGs: pass@k curve, reward over steps, accuracy by stage")
    p.add_argument("--metrics", default=None,
                   help="a run's metrics.jsonl for the reward plot (default: CKPT/metrics.jsonl or CKPT/../metrics.jsonl)")
    p.add_argument("--stages", nargs="*", default=[],
                   help="earlier summaries for the accuracy-by-stage plot: eval summary.json files or a demo "
                        "summary.json with a 'stages' list; this eval is added as the last bar")
    add_sampling_args(p, EVAL_TEMPERATURE, EVAL_TOP_P)
    p.set_defaults(func=run_eval_cli)
    return p


def _default_out(model: str, data: str) -> Path:
    slug = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in Path(data).stem if ch)
    return Path("runs") / "eval" / f"{Path(model).resolve().name}-{slug}"


def run_eval_cli(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else _default_out(args.model, args.data)
    ks = [int(k) for k in args.k.split(",")] if args.k else None
    if ks and max(ks) > args.n:
        raise SystemExit(f"--k {args.k}: every k must be <= --n {args.n}")
    summary = evaluate(args.model, args.data, n=args.n, ks=ks, out_dir=out, name=args.name,
                       rewards=[r for r in args.rewards.split(",") if r], correct_reward=args.correct_reward,
                       format_reward=args.format_reward, bucket_by=args.bucket_by,
                       engine_kwargs=engine_from_args(args), **sampling_from_args(args))
    print(markdown_table([summary]))
    print(f"wrote {out / SAMPLES_FILE}, {out / SUMMARY_FILE}, {out / TABLE_FILE}")
    if args.plot:
        for path in write_plots(summary, out, args.model, args.metrics, args.stages):
            print(f"wrote {path}")
    return 0


def write_plots(summary: dict, out: Path, model: str | None = None, metrics: str | None = None,
                stage_files: list[str] = ()) -> list[Path]:
    """The --plot charts: pass@k/maj@k against k; reward over steps when a metrics.jsonl is named or
    sits in (or next to) the checkpoint; accuracy by stage over `stage_files` plus this eval."""
    from r1pipe import plots

    written = [plots.plot_pass_at_k(summary, out / "pass_at_k.png")]
    if metrics:
        candidates = [Path(metrics)]
    else:
        candidates = [Path(model) / "metrics.jsonl", Path(model).parent / "metrics.jsonl"] if model else []
    found = next((c for c in candidates if c.is_file()), None)
    if metrics and found is None:
        raise FileNotFoundError(f"--metrics {metrics}: no such file")
    if found is not None:
        written.append(plots.plot_reward_curve(found, out / "reward_curve.png"))
    stages = []
    for f in stage_files:
        loaded = json.loads(Path(f).read_text())
        stages.extend(loaded["stages"] if isinstance(loaded, dict) and "stages" in loaded else [loaded])
    written.append(plots.plot_accuracy_by_stage(stages + [summary], out / "accuracy_by_stage.png"))
    return written
