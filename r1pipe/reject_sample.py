"""`r1pipe reject-sample`: stage 3's data (spec section 1): sample N completions per prompt, score them,
keep the accepted ones (`--keep correct|all|best`), drop CoT with mixed languages, over-long paragraphs
or code blocks, de-duplicate, and append jsonl rows (prompt, completion, rewards, model, seed, ...)
that `datasets.load_dataset("json", ...)` reads. Resumable: prompts already done are skipped.

The CoT filters and the keep rule are pure functions at the top; sampling and scoring come from
`r1pipe.generation`; the SFT stage reads the output file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from r1pipe.generation import (
    DEFAULT_SYSTEM_PROMPT,
    add_sampling_args,
    engine_from_args,
    is_full_marks,
    iter_scored_batches,
    load_rows,
    open_engine,
    prompt_id,
    render_prompt,
    sampling_from_args,
)
from r1pipe.rewards.language import SCRIPTS
from r1pipe.rewards.registry import RewardSpec
from r1pipe.rewards.text import split_reasoning, words

KEEP_RULES = ("correct", "all", "best")
_LATEX_COMMAND = re.compile(r"\\[A-Za-z]+")
_SINGLE_LATIN = re.compile(r"[A-Za-z]")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
_CODE_FENCE = re.compile(r"^[ \t]*(?:```|~~~)", re.M)
# Columns this module writes; an input column of the same name is not copied over them.
OUTPUT_COLUMNS = ("id", "prompt", "completion", "rewards", "reward", "model", "seed", "sample_seed", "sample")


# --- CoT filters --------------------------------------------------------------------------------

@dataclass(frozen=True)
class CotFilters:
    """R1's readability filters on the chain of thought (the text before `</think>`).

    language: the CoT's target language (a code of r1pipe.rewards.language.SCRIPTS).
    max_foreign_fraction: the most CoT words allowed in another script (0: any one rejects).
    max_paragraph_chars: the longest paragraph allowed (paragraphs are split at blank lines); 0 = off.
    drop_code_blocks: reject a CoT that holds a fenced code block (``` or ~~~).
    drop_truncated: reject completions cut off by the token budget (they have no final answer).
    """

    language: str = "en"
    max_foreign_fraction: float = 0.0
    max_paragraph_chars: int = 2000
    drop_code_blocks: bool = True
    drop_truncated: bool = True

    def __post_init__(self):
        if self.language not in SCRIPTS:
            raise ValueError(f"--language {self.language!r}: expected one of {sorted(SCRIPTS)}")


def foreign_word_fraction(cot: str, language: str) -> float:
    """Share of the CoT's words written in a script other than `language`'s. Words in no known script
    (digits, Greek maths letters), LaTeX commands and one-letter Latin variables are not counted, so
    a CoT of pure arithmetic is never "mixed"."""
    target = SCRIPTS[language]
    others = [p for code, p in SCRIPTS.items() if code != language]
    counted = [w for w in words(_LATEX_COMMAND.sub(" ", cot)) if not _SINGLE_LATIN.fullmatch(w)]
    scripted = [w for w in counted if target.fullmatch(w) or any(p.fullmatch(w) for p in others)]
    if not scripted:
        return 0.0
    return sum(not target.fullmatch(w) for w in scripted) / len(scripted)


def longest_paragraph(cot: str) -> int:
    """Characters in the CoT's longest paragraph (blank-line separated, surrounding space stripped)."""
    return max((len(p.strip()) for p in _PARAGRAPH_BREAK.split(cot)), default=0)


def has_code_block(cot: str) -> bool:
    return bool(_CODE_FENCE.search(cot))


def rejection_reason(completion: str, filters: CotFilters, truncated: bool = False) -> str | None:
    """Why a completion fails the readability filters ("truncated", "mixed_language",
    "long_paragraph", "code_block"), or None when it passes."""
    if truncated and filters.drop_truncated:
        return "truncated"
    cot, _answer = split_reasoning(completion)
    if foreign_word_fraction(cot, filters.language) > filters.max_foreign_fraction:
        return "mixed_language"
    if filters.max_paragraph_chars and longest_paragraph(cot) > filters.max_paragraph_chars:
        return "long_paragraph"
    if filters.drop_code_blocks and has_code_block(cot):
        return "code_block"
    return None


def dedupe_key(completion: str) -> str:
    """Completions equal up to whitespace are one sample."""
    return " ".join(completion.split())


def select(samples: list, keep: str, max_per_prompt: int, correct_label: str, filters: CotFilters) -> tuple[list, Counter]:
    """The samples of one prompt that go into the SFT set, in sampled order, and why the others did not.

    keep="correct": full marks on `correct_label`; "best": the highest total reward of the group
    (ties all kept); "all": any. Then the CoT filters, de-duplication, and at most `max_per_prompt`."""
    if keep not in KEEP_RULES:
        raise ValueError(f"keep={keep!r}; expected one of {KEEP_RULES}")
    reasons: Counter = Counter()
    if keep == "correct":
        chosen = [s for s in samples if is_full_marks(s.rewards.get(correct_label))]
        reasons["not_correct"] += len(samples) - len(chosen)
    elif keep == "best":
        totals = [s.total for s in samples if s.total is not None]
        chosen = [s for s in samples if totals and s.total == max(totals)]
        reasons["not_best"] += len(samples) - len(chosen)
    else:
        chosen = list(samples)
    kept, seen = [], set()
    for s in chosen:
        reason = rejection_reason(s.completion, filters, truncated=s.finish_reason == "length")
        if reason is None:
            key = dedupe_key(s.completion)
            reason = "duplicate" if key in seen else ("over_max_per_prompt" if len(kept) >= max_per_prompt else None)
            seen.add(key)
        if reason:
            reasons[reason] += 1
        else:
            kept.append(s)
    return kept, reasons


# --- output file and resume -----------------------------------------------------------------

def done_file(out: Path) -> Path:
    """Sidecar listing every finished prompt id, including prompts where nothing was accepted."""
    return out.with_name(out.name + ".done")


def done_prompt_ids(out: Path) -> set[str]:
    """Prompt ids already finished in `out` (its rows and its .done sidecar). A partial last line,
    left by a run killed mid-write, is cut off first so appending keeps the file valid jsonl."""
    done: set[str] = set()
    if out.is_file():
        data = out.read_bytes()
        if data and not data.endswith(b"\n"):
            data = data[: data.rfind(b"\n") + 1]
            with out.open("r+b") as f:
                f.truncate(len(data))
        for n, line in enumerate(data.decode().splitlines(), 1):
            if line.strip():
                try:
                    done.add(str(json.loads(line)["id"]))
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(f"{out}:{n}: not a reject-sample row ({e}); move the file or pick another --out") from e
    if done_file(out).is_file():
        done.update(line.strip() for line in done_file(out).read_text().splitlines() if line.strip())
    return done


def output_row(row: dict, s, model: str, run_seed: int) -> dict:
    """One jsonl line: the input row's columns, then ours (they win over same-named input columns)."""
    extra = {k: v for k, v in row.items() if k not in OUTPUT_COLUMNS and k != "cot"}
    return {**extra, "id": s.prompt_id, "prompt": row["prompt"], "completion": s.completion,
            "rewards": s.rewards, "reward": s.total, "model": model, "seed": run_seed,
            "sample_seed": s.seed, "sample": s.sample_index}


def _append(path: Path, lines: list[str]) -> None:
    if not lines:
        return
    with path.open("a") as f:
        f.write("".join(lines))  # one write per batch: a kill leaves at most one partial line
        f.flush()
        os.fsync(f.fileno())


# --- acceptance by bucket -----------------------------------------------------------------------

def bucket_labels(rows: list[dict], prompt_lengths: list[int], bucket_by: str | None = "difficulty",
                  quantiles: int = 4) -> list[str]:
    """Each prompt's bucket: `<column>=<value>` when every row has `bucket_by`, else its prompt-length
    quantile (`len q1 [a-b]`, tokens) over these prompts."""
    if bucket_by and rows and all(bucket_by in r for r in rows):
        return [f"{bucket_by}={r[bucket_by]}" for r in rows]
    ordered = sorted(prompt_lengths)
    edges = [ordered[min(len(ordered) - 1, (len(ordered) * q) // quantiles)] for q in range(1, quantiles)]
    labels = []
    for length in prompt_lengths:
        q = sum(length > e for e in edges)
        lo = ordered[0] if q == 0 else edges[q - 1] + 1
        hi = edges[q] if q < len(edges) else ordered[-1]
        labels.append(f"len q{q + 1} [{lo}-{hi}]")
    return labels


def acceptance_table(per_bucket: dict) -> str:
    """Text table: per bucket, prompts, samples, kept samples, acceptance rate, prompts with >=1 kept."""
    lines = [f"{'bucket':<22} {'prompts':>8} {'samples':>8} {'kept':>6} {'accept %':>9} {'prompts kept %':>15}"]
    for name in sorted(per_bucket, key=_natural):
        b = per_bucket[name]
        lines.append(f"{name:<22} {b['prompts']:>8} {b['samples']:>8} {b['kept']:>6} "
                     f"{100 * b['kept'] / max(1, b['samples']):>9.1f} {100 * b['prompts_kept'] / max(1, b['prompts']):>15.1f}")
    return "\n".join(lines)


def _natural(label: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", label)]


# --- the job --------------------------------------------------------------------------------

def reject_sample(model=None, prompts: str = "tiny_arith:train", out: str | Path = "runs/reject/samples.jsonl", *,
                  engine=None, tokenizer=None, n: int = 16, rewards=("accuracy", "format"), keep: str = "correct",
                  max_per_prompt: int = 4, correct_reward: str = "accuracy", filters: CotFilters = CotFilters(),
                  temperature: float = 1.0, top_p: float = 1.0, max_tokens: int | None = None, seed: int = 0,
                  limit: int | None = None, bucket_by: str | None = "difficulty", batch_prompts: int = 64,
                  progress: bool = True, engine_kwargs: dict | None = None, verbose: bool = True,
                  system_prompt=DEFAULT_SYSTEM_PROMPT) -> dict:
    """Rejection-sample `prompts` with a checkpoint (`model`) or an already-built `engine`; append the
    accepted samples to `out` and return the run's stats (acceptance per bucket, rejection reasons)."""
    if keep not in KEEP_RULES:
        raise ValueError(f"--keep {keep!r}: expected one of {KEEP_RULES}")
    if max_per_prompt < 1 or n < 1:
        raise ValueError(f"--n {n} and --max-per-prompt {max_per_prompt} must be >= 1")
    t0 = time.perf_counter()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = load_rows(prompts, limit=limit)
    ids = [prompt_id(r) for r in rows]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"{prompts}: prompt id {dup!r} appears twice; resume needs unique 'id' values")
    done = done_prompt_ids(out)
    todo = [r for r, i in zip(rows, ids) if i not in done]
    reward_list = reward_entries(rewards)
    if keep == "correct" and correct_reward not in [r if isinstance(r, str) else r.get("name") for r in reward_list]:
        reward_list.insert(0, correct_reward)
    correct_label = RewardSpec(correct_reward).column
    stats: dict = {"out": str(out), "prompts_total": len(rows), "prompts_skipped": len(rows) - len(todo),
                   "prompts": len(todo), "samples": 0, "kept": 0, "reasons": Counter(), "buckets": {}}
    if verbose and done:
        print(f"resuming {out}: {stats['prompts_skipped']} of {len(rows)} prompts already done")
    if not todo:
        return _finish(stats, t0, verbose)
    session = open_engine(model, engine=engine, tokenizer=tokenizer, **(engine_kwargs or {}))
    try:
        lengths = [len(render_prompt(session.tokenizer, r["prompt"], system_prompt)) for r in todo]
        buckets = bucket_labels(todo, lengths, bucket_by)
        run_stats: dict = {}
        batches = iter_scored_batches(session, todo, reward_list, n=n, temperature=temperature, top_p=top_p,
                                      max_tokens=max_tokens, seed=seed, batch_prompts=batch_prompts,
                                      progress=progress, desc="reject-sample", stats=run_stats,
                                      system_prompt=system_prompt)
        for groups in batches:
            lines, finished = [], []
            for group in groups:
                r = group[0].row
                kept, reasons = select(group, keep, max_per_prompt, correct_label, filters)
                stats["reasons"].update(reasons)
                b = stats["buckets"].setdefault(buckets[r], {"prompts": 0, "samples": 0, "kept": 0, "prompts_kept": 0})
                b["prompts"] += 1
                b["samples"] += len(group)
                b["kept"] += len(kept)
                b["prompts_kept"] += bool(kept)
                stats["samples"] += len(group)
                stats["kept"] += len(kept)
                lines += [json.dumps(output_row(todo[r], s, session.name, seed), ensure_ascii=False) + "\n" for s in kept]
                finished.append(group[0].prompt_id + "\n")
            _append(out, lines)
            _append(done_file(out), finished)  # after the rows: a prompt is done only once its rows are on disk
        stats["generation_s"] = round(run_stats.get("generation_s", 0.0), 3)
    finally:
        session.close()
    return _finish(stats, t0, verbose)


def reward_entries(rewards) -> list:
    """The rewards as a list of names / {"name", "weight", ...} mappings, from a name, a list (of
    names, mappings or dataclasses with those fields) or a recipe's {name: weight} mapping."""
    if isinstance(rewards, str):
        return [rewards]
    if isinstance(rewards, dict):
        return [{"name": k, **v} if isinstance(v, dict) else {"name": k, "weight": v} for k, v in rewards.items()]
    return [dataclasses.asdict(r) if dataclasses.is_dataclass(r) else r for r in rewards]


def _finish(stats: dict, t0: float, verbose: bool) -> dict:
    stats["reasons"] = dict(stats["reasons"])
    stats["acceptance_rate"] = stats["kept"] / stats["samples"] if stats["samples"] else None
    stats["wall_s"] = round(time.perf_counter() - t0, 3)
    if verbose:
        if stats["buckets"]:
            print(acceptance_table(stats["buckets"]))
        rate = "n/a" if stats["acceptance_rate"] is None else f"{100 * stats['acceptance_rate']:.1f}%"
        print(f"kept {stats['kept']} of {stats['samples']} samples ({rate}) from {stats['prompts']} prompts "
              f"-> {stats['out']}; rejected: {stats['reasons'] or 'none'}")
    return stats


# --- CLI ----------------------------------------------------------------------------------------

def parse_reward_list(text: str) -> list:
    """`accuracy,format=0.5` -> ["accuracy", {"name": "format", "weight": 0.5}]."""
    out = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        name, eq, weight = item.rpartition("=") if "=" in item else (item, "", "")
        try:
            out.append({"name": name, "weight": float(weight)} if eq else item)
        except ValueError:
            raise SystemExit(f"--rewards item {item!r}: the weight after '=' must be a number") from None
    if not out:
        raise SystemExit("--rewards: name at least one reward, e.g. accuracy,format")
    return out


def add_reject_parser(subparsers) -> argparse.ArgumentParser:
    """`r1pipe reject-sample --model CKPT --prompts FILE --n 16 --rewards accuracy,format --keep correct
    --max-per-prompt 4 --out FILE.jsonl`."""
    p = subparsers.add_parser("reject-sample", help="rejection sampling: keep the accepted completions as SFT data",
                              description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint directory to sample from")
    p.add_argument("--prompts", default="tiny_arith:train",
                   help="a .jsonl/.parquet file or a builtin split (default tiny_arith:train)")
    p.add_argument("--out", required=True, help="output .jsonl (appended to; prompts already in it are skipped)")
    p.add_argument("--n", type=int, default=16, help="samples per prompt (default 16)")
    p.add_argument("--rewards", default="accuracy,format",
                   help="comma-separated rewards, optionally name=weight (default accuracy,format)")
    p.add_argument("--keep", choices=KEEP_RULES, default="correct",
                   help="correct: full marks on --correct-reward; best: the group's top total reward; "
                        "all: any (default correct)")
    p.add_argument("--correct-reward", default="accuracy", help="reward whose full marks mean correct (default accuracy)")
    p.add_argument("--max-per-prompt", type=int, default=4, help="most samples kept per prompt (default 4)")
    p.add_argument("--bucket-by", default="difficulty",
                   help="column for the acceptance table (default difficulty; else prompt-length quartiles)")
    f = p.add_argument_group("CoT filters")
    f.add_argument("--language", default="en", help=f"the CoT's language, one of {sorted(SCRIPTS)} (default en)")
    f.add_argument("--max-foreign-fraction", type=float, default=0.0,
                   help="share of CoT words allowed in another script (default 0)")
    f.add_argument("--max-paragraph-chars", type=int, default=2000,
                   help="longest CoT paragraph allowed; 0 = off (default 2000)")
    f.add_argument("--allow-code-blocks", action="store_true", help="keep CoTs that contain fenced code blocks")
    f.add_argument("--keep-truncated", action="store_true", help="keep completions cut off by --max-tokens")
    add_sampling_args(p, temperature=1.0, top_p=1.0)
    p.set_defaults(func=run_reject_cli)
    return p


def run_reject_cli(args: argparse.Namespace) -> int:
    filters = CotFilters(language=args.language, max_foreign_fraction=args.max_foreign_fraction,
                         max_paragraph_chars=args.max_paragraph_chars, drop_code_blocks=not args.allow_code_blocks,
                         drop_truncated=not args.keep_truncated)
    stats = reject_sample(args.model, args.prompts, args.out, n=args.n, rewards=parse_reward_list(args.rewards),
                          keep=args.keep, max_per_prompt=args.max_per_prompt, correct_reward=args.correct_reward,
                          filters=filters, bucket_by=args.bucket_by, engine_kwargs=engine_from_args(args),
                          **sampling_from_args(args))
    Path(str(args.out) + ".stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return 0
