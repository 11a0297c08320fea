"""qtrain.metrics: metrics.jsonl, TensorBoard, W&B (faked), loss plot, summary table. CPU, fast."""

from __future__ import annotations

import json
import sys
import time
import types

import pytest
from rich.console import Console

from qtrain.config import LogConfig
from qtrain.metrics import MetricsLogger, format_bytes, format_seconds, plot_loss, read_metrics, summary_table

NO_TB = LogConfig(tensorboard=False, wandb=False)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _events(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _scalars(acc, tag):
    return [(e.step, round(e.value, 5)) for e in acc.Scalars(tag)]


class FakeWandb(types.ModuleType):
    """Stands in for the wandb module: records init/log/finish calls."""

    def __init__(self):
        super().__init__("wandb")
        self.calls: list[tuple[str, tuple, dict]] = []

    def init(self, *args, **kwargs):
        self.calls.append(("init", args, kwargs))
        return types.SimpleNamespace(id="run123")

    def log(self, *args, **kwargs):
        self.calls.append(("log", args, kwargs))

    def finish(self, *args, **kwargs):
        self.calls.append(("finish", args, kwargs))


# --- metrics.jsonl ---------------------------------------------------------------------------------


def test_jsonl_written_and_read_back(tmp_path):
    with MetricsLogger(tmp_path, NO_TB, {}) as logger:
        logger.log(1, {"loss": 2.5, "lr": 1e-4})
        logger.log(2, {"loss": 2.25, "lr": 2e-4})
        logger.log(2, {"eval_loss": 2.0, "eval_ppl": 7.389})
    assert read_metrics(tmp_path / "metrics.jsonl") == [
        {"step": 1, "loss": 2.5, "lr": 1e-4},
        {"step": 2, "loss": 2.25, "lr": 2e-4},
        {"step": 2, "eval_loss": 2.0, "eval_ppl": 7.389},
    ]
    assert not (tmp_path / "tensorboard").exists()


def test_lines_are_on_disk_before_close(tmp_path):
    logger = MetricsLogger(tmp_path, NO_TB, {})
    logger.log(1, {"loss": 1.0})
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 1.0}]
    logger.close()
    logger.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        logger.log(2, {"loss": 1.0})


def test_fresh_run_truncates(tmp_path):
    with MetricsLogger(tmp_path, NO_TB, {}) as logger:
        logger.log(1, {"loss": 3.0})
    with MetricsLogger(tmp_path, NO_TB, {}) as logger:
        logger.log(1, {"loss": 9.0})
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 9.0}]


def test_resume_drops_later_lines_and_appends(tmp_path):
    with MetricsLogger(tmp_path, NO_TB, {}) as logger:
        for step in range(1, 6):
            logger.log(step, {"loss": float(step)})
        logger.text(2, "sample", "early")
        logger.text(5, "sample", "late")
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # killed mid-write
    with MetricsLogger(tmp_path, NO_TB, {}, resume_step=3) as logger:
        for step in range(4, 7):
            logger.log(step, {"loss": 10.0 * step})
    assert read_metrics(tmp_path / "metrics.jsonl") == [
        {"step": 1, "loss": 1.0},
        {"step": 2, "loss": 2.0},
        {"step": 3, "loss": 3.0},
        {"step": 4, "loss": 40.0},
        {"step": 5, "loss": 50.0},
        {"step": 6, "loss": 60.0},
    ]
    assert [r["text"] for r in read_metrics(tmp_path / "samples.jsonl")] == ["early"]
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic rewrite left no temp file


def test_resume_without_existing_file(tmp_path):
    with MetricsLogger(tmp_path / "new", NO_TB, {}, resume_step=7) as logger:
        logger.log(8, {"loss": 1.0})
    assert read_metrics(tmp_path / "new" / "metrics.jsonl") == [{"step": 8, "loss": 1.0}]


def test_read_metrics_rejects_bad_middle_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        read_metrics(path)


# --- TensorBoard ---------------------------------------------------------------------------------


