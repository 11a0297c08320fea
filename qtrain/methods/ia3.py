"""(IA)^3 (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
In-Context Learning"): Infused Adapter by Inhibiting and Amplifying Inner Activations. Learned
vectors rescale the attention's keys and values and the FFN's intermediate activation:

    k = l_k ⊙ (W_k x)        v = l_v ⊙ (W_v x)        FFN: W_down (l_ff ⊙ h),  h = act(W_gate x) ⊙ (W_up x)

W frozen, l_k, l_v, l_ff trained, all initialised to ones (the model is unchanged at step 0).

As Hugging Face PEFT implements it (peft/tuners/ia3): `target_modules` are the linear layers that
get a vector (default k_proj, v_proj, down_proj) and `feedforward_modules` (a subset of them;
default down_proj) those whose vector scales the layer's INPUT (l ⊙ x, in_features entries); every
other target's vector scales its OUTPUT (l ⊙ (W x + b), out_features entries, bias included).
Names match as LoRA's target_modules: the module name or its last dotted parts ("down_proj"
matches "model.layers.0.mlp.down_proj"); "all-linear" targets every linear but lm_head.

Model changes (instance only): each target LoRALinear gets a fp32 parameter `ia3_l` [n] and a
forward pre-hook (feedforward: x -> l ⊙ x) or a forward hook (y -> l ⊙ y). Model parameter names
are `<module>.ia3_l`, e.g. `model.layers.0.self_attn.k_proj.ia3_l`. The hooks run inside the
decoder layer's forward, so gradient checkpointing recomputes them with the layer.

Composition: the hooks wrap the whole LoRALinear, so with LoRA (or DoRA, or BitFit's bias) on the
same linear the vector scales that layer's whole input or output, as PEFT's IA3 layer scales
whatever its base layer computes:

    feedforward:  y = W (l ⊙ x) + s B A (l ⊙ x) + b          other:  y = l ⊙ (W x + s B A x + b)

Precision (PEFT's Linear): the activation is cast to fp32, multiplied by the fp32 vector and cast
back to its dtype; ones at init return it bit for bit in any dtype.

Trainable parameters: out_features of each non-feedforward target plus in_features of each
feedforward target, summed over layers; with the defaults, per decoder layer
2 · num_key_value_heads · head_dim + intermediate_size (GQA: k and v have the KV heads' width).

Saving (PEFT's format, `peft_config`/`to_peft`): adapter_config.json with peft_type "IA3", and
`base_model.model.<module>.ia3_l` of shape [1, in_features] (feedforward) or [out_features, 1]
(the others); `PeftModel.from_pretrained(base, dir)` loads it, and `from_peft` reads what PEFT's
`save_pretrained` writes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from qtrain.methods.base import PeftMethod, base_linears, matches, projection_shapes

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from qtrain.lora import LoRALinear

PEFT_PREFIX = "base_model.model."
PARAM = "ia3_l"


def _scaled(t: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """t ⊙ l along the last dimension, in fp32, returned in t's dtype."""
    return (t.float() * vector.float()).to(t.dtype)


