"""What backend="auto" means for every kernel: Triton on CUDA, the pure-torch twin elsewhere, unless
`kernel_backend("torch")` forces the twins (for measuring what the kernels buy, and for checking a whole
model's fused path against its twin)."""
from __future__ import annotations

from contextlib import contextmanager

_forced: str | None = None


@contextmanager
def kernel_backend(name: str):
    """Within the block, kernels called with backend="auto" use `name` ("torch" or "triton")."""
    global _forced
    if name not in ("torch", "triton", "auto"):
        raise ValueError(f"kernel_backend: expected 'torch', 'triton' or 'auto', got {name!r}")
    previous, _forced = _forced, (None if name == "auto" else name)
    try:
        yield
    finally:
        _forced = previous


def resolve(backend: str) -> str:
    return _forced if backend == "auto" and _forced is not None else backend
