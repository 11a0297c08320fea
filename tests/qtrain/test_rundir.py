"""qtrain.rundir: the run folder's lock, and a fresh run never over another run's files."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from qtrain.rundir import LOCK, RunLock, check_fresh, move_aside

# ---- the lock ---------------------------------------------------------------------------------


def test_a_second_lock_on_the_folder_is_refused_naming_the_holder(tmp_path):
    with RunLock(tmp_path / "run"):
        owner = json.loads((tmp_path / "run" / LOCK).read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        with pytest.raises(ValueError, match=rf"in use by another qtrain run \(PID {os.getpid()} on {socket.gethostname()}"):
            with RunLock(tmp_path / "run"):
                pass
    assert not (tmp_path / "run" / LOCK).exists()  # released and removed at the end
    with RunLock(tmp_path / "run"):  # free again
        pass


def test_a_lock_held_by_another_process_is_refused(tmp_path):
    holder = (
        "import sys, time; from qtrain.rundir import RunLock\n"
        "with RunLock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", holder, str(tmp_path / "run")], cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match=rf"in use by another qtrain run \(PID {proc.pid} "):
            with RunLock(tmp_path / "run"):
                pass
    finally:
        proc.kill()
        proc.wait()
    messages = []
    with RunLock(tmp_path / "run", say=messages.append):  # killed (-9): its lock is stale, and taken over
        pass
    (message,) = messages
    assert message.startswith(f"output_dir: took over a stale lock (PID {proc.pid} on {socket.gethostname()}, started ")
    assert message.endswith(", no longer running)")


def test_a_stale_lock_file_is_taken_over_with_a_message(tmp_path):
    (tmp_path / LOCK).write_text(json.dumps({"pid": 2**22 + 17, "host": socket.gethostname(), "started": "2026-01-01 00:00:00"}))
    messages = []
    with RunLock(tmp_path, say=messages.append):
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    assert messages == [f"output_dir: took over a stale lock (PID {2**22 + 17} on {socket.gethostname()}, started 2026-01-01 00:00:00, no longer running)"]


def test_output_dir_that_is_a_file_or_not_writable_is_one_clear_line(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("mine")
    with pytest.raises(ValueError, match=r"output_dir=.*file: a file of that name is in the way|path component is a file"):
        with RunLock(tmp_path / "file"):
            pass
    assert (tmp_path / "file").read_text() == "mine"

    import qtrain.rundir as rundir

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(rundir.os, "open", denied)
    with pytest.raises(ValueError, match=r"output_dir=.*ro: not writable \(permission denied\); choose a folder you can write to"):
        with RunLock(tmp_path / "ro"):
            pass


# ---- a fresh run needs a folder of its own -----------------------------------------------------


def test_an_empty_or_new_folder_is_fresh_and_base_and_memory_profile_do_not_count(tmp_path):
    assert check_fresh(tmp_path / "new", overwrite=False) == []
    for shared in ("base", "memory-profile"):
        (tmp_path / shared).mkdir()
    (tmp_path / LOCK).write_text("{}")
    assert check_fresh(tmp_path, overwrite=False) == []


def test_a_folder_holding_a_run_is_refused_unless_overwrite(tmp_path):
    (tmp_path / "checkpoints" / "step-0000040").mkdir(parents=True)
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "base").mkdir()
    with pytest.raises(ValueError, match=r"already holds a run \(checkpoints up to step 40\); continue it with --resume.*--overwrite"):
        check_fresh(tmp_path, overwrite=False)
    assert check_fresh(tmp_path, overwrite=True) == ["checkpoints", "metrics.jsonl"]


def test_a_folder_with_files_that_are_not_a_run_is_refused_even_with_overwrite(tmp_path):
    (tmp_path / "thesis.tex").write_text("years of work")
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    for overwrite in (False, True):
        with pytest.raises(ValueError, match=r"holds files that are not a qtrain run's \(thesis.tex\)"):
            check_fresh(tmp_path, overwrite)


def test_move_aside_moves_every_entry_into_a_new_sibling(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("a\n")
    (run / "base").mkdir()
    first = move_aside(run, ["checkpoints", "metrics.jsonl"])
    (run / "metrics.jsonl").write_text("b\n")
    second = move_aside(run, ["metrics.jsonl"])  # twice within a second: a new name, nothing replaced
    assert first != second and first.parent == run.parent and first.name.startswith("run.old-")
    assert (first / "metrics.jsonl").read_text() == "a\n" and (second / "metrics.jsonl").read_text() == "b\n"
    assert sorted(p.name for p in run.iterdir()) == ["base"]
    assert time.strftime("%Y%m%d") in first.name


def test_run_files_name_what_a_run_writes(tmp_path):
    import qtrain.metrics as metrics
    from qtrain.rundir import RUN_FILES

    names = (metrics.METRICS_FILE, metrics.SAMPLES_FILE, metrics.TENSORBOARD_DIR, metrics.WANDB_ID_FILE)
    assert set(names) <= set(RUN_FILES)  # else --overwrite would take a W&B run's folder for someone else's files
