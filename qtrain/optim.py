"""Optimizer and learning-rate schedule: AdamW (paged, 32- or 8-bit, from bitsandbytes on CUDA),
LoRA+ learning rates (which parameters take them: the methods say, `PeftMethod.lr_scaled`),
warmup + cosine/linear/constant."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from qtrain.methods import PeftMethod

OPTIMIZERS = ("adamw", "paged_adamw_32bit", "paged_adamw_8bit")


def resolve_optimizer(name: str, device: torch.device) -> str:
    """`auto` → paged_adamw_32bit on CUDA (state pages to CPU RAM under memory pressure), adamw on CPU."""
    if name == "auto":
        return "paged_adamw_32bit" if device.type == "cuda" else "adamw"
    if name.startswith("paged") and device.type != "cuda":
        raise ValueError(f"train.optimizer: {name} needs a CUDA GPU (running on {device.type}); use adamw or auto")
    return name


def param_groups(
    model: nn.Module, lr: float, weight_decay: float, lora_plus_ratio: float = 1.0, methods: Sequence[PeftMethod] = ()
) -> list[dict]:
    """The trainable parameters; with LoRA+ (ratio != 1) those a method scales (`lr_scaled`: LoRA's
    B matrices) get lr * ratio (Hayou et al. 2024: B learns best with a larger step than A)."""
    plain, scaled = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (scaled if any(m.lr_scaled(name) for m in methods) else plain).append(p)
    if lora_plus_ratio == 1.0:
        return [{"params": plain + scaled, "lr": lr, "weight_decay": weight_decay}]
    groups = [{"params": plain, "lr": lr, "weight_decay": weight_decay}]
    return groups + [{"params": scaled, "lr": lr * lora_plus_ratio, "weight_decay": weight_decay}]


def build_optimizer(name: str, groups: list[dict]) -> torch.optim.Optimizer:
    """`name` from OPTIMIZERS (already resolved). Only the adapter parameters are in `groups`, so
    only they carry Adam state."""
    groups = [g for g in groups if g["params"]]
    if name == "adamw":
        return torch.optim.AdamW(groups)
    import bitsandbytes as bnb  # CUDA only: imported when a paged optimizer is asked for

    return {"paged_adamw_32bit": bnb.optim.PagedAdamW32bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}[name](groups)


def lr_lambda(warmup: int, total: int, schedule: str):
    """Multiplier of the base lr at `step`: linear warmup, then cosine / linear decay to 0, or constant."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0

    return f
