"""The `kernels:` config section (`FusedOps`) and the names of the fused projection groups.

Only dataclasses and constants: the config loader imports this module, and loading a YAML config
must not import transformers' modeling code (the fused modules in `attention`, `architectures`...
do). See `qtrain.fused` for what each op swaps in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

ENABLED = ("auto", "on", "off")
OPS = ("rms_norm", "rope", "swiglu", "qkv", "gate_up", "varlen")  # model changes (cross_entropy: the loss's)
QKV = ("q_proj", "k_proj", "v_proj")
GATE_UP = ("gate_proj", "up_proj")


@dataclass
class FusedOps:
    """Which fused ops replace the stock modules, and whether packed batches take the padding-free
    attention path (config section `kernels`)."""

    # auto: CUDA models only; YAML reads on/off (and true/false) as booleans: True is "on", False "off"
    enabled: Literal["auto", "on", "off"] | bool = "auto"
    rms_norm: bool = True  # the decoder's RMSNorms -> Triton RMSNorm
    rope: bool = True  # RoPE on q and k in place, one launch
    swiglu: bool = True  # silu(gate) * up in one kernel
    qkv: bool = True  # q/k/v projections (NF4 + LoRA) as one product over X
    gate_up: bool = True  # gate/up projections (NF4 + LoRA) as one product over X
    varlen: bool = True  # packed batches: variable-length attention per example, no [B, 1, S, S] mask (sdpa)
    cross_entropy: bool = True  # the chunked lm_head loss's softmax/CE/gradient in one in-place Triton kernel

    def __post_init__(self) -> None:
        if isinstance(self.enabled, bool):
            self.enabled = "on" if self.enabled else "off"
        if self.enabled not in ENABLED:
            raise ValueError(f"kernels.enabled: {self.enabled!r} is not one of {', '.join(ENABLED)}")
        for name in (*OPS, "cross_entropy"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"kernels.{name}: expected true or false, got {value!r}")  # noqa: TRY004

    def any_on(self) -> bool:
        return any(getattr(self, name) for name in OPS)

    def on_for(self, device_type: str) -> bool:
        """Whether the fused ops run on a `device_type` ("cuda", "cpu") model: "on", or "auto" on CUDA."""
        return self.enabled == "on" or (self.enabled == "auto" and device_type == "cuda")

    def loss_backend(self, device: torch.device) -> str:
        """`qtrain.kernels.linear_cross_entropy`'s backend: "auto" (Triton on CUDA after its self-check)
        when the fused ops are on for `device` and cross_entropy is, else "torch"."""
        return "auto" if self.on_for(device.type) and self.cross_entropy else "torch"
