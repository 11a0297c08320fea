"""The shape of the qtrain.fused package: loading a config stays light, every name the flat
`qtrain/fused.py` module had is still importable from `qtrain.fused`, and the variable-length
attention in `qtrain.kernels.varlen` depends on nothing of qtrain's outside `qtrain.kernels`."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
from qtrain.kernels import varlen

import qtrain.fused

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))

# Run outside the repository root (its kernels/ folder would shadow Hugging Face's `kernels`).
LOAD_CONFIGS = """
import json, sys
from qtrain.config import load_config
for path in sys.argv[1:]:
    load_config(path)
print(json.dumps(sorted(sys.modules)))
"""

# The fused modules that import transformers' modeling code (or need it at call time).
HEAVY = ("qtrain.fused.attention", "qtrain.fused.architectures", "qtrain.fused.projection", "qtrain.fused.swap")

# Every public name of the flat qtrain/fused.py before it became a package.
FLAT_NAMES = (
    "ARCHITECTURES", "Architecture", "CACHE_NAMES", "ENABLED", "FusedAttention", "FusedLlamaAttention", "FusedMLP",
    "FusedMistralAttention", "FusedOps", "FusedQwen2Attention", "FusedRMSNorm", "GATE_UP", "HALF", "OPS",
    "PackedBatches", "QKV", "SILU", "Swapped", "VARLEN_KWARGS", "apply_fused_ops", "blocked", "columns", "fusable",
    "fused_absmax", "fused_enabled", "fused_projection", "fused_weight", "install_varlen", "is_placeholder",
    "packed_segments", "rotate_own", "segment_attention", "share_codes", "shared_codes", "varlen_attention",
    "varlen_blocker",
)  # fmt: skip


def modeling_modules(names: list[str]) -> list[str]:
    """The model families' modeling files among module `names` (transformers.models.<family>.modeling_*).
    `transformers.models.auto` is a lazy name table, not a model's code, and is left out."""
    return [
        n for n in names
        if n.startswith("transformers.models.") and ".modeling_" in n and not n.startswith("transformers.models.auto.")
    ]  # fmt: skip


def test_loading_every_config_imports_no_modeling_code(tmp_path):
    assert CONFIGS, "no configs/*.yaml found"
    run = subprocess.run(
        [sys.executable, "-c", LOAD_CONFIGS, *map(str, CONFIGS)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    loaded = json.loads(run.stdout.strip().splitlines()[-1])
    assert "qtrain.fused.ops" in loaded  # the `kernels:` section's type was loaded...
    assert modeling_modules(loaded) == []  # ...and no model family's modeling code
    assert [n for n in HEAVY if n in loaded] == []


def test_the_modeling_check_sees_a_modeling_import(tmp_path):
    """The check above can fail: importing the fused attention classes pulls modeling files in."""
    code = "import json, sys\nimport qtrain.fused.architectures\nprint(json.dumps(sorted(sys.modules)))"
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         check=False)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "transformers.models.llama.modeling_llama" in modeling_modules(json.loads(run.stdout.strip()))


@pytest.mark.parametrize("name", FLAT_NAMES)
def test_every_name_of_the_flat_module_is_still_importable(name):
    assert name in qtrain.fused.__all__
    assert getattr(qtrain.fused, name) is not None


def test_unknown_names_raise_attribute_error():
    with pytest.raises(AttributeError, match="no_such_name"):
        qtrain.fused.no_such_name  # noqa: B018


def test_no_re_exported_name_is_a_submodule_name():
    """Importing `qtrain.fused.<name>` sets the package attribute <name> to the module: a function of
    that name would be replaced by it."""
    submodules = {p.stem for p in Path(qtrain.fused.__file__).parent.glob("*.py")} - {"__init__"}
    assert {"ops", "swap", "attention"} <= submodules
    assert submodules.isdisjoint(qtrain.fused.__all__)


def test_re_exports_are_the_defining_modules_objects():
    from qtrain.fused import attention, ops, swap

    assert qtrain.fused.FusedOps is ops.FusedOps and qtrain.fused.apply_fused_ops is swap.apply_fused_ops
    assert qtrain.fused.varlen_attention is varlen.varlen_attention is attention.varlen_attention


def test_kernels_varlen_imports_nothing_of_qtrain_outside_kernels():
    tree = ast.parse(Path(varlen.__file__).read_text())
    imported = [a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names]
    imported += [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert imported, "no imports parsed"
    outside = [m for m in imported if m.split(".")[0] == "qtrain" and not m.startswith("qtrain.kernels")]
    assert outside == []
