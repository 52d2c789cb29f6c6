"""What rank 0, the one rank that reads the checkpoint of a sharded run (FSDP2, ZeRO-3), tells the others before
each builds its share of the model: the config, every tensor's dtype, the gradient-checkpointing switch."""
from __future__ import annotations

import torch
from torch import nn


def tensor_dtypes(model: nn.Module) -> dict[str, torch.dtype]:
    """Parameters' and buffers' dtypes by name (bf16 weights beside the float32 balancing bias and rope tables)."""
    return {name: t.dtype for name, t in [*model.named_parameters(), *model.named_buffers()]}


def send_buffers(model: nn.Module, full: nn.Module | None, names) -> None:
    """`model`'s buffers `names` take rank 0's values (from `full`, its loaded model; None on the other ranks)."""
    for name in names:
        buffer = model.get_buffer(name)
        if full is not None:
            buffer.copy_(full.get_buffer(name))
        torch.distributed.broadcast(buffer, src=0)


def model_spec(full: nn.Module | None) -> tuple:
    """(config, tensor dtypes, gradient checkpointing) of rank 0's `full` model, on every rank (None elsewhere)."""
    spec = [full.config, tensor_dtypes(full), full.gradient_checkpointing] if full is not None else [None] * 3
    torch.distributed.broadcast_object_list(spec, src=0)
    return tuple(spec)
