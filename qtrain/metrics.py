"""Run metrics: metrics.jsonl (+ TensorBoard, + Weights & Biases), a loss-curve PNG, a summary table.

    with MetricsLogger(out_dir, cfg.log, run_config) as logger:
        logger.log(step, {"loss": 1.23, "lr": 2e-4})
        logger.log(step, {"eval_loss": 1.10, "eval_ppl": 3.0})
        logger.text(step, "sample/0", "generated text")
    plot_loss(read_metrics(out_dir / "metrics.jsonl"), out_dir / "loss.png")

metrics.jsonl is the source of truth: one JSON object per line, `{"step": ..., **values}`. On
resume, lines after the resumed step are dropped so the file reads like an uninterrupted run.
TensorBoard, matplotlib and wandb are imported only when used.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from types import ModuleType
from typing import IO, TYPE_CHECKING, Any

from rich.table import Table

from qtrain.rundir import atomic_write_text

if TYPE_CHECKING:
    from qtrain.config import LogConfig

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_run_id"  # lets a resumed run continue the same W&B run

_EVAL_TAGS = {"eval_loss": "eval/loss", "eval_ppl": "eval/ppl"}

__all__ = ["MetricsLogger", "plot_loss", "read_metrics", "summary_table", "tag_for"]


def tag_for(key: str) -> str:
    """TensorBoard / W&B tag of a metrics key: eval_loss -> eval/loss, eval_ppl -> eval/ppl, k -> train/k."""
    return _EVAL_TAGS.get(key, f"train/{key}")


class MetricsLogger:
    """metrics.jsonl (+ TensorBoard, + Weights & Biases) for one run."""

    def __init__(self, out_dir: Path, cfg: LogConfig, run_config: dict, resume_step: int | None = None) -> None:
        """Open the sinks. Fresh run (resume_step None): metrics.jsonl and samples.jsonl start empty and
        old TensorBoard event files are removed. Resume: records with step > resume_step are dropped
        from both files, TensorBoard purges events after resume_step, W&B resumes the saved run id."""
        self.out_dir = Path(out_dir)
        self.cfg = cfg
        self.resume_step = resume_step
        self._wandb: ModuleType | None = _import_wandb() if cfg.wandb else None  # fail before touching files
        self._tb: Any = None
        self._files: list[IO[str]] = []
        self._closed = False
        self.out_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._metrics = self._open_jsonl(self.out_dir / METRICS_FILE)
            self._samples = self._open_jsonl(self.out_dir / SAMPLES_FILE)
            if cfg.tensorboard:
                self._tb = self._open_tensorboard()
            if self._wandb is not None:
                self._init_wandb(run_config)
        except BaseException:
            self.close()
            raise

    def _open_jsonl(self, path: Path) -> IO[str]:
        """Truncate (fresh run) or trim to resume_step (resume), then open for line-buffered appends."""
        if self.resume_step is None:
            mode = "w"
        else:
            _trim_jsonl(path, self.resume_step)
            mode = "a"
        f = open(path, mode, buffering=1, encoding="utf-8")  # noqa: SIM115 (open for the run; closed in close())
        self._files.append(f)
        return f

    def _open_tensorboard(self) -> Any:
        """A SummaryWriter in out_dir/tensorboard; on resume, events after resume_step are purged."""
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise RuntimeError(
                "log.tensorboard=true but tensorboard is not installed: pip install tensorboard "
                "(or set log.tensorboard=false)"
            ) from None
        log_dir = self.out_dir / TENSORBOARD_DIR
        if self.resume_step is None and log_dir.is_dir():
            for old in log_dir.glob("events.out.tfevents.*"):  # a fresh run replaces the old curves
                old.unlink()
        purge = None if self.resume_step is None else self.resume_step + 1
        return SummaryWriter(log_dir=str(log_dir), purge_step=purge)

    def _init_wandb(self, run_config: dict) -> None:
        """wandb.init for this run; the run id is saved in out_dir so a resume continues it."""
        assert self._wandb is not None
        kwargs: dict[str, Any] = {"project": self.cfg.wandb_project, "config": run_config, "dir": str(self.out_dir)}
        id_file = self.out_dir / WANDB_ID_FILE
        if self.resume_step is not None:
            kwargs["resume"] = "allow"
            if id_file.is_file():
                kwargs["id"] = id_file.read_text().strip()
        run = self._wandb.init(**kwargs)
        run_id = getattr(run, "id", None)
        if isinstance(run_id, str) and run_id:
            id_file.write_text(run_id + "\n")

    def log(self, step: int, values: dict[str, float]) -> None:
        """One metrics.jsonl line {"step": step, **values}; the same values as scalars to TensorBoard / W&B."""
        self._check_open()
        self._metrics.write(json.dumps({"step": step, **values}) + "\n")
        tagged = {tag_for(k): float(v) for k, v in values.items()}
        if self._tb is not None:
            for tag, v in tagged.items():
                self._tb.add_scalar(tag, v, global_step=step)
        if self._wandb is not None:
            self._wandb.log(tagged, step=step)

    def text(self, step: int, tag: str, text: str) -> None:
        """A sample generation: a samples.jsonl line {"step", "tag", "text"}, TensorBoard text, W&B log."""
        self._check_open()
        self._samples.write(json.dumps({"step": step, "tag": tag, "text": text}) + "\n")
        if self._tb is not None:
            self._tb.add_text(tag, text, global_step=step)
        if self._wandb is not None:
            self._wandb.log({tag: text}, step=step)

    def flush(self) -> None:
        """Push buffered lines and events to disk."""
        for f in self._files:
            if not f.closed:
                f.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Flush and close every sink (W&B: wandb.finish). Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for f in self._files:
            f.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None and hasattr(self._wandb, "finish"):
            self._wandb.finish()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("MetricsLogger is closed")

    def __enter__(self) -> MetricsLogger:  # noqa: PYI034 (typing.Self needs 3.11)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _import_wandb() -> ModuleType:
    """`import wandb`, or a RuntimeError that says how to fix the config."""
    try:
        import wandb
    except ImportError:
        raise RuntimeError(
            "log.wandb=true but wandb is not installed: pip install wandb (or set log.wandb=false)"
        ) from None
    return wandb


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl (or samples.jsonl) file, in order.

    Blank lines are skipped, and so is a cut-off last line (a run killed mid-write); a bad line
    anywhere else raises ValueError with the file and line number.
    """
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}:{i + 1}: not a JSON line: {line[:80]!r}") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{i + 1}: expected a JSON object, got {type(rec).__name__}")  # noqa: TRY004
        records.append(rec)
    return records


