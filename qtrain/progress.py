"""Training progress on the console: a live bar on a terminal, plain lines anywhere else.

    with TrainProgress(console, total=600, start=0, device_type="cpu", every_steps=20) as progress:
        progress.update(step, loss, lr, tokens_per_s, mem_gib)
        progress.console.print("eval ...")      # prints above the bar on a terminal

On a terminal: rich's bar (step, loss, lr, tok/s, memory, elapsed, ETA), redrawn in place. When the
console is not a terminal (a log file, `nohup`, CI), a redrawn bar would print nothing until the end;
instead one plain line is printed at the first step, every `every_steps` steps, whenever
`every_seconds` have passed since the last line, and at the last step, with the mean loss of the
steps since the line before:

    step 120/600 (20%) loss 1.2345 lr 2.94e-03 5,310 tok/s RSS 0.21 GiB elapsed 0:00:24 ETA 0:01:36
"""

from __future__ import annotations

import time
from collections.abc import Callable

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def _clock(seconds: float) -> str:
    """0:01:36."""
    s = int(max(seconds, 0))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class TrainProgress:
    def __init__(
        self,
        console: Console,
        total: int,
        start: int,
        device_type: str,
        every_steps: int,
        every_seconds: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.total, self.start, self.every_steps, self.every_seconds = total, start, every_steps, every_seconds
        self.mem_name = "GPU" if device_type == "cuda" else "RSS"
        self._clock, self._t0, self._last = clock, None, None
        self._losses: list[float] = []  # since the last plain line
        self._live = console.is_terminal
        self._bar = _bar(console, self.mem_name) if self._live else None
        self._console = console
        self._task = None

    @property
    def console(self) -> Console:
        """The console to print other lines on (above the bar on a terminal)."""
        return self._bar.console if self._bar else self._console

    def __enter__(self) -> TrainProgress:
        self._t0 = self._clock()
        if self._bar:
            self._bar.__enter__()
            self._task = self._bar.add_task("train", total=self.total, completed=self.start, loss=float("nan"), lr=0.0, tps=0.0, mem=0.0, extra="")
        return self

    def __exit__(self, *exc) -> bool:
        if self._bar:
            self._bar.__exit__(*exc)
        return False

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float, mem_gib: float, rewards: dict | None = None) -> None:
        """`rewards`: a preference objective's implicit-reward metrics of this step (accuracy and
        margin are shown after the loss)."""
        extra = _rewards(rewards)
        if self._bar:
            self._bar.update(self._task, completed=step, loss=loss, lr=lr, tps=tokens_per_s, mem=mem_gib, extra=extra)
            return
        now = self._clock()
        self._losses.append(loss)
        due = self._last is None or step % self.every_steps == 0 or step == self.total
        if not (due or now - self._last >= self.every_seconds):
            return
        self._last = now
        mean_loss = sum(self._losses) / len(self._losses)
        self._losses.clear()
        line = self.line(step, mean_loss, lr, tokens_per_s, mem_gib, now - self._t0)
        if extra:
            line = line.replace(f" lr {lr:.2e}", f"{extra} lr {lr:.2e}", 1)
        self._console.print(line, highlight=False, markup=False, soft_wrap=True)  # one line, however narrow

    def line(self, step: int, loss: float, lr: float, tokens_per_s: float, mem_gib: float, elapsed: float) -> str:
        """One plain progress line; the ETA extrapolates the steps taken since this process started."""
        done = step - self.start
        eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
        return (
            f"step {step}/{self.total} ({step / self.total:.0%}) loss {loss:.4f} lr {lr:.2e} {tokens_per_s:,.0f} tok/s "
            f"{self.mem_name} {mem_gib:.2f} GiB elapsed {_clock(elapsed)} ETA {_clock(eta) if eta == eta else '?'}"
        )


def _rewards(rewards: dict | None) -> str:
    """" reward acc 0.75 margin 0.123" (the step's pairs), or "" without a preference objective."""
    if not rewards:
        return ""
    return f" reward acc {rewards['rewards_accuracy']:.2f} margin {rewards['rewards_margins']:.3f}"


def _bar(console: Console, mem_name: str) -> Progress:
    return Progress(
        BarColumn(bar_width=16),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]:.3f}{task.fields[extra]} lr {task.fields[lr]:.1e} {task.fields[tps]:.0f} tok/s " + mem_name + " {task.fields[mem]:.2f}G"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
    )
