"""Finding reward functions by name: the built-in registry, `package.module:function` and
`path/to/file.py:function` plug-ins, and the recipe's reward list parsed into RewardSpec entries.

A reward is TRL's `f(prompts, completions, **columns) -> list[float | None]`, always called with
keyword arguments. rewards/runner.py calls what this module resolves; the built-in modules are
imported (and register themselves) on the first lookup.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

RewardFn = Callable[..., list]

_REGISTRY: dict[str, RewardFn] = {}
_FILE_MODULES: dict[str, object] = {}
ISOLATIONS = ("inline", "process")
# Imported on the first lookup, not with the package: math-verify and sympy take a second to load,
# and the sandbox or the runner alone need neither.
BUILTIN_MODULES = ("math", "exact", "format", "language", "length", "code", "reward_model")
_builtins_loaded = False


def _ensure_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        for module in BUILTIN_MODULES:
            importlib.import_module(f"{__package__}.{module}")
        _builtins_loaded = True


def register(name: str, isolation: str = "inline"):
    """Decorator: make a reward loadable by `name`. `isolation` is where the runner calls it by
    default: "inline" (trusted and fast) or "process" (a worker process with a timeout)."""
    if isolation not in ISOLATIONS:
        raise ValueError(f"isolation={isolation!r}; expected one of {ISOLATIONS}")

    def wrap(fn):
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"reward name {name!r} is already registered to {_REGISTRY[name]!r}")
        fn.r1pipe_isolation = isolation
        _REGISTRY[name] = fn
        return fn

    return wrap


def available_rewards() -> list[str]:
    _ensure_builtins()
    return sorted(_REGISTRY)


def _did_you_mean(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _is_file_ref(ref: str) -> bool:
    if ref in _REGISTRY or ":" not in ref:
        return False
    where = ref.rsplit(":", 1)[0]
    return where.endswith(".py") or "/" in where or os.sep in where


def absolute_name(name: str, base_dir=None) -> str:
    """A `file.py:function` name with its path made absolute (from base_dir, else the working dir),
    so a worker process resolves it whatever its working directory; other names unchanged."""
    if not isinstance(name, str) or not _is_file_ref(name):
        return name
    where, fn = name.rsplit(":", 1)
    return f"{(Path(base_dir or os.getcwd()) / where).resolve()}:{fn}"


def _load_file_module(path: Path):
    key = str(path)
    if key not in _FILE_MODULES:
        if not path.is_file():
            raise ValueError(f"reward plug-in file {path} does not exist (from a 'path/to/file.py:function' reward name)")
        # A unique module name per file, so two plug-ins both called rewards.py do not collide.
        mod_name = "r1pipe_reward_plugin_" + hashlib.sha1(key.encode()).hexdigest()[:12]
        spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _FILE_MODULES[key] = module
    return _FILE_MODULES[key]


def load_reward(ref: str | RewardFn, base_dir: str | os.PathLike | None = None) -> RewardFn:
    """Resolve a reward: a registered name, `package.module:function`, or `path/to/file.py:function`
    (a relative path is taken from `base_dir`, normally the recipe's folder, else the working dir).
    A callable is returned as is."""
    if callable(ref):
        return ref
    if not isinstance(ref, str) or not ref:
        raise ValueError(f"reward name must be a non-empty string, got {ref!r}")
    if ":" not in ref:
        _ensure_builtins()
    if ref in _REGISTRY:
        return _REGISTRY[ref]
    if ":" not in ref:
        raise ValueError(
            f"unknown reward {ref!r}{_did_you_mean(ref, _REGISTRY)}. Available rewards: "
            f"{', '.join(available_rewards())}; or name a plug-in as 'package.module:function' "
            f"or 'path/to/file.py:function'."
        )
    where, func_name = ref.rsplit(":", 1)
    if _is_file_ref(ref):
        path = Path(where)
        if not path.is_absolute():
            path = Path(base_dir or os.getcwd()) / path
        module = _load_file_module(path.resolve())
        origin = str(path)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise ValueError(f"reward {ref!r}: cannot import module {where!r} ({e})") from e
        origin = f"module {where}"
    fn = getattr(module, func_name, None)
    if fn is None:
        names = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        raise ValueError(
            f"reward {ref!r}: {origin} has no function {func_name!r}{_did_you_mean(func_name, names)}. "
            f"Functions there: {', '.join(sorted(names)) or 'none'}"
        )
    if not callable(fn):
        raise ValueError(f"reward {ref!r}: {func_name!r} in {origin} is not callable")
    return fn


@dataclass(frozen=True)
class RewardSpec:
    """One entry of a recipe's reward list.

    name: registry name, `package.module:function` or `path/to/file.py:function`.
    weight: multiplies this reward in the per-sample total.
    kwargs: extra keyword arguments bound to the function (they override same-named dataset columns).
    isolation: "inline", "process", or None for the function's own default (plug-ins: "process").
    timeout_s: per-call limit when run in a worker process.
    label: the metric / column name (default: the name's last part).
    """

    name: str
    weight: float = 1.0
    kwargs: dict = field(default_factory=dict)
    isolation: str | None = None
    timeout_s: float = 30.0
    label: str | None = None

    @property
    def column(self) -> str:
        if self.label:
            return self.label
        tail = self.name.rsplit(":", 1)[-1]
        return tail


_SPEC_KEYS = ("name", "weight", "kwargs", "isolation", "timeout_s", "label")


def parse_reward_specs(config, base_dir=None, where: str = "rewards") -> list[RewardSpec]:
    """Turn a recipe's `rewards:` value into RewardSpecs, checking every name resolves.

    Accepted forms: a list whose items are a name or a mapping with keys name, weight, kwargs,
    isolation, timeout_s, label; or a mapping {name: weight} / {name: {weight: …, kwargs: …}}."""
    if isinstance(config, dict):
        items = []
        for name, value in config.items():
            items.append({"name": name, **value} if isinstance(value, dict) else {"name": name, "weight": value})
    elif isinstance(config, (list, tuple)):
        items = list(config)
    else:
        raise ValueError(f"{where}: expected a list of rewards or a {{name: weight}} mapping, got {type(config).__name__}")
    specs = []
    for i, item in enumerate(items):
        at = f"{where}[{i}]"
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, dict):
            raise ValueError(f"{at}: expected a reward name or a mapping, got {item!r}")
        for key in item:
            if key not in _SPEC_KEYS:
                raise ValueError(f"{at}: unknown key {key!r}{_did_you_mean(key, _SPEC_KEYS)}. Expected keys: {', '.join(_SPEC_KEYS)}")
        if "name" not in item:
            raise ValueError(f"{at}: missing key 'name' (a registry name, 'package.module:function' or 'file.py:function')")
        kwargs = item.get("kwargs") or {}
        if not isinstance(kwargs, dict):
            raise ValueError(f"{at}.kwargs: expected a mapping, got {kwargs!r}")
        isolation = item.get("isolation")
        if isolation is not None and isolation not in ISOLATIONS:
            raise ValueError(f"{at}.isolation: {isolation!r}; expected one of {ISOLATIONS}")
        try:
            weight = float(item.get("weight", 1.0))
            timeout_s = float(item.get("timeout_s", 30.0))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{at}: weight and timeout_s must be numbers ({e})") from e
        name = absolute_name(item["name"], base_dir)
        try:
            load_reward(name)
        except ValueError as e:
            raise ValueError(f"{at}: {e}") from e
        specs.append(RewardSpec(name=name, weight=weight, kwargs=dict(kwargs), isolation=isolation,
                                timeout_s=timeout_s, label=item.get("label")))
    labels = [s.column for s in specs]
    dupes = sorted({l for l in labels if labels.count(l) > 1})
    if dupes:
        raise ValueError(f"{where}: reward labels {dupes} appear twice; give each a distinct 'label'")
    return specs


def default_isolation(fn: RewardFn) -> str:
    """Built-ins say where they run; anything else (user code) runs in a worker process."""
    return getattr(fn, "r1pipe_isolation", "process")
