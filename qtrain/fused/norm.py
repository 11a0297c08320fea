"""`FusedRMSNorm`: the decoder's RMSNorms (input_layernorm, post_attention_layernorm, the final norm)
through `qtrain.kernels.rms_norm.rms_norm` (op `rms_norm`), with the SAME `weight` Parameter."""

from __future__ import annotations

import torch
from torch import nn

from qtrain.fused.adopt import adopt
from qtrain.kernels.rms_norm import rms_norm


class FusedRMSNorm(nn.Module):
    """LlamaRMSNorm (Mistral's, Qwen2's: the same) through `qtrain.kernels.rms_norm.rms_norm`; holds
    the stock module's `weight` Parameter and `variance_epsilon`."""

    weight: nn.Parameter
    variance_epsilon: float

    @classmethod
    def from_stock(cls, norm: nn.Module) -> FusedRMSNorm:
        return adopt(norm, cls)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden_states, self.weight, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, fused"
