"""NF4 linear + LoRA for large M (training): dequantize W once into a reusable buffer, then cuBLAS.

Why not the fused kernel here: dequantizing inside the GEMM main loop redoes the dequantization
M / BLOCK_M times and (compiled for sm_90) leaves no overlap between dequant and MMA; dequantizing
W once into a 16-bit buffer costs a few percent of one cuBLAS GEMM at M >= 4096. So at training
sizes: `W16 = dequant(W)` (one memory-bound kernel, `nf4_dequant.nf4_dequantize_triton`) into ONE
buffer per (device, dtype) sized to the largest weight seen, then `Y = X @ W16^T` by cuBLAS, the
LoRA term folded in with 16-bit operands (`XA = H @ A^T` [M, r], `Y.addmm_(XA, B^T, alpha=s)`), no
fp32 [M, N] pass and no fp32 copy of X or dY. Backward dequantizes into the same buffer again for
`dX = dY @ W16 (+ s * (dY @ B) @ A)`.

Anatomy: `nf4_lora_reference` (nf4_lora.py, the ground truth) -> the buffer (`weight_buffer`,
`release_buffers`, `buffer_numels`) -> `dequantize_into` -> `lora_forward` / `lora_backward` (the
math, shared with the GEMV path of nf4_gemv.py) -> `NF4DequantLoRAFunction` -> `nf4_lora_dequant`.

Dtypes: everything runs in `compute_dtype(x)` (the autocast dtype under autocast, else x's), with
autocast off inside; the adapter's weights are cast to it for the products (they are small) and
their gradients returned in the adapter's own dtype (fp32 by default), as PEFT under autocast.
Dropout (LoRA path only) as the torch backend: XA and dA use the dropped-out H, and the adapter's
share of dX is returned as H's gradient (autograd applies the mask).

The one buffer is safe because every user runs on the current stream in order: a layer's GEMM
has been enqueued before the next dequantization overwrites the buffer. On CPU without the Triton
interpreter the dequantization is `qtrain.kernels.nf4.dequantize_nf4` (so this path runs in plain torch);
on CUDA, or under TRITON_INTERPRET=1, the Triton kernel.

Shapes: X [M, K], W [N, K] (NF4), A [r, K], B [N, r], bias [N], Y [M, N].
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from qtrain.kernels.backend import interpreting, run_triton_or_fall_back, triton_available
from qtrain.kernels.nf4 import NF4Tensor, dequantize_nf4
from qtrain.kernels.nf4_lora import compute_dtype

__all__ = [
    "NF4DequantLoRAFunction",
    "buffer_numels",
    "dequantize_into",
    "nf4_lora_dequant",
    "release_buffers",
    "weight_buffer",
]

# ---- the reusable dequantization buffer ------------------------------------------------------------

_BUFFERS: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def weight_buffer(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A contiguous [numel] view of the (device, dtype) buffer, grown to `numel` if it is smaller.

    Growing replaces the buffer (the old one is freed once no view of it is alive), so it ends up
    sized to the largest projection: one weight's worth of 16-bit memory for the whole model.
    """
    key = (torch.device(device), dtype)
    buf = _BUFFERS.get(key)
    if buf is None or buf.numel() < numel:
        _BUFFERS.pop(key, None)  # free the smaller one before allocating
        buf = _BUFFERS[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def release_buffers() -> None:
    """Drop every dequantization buffer (e.g. before generation, or in tests)."""
    _BUFFERS.clear()


def buffer_numels() -> dict[tuple[str, torch.dtype], int]:
    """{(device, dtype): elements} of the live buffers (for tests, benchmarks and memory estimates)."""
    return {(str(device), dtype): buf.numel() for (device, dtype), buf in _BUFFERS.items()}


def _use_triton(weight: NF4Tensor) -> bool:
    """Whether the Triton dequant kernel can run on `weight`: CUDA, or CPU under the interpreter."""
    return (weight.device.type == "cuda" and triton_available()) or interpreting()


def dequantize_into(weight: NF4Tensor, dtype: torch.dtype, fall_back: bool | None = None) -> torch.Tensor:
    """dequant(W) [N, K] in `dtype`, written into the shared buffer (bit-identical to `dequantize_nf4`).

    `fall_back` None: a Triton error propagates as it is (the forward: `nf4_lora`'s own fall-back
    sees it); True/False (the backward, where that fall-back cannot reach): the torch dequantization
    after one warning (backend "auto"), or RuntimeError with a hint (backend "triton")."""
    out = weight_buffer(weight.numel(), dtype, weight.device)

    def torch_call():
        return out.view(weight.shape).copy_(dequantize_nf4(weight, dtype))

    if not _use_triton(weight):
        return torch_call()
    from qtrain.kernels.nf4_dequant import nf4_dequantize_triton

    if fall_back is None:
        return nf4_dequantize_triton(weight, dtype, out=out)
    return run_triton_or_fall_back(
        lambda: nf4_dequantize_triton(weight, dtype, out=out), torch_call, fall_back, weight.device
    )


# ---- the math, shared by the dequant and GEMV paths ------------------------------------------------

BaseMatmul = Callable[[torch.Tensor, NF4Tensor, torch.Tensor | None], torch.Tensor]


def dequant_base(x: torch.Tensor, weight: NF4Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """X @ dequant(W)^T + bias through the buffer and cuBLAS, in x's dtype. [M, K] -> [M, N]"""
    w = dequantize_into(weight, x.dtype)  # [N, K]
    return F.linear(x, w, bias)


def lora_forward(ctx, base: BaseMatmul, x, h, weight: NF4Tensor, lora_a, lora_b, bias, scale: float, fall_back: bool):
    """Y = base(X) + s * (H @ A^T) @ B^T, all in x's dtype; saves what `lora_backward` needs
    (`fall_back`: what the backward's dequantization does on a Triton error, see `dequantize_into`).

    x [M, K] (already in the compute dtype), h None or [M, K] (dropped-out x), lora_a [r, K],
    lora_b [N, r], bias None or [N] (in x's dtype).
    """
    has_lora = lora_a is not None
    lora_in = x if h is None else h
    y = base(x, weight, bias)  # [M, N]
    xa = None
    if has_lora:
        xa = lora_in @ lora_a.to(x.dtype).T  # [M, r], 16-bit operands
        y.addmm_(xa, lora_b.to(x.dtype).T, alpha=scale)
    needs = ctx.needs_input_grad
    ctx.weight, ctx.scale, ctx.has_h, ctx.fall_back = weight, scale, h is not None, fall_back
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.save_for_backward(
        lora_in if has_lora and needs[3] else None,
        xa if has_lora and needs[4] else None,
        lora_a,
        lora_b,
    )
    return y


def lora_backward(ctx, grad_y):
    """Gradients (x, h, weight, A, B, bias, scale, fall_back) of `lora_forward`, in dY's dtype; A and B's in their own."""
    lora_in, xa, lora_a, lora_b = ctx.saved_tensors
    need_x, need_h, _, need_a, need_b, need_bias, _, _ = ctx.needs_input_grad
    s, dtype = ctx.scale, grad_y.dtype
    dyb = None
    if lora_a is not None and (need_x or need_h or need_a):
        dyb = grad_y @ lora_b.to(dtype)  # [M, r]
    grad_x = grad_h = grad_a = grad_b = grad_bias = None
    if need_x:
        grad_x = grad_y @ dequantize_into(ctx.weight, dtype, ctx.fall_back)  # [M, K]
        if dyb is not None and not ctx.has_h:
            grad_x.addmm_(dyb, lora_a.to(dtype), alpha=s)
    if need_h:
        grad_h = (dyb @ lora_a.to(dtype)).mul_(s)  # [M, K]
    if need_a:
        grad_a = (dyb.T @ lora_in).to(lora_a.dtype).mul_(s)  # [r, K]
    if need_b:
        grad_b = (grad_y.T @ xa).to(lora_b.dtype).mul_(s)  # [N, r]
    if need_bias:
        grad_bias = grad_y.sum(0).to(ctx.bias_dtype)  # [N]
    return grad_x, grad_h, None, grad_a, grad_b, grad_bias, None, None


class NF4DequantLoRAFunction(torch.autograd.Function):
    """`Y = X @ dequant(W)^T + s * (H @ A^T) @ B^T + bias` via the dequant buffer and cuBLAS.

    Saves H (or X) only when A needs a gradient, XA [M, r] only when B does, A, B and the 4-bit
    weight: never a 16-bit copy of W (backward dequantizes again into the buffer).
    """

    @staticmethod
    def forward(ctx, x, h, weight: NF4Tensor, lora_a, lora_b, bias, scale: float, fall_back: bool):
        return lora_forward(ctx, dequant_base, x, h, weight, lora_a, lora_b, bias, scale, fall_back)

    @staticmethod
    def backward(ctx, grad_y):
        return lora_backward(ctx, grad_y.contiguous())


def apply_lora_function(
    function: type[torch.autograd.Function],
    x: torch.Tensor,
    weight: NF4Tensor,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    scale: float,
    bias: torch.Tensor | None,
    dropout: float,
    training: bool,
    fall_back: bool = False,
) -> torch.Tensor:
    """x [..., K] -> [..., N] through `function` in compute_dtype(x), autocast off inside."""
    dtype = compute_dtype(x)
    lead, K = x.shape[:-1], x.shape[-1]
    with torch.autocast(x.device.type, enabled=False):
        x2 = x.reshape(-1, K).to(dtype)  # [M, K]; a no-op when x is already in the compute dtype
        h = None
        if lora_a is not None and dropout > 0 and training:
            h = F.dropout(x2, p=dropout, training=True)  # LoRA path only; autograd applies the mask to dH
        bias_c = bias.to(dtype) if bias is not None else None
        y = function.apply(x2, h, weight, lora_a, lora_b, bias_c, float(scale), fall_back)  # [M, N]
    return y.view(*lead, y.shape[-1])


def nf4_lora_dequant(
    x: torch.Tensor,
    weight: NF4Tensor,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    scale: float,
    bias: torch.Tensor | None = None,
    dropout: float = 0.0,
    training: bool = False,
    *,
    fall_back: bool = False,
) -> torch.Tensor:
    """The large-M path, same signature and semantics as `nf4_lora_torch`; returns compute_dtype(x).
    `fall_back` (set by backend "auto"): a Triton error in the backward dequantizes with torch."""
    args = (x, weight, lora_a, lora_b, scale, bias, dropout, training, fall_back)
    return apply_lora_function(NF4DequantLoRAFunction, *args)
