"""kernels/__init__.py: the folder is `qtrain.kernels`, never a top-level `kernels` (Hugging Face's name)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_in_repo_root(code: str) -> subprocess.CompletedProcess:
    """`python -c code` started in the repository root, where the `kernels/` folder is importable by name."""
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300, check=False)


def test_top_level_import_is_refused():
    proc = run_in_repo_root("import kernels")
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: this kernels/ folder is qtrain's, imported as qtrain.kernels")


def test_qtrain_kernels_imports_from_the_repo_root_and_bitsandbytes_finds_no_kernels():
    """bitsandbytes (on CPUs with AVX512-BF16) tries `from kernels import get_kernel` at import: it must
    not pick up this folder, and `qtrain.kernels` still works beside it."""
    code = (
        "import sys, importlib.util\n"
        "import qtrain.kernels\n"
        "print(qtrain.kernels.__name__, qtrain.kernels.resolve_backend.__module__)\n"
        "if importlib.util.find_spec('bitsandbytes'):\n"
        "    import bitsandbytes\n"
        "print('top-level kernels loaded:', 'kernels' in sys.modules)\n"
    )
    proc = run_in_repo_root(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["qtrain.kernels qtrain.kernels.nf4_lora", "top-level kernels loaded: False"]


def test_no_benchmark_script_is_taken_for_hugging_faces_kernels():
    """`python benchmarks/<script>.py` puts benchmarks/ first on sys.path, where transformers and
    bitsandbytes look for Hugging Face's `kernels` package at import: nothing there may answer to it
    (a benchmarks/kernels.py was imported, and run, by them)."""
    code = "import importlib.util, sys\nsys.path.insert(0, 'benchmarks')\nspec = importlib.util.find_spec('kernels')\n"
    code += "print(spec is None or 'benchmarks' not in str(spec.origin))\n"
    proc = run_in_repo_root(code)
    assert proc.returncode == 0 and proc.stdout.strip() == "True", proc.stderr
