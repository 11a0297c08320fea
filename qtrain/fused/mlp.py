"""`FusedMLP`: down_proj(silu(gate_proj(x)) * up_proj(x)) with the SAME gate/up/down_proj children.

Op `gate_up` computes gate and up as one NF4 + LoRA product (`qtrain.fused.projection`); op `swiglu`
runs `qtrain.kernels.swiglu.swiglu` on the two column halves (no copy) when the activation is SiLU
and un-hooked; then down_proj.
"""

from __future__ import annotations

import torch
from torch import nn

from qtrain.fused.adopt import adopt
from qtrain.fused.ops import GATE_UP, FusedOps
from qtrain.fused.projection import FusedGroups, fusable, has_hooks
from qtrain.kernels.swiglu import swiglu

SILU = ("silu", "swish")


class FusedMLP(FusedGroups, nn.Module):
    """down_proj(silu(gate_proj(x)) * up_proj(x)) with gate/up as one product and SwiGLU in one kernel."""

    @classmethod
    def from_stock(cls, mlp: nn.Module, ops: FusedOps) -> tuple[FusedMLP, dict[str, str]]:
        """(the swapped module, {op: why it is off}) for the stock MLP `mlp`."""
        new = adopt(mlp, cls)
        skipped = {}
        new._groups = {}
        new.fuse_gate_up = ops.gate_up
        if ops.gate_up:
            reason = fusable([getattr(new, n) for n in GATE_UP])
            if reason is None:
                new._groups = {"gate_up": GATE_UP}
                new._fuse_group("gate_up")
            else:
                new.fuse_gate_up = False
                skipped["gate_up"] = reason
        act = getattr(getattr(new, "config", None), "hidden_act", None)
        new.fuse_swiglu = ops.swiglu and act in SILU
        if ops.swiglu and act not in SILU:
            skipped["swiglu"] = f"hidden_act {act!r} is not silu"
        return new, skipped

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self._project("gate_up", x)
        gate, up = gate_up if gate_up is not None else (self.gate_proj(x), self.up_proj(x))
        if self.fuse_swiglu and not has_hooks(self.act_fn):
            h = swiglu(gate, up)  # [..., I]
        else:
            h = self.act_fn(gate) * up
        return self.down_proj(h)

    def extra_repr(self) -> str:
        return f"fused: gate_up={self.fuse_gate_up}, swiglu={self.fuse_swiglu}"
