"""Offloading the frozen KL reference: its decoder layers' parameters live in (pinned) CPU memory and
come to the GPU one layer at a time while it runs (`grpo.reference_offload`, what verl calls the ref
model's param_offload). The reference only ever runs forward, once per step, so the GPU memory of one
bf16 copy of the model is traded for one host-to-device copy of it per step; the next layer's copy runs
on a side stream while the current layer computes.

Embeddings, final norm and LM head stay on the GPU (the fused log-prob head reads the LM head whole).
`offload_layers` works on any device: on the CPU the "copy" is a real copy too, so the hooks and the
bookkeeping run in CI exactly as on the GPU, minus the streams.
"""
from __future__ import annotations

import functools

import torch
from torch import nn


class LayerOffload:
    """Hooks that bring a decoder layer's parameters to `device` before its forward and drop the
    device copy after it, prefetching the next layer's. Parameters keep their identity: only `.data`
    switches between the pinned host tensor and the device copy, so state_dict/load_state_dict (ref
    reset, checkpoints) see the host tensors."""

    def __init__(self, layers: list[nn.Module], device: torch.device):
        self.device = torch.device(device)
        self.layers = layers
        self.on_cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.device) if self.on_cuda else None
        self.home: list[list[tuple[nn.Parameter, torch.Tensor]]] = []
        for layer in layers:
            home = []
            for p in layer.parameters():
                if p.requires_grad:
                    raise ValueError("offload_layers is for a frozen model (the KL reference); a parameter requires grad")
                host = p.detach().to("cpu", copy=True)
                p.data = host.pin_memory() if self.on_cuda else host
                home.append((p, p.data))
            self.home.append(home)
        self.staged: dict[int, tuple[torch.cuda.Event | None, list[torch.Tensor]]] = {}
        self.handles = []
        for i, layer in enumerate(layers):
            self.handles.append(layer.register_forward_pre_hook(functools.partial(self._before, i)))
            self.handles.append(layer.register_forward_hook(functools.partial(self._after, i)))

    def _stage(self, i: int) -> None:
        # device copies of layer i's parameters, issued on the copy stream (host memory is pinned: async)
        if self.on_cuda:
            with torch.cuda.stream(self.copy_stream):
                copies = [host.to(self.device, non_blocking=True) for _, host in self.home[i]]
                done = torch.cuda.Event()
                done.record(self.copy_stream)
        else:
            copies, done = [host.to(self.device, copy=True) for _, host in self.home[i]], None
        self.staged[i] = (done, copies)

    def _before(self, i: int, module, args) -> None:
        if i not in self.staged:
            self._stage(i)
        done, copies = self.staged.pop(i)
        if done is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(done)
            for t in copies:
                # the copies were allocated on the copy stream: their memory must not be reused before
                # the compute stream is done with them
                t.record_stream(compute)
        for (p, _), t in zip(self.home[i], copies):
            p.data = t
        if i + 1 < len(self.layers):
            self._stage(i + 1)

    def _after(self, i: int, module, args, output) -> None:
        for p, host in self.home[i]:
            p.data = host


def offload_layers(model: nn.Module, device) -> LayerOffload:
    """Offload `model.model.layers` (a DeepSeekPolicy's decoder layers) to host memory, streamed to
    `device` layer by layer in every forward; the rest of the model stays where it is (on `device`)."""
    offload = LayerOffload(list(model.model.layers), device)
    model.layer_offload = offload
    return offload


def is_offloaded(model: nn.Module | None) -> bool:
    return model is not None and getattr(model, "layer_offload", None) is not None