def _trim_jsonl(path: Path, resume_step: int) -> None:
    """Drop the records with step > resume_step, rewriting the file atomically (no-op if missing)."""
    if not path.is_file():
        return
    kept = [r for r in read_metrics(path) if not (isinstance(r.get("step"), (int, float)) and r["step"] > resume_step)]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def _moving_average(ys: list[float], window: int) -> list[float]:
    """Trailing mean over `window` points (fewer at the start); a NaN only spoils `window` points."""
    import numpy as np

    y = np.asarray(ys, dtype=float)
    sums = np.convolve(y, np.ones(window), mode="full")[: len(y)]
    counts = np.minimum(np.arange(1, len(y) + 1), window)
    return (sums / counts).tolist()


def plot_loss(metrics: list[dict], png: Path) -> Path:
    """Loss curve (800x500 PNG): train loss per step, its moving average, eval loss points. Returns png."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    png = Path(png)
    train = [(r["step"], r["loss"]) for r in metrics if "step" in r and r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in metrics if "step" in r and r.get("eval_loss") is not None]
    fig = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        xs, ys = zip(*train)
        marker = "o" if len(xs) == 1 else None  # a one-point line is invisible
        ax.plot(xs, ys, color="tab:blue", linewidth=0.8, alpha=0.45, marker=marker, label="train loss")
        window = max(1, min(50, len(ys) // 10))
        if window > 1:
            ax.plot(
                xs, _moving_average(list(ys), window), color="tab:blue", linewidth=2, label=f"train loss (avg {window})"
            )
    if evals:
        ex, ey = zip(*evals)
        ax.plot(ex, ey, "o-", color="tab:orange", linewidth=1, markersize=6, label="eval loss")
    if not train and not evals:
        ax.text(0.5, 0.5, "no loss records", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("Loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    if train or evals:
        ax.legend()
    png.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=png.parent, prefix=f".{png.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
        os.replace(tmp, png)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return png


def format_seconds(s: float) -> str:
    """12.3 -> "12.3s", 112 -> "1m 52s", 3723 -> "1h 02m 03s"."""
    if s < 60:
        return f"{s:.1f}s"
    total = round(s)
    h, rest = divmod(total, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}h {m:02d}m {sec:02d}s" if h else f"{m}m {sec:02d}s"


def format_bytes(n: float) -> str:
    """Binary units: 1536 -> "1.5 KiB", 3 * 2**30 -> "3.00 GiB"."""
    for unit, scale, digits in (("GiB", 2**30, 2), ("MiB", 2**20, 1), ("KiB", 2**10, 1)):
        if abs(n) >= scale:
            return f"{n / scale:.{digits}f} {unit}"
    return f"{int(n)} B"


def _is_seconds_key(key: str) -> bool:
    return key.endswith(("seconds", "_sec", "_secs", "_time")) or (key.endswith("_s") and not key.endswith("_per_s"))


def _is_fraction_key(key: str) -> bool:
    return key.startswith(("exact_match", "accuracy")) or key.endswith(("_fraction", "_frac", "_accuracy", "_pct"))


def format_value(key: str, value: Any) -> str | None:
    """A result value as table text, by key and type; None for values not shown (None, nested)."""
    if value is None or isinstance(value, (dict, list, tuple, set)):
        return None
    if isinstance(value, bool):
        return "yes" if value else "no"
    if not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if key.endswith("_bytes"):
        return format_bytes(value)
    if _is_seconds_key(key):
        return format_seconds(value)
    if _is_fraction_key(key):
        return f"{100 * value:.1f}%"
    if isinstance(value, int):
        return f"{value:,}"
    if "loss" in key:
        return f"{value:.4f}"
    if key == "lr" or key.endswith("_lr"):
        return f"{value:.2e}"
    if abs(value) >= 1000:
        return f"{value:,.1f}"
    return f"{value:.4g}"


def summary_table(result: dict) -> Table:
    """Two-column "metric | value" table of a run result (nested and None values are skipped)."""
    table = Table(title="run summary", show_header=True, header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result.items():
        text = format_value(str(key), value)
        if text is not None:
            table.add_row(str(key), text)
    return table
