"""Prompt datasets: local jsonl/json/parquet files or the builtin task splits, validated up front, and
the chat formatting every stage uses (so SFT, rollouts and eval see exactly the same prompt tokens).

Rows need a non-empty string `prompt` and `solution`; other columns pass through. A bad row raises
ValueError naming the file, the row and the field. Builtins come from `r1pipe.data.task`.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from urllib.parse import parse_qsl

from r1pipe.data import task

REQUIRED_FIELDS = ("prompt", "solution")
# Optional columns with a fixed meaning are type-checked too, so a stage fails at load, not mid-run.
OPTIONAL_FIELD_TYPES = {"cot": str, "id": str, "difficulty": int, "kind": str}
FILE_SUFFIXES = (".jsonl", ".json", ".parquet")

# The system prompt of the embedded task: states the R1 output format (reasoning in <think>, answer boxed).
TASK_SYSTEM_PROMPT = "Reason in <think></think>, then answer \\boxed{}."


def _cold_start(n: int, split: str, seed: int, **kwargs) -> list[dict]:
    return task.cold_start_rows(n, seed, **kwargs)  # train only: BUILTINS lists no other split


# name -> (row function, default rows per split, extra float options it takes, takes ArithConfig fields)
BUILTINS = {
    "tiny_arith": (task.arith_rows, {"train": 10_000, "dev": 200, "test": 500}, (), True),
    "tiny_cold_start": (_cold_start, {"train": 1_000}, ("terse_fraction",), True),
    "tiny_general": (task.general_rows, {"train": 2_000, "dev": 200, "test": 200}, (), False),
    "tiny_align": (task.alignment_rows, {"train": 2_000, "dev": 200, "test": 500}, ("general_fraction",), True),
}
_CONFIG_KEYS = {f: type(getattr(task.ArithConfig(), f)) for f in task.ArithConfig.__dataclass_fields__}


def _did_you_mean(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; expected one of {', '.join(sorted(options))}"


def validate_row(row, where: str) -> None:
    """Raise ValueError naming `where` (file and row) and the field when a row is unusable."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object with 'prompt' and 'solution', got {type(row).__name__}")
    for field in REQUIRED_FIELDS:
        if field not in row or row[field] is None:
            raise ValueError(f"{where}: field '{field}' is missing; expected a non-empty string")
        value = row[field]
        if not isinstance(value, str):
            raise ValueError(f"{where}: field '{field}' must be a string, got {type(value).__name__} {value!r}"
                             + (" (quote the number)" if isinstance(value, (int, float)) else ""))
        if not value.strip():
            raise ValueError(f"{where}: field '{field}' is empty; expected a non-empty string")
    for field, kind in OPTIONAL_FIELD_TYPES.items():
        value = row.get(field)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise ValueError(f"{where}: field '{field}' must be {kind.__name__}, got {type(value).__name__} {value!r}")


def _read_json_rows(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        for i, row in enumerate(rows, start=1):
            validate_row(row, f"{path}: row {i}")
        return rows
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}: row {len(rows) + 1} (line {lineno})"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        validate_row(row, where)
        rows.append(row)
    return rows


def _rows_to_dataset(rows: list[dict], where: str):
    import datasets

    # Columns are the union over rows (Dataset.from_list would keep only the first row's keys).
    columns = list(dict.fromkeys(k for row in rows for k in row))
    try:
        return datasets.Dataset.from_dict({c: [row.get(c) for row in rows] for c in columns})
    except Exception as e:  # pyarrow type clash between rows in a pass-through column
        raise ValueError(f"{where}: columns hold values of clashing types across rows ({e})") from None


def _load_file(path: Path):
    if path.suffix == ".parquet":
        import datasets
        import pyarrow.parquet as pq

        ds = datasets.Dataset(pq.read_table(path))
        for i, row in enumerate(ds.to_list(), start=1):
            validate_row(row, f"{path}: row {i}")
    else:
        rows = _read_json_rows(path)
        ds = _rows_to_dataset(rows, str(path))
    if len(ds) == 0:
        raise ValueError(f"{path}: no rows; expected at least one row with 'prompt' and 'solution'")
    return ds


def _resolve_file(path: Path, split: str | None) -> Path:
    if path.is_file():
        if path.suffix not in FILE_SUFFIXES:
            raise ValueError(f"{path}: unsupported file type {path.suffix!r}; expected {', '.join(FILE_SUFFIXES)}")
        return path
    if path.is_dir():
        split = split or "train"
        for suffix in FILE_SUFFIXES:
            if (path / f"{split}{suffix}").is_file():
                return path / f"{split}{suffix}"
        raise FileNotFoundError(f"{path}: no {split}.jsonl, {split}.json or {split}.parquet in this directory")
    raise FileNotFoundError(f"prompt dataset {str(path)!r} not found: expected a file ({', '.join(FILE_SUFFIXES)}), "
                            f"a directory with <split>.jsonl, or a builtin name ({', '.join(BUILTINS)}):<split>")


