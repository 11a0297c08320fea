"""AdapterFusion (Pfeiffer et al. 2021, "AdapterFusion: Non-Destructive Task Composition for Transfer
Learning"): stage 2 of a two-stage recipe. Stage 1 trains N task adapters independently (our Pfeiffer
method, one run per task, each saved as an adapter dir); stage 2 loads them FROZEN into every layer
and learns, per layer, an attention over their outputs.

With h the FFN sublayer output of layer l (what a Pfeiffer adapter reads) and Δ_n(h) the bottleneck
of the n-th stage-1 adapter (its output WITHOUT the residual, a_n = h + Δ_n(h) being the adapter's
full output):

    q   = W_Q h + b_Q                      W_Q, W_K, W_V: d x d
    k_n = W_K Δ_n + b_K
    v_n = W_V Δ_n                          (no bias)
    s   = softmax_n(q · k_n / T)
    out = h + Σ_n s_n v_n                  (replaces y -> y + Δ(y), before the layer's residual add)

This is AdapterHub's BertFusion under its default "dynamic" config (adapter-hub/adapters,
`methods/modeling.py` and `compose_fuse` in `methods/bottleneck.py`): key and value are the
adapters' `bottleneck_up` (Δ_n; the paper's z_n), the query is the sublayer output, and the residual
h is added after the weighted sum (`residual_before=False`). Using Δ_n rather than a_n = h + Δ_n is
what makes the residual count once: h + Σ s_n (h + Δ_n) would double h. With W_V = I and equal
weights the output is h + mean_n Δ_n = mean_n a_n, the average of the N adapted outputs.

Init (AdapterHub's, the paper's "V initialised as identity"): W_Q, W_K ~ N(0, 0.02), b_Q = b_K = 0
(BERT init); W_V = identity with 1e-6 everywhere off the diagonal (their `value_initialized`). So
at step 0 the scores are near 0, s is near uniform and the fusion is near the average of the
adapters; with ONE adapter s = 1 exactly and the output is h + W_V Δ ≈ that adapter's output (the
stage-1 model, up to the 1e-6 off-diagonal). AdapterHub also regularises W_V towards I with
0.01 · Σ_l ||I - W_V||²_F added to the loss (`get_fusion_regularization_loss`);
`AdapterFusion.regularization(model)` computes it with weight `regularization_weight` (0.01), and
`qtrain train` adds it to every step's loss.
Not reproduced: attention-score dropout (Llama's attention_dropout is 0) and the optional
temperature annealing (off in the "dynamic" config); T is the fixed `temperature` field.

Note: b_K shifts every score q · k_n by the same q · b_K, so the softmax ignores it and its gradient
is 0 (up to rounding). It is kept, as in AdapterHub's layout, and counted.

Trainable parameters (fp32): per layer W_Q, b_Q, W_K, b_K, W_V = 3·d² + 2·d; times L layers. That is
AdapterHub's layout, sized for BERT (d = 768: 1.8M per layer); at d = 4096 (Llama-3.1-8B) it is 1.6B
parameters, 26 GB with their Adam state. Two options keep the paper's attention within a consumer
card: `attention_dim` a < d projects query and key to a dimensions (W_Q, W_K: a x d; the scores
are dot products, any width works; 2·(a·d + a) per layer), and `value: false` drops W_V (= I, as
AdapterHub's `value=False`: out = h + Σ_n s_n Δ_n, no regulariser). With a = 256 and no value,
Llama-3.1-8B trains 67M fusion parameters.

Precision: as the bottleneck adapters (`qtrain.methods.adapters`): the fusion runs in fp32 with
autocast off and its result is cast back to the sublayer output's dtype.

Model changes (instance only): each decoder layer gets the children `fusion_adapters` (an
nn.ModuleList of the N frozen Bottlenecks, requires_grad False; parameter names
`model.layers.<i>.fusion_adapters.<n>.{down,up}.{weight,bias}`, not owned by this method) and
`adapter_fusion` (the trainable `query`, `key`, `value` nn.Linear layers, owned by this method), and
a forward hook on its `mlp`. Stage-1 adapters are read from `<path>/pfeiffer/` (method.json +
method.safetensors as `qtrain.methods.io.save_method` writes them) and checked by Pfeiffer's own
`load_state_dict` (every tensor present, right shapes); each may have its own bottleneck size and
activation.

Saving: qtrain's format (PEFT has no AdapterFusion): <adapter>/adapter_fusion/method.json holds the
config with the stage-1 adapter paths made absolute, method.safetensors the fusion parameters only
(`model.layers.<i>.adapter_fusion.{query,key}.{weight,bias}`, `...adapter_fusion.value.weight`).
The stage-1 adapters are referenced, not copied: loading a fusion adapter (apply, then load_method)
reads them again from those paths, so they must stay where they were.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from qtrain.methods.adapters import CHILD, Bottleneck, Pfeiffer, _first, _replace_first
from qtrain.methods.base import PeftMethod, decoder_layers
from qtrain.methods.io import METHOD_CONFIG, METHOD_WEIGHTS

if TYPE_CHECKING:
    from transformers import PretrainedConfig

ADAPTERS_CHILD, FUSION_CHILD = "fusion_adapters", "adapter_fusion"
VALUE_OFF_DIAGONAL = 1e-6  # AdapterHub's value init: identity, 1e-6 elsewhere
QK_INIT_STD = 0.02  # BERT init of the query and key projections
REGULARIZATION = 0.01  # AdapterHub's weight of ||I - W_V||²_F


def _fp32(device_type: str):
    return (
        torch.autocast(device_type, enabled=False)
        if torch.is_autocast_enabled(device_type)
        else contextlib.nullcontext()
    )


class Fusion(nn.Module):
    """One layer's attention over N adapter outputs: query/key a x d (+ bias; a = d by default), value
    d x d (no bias) or none (identity), fp32."""

    def __init__(
        self,
        hidden: int,
        temperature: float = 1.0,
        device: torch.device | str | None = None,
        attention_dim: int | None = None,
        value: bool = True,
    ):
        super().__init__()
        self.temperature = temperature
        a = attention_dim or hidden
        self.query = nn.Linear(hidden, a, device=device, dtype=torch.float32)
        self.key = nn.Linear(hidden, a, device=device, dtype=torch.float32)
        self.value = nn.Linear(hidden, hidden, bias=False, device=device, dtype=torch.float32) if value else None
        with torch.no_grad():
            for lin in (self.query, self.key):
                lin.weight.normal_(0.0, QK_INIT_STD)
                lin.bias.zero_()
            if self.value is not None:
                self.value.weight.fill_(VALUE_OFF_DIAGONAL).fill_diagonal_(1.0)

    def weights(self, h: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
        """s [..., N]: softmax_n((W_Q h + b_Q) · (W_K Δ_n + b_K) / T); h [..., d] fp32, deltas [..., N, d] fp32."""
        q = F.linear(h, self.query.weight, self.query.bias)
        k = F.linear(deltas, self.key.weight, self.key.bias)
        scores = torch.einsum("...d,...nd->...n", q, k)
        return torch.softmax(scores / self.temperature, dim=-1)

    def forward(self, h: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
        """h + Σ_n s_n W_V Δ_n in fp32 (autocast off inside)."""
        with _fp32(h.device.type):
            h, deltas = h.float(), deltas.float()
            v = deltas if self.value is None else F.linear(deltas, self.value.weight)
            return h + torch.einsum("...n,...nd->...d", self.weights(h, deltas), v)

    def extra_repr(self) -> str:
        value = "W_V" if self.value is not None else "identity"
        return f"hidden={self.query.in_features}, attention_dim={self.query.out_features}, value={value}, temperature={self.temperature}"


class FusionHook:
    """Forward hook on the mlp: y -> fusion(y, [Δ_1(y) .. Δ_N(y)]). A class (not a closure) so that
    deepcopy of the model carries it to the copy's modules."""

    def __init__(self, adapters: nn.ModuleList, fusion: Fusion):
        self.adapters, self.fusion = adapters, fusion

    def __call__(self, module: nn.Module, args, output):
        y = _first(output)
        deltas = torch.stack([adapter(y) for adapter in self.adapters], dim=-2)  # [..., N, d] fp32
        return _replace_first(output, self.fusion(y, deltas).to(y.dtype))


