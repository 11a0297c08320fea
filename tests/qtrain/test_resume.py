"""qtrain.resume + the recipe's checkpoints: atomic, keep-last-K, bit-for-bit resume, Ctrl-C, NaN."""

from __future__ import annotations

import json
import os
import shutil
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
    "train.threads=1",  # bit-for-bit comparisons: the adaptive thread count follows the machine's load
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


def signalled_run(tmp_path: Path, signals: list, *extra: str) -> tuple[str, Path]:
    """`qtrain train` in a subprocess, sent `signals` once it has logged 3 steps: (output, output_dir)."""
    out = tmp_path / "run"
    overrides = [*COMMON, "train.max_steps=100000", "data.num_train=200", f"output_dir={out}", *extra]
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
    for sig in signals:
        proc.send_signal(sig)
        time.sleep(0.01)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, stdout
    return stdout, out


def test_ctrl_c_saves_a_checkpoint_and_exits_130(tmp_path):
    stdout, out = signalled_run(tmp_path, [signal.SIGINT])
    assert "Traceback" not in stdout
    (ckpt,) = list_checkpoints(out)
    step = int(ckpt.name.removeprefix("step-"))
    assert step >= 3 and f"interrupted after step {step}; checkpoint saved to {ckpt}" in stdout
    assert "--resume" in stdout


# ---- issue 15: a run never loses another run's work --------------------------------------------


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative path → bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def interrupted_run(out: Path, step: int, *overrides: str) -> None:
    with pytest.raises(Interrupted):
        train(config(out, *overrides), should_stop=lambda s: s == step)


def test_a_fresh_run_in_a_used_folder_is_refused_and_changes_nothing(tmp_path):
    out = tmp_path / "run"
    interrupted_run(out, 6)
    before = snapshot(out)
    with pytest.raises(ValueError, match=r"already holds a run \(checkpoints up to step 6\); continue it with --resume.*--overwrite"):
        train(config(out, "checkpoint.every=1"))
    assert snapshot(out) == before  # its checkpoint, metrics and config untouched


def test_overwrite_moves_the_old_run_aside_and_prunes_only_its_own_checkpoints(tmp_path):
    out = tmp_path / "run"
    interrupted_run(out, 6)
    old = {k: v for k, v in snapshot(out).items() if not k.startswith("base/")}
    result = train(config(out, "checkpoint.every=1", "checkpoint.keep_last=2", "train.max_steps=3"), overwrite=True)
    (aside,) = tmp_path.glob("run.old-*")
    assert snapshot(aside) == old  # the old run, byte for byte, beside the new one
    assert [p.name for p in list_checkpoints(out)] == ["step-0000002", "step-0000003"]
    assert result["checkpoint"] == str(out / "checkpoints" / "step-0000003")
    assert [r["step"] for r in train_records(out) if "loss" in r] == [1, 2, 3]


def test_pruning_keeps_checkpoints_of_other_runs(tmp_path):
    def adapter(target: Path):
        target.mkdir()
        (target / "adapter_model.safetensors").write_bytes(b"")

    save_checkpoint(tmp_path, 99, adapter, {"x": 1}, {}, keep_last=1, run_id="older")
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, adapter, {"x": 1}, {}, keep_last=2, run_id="this")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000002", "step-0000003", "step-0000099"]
    with pytest.raises(ValueError, match=r"step-0000099: a checkpoint of another run"):
        save_checkpoint(tmp_path, 99, adapter, {"x": 1}, {}, keep_last=2, run_id="this")


def test_two_runs_on_one_folder_at_once_the_second_is_refused(tmp_path):
    from qtrain.rundir import RunLock

    out = tmp_path / "run"
    with RunLock(out):  # what a running `qtrain train` holds
        with pytest.raises(ValueError, match=rf"run is in use by another qtrain run \(PID {os.getpid()} "):
            train(config(out))
        assert [p.name for p in out.iterdir()] == [".qtrain.lock"]  # the second wrote nothing


def test_a_changed_model_tiny_for_a_built_base_is_refused(tmp_path):
    out = tmp_path / "run"
    train(config(out, "train.max_steps=1"))
    with pytest.raises(ValueError, match=r"built from another model.tiny \(model.tiny.hidden_size: 64 there, 32 now\)"):
        train(config(tmp_path / "run", "model.tiny.hidden_size=32", "checkpoint.resume=auto", "train.max_steps=2"))


