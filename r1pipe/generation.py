"""Sampling a prompt dataset with a rollout engine and scoring the completions with named rewards: the
part shared by `r1pipe eval` (r1pipe/evaluate.py) and `r1pipe reject-sample` (r1pipe/reject_sample.py).

An `EngineSession` wraps either an engine the caller built (the demo reuses its GRPO engine) or one
built here from a checkpoint path (`r1pipe.rollout.vllm_engine.VLLMRolloutEngine`, or the torch
fallback). Prompts come from `r1pipe.data` (local jsonl/parquet or builtin task splits).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

EVAL_TEMPERATURE, EVAL_TOP_P = 0.6, 0.95  # R1's evaluation sampling
MAX_GENERATION_TOKENS = 32768  # R1's maximum generation length
FULL_MARKS = 1.0 - 1e-9  # a 0/1 reward counts as "correct" at 1.0
# Row columns that would clash with the reward call's own arguments.
_RESERVED_COLUMNS = {"prompts", "completions", "completion", "group_size"}
# Sentinel: use the data module's own default system prompt (what the training stages use).
DEFAULT_SYSTEM_PROMPT = object()


@dataclass
class Sample:
    """One scored completion. `rewards`: {reward label: value or None}; `total`: their weighted sum."""

    row: int  # index into the rows given to `iter_scored_batches`
    prompt_id: str
    sample_index: int
    completion: str
    n_tokens: int  # generated tokens, the final stop token not counted
    finish_reason: str  # "stop" | "length"
    seed: int  # the engine's per-sample seed: reproduces this completion
    rewards: dict = field(default_factory=dict)
    total: float | None = None


def is_full_marks(value) -> bool | None:
    """True/False for a reward value, None when the reward could not score the sample."""
    return None if value is None else value >= FULL_MARKS


# --- engine -------------------------------------------------------------------------------------

class EngineSession:
    """An engine plus what sampling needs from it: the tokenizer, a name for the records, and the
    context length. Only an engine built here is released by `close()`."""

    def __init__(self, engine, tokenizer, name: str, owned: bool, max_model_len: int | None):
        self.engine, self.tokenizer, self.name, self.owned = engine, tokenizer, name, owned
        self.max_model_len = max_model_len

    def close(self) -> None:
        if self.owned and self.engine is not None:
            self.engine = None
            gc.collect()  # vLLM frees its KV cache only when the LLM object is collected


def _checkpoint_context(model_dir: Path) -> int | None:
    config = model_dir / "config.json"
    if not config.is_file():
        return None
    return json.loads(config.read_text()).get("max_position_embeddings")


def _engine_context(engine) -> int | None:
    if getattr(engine, "max_model_len", None):
        return int(engine.max_model_len)
    try:
        return int(engine.llm.llm_engine.model_config.max_model_len)  # VLLMRolloutEngine
    except AttributeError:
        pass
    try:
        return int(engine.policy.config.max_position_embeddings)  # TorchRolloutEngine
    except AttributeError:
        return None


def open_engine(model=None, *, engine=None, tokenizer=None, kind: str = "vllm", max_model_len: int | None = None,
                **engine_kwargs) -> EngineSession:
    """A session over `engine` (used as given) or over a new engine of `kind` ("vllm" or "torch")
    built from the checkpoint directory `model`. The tokenizer is `tokenizer`, else the checkpoint's."""
    if engine is None and model is None:
        raise ValueError("give a checkpoint directory (model=...) or an already-built engine (engine=...)")
    model_dir = Path(model) if model is not None else getattr(engine, "model_dir", None)
    if engine is None and not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"checkpoint {model_dir} has no config.json; expected a directory written by "
                                "save_pretrained (config.json, safetensors, tokenizer files)")
    if tokenizer is None:
        tokenizer = _load_tokenizer(model_dir, engine)
    name = str(model if model is not None else (model_dir or type(engine).__name__))
    if engine is not None:
        return EngineSession(engine, tokenizer, name, owned=False, max_model_len=_engine_context(engine))
    context = max_model_len or min(_checkpoint_context(model_dir) or MAX_GENERATION_TOKENS, MAX_GENERATION_TOKENS)
    if kind == "vllm":
        from r1pipe.rollout.vllm_engine import VLLMRolloutEngine

        built = VLLMRolloutEngine(model_dir, max_model_len=context, **engine_kwargs)
    elif kind == "torch":
        from r1pipe.model import DeepSeekPolicy
        from r1pipe.rollout.torch_engine import TorchRolloutEngine

        built = TorchRolloutEngine(DeepSeekPolicy.from_pretrained(model_dir).eval(),
                                   pad_token_id=tokenizer.pad_token_id or 0, **engine_kwargs)
    else:
        raise ValueError(f"engine kind {kind!r}; expected 'vllm' or 'torch'")
    return EngineSession(built, tokenizer, name, owned=True, max_model_len=context)


