"""NF4 linear + LoRA: `Y = X @ dequant(W)^T + s * (dropout(X) @ A^T) @ B^T + bias`.

This file follows the kernel anatomy of the project: `nf4_lora_reference` (PyTorch, fp32 math,
the ground truth for tests), then the `torch` backend used on CPU, then `nf4_lora`, the dispatch
between backends. The Triton kernels, their launchers and their autograd.Function live in
`nf4_lora_triton.py`, imported only when the `triton` backend runs, so that this file (and
CPU-only installs without triton) never needs triton.

Shapes: X [M, K], W [N, K] (NF4), A [r, K], B [N, r], Y [M, N].
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import torch
import torch.nn.functional as F
from qtrain.kernels import backend as policy
from qtrain.kernels.backend import (  # noqa: F401 - re-exported: the names callers and tests use here
    BACKENDS,
    MIN_TRITON,
    _in_triton_package,
    is_triton_error,
    run_triton_or_fall_back,
    triton_available,
    triton_error_hint,
    triton_version,
)
from qtrain.kernels.nf4 import NF4Tensor, dequantize_nf4, quantize_nf4


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

    Computes in `compute_dtype(x)` (the autocast dtype under autocast) with autocast off inside, so
    forward and backward are explicit about dtypes: Y in the compute dtype, dX in X's dtype. The
    frozen base gets no gradient; backward dequantizes W again for `dX = dY @ W`.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: NF4Tensor) -> torch.Tensor:
        dtype = compute_dtype(x)
        ctx.weight, ctx.x_dtype = weight, x.dtype
        with autocast_off(x):
            return x.to(dtype) @ dequantize_nf4(weight, dtype).T  # [*, N]

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        grad_x = None
        if ctx.needs_input_grad[0]:
            with autocast_off(grad_y):
                grad_x = (grad_y @ dequantize_nf4(ctx.weight, grad_y.dtype)).to(ctx.x_dtype)  # [*, K]
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
    is cast to Y's dtype, `compute_dtype(x)` as for every NF4 path.
    """
    y = NF4MatmulFunction.apply(x, weight)  # [*, N] in compute_dtype(x)
    if bias is not None:
        y = y + bias.to(y.dtype)
    if lora_a is None:
        return y
    return y + lora_delta(x, lora_a, lora_b, scale, dropout, training).to(y.dtype)


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


def autocast_off(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """A context with autocast disabled for x's device type (a no-op where autocast does not exist)."""
    device = x.device.type
    return (
        torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else contextlib.nullcontext()
    )


# ---- dispatch --------------------------------------------------------------------------------------


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """The concrete backend ("torch" or "triton") that `backend` means for input `x`: the one policy
    of `qtrain.kernels.backend` for op "nf4_lora" ("auto": triton on CUDA sm_80+ with triton >=
    MIN_TRITON once `triton_self_check` passed there and no Triton kernel failed there, else torch)."""
    return policy.resolve_backend("nf4_lora", backend, x)


# (path, M) the self-check runs: the fused kernel's tiled (odd M) and split-K small-M launches, the
# GEMV path and the dequant + cuBLAS path (nf4_dispatch picks among them by M).
SELF_CHECK_CASES = (("fused", 37), ("fused", 5), ("gemv", 5), ("dequant", 37))


@functools.cache
def triton_self_check(device: torch.device) -> bool:
    """Run every Triton path once on small odd-shaped layers the way training calls them (forward
    under bf16 autocast, backward outside it; `SELF_CHECK_CASES`) and compare output and every
    gradient with the torch backend; on any mismatch or error, warn and let "auto" use torch. One
    fixed kernel config (no autotuning of shapes no real layer has). A guard for GPUs and triton
    versions the kernels were not measured on."""
    dtype = torch.float16 if device.type == "cuda" and not torch.cuda.is_bf16_supported() else torch.bfloat16
    try:
        from qtrain.kernels.nf4_dispatch import path_function
        from qtrain.kernels.nf4_lora_triton import fixed_configs

        results = []
        with fixed_configs():
            for path, m in SELF_CHECK_CASES:
                ref = _self_check_run(nf4_lora_torch, device, dtype, m)
                results += zip(ref, _self_check_run(path_function(path), device, dtype, m))
    except Exception as e:  # noqa: BLE001 - any failure means: do not use these kernels here
        warnings.warn(f"qtrain: Triton kernels failed their self-check on {device} ({e!r}); using the torch backend")
        return False
    for ref, got in results:
        if got.dtype != ref.dtype:
            warnings.warn(f"qtrain: Triton kernels return {got.dtype} where torch returns {ref.dtype}; using torch")
            return False
        ref, got = ref.float(), got.float()
        if not torch.allclose(got, ref, rtol=2e-2, atol=2e-2 * ref.abs().mean().item()):  # bf16: 8-bit mantissa
            err = (got - ref).abs().max().item()
            warnings.warn(
                f"qtrain: Triton kernels disagree with torch on {device} (max error {err:.3g}); using the torch backend"
            )
            return False
    return True


def _self_check_run(fn, device: torch.device, dtype: torch.dtype, m: int) -> list[torch.Tensor]:
    """[Y, dX, dA, dB, dbias] of `fn` on an [m, 192] x [80, 192] layer, bf16 activations, fp32 adapter."""
    g = torch.Generator(device="cpu").manual_seed(m)
    x = torch.randn(m, 192, generator=g).to(device, dtype)  # [M, K]
    w = quantize_nf4(torch.randn(80, 192, generator=g).to(device, dtype))  # [N, K]
    a, b, bias = (torch.randn(s, generator=g).mul(0.1).to(device) for s in ((8, 192), (80, 8), (80,)))
    xi, ai, bi, biasi = (t.clone().requires_grad_() for t in (x, a, b, bias.to(dtype)))
    with torch.autocast(device.type, dtype=dtype):
        y = fn(xi, w, ai, bi, 2.0, biasi)
    y.float().square().sum().backward()  # outside autocast, as the trainer's backward
    return [y.detach(), xi.grad, ai.grad, bi.grad, biasi.grad]


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
    """`X @ dequant(W)^T + s * (dropout(X) @ A^T) @ B^T + bias` on the backend `backend` resolves to;
    "triton" runs the path `nf4_dispatch.choose_path` picks for this M (GEMV, fused or dequant).

    Under "auto" a Triton compile or launch error (forward or backward) falls back to the torch
    backend with one warning; under "triton" it raises RuntimeError with a hint."""
    args = (x, weight, lora_a, lora_b, scale, bias, dropout, training)
    if resolve_backend(backend, x) == "triton":
        if not triton_available():
            raise ImportError("backend='triton' needs the triton package (`pip install triton`, Linux)")
        from qtrain.kernels.nf4_dispatch import nf4_lora_dispatch  # lazy: triton only when used

        fall_back = backend == "auto"
        return run_triton_or_fall_back(
            lambda: nf4_lora_dispatch(*args, fall_back=fall_back), lambda: nf4_lora_torch(*args), fall_back, x.device
        )
    return nf4_lora_torch(*args)
