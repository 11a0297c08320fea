"""FSDP2-QLoRA: the NF4 base sharded across ranks with PyTorch's own `fully_shard` (per-parameter
sharding over a `DeviceMesh`), so that N cards hold 1/N of the 4-bit base each (Llama-3.1-70B on
two 24 GB cards, as answer.ai's FSDP+QLoRA).

    shard_model(model, world)      every decoder layer, then the root, `fully_shard`-ed
    fsdp_refusal(methods)          the PEFT method that cannot be sharded, before anything is loaded

How the NF4 weight shards. FSDP2 shards parameters, never buffers, along dim 0 (`torch.chunk` of the
rows, the last shard padded). Each `LoRALinear` therefore holds its 4-bit codes [out, in/2] and its
block absmax [out, in/64] (uint8 when double-quantized) as frozen parameters with one row per output
feature (`LoRALinear.hold_nf4_in_rows`): both are cut at the same rows, a shard is whole rows, hence
whole 64-value blocks together with their own absmaxes (block-aligned), and rank r holds rows
[r*c, (r+1)*c), c = ceil(out/N), of every projection. The double quantization's fp32 scales (one per
256 absmaxes, 1/16384 of the weights), its 256-entry code and offset, and the 16 NF4 levels stay
replicated buffers. The adapters (and so AdamW's moments, made from the sharded parameters) shard
the same way; trainable and frozen parameters share one FSDP group per layer.

Why plain uint8 parameters rather than a tensor subclass with `fsdp_pre_all_gather` /
`fsdp_post_all_gather` (torchao's NF4Tensor) or answer.ai's bytes in a bf16-typed storage (FSDP1
needed one dtype per flat parameter): FSDP2 all-gathers a group whose dtypes differ as bytes
(`_fsdp_collectives`: uint8 all-gather, each tensor viewed back to its dtype), and a
`MixedPrecisionPolicy` never casts a non-float parameter. After the all-gather the layer's attributes
are ordinary uint8 tensors, which `LoRALinear.nf4_weight` flattens (a view) into the same
`NF4Tensor` every NF4 kernel reads: the torch reference, the Triton launchers and the dispatch run
unchanged, on the same bytes as one GPU.

The fused q/k/v and gate/up projections (`qtrain.fused.projection`) read one concatenated code
buffer; sharded, the projections no longer share it, and they fall back per call to the stock
per-projection kernels (their documented fallback); shard before `apply_fused_ops` or keep
`kernels.qkv`/`kernels.gate_up` off to avoid the unused fp32 fused absmax.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from qtrain.lora import LoRALinear

__all__ = ["decoder_layers", "fsdp_refusal", "nf4_bytes", "shard_model"]


def fsdp_refusal(methods: Sequence) -> str | None:
    """Why these PEFT methods cannot train under FSDP (None: they can), for the recipe to say before
    loading. A method that reads its parameters outside the forward (`regularization`, `after_step`:
    AdaLoRA's orthogonality and global rank budget, AdapterFusion's value regulariser) would see only
    this rank's rows there (FSDP all-gathers a layer for its forward and backward only), so it is refused."""
    from qtrain.methods.base import PeftMethod

    for method in methods:
        kind = type(method)
        hooks = [h for h in ("regularization", "after_step") if getattr(kind, h) is not getattr(PeftMethod, h)]
        if hooks:
            return (
                f"method {kind.name!r} cannot run with distributed.strategy: fsdp: its {' and '.join(hooks)} read "
                "its parameters outside the forward, where each rank holds only its shard; use "
                "distributed.strategy: ddp (the model must fit one card) or another method"
            )
    return None


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's decoder layers: the modules whose class transformers lists as `_no_split_modules`
    (the unit a device map never splits, FSDP's natural wrap unit: LlamaDecoderLayer, ...)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(
            f"{type(model).__name__} names no decoder layer class (_no_split_modules); FSDP shards per decoder layer"
        )
    return layers


def mesh_of(world: DeviceMesh | int | None, device: torch.device) -> DeviceMesh:
    """A 1-D mesh over the default process group's ranks (or `world` ranks), or `world` itself."""
    if isinstance(world, DeviceMesh):
        return world
    if world is None:
        world = torch.distributed.get_world_size()
    return init_device_mesh(device.type, (world,))


def shard_model(
    model: nn.Module,
    world: DeviceMesh | int | None = None,
    param_dtype: torch.dtype | None = None,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Shard `model` in place across the ranks of `world` (a DeviceMesh, its size, or None: the
    default process group) with FSDP2: each NF4 base in rows together with its absmax
    (`LoRALinear.hold_nf4_in_rows`), then every decoder layer, then the root (embeddings, norms,
    lm_head). Call it once the methods are applied and trainable parameters marked, before the
    optimizer is made (the optimizer must see the sharded parameters). `param_dtype`: FSDP's
    all-gather dtype for float parameters (None keeps theirs; NF4 codes are never cast). Returns
    `model` (its class becomes FSDP's subclass of it, as `fully_shard` does)."""
    device = next(model.parameters()).device
    mesh = mesh_of(world, device)
    for module in model.modules():
        if isinstance(module, LoRALinear) and module.has_nf4:
            module.hold_nf4_in_rows()
    policy = MixedPrecisionPolicy(param_dtype=param_dtype)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return model


def nf4_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of NF4 base this rank holds, bytes of the whole NF4 base): packed codes + absmax of
    every LoRALinear, this rank's counted by storage (what is resident, FSDP's padding included)."""
    local, total, seen = 0, 0, set()
    for module in model.modules():
        if not (isinstance(module, LoRALinear) and module.has_nf4):
            continue
        for name in ("nf4_packed", "nf4_absmax"):
            t = getattr(module, name)
            total += t.numel() * t.element_size()  # a DTensor's numel is the whole tensor's
            mine = t.to_local() if isinstance(t, DTensor) else t
            storage = mine.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                local += storage.nbytes()
    return local, total
