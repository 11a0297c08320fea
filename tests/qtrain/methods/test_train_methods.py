"""Every method through the training command: `method:` selects it, the adapter directory holds it,
`qtrain generate` loads it, a checkpoint resumes it; LoRA composes with the others."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from rich.console import Console

from qtrain.config import load_config
from qtrain.generate import load_for_inference
from qtrain.train import train

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
METHODS = ["bitfit", "ia3", "houlsby", "pfeiffer", "parallel_adapter", "[lora, ia3]", "[lora, houlsby]", "[lora, bitfit]"]


def run(out: Path, method: str, *overrides: str) -> dict:
    cfg = load_config(REPO / "configs" / "quickstart.yaml", [*SMALL, f"method={method}", f"output_dir={out}", *overrides])
    return train(cfg, Console(quiet=True))


@pytest.mark.parametrize("method", METHODS)
def test_train_save_generate(tmp_path, method):
    result = run(tmp_path, method, "train.max_steps=3", "train.lr=1e-2")
    adapter = Path(result["adapter"])
    names = [n.strip() for n in method.strip("[]").split(",")]
    others = [n for n in names if n != "lora"]
    info = json.loads((adapter / "qtrain.json").read_text())
    assert [m["method"] for m in info["methods"]] == others
    assert (adapter / "adapter_config.json").exists() == ("lora" in names)
    for name in others:
        assert (adapter / name).is_dir()
    b = torch.randint(4, 100, (2, 16))
    model, _, _ = load_for_inference(adapter, device="cpu")
    base, _, _ = load_for_inference(adapter, device="cpu", base_only=True)
    with torch.no_grad():
        tuned, plain = model(input_ids=b).logits, base(input_ids=b).logits
    assert (tuned - plain).abs().max() > 1e-4  # the trained parameters were loaded and change the output
    cfg = load_config(REPO / "configs" / "quickstart.yaml", [*SMALL, f"method={method}"])
    expected = sum(getattr(cfg, name).expected_trainable(base.config) for name in others)  # the papers' formulas
    if "lora" in names:
        assert result["trainable_params"] > expected
    else:
        assert result["trainable_params"] == expected


@pytest.mark.parametrize("method", ["ia3", "houlsby"])
def test_resume_continues_a_method_run(tmp_path, method):
    straight = run(tmp_path / "a", method, "train.max_steps=4", "train.lr=1e-2")
    run(tmp_path / "b", method, "train.max_steps=2", "train.lr=1e-2", "checkpoint.every=1")
    resumed = run(tmp_path / "b", method, "train.max_steps=4", "train.lr=1e-2", "checkpoint.resume=auto")
    assert resumed["steps"] == 4
    assert resumed["loss_last"] == pytest.approx(straight["loss_last"], rel=1e-5)


def test_unknown_method_is_a_config_error():
    from qtrain.config import ConfigError

    with pytest.raises(ConfigError, match="did you mean ia3"):
        load_config(REPO / "configs" / "quickstart.yaml", ["method=ia4"])
