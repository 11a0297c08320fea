"""FSDP2-QLoRA: the NF4 base sharded across ranks with PyTorch's own `fully_shard` (per-parameter
sharding over a `DeviceMesh`), so that N cards hold 1/N of the 4-bit base each (Llama-3.1-70B on
two 24 GB cards, as answer.ai's FSDP+QLoRA).

    shard_model(model, world)      every decoder layer, then embedding and decoder, `fully_shard`-ed
    load_sharded(path, methods, ...)   the same, built while loading: each rank reads its rows only
    fsdp_refusal(methods)          the PEFT method that cannot be sharded, before anything is loaded
    full_tensor(t) / sharded_like(value, param)   a parameter whole on every rank / a whole value cut as it is
    full_optimizer_state(opt) / shard_optimizer_state(opt, state)   the optimizer state whole (a checkpoint's)

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
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from qtrain.lora import LoRALinear
from qtrain.nf4 import NF4Tensor, double_quantize, nf4_code, quantize_nf4

__all__ = [
    "ShardedLoadRefused", "decoder_layers", "fsdp_refusal", "full_optimizer_state", "full_tensor", "load_sharded", "nf4_bytes",
    "own_rows", "quantize_own_rows", "shard_local_optimizer", "shard_model", "shard_optimizer_state", "sharded_like",
]  # fmt: skip


class ShardedLoadRefused(ValueError):
    """`load_sharded` cannot build these methods while loading (they take the base's device when
    applied); the recipe then loads the model whole and `shard_model`s it."""


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
    (`LoRALinear.hold_nf4_in_rows`), then every decoder layer, then the embedding and the decoder
    (`shard_decoder`: lm_head stays whole). Call it once the methods are applied and trainable
    parameters marked, before the optimizer is made (the optimizer must see the sharded parameters). `param_dtype`: FSDP's
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
    shard_decoder(model, mesh, policy)
    return model


def shard_decoder(model: nn.Module, mesh: DeviceMesh, policy: MixedPrecisionPolicy) -> None:
    """The last FSDP units: the input embedding, then the decoder (`get_decoder()`: the final norm),
    not the CausalLM root, because the recipe (`qtrain.train.loss_sum`) calls the decoder and then
    reads lm_head's weight itself for the chunked loss, outside any forward FSDP could hook. lm_head
    (frozen) stays a whole, replicated 16-bit parameter on every rank; so does a tied embedding (it is
    lm_head's). The embedding is a unit of its own because FSDP keeps the root's parameters gathered
    from the forward to the end of the backward (Llama-3.1-70B's embedding: 2.1 GB); alone, it is
    gathered for the lookup only (its output needs no gradient: nothing gathers it in the backward)."""
    head = model.get_output_embeddings()
    decoder = model.get_decoder()
    tied = {head.weight} if head is not None and any(p is head.weight for p in decoder.parameters()) else None
    if tied is None:
        fully_shard(model.get_input_embeddings(), mesh=mesh, mp_policy=policy)
    fully_shard(decoder, mesh=mesh, mp_policy=policy, ignored_params=tied)


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


# ---- loading: each rank reads the rows it keeps ----------------------------------------------------


def own_rows(out: int, rank: int, world: int) -> tuple[int, int]:
    """The rows [start, stop) of an [out, ...] parameter FSDP2 leaves on `rank` (torch.chunk of dim 0:
    ceil(out/world) rows each, the last ranks fewer or none)."""
    chunk = -(-out // world)
    start = min(rank * chunk, out)
    return start, min(start + chunk, out)


def quantize_own_rows(rows: torch.Tensor, out: int, rank: int, world: int) -> NF4Tensor:
    """The NF4 weight [out, k] of which this rank read `rows` (its `own_rows`), bit-identical there to
    quantizing the whole weight (so to one GPU and to bitsandbytes): codes and block absmaxes depend
    on their own 64-value block only, so the rank computes its rows'; the double quantization (mean of
    ALL absmaxes, 8-bit blocks of 256 spanning rows) is computed by every rank on the fp32 absmaxes
    all-gathered (4 bytes per 64 weights, 1/32 of the bf16 rows read). The other rows' codes are
    zeros, dropped when the layer is sharded (`fully_shard` keeps this rank's rows)."""
    k = rows.shape[1]
    per_row = k // 64
    start, stop = own_rows(out, rank, world)
    chunk = -(-out // world) * per_row
    mine = quantize_nf4(rows, double_quant=False) if stop > start else None  # codes [n/2], fp32 absmax [n/64]
    padded = torch.zeros(chunk, dtype=torch.float32, device=rows.device)
    if mine is not None:
        padded[: mine.absmax.numel()] = mine.absmax
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    absmax = torch.cat(gathered)[: out * per_row]  # ranks hold consecutive rows; padding only at the end
    packed = torch.zeros(out * k // 2, dtype=torch.uint8, device=rows.device)
    if mine is not None:
        packed[start * k // 2 : stop * k // 2] = mine.packed
    whole = NF4Tensor(packed=packed, absmax=absmax, shape=torch.Size((out, k)), dtype=rows.dtype, code=nf4_code(rows.device))
    return double_quantize(whole)


def _set_own_rows(module: LoRALinear, rows: torch.Tensor, rank: int, world: int) -> None:
    """Set `module`'s NF4 base from this rank's rows; DoRA's ||W||_row (a replicated buffer) summed
    from every rank's own rows."""
    module.set_nf4_weight(quantize_own_rows(rows, module.out_features, rank, world))
    if module.use_dora:
        start, stop = own_rows(module.out_features, rank, world)
        sq = torch.zeros_like(module.dora_weight_sqnorm)
        sq[start:stop] = module.dora_weight_sqnorm[start:stop]
        dist.all_reduce(sq)
        module.register_buffer("dora_weight_sqnorm", sq, persistent=False)
        with torch.no_grad():
            module.lora_magnitude.copy_(sq.sqrt())


def load_sharded(
    name_or_path: str,
    methods: Sequence,
    compute_dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    backend: str = "auto",
    world: DeviceMesh | int | None = None,
):
    """The FSDP-sharded model of a checkpoint with `methods` applied, built while loading so that no
    rank ever holds more than one decoder layer of the NF4 base whole, nor more than one tensor (its
    own rows of it) in host RAM. Returns the `qtrain.model.LoadedModel`.

    Each rank reads only the rows it keeps of every linear weight (`SafetensorsCheckpoint.
    finite_rows`: rows are contiguous bytes in a safetensors file) and quantizes them exactly
    (`quantize_own_rows`). Chosen over rank 0 streaming and scattering: the ranks read 1/N of the
    projections each, in parallel, and no rank waits while another reads the whole checkpoint (a
    70B one is 140 GB of bf16; the largest linear 0.47 GB, 0.23 GB per rank of two); the only
    traffic is the fp32 absmaxes (1/32 of the bytes read). Embeddings, norms, biases and lm_head are
    read whole by every rank, one at a time (the largest tensor: Llama-3.1-70B's 2.1 GB embedding),
    and sharded with the decoder (lm_head stays whole: `shard_decoder`).

    Order: the methods are applied to the meta skeleton first (LoRA's A and B are drawn on the CPU
    in module order, the same numbers as one process: loading draws none), then layer by layer its
    tensors are loaded, then the layer is `fully_shard`-ed; last the decoder. Refused here: methods
    whose parameters take the base's device when applied (they would be made on meta: bottleneck
    adapters, prompt/prefix tuning, LLaMA-Adapter; LoRA, DoRA, (IA)^3 and BitFit load sharded),
    bitsandbytes 4-bit checkpoints and mixture-of-experts models."""
    from qtrain.builder import attach_methods
    from qtrain.checkpoint import SafetensorsCheckpoint, resolve_model_dir
    from qtrain.lora import swap_base_linears
    from qtrain.methods import mark_trainable
    from qtrain.model import (
        IGNORED_KEYS,
        LoadedModel,
        _existing_tensor,
        _set_tensor,
        _tie_or_check,
        bnb_prefixes,
        build_skeleton,
        check_causal_lm,
        check_loadable,
        read_config,
        release_host_memory,
    )  # fmt: skip
    from qtrain.moe import swap_experts

    device = torch.device(device)
    mesh = mesh_of(world, device)
    rank, size = mesh.get_local_rank(), mesh.size()
    model_dir = resolve_model_dir(name_or_path)
    config = read_config(model_dir)
    ckpt = SafetensorsCheckpoint(model_dir)
    if bnb_prefixes(ckpt.keys()):
        raise ValueError(f"{model_dir}: a bitsandbytes 4-bit checkpoint cannot be loaded sharded yet; use its 16-bit original")
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    check_causal_lm(config, model_dir)
    model = build_skeleton(config, compute_dtype)
    check_loadable(model, config, model_dir)
    swap_base_linears(model, quantize_base=True, backend=backend)
    if swap_experts(model, quantize_base=True, backend=backend):
        raise ValueError(f"{model_dir}: mixture-of-experts models ({config.model_type}) cannot be loaded sharded yet")
    attach_methods(model, methods)
    for name, p in model.named_parameters():
        owner = next((m for m in methods if m.owns(name)), None)
        if owner is not None and p.device.type == "meta":
            raise ShardedLoadRefused(
                f"method {type(owner).name!r} makes {name} from the base's weights, which load_sharded reads after "
                "attaching the methods; load the model whole and call qtrain.fsdp.shard_model"
            )
    linears = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    units = set(decoder_layers(model))
    layers = {name: m for name, m in model.named_modules() if m in units}

    def load(key: str) -> None:
        module_name, _, attr = key.rpartition(".")
        if module_name in linears and attr == "weight":
            out = linears[module_name].out_features
            start, stop = own_rows(out, rank, size)
            rows = ckpt.finite_rows(key, start, stop).to(device=device, dtype=compute_dtype)
            _set_own_rows(linears[module_name], rows, rank, size)
        elif module_name in linears and attr == "bias" and linears[module_name].bias is not None:
            linears[module_name].set_bias(ckpt.finite(key).to(device=device, dtype=compute_dtype))
        else:
            expected = _existing_tensor(model, key)
            if expected is None or tuple(ckpt.entries[key].shape) != tuple(expected.shape):
                raise ValueError(f"{model_dir}: checkpoint tensor {key!r} does not fit {type(model).__name__}; is config.json the one of these weights?")
            value = ckpt.finite(key).to(device)
            _set_tensor(model, key, value.to(compute_dtype) if value.is_floating_point() else value)
        release_host_memory()

    keys = [k for k in ckpt.entries if not k.endswith(IGNORED_KEYS)]
    policy = MixedPrecisionPolicy()
    for name, layer in layers.items():
        for key in [k for k in keys if k.startswith(name + ".")]:
            load(key)
        layer.to(device)  # the adapters (made on the CPU) and rotary buffers
        mark_trainable(model, list(methods))
        for module in layer.modules():
            if isinstance(module, LoRALinear) and module.has_nf4:
                module.hold_nf4_in_rows()
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    for key in [k for k in keys if not any(k.startswith(n + ".") for n in layers)]:
        load(key)
    _tie_or_check(model, config, model_dir)
    model.to(device)
    mark_trainable(model, list(methods))
    shard_decoder(model, mesh, policy)
    return LoadedModel(model, config, Path(model_dir), [], prequantized=False)


# ---- whole values: the adapter and optimizer state a checkpoint keeps ------------------------------


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """`t` whole: a sharded DTensor all-gathered (a collective: every rank must call it, in the same
    order), any other tensor as it is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def sharded_like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The whole `value` cut as `param` is (a DTensor: this rank's rows, no communication: every rank
    holds the whole value, read from the same file); `value` itself for a plain `param`."""
    if not isinstance(param, DTensor):
        return value
    local = value.to(device=param.device, dtype=param.dtype)
    return distribute_tensor(local, param.device_mesh, param.placements, src_data_rank=None)


def _by_index(optimizer: torch.optim.Optimizer) -> dict[int, torch.Tensor]:
    """The optimizer's parameters by the indices its state_dict uses (in group order)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return dict(enumerate(params))


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """`optimizer.state_dict()` with every sharded moment whole: the same file as one process's.
    Gathered rather than one file per rank so that a checkpoint resumes on any number of ranks (one
    process or DDP included); for LoRA the moments are small (Llama-3.1-70B, r=8: 0.8 GB of fp32),
    and resuming on as many ranks cuts them into the same rows again, so it is bit-for-bit. A
    collective: every rank calls it (parameters and state keys come in the same order on all)."""
    state = optimizer.state_dict()
    state["state"] = {i: {k: full_tensor(v) for k, v in s.items()} for i, s in state["state"].items()}
    return state


def shard_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """A whole optimizer state (`full_optimizer_state`, or one process's) with each moment cut as its
    parameter is (`sharded_like`), for `optimizer.load_state_dict`; scalars (the step) stay as they are."""
    params = _by_index(optimizer)
    out = dict(state)
    out["state"] = {
        i: {k: sharded_like(v, params[i]) if torch.is_tensor(v) and v.shape == params[i].shape and v.dim() else v for k, v in s.items()}
        for i, s in state["state"].items()
    }
    return out


def shard_local_optimizer(build, groups: list[dict]) -> torch.optim.Optimizer:
    """`build(groups)` run on each rank's shards as plain tensors, for optimizers that cannot take
    DTensors (bitsandbytes' 8-bit and paged AdamW: their update is a custom op with no sharding rule).
    AdamW is elementwise, so updating each rank's rows alone is the same update; the gradient norm
    for clipping is taken before, on the DTensors (global). Each sharded parameter gets a plain
    Parameter on its local rows (the same storage, re-pointed before every step: FSDP may re-create
    it at its lazy init); before each step its gradient is the local rows of the reduced gradient,
    after it the DTensor's gradient is dropped (FSDP would add the next step's to it). The state is
    per rank (its rows, its 8-bit blocks): a checkpoint keeps every rank's (`Recipe.optimizer_state`)."""
    pairs: list[tuple[nn.Parameter, DTensor]] = []
    local_groups = []
    for group in groups:
        params = []
        for p in group["params"]:
            if isinstance(p, DTensor):
                with torch.no_grad():
                    local = nn.Parameter(p.to_local(), requires_grad=True)  # shares p's local storage
                pairs.append((local, p))
                params.append(local)
            else:
                params.append(p)
        local_groups.append({**group, "params": params})
    optimizer = build(local_groups)

    def take_grads(opt, args, kwargs) -> None:
        for local, p in pairs:
            local.data = p.to_local().detach()
            local.grad = None if p.grad is None else p.grad.to_local()

    def drop_grads(opt, args, kwargs) -> None:
        for _, p in pairs:
            p.grad = None

    optimizer.register_step_pre_hook(take_grads)
    optimizer.register_step_post_hook(drop_grads)
    return optimizer
