"""Saving and loading every PEFT method of a run (LoRA included): one path, `save_methods` /
`load_method`, each method in its `subfolder` (LoRA's is "": the folder's root, where PEFT looks).

    adapter/                      (qtrain train's output_dir/adapter, and each checkpoint's)
      adapter_config.json         LoRA, in PEFT's format (when the run uses LoRA; its own record)
      adapter_model.safetensors
      qtrain.json                 training info + "methods": [{"method": "ia3", ...its config}] (those in subfolders)
      ia3/                        a method PEFT implements: PEFT's format
        adapter_config.json         (PeftModel.from_pretrained(base, "adapter", subfolder="ia3"))
        adapter_model.safetensors
      houlsby/                    a method PEFT does not have: qtrain's format
        method.json                 {"method": "houlsby", ...its config}
        method.safetensors          the parameters under their model names
      prefix_tuning/              a method whose PEFT format is folded (`PeftMethod.folds`):
        adapter_config.json         PEFT's format (what PEFT saves: the reparameterisation's output)
        adapter_model.safetensors
        method.safetensors          and the training state (MLP / prompt encoder), which
                                    `load_method(..., resume=True)` reads to continue training
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from qtrain.methods.base import PeftMethod

PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
METHOD_CONFIG, METHOD_WEIGHTS = "method.json", "method.safetensors"


def method_from_dict(data: dict) -> PeftMethod:
    """A method from its config dict {"method": name, ...fields} (as `config_dict` writes it)."""
    from qtrain.methods import METHODS

    data = dict(data)
    name = data.pop("method", None)
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}")
    return METHODS[name](**data)


def save_methods(
    model: nn.Module,
    methods: list[PeftMethod],
    base_model: str,
    out_dir: str | Path,
    base_dtype: torch.dtype | None = None,
    quantized: bool = True,
    extra_info: dict | None = None,
    states: Sequence[dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write the adapter folder atomically: every method (`save_method`) into a temp dir beside
    `out_dir`, then a rename over it.

    A local `base_model` directory is recorded by its absolute path (`base_model_reference`).
    `base_dtype`/`quantized` record how the frozen base was held during training, so that
    `merge_adapter` can rebuild exactly that base; `extra_info` (e.g. the data format, which
    `qtrain generate` renders prompts with) joins them in qtrain.json, with the config of each
    method saved in a subfolder (one saved at the root, LoRA, is recorded by its PEFT config).
    `states`: each method's `state_dict`, already taken (FSDP: gathered by every rank; rank 0 writes)."""
    from qtrain.adapter import TRAINING_INFO, base_model_reference, replace_dir  # lazy: the loader's module

    base_model = base_model_reference(base_model)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp", dir=out_dir.parent))
    for i, method in enumerate(methods):
        save_method(model, method, tmp, base_model, None if states is None else states[i])
    recorded = [m.config_dict() for m in methods if m.subfolder]
    if base_dtype is not None or recorded:
        info = {"quantized": quantized, "base_model_name_or_path": base_model}
        if base_dtype is not None:
            info["base_dtype"] = str(base_dtype).removeprefix("torch.")
        if recorded:
            info["methods"] = recorded
        (tmp / TRAINING_INFO).write_text(json.dumps(info | (extra_info or {})) + "\n")
    replace_dir(tmp, out_dir)
    return out_dir


def save_method(model: nn.Module, method: PeftMethod, out_dir: Path, base_model: str, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write one method's parameters (`tensors`, default its `state_dict`) into `out_dir/<subfolder>/`
    (PEFT's format when it has one)."""
    target = Path(out_dir) / method.subfolder
    target.mkdir(parents=True, exist_ok=True)
    tensors = method.state_dict(model) if tensors is None else tensors
    if method.peft_type:
        save_file(method.to_peft(tensors), target / PEFT_WEIGHTS, metadata={"format": "pt"})
        (target / PEFT_CONFIG).write_text(json.dumps(method.peft_config(base_model), indent=2) + "\n")
        if method.folds:
            save_file(tensors, target / METHOD_WEIGHTS, metadata={"format": "pt"})
    else:
        save_file(tensors, target / METHOD_WEIGHTS, metadata={"format": "pt"})
        (target / METHOD_CONFIG).write_text(json.dumps(method.config_dict(), indent=2) + "\n")
    return target


def load_method(model: nn.Module, method: PeftMethod, adapter_dir: Path, resume: bool = False) -> None:
    """Copy a saved method's parameters (see `save_method`) into a model it was applied to.
    `resume`: a folding method's training state (to train on) rather than its folded PEFT tensors."""
    source = Path(adapter_dir) / method.subfolder
    raw = not method.peft_type or (resume and method.folds)
    weights = source / (METHOD_WEIGHTS if raw else PEFT_WEIGHTS)
    if not weights.exists():
        if not method.subfolder:  # at the root: the adapter's own files (LoRA's message as ever)
            raise FileNotFoundError(f"{weights}: not found")
        raise FileNotFoundError(f"{weights}: not found; {adapter_dir} holds no {method.name} parameters")
    from qtrain.adapter import read_adapter_file  # lazy: the loader's module

    tensors = read_adapter_file(weights)
    if raw:
        method.load_state_dict(model, tensors, source=str(weights))
    else:
        method.load_peft(model, tensors, source=str(weights))


def read_methods(info: dict, adapter_dir: str | Path | None = None) -> list[PeftMethod]:
    """The methods of an adapter: with `adapter_dir`, first the one saved at its root in PEFT's
    format (LoRA, read from its adapter_config.json: also an adapter PEFT trained, which has no
    qtrain.json; an adapter with nothing else is read as one, and a missing file is named), then
    those recorded in qtrain.json."""
    from qtrain.methods import METHODS

    recorded = [method_from_dict(d) for d in info.get("methods", [])]
    if adapter_dir is None:
        return recorded
    at_root = (Path(adapter_dir) / PEFT_CONFIG).exists() or not recorded
    root = [cls.from_saved({}, Path(adapter_dir)) for cls in METHODS.values() if cls.subfolder == ""] if at_root else []
    return [*root, *recorded]
