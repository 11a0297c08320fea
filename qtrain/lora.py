"""The LoRA linear with an optional NF4 base (QLoRA is a flag, as in torchtune), and the swap.

    y = x @ W^T + (alpha / r) * dropout(x) @ A^T @ B^T + bias        (LoRA, Hu et al. 2021)
    scale = alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023)

W is frozen: stored in NF4 (4-bit, bitsandbytes layout) when `quantize_base`, else as a frozen
16-bit parameter. A is Kaiming-uniform (a=sqrt(5), as nn.Linear and PEFT), B is zero, so the
adapter starts as the identity. `rank=0` gives a frozen NF4 linear with no adapter: QLoRA
quantizes every linear layer of the base, targeted or not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from qtrain.kernels import BACKENDS
from qtrain.kernels.nf4_lora import lora_delta, nf4_lora
from qtrain.nf4 import NF4Tensor, dequantize_nf4, quantize_nf4


def lora_scale(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """alpha / r (LoRA), or alpha / sqrt(r) (rsLoRA)."""
    return alpha / (math.sqrt(rank) if use_rslora else rank)


@dataclass
class LoRASpec:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    use_rslora: bool = False
    target_modules: list[str] | str = "all-linear"  # 'all-linear' or module names (suffix match)
    exclude_modules: list[str] = field(default_factory=lambda: ["lm_head"])

    def scale(self) -> float:
        return lora_scale(self.alpha, self.rank, self.use_rslora)


_NF4_FP32_BUFFERS = ("nf4_code", "nf4_absmax_scale", "nf4_absmax_code")


class LoRALinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float = 1.0,
        dropout: float = 0.0,
        bias: bool = False,
        use_rslora: bool = False,
        quantize_base: bool = True,
        backend: str = "auto",
        adapter_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend {backend!r} is not one of {BACKENDS}")
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.alpha, self.dropout = rank, alpha, dropout
        self.use_rslora, self.quantize_base, self.backend = use_rslora, quantize_base, backend
        self.scale = lora_scale(alpha, rank, use_rslora) if rank else 0.0
        self.weight: nn.Parameter | None = None  # the frozen base when not quantized
        self._nf4_meta: dict = {}
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None
        if rank:
            self.lora_a = nn.Linear(in_features, rank, bias=False, device=device, dtype=adapter_dtype)
            self.lora_b = nn.Linear(rank, out_features, bias=False, device=device, dtype=adapter_dtype)
            self.reset_lora_parameters()
        else:
            self.lora_a = self.lora_b = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> LoRALinear:
        """A LoRALinear in place of `linear`; its weight is taken over unless it is on meta."""
        module = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, **kwargs)
        if linear.weight.device.type != "meta":
            module.set_base_weight(linear.weight.data)
            if linear.bias is not None:
                module.set_bias(linear.bias.data)
        return module

    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)

    # ---- the frozen base ----

    def set_base_weight(self, weight: torch.Tensor, device: torch.device | str | None = None) -> None:
        """Take a 16-bit weight [out, in]; quantize it (on `device`) when `quantize_base`."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight of shape {tuple(weight.shape)}, expected {(self.out_features, self.in_features)}")
        weight = weight.to(device) if device is not None else weight
        if self.quantize_base:
            self.set_nf4_weight(quantize_nf4(weight))
        else:
            self.weight = nn.Parameter(weight, requires_grad=False)

    def set_nf4_weight(self, nf4: NF4Tensor) -> None:
        if tuple(nf4.shape) != (self.out_features, self.in_features):
            raise ValueError(f"NF4 weight of shape {tuple(nf4.shape)}, expected {(self.out_features, self.in_features)}")
        self.quantize_base = True
        self.weight = None
        # Buffers, so that .to()/.cuda() move them; not persistent: adapters are saved, bases are not.
        for name in ("packed", "absmax", "code", "absmax_scale", "absmax_code"):
            self.register_buffer(f"nf4_{name}", getattr(nf4, name), persistent=False)
        self._nf4_meta = dict(
            shape=nf4.shape,
            dtype=nf4.dtype,
            blocksize=nf4.blocksize,
            absmax_offset=nf4.absmax_offset,
            absmax_blocksize=nf4.absmax_blocksize,
        )

    def _apply(self, fn, recurse=True):
        """`.to(dtype)`/`.half()` must not touch the NF4 quantization state (kept in fp32, as
        bitsandbytes does); device moves do apply to it."""
        kept = {n: b for n, b in self._buffers.items() if n in _NF4_FP32_BUFFERS and b is not None}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            self._buffers[name] = old.to(self._buffers[name].device)
        return self

    def set_bias(self, bias: torch.Tensor) -> None:
        if tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias of shape {tuple(bias.shape)}, expected {(self.out_features,)}")
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)

    @property
    def nf4_weight(self) -> NF4Tensor:
        if not self._nf4_meta:
            raise RuntimeError("this LoRALinear has no NF4 weight loaded")
        return NF4Tensor(
            packed=self.nf4_packed,
            absmax=self.nf4_absmax,
            code=self.nf4_code,
            absmax_scale=self.nf4_absmax_scale,
            absmax_code=self.nf4_absmax_code,
            **self._nf4_meta,
        )

    def base_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The base weight in 16/32-bit (dequantized when stored in NF4)."""
        if self.quantize_base:
            return dequantize_nf4(self.nf4_weight, dtype)
        return self.weight.data.to(dtype or self.weight.dtype)

    def merged_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W + scale * B @ A, computed in fp32 and cast to `dtype` (default: the base dtype)."""
        w = self.base_weight(torch.float32)
        if self.rank:
            w = w + self.scale * (self.lora_b.weight.float() @ self.lora_a.weight.float())
        out_dtype = dtype or (self._nf4_meta["dtype"] if self.quantize_base else self.weight.dtype)
        return w.to(out_dtype)

    # ---- forward ----

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lora_a = self.lora_a.weight if self.rank else None
        lora_b = self.lora_b.weight if self.rank else None
        if not self.quantize_base:
            bias = self.bias.to(x.dtype) if self.bias is not None else None
            y = nn.functional.linear(x, self.weight.to(x.dtype), bias)
            return y + lora_delta(x, lora_a, lora_b, self.scale, self.dropout, self.training) if self.rank else y
        return nf4_lora(
            x, self.nf4_weight, lora_a, lora_b, self.scale, self.bias, self.dropout, self.training, self.backend
        )

    def extra_repr(self) -> str:
        base = "nf4" if self.quantize_base else "frozen"
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scale={self.scale:g}, base={base}"


