"""The LoRA linear with an optional NF4 base (QLoRA is a flag, as in torchtune), and the swap.

    y = x @ W^T + (alpha / r) * dropout(x) @ A^T @ B^T + bias        (LoRA, Hu et al. 2021)
    scale = alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023)

W is frozen: stored in NF4 (4-bit, bitsandbytes layout) when `quantize_base`, else as a frozen
16-bit parameter. A is Kaiming-uniform (a=sqrt(5), as nn.Linear and PEFT), B is zero, so the
adapter starts as the identity. `rank=0` gives a frozen NF4 linear with no adapter: QLoRA
quantizes every linear layer of the base, targeted or not.

DoRA (Liu et al. 2024, `use_dora`) splits the adapted weight into a trained magnitude and a direction:

    W' = m * (W + s B A) / ||W + s B A||_row          m [out], initialised to ||W||_row (W' = W)

as Hugging Face PEFT implements it: the row norm is detached from the graph (the paper's §4.3), and

    y = W x + bias + (m/n - 1) * (W dropout(x)) + (m/n) * s * B A dropout(x)        n = ||W + s B A||_row

which without dropout is `(m/n) * (W x + s B A x) + bias`, one fused NF4 + LoRA product scaled per
output. n is computed without the dequantized W: ||W||^2 is stored at load (W is frozen), and
||W + sBA||^2 = ||W||^2 + 2s rowsum(B * (W A^T)) + s^2 rowsum(B * (B A A^T)), where W A^T [out, r]
is one NF4 product of A's r rows.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from qtrain.kernels import BACKENDS
from qtrain.kernels.nf4_lora import lora_delta, nf4_lora
from qtrain.methods.lora import LoRASpec, PeftLoRASpec, is_lora_parameter, lora_scale  # the method's; re-exported
from qtrain.nf4 import NF4Tensor, dequantize_nf4, quantize_nf4

__all__ = ["LoRALinear", "LoRASpec", "PeftLoRASpec", "add_adapters", "is_lora_parameter", "is_target", "lora_scale", "swap_linears"]


_NF4_FP32_BUFFERS = ("nf4_code", "nf4_absmax_scale", "nf4_absmax_code")
_FP32_BUFFERS = (*_NF4_FP32_BUFFERS, "dora_weight_sqnorm")  # kept in fp32 by .to(dtype)/.half()


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
        use_dora: bool = False,
    ):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend {backend!r} is not one of {BACKENDS}")
        self.in_features, self.out_features = in_features, out_features
        self.quantize_base, self.backend = quantize_base, backend
        self.weight: nn.Parameter | None = None  # the frozen base when not quantized
        self._nf4_meta: dict = {}
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None
        self.rank, self.alpha, self.dropout, self.use_rslora, self.scale = 0, alpha, dropout, use_rslora, 0.0
        self.lora_a = self.lora_b = None
        self.use_dora = False
        if rank:
            self.add_adapter(rank, alpha, dropout, use_rslora, use_dora, adapter_dtype, device)

    def add_adapter(
        self,
        rank: int,
        alpha: float = 1.0,
        dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        """Give this (rank-0) linear a LoRA adapter: A [rank, in] Kaiming-uniform, B [out, rank] zero,
        DoRA's magnitude ||W||_row when `use_dora` (from the base, once it is loaded).

        A and B are made on `device` (None: the default device, CPU unless a `torch.device` context
        says otherwise) and then moved to where the base weight lives: the random numbers of A are
        those of the CPU generator, in the order the adapters are added, wherever the model runs."""
        if self.rank:
            raise ValueError(f"this LoRALinear already has an adapter of rank {self.rank}")
        self.rank, self.alpha, self.dropout, self.use_rslora = rank, alpha, dropout, use_rslora
        self.scale = lora_scale(alpha, rank, use_rslora)
        self.lora_a = nn.Linear(self.in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_b = nn.Linear(rank, self.out_features, bias=False, device=device, dtype=dtype)
        self.reset_lora_parameters()
        base = self._base_device()
        if base is not None:  # the base is loaded: the adapter joins it
            self.lora_a.to(base)
            self.lora_b.to(base)
        self.use_dora = bool(use_dora)
        if self.use_dora:
            # DoRA's magnitude m [out], fp32 whatever the adapter dtype (it moves by small steps around
            # ||W||), set to ||W||_row from the base (now, or when it is set). ||W||^2 [out]: a fp32 buffer, not saved.
            self.lora_magnitude = nn.Parameter(torch.ones(self.out_features, device=base or device, dtype=torch.float32))
            self.register_buffer("dora_weight_sqnorm", None, persistent=False)
            if base is not None:
                self._init_dora()

    def _base_device(self) -> torch.device | None:
        """Where the loaded base weight lives; None before it is set."""
        if self.has_nf4:
            return self.nf4_packed.device
        return self.weight.device if self.weight is not None else None

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
            self._init_dora()

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
        self._init_dora()

    def _init_dora(self) -> None:
        """DoRA: store ||W||_row^2 (fp32, on the weight's device) and set the magnitude m = ||W||_row.

        The row norms are those of the base in fp32 (NF4 dequantized to fp32), the W that the norm's
        cross term W A^T sees. With B = 0 the forward's n is computed from the same numbers, so m / n
        is exactly 1 at init."""
        if not self.use_dora:
            return
        with torch.no_grad():
            if self.quantize_base:
                w = dequantize_nf4(self.nf4_weight, torch.float32)  # transient, once per layer at load
                norm = torch.linalg.vector_norm(w, dim=1)
                del w
            else:
                norm = torch.linalg.vector_norm(self.weight, dim=1, dtype=torch.float32)
            sqnorm = norm.square()
            self.register_buffer("dora_weight_sqnorm", sqnorm, persistent=False)
            if self.lora_magnitude.device.type == "meta":  # built on meta (no memory): materialize it here
                self.lora_magnitude = nn.Parameter(sqnorm.sqrt(), requires_grad=self.lora_magnitude.requires_grad)
            else:
                self.lora_magnitude.copy_(sqnorm.sqrt())

    def _apply(self, fn, recurse=True):
        """`.to(dtype)`/`.half()` must not touch the NF4 quantization state (kept in fp32, as
        bitsandbytes does); device moves do apply to it."""
        kept = {n: b for n, b in self._buffers.items() if n in _FP32_BUFFERS and b is not None}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            self._buffers[name] = old.to(self._buffers[name].device)
        return self

    def set_bias(self, bias: torch.Tensor) -> None:
        if tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias of shape {tuple(bias.shape)}, expected {(self.out_features,)}")
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)

    # ---- the NF4 base's format: read through these, never through `_nf4_meta` ----

    @property
    def has_nf4(self) -> bool:
        """Whether an NF4 base weight is loaded (not when the base is 16-bit, nor before it is set:
        a layer built on meta, or `quantize_base` waiting for `set_base_weight`)."""
        return bool(self._nf4_meta)

    def _nf4_fact(self, key: str):
        if not self._nf4_meta:
            raise RuntimeError("this LoRALinear has no NF4 weight loaded")
        return self._nf4_meta[key]

    @property
    def nf4_shape(self) -> torch.Size:
        """The dequantized weight's shape [out, in]."""
        return self._nf4_fact("shape")

    @property
    def nf4_dtype(self) -> torch.dtype:
        """The dtype the weight was quantized from (and dequantizes to by default)."""
        return self._nf4_fact("dtype")

    @property
    def nf4_blocksize(self) -> int:
        """Weights per absmax (64, as bitsandbytes)."""
        return self._nf4_fact("blocksize")

    @property
    def nf4_absmax_offset(self) -> float:
        """The mean subtracted from the absmaxes before their 8-bit quantization (double quant)."""
        return self._nf4_fact("absmax_offset")

    @property
    def nf4_absmax_blocksize(self) -> int:
        """Absmaxes per 8-bit scale of the double quantization (256, as bitsandbytes)."""
        return self._nf4_fact("absmax_blocksize")

    @property
    def nf4_weight(self) -> NF4Tensor:
        if not self._nf4_meta:
            raise RuntimeError("this LoRALinear has no NF4 weight loaded")
        return NF4Tensor(  # flat views: FSDP holds the codes and absmax as rows (`hold_nf4_in_rows`)
            packed=self.nf4_packed.reshape(-1),
            absmax=self.nf4_absmax.reshape(-1),
            code=self.nf4_code,
            absmax_scale=self.nf4_absmax_scale,
            absmax_code=self.nf4_absmax_code,
            **self._nf4_meta,
        )

    @property
    def nf4_in_rows(self) -> bool:
        """Whether the NF4 codes are held as row parameters, to be sharded (`hold_nf4_in_rows`)."""
        return "nf4_packed" in self._parameters

    def hold_nf4_in_rows(self) -> None:
        """Hold the 4-bit codes [out, in/2] and the block absmax [out, in/blocksize] as frozen parameters
        with one row per output feature, so that FSDP2, which shards parameters (never buffers) along
        dim 0, cuts both at the same rows: a shard is whole rows, hence whole quantization blocks with
        their own absmaxes (`qtrain.fsdp`). The bytes are the same (a view); `nf4_weight` flattens them
        back. The double quantization's scales and code stay buffers (replicated: 4 bytes per 16,384
        weights): one 8-bit scale block spans rows, and its offset is one number per weight."""
        out, k = self.nf4_shape
        if k % self.nf4_blocksize:
            raise ValueError(
                f"in_features={k} is not a multiple of the NF4 block size {self.nf4_blocksize}: blocks straddle rows, "
                "so this layer's codes cannot be sharded by rows"
            )
        rows = {"packed": self.nf4_packed.view(out, k // 2), "absmax": self.nf4_absmax.view(out, k // self.nf4_blocksize)}
        for name, value in rows.items():
            del self._buffers[f"nf4_{name}"]
            self.register_parameter(f"nf4_{name}", nn.Parameter(value, requires_grad=False))

    def base_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The base weight in 16/32-bit (dequantized when stored in NF4)."""
        if self.quantize_base:
            return dequantize_nf4(self.nf4_weight, dtype)
        return self.weight.data.to(dtype or self.weight.dtype)

    def merged_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W + scale * B @ A (DoRA: m * (W + sBA) / ||W + sBA||_row), computed in fp32 and cast to
        `dtype` (default: the base dtype)."""
        w = self.base_weight(torch.float32)
        if self.rank:
            w = w + self.scale * (self.lora_b.weight.float() @ self.lora_a.weight.float())
        if self.use_dora:
            w = (self.lora_magnitude.detach().float() / torch.linalg.vector_norm(w, dim=1))[:, None] * w
        out_dtype = dtype or (self.nf4_dtype if self.quantize_base else self.weight.dtype)
        return w.to(out_dtype)

    # ---- forward ----

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_dora:
            return self._dora_forward(x)
        lora_a = self.lora_a.weight if self.rank else None
        lora_b = self.lora_b.weight if self.rank else None
        if not self.quantize_base:
            bias = self.bias.to(x.dtype) if self.bias is not None else None
            y = nn.functional.linear(x, self.weight.to(x.dtype), bias)
            return y + lora_delta(x, lora_a, lora_b, self.scale, self.dropout, self.training) if self.rank else y
        return nf4_lora(
            x, self.nf4_weight, lora_a, lora_b, self.scale, self.bias, self.dropout, self.training, self.backend
        )

    # ---- DoRA ----

    def dora_weight_norm(self) -> torch.Tensor:
        """n = ||W + s B A||_row [out], fp32, detached (DoRA §4.3: the norm is a constant to autograd).

        ||W||^2 + 2s rowsum(B * (W A^T)) + s^2 rowsum(B * (B (A A^T))): one NF4 product of the r rows
        of A (W A^T [out, r]) and rank-sized products; W is never materialized on the fused backend."""
        if self.dora_weight_sqnorm is None:
            raise RuntimeError("this DoRA LoRALinear has no base weight loaded")
        a, b = self.lora_a.weight, self.lora_b.weight
        with torch.no_grad(), torch.autocast(a.device.type, enabled=False):
            a, b = a.detach().float(), b.detach().float()
            if self.quantize_base:
                aw = nf4_lora(a, self.nf4_weight, None, None, 0.0, backend=self.backend)  # A W^T [r, out]
            else:
                aw = nn.functional.linear(a, self.weight.float())  # [r, out]
            cross = (b * aw.T).sum(1)  # rowsum(B * W A^T)
            quad = ((b @ (a @ a.T)) * b).sum(1)  # ||B A||_row^2
            sq = self.dora_weight_sqnorm + (2 * self.scale) * cross + (self.scale * self.scale) * quad
            return sq.clamp_min(0).sqrt()  # rounding can take an (almost) zero row slightly negative

    def _base_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """X @ W^T, no bias, in compute_dtype(x) (the autocast dtype under autocast, else X's dtype)."""
        if self.quantize_base:
            return nf4_lora(x, self.nf4_weight, None, None, 0.0, backend=self.backend)
        return nn.functional.linear(x, self.weight.to(x.dtype))

    def _dora_forward(self, x: torch.Tensor) -> torch.Tensor:
        """PEFT's DoRA forward (peft/tuners/lora/dora.py), combined in fp32 and cast to X's dtype once."""
        lora_a, lora_b = self.lora_a.weight, self.lora_b.weight
        g = self.lora_magnitude / self.dora_weight_norm()  # m / n [out]; gradient to m only
        if self.dropout > 0 and self.training:
            # y = W x + bias + (g - 1) * W h + g * s * B A h with h = dropout(x): two base products, as PEFT
            h = nn.functional.dropout(x, p=self.dropout, training=True)
            device = x.device.type
            autocast = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
            hl = h if autocast else h.to(lora_a.dtype)  # as lora_delta: the adapter's dtype unless autocast
            lora = nn.functional.linear(nn.functional.linear(hl, lora_a), lora_b)
            y = self._base_matmul(x) + (g - 1) * self._base_matmul(h) + (g * self.scale) * lora
        else:
            # y = g * (W x + s B A x) + bias: the fused NF4 + LoRA product, scaled per output
            if self.quantize_base:
                z = nf4_lora(x, self.nf4_weight, lora_a, lora_b, self.scale, None, 0.0, False, self.backend)
            else:
                z = nn.functional.linear(x, self.weight.to(x.dtype))
                z = z + lora_delta(x, lora_a, lora_b, self.scale, 0.0, False)
            y = g * z
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        base = "nf4" if self.quantize_base else "frozen"
        dora = ", dora" if self.use_dora else ""
        return (
            f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scale={self.scale:g}, base={base}{dora}"
        )


EXPERTS = "experts"  # in a target_modules list: every MoE expert's gate/up/down projection too


def is_target(name: str, spec: LoRASpec) -> bool:
    """Whether module `name` gets an adapter, by PEFT's rule (peft.tuners.tuners_utils.
    check_target_module_exists): never an excluded one; a string target_modules is a full-match
    regex; a list takes a name equal to an entry, or one ending in '.<entry>' that is in
    layers_to_transform (when given). A MoE expert's projection ('mlp.experts.3.up_proj', `qtrain.moe`)
    is a target only of a list holding "experts" (or of a regex matching it): 'all-linear' and
    'up_proj' leave the experts alone, as PEFT's do on a transformers 5 MoE, whose experts are 3-D
    parameters, no linears."""
    if _matches(name, spec.exclude_modules):
        return False
    targets = spec.target_modules
    if isinstance(targets, str) and targets != "all-linear":
        return re.fullmatch(targets, name) is not None
    from qtrain.moe import is_expert  # (qtrain.moe builds on this module)

    if is_expert(name):  # a MoE expert's projection: only when the list names "experts" (not all-linear)
        return targets != "all-linear" and EXPERTS in targets and _in_layers(
            name, getattr(spec, "layers_to_transform", None), getattr(spec, "layers_pattern", None)
        )
    if targets != "all-linear" and name in targets:
        return True
    found = targets == "all-linear" or any(name.endswith("." + t) for t in targets)
    return found and _in_layers(name, getattr(spec, "layers_to_transform", None), getattr(spec, "layers_pattern", None))


def _matches(name: str, patterns: list[str] | str) -> bool:
    """A full-match regex (a string), or names matched exactly or as a '.<suffix>' (a list)."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def _in_layers(name: str, layers: list[int] | int | None, patterns: list[str] | str | None) -> bool:
    if layers is None or layers == []:
        return True
    index = layer_index(name, patterns)
    return index is not None and index in ([layers] if isinstance(layers, int) else layers)


def layer_index(name: str, patterns: list[str] | str | None = None) -> int | None:
    """The layer number in a module name as PEFT reads it: the first '<pattern>.<n>.' (any
    pattern when none is given), e.g. 0 in 'model.layers.0.self_attn.q_proj'."""
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(\d+)\.", name)
    else:
        names = [patterns] if isinstance(patterns, str) else patterns
        tries = (re.match(rf"(?:^|.*?\.){p}\.(\d+)\.", name) for p in names)
        match = next((m for m in tries if m), None)
    return int(match.group(1)) if match else None


def swap_linears(
    model: nn.Module,
    spec: LoRASpec,
    quantize_base: bool = True,
    backend: str = "auto",
    adapter_dtype: torch.dtype = torch.float32,
    skip: tuple[str, ...] = ("lm_head",),
) -> list[str]:
    """Replace every nn.Linear of the model instance (except `skip`) by a LoRALinear, then give the
    targets of `spec` an adapter of rank `spec.rank` (`add_adapters`). Returns the adapted names."""
    swap_base_linears(model, quantize_base, backend, skip)
    return add_adapters(model, spec, adapter_dtype)


def swap_base_linears(
    model: nn.Module, quantize_base: bool = True, backend: str = "auto", skip: tuple[str, ...] = ("lm_head",)
) -> None:
    """Replace every nn.Linear of the model instance (except `skip`) by a rank-0 LoRALinear: the
    frozen (NF4) base that every PEFT method, LoRA included, is applied to."""

    def visit(module: nn.Module, prefix: str) -> None:
        for child_name, child in module.named_children():
            name = f"{prefix}{child_name}"
            if isinstance(child, nn.Linear) and not any(name == s or name.endswith("." + s) for s in skip):
                device = None if child.weight.device.type == "meta" else child.weight.device
                new = LoRALinear.from_linear(child, rank=0, quantize_base=quantize_base, backend=backend, device=device)
                setattr(module, child_name, new)
            else:
                visit(child, name + ".")

    visit(model, "")


def add_adapters(model: nn.Module, spec: LoRASpec, adapter_dtype: torch.dtype = torch.float32) -> list[str]:
    """Give the model's LoRALinear layers that `spec` targets (`is_target`) an adapter, in module order
    (the order A's random numbers are drawn in). Returns their names; none matched is an error."""
    if not spec.rank:
        return []
    targets = [name for name, m in model.named_modules() if isinstance(m, LoRALinear) and is_target(name, spec)]
    for name in targets:
        layer = model.get_submodule(name)
        if spec.rank > min(layer.in_features, layer.out_features):
            raise ValueError(
                f"lora.rank={spec.rank} is larger than {name} ({layer.in_features} -> {layer.out_features}) "
                f"can use: a LoRA update has rank at most min(in, out) = {min(layer.in_features, layer.out_features)}; "
                "choose a smaller lora.rank"
            )
    for name in targets:
        layer = model.get_submodule(name)
        layer.add_adapter(spec.rank, spec.alpha, spec.dropout, spec.use_rslora, spec.use_dora, adapter_dtype)
    if not targets:
        raise ValueError(f"target_modules={spec.target_modules!r} matched no linear layer of the model")
    return targets


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear) and m.rank}
