"""One way to build the model a run trains, so that everything that needs that model holds the same
modules: the recipe (`qtrain.train`), `qtrain generate`, the memory estimator's meta build and the
benchmarks. Four hand-kept copies of load → methods → fused swap had drifted apart (generate used
other fused defaults than training); now there is one sequence:

    built = build_model(cfg, path, device)     methods: cfg.method_objects() unless given
          = load_base         the frozen NF4 base, every linear a rank-0 LoRALinear (qtrain.model)
          → finish_model      each method's apply in `method` order (LoRA is one: qtrain.methods.lora)
                              with its starting weights (lora.init_from, or a saved adapter), then
                              mark_trainable, then apply_fused_ops(model, cfg.kernels)

`finish_model` is also what the benchmarks run on their random bases (`qtrain.synthetic`), and
`attach_methods` (its first half) what the estimator runs on the meta device: the estimator counts
the fused modules analytically (`qtrain.estimate.fused_groups`) instead of swapping them in.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from qtrain.config import DTYPES, Config
from qtrain.fused import FusedOps, Swapped, apply_fused_ops
from qtrain.methods import PeftMethod, mark_trainable
from qtrain.methods.io import load_method
from qtrain.model import LoadedModel, load_base
from qtrain.tiny import ensure_tiny_model


@dataclass
class BuiltModel:
    """The model, as loaded (config, directory), with its methods and the fused swap."""

    model: nn.Module
    loaded: LoadedModel
    methods: list[PeftMethod]
    fused: Swapped


def model_path(cfg: Config, output_dir: Path) -> str:
    """The checkpoint to load: the configured one, or the tiny model built (once, atomically) in
    output_dir/base; a base built from other model.tiny settings is refused."""
    if cfg.model.name_or_path is not None:
        return cfg.model.name_or_path
    return str(ensure_tiny_model(output_dir / "base", **dataclasses.asdict(cfg.model.tiny)))


def attach_methods(
    model: nn.Module, methods: Sequence[PeftMethod], saved: Path | None = None, weights: bool = True, present: Sequence[PeftMethod] = ()
) -> list[str]:
    """Each method's `apply`, in order, with its starting weights when `weights`: from the adapter dir
    `saved` (generate), else its own `init_dir()` (lora.init_from); then only the methods' parameters
    (and those of `present`, methods a random base was built with) trainable. Returns their names."""
    for method in methods:
        method.apply(model)
        start = saved or method.init_dir()
        if weights and start:
            load_method(model, method, Path(start))
    return mark_trainable(model, [*present, *methods])


def finish_model(
    model: nn.Module, methods: Sequence[PeftMethod], kernels: FusedOps, saved: Path | None = None, present: Sequence[PeftMethod] = ()
) -> Swapped:
    """Everything after the base: `attach_methods`, then the fused Triton modules (Llama family;
    CUDA unless kernels.enabled=on). Returns what was swapped."""
    attach_methods(model, methods, saved, present=present)
    return apply_fused_ops(model, kernels)


def build_model(
    cfg: Config,
    path: str,
    device: torch.device,
    methods: list[PeftMethod] | None = None,
    saved: Path | None = None,
    compute_dtype: torch.dtype | None = None,
) -> BuiltModel:
    """The run's model on `device` from the checkpoint at `path` (`model_path`): the NF4 base, the
    methods (default `cfg.method_objects()`: new objects, so what training adds to a method, its hooks,
    AdaLoRA's EMAs, LoRA's targets, never lands on `cfg`) with their weights, the fused modules of
    cfg.kernels. `saved`: an adapter dir whose weights every method loads (generate);
    `compute_dtype` overrides cfg.model.dtype (an adapter may record any float dtype)."""
    methods = cfg.method_objects() if methods is None else methods
    dtype = compute_dtype or DTYPES[cfg.model.dtype]
    loaded = load_base(path, dtype, device, quantize=cfg.model.quantize, backend=cfg.model.backend)
    fused = finish_model(loaded.model, methods, cfg.kernels, saved)
    return BuiltModel(loaded.model, loaded, methods, fused)


def recorded_kernels(kernels: FusedOps) -> dict:
    """What an adapter's qtrain.json records of the run's `kernels:` section: nothing for the
    defaults (adapters from before this was recorded read as the defaults), else every setting."""
    return {} if kernels == FusedOps() else {"kernels": dataclasses.asdict(kernels)}


def kernels_from_info(info: dict, path: Path) -> FusedOps:
    """The `kernels:` settings an adapter was trained with (`recorded_kernels`); errors name `path`."""
    recorded = info.get("kernels", {})
    if not isinstance(recorded, dict):
        raise ValueError(f"{path}: kernels must be an object of kernels settings, got {recorded!r}")
    try:
        return FusedOps(**recorded)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: kernels: {e}") from None
