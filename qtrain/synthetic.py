"""A training model with random weights, built straight on the device: memory and speed measurements
of 7-8B models without a download (and without a Hub login for gated Llama checkpoints).

    model = random_model(preset_config("llama-3.1-8b"), LoRASpec(rank=16), torch.bfloat16, "cuda")

It is the model `qtrain.model.load_model` gives for a checkpoint of that config (same modules,
NF4 linears, adapters on the targets, only the adapters trainable), with N(0, std) weights instead
of the checkpoint's. Building it never holds a 16-bit copy of the model:

    1. the skeleton on meta (`build_skeleton`), its linears swapped for LoRALinear (on meta);
    2. for each linear, one random 16-bit weight [out, in] generated on the device, quantized into
       the layer (`set_base_weight`) and freed before the next: the peak is the NF4 model plus one
       16-bit linear and the quantizer's temporaries (a few MB);
    3. embeddings and lm_head N(0, std), norms 1, biases 0, in compute_dtype on the device; lm_head
       tied to the embeddings when the config says so; buffers (rotary tables) moved to the device;
    4. adapters as `LoRALinear.reset_lora_parameters` makes them (A Kaiming-uniform, B zero).

Every tensor is drawn from its own generator, seeded from `seed` and the tensor's name, so the same
seed gives the same weights whatever the device order or the set of layers built.
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import nn
from transformers import PretrainedConfig

from qtrain.lora import LoRALinear, LoRASpec, swap_linears
from qtrain.methods import mark_trainable
from qtrain.methods.lora import LoRA
from qtrain.model import build_skeleton


def tensor_generator(device: torch.device, seed: int, name: str) -> torch.Generator:
    """A generator on `device` seeded from (seed, name): reproducible per tensor (crc32, unlike
    hash(), is the same in every process; 32 bits, as the CPU generator keeps only those)."""
    return torch.Generator(device=device).manual_seed(zlib.crc32(f"{seed}/{name}".encode()))


def _normal(shape, std: float, dtype: torch.dtype, device: torch.device, seed: int, name: str) -> torch.Tensor:
    """N(0, std) in `dtype`, drawn in place (no fp32 temporary)."""
    return torch.empty(shape, dtype=dtype, device=device).normal_(0.0, std, generator=tensor_generator(device, seed, name))


def frozen_tensor(name: str, shape: torch.Size, std: float, dtype, device, seed: int) -> torch.Tensor:
    """A non-linear parameter as transformers initializes it: 1-D weights (norms) 1, biases 0,
    matrices (embeddings, lm_head) N(0, std)."""
    attr = name.rpartition(".")[2]
    if attr == "bias":
        return torch.zeros(shape, dtype=dtype, device=device)
    if len(shape) == 1:
        return torch.ones(shape, dtype=dtype, device=device)
    return _normal(shape, std, dtype, device, seed, name)


def random_model(
    config: PretrainedConfig,
    spec: LoRASpec | None,
    compute_dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    quantize: bool = True,
    backend: str = "auto",
    seed: int = 0,
    std: float = 0.02,
    adapter_dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """The training model of `config` (NF4 base when `quantize`, LoRA per `spec`) with random weights
    created directly on `device`; only the adapters are trainable. `spec=None`: the frozen base only,
    as `load_model(lora=None)`. See the module docstring."""
    device = torch.device(device)
    spec = spec or LoRASpec(rank=0)
    model = build_skeleton(config, compute_dtype)
    with torch.device("meta"):  # adapters and biases are created where the skeleton lives: on meta
        swap_linears(model, spec, quantize_base=quantize, backend=backend, adapter_dtype=adapter_dtype)

    # 1. the linear layers: one 16-bit weight at a time, quantized and freed
    for name, module in model.named_modules():
        if not isinstance(module, LoRALinear):
            continue
        weight = _normal((module.out_features, module.in_features), std, compute_dtype, device, seed, f"{name}.weight")
        module.set_base_weight(weight)
        del weight
        if module.bias is not None:
            module.set_bias(torch.zeros(module.out_features, dtype=compute_dtype, device=device))
        if module.rank:  # as reset_lora_parameters, from this layer's own generator
            a = torch.empty(module.rank, module.in_features, dtype=adapter_dtype, device=device)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=tensor_generator(device, seed, f"{name}.lora_a.weight"))
            module.lora_a.weight = nn.Parameter(a)
            module.lora_b.weight = nn.Parameter(
                torch.zeros(module.out_features, module.rank, dtype=adapter_dtype, device=device)
            )

    # 2. the other parameters (embeddings, norms, lm_head), tied when the config says so
    out = model.get_output_embeddings()
    tie = out is not None and getattr(config.get_text_config(), "tie_word_embeddings", False)
    for name, param in list(model.named_parameters(remove_duplicate=False)):
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        if param.device.type != "meta" or (tie and module is out and attr == "weight"):
            continue
        value = frozen_tensor(name, param.shape, std, compute_dtype, device, seed)
        setattr(module, attr, nn.Parameter(value, requires_grad=False))
    if tie:
        out.weight = model.get_input_embeddings().weight

    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:  # a module type this builder does not know how to fill
        raise RuntimeError(f"random_model: {len(left)} tensors left on meta, e.g. {left[:3]}")
    model.to(device)  # buffers: rotary tables (parameters are already there)
    mark_trainable(model, [LoRA.from_spec(spec)] if spec.rank else [])
    return model
