"""The forward hooks a PEFT method puts on a model, kept as the handles torch returns.

    hooks = ModuleHooks()
    hooks.forward(module, scale_output)                          # module.register_forward_hook
    hooks.forward_pre(module, scale_input, with_kwargs=True)     # module.register_forward_pre_hook
    hooks.on(module, scale_output)                               # whether it is there
    hooks.remove(model)                                          # handle.remove() for model's modules

Why: removing a hook by deleting its key from a module's `_forward_hooks` / `_forward_pre_hooks`
means also knowing torch's side tables (`_forward_hooks_with_kwargs`, `_forward_hooks_always_called`,
...), a private layout that changes between torch versions. `RemovableHandle.remove()` is the public
way, and knows every table. Methods register every hook through one `ModuleHooks` (their runtime
state, not a config field) and undo `apply` with `remove`.

The handles are kept per module (weakly: a registry never keeps a dropped model alive). A deep copy
of the model carries its hooks (the hook objects are copied with the modules); this registry still
names the original modules, so `remove` undoes `apply` on the model it was applied to.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

from torch import nn
from torch.utils.hooks import RemovableHandle


class ModuleHooks:
    """Registers hooks on modules and remembers (hook, handle) per module, to remove them later."""

    def __init__(self) -> None:
        self._by_module: weakref.WeakKeyDictionary[nn.Module, list[tuple[Callable, RemovableHandle]]] = (
            weakref.WeakKeyDictionary()
        )

    def forward(self, module: nn.Module, hook: Callable, *, with_kwargs: bool = False) -> RemovableHandle:
        """`module.register_forward_hook(hook, with_kwargs=...)`, remembered."""
        return self._keep(module, hook, module.register_forward_hook(hook, with_kwargs=with_kwargs))

    def forward_pre(self, module: nn.Module, hook: Callable, *, with_kwargs: bool = False) -> RemovableHandle:
        """`module.register_forward_pre_hook(hook, with_kwargs=...)`, remembered."""
        return self._keep(module, hook, module.register_forward_pre_hook(hook, with_kwargs=with_kwargs))

    def _keep(self, module: nn.Module, hook: Callable, handle: RemovableHandle) -> RemovableHandle:
        self._by_module.setdefault(module, []).append((hook, handle))
        return handle

    def on(self, module: nn.Module, hook: Callable | None = None) -> bool:
        """Whether this registry put `hook` (any hook: None) on `module` and has not removed it."""
        return any(hook is None or h is hook for h, _ in self._by_module.get(module, ()))

    def modules(self) -> list[nn.Module]:
        """The modules that hold hooks of this registry."""
        return list(self._by_module)

    def remove(self, model: nn.Module | None = None) -> None:
        """Remove the hooks on `model`'s modules (every module: None), newest first."""
        chosen = self.modules() if model is None else [m for m in model.modules() if m in self._by_module]
        for module in chosen:
            for _, handle in reversed(self._by_module.pop(module)):
                handle.remove()

    def __getstate__(self) -> dict:
        """A copy (deepcopy, pickle) of a registry names the copied modules and handles (a deep copy
        of a model that holds one, as the virtual-token hooks do, can be undone on the copy)."""
        return {"kept": list(self._by_module.items())}

    def __setstate__(self, state: dict) -> None:
        self.__init__()
        for module, kept in state["kept"]:
            self._by_module[module] = kept

    def __len__(self) -> int:
        return sum(len(kept) for kept in self._by_module.values())
