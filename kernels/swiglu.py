"""SwiGLU activation of the Llama MLP: `h = silu(gate) * up`, forward and backward in Triton.

Semantics are those of transformers' `LlamaMLP` (and Qwen2/Mistral's): `act_fn(gate_proj(x)) *
up_proj(x)` with `act_fn = SiLU`, run in the model dtype, i.e. TWO roundings:

    a = silu(gate)            # computed in fp32 (torch's opmath), rounded to gate's dtype
    h = a * up                # computed in fp32 from the rounded a, rounded to promote(gate, up)

The kernel does the same (silu(g) = g / (1 + exp(-g)) in fp32, rounded to gate's dtype, product in
fp32, rounded once more), so its output matches the stock module's up to exp/division ulps in fp32.
The backward recomputes s = sigmoid(gate) and silu(gate) from the saved inputs (nothing else is
saved) and, with the rounding steps' gradients the identity as in autograd:

    d_up   = dh * round_gate(silu(g))                    # the rounded operand, as autograd of a * up
    d_gate = dh * up * s * (1 + g * (1 - s))             # silu'(g) = s + g * s * (1 - s)

each in fp32, rounded once to its input's dtype. Liger-Kernel's swiglu is the model.

Memory (saved for backward, per token of intermediate size I, bf16 model): this op saves gate and
up (2I + 2I = 4I bytes). The stock graph saves gate (SiLU's input), silu(gate) and up (the `mul`'s
operands): 6I bytes. Llama-3 8B (I = 14336): 56 KiB instead of 84 KiB per token and layer.
(tests/kernels/test_swiglu.py measures both with saved-tensor hooks.)

Anatomy: `swiglu_reference` (PyTorch, fp32 math with the model-dtype rounding of silu: ground truth,
CPU fallback) -> `_swiglu_fwd_kernel` / `_swiglu_bwd_kernel` (elementwise; grid rows x column
blocks, row strides, so gate/up may be column slices of one fused [M, 2I] projection) -> launchers
`swiglu_fwd`, `swiglu_bwd` -> `SwiGLUFunction` -> `swiglu`, the dispatch. Block size NOT timed (no
GPU lent); compile-only (ptxas, sm_80/sm_90): 32-44 registers per thread, no spills.
"""

from __future__ import annotations  # kernel annotations stay strings: this module imports without triton

import functools

import torch
import torch.nn.functional as F
from qtrain.kernels import backend as policy
from qtrain.kernels._triton import _jit, _round_to, is_interpreting, tl, triton  # noqa: F401 - the kernels' globals

