"""What every PEFT method in qtrain is: a dataclass of its hyperparameters (also its config section)
that adds its parameters to a loaded model instance, names them, and saves/loads them.

    method = IA3(target_modules=["k_proj", "v_proj", "down_proj"])
    method.apply(model)                  # new parameters, identity at init where the paper has one
    mark_trainable(model, [method])      # only the method's parameters train
    tensors = method.state_dict(model)   # {model parameter name: tensor}, what is saved
    method.load_state_dict(model, tensors)

The frozen base is whatever `qtrain.model.load_base` built (NF4 LoRALinear layers of rank 0; LoRA
itself is a method, `qtrain.methods.lora`, that gives the targets their adapter). Methods change the model INSTANCE only: parameters registered on our own
modules (LoRALinear), children added to a decoder layer instance, forward hooks (registered through
`self.hooks`, a `qtrain.methods.hooks.ModuleHooks`, and removed by handle); never attributes of
transformers classes. Hyperparameters are the dataclass's fields; what a method learns or registers
while it runs (hooks, AdaLoRA's allocation) is a plain attribute, never a field. Parameter names
are stable (they do not move existing modules), so methods compose (LoRA + another) and PEFT's key
names can be produced by a fixed mapping.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from qtrain.methods.hooks import ModuleHooks

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from qtrain.lora import LoRALinear


class PeftMethod:
    """Base of the method dataclasses. Subclasses set `name` (the `method:` config value) and
    implement `apply`, `owns` and `expected_trainable`; `peft_type` names PEFT's implementation
    when there is one (then `peft_config`/`to_peft`/`from_peft` give PEFT's on-disk format)."""

    name: ClassVar[str]
    peft_type: ClassVar[str | None] = None

    def apply(self, model: nn.Module) -> None:
        """Add this method's parameters to `model` (an instance, modified in place)."""
        raise NotImplementedError

    def owns(self, param_name: str) -> bool:
        """Whether the model parameter called `param_name` belongs to this method."""
        raise NotImplementedError

    @property
    def hooks(self) -> ModuleHooks:
        """The forward hooks this method put on models, kept to be removed by handle
        (`qtrain.methods.hooks`). Runtime state, not a config field: made on first use."""
        if getattr(self, "_hooks", None) is None:
            self._hooks = ModuleHooks()
        return self._hooks

    def expected_trainable(self, config: PretrainedConfig) -> int:
        """The paper's count of trainable parameters for a model of `config` (checked by tests)."""
        raise NotImplementedError

    def check_run(self, train_steps: int) -> None:
        """Checks of this method's settings against the run's (`train.max_steps`), when the run uses
        it: a ValueError naming the config key. Its own fields are checked when it is made."""

    def check_unused(self) -> None:
        """Checks of this method's section when the run does not use the method: a ValueError for a
        setting that only means something with it (LoRA's `init_from`)."""

    # ---- training-loop hooks (most methods need none) ----

    def regularization(self, model: nn.Module) -> torch.Tensor | None:
        """A term the training loop adds to the loss of every optimizer step (AdaLoRA's
        orthogonality, AdapterFusion's value regulariser); None: nothing."""
        return None

    def after_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        """Called by the training loop after optimizer update `step` (1-based) of `total_steps`,
        before the gradients are cleared (AdaLoRA's importance scores and budget schedule)."""

    def trainer_state(self) -> dict:
        """Method state the training loop must checkpoint beside the parameters (e.g. AdaLoRA's
        importance EMAs); restored by `load_trainer_state` on resume."""
        return {}

    def load_trainer_state(self, model: nn.Module, state: dict) -> None:
        """Restore what `trainer_state` returned (the method is applied and its parameters loaded)."""

    def switched_off(self, model: nn.Module) -> contextlib.AbstractContextManager | None:
        """A context manager under which `model` computes as if this method were not applied (the
        reference policy of DPO and KTO, `qtrain.preference`); None: this method cannot be switched
        off (the default), and reference-based objectives refuse it by name."""
        return None

    # ---- the optimizer ----

    def lr_scaled(self, param_name: str) -> bool:
        """Whether this parameter learns at lr * train.lora_plus_ratio (LoRA+: LoRA's B matrices)."""
        return False

    # ---- memory facts (qtrain.estimate), per token; most methods add nothing ----

    hooks_attention: ClassVar[bool] = False  # a hook that sees the attention's arguments (no varlen path)
    input_side: ClassVar[bool] = False  # its parameters act on the decoder's input only (prompt encoders)

    def saved_bytes_per_token(self, s, e: int) -> int:
        """Bytes per token and decoder layer this method adds to what the backward keeps, for a layer
        of shape `s` (`qtrain.estimate.LayerShape`) in a compute dtype of `e` bytes."""
        return 0

    def virtual_tokens(self) -> int:
        """Tokens this method prepends to every row's decoder input (prompt tuning, P-tuning)."""
        return 0

    def prefix_keys(self) -> int:
        """Key/value columns this method adds to every attention (prefix tuning, P-tuning v2)."""
        return 0

    def low_rank_width(self, linear: nn.Module) -> int:
        """The width of a low-rank path this method put on `linear` beside its own LoRA adapter
        (AdaLoRA's P·Λ·Q: what the backward saves is that of a LoRA of this rank); 0: none."""
        return 0

    def lighter(self) -> tuple[str, PeftMethod] | None:
        """A config change of this method that needs less memory ("lora.rank=8", the changed method),
        offered when a run does not fit; None: nothing to offer."""
        return None

    def describe(self) -> str:
        """The method on the console's model line (e.g. "LoRA r=16 on 28 linears")."""
        return self.name

    # ---- saving (qtrain.methods.io) ----

    mergeable: ClassVar[bool] = False  # `qtrain merge` can fold it into the base weights

    @property
    def subfolder(self) -> str:
        """Where in an adapter folder the method is saved: its own subfolder (LoRA: "", the root)."""
        return self.name

    def init_dir(self) -> str | None:
        """An adapter folder whose saved parameters this method starts from (LoRA's `init_from`)."""
        return None

    @classmethod
    def from_saved(cls, fields: dict, folder: Path) -> PeftMethod:
        """The method an adapter folder recorded: `fields` from qtrain.json, `folder` where it is saved."""
        return cls(**fields)

    def config_dict(self) -> dict:
        return {"method": self.name, **dataclasses.asdict(self)}

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The method's parameters by model name, detached, contiguous, on CPU; sharded (FSDP) ones
        whole (`qtrain.fsdp.full_tensor`: a collective, so every rank calls this, rank 0 writes)."""
        from qtrain.fsdp import full_tensor  # lazy: loading a config imports no torch.distributed

        return {n: full_tensor(p.detach()).cpu().contiguous() for n, p in model.named_parameters() if self.owns(n)}

    def load_state_dict(self, model: nn.Module, tensors: dict[str, torch.Tensor], source: str = "adapter") -> None:
        """Copy `tensors` into the model's parameters of this method; every one must be there, with its shape."""
        from qtrain.fsdp import sharded_like  # lazy: loading a config imports no torch.distributed

        params = {n: p for n, p in model.named_parameters() if self.owns(n)}
        unknown = sorted(set(tensors) - set(params))
        if unknown:
            raise ValueError(f"{source}: {unknown[0]!r} is not a {self.name} parameter of this model" + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))
        missing = sorted(set(params) - set(tensors))
        if missing:
            raise ValueError(f"{source}: no value for {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        with torch.no_grad():
            for n, value in tensors.items():
                if params[n].shape != value.shape:
                    raise ValueError(f"{source}: {n!r} has shape {list(value.shape)}, the model expects {list(params[n].shape)}")
                params[n].copy_(sharded_like(value, params[n]))  # sharded (FSDP): this rank's rows

    def load_peft(self, model: nn.Module, tensors: dict[str, torch.Tensor], source: str = "adapter") -> None:
        """Copy tensors in PEFT's format (as `to_peft` wrote them) into the model."""
        self.load_state_dict(model, self.from_peft(tensors), source)

    # Methods whose PEFT format is not their training state (prefix tuning's MLP, P-tuning's prompt
    # encoder: PEFT saves their output) set `folds`; checkpoints then also keep the training state
    # (`qtrain.methods.io`), and `load_state_dict` must accept what `from_peft` returns.
    folds: ClassVar[bool] = False

    def peft_config(self, base_model: str) -> dict:
        raise NotImplementedError(f"{self.name} has no PEFT format")

    def to_peft(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"{self.name} has no PEFT format")

    def from_peft(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"{self.name} has no PEFT format")


def mark_trainable(model: nn.Module, methods: list[PeftMethod]) -> list[str]:
    """Freeze everything but the methods' parameters; returns the trainable names."""
    names = []
    for n, p in model.named_parameters():
        p.requires_grad = any(m.owns(n) for m in methods)
        if p.requires_grad:
            names.append(n)
    return names


def base_linears(model: nn.Module) -> dict[str, LoRALinear]:
    """{name: module} of the base's linears (`qtrain.lora.LoRALinear`: every linear but lm_head, and
    not a MoE's per-expert projections, which only LoRA adapts, when asked: `qtrain.moe`), in
    model order. The layer is imported here, not at the top: loading a config (which imports the
    method classes) imports no model code."""
    from qtrain.lora import LoRALinear
    from qtrain.moe import is_expert

    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear) and not is_expert(n)}


def matches(name: str, targets: list[str]) -> bool:
    """Suffix match of a module name against target names (as LoRA's target_modules)."""
    return any(name == t or name.endswith("." + t) for t in targets)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.get_decoder().layers


def projection_shapes(config: PretrainedConfig, targets: list[str] | str = "all-linear") -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of a decoder layer's linear projections, by name, for the formulas of
    `expected_trainable`; `targets`: "all-linear" or the names to keep."""
    c = config.get_text_config()
    head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    q, kv, d, ff = c.num_attention_heads * head, c.num_key_value_heads * head, c.hidden_size, c.intermediate_size
    shapes = {
        "q_proj": (d, q),
        "k_proj": (d, kv),
        "v_proj": (d, kv),
        "o_proj": (q, d),
        "gate_proj": (d, ff),
        "up_proj": (d, ff),
        "down_proj": (ff, d),
    }
    return shapes if targets == "all-linear" else {k: v for k, v in shapes.items() if k in targets}
