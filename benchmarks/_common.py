"""What the benchmark scripts share (standard library only). benchmarks/ is no package: each script
loads this file by path (`_common()` in each), as the tests load the scripts themselves.

Result files are named with the commit's short hash alone; whether the work tree had uncommitted
changes is the `dirty` field inside the result (and a note beside the commit in its Markdown).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()


def git_state(root: Path = ROOT) -> dict:
    """{"commit": HEAD's short hash, "dirty": whether tracked or untracked files differ from it};
    {"commit": "unknown", "dirty": None} outside a git checkout or without git."""
    try:
        return {
            "commit": _git(root, "rev-parse", "--short", "HEAD"),
            "dirty": bool(_git(root, "status", "--porcelain")),
        }
    except (OSError, subprocess.CalledProcessError):
        return {"commit": "unknown", "dirty": None}


def describe_commit(meta: dict) -> str:
    """A result's commit for its Markdown: "abc1234", or "abc1234 (with uncommitted changes)"."""
    return str(meta["commit"]) + (" (with uncommitted changes)" if meta.get("dirty") else "")
