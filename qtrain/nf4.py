"""bitsandbytes' state-dict keys for NF4 weights, over the format in `qtrain.kernels.nf4`.

The format itself (`NF4Tensor`, `quantize_nf4`, `dequantize_nf4`, ...) lives in the kernels package,
which imports nothing from qtrain; its names are re-exported here so that `from qtrain.nf4 import
quantize_nf4` keeps working. What stays here is qtrain's: reading and writing the tensors
bitsandbytes' `Linear4bit` puts in a state dict (`weight`, `weight.absmax`, `weight.quant_map`,
`weight.nested_*`, `weight.quant_state.bitsandbytes__nf4`).
"""

from __future__ import annotations

import json

import torch

from qtrain.kernels.nf4 import (
    ABSMAX_BLOCKSIZE,
    BLOCKSIZE,
    NF4_LEVELS,
    NF4Tensor,
    bitsandbytes_ops,
    block_absmax,
    byte_levels,
    dequantize_nf4,
    dequantize_nf4_torch,
    double_quantize,
    dynamic_code,
    nf4_code,
    quantize_nf4,
)

__all__ = [
    "ABSMAX_BLOCKSIZE",
    "BLOCKSIZE",
    "NF4_LEVELS",
    "QUANT_STATE_KEY",
    "NF4Tensor",
    "bitsandbytes_ops",
    "block_absmax",
    "byte_levels",
    "dequantize_nf4",
    "dequantize_nf4_torch",
    "double_quantize",
    "dynamic_code",
    "from_bnb_state_dict",
    "is_bnb_nf4",
    "nf4_code",
    "quantize_nf4",
    "to_bnb_state_dict",
]

QUANT_STATE_KEY = "quant_state.bitsandbytes__nf4"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def to_bnb_state_dict(nf4: NF4Tensor, prefix: str = "weight") -> dict[str, torch.Tensor]:
    """The tensors bitsandbytes' `Linear4bit` writes for its weight, under `prefix`."""
    meta: dict = {
        "quant_type": "nf4",
        "blocksize": nf4.blocksize,
        "dtype": _dtype_name(nf4.dtype),
        "shape": list(nf4.shape),
    }
    out = {
        prefix: nf4.packed.view(-1, 1),
        f"{prefix}.absmax": nf4.absmax,
        f"{prefix}.quant_map": nf4.code,
    }
    if nf4.double_quant:
        meta |= {
            "nested_blocksize": nf4.absmax_blocksize,
            "nested_dtype": "float32",
            "nested_offset": nf4.absmax_offset,
        }
        out[f"{prefix}.nested_absmax"] = nf4.absmax_scale
        out[f"{prefix}.nested_quant_map"] = nf4.absmax_code.clone()
    out[f"{prefix}.{QUANT_STATE_KEY}"] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    return out


def is_bnb_nf4(keys, prefix: str = "weight") -> bool:
    return f"{prefix}.{QUANT_STATE_KEY}" in keys


def from_bnb_state_dict(tensors: dict[str, torch.Tensor], prefix: str = "weight") -> NF4Tensor:
    """Rebuild an `NF4Tensor` from bitsandbytes' state-dict entries for one weight."""
    key = f"{prefix}.{QUANT_STATE_KEY}"
    if key not in tensors:
        if f"{prefix}.quant_state.bitsandbytes__fp4" in tensors:
            raise ValueError(f"{prefix}: FP4 bitsandbytes weights are not supported, only NF4")
        raise KeyError(f"{prefix}: missing '{key}'; not a bitsandbytes 4-bit weight")
    meta = json.loads(bytes(tensors[key].cpu().tolist()).decode())
    if meta.get("quant_type") != "nf4":
        raise ValueError(f"{prefix}: quant_type {meta.get('quant_type')!r} is not supported, only 'nf4'")
    nested = f"{prefix}.nested_absmax" in tensors
    return NF4Tensor(
        packed=tensors[prefix].reshape(-1).view(torch.uint8),
        absmax=tensors[f"{prefix}.absmax"],
        shape=torch.Size(meta["shape"]),
        dtype=getattr(torch, meta["dtype"]),
        code=tensors[f"{prefix}.quant_map"].float(),
        blocksize=int(meta["blocksize"]),
        absmax_scale=tensors[f"{prefix}.nested_absmax"].float() if nested else None,
        absmax_code=tensors[f"{prefix}.nested_quant_map"].float() if nested else None,
        absmax_offset=float(meta.get("nested_offset", 0.0)),
        absmax_blocksize=int(meta.get("nested_blocksize", ABSMAX_BLOCKSIZE)),
    )
