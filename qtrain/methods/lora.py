"""LoRA (Hu et al. 2021) as a PEFT method, with rsLoRA (Kalajdzievski 2023), DoRA (Liu et al. 2024)
and LoRA+ learning rates (Hayou et al. 2024):

    y = W x + s B A dropout(x)        A [r, in] Kaiming-uniform, B [out, r] zero: y = W x at init
    s = alpha / r (rsLoRA: alpha / sqrt(r));  DoRA: W' = m (W + s B A) / ||W + s B A||_row

The layer is `qtrain.lora.LoRALinear` (the NF4 linear every method sees, rank 0 until this method
gives it an adapter); this module is the method: which linears it targets, what it trains, how it
is saved. Its files are PEFT's, at the ROOT of the adapter folder (adapter_config.json +
adapter_model.safetensors: `peft.PeftModel.from_pretrained(base, dir)` loads them), not in a
subfolder as the other methods'; an adapter PEFT trained reads as LoRA from those files.

The fields are the `lora:` config section (`qtrain.lora.LoRASpec` and `init_from`); the names of
the adapted modules (`targets`) are runtime state, set by `apply`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from qtrain.methods.base import PeftMethod

if TYPE_CHECKING:
    from transformers import PretrainedConfig


def lora_scale(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """alpha / r (LoRA), or alpha / sqrt(r) (rsLoRA)."""
    return alpha / (math.sqrt(rank) if use_rslora else rank)


@dataclass
class LoRASpec:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    use_rslora: bool = False
    target_modules: list[str] | str = "all-linear"  # 'all-linear' or module names (suffix match)
    exclude_modules: list[str] = field(default_factory=lambda: ["lm_head"])
    use_dora: bool = False  # DoRA: a trained magnitude per output row on top of LoRA (Liu et al. 2024)

    def scale(self) -> float:
        return lora_scale(self.alpha, self.rank, self.use_rslora)


@dataclass
class PeftLoRASpec(LoRASpec):
    """A LoRASpec read from a PEFT adapter_config.json, with PEFT's other ways of picking modules (see
    `is_target`): target_modules and exclude_modules may be full-match regexes, and layers_to_transform
    (with layers_pattern) keeps list targets to those layers. Not a training config option."""

    exclude_modules: list[str] | str = field(default_factory=lambda: ["lm_head"])  # names (suffix match) or a regex
    layers_to_transform: list[int] | None = None  # None: every layer
    layers_pattern: list[str] | None = None  # the name of the layer list ("layers"); None: any



@contextlib.contextmanager
def _lora_switched_off(model: nn.Module):
    from qtrain.lora import LoRALinear  # the layer (qtrain.lora imports this module)

    layers = [m for m in model.modules() if isinstance(m, LoRALinear) and m.rank]  # the fused modules hold the same layers
    saved = [(m.scale, m.dropout, m.use_dora) for m in layers]
    try:
        for m in layers:
            m.scale, m.dropout, m.use_dora = 0.0, 0.0, False
        yield model
    finally:
        for m, (scale, dropout, use_dora) in zip(layers, saved):
            m.scale, m.dropout, m.use_dora = scale, dropout, use_dora


def is_lora_parameter(name: str) -> bool:
    """Whether model parameter `name` is a LoRA weight (A, B) or a DoRA magnitude."""
    return ".lora_a." in name or ".lora_b." in name or name.endswith(".lora_magnitude") or name == "lora_magnitude"


@dataclass
class LoRA(LoRASpec, PeftMethod):
    """rank, alpha, dropout, use_rslora, target_modules, exclude_modules, use_dora: see qtrain.lora.LoRASpec."""

    name: ClassVar[str] = "lora"
    peft_type: ClassVar[str] = "LORA"
    subfolder: ClassVar[str] = ""  # PEFT's files at the adapter folder's root
    mergeable: ClassVar[bool] = True

    init_from: str | None = None  # a PEFT LoRA adapter dir to start from; its r/alpha/targets replace the above

    @classmethod
    def from_spec(cls, spec: LoRASpec, **fields) -> LoRA:
        """The method of a LoRASpec (a PeftLoRASpec, read from an adapter: a PeftLoRA, which keeps PEFT's
        other ways of picking modules)."""
        kind = PeftLoRA if isinstance(spec, PeftLoRASpec) else LoRA
        known = {f.name for f in dataclasses.fields(kind)}
        values = {f.name: copy.deepcopy(getattr(spec, f.name)) for f in dataclasses.fields(spec) if f.name in known}
        return kind(**(values | fields))

    @classmethod
    def from_adapter(cls, folder: str | Path, **fields) -> LoRA:
        """The LoRA of a PEFT adapter folder's adapter_config.json (`qtrain.adapter.read_adapter_config`)."""
        from qtrain.adapter import read_adapter_config

        return cls.from_spec(read_adapter_config(folder), **fields)

    @classmethod
    def from_saved(cls, fields: dict, folder: Path) -> LoRA:
        """LoRA's record is its adapter_config.json (what PEFT reads too), not qtrain.json; `fields`
        keeps only `init_from` (a run that starts from `folder`)."""
        return cls.from_adapter(folder, init_from=fields.get("init_from"))

    def init_dir(self) -> str | None:
        return self.init_from

    def check_unused(self) -> None:
        if self.init_from:
            raise ValueError("lora.init_from: the run does not use LoRA; add lora to method")

    # ---- applying, training ----

    @property
    def targets(self) -> list[str]:
        """The names of the linears `apply` gave an adapter."""
        return getattr(self, "_targets", [])

    def apply(self, model: nn.Module, adapter_dtype: torch.dtype = torch.float32) -> None:
        from qtrain.lora import add_adapters  # the layer (qtrain.lora imports this module: no cycle at import)

        self._targets = add_adapters(model, self, adapter_dtype)

    def owns(self, param_name: str) -> bool:
        return is_lora_parameter(param_name)

    def switched_off(self, model: nn.Module):
        """Every adapted linear computes W x (+ bias) alone: scale 0, no dropout, no DoRA rescaling;
        the adapter's weights are untouched and everything is restored on exit."""
        return _lora_switched_off(model)

    def lr_scaled(self, param_name: str) -> bool:
        return ".lora_b." in param_name  # LoRA+: B learns best with a larger step than A

    def expected_trainable(self, config: PretrainedConfig) -> int:
        """r (in + out) per adapted linear (+ out for DoRA's magnitude)."""
        from qtrain.lora import LoRALinear, is_target
        from qtrain.model import build_skeleton
        from qtrain.moe import swap_experts

        skeleton = build_skeleton(config, torch.float32)  # on meta: free
        with torch.device("meta"):
            swap_experts(skeleton)  # MoE: one linear per expert weight, as the loader holds them
        out = skeleton.get_output_embeddings()
        linears = [(n, m) for n, m in skeleton.named_modules() if isinstance(m, (nn.Linear, LoRALinear)) and m is not out]

        chosen = [m for n, m in linears if is_target(n, self)]
        return sum(self.rank * (m.in_features + m.out_features) + (m.out_features if self.use_dora else 0) for m in chosen)

    # ---- memory facts, the console ----

    def lighter(self) -> tuple[str, LoRA] | None:
        if self.rank <= 8:
            return None
        return f"lora.rank={self.rank // 2}", dataclasses.replace(self, rank=self.rank // 2)

    def describe(self) -> str:
        applied = f" on {len(self.targets)} linears" if self.targets else ""
        return f"LoRA r={self.rank}{applied}"

    # ---- PEFT's format ----

    def config_dict(self) -> dict:
        return {"method": self.name, **dataclasses.asdict(self)}

    def peft_config(self, base_model: str) -> dict:
        from qtrain.adapter import peft_config

        return peft_config(self, self.targets, base_model)

    def to_peft(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from qtrain.adapter import peft_key

        return {peft_key(n): t for n, t in tensors.items()}

    def from_peft(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from qtrain.adapter import model_key

        return {model_key(k, Path("adapter")): t for k, t in tensors.items()}

    def load_peft(self, model: nn.Module, tensors: dict[str, torch.Tensor], source: str = "adapter") -> None:
        """PEFT's keys checked against the model's adapters, with PEFT's names in the errors."""
        from qtrain.adapter import load_lora_tensors

        load_lora_tensors(model, tensors, Path(source))


@dataclass
class PeftLoRA(LoRA, PeftLoRASpec):
    """A LoRA read from a PEFT adapter_config.json: target_modules and exclude_modules may be full-match
    regexes, layers_to_transform (with layers_pattern) keeps list targets to those layers
    (`qtrain.lora.is_target`). Not a config section."""



def mark_only_lora_trainable(model: nn.Module) -> None:
    """Only LoRA's parameters train (`mark_trainable(model, [LoRA()])`)."""
    from qtrain.methods.base import mark_trainable

    mark_trainable(model, [LoRA()])
