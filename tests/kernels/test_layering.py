"""Import direction (issue 17): `kernels/` is the ground floor, the config layer holds no model code.

Read from the source with `ast` (every import statement, lazy ones inside functions included), so a
new file or a new lazy import is checked without being run. The checkers are tested on snippets too,
so that a checker that finds nothing cannot pass for a clean tree.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
KERNELS = ROOT / "kernels"

# What the config layer must not load: the model code and transformers' modeling files.
MODEL_MODULES = ("qtrain.fused", "qtrain.model", "qtrain.lora", "qtrain.train", "qtrain.generate", "qtrain.adapter")
MODELING_PREFIXES = ("transformers.models.", "transformers.modeling_utils")
# Config sections that live beside the code they configure and import none of it: `kernels:` is
# qtrain.fused.ops (dataclasses only); at run time its package `qtrain.fused` is loaded too, whose
# __init__ re-exports lazily (checked below).
CONFIG_SECTIONS = ("qtrain.fused.ops",)


def imported_modules(source: str, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `source`, a module of `package`; a relative
    import is resolved against `package` (`from ..x import y` in qtrain.kernels -> qtrain.x)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, _absolute(node, package)))
    return sorted(found)


def _absolute(node: ast.ImportFrom, package: str) -> str:
    if node.level == 0:
        return node.module or ""
    parts = package.split(".")
    base = parts[: len(parts) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def upward_imports(source: str) -> list[tuple[int, str]]:
    """Imports of qtrain (other than qtrain.kernels...) in a module of qtrain.kernels."""
    return [
        (line, name)
        for line, name in imported_modules(source, "qtrain.kernels")
        if (name == "qtrain" or name.startswith("qtrain.")) and not (name + ".").startswith("qtrain.kernels.")
    ]


def model_imports(source: str) -> list[tuple[int, str]]:
    """Imports of model code (qtrain's model modules, transformers' modeling files) in a qtrain module."""
    return [(line, name) for line, name in imported_modules(source, "qtrain") if _is_model_code(name)]


def _is_model_code(name: str, allowed: tuple[str, ...] = CONFIG_SECTIONS) -> bool:
    if name in allowed:
        return False
    in_qtrain = any(name == m or name.startswith(m + ".") for m in MODEL_MODULES)
    return in_qtrain or name.startswith(MODELING_PREFIXES) or name == "transformers.modeling_utils"


# ---- the checkers themselves --------------------------------------------------------------------


def test_upward_imports_are_found_wherever_they_are():
    source = (
        "import torch\nfrom qtrain.kernels.nf4 import NF4Tensor\nimport qtrain.kernels.rope\n"
        "from qtrain.nf4 import quantize_nf4\n"
        "def f():\n    from qtrain import config\n    import qtrain.model as m\n"
        "from .. import lora\nfrom . import swiglu\nfrom .nf4 import NF4Tensor\n"
    )
    assert upward_imports(source) == [(4, "qtrain.nf4"), (6, "qtrain"), (7, "qtrain.model"), (8, "qtrain")]


def test_model_imports_are_found():
    source = (
        "import yaml\nfrom qtrain.fused import FusedOps\nfrom qtrain.methods import AdaLoRA\n"
        "from transformers.models.llama import modeling_llama\nfrom qtrain.kernels.nf4 import BLOCKSIZE\n"
        "def f():\n    import qtrain.lora\n"
    )
    assert model_imports(source) == [(2, "qtrain.fused"), (4, "transformers.models.llama"), (7, "qtrain.lora")]


# ---- the tree ------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(KERNELS.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_kernels_never_import_qtrain(path):
    found = upward_imports(path.read_text())
    assert not found, f"{path.relative_to(ROOT)} imports qtrain above the kernels: " + ", ".join(
        f"line {line}: {name}" for line, name in found
    )


def test_every_kernel_file_is_checked():
    assert {p.name for p in KERNELS.glob("*.py")} >= {"__init__.py", "nf4.py", "nf4_lora.py", "_triton.py"}


def test_config_imports_no_model_code():
    found = model_imports((ROOT / "qtrain" / "config.py").read_text())
    assert not found, "qtrain/config.py imports model code: " + ", ".join(f"line {ln}: {n}" for ln, n in found)


def test_loading_a_config_loads_no_model_code():
    """At run time, transitively: what `import qtrain.config` pulls in (a fresh interpreter)."""
    code = (
        "import sys, qtrain.config\n"
        "print('\\n'.join(sorted(m for m in sys.modules if m.startswith(('qtrain.', 'transformers.')))))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    loaded = [name for name in proc.stdout.split() if _is_model_code(name, (*CONFIG_SECTIONS, "qtrain.fused"))]
    assert not loaded, f"import qtrain.config loads model code: {loaded}"


def test_the_config_sections_import_no_model_code():
    """What the allowed config sections (and the fused package's __init__, loaded with them) import
    at module level: nothing of the model code."""
    for path in (ROOT / "qtrain" / "fused" / "ops.py", ROOT / "qtrain" / "fused" / "__init__.py"):
        tree = ast.parse(path.read_text())
        top = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
        names = [name for node in top for _, name in imported_modules(ast.unparse(node), "qtrain.fused")]
        assert not [n for n in names if _is_model_code(n, ())], f"{path.relative_to(ROOT)} imports {names}"
