"""RMSNorm: `y = w * (x / sqrt(mean(x^2, -1) + eps))`, forward and backward in Triton.

Semantics are those of transformers' `LlamaRMSNorm` / `Qwen2RMSNorm` (5.x, the same code in both):

    x32  = x.to(float32)
    xhat = x32 * rsqrt(mean(x32^2, -1) + eps)      # fp32
    y    = w * xhat.to(x.dtype)                      # cast FIRST, then the weight

The cast order matters: the normalized row is rounded to the INPUT dtype before the weight multiplies
it, and the product then takes the promoted dtype of (w, x) (bf16 for a bf16 model; fp32 when the
norm weights were upcast to fp32 as `prepare_model_for_kbit_training` does, with bf16 inputs). The
kernel does the same: fp32 sum of squares and rsqrt, `xhat` rounded to x's dtype, the product in
fp32 from the two rounded operands (what torch's 16-bit `mul` does), one rounding to the output
dtype. The backward follows the same graph: dW = sum_rows dY * xhat.to(x.dtype) (the rounded
operand, as autograd of `w * xhat.to(x.dtype)` gives), and the cast's gradient is the identity, so
with g = dY * w, dX = rstd * (g - xhat * mean(g * xhat)), all in fp32, rounded once to x's dtype.

Memory (saved for backward, per token of hidden size N, for a bf16 model): this op saves x itself
(2N bytes; it is the layer's input) and rstd in fp32 (4 bytes): 2N + 4. The stock module's autograd
graph saves the fp32 copy of x (4N, kept by `pow` and the `mul` by rsqrt) and rsqrt (4): 4N + 4
with a frozen weight, and also the bf16 `xhat.to(x.dtype)` (2N) when the weight is trainable:
6N + 4. Llama-3 8B (N = 4096): 8 KiB instead of 16 KiB per token and norm, two norms per layer.
(tests/kernels/test_rms_norm.py measures both with saved-tensor hooks.)

Anatomy: `rms_norm_reference` (the transformers formula in PyTorch: ground truth, CPU fallback) ->
`_rms_norm_fwd_kernel` (one program per row) / `_rms_norm_bwd_kernel` (a few rows per program; dW
as one fp32 partial sum per program, summed afterwards in torch, as Liger-Kernel does) ->
launchers `rms_norm_fwd`, `rms_norm_bwd` -> `RMSNormFunction` -> `rms_norm`, the dispatch.

Rows are held whole in registers (BLOCK_N = next_power_of_2(N) <= 65536); any leading dims, row
strides (unit column stride, else a copy), odd N (masked). Triton is optional: without it (or for
dtypes other than fp32/fp16/bf16, or CPU tensors outside the interpreter) `rms_norm` runs the
reference. Block sizes and warps are Liger-Kernel's rule of thumb, NOT timed here (no GPU lent).
Compile-only check (triton 3.9's ptxas, sm_80 and sm_90, all dtypes): no register spills up to
N = 8192 (Llama-3 8B/70B, Qwen2.5 up to 72B); wider rows spill (N = 16384: up to 256 bytes per thread
in backward), correct but slower.
"""

from __future__ import annotations  # kernel annotations stay strings: this module imports without triton

import functools

import torch
from qtrain.kernels import backend as policy
from qtrain.kernels._triton import _jit, _round_to, is_interpreting, tl, triton  # noqa: F401 - the kernels' globals

__all__ = ["MAX_HIDDEN", "RMSNormFunction", "rms_norm", "rms_norm_bwd", "rms_norm_fwd", "rms_norm_reference"]

MAX_HIDDEN = 65536  # a row lives in registers; wider rows take the reference path
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DW_PROGRAMS_PER_SM = 4  # backward with dW: programs per SM, each writing one fp32 partial row [N] (not timed)
_INTERPRET_DW_PROGRAMS = 3  # interpreter: a few programs, so tests see several rows per partial


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """transformers' LlamaRMSNorm.forward, op for op: fp32 normalization, cast to x's dtype, times w.

    fp64 inputs stay fp64 (ground truth for tests); the output has dtype promote(w, x).
    """
    x32 = x.to(torch.promote_types(x.dtype, torch.float32))
    variance = x32.pow(2).mean(-1, keepdim=True)  # [..., 1]
    return weight * (x32 * torch.rsqrt(variance + eps)).to(x.dtype)


