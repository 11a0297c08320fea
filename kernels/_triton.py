"""Triton helpers shared by every kernel module: the optional import, `_jit`, interpreter detection,
the CUDA-tensor check and exact fp32 -> 16-bit rounding.

Kernel modules take `triton`, `tl` and `_jit` from here, so that each imports on installs without
triton (CPU-only platforms): `triton` and `tl` are None there, `_jit` leaves the function
undecorated (it is never launched then) and the launchers raise. Which backend an op runs is not
decided here but in `qtrain.kernels.backend`, which never imports triton.
"""

from __future__ import annotations  # kernel annotations stay strings: this module imports without triton

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only platforms without triton: the reference paths only
    triton = tl = None


def _jit(fn):
    """`triton.jit`, or the plain function where triton is missing (never called then)."""
    return fn if triton is None else triton.jit(fn)


@_jit
def _round_to(x, DTYPE: tl.constexpr):
    """fp32 `x` rounded to DTYPE, to nearest even. bf16 goes through integer ops: the Triton
    interpreter's fp32->bf16 cast truncates, and these ops give the same bits as the GPU's cvt.rn
    and torch's `.to(torch.bfloat16)` (finite values; the weights are)."""
    if DTYPE == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        u = u + (0x7FFF + ((u >> 16) & 1))
        return (u >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


def is_interpreting() -> bool:
    """Whether the kernels were built for the Triton interpreter (TRITON_INTERPRET=1, CPU tensors).

    `triton.jit` reads TRITON_INTERPRET when it decorates, so every kernel module imported after this
    one is in the same mode as `_round_to` here."""
    return triton is not None and not isinstance(_round_to, triton.runtime.JITFunction)


def runs_here(t: torch.Tensor) -> bool:
    """Whether a Triton kernel can take `t`: a CUDA tensor with compiled kernels, a CPU one under the
    interpreter."""
    return t.device.type == "cpu" if is_interpreting() else t.is_cuda
