"""Memory: offloading checkpointed activations to CPU RAM, and peak-memory readings."""

from __future__ import annotations

import resource
import sys

import torch
from torch import nn


class OffloadActivations(torch.autograd.graph.saved_tensors_hooks):
    """Within this context, tensors autograd saves for the backward move to (pinned) CPU RAM and come
    back to their device when the backward needs them.

    Used around the decoder with gradient checkpointing on: the checkpointed layers save only their
    inputs (the hidden states [B, S, D] at every layer boundary) and these are what moves, so GPU
    memory no longer grows with the number of layers. Inside a checkpointed layer torch's own hooks
    take precedence (nothing is saved there). Parameters are never copied.

    `devices`: device types whose tensors are offloaded (CPU tensors stay by default; tests pass
    ("cpu",) to exercise the copy path). `count`/`bytes` add up what was offloaded.
    """

    def __init__(self, devices: tuple[str, ...] = ("cuda",), pin_memory: bool | None = None):
        self.devices = devices
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.count, self.bytes = 0, 0
        super().__init__(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor):
        if isinstance(t, nn.Parameter) or t.device.type not in self.devices:
            return None, t
        host = torch.empty(t.size(), dtype=t.dtype, layout=t.layout, pin_memory=self.pin_memory)
        host.copy_(t, non_blocking=self.pin_memory)
        self.count += 1
        self.bytes += t.numel() * t.element_size()
        return t.device, host

    @staticmethod
    def _unpack(packed) -> torch.Tensor:
        device, t = packed
        return t if device is None else t.to(device, non_blocking=True)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory so far: CUDA bytes allocated by torch, or on CPU the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB
