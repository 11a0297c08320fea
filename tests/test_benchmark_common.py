"""benchmarks/_common.py: the commit a benchmark result is stamped with, and whether it was dirty."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "_common.py"


@pytest.fixture(scope="module")
def common():
    spec = importlib.util.spec_from_file_location("benchmark_common", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def git(cwd: Path, *args: str) -> str:
    cmd = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_git_state_names_the_clean_commit_and_says_dirty_apart(common, tmp_path):
    git(tmp_path, "init", "-q")
    (tmp_path / "a.txt").write_text("1")
    git(tmp_path, "add", "a.txt")
    git(tmp_path, "commit", "-q", "-m", "one")
    sha = git(tmp_path, "rev-parse", "--short", "HEAD")
    assert common.git_state(tmp_path) == {"commit": sha, "dirty": False}
    (tmp_path / "a.txt").write_text("2")
    assert common.git_state(tmp_path) == {"commit": sha, "dirty": True}  # the name stays the commit's


def test_git_state_outside_a_checkout(common, tmp_path):
    assert common.git_state(tmp_path) == {"commit": "unknown", "dirty": None}


def test_describe_commit(common):
    assert common.describe_commit({"commit": "abc1234", "dirty": True}) == "abc1234 (with uncommitted changes)"
    assert common.describe_commit({"commit": "abc1234", "dirty": False}) == "abc1234"
    assert common.describe_commit({"commit": "abc1234"}) == "abc1234"  # results written before `dirty` existed