def test_tensorboard_scalars_under_mapped_tags(tmp_path):
    with MetricsLogger(tmp_path, LogConfig(tensorboard=True), {}) as logger:
        logger.log(1, {"loss": 2.5, "lr": 1e-4})
        logger.log(2, {"loss": 2.0, "lr": 2e-4})
        logger.log(2, {"eval_loss": 1.5, "eval_ppl": 4.5})
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    acc = _events(tmp_path / "tensorboard")
    assert set(acc.Tags()["scalars"]) == {"train/loss", "train/lr", "eval/loss", "eval/ppl"}
    assert _scalars(acc, "train/loss") == [(1, 2.5), (2, 2.0)]
    assert _scalars(acc, "train/lr") == [(1, 1e-4), (2, 2e-4)]
    assert _scalars(acc, "eval/loss") == [(2, 1.5)]
    assert _scalars(acc, "eval/ppl") == [(2, 4.5)]


def test_tensorboard_resume_purges_later_steps(tmp_path):
    cfg = LogConfig(tensorboard=True)
    with MetricsLogger(tmp_path, cfg, {}) as logger:
        for step in range(1, 6):
            logger.log(step, {"loss": float(step)})
    # TensorBoard reads event files in name order: <seconds>.<host>.<pid>.<writer number>. A resumed
    # run is a new process, so its file sorts after by time; in this one process, the writer number
    # could pass from 9 to 10 within the same second and sort before: start the resumed writer a
    # second later, as a real resume is.
    start = int(time.time())
    while int(time.time()) == start:
        time.sleep(0.05)
    with MetricsLogger(tmp_path, cfg, {}, resume_step=3) as logger:
        for step in range(4, 7):
            logger.log(step, {"loss": 10.0 * step})
    acc = _events(tmp_path / "tensorboard")
    assert _scalars(acc, "train/loss") == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0), (6, 60.0)]


def test_fresh_run_replaces_old_event_files(tmp_path):
    cfg = LogConfig(tensorboard=True)
    with MetricsLogger(tmp_path, cfg, {}) as logger:
        logger.log(1, {"loss": 5.0})
    with MetricsLogger(tmp_path, cfg, {}) as logger:
        logger.log(1, {"loss": 1.0})
    assert _scalars(_events(tmp_path / "tensorboard"), "train/loss") == [(1, 1.0)]


def test_text_writes_samples_and_tensorboard(tmp_path):
    with MetricsLogger(tmp_path, LogConfig(tensorboard=True), {}) as logger:
        logger.text(3, "samples/0", "Q: 2+2? A: 4")
    assert read_metrics(tmp_path / "samples.jsonl") == [{"step": 3, "tag": "samples/0", "text": "Q: 2+2? A: 4"}]
    acc = _events(tmp_path / "tensorboard")
    (tag,) = [t for t in acc.Tags()["tensors"] if t.startswith("samples/0")]
    (event,) = acc.Tensors(tag)
    assert event.step == 3
    assert event.tensor_proto.string_val[0].decode() == "Q: 2+2? A: 4"


# --- Weights & Biases ------------------------------------------------------------------------------


