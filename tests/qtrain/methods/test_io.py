"""qtrain.methods.io: saving and loading the non-LoRA methods' parameters beside the adapter."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from qtrain.methods import IA3, Houlsby
from qtrain.methods.io import load_method, save_method

from .conftest import apply


@pytest.mark.parametrize("make", [IA3, Houlsby], ids=["ia3-peft-format", "houlsby-qtrain-format"])
def test_load_method_refuses_non_finite_parameters(tiny_model, tmp_path, make):
    trained = tiny_model()
    method = make()
    apply(trained, [method])
    target = save_method(trained, method, tmp_path, "tiny")
    weights = next(target.glob("*.safetensors"))
    tensors = load_file(weights)
    name = min(k for k, v in tensors.items() if v.is_floating_point())
    tensors[name] = tensors[name].clone().index_fill_(0, torch.tensor([0]), float("nan"))
    save_file(tensors, weights, metadata={"format": "pt"})
    fresh = tiny_model()
    again = make()
    apply(fresh, [again])
    with pytest.raises(ValueError, match=re.escape(f"{weights}: tensor {name} holds NaN/inf values")) as e:
        load_method(fresh, again, tmp_path)
    assert "\n" not in str(e.value)
