"""qtrain.builder: training, `qtrain generate` and the memory estimator build one model the same way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from rich.console import Console

from qtrain.adapter import TRAINING_INFO
from qtrain.builder import build_model, kernels_from_info, model_path, recorded_kernels
from qtrain.config import load_config
from qtrain.estimate import meta_model, workload_for
from qtrain.fused import FusedAttention, FusedOps
from qtrain.generate import load_for_inference
from qtrain.train import Recipe, RunOptions

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
SMALL = [
    "model.tiny.hidden_size=64",
    "model.tiny.intermediate_size=192",
    "model.tiny.num_layers=2",
    "data.num_train=16",
    "data.num_eval=4",
    "eval.exact_match=false",
]
CPU = torch.device("cpu")


def structure(model: torch.nn.Module) -> tuple[dict, list]:
    """({module name: its class}, the trainable parameter names)."""
    return {n: type(m).__name__ for n, m in model.named_modules()}, [n for n, p in model.named_parameters() if p.requires_grad]


def recipe_model(tmp_path: Path, *overrides: str) -> Recipe:
    """The recipe's phases up to the model (nothing trained), as `train` runs them."""
    cfg = load_config(QUICKSTART, [*SMALL, f"output_dir={tmp_path / 'run'}", *overrides])
    recipe = Recipe(cfg, Console(quiet=True), CPU, "adamw", RunOptions())
    recipe.setup_folder()
    recipe.setup_data()
    recipe.setup_model()
    return recipe


@pytest.mark.parametrize("methods", ["lora", "[lora, ia3]", "[bitfit, prompt_tuning]"])
def test_generate_builds_the_model_training_built(tmp_path, methods):
    """Same modules (fused ones included: the run's kernels settings travel in qtrain.json, here not
    the defaults, which keep CPU models stock) and the same trainable names."""
    recipe = recipe_model(tmp_path, f"method={methods}", "kernels.enabled=on", "kernels.varlen=false")
    assert recipe.built.fused, "kernels.enabled=on swaps fused modules in on CPU too"
    adapter = recipe.write_adapter(tmp_path / "adapter")
    assert json.loads((adapter / TRAINING_INFO).read_text())["kernels"]["enabled"] == "on"
    model, _, _ = load_for_inference(adapter, device="cpu")
    assert structure(model) == structure(recipe.model)
    assert any(isinstance(m, FusedAttention) for m in model.modules())


def test_generate_without_recorded_kernels_uses_the_defaults(tmp_path):
    recipe = recipe_model(tmp_path)
    adapter = recipe.write_adapter(tmp_path / "adapter")
    assert "kernels" not in json.loads((adapter / TRAINING_INFO).read_text())  # the defaults: not recorded
    model, _, _ = load_for_inference(adapter, device="cpu")
    assert structure(model) == structure(recipe.model)
    assert not any(isinstance(m, FusedAttention) for m in model.modules())  # defaults: stock modules on CPU


def test_recorded_kernels_round_trip(tmp_path):
    ops = FusedOps(enabled="on", varlen=False)
    assert recorded_kernels(FusedOps()) == {}
    assert kernels_from_info(recorded_kernels(ops), tmp_path) == ops
    assert kernels_from_info({}, tmp_path) == FusedOps()
    with pytest.raises(ValueError, match="kernels"):
        kernels_from_info({"kernels": {"fast": True}}, tmp_path / "qtrain.json")


@pytest.mark.parametrize("methods", ["lora", "[lora, ia3]", "[prompt_tuning, bitfit]", "[lora, houlsby]"])
def test_the_estimators_meta_build_matches_build_model(tmp_path, methods):
    """The estimator counts the parameters of the model training builds: same names and shapes."""
    cfg = load_config(QUICKSTART, [*SMALL, f"output_dir={tmp_path}", f"method={methods}"])
    built = build_model(cfg, model_path(cfg, tmp_path), CPU)
    meta = meta_model(built.loaded.config, None, workload_for(cfg, "cpu"))  # the workload holds the methods, LoRA too
    shapes = lambda model: {n: tuple(p.shape) for n, p in model.named_parameters()}  # noqa: E731
    assert shapes(meta) == shapes(built.model)
    assert structure(meta)[1] == structure(built.model)[1]  # the same parameters trainable


def test_build_model_uses_fresh_method_objects(tmp_path):
    """What training adds to a method (LoRA's targets here) lives on the built model's method objects,
    never on the config's sections."""
    cfg = load_config(QUICKSTART, [*SMALL, f"output_dir={tmp_path}", "method=[lora, ia3]"])
    built = build_model(cfg, model_path(cfg, tmp_path), CPU)
    lora, ia3 = built.methods
    assert (lora.name, ia3.name) == ("lora", "ia3") and lora is not cfg.lora and ia3 is not cfg.ia3
    assert lora.rank == cfg.lora.rank and len(lora.targets) == 2 * 7 and cfg.lora.targets == []  # 2 layers x 7 linears