__all__ = ["SwiGLUFunction", "swiglu", "swiglu_bwd", "swiglu_fwd", "swiglu_reference"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_BLOCK = 1024  # columns per program (elementwise, memory-bound; not timed)
_NUM_WARPS = 4


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`F.silu(gate) * up` as transformers runs it in the model dtype, with the math in fp32 (fp64
    inputs stay fp64, for ground truth): silu rounded to gate's dtype, the product to promote(gate, up)."""
    wide = torch.promote_types(torch.promote_types(gate.dtype, up.dtype), torch.float32)
    act = F.silu(gate.to(wide)).to(gate.dtype)  # LlamaMLP.act_fn(gate_proj(x)), in the model dtype
    return (act.to(wide) * up.to(wide)).to(torch.promote_types(gate.dtype, up.dtype))


# ---- kernels ---------------------------------------------------------------------------------------


@_jit
def _swiglu_fwd_kernel(
    gate_ptr, up_ptr, h_ptr,
    N, stride_gate, stride_up, stride_h,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """h[row, cols] = round_h(round_gate(silu(g)) * u) for one row and BLOCK columns."""
    row = tl.program_id(0).to(tl.int64)  # int64 offsets: M * stride may pass 2^31
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    g = tl.load(gate_ptr + row * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)  # [BLOCK]
    u = tl.load(up_ptr + row * stride_up + cols, mask=mask, other=0.0).to(tl.float32)
    act = _round_to(g / (1.0 + tl.exp(-g)), gate_ptr.dtype.element_ty).to(tl.float32)  # torch's silu formula
    tl.store(h_ptr + row * stride_h + cols, _round_to(act * u, h_ptr.dtype.element_ty), mask=mask)


@_jit
def _swiglu_bwd_kernel(
    dh_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr,
    N, stride_dh, stride_gate, stride_up, stride_dgate, stride_dup,
    HAS_DGATE: tl.constexpr, HAS_DUP: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """d_gate = dh * u * s * (1 + g * (1 - s)), d_up = dh * round_gate(g * s), s = sigmoid(g) recomputed."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    dh = tl.load(dh_ptr + row * stride_dh + cols, mask=mask, other=0.0).to(tl.float32)  # [BLOCK]
    g = tl.load(gate_ptr + row * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-g))
    if HAS_DGATE:
        u = tl.load(up_ptr + row * stride_up + cols, mask=mask, other=0.0).to(tl.float32)
        dgate = dh * u * s * (1.0 + g * (1.0 - s))
        tl.store(dgate_ptr + row * stride_dgate + cols, _round_to(dgate, dgate_ptr.dtype.element_ty), mask=mask)
    if HAS_DUP:
        act = _round_to(g * s, gate_ptr.dtype.element_ty).to(tl.float32)
        tl.store(dup_ptr + row * stride_dup + cols, _round_to(dh * act, dup_ptr.dtype.element_ty), mask=mask)


# ---- launchers -------------------------------------------------------------------------------------


def _as_rows(t: torch.Tensor, what: str) -> torch.Tensor:
    """[..., N] -> [M, N] with unit column stride (a view when possible), checked for the kernels."""
    if t.dtype not in _DTYPES:
        raise TypeError(f"the SwiGLU kernels take fp32/fp16/bf16, {what} is {t.dtype}")
    if not (t.is_cuda or is_interpreting()):
        raise RuntimeError(f"the SwiGLU kernels need CUDA tensors ({what} is on {t.device}); use swiglu_reference")
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _grid(M: int, N: int, block: int) -> tuple[int, int]:
    return (M, triton.cdiv(N, block))


def _block(N: int) -> int:
    return min(_BLOCK, triton.next_power_of_2(N))


def swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """h [M, N] in promote(gate, up) from gate, up [M, N] with unit column stride."""
    if gate.shape != up.shape or gate.dim() != 2 or gate.stride(1) != 1 or up.stride(1) != 1:
        raise ValueError(f"gate and up must be [M, N] alike with unit column stride, got {gate.shape}, {up.shape}")
    M, N = gate.shape
    h = torch.empty(M, N, dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
    if h.numel() == 0:
        return h
    block = _block(N)
    _swiglu_fwd_kernel[_grid(M, N, block)](
        gate, up, h, N, gate.stride(0), up.stride(0), h.stride(0), BLOCK=block, num_warps=_NUM_WARPS
    )
    return h


def swiglu_bwd(
    grad_h: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, need_dgate: bool = True, need_dup: bool = True
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(d_gate [M, N] in gate's dtype or None, d_up [M, N] in up's dtype or None) from dh [M, N]."""
    if grad_h.stride(1) != 1:
        grad_h = grad_h.contiguous()
    M, N = gate.shape
    dgate = torch.empty(M, N, dtype=gate.dtype, device=gate.device) if need_dgate else None
    dup = torch.empty(M, N, dtype=up.dtype, device=up.device) if need_dup else None
    if not (need_dgate or need_dup) or gate.numel() == 0:
        return dgate, dup
    block = _block(N)
    dgate_arg = dgate if need_dgate else gate  # unused pointers stand in when absent
    dup_arg = dup if need_dup else up
    _swiglu_bwd_kernel[_grid(M, N, block)](
        grad_h, gate, up, dgate_arg, dup_arg,
        N, grad_h.stride(0), gate.stride(0), up.stride(0), dgate_arg.stride(0), dup_arg.stride(0),
        HAS_DGATE=need_dgate, HAS_DUP=need_dup, BLOCK=block, num_warps=_NUM_WARPS,
    )  # fmt: skip
    return dgate, dup


# ---- autograd --------------------------------------------------------------------------------------


class SwiGLUFunction(torch.autograd.Function):
    """`silu(gate) * up` for gate, up [..., N]; saves gate and up only (silu and sigmoid are
    recomputed in backward), never silu(gate) nor the output."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if gate.shape != up.shape:
            raise ValueError(f"gate and up must have the same shape, got {tuple(gate.shape)} and {tuple(up.shape)}")
        gate2, up2 = _as_rows(gate, "gate"), _as_rows(up, "up")  # [M, N]
        ctx.save_for_backward(gate2, up2)
        return swiglu_fwd(gate2, up2).view(gate.shape)

    @staticmethod
    def backward(ctx, grad_h: torch.Tensor):
        gate2, up2 = ctx.saved_tensors
        need_dgate, need_dup = ctx.needs_input_grad
        dgate, dup = swiglu_bwd(grad_h.reshape(gate2.shape), gate2, up2, need_dgate, need_dup)
        shape = grad_h.shape
        return (dgate.view(shape) if dgate is not None else None), (dup.view(shape) if dup is not None else None)


def _use_triton(gate: torch.Tensor, up: torch.Tensor) -> bool:
    if triton is None or gate.dtype not in _DTYPES or up.dtype not in _DTYPES or gate.shape != up.shape:
        return False
    if is_interpreting():  # tests: CPU tensors run the kernels in the interpreter
        return gate.device.type == up.device.type == "cpu"
    return up.device == gate.device and policy.resolve_backend("swiglu", "auto", gate) == "triton"


@functools.cache
def triton_self_check(device: torch.device) -> bool:
    """The kernels against the reference once on `device`, as training calls them (bf16, an odd width,
    both gradients): the guard `qtrain.kernels.backend` runs before "auto" uses them."""

    def run(backend: str) -> list[torch.Tensor]:
        g = torch.Generator(device="cpu").manual_seed(0)
        gate, up = (torch.randn(5, 72, generator=g).to(device, torch.bfloat16).requires_grad_() for _ in range(2))
        h = (SwiGLUFunction.apply if backend == "triton" else swiglu_reference)(gate, up)  # [M, N]
        h.float().square().sum().backward()
        return [h.detach(), gate.grad, up.grad]

    return policy.compare_with_torch("SwiGLU", device, run, rtol=2e-2, atol=2e-2)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` (LlamaMLP's `act_fn(gate_proj(x)) * up_proj(x)`): the Triton kernels on CUDA
    tensors (and on CPU ones under the Triton interpreter, in tests), `swiglu_reference` otherwise."""
    if _use_triton(gate, up):
        return SwiGLUFunction.apply(gate, up)
    return swiglu_reference(gate, up)
