"""Training checkpoints: written atomically, resumed bit-for-bit.

    output_dir/checkpoints/step-0000200/
        adapter/              the adapter at that step (PEFT format: usable as is)
        trainer_state.pt      optimizer, scheduler, loss scaler, data position, RNG states, counters
        checkpoint.json       step and config, written last

A checkpoint is built in a temp dir beside its final name and renamed into place, so a crash or
Ctrl-C mid-write never leaves a half checkpoint under a step-* name.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path

import torch

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


def save_checkpoint(out_dir: Path, step: int, save_adapter_to, state: dict, config: dict, keep_last: int) -> Path:
    """Write checkpoint `step`: `save_adapter_to(dir)` writes the adapter, `state` (optimizer,
    scheduler, scaler, data, counters: anything torch.save can write) goes to trainer_state.pt.
    Then delete all but the newest `keep_last` checkpoints. Returns the checkpoint dir."""
    root = Path(out_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp", dir=root))
    try:
        save_adapter_to(tmp / "adapter")
        torch.save(state | {"rng": rng_state(), "step": step}, tmp / STATE)
        (tmp / "checkpoint.json").write_text(json.dumps({"step": step, "config": config}, indent=2) + "\n")
        if final.exists():  # same step saved twice (e.g. Ctrl-C right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune_checkpoints(root, keep_last)
    return final


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and (p / "checkpoint.json").exists()]
    return [p for _, p in sorted(found)]


def prune_checkpoints(root: Path, keep_last: int) -> None:
    for old in list_checkpoints(root.parent)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".step-*.tmp*"):  # left by a crash mid-write
        shutil.rmtree(stale, ignore_errors=True)


def resolve_resume(resume: str, out_dir: Path) -> Path:
    """`auto` → the newest checkpoint of out_dir; else a checkpoint dir (or a run dir holding some)."""
    path = Path(out_dir) if resume == "auto" else Path(resume)
    if (path / STATE).exists():
        return path
    found = list_checkpoints(path)
    if not found:
        where = f"{path / CHECKPOINTS}" if resume == "auto" else str(path)
        raise FileNotFoundError(f"checkpoint.resume={resume}: no checkpoint in {where}")
    return found[-1]


def load_state(path: Path) -> dict:
    return torch.load(Path(path) / STATE, map_location="cpu", weights_only=False)
