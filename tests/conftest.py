"""Shared fixtures: tiny local checkpoints (built once per session) and the `gpu` marker skip."""

from __future__ import annotations

import os
import re

import torch  # does not import triton

if not torch.cuda.is_available():
    # Without CUDA, qtrain's Triton kernels can only run under Triton's interpreter (tests/kernels).
    # triton reads TRITON_INTERPRET when a function is decorated with @triton.jit, and triton.language's
    # own helpers (tl.zeros, tl.interleave, ...) are decorated when triton is first imported, which
    # transformers does during `import qtrain.tiny` below: so this must run before that import.
    # tests/kernels/conftest.py checks that it took effect.
    os.environ["TRITON_INTERPRET"] = "1"

import pytest

from qtrain.tiny import build_tiny_model


def pytest_collection_modifyitems(config, items):
    """Tests marked `@pytest.mark.gpu` skip (with a reason) when no CUDA device is visible."""
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Factory: `tiny_checkpoint(arch="llama", **kw)` -> directory of a tiny random HF checkpoint.

    Built with `qtrain.tiny.build_tiny_model` into a session temp dir; one build per distinct
    argument set, so tests that ask for the same model share it. Treat the directory as read-only.
    """
    cache: dict[tuple, object] = {}

    def make(arch: str = "llama", **kw):
        key = (arch, tuple(sorted((k, repr(v)) for k, v in kw.items())))
        if key not in cache:
            slug = re.sub(r"[^A-Za-z0-9]+", "_", f"{arch}_{'_'.join(f'{k}{v}' for k, v in key[1])}")[:60]
            cache[key] = build_tiny_model(tmp_path_factory.mktemp(slug), arch=arch, **kw)
        return cache[key]

    return make


@pytest.fixture
def seeded():
    """A fixed torch seed for the test; returns the seed."""
    torch.manual_seed(1234)
    return 1234


def exact_bnb(model):
    """Turn off, module by module, the bf16 CPU kernel that bitsandbytes' `Linear4bit` switches to on
    CPUs with AVX512-BF16 in eval mode with a no-grad input (it also repacks the weight in place).

    Without this, a bitsandbytes model computes differently in eval and in train mode on such CPUs
    only (logits differ by ~1e-3), and a test comparing it with anything passes on one x86-64 CPU and
    fails on another. Every test that builds a bitsandbytes model passes it through here. Returns
    `model`."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


@pytest.fixture(scope="session")
def bnb_exact():
    """`bnb_exact(model)` -> model, with bitsandbytes' CPU-dependent bf16 kernel off (see `exact_bnb`)."""
    return exact_bnb


def copy_nf4_experts(ours, ref):
    """Set each MoE experts module of `ref` (a transformers model: bitsandbytes leaves its 3-D experts
    unquantized) to our NF4 experts' dequantization (`qtrain.moe.NF4Experts`), so the two models
    differ only where the comparison is meant to look; a dense model is left as it is. Returns `ref`."""
    from qtrain.moe import NF4Experts

    with torch.no_grad():
        for name, experts in ours.named_modules():
            if isinstance(experts, NF4Experts):
                gate_up, down = experts.dense_weights(ref.get_submodule(name).gate_up_proj.dtype)
                ref.get_submodule(name).gate_up_proj.copy_(gate_up)
                ref.get_submodule(name).down_proj.copy_(down)
    return ref


@pytest.fixture(scope="session")
def nf4_experts_into():
    """`nf4_experts_into(ours, ref)` -> ref, its MoE experts set to ours, dequantized (see `copy_nf4_experts`)."""
    return copy_nf4_experts


@pytest.fixture(scope="session")
def bnb_nf4():
    """Factory: `bnb_nf4(path)` -> transformers + bitsandbytes NF4 (double quant, fp32 compute) of a
    checkpoint on CPU, the standard QLoRA stack's base that PEFT references are built on."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )

    def load(path):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=config, device_map="cpu")
        return exact_bnb(model)

    return load


@pytest.fixture(scope="session")
def nf4_hf_base():
    """Factory: `nf4_hf_base(path, dtype=fp32)` -> a transformers model of `path` whose linear
    weights are our dequantized NF4 weights (QLoRA's base, for comparing with PEFT in 16/32 bits)."""
    from transformers import AutoModelForCausalLM

    from qtrain.lora import LoRALinear
    from qtrain.model import load_model

    def make(path, dtype: torch.dtype = torch.float32):
        base = load_model(str(path), None, compute_dtype=dtype).model
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        with torch.no_grad():
            for name, m in base.named_modules():
                if isinstance(m, LoRALinear):
                    hf.get_submodule(name).weight.copy_(m.base_weight(dtype))
        return hf.eval()

    return make
