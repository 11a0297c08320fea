"""qtrain/train.py reads in phases: short functions, and `Recipe.run` calls the named phases in order."""

from __future__ import annotations

import ast
from pathlib import Path

TRAIN = Path(__file__).resolve().parents[2] / "qtrain" / "train.py"
MAX_LINES = 60
PHASES = [
    "setup_folder",
    "setup_data",
    "setup_model",
    "setup_batches",
    "open_folder",
    "setup_optimizer",
    "resume",
    "setup_reference",
    "score_before",
    "train_loop",
    "finish",
]


def tree() -> ast.Module:
    return ast.parse(TRAIN.read_text(), filename=str(TRAIN))


def functions(node: ast.AST) -> list[ast.FunctionDef]:
    return [n for n in ast.walk(node) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_no_function_in_the_recipe_is_longer_than_60_lines():
    long = {f.name: f.end_lineno - f.lineno + 1 for f in functions(tree()) if f.end_lineno - f.lineno + 1 > MAX_LINES}
    assert not long, f"split these (lines from def to end): {long}"


def test_no_closures_in_the_recipe():
    """State lives on the Recipe and its TrainState, not in nested functions (lambdas for messages aside)."""
    nested = [(outer.name, inner.name) for outer in functions(tree()) for inner in functions(outer) if inner is not outer]
    assert not nested


def test_the_recipe_runs_its_named_phases_in_order():
    (recipe,) = [n for n in tree().body if isinstance(n, ast.ClassDef) and n.name == "Recipe"]
    methods = {f.name: f for f in recipe.body if isinstance(f, ast.FunctionDef)}
    assert set(PHASES) <= set(methods)
    calls = [
        c.func.attr
        for c in ast.walk(methods["run"])
        if isinstance(c, ast.Call) and isinstance(c.func, ast.Attribute) and isinstance(c.func.value, ast.Name) and c.func.value.id == "self"
    ]
    assert calls == PHASES
    assert {"TrainState", "train", "train_step", "loss_sum"} <= {n.name for n in tree().body if isinstance(n, (ast.ClassDef, ast.FunctionDef))}
