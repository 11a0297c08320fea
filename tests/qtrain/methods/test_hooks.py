"""Methods put hooks on a model and take them off through the handles torch returned
(`qtrain.methods.hooks.ModuleHooks`): no code under qtrain/ edits torch's private hook tables,
removing a method leaves every module's hook tables as they were, and applying it again works."""

from __future__ import annotations

import ast
import copy
import gc
from pathlib import Path

import pytest
import torch
from torch import nn

from qtrain.methods import IA3, AdaLoRA, LlamaAdapter, PrefixTuning, PromptTuning, PTuning, PTuningV2
from qtrain.methods.hooks import ModuleHooks

QTRAIN = Path(__file__).resolve().parents[3] / "qtrain"
# every per-module hook table of torch.nn.Module (the side tables included)
TABLES = (
    "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks",
)  # fmt: skip
PRIVATE = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")  # and their *_suffix tables
MUTATING = {"pop", "popitem", "clear", "update", "setdefault", "move_to_end", "__setitem__", "__delitem__"}
# fused.py only asks whether a module has hooks (it may not bypass them): reading is allowed there, until
# the fused package (issue 17, item 4) asks a public question; editing is not allowed anywhere
READ_ONLY = ("fused.py", "fused/")


# ---- the source: no private hook tables, no private NF4 state ----


def table_uses(source: str) -> list[tuple[int, str, bool]]:
    """(line, attribute, whether it edits) of every use of a private hook table in `source`."""
    tree = ast.parse(source)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    uses = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith(PRIVATE):
            uses.append((node.lineno, node.attr, _edits(node, parents)))
    return uses


def _edits(node: ast.Attribute, parents: dict) -> bool:
    parent = parents.get(node)
    if isinstance(node.ctx, (ast.Store, ast.Del)):
        return True
    if isinstance(parent, ast.Subscript) and isinstance(parent.ctx, (ast.Store, ast.Del)):
        return True
    return isinstance(parent, ast.Attribute) and parent.attr in MUTATING


def sources() -> dict[str, str]:
    return {p.relative_to(QTRAIN).as_posix(): p.read_text() for p in sorted(QTRAIN.rglob("*.py"))}


def test_the_scan_finds_the_old_way():
    """The scan sees a removal by key (what ia3.py did), an alias of a side table, and a plain read."""
    old = (
        "flags = (m._forward_hooks_with_kwargs, m._forward_hooks_always_called)\n"
        "for key in [k for k, h in m._forward_hooks.items() if h is f]:\n"
        "    del m._forward_hooks[key]\n"
        "    m._forward_pre_hooks.pop(key, None)\n"
        "m._backward_hooks = {}\n"
    )
    uses = table_uses(old)
    assert {attr for _, attr, _ in uses} == {
        "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_hooks", "_forward_pre_hooks",
        "_backward_hooks",
    }  # fmt: skip
    assert sorted(line for line, _, edit in uses if edit) == [3, 4, 5]
    assert table_uses("h = m.register_forward_hook(f)\nh.remove()\n") == []


def test_no_code_edits_torchs_hook_tables():
    """Hooks are removed by handle (`ModuleHooks`); only fused.py may look at the tables, never edit them."""
    found = []
    for path, source in sources().items():
        for line, attr, edit in table_uses(source):
            if edit or not path.startswith(READ_ONLY):
                found.append(f"qtrain/{path}:{line} {attr}")
    assert not found, found


def test_methods_register_hooks_through_module_hooks():
    found = [
        f"qtrain/{path}:{node.lineno}"
        for path, source in sources().items()
        if path.startswith("methods/") and path != "methods/hooks.py"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Attribute) and node.attr.startswith(("register_forward", "register_full_backward"))
    ]
    assert not found, found


def test_nf4_state_is_read_through_lora_linears_properties():
    """Only LoRALinear itself (and fused.py until it moves to the properties) reads `_nf4_meta`."""
    found = [
        f"qtrain/{path}"
        for path, source in sources().items()
        if "_nf4_meta" in source and path != "lora.py" and not path.startswith(READ_ONLY)
    ]
    assert not found, found


# ---- ModuleHooks ----


def tables(model: nn.Module, values: bool = True) -> dict:
    """Every module's hook tables, {module name: {table: [(key, value)] or [key]}} (a test may read them)."""
    return {
        n: {t: list(getattr(m, t).items() if values else getattr(m, t)) for t in TABLES}
        for n, m in model.named_modules()
    }