@_jit
def _rms_norm_fwd_kernel(
    x_ptr, w_ptr, y_ptr, rstd_ptr,
    N, eps, stride_x, stride_y,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One row: rstd = rsqrt(mean(x^2) + eps); y = w * round_x(x * rstd), rounded to y's dtype."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_N]
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x * x, axis=0) / N + eps)
    xhat = _round_to(x * rstd, x_ptr.dtype.element_ty).to(tl.float32)  # HF: .to(input_dtype) before * w
    tl.store(y_ptr + row * stride_y + cols, _round_to(w * xhat, y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@_jit
def _rms_norm_bwd_kernel(
    dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_part_ptr,
    M, N, rows_per_program, stride_dy, stride_x, stride_dx,
    HAS_DX: tl.constexpr, HAS_DW: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Rows [pid * rows_per_program, ...): dX per row; dW summed over this program's rows into
    dw_part[pid] (fp32 [N]). g = dy * w, dx = rstd * (g - xhat * mean(g * xhat))."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_N]
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    first = pid * rows_per_program
    row = first.to(tl.int64)  # int64 offsets: M * stride may pass 2^31
    x_ptr += row * stride_x
    dy_ptr += row * stride_dy
    dx_ptr += row * stride_dx
    for r in range(first, tl.minimum(first + rows_per_program, M)):
        x = tl.load(x_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + r)
        xhat = x * rstd
        if HAS_DX:
            g = dy * w
            dx = rstd * (g - xhat * (tl.sum(g * xhat, axis=0) / N))
            tl.store(dx_ptr + cols, _round_to(dx, dx_ptr.dtype.element_ty), mask=mask)
        if HAS_DW:
            dw += dy * _round_to(xhat, x_ptr.dtype.element_ty).to(tl.float32)  # d(w * round_x(xhat))/dw
        x_ptr += stride_x
        dy_ptr += stride_dy
        dx_ptr += stride_dx
    if HAS_DW:
        tl.store(dw_part_ptr + pid * N + cols, dw, mask=mask)


# ---- launchers -------------------------------------------------------------------------------------


def _row_config(N: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps) for rows of N values held whole in one program."""
    if N > MAX_HIDDEN:
        raise ValueError(f"the RMSNorm kernels take rows of at most {MAX_HIDDEN} values, got {N}")
    block = triton.next_power_of_2(N)
    return block, 4 if block < 2048 else 8 if block < 8192 else 16 if block < 32768 else 32


def _check(t: torch.Tensor, what: str) -> None:
    if t.dtype not in _DTYPES:
        raise TypeError(f"the RMSNorm kernels take fp32/fp16/bf16, {what} is {t.dtype}")
    if not (t.is_cuda or is_interpreting()):
        raise RuntimeError(f"the RMSNorm kernels need CUDA tensors ({what} is on {t.device}); use rms_norm_reference")


def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y [M, N] in promote(w, x), rstd [M] fp32) for x [M, N] with unit column stride, weight [N]."""
    _check(x, "x")
    _check(weight, "weight")
    M, N = x.shape
    if x.stride(1) != 1 or weight.shape != (N,):
        raise ValueError(f"x must be [M, N] with unit column stride and weight [N], got {x.shape}, {weight.shape}")
    y = torch.empty(M, N, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    if M == 0:
        return y, rstd
    block, warps = _row_config(N)
    _rms_norm_fwd_kernel[(M,)](
        x, weight.contiguous(), y, rstd, N, float(eps), x.stride(0), y.stride(0), BLOCK_N=block, num_warps=warps
    )
    return y, rstd


def _dw_programs(M: int, device: torch.device) -> int:
    if device.type != "cuda":
        return min(M, _INTERPRET_DW_PROGRAMS)
    return min(M, _DW_PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count)


def rms_norm_bwd(
    grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, need_dx: bool, need_dw: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dX [M, N] in x's dtype or None, dW [N] in w's dtype or None) from dY [M, N], x, weight, rstd [M]."""
    M, N = x.shape
    if grad_y.stride(1) != 1:
        grad_y = grad_y.contiguous()
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_dx else None
    if not (need_dx or need_dw):
        return None, None
    if M == 0:
        return dx, torch.zeros_like(weight) if need_dw else None
    programs = _dw_programs(M, x.device) if need_dw else M  # dX only: one row per program
    rows_per_program = triton.cdiv(M, programs)
    programs = triton.cdiv(M, rows_per_program)
    dw_part = torch.empty(programs, N, dtype=torch.float32, device=x.device) if need_dw else rstd  # [P, N]
    block, warps = _row_config(N)
    _rms_norm_bwd_kernel[(programs,)](
        grad_y, x, weight.contiguous(), rstd, dx if need_dx else x, dw_part,
        M, N, rows_per_program, grad_y.stride(0), x.stride(0), dx.stride(0) if need_dx else 0,
        HAS_DX=need_dx, HAS_DW=need_dw, BLOCK_N=block, num_warps=warps,
    )  # fmt: skip
    return dx, dw_part.sum(0).to(weight.dtype) if need_dw else None


# ---- autograd --------------------------------------------------------------------------------------


class RMSNormFunction(torch.autograd.Function):
    """`w * rmsnorm(x)` with transformers' cast order; saves x and rstd [M] fp32, never the output.

    x [..., N], weight [N]. dW is computed only when the weight requires grad (a frozen weight, the
    usual case in qtrain, costs no dW work at all).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        N = x.shape[-1]
        x2 = x.reshape(-1, N)  # [M, N]
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        y, rstd = rms_norm_fwd(x2, weight, eps)
        ctx.save_for_backward(x2, weight, rstd)
        return y.view(*x.shape[:-1], N)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        need_dx, need_dw, _ = ctx.needs_input_grad
        dy = grad_y.reshape(x2.shape)  # [M, N]
        dx, dw = rms_norm_bwd(dy, x2, weight, rstd, need_dx, need_dw)
        return (dx.view(grad_y.shape) if dx is not None else None), dw, None


def _use_triton(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if triton is None or x.dtype not in _DTYPES or weight.dtype not in _DTYPES or x.shape[-1] > MAX_HIDDEN:
        return False
    if is_interpreting():  # tests: CPU tensors run the kernels in the interpreter
        return x.device.type == "cpu"
    return policy.resolve_backend("rms_norm", "auto", x) == "triton"


@functools.cache
def triton_self_check(device: torch.device) -> bool:
    """The kernels against the reference once on `device`, as training calls them (bf16 rows of an odd
    width, an fp32 weight, dX and dW): the guard `qtrain.kernels.backend` runs before "auto" uses them."""

    def run(backend: str) -> list[torch.Tensor]:
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(5, 72, generator=g).to(device, torch.bfloat16).requires_grad_()  # [M, N]
        w = (1 + 0.1 * torch.randn(72, generator=g)).to(device).requires_grad_()  # [N] fp32
        y = (RMSNormFunction.apply if backend == "triton" else rms_norm_reference)(x, w, 1e-6)
        y.float().square().sum().backward()
        return [y.detach(), x.grad, w.grad]

    return policy.compare_with_torch("RMSNorm", device, run, rtol=2e-2, atol=2e-2)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """`LlamaRMSNorm(x)` with weight `weight` and epsilon `eps`: the Triton kernels on CUDA tensors
    (and on CPU ones under the Triton interpreter, in tests), `rms_norm_reference` otherwise."""
    if _use_triton(x, weight):
        return RMSNormFunction.apply(x, weight, eps)
    return rms_norm_reference(x, weight, eps)
