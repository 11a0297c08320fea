"""One way to build the model a run trains, so that everything that needs that model holds the same
modules: the recipe (`qtrain.train`), `qtrain generate`, the memory estimator's meta build and the
benchmarks. Four hand-kept copies of load → methods → fused swap had drifted apart (generate used
other fused defaults than training); now there is one sequence:

    plan = plan_model(cfg)                     the LoRA spec (rank 0 without LoRA) + the other methods
    built = build_model(cfg, path, device, plan)
          = load_model        the NF4 base with LoRA's linears (qtrain.model)
          → finish_model      LoRA's starting weights, each method's apply (and saved weights),
                              mark_trainable, then apply_fused_ops(model, cfg.kernels)

`finish_model` is also what the benchmarks run on their random bases (`qtrain.synthetic`), and
`attach_methods` (its first half) what the estimator runs on the meta device: the estimator counts
the fused modules analytically (`qtrain.estimate.fused_groups`) instead of swapping them in.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from qtrain.adapter import load_adapter_weights, read_adapter_config
from qtrain.config import DTYPES, Config
from qtrain.fused import FusedOps, Swapped, apply_fused_ops
from qtrain.lora import LoRASpec
from qtrain.methods import PeftMethod, mark_trainable
from qtrain.methods.base import LoRAParameters
from qtrain.methods.io import load_method
from qtrain.model import LoadedModel, load_model
from qtrain.tiny import ensure_tiny_model


@dataclass
class ModelPlan:
    """What goes on the base: LoRA (its spec; rank 0 keeps every linear plain NF4) and the other
    PEFT methods, new objects: what training adds to a method (its hooks, AdaLoRA's EMAs and rank
    pattern) lives on these, never on the config they came from."""

    use_lora: bool
    spec: LoRASpec
    methods: list[PeftMethod]


@dataclass
class BuiltModel:
    """The model, as loaded (config, directory, LoRA targets), with its plan and the fused swap."""

    model: nn.Module
    loaded: LoadedModel
    plan: ModelPlan
    fused: Swapped

    @property
    def spec(self) -> LoRASpec:
        return self.plan.spec

    @property
    def methods(self) -> list[PeftMethod]:
        return self.plan.methods


def model_path(cfg: Config, output_dir: Path) -> str:
    """The checkpoint to load: the configured one, or the tiny model built (once, atomically) in
    output_dir/base; a base built from other model.tiny settings is refused."""
    if cfg.model.name_or_path is not None:
        return cfg.model.name_or_path
    return str(ensure_tiny_model(output_dir / "base", **dataclasses.asdict(cfg.model.tiny)))


def plan_model(cfg: Config) -> ModelPlan:
    """The run's methods from `cfg`: LoRA's spec comes from lora.init_from's adapter when set."""
    use_lora = "lora" in cfg.methods()
    spec: LoRASpec = read_adapter_config(cfg.lora.init_from) if cfg.lora.init_from else cfg.lora
    if not use_lora:
        spec = LoRASpec(rank=0)  # every linear NF4, no adapter
    methods = [replace(getattr(cfg, name)) for name in cfg.methods() if name != "lora"]
    return ModelPlan(use_lora, spec, methods)


def attach_methods(model: nn.Module, plan: ModelPlan, init_from: str | Path | None = None, saved: Path | None = None) -> list[str]:
    """LoRA's starting weights (`init_from`), each other method's modules (with its weights from the
    adapter dir `saved`, as generate loads them), then only the methods' parameters trainable.
    Returns the trainable names."""
    if init_from:
        load_adapter_weights(model, init_from)
    for method in plan.methods:
        method.apply(model)
        if saved is not None:
            load_method(model, method, saved)
    return mark_trainable(model, [LoRAParameters(), *plan.methods] if plan.use_lora else plan.methods)


def finish_model(model: nn.Module, plan: ModelPlan, kernels: FusedOps, init_from=None, saved: Path | None = None) -> Swapped:
    """Everything after the base: `attach_methods`, then the fused Triton modules (Llama family;
    CUDA unless kernels.enabled=on). Returns what was swapped."""
    attach_methods(model, plan, init_from, saved)
    return apply_fused_ops(model, kernels)


def build_model(
    cfg: Config,
    path: str,
    device: torch.device,
    plan: ModelPlan | None = None,
    saved: Path | None = None,
    compute_dtype: torch.dtype | None = None,
) -> BuiltModel:
    """The run's model on `device` from the checkpoint at `path` (`model_path`): NF4 base + LoRA per
    `plan` (default `plan_model(cfg)`), lora.init_from's weights, the methods, the fused modules of
    cfg.kernels. `saved`: an adapter dir whose method weights load as each method is applied
    (generate); `compute_dtype` overrides cfg.model.dtype (an adapter may record any float dtype)."""
    plan = plan or plan_model(cfg)
    dtype = compute_dtype or DTYPES[cfg.model.dtype]
    loaded = load_model(path, plan.spec, compute_dtype=dtype, device=device, quantize=cfg.model.quantize, backend=cfg.model.backend)
    fused = finish_model(loaded.model, plan, cfg.kernels, cfg.lora.init_from, saved)
    return BuiltModel(loaded.model, loaded, plan, fused)


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