def test_a_run_that_fails_validation_writes_nothing(tmp_path, tiny_checkpoint):
    out = tmp_path / "run"
    train(config(out, "train.max_steps=2"))
    before = snapshot(out)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        train(config(out, "data.train=missing.jsonl", "checkpoint.resume=auto", "train.max_steps=4"))
    assert snapshot(out) == before  # config.json of the finished run unchanged
    fresh = tmp_path / "fresh"
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        train(config(fresh, f"model.name_or_path={tiny_checkpoint('llama')}", "model.tiny=null", "data.train=missing.jsonl"))
    assert not fresh.exists()  # not even the folder


def test_a_diverged_adapter_is_never_saved_and_the_last_good_checkpoint_is_named(tmp_path, monkeypatch):
    import qtrain.train as recipe

    real = recipe.train_step

    def diverging(model, *args, step=0, **kwargs):
        out = real(model, *args, step=step, **kwargs)
        if step == 4:  # the update of step 4 blows up the adapter; its loss was still finite
            next(p for n, p in model.named_parameters() if n.endswith("lora_b.weight")).data.fill_(float("inf"))
        return out

    monkeypatch.setattr(recipe, "train_step", diverging)
    out = tmp_path / "run"
    with pytest.raises(FloatingPointError, match=r"step 4: the update made .*lora_b.weight NaN/inf; not saved \(last good checkpoint: .*step-0000002\)"):
        train(config(out, "checkpoint.every=2", "checkpoint.keep_last=5"))
    assert [p.name for p in list_checkpoints(out)] == ["step-0000002"]


def test_last_good_checkpoint_skips_one_whose_adapter_is_not_finite(tmp_path):
    from safetensors.torch import save_file

    from qtrain.resume import last_good_checkpoint

    out = tmp_path / "run"
    train(config(out, "checkpoint.every=2", "checkpoint.keep_last=5", "train.max_steps=4"))
    (newest,) = [p for p in list_checkpoints(out) if p.name == "step-0000004"]
    weights = newest / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    tensors[next(iter(tensors))][0, 0] = float("nan")
    save_file(tensors, weights)
    run_id = json.loads((newest / "checkpoint.json").read_text())["run_id"]
    assert last_good_checkpoint(out, run_id).name == "step-0000002"


def test_stop_signals_sigterm_like_ctrl_c_and_a_second_signal_interrupts():
    from qtrain.train import _StopOnSignals

    with _StopOnSignals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):  # the second one: at once
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_sigterm_saves_a_checkpoint_and_exits_130(tmp_path):
    stdout, out = signalled_run(tmp_path, [signal.SIGTERM])
    (ckpt,) = list_checkpoints(out)
    assert f"checkpoint saved to {ckpt}" in stdout and "--resume" in stdout and "Traceback" not in stdout


def test_a_second_ctrl_c_stops_at_once_without_a_traceback_naming_the_checkpoint(tmp_path):
    stdout, out = signalled_run(tmp_path, [signal.SIGINT, signal.SIGINT], "checkpoint.every=1", "checkpoint.keep_last=3")
    assert "Traceback" not in stdout
    if "stopped at once (second Ctrl-C)" in stdout:  # the second signal arrived mid-step
        newest = list_checkpoints(out)[-1]
        assert f"continue from {newest} with: qtrain train" in stdout
    else:  # or after the first had already saved and stopped
        assert "checkpoint saved to" in stdout


def test_checkpoint_files_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    import qtrain.resume as resume

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(resume.os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))) or real_fsync(fd))
    monkeypatch.setattr(resume.os, "replace", lambda a, b: events.append(("replace", str(a))) or real_replace(a, b))

    def adapter(target: Path):
        target.mkdir()
        (target / "adapter_model.safetensors").write_bytes(b"x")

    ckpt = save_checkpoint(tmp_path, 1, adapter, {"x": 1}, {}, keep_last=2, run_id="r")
    rename = events.index(next(e for e in events if e[0] == "replace"))
    synced = {Path(p).name for kind, p in events[:rename] if kind == "fsync"}
    assert {"adapter_model.safetensors", STATE, "checkpoint.json", "adapter"} <= synced
    assert ("fsync", str(ckpt.parent)) in events[rename:]  # the rename itself made durable


def test_a_crafted_trainer_state_is_not_executed(tmp_path):
    out = tmp_path / "run"
    interrupted_run(out, 4)
    marker = tmp_path / "pwned"
    (ckpt,) = list_checkpoints(out)
    torch.save({"step": 4, "payload": _Evil(str(marker))}, ckpt / STATE)
    with pytest.raises(ValueError, match=r"trainer_state.pt: unreadable or not a trainer state"):
        train(config(out, f"checkpoint.resume={ckpt}"))
    assert not marker.exists()


