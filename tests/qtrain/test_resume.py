"""qtrain.resume + the recipe's checkpoints: atomic, keep-last-K, bit-for-bit resume, Ctrl-C, NaN."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qtrain.config import load_config
from qtrain.resume import STATE, list_checkpoints, resolve_resume, save_checkpoint
from qtrain.train import Interrupted, train

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
# a tiny model, dropout on (so the RNG state matters), 8 steps: ~2 s per run on 2 cores
COMMON = [
    "model.tiny.hidden_size=64",
    "model.tiny.intermediate_size=192",
    "model.tiny.num_layers=2",
    "train.batch_size=4",
    "train.warmup_steps=2",
    "train.max_steps=8",
    "lora.dropout=0.1",
    "data.num_train=24",  # 6 batches per epoch: the resumed half crosses an epoch boundary
    "data.num_eval=8",
    "data.max_length=96",
    "eval.exact_match=false",
    "log.tensorboard=false",
    "log.plot=false",
]


def config(out: Path, *overrides: str):
    return load_config(QUICKSTART, [*COMMON, f"output_dir={out}", *overrides])


def train_records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def adapter_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(adapter_dir / "adapter_model.safetensors")


# ---- bit-for-bit resume ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["data.packing=true", "data.max_length=200", "train.grad_accum=2", "train.lora_plus_ratio=4"],
        ["data.group_by_length=true", "eval.every=3"],
    ],
    ids=["padded", "packed_accum_loraplus", "grouped_with_eval"],
)
def test_stop_and_resume_equals_straight_run(tmp_path, extra):
    straight = train(config(tmp_path / "straight", *extra))

    out = tmp_path / "resumed"
    with pytest.raises(Interrupted) as info:
        train(config(out, *extra), should_stop=lambda step: step == 5)
    assert info.value.step == 5 and info.value.checkpoint == out / "checkpoints" / "step-0000005"
    resumed = train(config(out, *extra, "checkpoint.resume=auto"))

    # identical per-step losses and learning rates (exact float equality), and identical adapters
    def losses(d):
        return [(r["step"], r["loss"], r["lr"]) for r in train_records(d) if "loss" in r]

    assert losses(out) == losses(tmp_path / "straight")
    assert [r["step"] for r in train_records(out) if "loss" in r] == list(range(1, 9))  # no duplicated steps
    a, b = adapter_tensors(tmp_path / "straight" / "adapter"), adapter_tensors(out / "adapter")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["loss_first"] == straight["loss_first"] and resumed["loss_last"] == straight["loss_last"]
    assert resumed["eval_loss"] == straight["eval_loss"]
    assert resumed["tokens_seen"] == straight["tokens_seen"]


def test_resume_from_an_explicit_checkpoint_dir(tmp_path):
    out = tmp_path / "run"
    train(config(out, "checkpoint.every=2", "checkpoint.keep_last=10"))
    # resume from step 4 of a finished run: steps 5..8 again, into another output dir
    again = tmp_path / "again"
    train(config(again, f"checkpoint.resume={out / 'checkpoints' / 'step-0000004'}"))
    first, second = train_records(out), train_records(again)
    assert [r["step"] for r in second if "loss" in r] == [5, 6, 7, 8]
    assert [r["loss"] for r in second if "loss" in r] == [r["loss"] for r in first if "loss" in r][4:]


# ---- what a checkpoint holds, atomic writes, keep-last-K -------------------------------------


def test_checkpoints_every_n_keep_last_k(tmp_path):
    out = tmp_path / "run"
    result = train(config(out, "checkpoint.every=2", "checkpoint.keep_last=2"))
    kept = list_checkpoints(out)
    assert [p.name for p in kept] == ["step-0000006", "step-0000008"]
    assert result["checkpoint"] == str(kept[-1])
    assert not list((out / "checkpoints").glob(".*"))  # no temp dirs left
    state = torch.load(kept[-1] / STATE, weights_only=False)
    assert state["step"] == 8
    assert {"optimizer", "scheduler", "data", "rng", "trainer"} <= state.keys()
    assert state["data"] == {"epoch": 1, "index": 2}  # 6 batches per epoch, 8 taken
    assert len(state["trainer"]["losses"]) == 8
    info = json.loads((kept[-1] / "checkpoint.json").read_text())
    assert info["step"] == 8 and info["config"]["train"]["max_steps"] == 8
    # the checkpoint's adapter is the final adapter
    a, b = adapter_tensors(kept[-1] / "adapter"), adapter_tensors(out / "adapter")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_failed_write_leaves_no_checkpoint(tmp_path):
    def broken_adapter(target: Path):
        target.mkdir()
        (target / "partial").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 3, broken_adapter, {"x": 1}, {}, keep_last=2)
    assert list_checkpoints(tmp_path) == []
    assert list((tmp_path / "checkpoints").iterdir()) == []  # the temp dir was removed


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"checkpoint\.resume=auto: no checkpoint in .*checkpoints"):
        resolve_resume("auto", tmp_path)
    with pytest.raises(FileNotFoundError, match="checkpoint.resume="):
        train(config(tmp_path / "fresh", "checkpoint.resume=auto"))


def test_resume_with_changed_batch_size_warns(tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(Interrupted):
        train(config(out), should_stop=lambda step: step == 2)
    train(config(out, "checkpoint.resume=auto", "train.batch_size=2"))
    assert "train.batch_size was 4 in the checkpoint, now 2" in capsys.readouterr().out


# ---- NaN keeps the last good checkpoint ------------------------------------------------------


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import qtrain.train as recipe

    real, calls = recipe.loss_sum, {"n": 0}

    def poisoned(model, batch, *args, **kwargs):
        calls["n"] += 1
        loss = real(model, batch, *args, **kwargs)
        return loss * float("nan") if calls["n"] == 5 else loss  # step 5 (no grad accum, no eval before)

    monkeypatch.setattr(recipe, "loss_sum", poisoned)
    out = tmp_path / "run"
    with pytest.raises(FloatingPointError, match=r"step 5: loss is nan; stopped before the update \(last good checkpoint: .*step-0000004\)"):
        train(config(out, "checkpoint.every=2", "checkpoint.keep_last=3"))
    assert [p.name for p in list_checkpoints(out)] == ["step-0000002", "step-0000004"]
    assert not (out / "adapter").exists()  # no adapter written from a failed run
    # the run resumes from the last good checkpoint (here without the poison)
    monkeypatch.setattr(recipe, "loss_sum", real)
    result = train(config(out, "checkpoint.resume=auto"))
    assert result["steps"] == 8


# ---- Ctrl-C ----------------------------------------------------------------------------------


def test_ctrl_c_saves_a_checkpoint_and_exits_130(tmp_path):
    out = tmp_path / "run"
    overrides = [*COMMON, "train.max_steps=100000", "data.num_train=200", f"output_dir={out}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "qtrain.cli", "train", str(QUICKSTART), *overrides],
        cwd=tmp_path,  # not the repo root: its kernels/ folder must not shadow HF's `kernels`
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "training did not start within 120 s"
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, stdout
    assert "Traceback" not in stdout
    (ckpt,) = list_checkpoints(out)
    step = int(ckpt.name.removeprefix("step-"))
    assert step >= 3 and f"interrupted after step {step}; checkpoint saved to {ckpt}" in stdout
    assert "--resume" in stdout
    steps = [r["step"] for r in train_records(out) if "loss" in r]
    assert steps == list(range(1, step + 1))  # the interrupted run logged exactly the saved steps
    # and it resumes from there
    result = train(load_config(QUICKSTART, [*overrides, f"train.max_steps={step + 2}", "checkpoint.resume=auto"]))
    assert result["steps"] == step + 2
