"""AdamW and the learning-rate schedule of a recipe's `optim` section."""
from __future__ import annotations

import math

import torch


def build_optimizer(params, optim, max_steps: int, device: torch.device | None = None):
    """AdamW over the trainable `params` and its schedule. `device`: where the tensors it will step live when
    that is not where `params` are now (ZeRO-3 moves host-loaded weights onto the GPU after this)."""
    params = [p for p in params if p.requires_grad]
    # the fused CUDA kernel: one launch for all parameters instead of a foreach chain (what TRL picks too)
    on_cuda = torch.device(device).type == "cuda" if device is not None else all(p.is_cuda for p in params)
    fused = bool(params) and on_cuda
    optimizer = torch.optim.AdamW(params, lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay,
                                  fused=fused or None)

    def factor(step: int) -> float:
        if optim.warmup_steps and step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        if optim.scheduler == "constant":
            return 1.0
        progress = (step - optim.warmup_steps) / max(1, max_steps - optim.warmup_steps)
        progress = min(max(progress, 0.0), 1.0)
        return 0.5 * (1 + math.cos(math.pi * progress)) if optim.scheduler == "cosine" else 1.0 - progress

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
