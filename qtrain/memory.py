"""Memory: offloading checkpointed activations to CPU RAM, and peak-memory readings."""

from __future__ import annotations

import resource
import sys
import weakref

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

    def __init__(self, devices: tuple[str, ...] = ("cuda",), pin_memory: bool | None = None, keep=None):
        self.devices = devices
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.keep = keep  # a SavedTensors that accounts for the tensors left in place (memory profiling)
        self.count, self.bytes = 0, 0
        super().__init__(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor):
        if isinstance(t, nn.Parameter) or t.device.type not in self.devices:
            return None, (self.keep.pack(t) if self.keep else t)
        host = torch.empty(t.size(), dtype=t.dtype, layout=t.layout, pin_memory=self.pin_memory)
        host.copy_(t, non_blocking=self.pin_memory)
        self.count += 1
        self.bytes += t.numel() * t.element_size()
        return t.device, host

    def _unpack(self, packed) -> torch.Tensor:
        device, t = packed
        if device is None:
            return self.keep.unpack(t) if self.keep else t
        return t.to(device, non_blocking=True)


class _Held:
    """What autograd keeps for one saved tensor while SavedTensors is active; freed with the graph node."""

    __slots__ = ("__weakref__", "tensor")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


class SavedTensors(torch.autograd.graph.saved_tensors_hooks):
    """Exact accounting of what autograd holds for the backward: `bytes` is the size of the distinct
    storages saved and not yet released (a tensor saved by several ops counts once; parameters and
    the `exclude` storages, e.g. buffers, not at all). Tensors are kept as they are, only counted.

    Non-reentrant checkpointing saves each layer's inputs through these hooks; the activations it
    recomputes during the backward are held by the checkpoint itself and are not counted here.
    """

    def __init__(self, exclude: set[int] = frozenset()):
        self.exclude = exclude
        self.bytes = 0
        self._refs: dict[int, int] = {}  # storage data_ptr → live saved tensors on it
        super().__init__(self.pack, self.unpack)

    def pack(self, t: torch.Tensor) -> _Held:
        held = _Held(t)
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if isinstance(t, nn.Parameter) or key in self.exclude or t.device.type == "meta" or not key:
            return held
        if self._refs.get(key, 0) == 0:
            self.bytes += storage.nbytes()
        self._refs[key] = self._refs.get(key, 0) + 1
        weakref.finalize(held, self._release, key, storage.nbytes())
        return held

    @staticmethod
    def unpack(held: _Held) -> torch.Tensor:
        return held.tensor

    def _release(self, key: int, nbytes: int) -> None:
        self._refs[key] -= 1
        if self._refs[key] == 0:
            del self._refs[key]
            self.bytes -= nbytes


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory so far: CUDA bytes allocated by torch, or on CPU the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB
