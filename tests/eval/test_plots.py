"""The PNG charts: written, decodable, of the expected size, and the metrics reader picks the reward
series (both `reward/...` and the runner's `rewards/...` spellings) out of a metrics.jsonl."""

from __future__ import annotations

import json

import matplotlib.image as mpimg
import pytest

from r1pipe import plots


def _is_png(path) -> bool:
    image = mpimg.imread(path)
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 0


def test_accuracy_by_stage_png(tmp_path):
    stages = [{"name": "base", "pass@1": 0.01, "format_rate": 0.0}, {"name": "sft", "pass@1": 0.3, "format_rate": 0.9},
              {"name": "grpo", "pass@1": 0.62, "format_rate": 0.99}, {"name": "align", "pass@1": 0.6}]
    assert _is_png(plots.plot_accuracy_by_stage(stages, tmp_path / "a" / "stages.png"))
    with pytest.raises(ValueError, match="pass@1"):
        plots.plot_accuracy_by_stage([{"name": "x"}], tmp_path / "bad.png")


def test_reward_series_and_curve(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "reward/mean": 0.1 * s, "reward/accuracy/mean": 0.05 * s, "loss": 1.0}) for s in range(1, 6)]
    lines.append(json.dumps({"step": 6, "rewards/format/mean": 0.9, "rewards/format/std": 0.1}))
    lines.append('{"step": 7, "reward/me')  # a run killed mid-write
    metrics.write_text("\n".join(lines) + "\n")
    series = plots.read_reward_series(metrics)
    assert set(series) == {"total", "accuracy", "format"}
    assert series["total"] == ([1.0, 2.0, 3.0, 4.0, 5.0], pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5]))
    assert series["format"] == ([6.0], [0.9])
    assert _is_png(plots.plot_reward_curve(metrics, tmp_path / "reward.png", smooth=3))
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    with pytest.raises(ValueError, match="reward/mean"):
        plots.plot_reward_curve(empty, tmp_path / "x.png")


def test_moving_average():
    assert plots.moving_average([1, 2, 3, 4], 2) == [1.0, 1.5, 2.5, 3.5]


def test_pass_at_k_png(tmp_path):
    summary = {"model": "m", "data": "d", "pass@k": {"1": 0.2, "2": 0.3, "4": 0.45}, "maj@k": {"1": 0.2, "2": 0.2, "4": 0.3}}
    assert _is_png(plots.plot_pass_at_k(summary, tmp_path / "k.png"))
