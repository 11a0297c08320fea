"""The one backend policy (`qtrain.kernels.backend`): every op resolves "auto" through it, and each
op's self-check is registered, importable and able to say no."""

from __future__ import annotations

import importlib

import pytest
import qtrain.kernels.backend as policy
import torch
from qtrain.kernels import cross_entropy, linear_cross_entropy, nf4_lora, rms_norm, rope, swiglu

RESOLVERS = {  # op -> its module's resolve_backend(backend, x)
    "nf4_lora": nf4_lora.resolve_backend,
    "cross_entropy": cross_entropy.resolve_backend,
    "linear_cross_entropy": linear_cross_entropy.resolve_backend,
    "rope": rope.resolve_backend,
}


@pytest.fixture
def asked(monkeypatch):
    """Record which ops ask the policy whether "auto" may use Triton, and say yes."""
    calls: list[str] = []
    monkeypatch.setattr(policy, "_auto_may_use_triton", lambda op, x: calls.append(op) or True)
    monkeypatch.setattr(policy, "_TRITON_FAILED", {})
    return calls


def test_every_op_has_an_importable_self_check():
    assert set(policy.OPS) == {"nf4_lora", "rms_norm", "rope", "swiglu", "cross_entropy", "linear_cross_entropy"}
    for op, where in policy.OPS.items():
        module, name = where.split(":")
        assert callable(getattr(importlib.import_module(module), name)), op


@pytest.mark.parametrize("op", sorted(RESOLVERS))
def test_each_op_resolves_auto_through_the_policy(op, asked):
    x = torch.empty(2)
    assert RESOLVERS[op]("auto", x) == "triton" and asked == [op]
    assert RESOLVERS[op]("torch", x) == "torch" and RESOLVERS[op]("triton", x) == "triton" and asked == [op]
    with pytest.raises(ValueError, match=f"{op}: backend 'cuda' is not one of"):
        RESOLVERS[op]("cuda", x)


@pytest.mark.parametrize("op", sorted(RESOLVERS))
def test_a_triton_failure_on_a_device_means_torch_there(op, asked):
    policy._TRITON_FAILED["cpu"] = "OutOfResources()"
    assert RESOLVERS[op]("auto", torch.empty(2)) == "torch" and asked == []


def test_rms_norm_and_swiglu_ask_the_policy_outside_the_interpreter(asked, monkeypatch):
    x = torch.randn(3, 8)
    for module in (rms_norm, swiglu):
        monkeypatch.setattr(module, "triton", object())  # as where triton is installed
        monkeypatch.setattr(module, "is_interpreting", lambda: False)
    assert rms_norm._use_triton(x, torch.ones(8)) and swiglu._use_triton(x, x)
    assert asked == ["rms_norm", "swiglu"]


def test_cpu_auto_is_torch_for_every_op():
    x = torch.empty(2)  # no CUDA tensor: "auto" never takes Triton, whatever is installed
    assert {policy.resolve_backend(op, "auto", x) for op in policy.OPS} == {"torch"}
    with pytest.raises(KeyError, match="unknown kernel op"):
        policy.resolve_backend("softmax", "auto", x)


# ---- the new self-checks, run under the interpreter on CPU (compiled on a GPU) -----------------------

SELF_CHECKED = {  # op module -> the name its self-check runs as the Triton path
    rms_norm: "RMSNormFunction",
    swiglu: "SwiGLUFunction",
    rope: "rope_",
}


@pytest.mark.parametrize("module", list(SELF_CHECKED), ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_self_check_passes_and_can_fail(module, triton_device, monkeypatch):
    assert module.triton_self_check.__wrapped__(torch.device(triton_device)) is True

    class Broken:
        @staticmethod
        def apply(*args):
            raise RuntimeError("kernel broke")

    broken = Broken if SELF_CHECKED[module].endswith("Function") else Broken.apply
    monkeypatch.setattr(module, SELF_CHECKED[module], broken)
    with pytest.warns(UserWarning, match="failed its self-check"):
        assert module.triton_self_check.__wrapped__(torch.device(triton_device)) is False


def test_self_check_rejects_wrong_numbers(monkeypatch, triton_device):
    real = rms_norm.RMSNormFunction.apply

    class OffByHalf:
        @staticmethod
        def apply(x, w, eps):
            return real(x, w, eps) * 1.5

    monkeypatch.setattr(rms_norm, "RMSNormFunction", OffByHalf)
    with pytest.warns(UserWarning, match="disagrees with torch"):
        assert rms_norm.triton_self_check.__wrapped__(torch.device(triton_device)) is False


def test_the_memory_preflight_runs_the_self_check(monkeypatch):
    """The recipe's pre-flight estimates with the backend training will run: the policy's, self-check
    included (it once re-decided "auto" from the GPU's capability alone)."""
    from pathlib import Path

    from rich.console import Console

    from qtrain import train as recipe
    from qtrain.config import load_config

    asked = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (23 * 2**30, 24 * 2**30))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    monkeypatch.setattr(policy, "self_check", lambda op, device: asked.append((op, str(device))) or False)
    monkeypatch.setattr(policy, "triton_available", lambda: True)
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "llama-3.1-8b.yaml")
    recipe.check_memory(cfg, "meta-llama/Llama-3.1-8B-Instruct", torch.device("cuda"), Console(record=True))
    assert asked == [("nf4_lora", "cuda")]