def scale_input(module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook (with_kwargs) of a feedforward target: x -> l ⊙ x. A module-level function,
    so that deepcopy/pickle of the model keep the hook (it reads the module's own `ia3_l`)."""
    if args:
        return (_scaled(args[0], module.ia3_l), *args[1:]), kwargs
    return args, {**kwargs, "x": _scaled(kwargs["x"], module.ia3_l)}


def scale_output(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook of a non-feedforward target: y -> l ⊙ y."""
    return _scaled(output, module.ia3_l)


def _device(module: nn.Module) -> torch.device:
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


@dataclass
class IA3(PeftMethod):
    name: ClassVar[str] = "ia3"
    peft_type: ClassVar[str | None] = "IA3"
    # 'all-linear' or module names (suffix match), as LoRA's target_modules
    target_modules: list[str] | str = field(default_factory=lambda: ["k_proj", "v_proj", "down_proj"])
    # the targets whose vector scales the input (in_features) rather than the output
    feedforward_modules: list[str] = field(default_factory=lambda: ["down_proj"])

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            self.target_modules = [self.target_modules]
        if isinstance(self.feedforward_modules, str):
            self.feedforward_modules = [self.feedforward_modules]
        if not self.target_modules:
            raise ValueError("ia3.target_modules: empty; give module names or 'all-linear'")
        names = ([] if self.all_linear else list(self.target_modules)) + list(self.feedforward_modules)
        if not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"ia3: module names must be non-empty strings, got {names!r}")
        if not self.all_linear:
            extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if extra:  # PEFT's IA3Config check
                raise ValueError(f"ia3.feedforward_modules must be a subset of target_modules; {extra} are not targets")
        self.target_modules = self.target_modules if self.all_linear else list(self.target_modules)
        self.feedforward_modules = list(self.feedforward_modules)

    @property
    def all_linear(self) -> bool:
        return self.target_modules == "all-linear"

    def _targets(self, model: nn.Module) -> dict[str, LoRALinear]:
        return {
            n: m
            for n, m in base_linears(model).items()
            if self.all_linear or matches(n, self.target_modules)
        }

    def is_feedforward(self, module_name: str) -> bool:
        return matches(module_name, self.feedforward_modules)

    def apply(self, model: nn.Module) -> None:
        targets = self._targets(model)
        if not targets:
            raise ValueError(f"ia3.target_modules={self.target_modules!r} matched no linear layer of the model")
        for name, m in targets.items():
            if PARAM in m._parameters:
                raise ValueError(f"ia3: {name} already has an {PARAM} (IA3 applied twice?)")
        for name, m in targets.items():
            ff = self.is_feedforward(name)
            size = m.in_features if ff else m.out_features
            m.register_parameter(PARAM, nn.Parameter(torch.ones(size, device=_device(m), dtype=torch.float32)))
            if ff:
                self.hooks.forward_pre(m, scale_input, with_kwargs=True)
            else:
                self.hooks.forward(m, scale_output)

    def remove(self, model: nn.Module) -> None:
        """Undo `apply`: drop the vectors and their hooks (the model is the base again)."""
        self.hooks.remove(model)
        for m in base_linears(model).values():
            if PARAM in m._parameters:
                del m._parameters[PARAM]

    def saved_bytes_per_token(self, s, e: int) -> int:
        """The fp32 activation each vector scales (the input of a feedforward module, else the
        output), and its fp32 gradient in the layer's backward buffers."""
        ff = set(self.feedforward_modules)
        targets = s.in_out if self.target_modules == "all-linear" else {n: s.in_out[n] for n in self.target_modules if n in s.in_out}
        return sum(8 * (io[0] if n in ff else io[1]) for n, io in targets.items())

    def owns(self, param_name: str) -> bool:
        module, _, attr = param_name.rpartition(".")
        if attr != PARAM or module.endswith("lm_head"):
            return False
        return self.all_linear or matches(module, self.target_modules)

    def expected_trainable(self, config: PretrainedConfig) -> int:
        c = config.get_text_config()
        chosen = projection_shapes(config, self.target_modules)  # (in, out)
        per_layer = sum(i if self.is_feedforward(k) else o for k, (i, o) in chosen.items())
        return c.num_hidden_layers * per_layer

    # ---- PEFT's format ----

    def peft_config(self, base_model: str) -> dict:
        return {
            "peft_type": "IA3",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "target_modules": "all-linear" if self.all_linear else sorted(self.target_modules),
            "feedforward_modules": sorted(self.feedforward_modules),
            "init_ia3_weights": True,
            "fan_in_fan_out": False,
            "modules_to_save": None,
            "inference_mode": True,
        }

    def to_peft(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{`<module>.ia3_l`: [n]} -> {`base_model.model.<module>.ia3_l`: [1, in] (feedforward) or [out, 1]}."""
        out = {}
        for name, t in tensors.items():
            if not self.owns(name):
                raise ValueError(f"ia3: {name!r} is not an (IA)^3 parameter")
            module = name.rpartition(".")[0]
            shape = (1, -1) if self.is_feedforward(module) else (-1, 1)
            out[PEFT_PREFIX + name] = t.detach().reshape(shape).contiguous()
        return out

    def from_peft(self, tensors: dict[str, torch.Tensor], source: str = "adapter") -> dict[str, torch.Tensor]:
        """PEFT's keys and shapes -> ours ({`<module>.ia3_l`: [n]}); the orientation of each vector
        must be that of this method's feedforward_modules."""
        out = {}
        for key, t in tensors.items():
            name = key.removeprefix(PEFT_PREFIX)
            if name == key or not self.owns(name):
                raise ValueError(f"{source}: {key!r} is not an (IA)^3 vector of target_modules={self.target_modules!r}")
            ff = self.is_feedforward(name.rpartition(".")[0])
            if t.dim() != 2 or t.shape[0 if ff else 1] != 1:
                want = "[1, in_features] (a feedforward module: it scales the input)" if ff else "[out_features, 1]"
                raise ValueError(
                    f"{source}: {key!r} has shape {list(t.shape)}, expected {want}; "
                    f"does feedforward_modules={self.feedforward_modules!r} match the adapter's?"
                )
            out[name] = t.reshape(-1)
        return out
