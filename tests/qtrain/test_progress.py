"""qtrain.progress: a live bar on a terminal, plain progress lines in log files, nohup and CI."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from qtrain.progress import TrainProgress

REPO = Path(__file__).resolve().parents[2]
LINE = re.compile(
    r"step (\d+)/(\d+) \((\d+)%\) loss \d+\.\d{4} lr \d\.\d\de[-+]\d\d [\d,]+ tok/s (RSS|GPU) \d+\.\d\d GiB "
    r"elapsed \d+:\d\d:\d\d ETA (\d+:\d\d:\d\d|\?)"
)


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def plain(every_steps=10, every_seconds=30.0, start=0, total=50):
    out, clock = io.StringIO(), FakeClock()
    console = Console(file=out, width=200)  # a StringIO is no terminal
    return TrainProgress(console, total, start, "cpu", every_steps, every_seconds, clock), out, clock


def test_without_a_terminal_lines_every_n_steps_and_at_the_first_and_last():
    progress, out, clock = plain()
    with progress:
        for step in range(1, 51):
            clock.now += 1.0  # a step a second: the 30 s floor never triggers before 10 steps
            progress.update(step, 2.0 - step / 50, 1e-3, 1234.5, 0.25)
    lines = out.getvalue().splitlines()
    assert [int(LINE.fullmatch(line)[1]) for line in lines] == [1, 10, 20, 30, 40, 50]
    assert lines[0] == "step 1/50 (2%) loss 1.9800 lr 1.00e-03 1,234 tok/s RSS 0.25 GiB elapsed 0:00:01 ETA 0:00:49"
    assert " loss 1.8800 " in lines[1]  # the mean over steps 2..10: 2 - 6/50
    assert lines[-1].endswith("elapsed 0:00:50 ETA 0:00:00")


def test_without_a_terminal_slow_steps_print_every_n_seconds():
    progress, out, clock = plain(every_steps=1000, every_seconds=30.0, total=20)
    with progress:
        for step in range(1, 21):
            clock.now += 12.0  # 12 s a step: a line every third step (36 s), whatever every_steps says
            progress.update(step, 1.0, 1e-4, 50.0, 7.5)
    steps = [int(LINE.fullmatch(line)[1]) for line in out.getvalue().splitlines()]
    assert steps == [1, 4, 7, 10, 13, 16, 19, 20]


def test_resumed_run_extrapolates_from_the_steps_it_took():
    progress, out, clock = plain(start=40, total=50)
    with progress:
        clock.now += 20.0  # 2 steps in 20 s: 10 s a step, 8 steps left
        progress.update(41, 1.0, 1e-4, 10.0, 0.1)
        clock.now += 10.0
        progress.update(42, 1.0, 1e-4, 10.0, 0.1)
    first = out.getvalue().splitlines()[0]
    assert first.startswith("step 41/50 (82%)") and first.endswith("ETA 0:03:00")  # 20 s per step so far x 9


def test_on_a_terminal_the_bar_is_drawn_and_no_plain_lines():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=160)
    with TrainProgress(console, 5, 0, "cuda", 1) as progress:
        for step in range(1, 6):
            progress.update(step, 1.5, 1e-4, 100.0, 3.0)
        progress.console.print("eval line")  # printed above the bar
    text = out.getvalue()
    assert "5/5" in text and "GPU 3.00G" in text and "eval line" in text and not LINE.search(text)


def test_qtrain_train_into_a_pipe_prints_progress_lines(tmp_path):
    """`qtrain train ... > log`: stdout is no terminal, progress comes as plain lines."""
    argv = [
        sys.executable, "-m", "qtrain.cli", "train", str(REPO / "configs" / "quickstart.yaml"),
        "model.tiny.hidden_size=64", "model.tiny.intermediate_size=192", "model.tiny.num_layers=2",
        "train.max_steps=6", "train.log_every=3", "train.batch_size=4", "data.num_train=16", "eval.exact_match=false",
        "eval.every=0", "eval.samples=[]", "log.tensorboard=false", "log.plot=false", f"output_dir={tmp_path / 'run'}",
    ]  # fmt: skip
    proc = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    steps = [int(m[1]) for m in LINE.finditer(proc.stdout)]
    assert steps == [1, 3, 6], proc.stdout
