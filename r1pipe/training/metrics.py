"""Per-step metrics: always `DIR/metrics.jsonl` (one JSON object per step), plus TensorBoard / trackio /
wandb when they are installed and asked for; and a tqdm progress bar with ETA."""
from __future__ import annotations

import json
import math
from pathlib import Path

from tqdm.auto import tqdm


def _clean(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else value
    return value


class MetricsLogger:
    def __init__(self, out_dir: str | Path, total_steps: int, start_step: int = 0, enabled: bool = True,
                 backends: tuple[str, ...] = ("tensorboard",), run_name: str = "r1pipe"):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self.bar = tqdm(total=total_steps, initial=start_step, desc=run_name, disable=not enabled, dynamic_ncols=True)
        self.writers = []
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if start_step == 0 and self.path.exists():
            self.path.unlink()  # a fresh run; a resumed one appends after truncating below
        self._truncate_after(start_step)
        if "tensorboard" in backends:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writers.append(("tensorboard", SummaryWriter(str(Path(out_dir) / "tensorboard"))))
            except ImportError:
                pass
        if "wandb" in backends:
            try:
                import wandb

                self.writers.append(("wandb", wandb.init(project="r1pipe", name=run_name)))
            except ImportError:
                pass
        if "trackio" in backends:
            try:
                import trackio

                self.writers.append(("trackio", trackio.init(project="r1pipe", name=run_name)))
            except ImportError:
                pass

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines of steps the checkpoint does not cover (they will be redone)."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill mid-write
            if row.get("step", 0) <= step:
                kept.append(line)
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for kind, writer in self.writers:
            numeric = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
            if kind == "tensorboard":
                for k, v in numeric.items():
                    writer.add_scalar(k, v, step)
            else:
                writer.log(numeric, step=step)
        shown = {k: row[k] for k in ("reward/mean", "accuracy", "kl", "loss") if isinstance(row.get(k), (int, float))}
        self.bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()})
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
        for kind, writer in self.writers:
            if kind == "tensorboard":
                writer.close()