def _option(name: str, key: str, value: str, kind: type):
    if kind is bool:
        return value.lower() in ("1", "true", "yes")
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"builtin {name!r}: option {key}={value!r} is not a valid {kind.__name__}") from None


def builtin_rows(spec: str, split: str | None = None) -> list[dict]:
    """Rows of a builtin: "tiny_arith:test", optionally "?n=300&seed=1&max_ops=2&chain=rewrite" (ArithConfig fields).

    tiny_arith: the task (train/dev/test); tiny_cold_start: mixed-quality SFT rows (train only,
    ?terse_fraction=); tiny_general: non-reasoning rows; tiny_align: stage-4 mix (?general_fraction=).
    """
    name_split, _, query = spec.partition("?")
    name, _, spec_split = name_split.partition(":")
    if name not in BUILTINS:
        raise ValueError(f"unknown builtin dataset {name!r}{_did_you_mean(name, BUILTINS)}")
    split = spec_split or split or "train"
    fn, sizes, float_keys, takes_config = BUILTINS[name]
    if split not in sizes:
        raise ValueError(f"builtin {name!r}: unknown split {split!r}{_did_you_mean(split, sizes)}")
    kwargs: dict = {"n": sizes[split], "seed": 0}
    config: dict = {}
    for key, value in parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)):
        if key in ("n", "seed"):
            kwargs[key] = _option(name, key, value, int)
        elif key in float_keys:
            kwargs[key] = _option(name, key, value, float)
        elif key in _CONFIG_KEYS and takes_config:
            config[key] = _option(name, key, value, _CONFIG_KEYS[key])
        else:
            allowed = ["n", "seed", *float_keys] + (list(_CONFIG_KEYS) if takes_config else [])
            raise ValueError(f"builtin {name!r}: unknown option {key!r}{_did_you_mean(key, allowed)}")
    if config:
        kwargs["config"] = task.ArithConfig(**config)
    return fn(split=split, **kwargs)


def load_prompt_dataset(source: str | Path, split: str | None = None):
    """A `datasets.Dataset` of validated prompt rows from a file, a directory of splits, or a builtin.

    `source` is a .jsonl/.json/.parquet path, a directory holding <split>.jsonl (or .json/.parquet),
    or a builtin "tiny_arith:train" (see `builtin_rows`). `split` picks the split where `source` does not.
    """
    text = str(source)
    name = text.partition("?")[0].partition(":")[0]
    # "name:split" that is not a path is a builtin (a misspelt one gets a did-you-mean, not a file error).
    if not Path(text).exists() and (name in BUILTINS or (":" in text and "/" not in name)):
        return _rows_to_dataset(builtin_rows(text, split), text)
    return _load_file(_resolve_file(Path(text), split))


# --- chat formatting ----------------------------------------------------------------------------


def _messages(prompt_text: str, system_prompt: str | None) -> list[dict]:
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return system + [{"role": "user", "content": prompt_text}]


def format_prompt_text(tokenizer, prompt_text: str, system_prompt: str | None = TASK_SYSTEM_PROMPT) -> str:
    """The chat-templated prompt string, ending with the assistant generation prompt."""
    return tokenizer.apply_chat_template(_messages(prompt_text, system_prompt), tokenize=False,
                                         add_generation_prompt=True)


def format_prompt(tokenizer, prompt_text: str, system_prompt: str | None = TASK_SYSTEM_PROMPT) -> list[int]:
    """Prompt token ids (chat template + system prompt + generation prompt) for rollouts, eval and SFT."""
    # The template writes bos itself, so the tokenizer must not add specials a second time.
    return tokenizer(format_prompt_text(tokenizer, prompt_text, system_prompt), add_special_tokens=False)["input_ids"]


def format_sft(tokenizer, prompt_text: str, response_text: str,
               system_prompt: str | None = TASK_SYSTEM_PROMPT) -> dict[str, list[int]]:
    """One SFT example: prompt ids + response ids + eos, and completion_mask (1 on the response and eos).

    Loss goes on completion_mask positions only (R1 stage 1/3: loss on the response tokens). The ids
    equal the chat template applied to the whole conversation (tests/data checks this).
    """
    prompt_ids = format_prompt(tokenizer, prompt_text, system_prompt)
    response_ids = tokenizer(response_text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return {"input_ids": prompt_ids + response_ids,
            "completion_mask": [0] * len(prompt_ids) + [1] * len(response_ids)}
