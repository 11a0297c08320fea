"""Mixture-of-experts layers with NF4 experts: Qwen3-MoE and Mixtral.

transformers 5 holds a MoE layer's experts as one module with two 3-D parameters, `gate_up_proj`
[E, 2F, D] and `down_proj` [E, D, F], which neither `nn.Linear` swapping nor bitsandbytes quantizes.
The checkpoints on the Hub (and what `save_pretrained` writes) keep one linear per expert:
`mlp.experts.<e>.{gate,up,down}_proj.weight` (Qwen3-MoE), `block_sparse_moe.experts.<e>.{w1,w3,w2}.weight`
(Mixtral). `swap_experts` replaces each experts module by `NF4Experts`, a list of per-expert
`ExpertMLP`s whose `gate_proj`/`up_proj`/`down_proj` are rank-0 `LoRALinear`s, so each expert
weight is quantized the moment its checkpoint tensor is read (bitsandbytes-compatible NF4, blocks
of 64 along the rows), runs through the same NF4 kernels as every other linear, and can carry a
LoRA adapter when asked: `lora.target_modules` must name `experts` (`qtrain.lora.is_target`);
`all-linear` means the attention (and any dense MLP) of a MoE, never the experts, which would
multiply the adapter by the number of experts. (PEFT 0.21's `all-linear` differs: on a transformers 5
MoE it wraps the 3-D expert parameters and the router too.) An adapter whose targets are attention
only is a plain PEFT adapter; one with experts records `experts` in its target_modules and its
per-expert tensors ('mlp.experts.3.up_proj.lora_A.weight') load in qtrain (generate, init_from,
merge), not in PEFT, which has no per-expert modules to put them on. The router (`mlp.gate`, a plain
weight, not an `nn.Linear`) stays in the compute dtype and frozen.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from qtrain.lora import LoRALinear

# transformers' expert modules whose forward is `down(act(gate(x)) * up(x))` weighted by the router
EXPERT_CLASSES = ("Qwen3MoeExperts", "MixtralExperts")
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
PROJECTION_OF = {"gate_up_proj": "gate_proj", "down_proj": "down_proj"}  # a fused tensor's first per-expert linear
_MIXTRAL_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_EXPERT_NAME = re.compile(r"(?:^|\.)experts\.\d+\.(?:gate_proj|up_proj|down_proj)$")


def is_expert(name: str) -> bool:
    """Whether module `name` is one expert's projection ('model.layers.0.mlp.experts.3.up_proj')."""
    return _EXPERT_NAME.search(name) is not None


class ExpertMLP(nn.Module):
    """One expert: down(act(gate(x)) * up(x)), each projection a frozen NF4 LoRALinear."""

    def __init__(self, hidden: int, intermediate: int, quantize_base: bool, backend: str):
        super().__init__()
        kw = {"rank": 0, "quantize_base": quantize_base, "backend": backend}
        self.gate_proj = LoRALinear(hidden, intermediate, **kw)
        self.up_proj = LoRALinear(hidden, intermediate, **kw)
        self.down_proj = LoRALinear(intermediate, hidden, **kw)


class NF4Experts(nn.Module):
    """Drop-in for transformers' `<Family>Experts`: same call (hidden [T, D], top_k_index [T, k],
    top_k_weights [T, k]) and the same sum over the chosen experts, one expert at a time (each
    expert's weights are dequantized only for the tokens routed to it). Expert e is the submodule
    named 'e', as in the checkpoints: 'mlp.experts.3.up_proj'."""

    def __init__(
        self, num_experts: int, hidden: int, intermediate: int, act_fn: nn.Module, quantize_base: bool, backend: str
    ):
        super().__init__()
        self.num_experts = num_experts
        for e in range(num_experts):
            self.add_module(str(e), ExpertMLP(hidden, intermediate, quantize_base, backend))
        self.act_fn = act_fn

    def expert(self, e: int) -> ExpertMLP:
        return self._modules[str(e)]

    def dense_weights(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """The experts dequantized into transformers 5's layout, gate_up [E, 2F, D] and down [E, D, F]:
        what a reference model (bitsandbytes leaves 3-D experts unquantized) must hold to equal ours."""
        experts = [self.expert(e) for e in range(self.num_experts)]
        gate_up = [torch.cat([x.gate_proj.base_weight(dtype), x.up_proj.base_weight(dtype)]) for x in experts]
        return torch.stack(gate_up), torch.stack([x.down_proj.base_weight(dtype) for x in experts])

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e in torch.unique(top_k_index).tolist():  # ascending, as transformers visits them
            if e >= self.num_experts:  # transformers' marker for a dropped token
                continue
            pos, token_idx = torch.where(top_k_index.T == e)
            expert, x = self.expert(e), hidden_states[token_idx]
            y = expert.down_proj(self.act_fn(expert.gate_proj(x)) * expert.up_proj(x))
            out.index_add_(0, token_idx, (y * top_k_weights[token_idx, pos, None]).to(out.dtype))
        return out


def active_intermediate(config) -> int:
    """The MLP width a token's activations span: top-k experts of `moe_intermediate_size` (Qwen3-MoE)
    or `intermediate_size` (Mixtral) for a MoE text config, `intermediate_size` for a dense one."""
    top_k = getattr(config, "num_experts_per_tok", None)
    if not top_k:
        return config.intermediate_size
    return top_k * (getattr(config, "moe_intermediate_size", None) or config.intermediate_size)


def swap_experts(model: nn.Module, quantize_base: bool = True, backend: str = "auto") -> list[str]:
    """Replace each transformers experts module (3-D weights) of the model instance by `NF4Experts`
    (weights unset: the loader quantizes them in). Returns the replaced modules' names."""
    swapped = []
    for name, module in list(model.named_modules()):
        if type(module).__name__ not in EXPERT_CLASSES:
            continue
        num_experts, two_f, hidden = module.gate_up_proj.shape
        new = NF4Experts(num_experts, hidden, two_f // 2, module.act_fn, quantize_base, backend)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
        swapped.append(name)
    return swapped


def module_key(key: str) -> str:
    """A checkpoint key under the name of the module holding it: Mixtral's
    'block_sparse_moe.experts.0.w1.weight' is 'mlp.experts.0.gate_proj.weight' (and its router
    'block_sparse_moe.gate.weight' is 'mlp.gate.weight'); other keys are returned as they are."""
    if ".block_sparse_moe." not in key:
        return key
    key = key.replace(".block_sparse_moe.", ".mlp.")
    m = re.search(r"\.experts\.\d+\.(w[123])\.(weight|bias)$", key)
    if m:
        key = key[: m.start(1)] + _MIXTRAL_NAMES[m.group(1)] + key[m.end(1) :]
    return key


def fused_expert_parts(key: str, value: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """A fused 3-D expert tensor (a checkpoint saved in transformers 5's own layout,
    '...experts.gate_up_proj' [E, 2F, D] or '...experts.down_proj' [E, D, F]) as per-expert weights
    [(module key, 2-D tensor)]; anything else: []."""
    prefix, _, attr = key.rpartition(".")
    if not prefix.endswith("experts") or attr not in ("gate_up_proj", "down_proj") or value.dim() != 3:
        return []
    if attr == "down_proj":
        return [(f"{prefix}.{e}.down_proj.weight", w) for e, w in enumerate(value)]
    gate, up = value.chunk(2, dim=1)
    return [
        (f"{prefix}.{e}.{p}.weight", w[e])
        for e in range(value.shape[0])
        for p, w in (("gate_proj", gate), ("up_proj", up))
    ]