def _load_tokenizer(model_dir, engine):
    if model_dir is not None and (Path(model_dir) / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    llm = getattr(engine, "llm", None)
    if llm is not None:
        return llm.get_tokenizer()
    raise ValueError(f"no tokenizer: {model_dir} has no tokenizer_config.json and the engine has none; pass tokenizer=...")


# --- data ---------------------------------------------------------------------------------------

def load_rows(source: str, limit: int | None = None) -> list[dict]:
    """Validated prompt rows (string `prompt` and `solution`, other columns kept) from a local
    .jsonl/.json/.parquet file, a directory of splits, or a builtin split such as `tiny_arith:test`."""
    from r1pipe.data.datasets import load_prompt_dataset

    rows = load_prompt_dataset(source).to_list()
    return rows[:limit] if limit is not None else rows


def prompt_id(row: dict) -> str:
    """The row's `id`, else a hash of its prompt (stable across runs, so resume can match rows)."""
    if row.get("id") not in (None, ""):
        return str(row["id"])
    return "prompt-" + hashlib.sha256(json.dumps(row["prompt"], sort_keys=True).encode()).hexdigest()[:16]


def render_prompt(tokenizer, prompt: str, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT) -> list[int]:
    """Token ids the model continues from: exactly what training saw (r1pipe.data.datasets.format_prompt:
    chat template, the task's system prompt unless overridden, assistant turn opened)."""
    from r1pipe.data.datasets import format_prompt

    if system_prompt is DEFAULT_SYSTEM_PROMPT:
        return list(format_prompt(tokenizer, prompt))
    return list(format_prompt(tokenizer, prompt, system_prompt=system_prompt or None))


# --- sampling and scoring -------------------------------------------------------------------------

def iter_scored_batches(session: EngineSession, rows: list[dict], rewards, *, n: int, temperature: float,
                        top_p: float, max_tokens: int | None, seed: int, batch_prompts: int = 64,
                        progress: bool = True, desc: str = "sampling", stats: dict | None = None,
                        system_prompt=DEFAULT_SYSTEM_PROMPT) -> Iterator[list[list[Sample]]]:
    """Yield, per batch of `batch_prompts` rows, each row's n scored Samples (row order kept).

    `rewards`: reward names or the recipe's `rewards:` value (see r1pipe.rewards.parse_reward_specs).
    The engine seed of a batch is `seed + index of its first row`, so a run is reproducible. `stats`
    (if given) is filled with max_tokens, generation_s and reward labels."""
    from tqdm.auto import tqdm

    from r1pipe.rewards import RewardRunner

    tok = session.tokenizer
    prompt_ids = [render_prompt(tok, r["prompt"], system_prompt) for r in rows]
    max_tokens = resolve_max_tokens(max_tokens, prompt_ids, session.max_model_len)
    stop_ids = [tok.eos_token_id] if tok.eos_token_id is not None else []
    stats = stats if stats is not None else {}
    stats.update(max_tokens=max_tokens, generation_s=0.0, scoring_s=0.0, completion_tokens=0)
    columns = sorted({c for r in rows for c in r} - _RESERVED_COLUMNS - {"prompt"})
    with RewardRunner(rewards) as runner, tqdm(total=len(rows), desc=desc, unit="prompt", disable=not progress) as bar:
        stats["labels"] = [s.column for s in runner.specs]
        for start in range(0, len(rows), batch_prompts):
            idx = list(range(start, min(len(rows), start + batch_prompts)))
            t0 = time.perf_counter()
            out = session.engine.generate([prompt_ids[i] for i in idx], n=n, temperature=temperature, top_p=top_p,
                                          max_tokens=max_tokens, stop_token_ids=stop_ids, seed=seed + start)
            stats["generation_s"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            texts = [tok.decode(ids, skip_special_tokens=True) for ids in out.completion_ids]
            rows_k = [idx[p] for p in out.prompt_index]
            prompts_k = [tok.decode(prompt_ids[r], skip_special_tokens=False) for r in rows_k]
            cols = {c: [rows[r].get(c) for r in rows_k] for c in columns}
            scored = runner(prompts_k, texts, group_size=n, **cols)
            stats["scoring_s"] += time.perf_counter() - t0
            groups = [[] for _ in idx]
            for k, (r, ids) in enumerate(zip(rows_k, out.completion_ids)):
                stopped = out.finish_reason[k] == "stop" and ids and ids[-1] in stop_ids
                sample = Sample(row=r, prompt_id=prompt_id(rows[r]), sample_index=out.sample_index[k],
                                completion=texts[k], n_tokens=len(ids) - int(bool(stopped)),
                                finish_reason=out.finish_reason[k], seed=out.seeds[k],
                                rewards={label: vals[k] for label, vals in scored.per_function.items()},
                                total=scored.totals[k])
                stats["completion_tokens"] += sample.n_tokens
                groups[out.prompt_index[k]].append(sample)
            bar.update(len(idx))
            yield groups


def sample_and_score(session: EngineSession, rows: list[dict], rewards, **kwargs) -> tuple[list[list[Sample]], dict]:
    """All rows' scored samples at once (see iter_scored_batches) and the run's stats."""
    stats: dict = {}
    groups = [g for batch in iter_scored_batches(session, rows, rewards, stats=stats, **kwargs) for g in batch]
    return groups, stats


def resolve_max_tokens(max_tokens: int | None, prompt_ids: list[list[int]], context: int | None) -> int:
    """The generation budget: as asked, else what the context leaves after the longest prompt
    (capped at R1's 32768). Fails when the longest prompt leaves no room."""
    longest = max(len(p) for p in prompt_ids)
    room = (context - longest) if context else None
    if max_tokens is None:
        max_tokens = min(MAX_GENERATION_TOKENS, room) if room is not None else MAX_GENERATION_TOKENS
    if max_tokens < 1 or (room is not None and max_tokens > room):
        raise ValueError(f"max_tokens={max_tokens} does not fit: the longest prompt has {longest} tokens and the "
                         f"engine's context is {context}; lower --max-tokens or raise --max-model-len")
    return max_tokens


def _parsed_answer(completion: str) -> tuple[str | None, list]:
    """(normalised text key, math-verify parse) of a completion's final answer (see answer_key)."""
    from r1pipe.rewards.math import extract_answer, parse_answer

    kind, text = extract_answer(completion)
    if not text.strip():
        return None, []
    try:
        parsed = parse_answer(kind, text)
    except Exception:  # noqa: BLE001 - math-verify raises on adversarial LaTeX; vote on the text instead
        parsed = []
    if parsed and not isinstance(parsed[0], str):
        import sympy

        value = parsed[0]
        if isinstance(value, sympy.Float):
            value = sympy.nsimplify(value, rational=True)
        return str(value), parsed
    return (None if kind == "free" else " ".join(text.split())), []


def answer_key(completion: str) -> str | None:
    """The final answer as text for the records: math-verify's parse of the extracted answer (floats
    made rational, so 21 and 21.0 read alike); an unparseable boxed/tagged answer falls back to its
    whitespace-normalised text; None when there is no answer."""
    return _parsed_answer(completion)[0]


def answer_classes(completions: list[str]) -> list[int | None]:
    """Majority-vote classes of one prompt's completions: two answers share a class when their keys
    are equal or math-verify judges them equal (so x^2 and x*x vote together); None = no answer."""
    reps: list[tuple[str, list]] = []
    out: list[int | None] = []
    for completion in completions:
        key, parsed = _parsed_answer(completion)
        if key is None:
            out.append(None)
            continue
        for idx, (rep_key, rep_parsed) in enumerate(reps):
            if rep_key == key or (parsed and rep_parsed and not _both_numbers(rep_parsed, parsed)
                                  and _equivalent(rep_parsed, parsed)):
                out.append(idx)
                break
        else:
            reps.append((key, parsed))
            out.append(len(reps) - 1)
    return out


def _both_numbers(a: list, b: list) -> bool:
    """Two plain numbers are equal exactly when their keys are (rationals print canonically), so the
    slow symbolic check is skipped; it is the common case (every arithmetic answer)."""
    return bool(getattr(a[0], "is_Number", False) and getattr(b[0], "is_Number", False))


def _equivalent(a: list, b: list) -> bool:
    from math_verify import verify

    try:
        return bool(verify(a, b))
    except Exception:  # noqa: BLE001 - a verifier failure means "not shown equal"
        return False


# --- CLI helpers --------------------------------------------------------------------------------

def add_sampling_args(parser: argparse.ArgumentParser, temperature: float, top_p: float) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=temperature, help=f"(default {temperature})")
    g.add_argument("--top-p", type=float, default=top_p, help=f"(default {top_p})")
    g.add_argument("--max-tokens", type=int, default=None,
                   help="generation budget (default: the context left after the longest prompt, at most 32768)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    g.add_argument("--batch-prompts", type=int, default=64, help="prompts per engine call (default 64)")
    g.add_argument("--engine", choices=("vllm", "torch"), default="vllm", help="rollout engine (default vllm)")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="engine context (default: the checkpoint's max_position_embeddings, at most 32768)")
    g.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="vLLM's share of GPU memory (default: the rollout engine's, 0.3); ignored on CPU and by --engine torch")
    g.add_argument("--system-prompt", default=None,
                   help="system prompt for the chat template (default: the one the training stages use; '' for none)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def sampling_from_args(args: argparse.Namespace) -> dict:
    system_prompt = DEFAULT_SYSTEM_PROMPT if args.system_prompt is None else args.system_prompt
    return dict(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed,
                limit=args.limit, batch_prompts=args.batch_prompts, progress=not args.no_progress,
                system_prompt=system_prompt)


def engine_from_args(args: argparse.Namespace) -> dict:
    kwargs = dict(kind=args.engine, max_model_len=args.max_model_len)
    if args.engine == "vllm" and args.gpu_memory_utilization is not None:
        kwargs["gpu_memory_utilization"] = args.gpu_memory_utilization
    return kwargs
