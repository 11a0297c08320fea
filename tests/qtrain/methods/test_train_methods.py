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
    "llama_adapter.adapter_layers=2",  # the tiny model's layers (the default, 30, is the paper's for LLaMA-7B)
]
METHODS = [
    "adalora", "bitfit", "ia3", "houlsby", "pfeiffer", "parallel_adapter",
    "prompt_tuning", "p_tuning", "prefix_tuning", "p_tuning_v2", "llama_adapter",
    "[lora, ia3]", "[lora, houlsby]", "[lora, bitfit]", "[lora, prompt_tuning]", "[lora, prefix_tuning]",
]  # fmt: skip


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


@pytest.mark.parametrize("method", ["ia3", "houlsby", "p_tuning", "prefix_tuning", "adalora"])
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


def test_adapter_fusion_two_stages(tmp_path):
    """Stage 1: two Pfeiffer runs; stage 2: `method: adapter_fusion` over their adapters, loaded back by generate."""
    stage1 = [run(tmp_path / f"task{i}", "pfeiffer", "train.max_steps=2", "train.lr=1e-2", f"data.seed={i}")["adapter"] for i in range(2)]
    result = run(tmp_path / "fusion", "adapter_fusion", "train.max_steps=3", "train.lr=1e-2", f"adapter_fusion.adapters=[{stage1[0]}, {stage1[1]}]")
    adapter = Path(result["adapter"])
    info = json.loads((adapter / "qtrain.json").read_text())
    assert info["methods"][0]["adapters"] == [str(Path(a).resolve()) for a in stage1]
    model, _, _ = load_for_inference(adapter, device="cpu")
    d, L = model.config.hidden_size, model.config.num_hidden_layers
    assert result["trainable_params"] == L * (3 * d * d + 2 * d)
    value = model.model.layers[0].adapter_fusion.value.weight
    assert not torch.equal(value, torch.full_like(value, 1e-6).fill_diagonal_(1.0))  # trained, saved, loaded


def test_adapter_fusion_needs_its_adapters():
    from qtrain.config import ConfigError

    with pytest.raises(ConfigError, match="adapter_fusion.adapters: list the stage-1 adapter dirs"):
        load_config(REPO / "configs" / "quickstart.yaml", ["method=adapter_fusion"])


def test_train_step_adds_regularization_and_calls_after_step(tiny_checkpoint):
    """A method's regularization(model) joins the gradient once per step; after_step sees the step,
    the total and the gradients (before they are cleared); the reported loss stays the LM loss."""
    from dataclasses import dataclass

    from qtrain.methods import BitFit, mark_trainable
    from qtrain.model import load_model
    from qtrain.train import train_step

    @dataclass
    class PenalisedBitFit(BitFit):
        weight: float = 0.0

        def __post_init__(self):
            self.calls = []

        def regularization(self, model):
            if not self.weight:
                return None
            return self.weight * sum(p.pow(2).sum() for n, p in model.named_parameters() if self.owns(n))

        def after_step(self, model, step, total_steps):
            grads = [p.grad for n, p in model.named_parameters() if self.owns(n)]
            self.calls.append((step, total_steps, all(g is not None for g in grads)))

    path = tiny_checkpoint("qwen2", hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2)
    ids = torch.randint(4, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    results = []
    for weight in (0.0, 10.0):
        model = load_model(str(path), None, compute_dtype=torch.float32).model
        method = PenalisedBitFit(weight=weight)
        method.apply(model)
        mark_trainable(model, [method])
        trainable = [p for p in model.parameters() if p.requires_grad]
        with torch.no_grad():
            g = torch.Generator().manual_seed(1)
            for p in trainable:  # non-zero biases, the same in both runs
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        before = [p.detach().clone() for p in trainable]
        opt = torch.optim.SGD(trainable, lr=1e-2)
        loss, _ = train_step(model, [batch], opt, trainable, 0.0, "cpu", methods=[method], step=3, total_steps=7)
        results.append((loss, before, [p.detach() - b for p, b in zip(trainable, before)]))
        assert method.calls == [(3, 7, True)]
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)  # the LM loss, without the regulariser
    # SGD: the update differs by lr * d(reg)/dp = 1e-2 * 2 * 10 * p  (p the value before the step)
    for plain, reg, p in zip(results[0][2], results[1][2], results[1][1]):
        torch.testing.assert_close(plain - reg, 1e-2 * 2 * 10.0 * p, rtol=1e-4, atol=1e-7)


def test_adalora_schedule_is_checked_against_max_steps():
    from qtrain.config import ConfigError

    with pytest.raises(ConfigError, match=r"adalora: no budgeting phase: tinit=5 must be < train.max_steps \(4\)"):
        load_config(REPO / "configs" / "quickstart.yaml", ["method=adalora", "adalora.tinit=5", "train.max_steps=4"])
    load_config(REPO / "configs" / "quickstart.yaml", ["method=adalora", "adalora.tinit=5", "adalora.total_step=20", "train.max_steps=4"])


@pytest.mark.parametrize(
    "method,extra",
    [
        ("[lora, prompt_tuning]", []),
        ("p_tuning", ["p_tuning.anchors=['### Response:']", "p_tuning.split=[4, 4]", "p_tuning.num_virtual_tokens=8"]),
        ("[lora, p_tuning_v2]", []),
    ],
)
def test_prompt_methods_with_packing_checkpointing_eval_and_generation(tmp_path, method, extra):
    """The prompt methods through the whole recipe: packed rows (position ids restart, no mask),
    gradient checkpointing, eval loss, exact match and sample generations (virtual tokens are never
    labels: eval loss is over the real tokens), then `qtrain generate`'s loader gives the same
    greedy answers as the model at the end of training."""
    from qtrain.evaluate import generate

    result = run(
        tmp_path, method, "train.max_steps=4", "train.lr=1e-2", "data.packing=true", "train.gradient_checkpointing=true",
        "eval.exact_match=true", "eval.max_rows=4", "eval.max_new_tokens=4", "eval.every=2",
        "eval.samples=['Which letter comes next in the alphabet?']", *extra,
    )  # fmt: skip
    assert result["steps"] == 4 and result["eval_loss"] > 0 and 0.0 <= result["exact_match_after"] <= 1.0
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "eval_loss" in m] == [2, 4]
    model, tokenizer, _ = load_for_inference(result["adapter"], device="cpu")
    from qtrain.generate import format_prompt

    text, specials = format_prompt("Which letter comes next in the alphabet?", "alpaca", tokenizer)
    answers = generate(model, tokenizer, [text, text + " "], 4, add_special_tokens=specials)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