def double(module, args, output):
    return output * 2


def shift(module, args, kwargs):
    return (args[0] + 1,), kwargs


def test_module_hooks_register_and_remove_by_handle():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    x = torch.randn(2, 3)
    before, want = tables(model), model(x)
    hooks = ModuleHooks()
    hooks.forward(model[0], double)
    hooks.forward_pre(model[1], shift, with_kwargs=True)
    assert hooks.on(model[0], double) and hooks.on(model[1]) and not hooks.on(model[0], shift) and len(hooks) == 2
    assert not torch.equal(model(x), want) and tables(model) != before
    hooks.remove(model)
    assert tables(model) == before and torch.equal(model(x), want)
    assert len(hooks) == 0 and not hooks.on(model[0])
    hooks.remove(model)  # nothing left: a no-op


def test_remove_takes_only_the_given_models_hooks():
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    hooks = ModuleHooks()
    hooks.forward(a, double)
    hooks.forward(b, double)
    hooks.remove(a)
    assert not a._forward_hooks and len(b._forward_hooks) == 1 and hooks.modules() == [b]
    hooks.remove()
    assert not b._forward_hooks and len(hooks) == 0


def test_the_registry_does_not_keep_a_model_alive():
    hooks = ModuleHooks()
    hooks.forward(nn.Linear(2, 2), double)
    gc.collect()
    assert len(hooks) == 0


def test_a_copied_registry_names_the_copied_modules():
    """A registry that the model holds (the virtual-token hooks) follows a deep copy of the model."""
    model = nn.Sequential(nn.Linear(2, 2))
    hooks = ModuleHooks()
    hooks.forward(model[0], double)
    model.registry = hooks  # a plain attribute: deepcopy copies it with the model
    clone = copy.deepcopy(model)
    clone.registry.remove(clone)
    assert not clone[0]._forward_hooks and len(model[0]._forward_hooks) == 1
    hooks.remove(model)
    assert not model[0]._forward_hooks


# ---- every method that hooks: remove gives the tables back, apply works again ----

METHODS = {
    "ia3": lambda: IA3(),
    "adalora": lambda: AdaLoRA(init_r=4, target_r=2, total_step=10),
    "llama_adapter": lambda: LlamaAdapter(adapter_len=3, adapter_layers=2),
    "prefix_tuning": lambda: PrefixTuning(num_virtual_tokens=3),
    "p_tuning_v2": lambda: PTuningV2(num_virtual_tokens=3),
    "prompt_tuning": lambda: PromptTuning(num_virtual_tokens=3),
    "p_tuning": lambda: PTuning(num_virtual_tokens=3),
}


def ids() -> torch.Tensor:
    return torch.randint(4, 100, (2, 9), generator=torch.Generator().manual_seed(0))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids()).logits


def perturbed(model, method) -> dict[str, torch.Tensor]:
    """Move the method's parameters off their init (so that its hooks change the output); returns them."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if method.owns(n):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return method.state_dict(model)


@pytest.mark.parametrize("name", METHODS)
def test_remove_gives_back_the_hook_tables_and_apply_works_again(tiny_model, name):
    model = tiny_model()
    before, base = tables(model), logits(model)
    method = METHODS[name]()
    method.apply(model)
    applied = tables(model)
    assert applied != before
    tensors = perturbed(model, method)
    tuned = logits(model)
    assert not torch.equal(tuned, base)
    method.remove(model)
    assert tables(model) == before
    assert torch.equal(logits(model), base)
    method.apply(model)  # again: the same hooks (new keys), the same function of the same parameters
    assert [len(v) for t in tables(model).values() for v in t.values()] == [
        len(v) for t in applied.values() for v in t.values()
    ]
    method.load_state_dict(model, tensors)
    assert torch.equal(logits(model), tuned)


def test_prompt_tuning_removed_from_a_deep_copy(tiny_model):
    """The virtual-token hooks live on the decoder: a deep copy carries them, and remove on the copy
    takes the copy's hooks off, not the original's."""
    model = tiny_model()
    before = tables(model)
    method = METHODS["prompt_tuning"]()
    method.apply(model)
    applied = tables(model)
    clone = copy.deepcopy(model)
    method.remove(clone)
    assert tables(clone, values=False) == {n: {t: [k for k, _ in v] for t, v in m.items()} for n, m in before.items()}
    assert tables(model) == applied
