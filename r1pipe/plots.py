"""PNG charts of a pipeline's results: held-out accuracy by stage (from stage summaries) and reward over
training steps (from a run's `metrics.jsonl`), drawn with matplotlib's Agg backend (no display needed).

Neighbours: `r1pipe.evaluate` writes the summaries and calls these for `r1pipe eval --plot`; the demo
calls them on its `summary.json` stages.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: CI and the 2-core CPU box have no display
import matplotlib.pyplot as plt  # noqa: E402

# Reward series in a run's metrics: `reward/mean`, `reward/<name>/mean` (the trainer's log) and the
# reward runner's own `rewards/<label>/mean`, `rewards/total/mean`.
REWARD_KEY = re.compile(r"^rewards?/(?:(?P<name>[^/]+)/)?mean$")


def _stage_value(stage: dict, key: str, where: str):
    value = stage.get(key)
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{where}: {key!r} is {value!r}; expected a number in [0, 1]")
    return float(value)


def plot_accuracy_by_stage(stages: list[dict], out_png: str | Path, title: str = "held-out accuracy by stage") -> Path:
    """Bar chart of pass@1 (and format rate where present) per stage.

    `stages`: [{"name": ..., "pass@1": 0..1, "format_rate": 0..1, ...}, ...] in pipeline order, the
    shape of the demo's summary.json "stages" list and of `r1pipe eval`'s summary.json."""
    if not stages:
        raise ValueError("plot_accuracy_by_stage: no stages given; expected a list of stage summaries")
    names, pass1, fmt = [], [], []
    for i, stage in enumerate(stages):
        where = f"stage {i}"
        if not isinstance(stage, dict) or "pass@1" not in stage:
            raise ValueError(f"{where}: expected a mapping with keys 'name' and 'pass@1', got {stage!r}")
        names.append(str(stage.get("name", f"stage {i}")))
        pass1.append(_stage_value(stage, "pass@1", where))
        fmt.append(_stage_value(stage, "format_rate", where))
    has_fmt = any(v is not None for v in fmt)
    width = 0.4 if has_fmt else 0.6
    xs = list(range(len(names)))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.3 * len(names) + 1.5), 3.6))
    try:
        series = [("pass@1", pass1, 0.0)]
        if has_fmt:
            series = [("pass@1", pass1, -width / 2), ("format rate", fmt, width / 2)]
        for label, values, shift in series:
            heights = [100.0 * (v or 0.0) for v in values]
            bars = ax.bar([x + shift for x in xs], heights, width, label=label)
            for bar, v in zip(bars, values):
                text = "n/a" if v is None else f"{100 * v:.1f}"
                ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                            va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
        ax.set_xticks(xs, names)
        ax.set_ylim(0, 110)
        ax.set_ylabel("%")
        ax.set_title(title)
        ax.legend(loc="upper left", fontsize=8)
        fig.tight_layout()
        return _save(fig, out_png)
    finally:
        plt.close(fig)


def read_reward_series(metrics_path: str | Path) -> dict[str, tuple[list[float], list[float]]]:
    """{series name: (steps, values)} of every reward mean in a metrics.jsonl. Series names are
    "total" for `reward/mean` / `rewards/total/mean`, else the reward's name. Lines that are not JSON
    objects with a numeric `step` are skipped (a run killed mid-write leaves a partial last line)."""
    path = Path(metrics_path)
    if not path.is_file():
        raise FileNotFoundError(f"metrics file {path} does not exist; expected a run's metrics.jsonl")
    series: dict[str, tuple[list[float], list[float]]] = {}
    with path.open() as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(row, dict) or not isinstance(row.get("step"), (int, float)):
                continue
            for key, value in row.items():
                m = REWARD_KEY.match(key)
                if m is None or not isinstance(value, (int, float)) or isinstance(value, bool):
                    continue
                if not math.isfinite(value):
                    continue
                name = m.group("name") or "total"
                steps, values = series.setdefault(name, ([], []))
                steps.append(float(row["step"]))
                values.append(float(value))
    return series


def plot_reward_curve(metrics_path: str | Path, out_png: str | Path, title: str | None = None,
                      smooth: int = 1) -> Path:
    """Reward over training steps, one line per reward mean found in the run's metrics.jsonl.
    `smooth` > 1 also draws a trailing moving average of that many logged points."""
    series = read_reward_series(metrics_path)
    if not series:
        raise ValueError(f"{metrics_path}: no reward keys found; expected lines with 'step' and "
                         "'reward/mean' or 'reward/<name>/mean' (or 'rewards/<name>/mean')")
    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    try:
        for name in sorted(series, key=lambda s: (s != "total", s)):
            steps, values = series[name]
            line, = ax.plot(steps, values, label=name, alpha=0.45 if smooth > 1 else 1.0, linewidth=1)
            if smooth > 1:
                ax.plot(steps, moving_average(values, smooth), color=line.get_color(), linewidth=2)
        ax.set_xlabel("step")
        ax.set_ylabel("mean reward")
        ax.set_title(title or f"reward over training ({Path(metrics_path).parent.name or 'run'})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        return _save(fig, out_png)
    finally:
        plt.close(fig)


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last `window` points (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_pass_at_k(summary: dict, out_png: str | Path, title: str | None = None) -> Path:
    """pass@k and maj@k against k from one `r1pipe eval` summary (keys "pass@k"/"maj@k" → {k: value})."""
    curves = {name: summary.get(name) or {} for name in ("pass@k", "maj@k")}
    if not curves["pass@k"]:
        raise ValueError("plot_pass_at_k: summary has no 'pass@k' mapping; expected an r1pipe eval summary")
    fig, ax = plt.subplots(figsize=(5.0, 3.6))
    try:
        for name, curve in curves.items():
            if curve:
                ks = sorted(int(k) for k in curve)
                ax.plot(ks, [100.0 * curve[str(k)] for k in ks], marker="o", label=name)
        ax.set_xscale("log", base=2)
        all_ks = sorted({int(k) for curve in curves.values() for k in curve})
        ax.set_xticks(all_ks, [str(k) for k in all_ks])
        ax.minorticks_off()
        ax.set_xlabel("k")
        ax.set_ylabel("%")
        ax.set_ylim(0, 105)
        ax.set_title(title or f"{summary.get('model', 'model')} on {summary.get('data', 'data')}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        return _save(fig, out_png)
    finally:
        plt.close(fig)


def _save(fig, out_png: str | Path) -> Path:
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out
