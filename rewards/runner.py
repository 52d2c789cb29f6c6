"""Scoring a batch with a recipe's rewards: each reward called once per batch (inline, or in a
worker process with a timeout), failures turned into None for the samples they hit, the weighted
per-sample total, and metrics (means, None counts, error counts and the first error message).

Neighbours: rewards/registry.py resolves names into functions, rewards/pool.py runs the isolated
calls; the GRPO step calls RewardRunner and reads `totals`, `keep` and `metrics`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from .pool import OK, TIMEOUT, Call, RewardPool
from .registry import RewardSpec, absolute_name, default_isolation, load_reward, parse_reward_specs

NONE_POLICIES = ("zero", "drop_group")


@dataclass
class RewardOutput:
    """totals: weighted sum per sample (None where the sample's group was dropped).
    per_function: each reward's own values, by label. keep: False for samples of dropped groups.
    metrics: flat `rewards/<label>/<stat>` entries for the trainer's log."""

    totals: list
    per_function: dict
    keep: list
    metrics: dict = field(default_factory=dict)


def combine_rewards(per_function: dict, weights: dict, none_policy: str = "zero", group_size: int = 1):
    """(totals, keep) from per-function values. A None counts as 0 ("zero") or drops every sample
    of its group of `group_size` consecutive completions ("drop_group": no advantage from a group
    that could not be fully scored)."""
    if none_policy not in NONE_POLICIES:
        raise ValueError(f"none_policy={none_policy!r}; expected one of {NONE_POLICIES}")
    missing = set(per_function) - set(weights)
    if missing:
        raise ValueError(f"no weight given for rewards {sorted(missing)}")
    lengths = {len(v) for v in per_function.values()}
    if len(lengths) > 1:
        raise ValueError(f"rewards have different lengths {sorted(lengths)}; expected one value per completion each")
    n = lengths.pop() if lengths else 0
    if group_size < 1 or n % group_size:
        raise ValueError(f"group_size={group_size} does not divide the {n} completions")
    totals, has_none = [], []
    for i in range(n):
        values = [(weights[name], vals[i]) for name, vals in per_function.items()]
        has_none.append(any(v is None for _, v in values))
        totals.append(sum(w * v for w, v in values if v is not None))
    keep = [True] * n
    if none_policy == "drop_group":
        for start in range(0, n, group_size):
            if any(has_none[start:start + group_size]):
                for i in range(start, start + group_size):
                    keep[i], totals[i] = False, None
    return totals, keep


def _as_rewards(value, n: int) -> tuple[list, list]:
    """Check a reward's return value: n numbers or None. Returns (values, failures) where
    failures[i] is the message for an element that was not a finite number, else None."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"returned {type(value).__name__}; expected a list of {n} floats or None")
    if len(value) != n:
        raise ValueError(f"returned {len(value)} values for {n} completions")
    out, failures = [], []
    for v in value:
        failure = None
        if v is None:
            f = None
        else:
            try:
                f = float(v)
                if not math.isfinite(f):
                    f, failure = None, f"returned the non-finite value {f}"
            except (TypeError, ValueError):
                f, failure = None, f"returned {v!r} ({type(v).__name__}); expected a float or None"
        out.append(f)
        failures.append(failure)
    return out, failures


@dataclass
class _Scored:
    """One reward's values on a batch; failures[i] says why sample i got None from a failure."""

    values: list
    failures: list
    first_error: str | None = None

    def set(self, i: int, value, failure) -> None:
        self.values[i], self.failures[i] = value, failure
        if failure and self.first_error is None:
            self.first_error = failure


class RewardRunner:
    """Calls a recipe's rewards on batches. `specs`: RewardSpecs or the recipe's raw `rewards:` value.
    `none_policy`: what a None does to the total ("zero" or "drop_group"). Rewards isolated in a
    process run on a pool of `pool_size` workers; inline rewards get no timeout (they are trusted)."""

    def __init__(self, specs, none_policy: str = "zero", pool_size: int | None = None, base_dir=None):
        if none_policy not in NONE_POLICIES:
            raise ValueError(f"none_policy={none_policy!r}; expected one of {NONE_POLICIES}")
        if not (isinstance(specs, (list, tuple)) and all(isinstance(s, RewardSpec) for s in specs)):
            specs = parse_reward_specs(specs, base_dir=base_dir)
        self.specs = [replace(s, name=absolute_name(s.name, base_dir)) for s in specs]
        self.none_policy = none_policy
        self.fns = [load_reward(s.name) for s in self.specs]
        self.isolation = [s.isolation or default_isolation(fn) for s, fn in zip(self.specs, self.fns)]
        n_isolated = self.isolation.count("process")
        self._pool_size = pool_size or max(1, min(2, n_isolated))
        self._pool: RewardPool | None = None

    @property
    def pool(self) -> RewardPool:
        if self._pool is None:
            self._pool = RewardPool(self._pool_size)
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- calling ------------------------------------------------------------------------------
    def _call_kwargs(self, spec, prompts, completions, columns, index=None) -> dict:
        if index is not None:
            prompts = prompts[index:index + 1]
            completions = completions[index:index + 1]
            columns = {k: v[index:index + 1] for k, v in columns.items()}
        # Spec kwargs win over same-named columns: the recipe author set them on purpose.
        return {"prompts": prompts, "completions": completions, **columns, **spec.kwargs}

    def _run_inline(self, k, prompts, completions, columns, n) -> _Scored:
        spec, fn = self.specs[k], self.fns[k]
        scored = _Scored([None] * n, [None] * n)
        try:
            values, failures = _as_rewards(fn(**self._call_kwargs(spec, prompts, completions, columns)), n)
            for i in range(n):
                scored.set(i, values[i], failures[i])
            return scored
        except Exception as e:  # noqa: BLE001 - reported, then each sample is retried alone
            scored.first_error = f"{type(e).__name__}: {e}"
        for i in range(n):
            try:
                v, f = _as_rewards(fn(**self._call_kwargs(spec, prompts, completions, columns, i)), 1)
                scored.set(i, v[0], f[0])
            except Exception as e:  # noqa: BLE001
                scored.set(i, None, f"{type(e).__name__}: {e}")
        return scored

    def _take(self, scored: _Scored, idx: list[int], outcome) -> None:
        """Store a pool outcome covering samples idx."""
        if outcome.status == OK:
            try:
                values, failures = _as_rewards(outcome.value, len(idx))
                for j, i in enumerate(idx):
                    scored.set(i, values[j], failures[j])
                return
            except (TypeError, ValueError) as e:
                outcome.error = str(e)
        for i in idx:
            scored.set(i, None, outcome.error)

    def _run_isolated(self, ks, prompts, completions, columns, n) -> dict:
        results = {k: _Scored([None] * n, [None] * n) for k in ks}
        # Workers resolve the reward by name: a plug-in file's functions cannot be pickled by reference.
        calls = [Call(self.specs[k].name, self._call_kwargs(self.specs[k], prompts, completions, columns), self.specs[k].timeout_s) for k in ks]
        retry = []
        for k, outcome in zip(ks, self.pool.run(calls)):
            if outcome.status == OK or outcome.status == TIMEOUT:
                # After a timeout, re-running each sample against the same limit could take
                # n × timeout: the batch is given up.
                self._take(results[k], list(range(n)), outcome)
            else:
                results[k].first_error = outcome.error
                retry.append(k)
        for k in retry:  # per-sample calls, pool-width at a time, stopping at the first timeout
            spec = self.specs[k]
            for start in range(0, n, self.pool.size):
                idx = list(range(start, min(n, start + self.pool.size)))
                calls = [Call(self.specs[k].name, self._call_kwargs(spec, prompts, completions, columns, i), spec.timeout_s) for i in idx]
                outcomes = self.pool.run(calls)
                for i, outcome in zip(idx, outcomes):
                    self._take(results[k], [i], outcome)
                if any(o.status == TIMEOUT for o in outcomes):
                    for i in range(idx[-1] + 1, n):
                        results[k].set(i, None, f"skipped after a per-sample timeout of {spec.timeout_s:g} s")
                    break
        return results

    def __call__(self, prompts, completions, group_size: int = 1, **columns) -> RewardOutput:
        n = len(completions)
        prompts = list(prompts) if prompts is not None else [None] * n
        if len(prompts) != n:
            raise ValueError(f"{len(prompts)} prompts for {n} completions; expected one prompt per completion")
        for name, col in columns.items():
            if name in ("prompts", "completions"):
                raise ValueError(f"a dataset column is named {name!r}, which rewards receive as an argument; rename the column")
            if not isinstance(col, (list, tuple)) or len(col) != n:
                got = len(col) if isinstance(col, (list, tuple)) else type(col).__name__
                raise ValueError(f"column {name!r} has {got} values for {n} completions; expected a list of {n}")
        columns = {k: list(v) for k, v in columns.items()}
        isolated = [k for k, iso in enumerate(self.isolation) if iso == "process"]
        results = self._run_isolated(isolated, prompts, completions, columns, n) if isolated else {}
        for k, iso in enumerate(self.isolation):
            if iso == "inline":
                results[k] = self._run_inline(k, prompts, completions, columns, n)

        per_function, metrics = {}, {}
        for k, spec in enumerate(self.specs):
            scored = results[k]
            label = spec.column
            per_function[label] = scored.values
            present = [v for v in scored.values if v is not None]
            if present:
                mean = sum(present) / len(present)
                metrics[f"rewards/{label}/mean"] = mean
                metrics[f"rewards/{label}/std"] = math.sqrt(sum((v - mean) ** 2 for v in present) / len(present))
            metrics[f"rewards/{label}/none_count"] = n - len(present)
            metrics[f"rewards/{label}/error_count"] = sum(f is not None for f in scored.failures)
            if scored.first_error:
                metrics[f"rewards/{label}/first_error"] = scored.first_error
        totals, keep = combine_rewards(per_function, {s.column: s.weight for s in self.specs}, self.none_policy, group_size)
        kept = [t for t, kp in zip(totals, keep) if kp]
        if kept:
            metrics["rewards/total/mean"] = sum(kept) / len(kept)
        metrics["rewards/dropped_samples"] = keep.count(False)
        return RewardOutput(totals=totals, per_function=per_function, keep=keep, metrics=metrics)
