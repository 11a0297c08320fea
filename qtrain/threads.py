"""How many threads torch's CPU ops use: every core while the machine is otherwise idle, one core
fewer for each core's worth of other work.

    governor = ThreadGovernor(cfg.train.threads)   # None: adaptive; 0: torch's default; N: N threads
    governor.tick()                                # between steps: re-decides every `interval` seconds

Why: torch runs one OpenMP thread per core. When another busy process takes a core from one of them,
every parallel op waits for that thread while the others spin on their cores, and a run slows down
several times over (the quickstart on 2 cores beside one busy process: 2.8x its idle time with 2
threads, 1.0x with 1; passive OpenMP waits also held up, but cost 45% when idle: benchmarks/busy.py).
A fixed "every core but one" would cost an idle 2-core machine a third of its speed, so the governor
measures instead: every `interval` seconds it reads the CPU time the whole machine spent busy
(/proc/stat) and subtracts this process's own; the rest, in cores, is other work, and torch gets
`cores - round(other)` threads (at least one). Where /proc/stat does not exist it keeps torch's default.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch


def machine_cpu_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy since boot (Linux /proc/stat), or None elsewhere."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 8:
        return None
    user, nice, system, _idle, _iowait, irq, softirq = map(int, fields[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


@functools.cache
def torch_default_threads() -> int:
    """torch's own thread count (one per core it may use), read once, before qtrain changes it."""
    return torch.get_num_threads()


class ThreadGovernor:
    def __init__(
        self,
        setting: int | None,
        interval: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        machine_seconds: Callable[[], float | None] = machine_cpu_seconds,
        own_seconds: Callable[[], float] = time.process_time,
        cores: int | None = None,
    ):
        """`setting`: None adapts, 0 keeps torch's default, N > 0 fixes N threads. `cores`: the threads
        torch uses by default (`torch_default_threads`)."""
        self.setting, self.interval = setting, interval
        self._clock, self._machine, self._own = clock, machine_seconds, own_seconds
        self.cores = cores or torch_default_threads()
        self.threads = self.setting or self.cores
        torch.set_num_threads(self.threads)
        self._last = self._reading() if setting is None else None

    def _reading(self) -> tuple[float, float, float] | None:
        machine = self._machine()
        return None if machine is None else (self._clock(), machine, self._own())

    def other_cores(self) -> float | None:
        """Cores' worth of CPU time other processes used since the last reading, once `interval`
        seconds have passed (None before that, or without /proc/stat)."""
        if self._last is None or self._clock() - self._last[0] < self.interval:
            return None
        now = self._reading()
        (t0, machine0, own0), (t1, machine1, own1) = self._last, now
        self._last = now
        return max(0.0, (machine1 - machine0) - (own1 - own0)) / (t1 - t0)

    def tick(self) -> int:
        """Re-decide the thread count when `interval` has passed (adaptive only); returns it."""
        other = self.other_cores()
        if other is not None:
            wanted = max(1, self.cores - int(other + 0.5))
            if wanted != self.threads:
                torch.set_num_threads(wanted)
                self.threads = wanted
        return self.threads

    def describe(self) -> str:
        """"2 CPU threads, adaptive" for the console."""
        how = "adaptive" if self.setting is None else "torch's default" if self.setting == 0 else "train.threads"
        return f"{self.threads} CPU threads, {how}"
