"""BitFit (Ben Zaken, Ravfogel & Goldberg, 2022): fine-tune only the bias terms.

    y = W x + b,   W frozen, b trained

Llama and Mistral have no biases at all (linear layers nor RMSNorm), so BitFit adds a zero bias to
every target linear layer: the model is unchanged at step 0, and the trained model is the base
plus one vector per layer. Biases the checkpoint has (Qwen2's q/k/v) are trained from their values.
Trained biases are fp32 (as adapters are); lm_head is never a target.

Trainable parameters: the output sizes of the target linears, summed over layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from qtrain.methods.base import PeftMethod, base_linears, matches, projection_shapes

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from qtrain.lora import LoRALinear


@dataclass
class BitFit(PeftMethod):
    name: ClassVar[str] = "bitfit"
    target_modules: list[str] | str = "all-linear"  # 'all-linear' or module names (suffix match)

    def _targets(self, model: nn.Module) -> dict[str, LoRALinear]:
        return {
            n: m
            for n, m in base_linears(model).items()
            if self.target_modules == "all-linear" or matches(n, self.target_modules)
        }

    def apply(self, model: nn.Module) -> None:
        targets = self._targets(model)
        if not targets:
            raise ValueError(f"bitfit.target_modules={self.target_modules!r} matched no linear layer of the model")
        for m in targets.values():
            device = m.lora_a.weight.device if m.rank else next(iter(m.buffers()), torch.empty(0)).device
            bias = torch.zeros(m.out_features, device=device) if m.bias is None else m.bias.detach().float()
            m.bias = nn.Parameter(bias)  # our own module: its bias is a plain attribute

    def owns(self, param_name: str) -> bool:
        module, _, attr = param_name.rpartition(".")
        if attr != "bias" or module.endswith("lm_head"):
            return False
        return self.target_modules == "all-linear" or matches(module, self.target_modules)

    def expected_trainable(self, config: PretrainedConfig) -> int:
        c = config.get_text_config()
        chosen = {name: out for name, (_, out) in projection_shapes(config, self.target_modules).items()}
        return c.num_hidden_layers * sum(chosen.values())
