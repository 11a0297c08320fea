"""What the benchmark scripts share (standard library only). benchmarks/ is no package: each script
loads this file by path (`_common()` in each), as the tests load the scripts themselves.

Result files are named with the commit's short hash alone; whether the work tree had uncommitted
changes is the `dirty` field inside the result (and a note beside the commit in its Markdown).
"""

from __future__ import annotations

import json
import platform
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()


def git_state(root: Path = ROOT) -> dict:
    """{"commit": HEAD's short hash, "dirty": whether tracked or untracked files (result files aside) differ from it};
    {"commit": "unknown", "dirty": None} outside a git checkout or without git."""
    try:
        return {
            "commit": _git(root, "rev-parse", "--short", "HEAD"),
            "dirty": bool(_git(root, "status", "--porcelain", "--", ".", ":!benchmarks/results")),  # results are outputs
        }
    except (OSError, subprocess.CalledProcessError):
        return {"commit": "unknown", "dirty": None}


def describe_commit(meta: dict) -> str:
    """A result's commit for its Markdown: "abc1234", or "abc1234 (with uncommitted changes)"."""
    return str(meta["commit"]) + (" (with uncommitted changes)" if meta.get("dirty") else "")


def cpu_name() -> str:
    """The CPU's model name ("AMD EPYC 9B14"), from /proc/cpuinfo where there is one."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The CPU's vector-unit flags that decide which kernels run (AVX2, AVX-512, AVX512-BF16, AMX)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return []
    return sorted(f for f in flags.split(":", 1)[1].split() if f.startswith(("avx512_bf16", "avx512f", "amx", "avx2")))


def write_results(result: dict, out: Path, kind: str, markdown: str) -> tuple[Path, Path]:
    """out/<kind>-<cpu>-<date>-<commit>.{json,md}, each written to a temp file and renamed (a reader
    never sees half a file). `result["meta"]` has date, commit and cpu."""
    meta = result["meta"]
    slug = re.sub(r"[^a-z0-9]+", "-", meta["cpu"].lower()).strip("-")[:40]
    stem = out / f"{kind}-{slug}-{meta['date'][:10]}-{meta['commit']}"
    out.mkdir(parents=True, exist_ok=True)
    paths = stem.with_suffix(".json"), stem.with_suffix(".md")
    for path, text in zip(paths, (json.dumps(result, indent=2), markdown)):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return paths
