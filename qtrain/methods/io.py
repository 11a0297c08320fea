"""Saving and loading the non-LoRA methods of a run, beside the LoRA adapter.

    adapter/                      (qtrain train's output_dir/adapter, and each checkpoint's)
      adapter_config.json         LoRA, in PEFT's format (when the run uses LoRA)
      adapter_model.safetensors
      qtrain.json                 training info + "methods": [{"method": "ia3", ...its config}]
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
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from qtrain.adapter import read_adapter_file
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


def save_method(model: nn.Module, method: PeftMethod, out_dir: Path, base_model: str) -> Path:
    """Write one method's parameters into `out_dir/<name>/` (PEFT's format when it has one)."""
    target = Path(out_dir) / method.name
    target.mkdir(parents=True, exist_ok=True)
    tensors = method.state_dict(model)
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
    source = Path(adapter_dir) / method.name
    raw = not method.peft_type or (resume and method.folds)
    weights = source / (METHOD_WEIGHTS if raw else PEFT_WEIGHTS)
    if not weights.exists():
        raise FileNotFoundError(f"{weights}: not found; {adapter_dir} holds no {method.name} parameters")
    tensors = read_adapter_file(weights)
    if not raw:
        tensors = method.from_peft(tensors)
    method.load_state_dict(model, tensors, source=str(weights))


def read_methods(info: dict) -> list[PeftMethod]:
    """The methods recorded in an adapter's qtrain.json (none for plain LoRA adapters)."""
    return [method_from_dict(d) for d in info.get("methods", [])]
