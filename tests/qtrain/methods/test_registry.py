"""Adding a method is one module + one registry line (issue 17): a method defined HERE, registered with
the one call, trains through `qtrain train`, is saved in the adapter folder and loaded back by
`qtrain generate`'s loader, with no other edit of qtrain. And the memory estimator holds no switch on
method names (each method carries its own memory facts)."""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from qtrain.methods import METHODS, PeftMethod
from qtrain.methods.base import decoder_layers

REPO = Path(__file__).resolve().parents[3]
SMALL = [
    "model.tiny.hidden_size=64",
    "model.tiny.intermediate_size=128",
    "model.tiny.num_layers=2",
    "train.batch_size=4",
    "data.num_train=16",
    "data.max_length=256",
    "eval.exact_match=false",
    "log.tensorboard=false",
    "log.plot=false",
]


def _scale_output(layer: nn.Module, args, output):
    """y -> y * (1 + g) on a decoder layer's hidden states (a tuple's first element, or the tensor)."""
    hidden = output[0] if isinstance(output, tuple) else output
    scaled = hidden * (1 + layer.gain).to(hidden.dtype)
    return (scaled, *output[1:]) if isinstance(output, tuple) else scaled


@dataclass
class Gain(PeftMethod):
    """A learned gain per hidden channel after each decoder layer, zero at init (the identity)."""

    name: ClassVar[str] = "gain"
    init: float = 0.0  # g at init (its config section: `gain: {init: ...}`)

    def apply(self, model: nn.Module) -> None:
        d = model.config.get_text_config().hidden_size
        for layer in decoder_layers(model):
            device = next(layer.parameters()).device
            layer.register_parameter("gain", nn.Parameter(torch.full((d,), self.init, device=device)))
            self.hooks.forward(layer, _scale_output)

    def owns(self, param_name: str) -> bool:
        return param_name.rpartition(".")[2] == "gain"

    def expected_trainable(self, config) -> int:
        c = config.get_text_config()
        return c.num_hidden_layers * c.hidden_size


@pytest.fixture
def registered(monkeypatch):
    """The one registration line, undone after the test (no other test sees the method)."""
    monkeypatch.setitem(METHODS, Gain.name, Gain)
    return Gain


def test_a_method_defined_outside_qtrain_trains_saves_and_loads(tmp_path, registered):
    from qtrain.cli import main
    from qtrain.generate import load_for_inference

    out = tmp_path / "run"
    argv = ["train", str(REPO / "configs" / "quickstart.yaml"), *SMALL, "method=gain", "gain.init=0.0"]
    assert main([*argv, f"output_dir={out}", "train.max_steps=4", "train.lr=5e-2", "train.warmup_steps=0"]) == 0

    result = json.loads((out / "result.json").read_text())
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(losses) == 4 and losses[-1] != losses[0]  # the loss moves
    adapter = Path(result["adapter"])
    info = json.loads((adapter / "qtrain.json").read_text())
    assert info["methods"] == [{"method": "gain", "init": 0.0}]
    assert not (adapter / "adapter_config.json").exists()  # no LoRA: nothing at the root
    saved = load_file(adapter / "gain" / "method.safetensors")
    assert sorted(saved) == ["model.layers.0.gain", "model.layers.1.gain"]  # only its parameters were saved
    assert all(t.abs().max() > 0 for t in saved.values())  # and they trained

    model, _, _ = load_for_inference(adapter, device="cpu")
    base, _, _ = load_for_inference(adapter, device="cpu", base_only=True)
    assert result["trainable_params"] == Gain().expected_trainable(base.config)  # only its parameters trained
    for name, value in saved.items():
        assert torch.equal(model.get_parameter(name).detach().cpu(), value)
    tuned = dict(model.named_parameters())
    assert {n for n in tuned if n not in dict(base.named_parameters())} == set(saved)  # nothing else was added
    ids = torch.randint(4, 100, (1, 12))
    with torch.no_grad():
        assert (model(input_ids=ids).logits - base(input_ids=ids).logits).abs().max() > 1e-4  # its hooks run


def test_a_registered_method_has_its_config_section(registered):
    from qtrain.config import ConfigError, load_config, to_dict

    cfg = load_config(REPO / "configs" / "quickstart.yaml", ["method=[lora, gain]", "gain.init=0.5"])
    assert cfg.gain == Gain(init=0.5) and to_dict(cfg)["gain"] == {"init": 0.5}
    assert [type(m) for m in cfg.method_objects()] == [METHODS["lora"], Gain]
    assert cfg.method_objects()[1] is not cfg.gain  # a fresh object per run
    with pytest.raises(ConfigError, match=r"gain\.inti: unknown key; did you mean gain\.init\?"):
        load_config(REPO / "configs" / "quickstart.yaml", ["gain.inti=1"])


def test_unregistered_method_is_unknown():
    from qtrain.config import ConfigError, load_config

    assert "gain" not in METHODS
    with pytest.raises(ConfigError, match="unknown method 'gain'"):
        load_config(REPO / "configs" / "quickstart.yaml", ["method=gain"])


# ---- no method-name switches in the estimator ------------------------------------------------------


def name_switches(source: str) -> list[tuple[int, str]]:
    """(line, text) of every comparison of a `.name` attribute (`m.name == "ia3"`, `m.name in (...)`),
    and every "lora" string constant, in `source`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(isinstance(s, ast.Attribute) and s.attr == "name" for s in sides):
                found.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.Constant) and node.value == "lora":
            found.append((node.lineno, repr(node.value)))
    return sorted(found)


def test_name_switches_are_found():
    source = (
        'def f(m, w):\n    if m.name == "ia3":\n        return 1\n    x = [m for m in w if m.name in ("a", "b")]\n'
        '    y = "lora"\n    return m.name\n'
    )
    assert [line for line, _ in name_switches(source)] == [2, 4, 5]


def test_the_estimator_switches_on_no_method_name():
    found = name_switches((REPO / "qtrain" / "estimate.py").read_text())
    assert not found, "qtrain/estimate.py switches on method names: " + "; ".join(f"line {ln}: {t}" for ln, t in found)
