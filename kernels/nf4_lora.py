"""NF4 linear + LoRA: `Y = X @ dequant(W)^T + s * (dropout(X) @ A^T) @ B^T + bias`.

This file follows the kernel anatomy of the project: `nf4_lora_reference` (PyTorch, fp32 math,
the ground truth for tests), then the `torch` backend used on CPU, then `nf4_lora`, the dispatch
between backends. The Triton kernels, their launchers and their autograd.Function live in
`nf4_lora_triton.py`, imported only when the `triton` backend runs, so that this file (and
CPU-only installs without triton) never needs triton.

Shapes: X [M, K], W [N, K] (NF4), A [r, K], B [N, r], Y [M, N].
"""

from __future__ import annotations

import functools
import importlib.util
import warnings

import torch
import torch.nn.functional as F

from qtrain.nf4 import NF4Tensor, dequantize_nf4

BACKENDS = ("auto", "torch", "triton")


def nf4_lora_reference(
    x: torch.Tensor,
    weight: NF4Tensor,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    scale: float,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Ground truth in fp32: dequantize W, add the low-rank path, cast back to x's dtype."""
    x32 = x.float()
    y = x32 @ dequantize_nf4(weight, torch.float32).T  # [M, N]
    if lora_a is not None:
        y = y + scale * (x32 @ lora_a.float().T) @ lora_b.float().T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


class NF4MatmulFunction(torch.autograd.Function):
    """`X @ dequant(W)^T` that saves only the 4-bit weight for backward, not a 16-bit copy.

    The frozen base gets no gradient; backward dequantizes W again for `dX = dY @ W`.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: NF4Tensor) -> torch.Tensor:
        ctx.weight = weight
        return x @ dequantize_nf4(weight, x.dtype).T  # [*, N]

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_y @ dequantize_nf4(ctx.weight, grad_y.dtype)  # [*, K]
        return grad_x, None


def nf4_lora_torch(
    x: torch.Tensor,
    weight: NF4Tensor,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    scale: float,
    bias: torch.Tensor | None = None,
    dropout: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """The `torch` backend: dequantize + matmul for the base, plain autograd for the adapter.

    The adapter runs in its own dtype (fp32 by default, as PEFT does for QLoRA) and its result
    is cast back to the activation dtype.
    """
    y = NF4MatmulFunction.apply(x, weight)
    if bias is not None:
        y = y + bias.to(y.dtype)
    if lora_a is None:
        return y
    return y + lora_delta(x, lora_a, lora_b, scale, dropout, training)


def lora_delta(
    x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, dropout: float, training: bool
) -> torch.Tensor:
    """`s * (dropout(X) @ A^T) @ B^T`, computed in the adapter's dtype and returned in X's.

    Under autocast the matmuls run in the autocast dtype whatever the operands: X is then left as
    it is, so that the projections reading the same X save that one tensor for the backward, not
    a cast copy each."""
    h = F.dropout(x, p=dropout, training=training) if dropout > 0 else x
    if not autocast_enabled(x):
        h = h.to(lora_a.dtype)
    return (scale * F.linear(F.linear(h, lora_a), lora_b)).to(x.dtype)


def autocast_enabled(x: torch.Tensor) -> bool:
    """Whether autocast is on for `x`'s device type."""
    device = x.device.type
    return torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the base matmul runs in for input `x`: the autocast dtype when autocast is on for
    x's device (what `F.linear` would compute in), else x's own dtype. Every NF4 path dequantizes W
    to this dtype and returns Y in it, so the path chosen for a shape never changes Y's dtype."""
    return torch.get_autocast_dtype(x.device.type) if autocast_enabled(x) else x.dtype


# ---- dispatch --------------------------------------------------------------------------------------


@functools.cache
def triton_available() -> bool:
    """Whether triton is installed (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """The concrete backend ("torch" or "triton") that `backend` means for input `x`.

    "auto" takes triton for CUDA inputs on Ampere or newer (the Triton configs and bf16 tensor
    cores assume sm_80+) when triton is installed and the kernels pass a self-check on this GPU
    (once per device and process), and the torch backend otherwise (CPU included).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {BACKENDS}")
    if backend != "auto":
        return backend
    if x.is_cuda and triton_available() and torch.cuda.get_device_capability(x.device) >= (8, 0):
        return "triton" if triton_self_check(x.device) else "torch"
    return "torch"


@functools.cache
def triton_self_check(device: torch.device) -> bool:
    """Run the Triton kernels once on a small odd-shaped layer (forward and every gradient, bf16)
    and compare with the torch backend; on any mismatch or error, warn and let "auto" use torch.
    A guard for GPUs and triton versions the kernels were not measured on."""
    from qtrain.nf4 import quantize_nf4

    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(37, 192, generator=g).to(device, torch.bfloat16)  # [M, K]
    w = quantize_nf4(torch.randn(80, 192, generator=g).to(device, torch.bfloat16))  # [N, K]
    a, b = (torch.randn(s, generator=g).mul(0.1).to(device) for s in ((8, 192), (80, 8)))  # [r, K], [N, r]
    results = []
    try:
        from qtrain.kernels.nf4_lora_triton import nf4_lora_triton

        for fn in (nf4_lora_torch, nf4_lora_triton):
            xi, ai, bi = (t.clone().requires_grad_() for t in (x, a, b))
            y = fn(xi, w, ai, bi, 2.0)
            y.float().square().sum().backward()
            results.append([y.float(), xi.grad.float(), ai.grad, bi.grad])
    except Exception as e:  # noqa: BLE001 - any failure means: do not use these kernels here
        warnings.warn(f"qtrain: Triton kernels failed their self-check on {device} ({e!r}); using the torch backend")
        return False
    for ref, got in zip(*results):
        if not torch.allclose(got, ref, rtol=2e-2, atol=2e-2 * ref.abs().mean().item()):  # bf16: 8-bit mantissa
            err = (got - ref).abs().max().item()
            warnings.warn(f"qtrain: Triton kernels disagree with torch on {device} (max error {err:.3g}); using the torch backend")
            return False
    return True


def nf4_lora(
    x: torch.Tensor,
    weight: NF4Tensor,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    scale: float,
    bias: torch.Tensor | None = None,
    dropout: float = 0.0,
    training: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """`X @ dequant(W)^T + s * (dropout(X) @ A^T) @ B^T + bias` on the backend `backend` resolves to."""
    if resolve_backend(backend, x) == "triton":
        if not triton_available():
            raise ImportError("backend='triton' needs the triton package (`pip install triton`, Linux)")
        from qtrain.kernels.nf4_lora_triton import nf4_lora_triton  # lazy: triton only when used

        return nf4_lora_triton(x, weight, lora_a, lora_b, scale, bias, dropout, training)
    return nf4_lora_torch(x, weight, lora_a, lora_b, scale, bias, dropout, training)
