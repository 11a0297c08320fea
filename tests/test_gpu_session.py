"""benchmarks/gpu_session.sh: the one prepared GPU session runs to the end on CPU with --dry, writes at
most 8 files with one summary line per step, keeps its caps under 9 minutes, and records a failing
step and goes on."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"
STEPS = ["env", "pytest", "probe", "kernels", "dequant", "e2e", "int32"]

pytestmark = pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout"
)


def summary_rows(out: Path) -> list[list[str]]:
    """The step rows of summary.md: [step, status, seconds, cap, note]."""
    rows = [
        line.strip("|").split("|") for line in (out / "summary.md").read_text().splitlines() if line.startswith("| ")
    ]
    return [[c.strip() for c in row] for row in rows if row[0].strip() not in ("step",)]


def run_session(out: Path, python: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "COMMIT")} | {"OUT": str(out), "PYTHON": python}
    return subprocess.run(
        ["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.mark.slow
def test_dry_session_runs_every_step(tmp_path):
    # ~100 s on 2 busy cores: every step on CPU (pytest -m gpu collects and skips, the scripts with --dry).
    proc = run_session(tmp_path, sys.executable, "--dry")
    log = (tmp_path / "session.log").read_text() if (tmp_path / "session.log").exists() else ""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:] + log[-4000:]
    files = {p.name for p in tmp_path.rglob("*") if p.is_file()}
    results = {f"{name}.json" for name in ("probe", "kernels", "dequant", "e2e", "int32")}
    assert files == {"summary.md", "session.log", "e2e.md", *results}  # 8: what the device tool returns
    rows = summary_rows(tmp_path)
    assert [r[0] for r in rows] == STEPS
    assert all(r[1] == "ok" for r in rows), rows  # a step that crashed or timed out is not "ok"
    assert sum(int(r[3]) for r in rows) < 540  # the caps keep a real session under 9 minutes
    assert re.search(r"\d+ skipped", rows[1][4]), rows[1]  # pytest -m gpu collected the gpu tests and skipped them
    assert "commit" in rows[0][4] and "--dry" in (tmp_path / "summary.md").read_text().splitlines()[0]
    for name in ("probe", "kernels", "dequant", "int32"):
        result = json.loads((tmp_path / f"{name}.json").read_text())
        assert result["meta"]["dry"] is True and result["meta"]["commit"], name
    e2e = json.loads((tmp_path / "e2e.json").read_text())  # both stacks trained a tiny Llama, the e2e.png left behind
    assert [(r["stack"], r["error"]) for r in e2e["rows"]] == [("baseline", None), ("qtrain", None)]


def test_failing_steps_are_recorded_and_the_session_goes_on(tmp_path):
    # A "python" that fails every command: each step is recorded as failed, none stops the session.
    fake = tmp_path / "python"
    fake.write_text('#!/usr/bin/env bash\necho "fake python: $*" >&2\nexit 3\n')
    fake.chmod(0o755)
    out = tmp_path / "out"
    proc = run_session(out, str(fake), "--dry", timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rows = summary_rows(out)
    assert [r[0] for r in rows] == STEPS
    assert all(r[1] == "FAIL (exit 3)" for r in rows[1:]), rows
    assert rows[0][1] == "FAIL (exit 3)"  # env: the version report failed too
    log = (out / "session.log").read_text()
    assert log.count("fake python:") >= len(STEPS) and "===== int32: FAIL (exit 3)" in log


def test_usage(tmp_path):
    proc = run_session(tmp_path, sys.executable, "--bogus", timeout=30)
    assert proc.returncode == 2 and "usage" in proc.stderr