class _Evil:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_a_changed_lr_applies_on_resume(tmp_path, capsys):
    straight = tmp_path / "straight"
    train(config(straight, "train.lr=1e-3"))
    out = tmp_path / "run"
    interrupted_run(out, 4, "train.lr=2e-3")
    train(config(out, "train.lr=1e-3", "train.weight_decay=0.5", "checkpoint.resume=auto"))
    said = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "train.lr was 0.002 in the checkpoint, now 0.001: applied from step 5" in said
    assert "train.weight_decay was 0.0 in the checkpoint, now 0.5: applied from step 5" in said
    lrs = {r["step"]: r["lr"] for r in train_records(out) if "lr" in r}
    expected = {r["step"]: r["lr"] for r in train_records(straight) if "lr" in r}
    assert [lrs[s] for s in range(5, 9)] == [expected[s] for s in range(5, 9)]  # the new lr's schedule, exactly


def test_resuming_a_finished_run_appends_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    train(config(out, "eval.every=4"))
    before = snapshot(out)
    result = train(config(out, "eval.every=4", "checkpoint.resume=auto"))
    assert snapshot(out) == before
    assert result == json.loads((out / "result.json").read_text())
    assert "is the end of the run (train.max_steps=8): nothing to do" in capsys.readouterr().out


def test_resuming_a_run_killed_before_its_adapter_finishes_it_once(tmp_path):
    out = tmp_path / "run"
    done = train(config(out))
    records = (out / "metrics.jsonl").read_text()
    (out / "result.json").unlink()
    shutil.rmtree(out / "adapter")  # killed between the last checkpoint and the adapter
    again = train(config(out, "checkpoint.resume=auto"))
    assert (out / "metrics.jsonl").read_text() == records  # no eval logged twice
    assert again["eval_loss"] == done["eval_loss"] and (out / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("damage", ["truncated_adapter", "truncated_state", "invalid_json"])
def test_an_unreadable_newest_checkpoint_is_named_and_the_previous_one_used(tmp_path, capsys, damage):
    out = tmp_path / "run"
    interrupted_run(out, 6, "checkpoint.every=2", "checkpoint.keep_last=5")
    newest = list_checkpoints(out)[-1]
    target = {
        "truncated_adapter": newest / "adapter" / "adapter_model.safetensors",
        "truncated_state": newest / STATE,
        "invalid_json": newest / "checkpoint.json",
    }[damage]
    target.write_bytes(target.read_bytes()[: 40])
    with pytest.raises(ValueError, match=rf"{target.name}: .*; resume from the previous one: --resume .*step-0000004$"):
        train(config(out, f"checkpoint.resume={newest}"))
    result = train(config(out, "checkpoint.resume=auto"))
    said = capsys.readouterr().out
    assert f"resume: skipping step-0000006: {target}" in said.replace("\n", "")
    assert "resumed from" in said and "step-0000004 at step 4" in said.replace("\n", "")
    assert result["steps"] == 8 and (out / "checkpoints" / "step-0000006.unreadable").is_dir()  # kept, out of the way


def test_a_full_disk_during_a_checkpoint_is_one_line_naming_where(tmp_path, monkeypatch):
    import errno

    import qtrain.resume as resume
    from qtrain.train import StorageError

    out = tmp_path / "run"
    real_save, calls = resume.torch.save, {"n": 0}

    def fills_up(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint
            raise OSError(errno.ENOSPC, "No space left on device")  # what a write to a full disk raises
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(resume.torch, "save", fills_up)
    with pytest.raises(StorageError, match=r"no space left on the disk holding .*run; free space, then continue with --resume \(newest checkpoint: .*step-0000002\)"):
        train(config(out, "checkpoint.every=2"))
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000002"]  # no half checkpoint, no temp dir


def test_an_absurd_lora_rank_is_one_line_before_allocating(tmp_path):
    with pytest.raises(ValueError, match=r"lora.rank=1000000 is larger than .*q_proj \(64 -> 64\) can use.*at most min\(in, out\) = 64"):
        train(config(tmp_path / "run", "lora.rank=1000000"))


def test_host_memory_exhaustion_is_out_of_memory_with_advice(tmp_path):
    from qtrain.train import OutOfMemory, _resource_errors

    with pytest.raises(OutOfMemory, match=r"out of host memory \(RAM\): .*DefaultCPUAllocator.*Lower lora.rank"):
        with _resource_errors(tmp_path):
            torch.empty(2**62, dtype=torch.uint8)
