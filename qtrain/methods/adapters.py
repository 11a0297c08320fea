"""Bottleneck adapters: small trained MLPs around the frozen sublayers of each decoder layer.

    Bottleneck:  Δ(x) = W_up f(W_down x + b_down) + b_up       W_down: m x d, W_up: d x m

Houlsby (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP"): an adapter in
series after the attention sublayer and after the FFN sublayer, each before its residual add:

    a(y) = y + Δ(y)
    h = h + a(self_attn(input_layernorm(h)));   h = h + a(mlp(post_attention_layernorm(h)))

Pfeiffer (Pfeiffer et al. 2021, "AdapterFusion", its adapter configuration): the same adapter,
after the FFN sublayer only (their architecture search found this one adapter per layer on par
with Houlsby's two). Their BERT is post-LN; in a pre-LN Llama the adapter sits where Houlsby's FFN
adapter does: on the FFN output, before the residual add.

Parallel adapter (He et al. 2022, "Towards a Unified View of Parameter-Efficient Transfer
Learning"): the bottleneck reads the sublayer's INPUT x (the normed hidden states) and its output
is added beside the sublayer, scaled by s (the paper's best: beside the FFN, s = 4):

    h_out = sublayer(x) + s · Δ(x)          where: [mlp] (default) or [self_attn, mlp]

d is the hidden size and m the bottleneck (r in He et al.); f is relu (default), gelu or silu.

Init: W_up = 0 and b_up = 0, so Δ = 0 and every adapter is exactly the identity at step 0 (Houlsby
et al. ask for near-identity, with N(0, 1e-2) weights). W_down keeps nn.Linear's Kaiming-uniform
(a=sqrt(5)), as in He et al.'s code, AdapterHub's "mam_adapter" init and LoRA's A; b_down = 0.
With W_up = 0 only W_up and b_up get a gradient on the first step; W_down follows once W_up is
non-zero (as LoRA's A).

Precision: the adapter's parameters are fp32. The sublayer's output (and, for parallel adapters, its
input) is cast to fp32, Δ is computed in fp32 with autocast disabled (its matmuls are 2·d·m per
token, small next to the sublayer's), y + Δ is formed in fp32 and cast back to the sublayer
output's dtype, so a zero Δ returns y bit for bit. The fp32 input of W_down is kept for backward
(one [tokens, d] fp32 tensor per adapter; recomputed under gradient checkpointing).

Model changes (instance only): each decoder layer gets children `adapter_attn` / `adapter_mlp`
(Bottleneck modules) and forward hooks on its `self_attn` / `mlp` that rewrite their outputs
(element 0 of self_attn's (attn_output, attn_weights) tuple). Existing parameter names do not
change, so LoRA composes. The hooks run inside the layer's forward, so gradient checkpointing
recomputes them with the layer.

Trainable parameters: 2·d·m + m + d per adapter (weights and biases), times the number of layers
L times adapters per layer: Houlsby 2, Pfeiffer 1, parallel len(where).

Saving: PEFT has no bottleneck adapters; the saved format is PeftMethod.state_dict's, the fp32
tensors under their model names, e.g. `model.layers.0.adapter_mlp.down.weight` [m, d],
`...adapter_mlp.down.bias` [m], `...adapter_mlp.up.weight` [d, m], `...adapter_mlp.up.bias` [d]
(`qtrain.methods.io` writes them to <name>/method.safetensors beside method.json, the config).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Literal

import torch
from torch import nn
from torch.nn import functional as F

from qtrain.methods.base import PeftMethod, decoder_layers

if TYPE_CHECKING:
    from transformers import PretrainedConfig

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}
SITES = ("self_attn", "mlp")  # the sublayers an adapter can sit on
CHILD = {"self_attn": "adapter_attn", "mlp": "adapter_mlp"}  # its child name on the decoder layer


class Bottleneck(nn.Module):
    """Δ(x) = up(f(down(x))) in fp32: down [m, d] (+ bias), up [d, m] (+ bias), up zero at init."""

    def __init__(
        self, hidden: int, bottleneck: int, activation: str = "relu", device: torch.device | str | None = None
    ):
        super().__init__()
        self.activation = activation
        self.down = nn.Linear(hidden, bottleneck, device=device, dtype=torch.float32)  # Kaiming-uniform
        self.up = nn.Linear(bottleneck, hidden, device=device, dtype=torch.float32)
        with torch.no_grad():
            self.down.bias.zero_()
            self.up.weight.zero_()
            self.up.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Δ(x) in fp32 (x is cast; autocast is off inside)."""
        off = (
            torch.autocast(x.device.type, enabled=False)
            if torch.is_autocast_enabled(x.device.type)
            else contextlib.nullcontext()
        )
        with off:
            down = F.linear(x.float(), self.down.weight.float(), self.down.bias.float())
            return F.linear(ACTIVATIONS[self.activation](down), self.up.weight.float(), self.up.bias.float())

    def extra_repr(self) -> str:
        return f"hidden={self.down.in_features}, bottleneck={self.down.out_features}, activation={self.activation}"


