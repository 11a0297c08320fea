"""AdaLoRA's config is not its runtime state: the EMAs, the rank pattern and the budget live in a
`RankAllocation` the method object owns, never in the dataclass's fields (the `adalora:` config
section), and training through `qtrain train` leaves the config's section as it was loaded."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from rich.console import Console

from qtrain.config import load_config
from qtrain.methods.adalora import AdaLoRA, RankAllocation
from qtrain.train import train

REPO = Path(__file__).resolve().parents[3]
SETTINGS = {"init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 1, "total_step": 6}


def drive(model, method: AdaLoRA, steps: int) -> None:
    """Synthetic gradients and `after_step` for `steps` updates (the allocation needs no real loss)."""
    g = torch.Generator().manual_seed(5)
    params = {n: p for n, p in model.named_parameters() if method.owns(n)}
    for step in range(1, steps + 1):
        with torch.no_grad():
            for name in sorted(params):
                params[name].add_(0.05 * torch.randn(params[name].shape, generator=g))
                params[name].grad = torch.randn(params[name].shape, generator=g)
        method.after_step(model, step, SETTINGS["total_step"])


def test_the_allocation_is_not_a_config_field(tiny_model):
    model = tiny_model()
    method = AdaLoRA(**SETTINGS)
    config = method.config_dict()
    method.apply(model)
    drive(model, method, 5)  # past the final allocation (T - tfinal = 5)
    state = method.allocation
    assert isinstance(state, RankAllocation) and state.rank_pattern is not None and state.budget == 2 * 4
    assert method.rank_pattern == state.rank_pattern and method.budget == state.budget
    assert {f.name for f in dataclasses.fields(method)}.isdisjoint({"allocation", *dataclasses.asdict(state)})
    assert method.config_dict() == config and method == AdaLoRA(**SETTINGS)  # the config did not move
    method.remove(model)
    assert method.rank_pattern is None and method.budget is None  # a new, empty allocation


def test_the_trainer_state_round_trips_through_a_new_method(tiny_model):
    model = tiny_model()
    method = AdaLoRA(**{**SETTINGS, "tfinal": 2})
    method.apply(model)
    drive(model, method, 3)  # before the final allocation: EMAs and a pattern
    saved = method.trainer_state()
    assert saved["exp_avg_ipt"] and saved["rank_pattern"] is not None
    again = AdaLoRA(**{**SETTINGS, "tfinal": 2})
    assert again.rank_pattern is None and again.trainer_state()["exp_avg_ipt"] == {}
    again.load_trainer_state(model, saved)
    restored = again.trainer_state()
    assert restored["rank_pattern"] == saved["rank_pattern"] and restored["budget"] == saved["budget"]
    assert all(torch.equal(restored["exp_avg_ipt"][n], t) for n, t in saved["exp_avg_ipt"].items())


def test_training_leaves_the_config_section_as_loaded(tmp_path):
    overrides = [
        "model.tiny.hidden_size=64", "model.tiny.intermediate_size=128", "model.tiny.num_layers=2",
        "train.batch_size=4", "data.num_train=16", "data.max_length=256", "eval.exact_match=false",
        "log.tensorboard=false", "log.plot=false", "method=adalora", "adalora.init_r=4", "adalora.target_r=2",
        "train.max_steps=3", f"output_dir={tmp_path}",
    ]  # fmt: skip
    cfg = load_config(REPO / "configs" / "quickstart.yaml", overrides)
    loaded = dataclasses.asdict(cfg.adalora)
    result = train(cfg, Console(quiet=True))
    saved = json.loads((Path(result["adapter"]) / "adalora" / "adapter_config.json").read_text())
    assert sum(sum(kept) for kept in saved["rank_pattern"].values()) == 2 * 4  # the run allocated its budget
    assert dataclasses.asdict(cfg.adalora) == loaded
    assert cfg.adalora.rank_pattern is None and cfg.adalora.budget is None  # ... on its own method object
    assert cfg.adalora.trainer_state()["exp_avg_ipt"] == {}
