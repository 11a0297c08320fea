"""Fused ops for Llama-family models (Llama, Mistral, Qwen2; Qwen3's norms and MLP), swapped into a model INSTANCE.

    apply_fused_ops(model, FusedOps())   # after load_model (and any PEFT method), before training

One module per responsibility:
    ops            `FusedOps` (the `kernels:` config section) and the fused group names; dataclasses
                   only, so loading a config imports no transformers modeling code
    adopt          `adopt(module, fused_cls)`: a stock instance's state under a fused class
    projection     several NF4 + LoRA projections over the same X as one product (ops qkv, gate_up)
    norm, mlp      `FusedRMSNorm` (op rms_norm), `FusedMLP` (ops gate_up, swiglu)
    attention      `FusedAttention` (ops qkv, rope, varlen) and its transformers-version shims
    architectures  the stock classes per model type and their fused attention classes
    packing        padding-free packed batches: the decoder's `PackedBatches` pre-hook (op varlen)
    swap           `apply_fused_ops`, `Swapped`
The variable-length attention itself is `qtrain.kernels.varlen`.

The names below are re-exported lazily (PEP 562): `from qtrain.fused import FusedOps` imports only
`qtrain.fused.ops`; the modules that import transformers' modeling files load on first use of a name
from them. No re-exported name is also a submodule's (importing the submodule would rebind it).
Tests patch a name in the module that calls it (`qtrain.fused.mlp.swiglu`...), not here.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ops": ("ENABLED", "GATE_UP", "OPS", "QKV", "FusedOps"),
    "projection": (
        "FusedGroups", "blocked", "columns", "fusable", "fused_absmax", "fused_projection", "fused_weight",
        "has_hooks", "share_codes", "shared_codes",
    ),  # fmt: skip
    "norm": ("FusedRMSNorm",),
    "mlp": ("SILU", "FusedMLP"),
    "attention": ("CACHE_NAMES", "FusedAttention", "is_causal_call", "is_placeholder", "rotate_own"),
    "architectures": (
        "ARCHITECTURES", "Architecture", "FusedLlamaAttention", "FusedMistralAttention", "FusedQwen2Attention",
    ),  # fmt: skip
    "packing": ("VARLEN_KWARGS", "PackedBatches", "varlen_blocker"),
    "swap": ("Swapped", "apply_fused_ops", "fused_enabled", "install_varlen"),
}
_KERNELS = ("HALF", "packed_segments", "segment_attention", "varlen_attention")  # qtrain.kernels.varlen
_WHERE = {name: f"qtrain.fused.{module}" for module, names in _EXPORTS.items() for name in names}
_WHERE.update({name: "qtrain.kernels.varlen" for name in _KERNELS})

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    """The re-exported `name`, importing the module that defines it on first use."""
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'qtrain.fused' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