def _replace_first(output, value: torch.Tensor):
    """The sublayer's output with its hidden states (a tensor, or element 0 of a tuple) replaced."""
    return (value, *output[1:]) if isinstance(output, tuple) else value


def _first(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


class SerialHook:
    """Forward hook: y -> y + Δ(y) on the sublayer's output (Houlsby, Pfeiffer). A class rather than
    a closure so that deepcopy/pickle of the model carry the hook to the copy's adapter."""

    def __init__(self, adapter: Bottleneck):
        self.adapter = adapter

    def __call__(self, module: nn.Module, args, output):
        y = _first(output)
        return _replace_first(output, (y.float() + self.adapter(y)).to(y.dtype))


class ParallelHook:
    """Forward hook (with_kwargs): y -> y + s·Δ(x), x the sublayer's input hidden states (the first
    positional argument, or the `hidden_states` keyword as LlamaDecoderLayer passes it)."""

    def __init__(self, adapter: Bottleneck, scale: float):
        self.adapter, self.scale = adapter, scale

    def __call__(self, module: nn.Module, args, kwargs, output):
        x = args[0] if args else kwargs["hidden_states"]
        y = _first(output)
        return _replace_first(output, (y.float() + self.scale * self.adapter(x)).to(y.dtype))


@dataclass
class BottleneckAdapters(PeftMethod):
    """Shared fields and machinery; subclasses choose the sites and the hook."""

    bottleneck: int = 64  # m (Houlsby, Pfeiffer) / r (He et al.)
    activation: Literal["relu", "gelu", "silu"] = "relu"

    def __post_init__(self) -> None:
        if isinstance(self.bottleneck, bool) or not isinstance(self.bottleneck, int) or self.bottleneck <= 0:
            raise ValueError(f"{self.name}.bottleneck: must be an integer > 0, got {self.bottleneck!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"{self.name}.activation: {self.activation!r} is not one of {', '.join(ACTIVATIONS)}")

    def sites(self) -> list[str]:
        raise NotImplementedError

    def _hook(self, site: str, sublayer: nn.Module, adapter: Bottleneck):
        return self.hooks.forward(sublayer, SerialHook(adapter))

    def apply(self, model: nn.Module) -> None:
        config = model.config.get_text_config()
        for i, layer in enumerate(decoder_layers(model)):
            for site in self.sites():
                child = CHILD[site]
                if hasattr(layer, child):
                    raise ValueError(
                        f"{self.name}: decoder layer {i} already has an {child} (a bottleneck adapter applied twice?)"
                    )
                sublayer = getattr(layer, site)
                device = next(layer.parameters()).device
                layer.add_module(child, Bottleneck(config.hidden_size, self.bottleneck, self.activation, device))
                self._hook(site, sublayer, getattr(layer, child))

    def owns(self, param_name: str) -> bool:
        return any(f".{CHILD[site]}." in param_name for site in self.sites())

    def saved_bytes_per_token(self, s, e: int) -> int:
        """Each adapter saves its fp32 input and its hidden activations (before and after f)."""
        return len(self.sites()) * (4 * s.D + 2 * 4 * self.bottleneck)

    def expected_trainable(self, config: PretrainedConfig) -> int:
        c = config.get_text_config()
        d, m = c.hidden_size, self.bottleneck
        return c.num_hidden_layers * len(self.sites()) * (2 * d * m + m + d)


@dataclass
class Houlsby(BottleneckAdapters):
    """Serial adapters after the attention and the FFN sublayers (2 per layer)."""

    name: ClassVar[str] = "houlsby"

    def sites(self) -> list[str]:
        return ["self_attn", "mlp"]


@dataclass
class Pfeiffer(BottleneckAdapters):
    """A serial adapter after the FFN sublayer only (1 per layer)."""

    name: ClassVar[str] = "pfeiffer"

    def sites(self) -> list[str]:
        return ["mlp"]


@dataclass
class ParallelAdapter(BottleneckAdapters):
    """Adapters beside the sublayers in `where`, reading their input, scaled by `scale`."""

    name: ClassVar[str] = "parallel_adapter"
    hooks_attention: ClassVar[bool] = True
    scale: float = 4.0  # s; He et al.'s best parallel adapter uses 4
    where: list[Literal["self_attn", "mlp"]] = field(default_factory=lambda: ["mlp"])

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.where, str):
            self.where = [self.where]
        bad = [w for w in self.where if w not in SITES]
        if bad or not self.where or len(set(self.where)) != len(self.where):
            raise ValueError(
                f"{self.name}.where: {self.where!r}; give [mlp], [self_attn] or [self_attn, mlp] without repeats"
            )
        if not math.isfinite(self.scale):
            raise ValueError(f"{self.name}.scale: must be finite, got {self.scale}")

    def sites(self) -> list[str]:
        return [s for s in SITES if s in self.where]

    def _hook(self, site: str, sublayer: nn.Module, adapter: Bottleneck):
        return self.hooks.forward(sublayer, ParallelHook(adapter, self.scale), with_kwargs=True)
