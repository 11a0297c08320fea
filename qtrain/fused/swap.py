"""`apply_fused_ops`: swap the fused modules into a model INSTANCE, in place.

    apply_fused_ops(model, FusedOps())   # after load_model (and any PEFT method), before training

Per decoder layer of a model type whose family has fused modules (`qtrain.families.fused_support`,
the one decision the memory estimator shares; other model types are left alone, the reason
recorded), with only the ops whose math applies to the model: input_layernorm,
post_attention_layernorm (and the decoder's final norm) -> `FusedRMSNorm`; self_attn -> the
architecture's `FusedAttention` (when it has one); mlp -> `FusedMLP`; then, for op
`varlen`, the decoder's `PackedBatches` pre-hook. Each swapped module adopts the stock one's state
(`qtrain.fused.adopt`): parameter and state-dict names do not change, and hooks on self_attn / mlp /
the norms (prefix tuning, adapters, LLaMA-Adapter) are carried over and keep working; methods
applied after the swap hook the new modules.

`FusedOps.enabled`: "auto" swaps for CUDA models only (CPU training keeps the stock modules and never
meets the Triton interpreter), "on" always (tests, small shapes), "off" never. The kernels dispatch
by themselves: Triton on CUDA tensors (and on CPU ones under TRITON_INTERPRET=1), PyTorch otherwise.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from qtrain.families import fused_support
from qtrain.fused.architectures import ARCHITECTURES, Architecture
from qtrain.fused.mlp import FusedMLP
from qtrain.fused.norm import FusedRMSNorm
from qtrain.fused.ops import OPS, FusedOps
from qtrain.fused.packing import PackedBatches, varlen_blocker


class Swapped(list):
    """The names of the swapped modules (a list), `skipped`: {name: why it was left alone}, and `varlen`:
    whether packed batches take the padding-free attention path (the decoder's pre-hook is installed)."""

    def __init__(self) -> None:
        super().__init__()
        self.skipped: dict[str, str] = {}
        self.varlen = False


def install_varlen(decoder: nn.Module, name: str, out: Swapped) -> None:
    """Register `PackedBatches` on the decoder when its layers allow it, else record why under `name`."""
    if any(isinstance(h, PackedBatches) for h in decoder._forward_pre_hooks.values()):
        out.skipped[name] = "the padding-free path is already installed"
        return
    reason = varlen_blocker(decoder)
    if reason is not None:
        out.skipped[name] = f"{reason}: packed batches keep transformers' block mask"
        return
    decoder.register_forward_pre_hook(PackedBatches(), with_kwargs=True)
    out.varlen = True


def fused_enabled(model: nn.Module, ops: FusedOps) -> bool:
    """Whether to swap: enabled "on", or "auto" with the model on CUDA."""
    first = next(model.parameters(), None)
    return ops.on_for(first.device.type if first is not None else "cpu")


def _swap(parent: nn.Module, child: str, new: nn.Module) -> None:
    setattr(parent, child, new)


def _swap_norm(parent: nn.Module, child: str, arch: Architecture, name: str, out: Swapped) -> None:
    norm = getattr(parent, child, None)
    if type(norm) is not arch.norm:
        out.skipped[name] = f"{type(norm).__name__} is not {arch.norm.__name__} (already fused?)"
        return
    _swap(parent, child, FusedRMSNorm.from_stock(norm))
    out.append(name)


def _swap_layer(layer: nn.Module, prefix: str, arch: Architecture, ops: FusedOps, out: Swapped) -> None:
    if ops.rms_norm:
        for child in ("input_layernorm", "post_attention_layernorm"):
            _swap_norm(layer, child, arch, f"{prefix}.{child}", out)
    if (ops.rope or ops.qkv or ops.varlen) and arch.fused_attention is not None:
        attn = layer.self_attn
        if type(attn) is arch.attention:
            new, skipped = arch.fused_attention.from_stock(attn, ops)
            _swap(layer, "self_attn", new)
            out.append(f"{prefix}.self_attn")
            out.skipped.update({f"{prefix}.self_attn.{op}": why for op, why in skipped.items()})
        else:
            out.skipped[f"{prefix}.self_attn"] = f"{type(attn).__name__} is not {arch.attention.__name__}"
    if ops.swiglu or ops.gate_up:
        mlp = layer.mlp
        if type(mlp) is arch.mlp:
            new, skipped = FusedMLP.from_stock(mlp, ops)
            _swap(layer, "mlp", new)
            out.append(f"{prefix}.mlp")
            out.skipped.update({f"{prefix}.mlp.{op}": why for op, why in skipped.items()})
        else:
            out.skipped[f"{prefix}.mlp"] = f"{type(mlp).__name__} is not {arch.mlp.__name__}"


def apply_fused_ops(model: nn.Module, ops: FusedOps | None = None) -> Swapped:
    """Swap the fused modules into `model` (an instance, modified in place); returns the swapped
    module names, with `.skipped` = {name: reason} for what was left alone."""
    ops = ops or FusedOps()
    out = Swapped()
    if not fused_enabled(model, ops) or not ops.any_on():
        out.skipped["model"] = f"kernels.enabled={ops.enabled!r}" + ("" if ops.any_on() else ", every op off")
        return out
    model_type = getattr(model.config, "model_type", None)
    support = fused_support(model.config)
    if not support:
        out.skipped["model"] = f"model_type {model_type!r} keeps the stock modules (fused: {', '.join(ARCHITECTURES)})"
        return out
    arch = ARCHITECTURES[model_type]
    ops = replace(ops, **{op: False for op in OPS if op not in support})
    out.skipped.update({f"model.{op}": f"does not apply to {model_type!r}" for op in OPS if op not in support})
    decoder = model.get_decoder()
    names = {id(m): n for n, m in model.named_modules()}
    with torch.no_grad():
        for layer in decoder.layers:
            _swap_layer(layer, names[id(layer)], arch, ops, out)
        if ops.rms_norm:
            _swap_norm(decoder, "norm", arch, f"{names[id(decoder)]}.norm".lstrip("."), out)
    if ops.varlen:
        install_varlen(decoder, f"{names[id(decoder)]}.varlen".lstrip("."), out)
    return out
