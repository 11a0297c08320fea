"""Measure the memory of real training steps: a timeline with phases, and what it is made of.

    MemoryProfiler(model, optimizer, device)   hooks on the decoder layers and lm_head
      with profiler.step(n): train_step(..., on_phase=profiler.phase)
    profiler.samples()                          one Sample per mark, in order

A mark is taken at each phase change (forward, backward, optimizer) and at each decoder layer's
forward (recompute, under checkpointing) and backward. At every mark:

- `current`: bytes allocated now, and `peak`: the most allocated since the previous mark. On CUDA
  these are the caching allocator's own counters (`memory_allocated`, `max_memory_allocated`,
  reset at each mark). On CPU they come from the allocator events the torch profiler records
  (`profile_memory=True`): every allocation and free, added up from the tensors alive before.
- `parts`: exact tensor accounting of the categories: weights (frozen parameters and buffers),
  adapters (trainable parameters), gradients, optimizer state, activations (the distinct
  storages autograd holds for the backward, see memory.SavedTensors); `other` is the rest of
  `current` (recomputation under checkpointing, temporaries, the loss). bitsandbytes' paged
  optimizer state lives outside torch's allocator (CUDA unified memory): it is reported as
  `paged` and not counted in `current`.

On CPU the torch profiler's own chatter (Kineto's "USDT: ... profiler_start/stop" lines, c10's
"CPUAllocator.cpp: Memory block of unknown size ..." warning) is kept off the console:
`profiler_noise_filtered` holds stderr while the profiler runs and writes every other line back.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from qtrain.memory import SavedTensors

CATEGORIES = ("weights", "adapters", "gradients", "optimizer", "activations", "other")
_MARK = "qtrain.mark:"
PROFILER_NOISE = re.compile(
    r"USDT:\S+ \S+ \d+:\d+ \w+\.cpp:\d+\] profiler_(start|stop)$"  # Kineto, at every start and stop
    r"|\[W\S+ \S+ CPUAllocator\.cpp:\d+\] Memory block of unknown size was allocated before the profiling started"
)


@contextlib.contextmanager
def profiler_noise_filtered():
    """Stderr (file descriptor 2: C++ and Python alike) goes to a temporary file while the block runs;
    afterwards every line of it but PROFILER_NOISE is written back to stderr, errors included. Off
    when KINETO_LOG_LEVEL is set (the profiler's log was asked for) or stderr has no descriptor."""
    try:
        sys.stderr.flush()
        saved = None if "KINETO_LOG_LEVEL" in os.environ else os.dup(2)
    except (OSError, ValueError):  # fd 2 closed
        saved = None
    if saved is None:
        yield
        return
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            lines = held.read().splitlines(keepends=True)
            kept = [line for line in lines if not PROFILER_NOISE.match(line.decode(errors="replace").rstrip())]
            with open(2, "wb", closefd=False) as stderr:
                stderr.write(b"".join(kept))


@dataclass
class Sample:
    step: int
    phase: str  # forward | backward | optimizer
    label: str  # what starts at this mark, e.g. "layer 3", "recompute layer 3", "lm_head + loss"
    seconds: float  # since the first mark
    current: int = 0  # bytes allocated at the mark
    peak: int = 0  # most bytes allocated between the previous mark and this one
    parts: dict[str, int] = field(default_factory=dict)  # CATEGORIES at the mark
    paged: int = 0  # bitsandbytes paged optimizer state (outside torch's allocator)

    def to_dict(self) -> dict:
        return asdict(self)


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _nbytes(tensors) -> int:
    """Bytes of the distinct storages among `tensors`."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is not None and t.device.type != "meta":
            seen[_storage_key(t)] = t.untyped_storage().nbytes()
    return sum(seen.values())


def is_paged(t: torch.Tensor) -> bool:
    """bitsandbytes marks the optimizer state it puts in CUDA unified memory."""
    return bool(getattr(t, "is_paged", False))


def _start_cpu_profiler() -> torch.profiler.profile:
    """The torch profiler, recording CPU allocator events, started with its noise filtered. c10 warns
    when a block allocated before profiling is freed while it runs, on the first such free and every
    1000th: a block allocated just before the start and freed just after it takes that first warning
    here, inside the filter, instead of in the middle of the training steps."""
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
    with profiler_noise_filtered():
        primer = torch.empty(64)
        prof.__enter__()
        del primer
    return prof


class MemoryProfiler:
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device):
        self.model, self.optimizer, self.device = model, optimizer, device
        self.frozen = [p for p in model.parameters() if not p.requires_grad] + list(model.buffers())
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.saved = SavedTensors(exclude={_storage_key(t) for t in self.frozen + self.trainable})
        self._samples: list[Sample] = []
        self._step, self._phase, self._t0 = 0, "forward", None
        self._hooks: list = []
        self._profile = None  # CPU: torch.profiler.profile
        self._attach()

    # ---- marks ----

    def mark(self, label: str) -> None:
        if self._t0 is None:
            self._t0 = time.perf_counter()
        s = Sample(self._step, self._phase, label, time.perf_counter() - self._t0, parts=self.parts())
        s.paged = self._paged_bytes()
        if self.device.type == "cuda":
            s.current = torch.cuda.memory_allocated(self.device)
            s.peak = torch.cuda.max_memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:  # resolved from the profiler's allocator events in samples()
            with torch.profiler.record_function(f"{_MARK}{len(self._samples)}"):
                pass
        self._samples.append(s)

    def phase(self, name: str) -> None:
        """train_step's callback: "forward" (per micro-batch), "backward", "optimizer", "end"."""
        self._phase = name if name != "end" else self._phase
        labels = {"forward": "embeddings", "backward": "lm_head + loss backward", "optimizer": "clip + step", "end": "step done"}
        self.mark(labels[name])

    @contextlib.contextmanager
    def step(self, n: int):
        """Profile training step `n` (all its micro-batches)."""
        self._step = n
        if self.device.type == "cpu" and self._profile is None:
            self._baseline = sum(self.parts().values())
            self._profile = _start_cpu_profiler()
        elif self.device.type == "cuda" and not self._samples:
            torch.cuda.reset_peak_memory_stats(self.device)
        with self.saved:
            yield

    def _attach(self) -> None:
        decoder = self.model.get_decoder()
        for i, layer in enumerate(decoder.layers):
            self._hooks.append(layer.register_forward_pre_hook(self._on_layer_forward(i)))
            self._hooks.append(layer.register_forward_hook(self._on_layer_output(i)))
        self._hooks.append(decoder.norm.register_forward_pre_hook(self._on_forward("final norm")))
        self._hooks.append(decoder.register_forward_hook(self._on_decoder_output))

    def _in_forward(self) -> bool:
        return self._phase == "forward" and self._t0 is not None

    def _on_forward(self, label: str):
        def hook(module, args):  # a pre-hook that returns nothing leaves the inputs alone
            if self._in_forward():
                self.mark(label)

        return hook

    def _on_decoder_output(self, module, args, output) -> None:
        if self._in_forward():
            self.mark("lm_head + loss")

    def _on_layer_forward(self, i: int):
        def hook(module, args):
            if self._t0 is not None:
                self.mark(f"layer {i}" if self._phase == "forward" else f"recompute layer {i}")

        return hook

    def _on_layer_output(self, i: int):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            if self._in_forward() and torch.is_grad_enabled() and out.requires_grad:
                out.register_hook(lambda grad: self.mark(f"backward layer {i}"))

        return hook

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    # ---- accounting ----

    def parts(self) -> dict[str, int]:
        state = [t for s in self.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        on_device = [t for t in state if t.device.type == self.device.type and not is_paged(t)]
        return {
            "weights": _nbytes(self.frozen),
            "adapters": _nbytes(self.trainable),
            "gradients": _nbytes(p.grad for p in self.trainable),
            "optimizer": _nbytes(on_device),
            "activations": self.saved.bytes,
        }

    def _paged_bytes(self) -> int:
        state = [t for s in self.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        return _nbytes(t for t in state if is_paged(t))

    def samples(self) -> list[Sample]:
        """The marks so far, with `current`, `peak` and `other` filled in."""
        if self._profile is not None:
            with profiler_noise_filtered():
                self._profile.__exit__(None, None, None)
            self._resolve_cpu(self._profile)
            self._profile = None
        for s in self._samples:
            s.parts["other"] = s.current - sum(v for k, v in s.parts.items() if k != "other")
        return self._samples

    def _resolve_cpu(self, prof) -> None:
        """Allocator totals at each mark and peaks between marks, from the profiler's events."""
        allocs, marks = cpu_allocations(prof), {}
        for node in _events(prof):
            if node.name.startswith(_MARK):
                marks[int(node.name[len(_MARK) :])] = node.start_time_ns
        i, total, peak = 0, 0, 0
        for n, s in enumerate(self._samples):
            t = marks.get(n)
            if t is None:  # a mark taken outside the profiled steps
                continue
            while i < len(allocs) and allocs[i][0] <= t:  # the running total since profiling began
                total += allocs[i][1]
                peak = max(peak, total)
                i += 1
            s.current, s.peak = self._baseline + total, self._baseline + peak
            peak = total


def _events(prof):
    """Every event of a finished torch.profiler.profile, nested ones included."""
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        yield node


def cpu_allocations(prof) -> list[tuple[int, int]]:
    """(time in ns, +bytes allocated or -bytes freed) of the CPU allocator events a profile with
    `profile_memory=True` recorded, in time order (their sizes: the `total_allocated` the events carry
    also counts earlier profiling sessions)."""
    from torch._C._profiler import _EventType

    allocs = [
        (node.start_time_ns, node.extra_fields.alloc_size)
        for node in _events(prof)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu"
    ]
    return sorted(allocs)


def cpu_peak_bytes(fn) -> tuple[int, object]:
    """(most bytes the CPU allocator held above its level at the start while `fn()` ran, fn's result)."""
    prof = _start_cpu_profiler()
    try:
        result = fn()
    finally:
        with profiler_noise_filtered():
            prof.__exit__(None, None, None)
    total, peak = 0, 0
    for _, size in cpu_allocations(prof):
        total += size
        peak = max(peak, total)
    return peak, result


def peak_sample(samples: list[Sample]) -> Sample:
    """The mark that closes the interval with the highest peak."""
    return max(samples, key=lambda s: s.peak)