def is_target(name: str, spec: LoRASpec) -> bool:
    """Whether module `name` gets an adapter: a suffix match against `target_modules`."""
    if any(name == ex or name.endswith("." + ex) for ex in spec.exclude_modules):
        return False
    if spec.target_modules == "all-linear":
        return True
    return any(name == t or name.endswith("." + t) for t in spec.target_modules)


def swap_linears(
    model: nn.Module,
    spec: LoRASpec,
    quantize_base: bool = True,
    backend: str = "auto",
    adapter_dtype: torch.dtype = torch.float32,
    skip: tuple[str, ...] = ("lm_head",),
) -> list[str]:
    """Replace every nn.Linear of the model instance (except `skip`) by a LoRALinear.

    Targets get rank `spec.rank`, the others rank 0 (a frozen, still quantized, linear).
    Returns the names of the modules that got adapters.
    """
    targets: list[str] = []

    def visit(module: nn.Module, prefix: str) -> None:
        for child_name, child in module.named_children():
            name = f"{prefix}{child_name}"
            if isinstance(child, nn.Linear) and not any(name == s or name.endswith("." + s) for s in skip):
                wanted = is_target(name, spec)
                new = LoRALinear.from_linear(
                    child,
                    rank=spec.rank if wanted else 0,
                    alpha=spec.alpha,
                    dropout=spec.dropout,
                    use_rslora=spec.use_rslora,
                    quantize_base=quantize_base,
                    backend=backend,
                    adapter_dtype=adapter_dtype,
                    device=None if child.weight.device.type == "meta" else child.weight.device,
                )
                setattr(module, child_name, new)
                if wanted and spec.rank:
                    targets.append(name)
            else:
                visit(child, name + ".")

    visit(model, "")
    if spec.rank and not targets:
        raise ValueError(f"target_modules={spec.target_modules!r} matched no linear layer of the model")
    return targets


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear) and m.rank}


def mark_only_lora_trainable(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        p.requires_grad = ".lora_a." in name or ".lora_b." in name