class _PfeifferView:
    """The N-th frozen adapter of every layer under the names a Pfeiffer model gives its adapter
    (`<layer>.adapter_mlp.<param>`), so that Pfeiffer.load_state_dict checks and copies a stage-1 file."""

    def __init__(self, pairs: list[tuple[str, nn.Parameter]]):
        self.pairs = pairs

    def named_parameters(self):
        return iter(self.pairs)


def read_stage1(path: str | Path, where: str = "adapter_fusion.adapters") -> tuple[Pfeiffer, dict, Path]:
    """A stage-1 adapter dir's Pfeiffer config, its tensors, and the weights file they came from."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{where}: stage-1 adapter dir {str(path)!r} not found")
    source = root / Pfeiffer.name
    config, weights = source / METHOD_CONFIG, source / METHOD_WEIGHTS
    for f in (config, weights):
        if not f.is_file():
            raise FileNotFoundError(
                f"{where}: {f} not found; {str(path)!r} holds no Pfeiffer adapter (train one with method: pfeiffer)"
            )
    data = json.loads(config.read_text())
    if data.pop("method", None) != Pfeiffer.name:
        raise ValueError(f"{where}: {config} is not a pfeiffer adapter's config")
    from qtrain.adapter import read_adapter_file  # NaN/inf refused by tensor name

    return Pfeiffer(**data), read_adapter_file(weights), weights


@dataclass
class AdapterFusion(PeftMethod):
    """Frozen stage-1 Pfeiffer adapters (`adapters`: their adapter dirs) fused per layer by a learned attention."""

    name: ClassVar[str] = "adapter_fusion"
    adapters: list[str] = field(default_factory=list)  # stage-1 adapter dirs, each with a pfeiffer/ subfolder
    temperature: float = 1.0  # T of the softmax (fixed)
    regularization_weight: float = REGULARIZATION  # weight of Σ_l ||I - W_V||²_F in the loss (0: off)
    attention_dim: int | None = None  # width of the query/key projections (None: the hidden size, as AdapterHub)
    value: bool = True  # learn W_V (d x d per layer); false: the identity

    def check_run(self, train_steps: int) -> None:
        if not self.adapters:
            raise ValueError("adapter_fusion.adapters: list the stage-1 adapter dirs to fuse (runs trained with method: pfeiffer)")

    def __post_init__(self) -> None:
        if isinstance(self.adapters, str):
            self.adapters = [self.adapters]
        if not isinstance(self.adapters, list) or not all(isinstance(a, str) and a for a in self.adapters):
            raise ValueError(f"{self.name}.adapters: a list of adapter dirs, got {self.adapters!r}")
        if len(set(self.adapters)) != len(self.adapters):
            raise ValueError(f"{self.name}.adapters: {self.adapters!r} names an adapter twice")
        t = self.temperature
        if not (not isinstance(t, bool) and isinstance(t, (int, float)) and math.isfinite(t) and t > 0):
            raise ValueError(f"{self.name}.temperature: must be a finite number > 0, got {t!r}")
        w = self.regularization_weight
        if not (not isinstance(w, bool) and isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
            raise ValueError(f"{self.name}.regularization_weight: must be a finite number >= 0, got {w!r}")
        a = self.attention_dim
        if a is not None and (isinstance(a, bool) or not isinstance(a, int) or a < 1):
            raise ValueError(f"{self.name}.attention_dim: a positive integer or null (the hidden size), got {a!r}")

    def config_dict(self) -> dict:
        """The config with the stage-1 paths made absolute (they are read again when the fusion loads)."""
        return {
            "method": self.name,
            "adapters": [str(Path(a).resolve()) for a in self.adapters],
            "temperature": self.temperature,
            "regularization_weight": self.regularization_weight,
            "attention_dim": self.attention_dim,
            "value": self.value,
        }

    def apply(self, model: nn.Module) -> None:
        if not self.adapters:
            raise ValueError(f"{self.name}.adapters: give the stage-1 Pfeiffer adapter dirs to fuse")
        stage1 = [read_stage1(a, f"{self.name}.adapters[{i}]") for i, a in enumerate(self.adapters)]
        config = model.config.get_text_config()
        layers = decoder_layers(model)
        prefix = {id(m): n for n, m in model.named_modules()}
        for i, layer in enumerate(layers):
            for child in (ADAPTERS_CHILD, FUSION_CHILD):
                if hasattr(layer, child):
                    raise ValueError(
                        f"{self.name}: decoder layer {i} already has a {child} (adapter_fusion applied twice?)"
                    )
            device = next(layer.parameters()).device
            frozen = nn.ModuleList(
                Bottleneck(config.hidden_size, pf.bottleneck, pf.activation, device) for pf, _, _ in stage1
            )
            frozen.requires_grad_(False)
            layer.add_module(ADAPTERS_CHILD, frozen)
            fusion = Fusion(config.hidden_size, self.temperature, device, self.attention_dim, self.value)
            layer.add_module(FUSION_CHILD, fusion)
        for n, (pf, tensors, weights) in enumerate(stage1):
            view = _PfeifferView(
                [
                    (f"{prefix[id(layer)]}.{CHILD['mlp']}.{pn}", p)
                    for layer in layers
                    for pn, p in getattr(layer, ADAPTERS_CHILD)[n].named_parameters()
                ]
            )
            pf.load_state_dict(view, tensors, source=str(weights))
        for layer in layers:
            self.hooks.forward(layer.mlp, FusionHook(getattr(layer, ADAPTERS_CHILD), getattr(layer, FUSION_CHILD)))

    def owns(self, param_name: str) -> bool:
        return f".{FUSION_CHILD}." in param_name

    def expected_trainable(self, config: PretrainedConfig) -> int:
        c = config.get_text_config()
        d = c.hidden_size
        a = self.attention_dim or d
        return c.num_hidden_layers * (2 * (a * d + a) + (d * d if self.value else 0))

    def regularization(self, model: nn.Module) -> torch.Tensor | None:
        """AdapterHub's `weight · Σ_l ||I - W_V||²_F` (keeps the value projections near identity)."""
        if not self.regularization_weight or not self.value:
            return None
        values = [getattr(layer, FUSION_CHILD).value.weight for layer in decoder_layers(model)]
        eye = torch.eye(values[0].shape[0], device=values[0].device, dtype=values[0].dtype)
        return self.regularization_weight * sum((eye - v).pow(2).sum() for v in values)
