"""A run's output folder: one run at a time, never over another run's files.

    output_dir/.qtrain.lock   held (flock) for the run's lifetime; says which PID on which host
    output_dir/base/          the tiny base (model.name_or_path unset), shared by the runs of the folder
    output_dir/...            the run: config.json, metrics.jsonl, checkpoints/, adapter/, result.json, ...

A fresh run starts only in an empty folder (a tiny base and a memory report may be there already).
A folder that holds a run is continued with `--resume`, or moved aside whole with `--overwrite`
(to a sibling `NAME.old-YYYYMMDD-HHMMSS`): nothing here ever deletes a user's files.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import tempfile
import time
from pathlib import Path

LOCK = ".qtrain.lock"
# Not a run's own files: the tiny base is reused by the folder's runs, `qtrain memory profile`
# writes its report beside them.
SHARED = ("base", "memory-profile", LOCK)
# What a run writes; a folder with only these (and SHARED) holds a qtrain run.
RUN_FILES = (
    "config.json",
    "metrics.jsonl",
    "samples.jsonl",
    "skipped_rows.jsonl",
    "tensorboard",
    "wandb",
    "wandb_run_id",
    "checkpoints",
    "adapter",
    "memory",
    "result.json",
    "loss.png",
)

try:
    import fcntl
except ImportError:  # Windows: the PID check alone
    fcntl = None


class RunLock:
    """An exclusive lock on `folder` for a `with` block: `.qtrain.lock` holds {pid, host, started}.

    Another live run holding it → ValueError naming its PID and host. A lock left by a process that
    died (kill -9, a crash) is taken over with a message: on Linux/macOS the kernel drops an flock
    when its process ends, so a lock file nobody holds is stale by definition."""

    def __init__(self, folder: Path, say=print):
        self.folder, self.path, self.say = Path(folder), Path(folder) / LOCK, say
        self._fd: int | None = None
        self._created = not self.folder.exists()

    def __enter__(self) -> RunLock:
        self._fd = _open_lock(self.path)
        try:
            held_by = _read_owner(self.path)
            if not _try_lock(self._fd, held_by):
                raise ValueError(
                    f"{self.folder} is in use by another qtrain run ({_describe(held_by)}); wait for it to "
                    f"finish or use another output_dir (if no run is active, delete {self.path})"
                )
            if held_by:
                self.say(f"output_dir: took over a stale lock ({_describe(held_by)}, no longer running)")
            owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, (json.dumps(owner) + "\n").encode(), 0)
        except BaseException:
            os.close(self._fd)
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.path.unlink(missing_ok=True)  # while still held: no one else can have taken it
        finally:
            os.close(self._fd)
        if self._created and not any(self.folder.iterdir()):  # a run that wrote nothing leaves no folder
            self.folder.rmdir()


def _open_lock(path: Path) -> int:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except FileExistsError:
        raise ValueError(f"output_dir={path.parent}: a file of that name is in the way; choose a folder") from None
    except NotADirectoryError:
        raise ValueError(f"output_dir={path.parent}: a path component is a file, not a folder; choose a folder") from None
    except PermissionError:
        raise ValueError(f"output_dir={path.parent}: not writable (permission denied); choose a folder you can write to") from None
    except OSError as e:
        if e.errno == errno.EROFS:
            raise ValueError(f"output_dir={path.parent}: on a read-only file system; choose a writable folder") from None
        raise


def _read_owner(path: Path) -> dict:
    try:
        owner = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def _try_lock(fd: int, owner: dict) -> bool:
    """True when this process now holds the lock."""
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
    return not owner or not _alive(owner)


def _alive(owner: dict) -> bool:
    """Whether the lock's process still runs (a lock from another host counts as alive)."""
    if owner.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(owner.get("pid", -1)), 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        return True
    return True


def _describe(owner: dict) -> str:
    if not owner:
        return "owner unknown"
    return f"PID {owner.get('pid')} on {owner.get('host')}, started {owner.get('started')}"


# ---- a fresh run needs a folder of its own ----


def run_entries(folder: Path) -> list[str]:
    """The folder's entries that belong to a run (everything but SHARED), sorted."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name not in SHARED)


def check_fresh(folder: Path, overwrite: bool) -> list[str]:
    """For a run without --resume: the entries --overwrite will move aside ([] for an unused folder).
    A used folder without `overwrite`, or one holding files that are not a qtrain run's, → ValueError."""
    entries = run_entries(folder)
    if not entries:
        return []
    foreign = [e for e in entries if e not in RUN_FILES and not e.startswith(".")]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ValueError(
            f"output_dir={folder} holds files that are not a qtrain run's ({shown}); qtrain will not write "
            "among them: choose a new or empty output_dir"
        )
    if not overwrite:
        raise ValueError(
            f"output_dir={folder} already holds a run ({describe_run(folder)}); continue it with --resume, "
            "train into another folder (output_dir=...), or pass --overwrite to move that run aside (nothing is deleted)"
        )
    return entries


def describe_run(folder: Path) -> str:
    steps = sorted(int(p.name.removeprefix("step-")) for p in (folder / "checkpoints").glob("step-*") if p.name[5:].isdigit())
    if (folder / "result.json").exists():
        return "finished" + (f", checkpoints up to step {steps[-1]}" if steps else "")
    return f"checkpoints up to step {steps[-1]}" if steps else "no checkpoint"


def move_aside(folder: Path, entries: list[str]) -> Path:
    """Move `entries` of `folder` into a new sibling folder NAME.old-YYYYMMDD-HHMMSS; returns it."""
    aside = unused_name(folder.with_name(f"{folder.name}.old-{time.strftime('%Y%m%d-%H%M%S')}"))
    aside.mkdir()
    for name in entries:
        os.replace(folder / name, aside / name)
    return aside


def unused_name(path: Path) -> Path:
    """`path`, or `path-2`, `path-3`, ...: the first that does not exist (so nothing is replaced)."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file in the same folder and os.replace: readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