def test_wandb_missing_raises_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` -> ImportError
    msg = "log.wandb=true but wandb is not installed: pip install wandb (or set log.wandb=false)"
    with pytest.raises(RuntimeError) as info:
        MetricsLogger(tmp_path / "run", LogConfig(tensorboard=False, wandb=True), {})
    assert str(info.value) == msg
    assert not (tmp_path / "run").exists()  # failed before creating anything


def test_wandb_init_log_finish(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run_config = {"lora": {"rank": 8}, "train": {"lr": 2e-4}}
    cfg = LogConfig(tensorboard=False, wandb=True, wandb_project="proj-x")
    with MetricsLogger(tmp_path, cfg, run_config) as logger:
        logger.log(5, {"loss": 1.25, "lr": 1e-4})
        logger.log(5, {"eval_loss": 1.0, "eval_ppl": 2.718})
        logger.text(5, "samples/0", "hello")
    names = [c[0] for c in fake.calls]
    assert names == ["init", "log", "log", "log", "finish"]
    kwargs = fake.calls[0][2]
    assert kwargs["project"] == "proj-x"
    assert kwargs["config"] == run_config
    assert kwargs["dir"] == str(tmp_path)
    assert "resume" not in kwargs
    assert fake.calls[1][1:] == (({"train/loss": 1.25, "train/lr": 1e-4},), {"step": 5})
    assert fake.calls[2][1:] == (({"eval/loss": 1.0, "eval/ppl": 2.718},), {"step": 5})
    assert fake.calls[3][1:] == (({"samples/0": "hello"},), {"step": 5})
    assert (tmp_path / "wandb_run_id").read_text().strip() == "run123"


def test_wandb_resume_allows_and_reuses_run_id(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = LogConfig(tensorboard=False, wandb=True)
    MetricsLogger(tmp_path, cfg, {}).close()
    MetricsLogger(tmp_path, cfg, {}, resume_step=10).close()
    inits = [c[2] for c in fake.calls if c[0] == "init"]
    assert inits[1]["resume"] == "allow"
    assert inits[1]["id"] == "run123"
    assert inits[1]["project"] == "qtrain"


# --- plot ----------------------------------------------------------------------------------------


def _check_png(path, width=800, height=500):
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    img = matplotlib.image.imread(path)
    assert img.shape[:2] == (height, width)


def test_plot_loss_with_eval_points(tmp_path):
    metrics = [{"step": s, "loss": 3.0 / s, "lr": 1e-4} for s in range(1, 101)]
    metrics += [{"step": s, "eval_loss": 2.5 / s, "eval_ppl": 1.0} for s in (25, 50, 75, 100)]
    png = plot_loss(metrics, tmp_path / "plots" / "loss.png")
    assert png == tmp_path / "plots" / "loss.png"
    _check_png(png)
    assert [p.name for p in png.parent.iterdir()] == ["loss.png"]  # no temp file left


def test_plot_loss_single_step(tmp_path):
    _check_png(plot_loss([{"step": 1, "loss": 2.0}], tmp_path / "loss.png"))


def test_plot_loss_no_records(tmp_path):
    _check_png(plot_loss([], tmp_path / "loss.png"))


def test_plot_loss_from_logger_output(tmp_path):
    with MetricsLogger(tmp_path, NO_TB, {}) as logger:
        for step in range(1, 21):
            logger.log(step, {"loss": 1.0 + 1.0 / step})
        logger.log(20, {"eval_loss": 1.1})
    _check_png(plot_loss(read_metrics(tmp_path / "metrics.jsonl"), tmp_path / "loss.png"))


# --- summary table ---------------------------------------------------------------------------------


def test_summary_table_formats_values():
    result = {
        "trainable_params": 1234567,
        "exact_match_before": 0.125,
        "exact_match_after": 0.875,
        "steps": 100,
        "loss_first": 2.345678,
        "loss_last": 0.123456,
        "train_seconds": 112.4,
        "peak_memory_bytes": 3 * 2**30 + 2**29,
        "adapter_bytes": 5 * 2**20,
        "tokens_per_s": 1523.37,
        "adapter": "runs/x/adapter",
        "nested": {"a": 1},
        "missing": None,
    }
    console = Console(record=True, width=100)
    console.print(summary_table(result))
    text = console.export_text()
    for expected in (
        "metric", "value", "1,234,567", "12.5%", "87.5%", "2.3457", "0.1235",
        "1m 52s", "3.50 GiB", "5.0 MiB", "1,523.4", "runs/x/adapter",
    ):  # fmt: skip
        assert expected in text, expected
    assert "nested" not in text and "missing" not in text


def test_format_helpers():
    assert format_seconds(12.34) == "12.3s"
    assert format_seconds(112) == "1m 52s"
    assert format_seconds(3723) == "1h 02m 03s"
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(2**30) == "1.00 GiB"


def test_metrics_file_is_plain_jsonl(tmp_path):
    with MetricsLogger(tmp_path, NO_TB, {}) as logger:
        logger.log(1, {"loss": 1.5})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"step": 1, "loss": 1.5}]
