"""Step metrics as statistics that merge. A micro-batch's, a generation round's or a rank's share of a metric
keeps what combining it with the others needs (a mean its count, a standard deviation its moments, a max
only the max), so a step logs the same numbers whether one process or N computed them and however its
batch was cut into micro-batches. `reduce_stats` turns them into values: on one process with no
collective, over N ranks with one all-gather of one packed float64 tensor.

A metric dict mixes stats with plain values; plain values (the learning rate, a gradient norm taken after
the all-reduce, an error message) are the same on every rank or only meaningful locally, and are logged as
this rank has them. Every rank must hold the same stat keys: build them even where a rank saw nothing
(an empty `Mean()`), which `reduce_stats` checks.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch


@dataclass(frozen=True)
class Mean:
    total: float = 0.0
    count: float = 0.0
    ops: ClassVar[tuple[str, ...]] = ("sum", "sum")

    @classmethod
    def of(cls, mean: float, count: float) -> Mean:
        """A mean over `count` items (count 0: nothing, whatever `mean` is, e.g. the NaN of an empty mean)."""
        return cls(float(mean) * count, float(count)) if count else cls()

    @classmethod
    def of_values(cls, values) -> Mean:
        values = list(values)
        return cls(float(sum(values)), float(len(values)))

    def __add__(self, other: Mean) -> Mean:
        return Mean(self.total + other.total, self.count + other.count)

    def parts(self) -> tuple[float, ...]:
        return self.total, self.count

    def value(self, parts) -> float:
        total, count = parts
        return total / count if count else float("nan")


@dataclass(frozen=True)
class Spread:
    """A standard deviation from count, sum and sum of squares; ddof 1 is torch's `.std()`, 0 the population
    std. Fewer than ddof + 1 values give 0."""

    n: float = 0.0
    s1: float = 0.0
    s2: float = 0.0
    ddof: int = 0
    ops: ClassVar[tuple[str, ...]] = ("sum", "sum", "sum")

    @classmethod
    def of_values(cls, values, ddof: int) -> Spread:
        values = [float(v) for v in values]
        return cls(float(len(values)), sum(values), sum(v * v for v in values), ddof)

    def __add__(self, other: Spread) -> Spread:
        return Spread(self.n + other.n, self.s1 + other.s1, self.s2 + other.s2, self.ddof)

    def parts(self) -> tuple[float, ...]:
        return self.n, self.s1, self.s2

    def value(self, parts) -> float:
        n, s1, s2 = parts
        if n <= self.ddof:
            return 0.0
        return math.sqrt(max(s2 - s1 * s1 / n, 0.0) / (n - self.ddof))


@dataclass(frozen=True)
class Sum:
    total: float = 0.0
    ops: ClassVar[tuple[str, ...]] = ("sum",)

    def __add__(self, other: Sum) -> Sum:
        return Sum(self.total + other.total)

    def parts(self) -> tuple[float, ...]:
        return (self.total,)

    def value(self, parts) -> float:
        return parts[0]


@dataclass(frozen=True)
class Max:
    """The largest value seen; NaN means none (and NaNs are ignored, as by `torch.fmax`)."""

    best: float = float("nan")
    ops: ClassVar[tuple[str, ...]] = ("max",)
    pick: ClassVar = max

    def __add__(self, other):
        return type(self)(_nan_fold(self.pick, (self.best, other.best)))

    def parts(self) -> tuple[float, ...]:
        return (float(self.best),)

    def value(self, parts) -> float:
        return parts[0]


@dataclass(frozen=True)
class Min(Max):
    """The smallest value seen; NaN means none."""

    ops: ClassVar[tuple[str, ...]] = ("min",)
    pick: ClassVar = min


STATS = (Mean, Spread, Sum, Max, Min)


def _nan_fold(fn, values) -> float:
    present = [float(v) for v in values if not math.isnan(v)]
    return fn(present) if present else float("nan")


_REDUCE = {"sum": lambda col: float(col.sum()), "max": lambda col: _nan_fold(max, col.tolist()),
           "min": lambda col: _nan_fold(min, col.tolist())}  # over the ranks' column of one slot


def merge_stats(a: dict, b: dict) -> dict:
    """a and b combined key by key: stats add, plain values keep a's (the first round's error message)."""
    out = dict(a)
    for key, value in b.items():
        mine = out.get(key)
        out[key] = mine + value if isinstance(mine, STATS) and isinstance(value, STATS) else (value if mine is None else mine)
    return out


def layout_fingerprint(keys: list[str], stats: list) -> float:
    """A number that differs (almost surely) when two ranks would pack different layouts; exact in float64."""
    return float(zlib.crc32("\n".join(f"{k}:{type(s).__name__}" for k, s in zip(keys, stats)).encode()))


def reduce_stats(metrics: dict, gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict:
    """Plain values of `metrics`: each stat reduced over ranks, other entries as they are, in their order.

    `gather` maps this rank's packed [K] tensor to every rank's, [ranks, K] (one collective; see
    `gather_over_ranks`); None is one process, with no collective."""
    keys = sorted(k for k, v in metrics.items() if isinstance(v, STATS))
    stats = [metrics[k] for k in keys]
    packed = torch.tensor([layout_fingerprint(keys, stats)] + [p for s in stats for p in s.parts()], dtype=torch.float64)
    rows = packed[None] if gather is None else gather(packed)
    if not torch.all(rows[:, 0] == rows[0, 0]):
        raise RuntimeError(f"ranks hold different metric keys; this rank's: {keys}")
    reduced, at = {}, 1
    for key, stat in zip(keys, stats):
        cols = rows[:, at : at + len(stat.ops)]
        reduced[key] = stat.value([_REDUCE[op](cols[:, j]) for j, op in enumerate(stat.ops)])
        at += len(stat.ops)
    return {k: reduced.get(k, v) for k, v in metrics.items()}


def gather_over_ranks(accelerator) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """`reduce_stats`'s gather through accelerate; None on one process, which then runs no collective."""
    if accelerator.num_processes == 1:
        return None

    def gather(packed: torch.Tensor) -> torch.Tensor:
        every = accelerator.gather(packed.to(accelerator.device))
        return every.reshape(accelerator.num_processes, -1).cpu()

    return gather
