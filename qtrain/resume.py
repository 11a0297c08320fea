"""Training checkpoints: written atomically, resumed bit-for-bit.

    output_dir/checkpoints/step-0000200/
        adapter/              the adapter at that step (PEFT format: usable as is)
        trainer_state.pt      optimizer, scheduler, loss scaler, data position, RNG states, counters
        checkpoint.json       step, run id, loss, config; written last

A checkpoint is built in a temp dir beside its final name, flushed to disk (fsync) and renamed into
place, so a crash, Ctrl-C or power cut mid-write never leaves a half checkpoint under a step-* name.
trainer_state.pt is read with `weights_only=True`: tensors and plain containers, never code.
Pruning (keep_last) only touches checkpoints of the run that wrote them (their run id).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError

from qtrain.adapter import read_adapter_file
from qtrain.rundir import unused_name

CHECKPOINTS = "checkpoints"
STATE = "trainer_state.pt"
_NAME = re.compile(r"step-(\d+)$")


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    out_dir: Path, step: int, save_adapter_to, state: dict, config: dict, keep_last: int, run_id: str = "", loss: float | None = None
) -> Path:
    """Write checkpoint `step` of run `run_id`: `save_adapter_to(dir)` writes the adapter, `state`
    (optimizer, scheduler, scaler, data, counters: tensors and plain containers) goes to
    trainer_state.pt. Then delete all but the newest `keep_last` checkpoints of this run.
    Returns the checkpoint dir."""
    root = Path(out_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    if final.exists() and run_of(final) != run_id:
        raise ValueError(f"{final}: a checkpoint of another run (or an unreadable one) is in the way; move it away and resume")
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp", dir=root))
    try:
        save_adapter_to(tmp / "adapter")
        with open(tmp / STATE, "wb") as f:  # a file object: a full disk raises OSError(ENOSPC), not a vague RuntimeError
            torch.save(state | {"rng": rng_state(), "step": step}, f)
        meta = {"step": step, "run_id": run_id, "loss": loss, "config": config}
        (tmp / "checkpoint.json").write_text(json.dumps(meta, indent=2) + "\n")
        fsync_tree(tmp)
        if final.exists():  # this run's step saved twice (e.g. Ctrl-C right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune_checkpoints(root, keep_last, run_id)
    return final


def fsync_tree(folder: Path) -> None:
    """Flush every file under `folder`, and the folders themselves, to disk."""
    for dirpath, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable (where the OS can open a directory)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems do not sync directories
    finally:
        os.close(fd)


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints of a run folder, oldest first."""
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and (p / "checkpoint.json").exists()]
    return [p for _, p in sorted(found)]


def prune_checkpoints(root: Path, keep_last: int, run_id: str = "") -> None:
    ours = [p for p in list_checkpoints(root.parent) if run_of(p) == run_id]
    for old in ours[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".step-*.tmp*"):  # left by a crash mid-write (the run folder is locked: not in use)
        shutil.rmtree(stale, ignore_errors=True)


def run_of(ckpt: Path) -> str | None:
    """The run id a checkpoint was written by ("" for checkpoints of qtrain before run ids; None: unreadable)."""
    try:
        return read_meta(ckpt).get("run_id") or ""
    except ValueError:
        return None


def read_meta(ckpt: Path) -> dict:
    """checkpoint.json as a dict; ValueError naming the file when it is not one."""
    path = Path(ckpt) / "checkpoint.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int) or not isinstance(meta.get("config"), dict):
        raise ValueError(f"{path}: not a qtrain checkpoint record (needs step and config)")
    return meta


def load_state(path: Path) -> dict:
    """trainer_state.pt, read without running code (weights_only); ValueError naming the file."""
    file = Path(path) / STATE
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"{file}: missing") from None
    except Exception as e:  # noqa: BLE001 - torch.load raises many types on a bad file (pickle, zip, EOF)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{file}: unreadable or not a trainer state ({first[:200]})") from None
    missing = [k for k in ("optimizer", "scheduler", "data", "rng", "step", "trainer") if k not in state] if isinstance(state, dict) else ["all"]
    if missing:
        raise ValueError(f"{file}: not a qtrain trainer state (missing {', '.join(missing)})")
    return state


def check_adapter_files(ckpt: Path) -> None:
    """Every safetensors file of the checkpoint's adapter reads, and holds finite numbers."""
    files = sorted((Path(ckpt) / "adapter").rglob("*.safetensors"))
    if not files:
        raise ValueError(f"{Path(ckpt) / 'adapter'}: no adapter weights")
    for file in files:
        try:
            read_adapter_file(file)  # NaN/inf refused by tensor name
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{file}: unreadable ({e})") from None


def open_checkpoint(ckpt: Path) -> tuple[dict, dict]:
    """(trainer state, checkpoint.json) of a checkpoint whose every file reads; ValueError naming the bad one."""
    meta = read_meta(ckpt)
    check_adapter_files(ckpt)
    return load_state(ckpt), meta


def resolve_resume(resume: str, out_dir: Path, say=print) -> tuple[Path, dict, dict]:
    """The checkpoint to resume, its trainer state and its checkpoint.json.

    `auto` → the newest readable checkpoint of out_dir (an unreadable newer one is named and skipped);
    else a checkpoint dir, or a run dir (its newest readable checkpoint). An unreadable explicit
    checkpoint → ValueError naming the file and the previous checkpoint to use instead."""
    path = Path(out_dir) if resume == "auto" else Path(resume)
    if (path / STATE).exists() or (path / "checkpoint.json").exists():
        try:
            return (path, *open_checkpoint(path))
        except ValueError as e:
            older = [p for p in list_checkpoints(path.parent.parent) if p.name < path.name]
            hint = f"; resume from the previous one: --resume {older[-1]}" if older else ""
            raise ValueError(f"{e}{hint}") from None
    found = list_checkpoints(path)
    if not found:
        where = f"{path / CHECKPOINTS}" if resume == "auto" else str(path)
        raise FileNotFoundError(f"checkpoint.resume={resume}: no checkpoint in {where}")
    errors = []
    for ckpt in reversed(found):
        try:
            state, meta = open_checkpoint(ckpt)
        except ValueError as e:
            errors.append(str(e))
            kept = set_aside(ckpt)  # out of the way of this run's next save of that step; not deleted
            say(f"resume: skipping {ckpt.name}: {e} (kept as {kept.name})")
            continue
        return ckpt, state, meta
    raise ValueError(f"checkpoint.resume={resume}: no readable checkpoint in {path / CHECKPOINTS} (newest: {errors[0]})")


def set_aside(ckpt: Path) -> Path:
    """Rename an unreadable checkpoint to step-N.unreadable[-k]: no longer listed, still there."""
    target = unused_name(ckpt.with_name(f"{ckpt.name}.unreadable"))
    os.replace(ckpt, target)
    return target


def last_good_checkpoint(out_dir: Path, run_id: str) -> Path | None:
    """The newest checkpoint of run `run_id` whose adapter is finite and whose loss was finite."""
    for ckpt in reversed(list_checkpoints(out_dir)):
        try:
            meta = read_meta(ckpt)
            if (meta.get("run_id") or "") != run_id or not math.isfinite(meta.get("loss") or 0.0):
                continue
            check_adapter_files(ckpt)
        except ValueError:
            continue
        return ckpt
    return None
