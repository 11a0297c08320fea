"""qtrain.optim: optimizer choice, LoRA+ parameter groups, the learning-rate schedule."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch

from qtrain.lora import LoRASpec
from qtrain.methods.lora import LoRA
from qtrain.model import load_model
from qtrain.optim import build_optimizer, lr_lambda, param_groups, resolve_optimizer


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_model(str(tiny_checkpoint("llama")), LoRASpec(rank=4, alpha=8), compute_dtype=torch.float32).model


# ---- optimizer -------------------------------------------------------------------------------


def test_auto_is_adamw_on_cpu_and_paged_on_cuda():
    assert resolve_optimizer("auto", torch.device("cpu")) == "adamw"
    assert resolve_optimizer("auto", torch.device("cuda")) == "paged_adamw_32bit"
    assert resolve_optimizer("paged_adamw_8bit", torch.device("cuda")) == "paged_adamw_8bit"


@pytest.mark.parametrize("name", ["paged_adamw_32bit", "paged_adamw_8bit"])
def test_paged_optimizer_on_cpu_names_the_key(name):
    with pytest.raises(ValueError, match=rf"train\.optimizer: {name} needs a CUDA GPU"):
        resolve_optimizer(name, torch.device("cpu"))


def test_only_adapter_parameters_get_optimizer_state(model):
    groups = param_groups(model, 1e-3, 0.0)
    assert len(groups) == 1 and groups[0]["lr"] == 1e-3
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)].split(".")[-2] for p in groups[0]["params"]} == {"lora_a", "lora_b"}
    assert len(groups[0]["params"]) == sum(p.requires_grad for p in model.parameters())
    opt = build_optimizer("adamw", groups)
    assert isinstance(opt, torch.optim.AdamW)


def test_lora_plus_gives_b_matrices_a_larger_lr(model):
    groups = param_groups(model, 1e-4, 0.01, lora_plus_ratio=16.0, methods=[LoRA()])
    names = {id(p): n for n, p in model.named_parameters()}
    a_group, b_group = groups
    assert a_group["lr"] == 1e-4 and b_group["lr"] == pytest.approx(1.6e-3)
    assert all(".lora_a." in names[id(p)] for p in a_group["params"])
    assert all(".lora_b." in names[id(p)] for p in b_group["params"])
    assert len(a_group["params"]) == len(b_group["params"]) > 0
    # the schedule scales both groups by the same factor
    opt = build_optimizer("adamw", groups)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(10, 100, "cosine"))
    assert sched.get_last_lr() == pytest.approx([1e-5, 1.6e-4])


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["paged_adamw_32bit", "paged_adamw_8bit"])
def test_paged_optimizers_step_on_cuda(name):
    w = torch.nn.Parameter(torch.randn(64, 64, device="cuda"))
    opt = build_optimizer(name, [{"params": [w], "lr": 1e-2, "weight_decay": 0.0}])
    before = w.detach().clone()
    w.sum().backward()
    opt.step()
    assert not torch.equal(before, w) and type(opt).__name__.startswith("PagedAdamW")
    state = opt.state_dict()
    opt.load_state_dict(state)  # checkpoints round-trip the paged state


# ---- learning-rate schedule ------------------------------------------------------------------


def schedule(name: str, warmup: int = 10, total: int = 100):
    return lr_lambda(warmup, total, name)


@pytest.mark.parametrize("name", ["cosine", "linear", "constant"])
def test_linear_warmup(name):
    f = schedule(name)
    assert [f(s) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert f(10) == pytest.approx(1.0)  # the peak right after warmup


def test_cosine_decay():
    f = schedule("cosine")
    assert f(55) == pytest.approx(0.5)  # half way through the 90 decay steps
    assert f(10 + 30) == pytest.approx(0.5 * (1 + math.cos(math.pi / 3)))
    assert f(100) == pytest.approx(0.0, abs=1e-12)
    values = [f(s) for s in range(10, 101)]
    assert all(a >= b for a, b in pairwise(values))


def test_linear_decay():
    f = schedule("linear")
    assert f(55) == pytest.approx(0.5) and f(100) == 0.0
    assert f(120) == 0.0  # past the end: clamped, never negative
    assert f(19) == pytest.approx(1 - 9 / 90)


def test_constant():
    f = schedule("constant")
    assert [f(s) for s in (10, 50, 99, 500)] == [1.0] * 4


def test_no_warmup():
    assert schedule("cosine", warmup=0)(0) == 1.0
    assert schedule("linear", warmup=0, total=4)(2) == pytest.approx(0.5)


