"""Cross-entropy of one block of logits in Triton: summed loss, and the gradient written IN PLACE.

For each row i of logits z [N, V] with label y_i (rows with y_i == ignore_index are skipped):

    lse_i  = m + log(sum_j exp(z_ij - m)),  computed online over the vocab in blocks of BLOCK_V
             (running max m and running sum, rescaled when the max grows)
    loss_i = lse_i - z_i[y_i]
    dz_ij  = grad_scale * (exp(z_ij - lse_i) - [j == y_i])     (softmax - onehot)

One program per row reads the row twice (pass 1: max/sum; pass 2: softmax - onehot) and writes dz
over z, in z's dtype, so the caller needs no second [N, V] buffer (Liger-Kernel's cross_entropy
does the same). All math is fp32 in registers; 16-bit logits are widened per block. Ignored rows
get loss 0 and an all-zero gradient row. The running max starts at -FLT_MAX, not -inf, so blocks
of only -inf logits (before the first finite one) add exp(-inf) = 0 instead of NaN; a row that is
-inf everywhere still gives NaN, as PyTorch does. An out-of-range label (not ignore_index) gives a NaN loss
for its row (PyTorch would raise).

`kernels/linear_cross_entropy.py` calls this inside its chunk loop (backend="triton"): the chunk's
logits [C, V] stay in the matmul's dtype and become dlogits in place, instead of an fp32 copy.

Anatomy: `cross_entropy_reference` (PyTorch fp32, ground truth) -> `_cross_entropy_kernel` ->
launchers `cross_entropy_fwd_bwd` (loss + in-place gradient) and `cross_entropy_forward` (loss
only, logits untouched) -> `CrossEntropyFunction` (autograd; gradient into a copy, the input is
left intact) -> `cross_entropy` (dispatch). The module imports without triton (CPU-only
platforms); the Triton launchers then raise.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F
from qtrain.kernels import backend as policy
from qtrain.kernels._triton import _jit, is_interpreting, tl, triton  # noqa: F401 - tl: the kernels' globals
from qtrain.kernels.backend import BACKENDS, triton_available  # noqa: F401 - re-exported

__all__ = [
    "CrossEntropyFunction",
    "cross_entropy",
    "cross_entropy_forward",
    "cross_entropy_fwd_bwd",
    "cross_entropy_reference",
]

def cross_entropy_reference(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Ground truth: the SUM over non-ignored rows of `logsumexp(z_i) - z_i[y_i]`, in fp32."""
    return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="sum")


# ---- kernel -----------------------------------------------------------------------------------------


@_jit
def _cross_entropy_kernel(
    logits_ptr, stride_row, stride_col, labels_ptr, stride_label, loss_ptr, V, ignore_index, grad_scale,
    BLOCK_V: tl.constexpr, WRITE_GRAD: tl.constexpr,
):  # fmt: skip
    """Row `program_id`: loss_ptr[row] = lse - z[y]; with WRITE_GRAD, z[row, :] = grad_scale * (softmax - onehot)."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    y = tl.load(labels_ptr + row * stride_label)
    offs = tl.arange(0, BLOCK_V)
    if y == ignore_index:
        tl.store(loss_ptr + row, 0.0)
        if WRITE_GRAD:
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + offs
                tl.store(row_ptr + cols * stride_col, tl.zeros([BLOCK_V], tl.float32).to(logits_ptr.dtype.element_ty),
                         mask=cols < V)  # fmt: skip
    else:
        in_range = (y >= 0) & (y < V)
        target = tl.load(row_ptr + y * stride_col, mask=in_range, other=float("nan")).to(tl.float32)
        # pass 1: online logsumexp
        # running max, from the lowest FINITE fp32: starting at -inf, a first block of only -inf
        # logits (masked vocab, a constrained decoder's bias) gave exp(-inf - -inf) = NaN
        m = -3.4028234663852886e38  # -FLT_MAX
        d = 0.0  # running sum of exp(z - m)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + offs
            z = tl.load(row_ptr + cols * stride_col, mask=cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(z, axis=0))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
            m = m_new
        lse = m + tl.log(d)
        tl.store(loss_ptr + row, lse - target)
        if WRITE_GRAD:  # pass 2: softmax - onehot, over the logits
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + offs
                z = tl.load(row_ptr + cols * stride_col, mask=cols < V, other=0.0).to(tl.float32)
                p = tl.exp(z - lse)
                grad = tl.where(cols == y, p - 1.0, p) * grad_scale
                tl.store(row_ptr + cols * stride_col, grad.to(logits_ptr.dtype.element_ty), mask=cols < V)


# ---- launchers --------------------------------------------------------------------------------------

# Vocab block per loop step, and warps. NOT timed on a GPU yet: chosen from compile-only ptxas
# statistics (triton 3.9, sm_80 and sm_90, bf16/fp32, with the gradient pass): Liger-Kernel's 32768
# values on 32 warps spills ~450 bytes per thread, 16384 on 16 or 32 warps 8-80 bytes, 8192 on 16
# warps none (82-118 registers); 4096 and less on 8 warps none.
_MAX_BLOCK_V = 8192


def _launch(logits, labels, ignore_index, grad_scale, write_grad, block_v) -> torch.Tensor:
    if triton is None:
        raise ImportError("qtrain.kernels.cross_entropy: the Triton path needs triton (`pip install triton`, Linux)")
    if not (logits.is_cuda or is_interpreting()):
        raise RuntimeError(
            f"cross_entropy: the Triton kernel needs CUDA tensors (logits are on {logits.device}); use the torch "
            "backend on CPU, or set TRITON_INTERPRET=1 before triton is first imported (tests do)"
        )
    if logits.dim() != 2 or labels.shape != logits.shape[:1] or labels.dtype != torch.int64:
        raise ValueError(
            f"cross_entropy: logits {tuple(logits.shape)} must be [N, V] and labels {tuple(labels.shape)} "
            f"{labels.dtype} [N] int64"
        )
    if not logits.is_floating_point():
        raise ValueError(f"cross_entropy: logits must be floating point, got {logits.dtype}")
    n, v = logits.shape
    loss = torch.zeros(n, dtype=torch.float32, device=logits.device)  # [N] per-row losses
    if n == 0 or v == 0:
        return loss.sum()
    block_v = block_v or min(_MAX_BLOCK_V, triton.next_power_of_2(v))
    num_warps = 16 if block_v >= 8192 else 8 if block_v >= 2048 else 4  # 16 values per thread at most
    _cross_entropy_kernel[(n,)](
        logits, logits.stride(0), logits.stride(1), labels, labels.stride(0), loss, v, ignore_index,
        float(grad_scale), BLOCK_V=block_v, WRITE_GRAD=write_grad, num_warps=num_warps,
    )  # fmt: skip
    return loss.sum()  # fp32; a torch sum of per-row losses (deterministic, unlike atomics)


def cross_entropy_fwd_bwd(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    grad_scale: float = 1.0,
    block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss fp32, logits) where `logits` [N, V] now holds grad_scale * (softmax - onehot).

    IN PLACE: the logits are overwritten with d(grad_scale * loss)/d(logits), in their own dtype
    (fp32/fp16/bf16; any strides). labels [N] int64. `block_v` (a power of two) overrides the
    vocab block, for tests."""
    return _launch(logits, labels, ignore_index, grad_scale, True, block_v), logits


def cross_entropy_forward(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, block_v: int | None = None
) -> torch.Tensor:
    """Summed loss (fp32) only; the logits are read, not written."""
    return _launch(logits, labels, ignore_index, 0.0, False, block_v)


# ---- autograd ---------------------------------------------------------------------------------------


class CrossEntropyFunction(torch.autograd.Function):
    """Summed cross-entropy of logits [N, V] (fp32 scalar), gradient computed in the forward.

    The gradient goes into a copy of the logits (in their dtype), not into the input, which other
    ops may still need; backward scales it by the incoming scalar gradient. To overwrite a buffer
    you own, call `cross_entropy_fwd_bwd` directly.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100):
        if not ctx.needs_input_grad[0]:
            return cross_entropy_forward(logits, labels, ignore_index)
        loss, grad = cross_entropy_fwd_bwd(logits.clone(), labels, ignore_index)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None, None  # out of place: retain_graph stays correct


# ---- dispatch ---------------------------------------------------------------------------------------


@functools.cache
def triton_self_check(device: torch.device) -> bool:
    """Run the kernel once on small odd-shaped bf16 logits (several vocab blocks, an ignored row) and
    compare loss and gradient with the reference; on an error or a mismatch warn and return False.
    A guard for GPUs and triton versions the kernel was not measured on (used by backend="auto")."""
    g = torch.Generator(device="cpu").manual_seed(0)
    logits = (torch.randn(7, 1000 + 7, generator=g) * 3).to(device, torch.bfloat16)  # [N, V]
    labels = torch.randint(0, 1007, (7,), generator=g).to(device)
    labels[3] = -100
    try:
        loss, grad = cross_entropy_fwd_bwd(logits.clone(), labels, -100, 0.5, block_v=256)
    except Exception as e:  # noqa: BLE001 - any failure means: do not use this kernel here
        warnings.warn(f"qtrain: the Triton cross-entropy failed its self-check on {device} ({e!r}); using torch")
        return False
    ref_logits = logits.float().requires_grad_()
    ref_loss = cross_entropy_reference(ref_logits, labels)
    (0.5 * ref_loss).backward()
    # fp32 math on exactly widened bf16 inputs; the gradient is rounded to bf16 once (|dz| <= 0.5)
    ok = torch.allclose(loss, ref_loss, rtol=1e-4)
    ok = ok and torch.allclose(grad.float(), ref_logits.grad, atol=2e-3, rtol=1e-2)
    if not ok:
        warnings.warn(f"qtrain: the Triton cross-entropy disagrees with torch on {device}; using torch")
    return ok


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """The concrete backend, by the one policy of `qtrain.kernels.backend`: "auto" -> "triton" on CUDA
    sm_80+ with triton >= its floor once `triton_self_check` passed on that GPU, else "torch"."""
    return policy.resolve_backend("cross_entropy", backend, x)


def cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, backend: str = "auto"
) -> torch.Tensor:
    """Summed cross-entropy (fp32 scalar) of logits [N, V] against labels [N] int64, differentiable.

    backend "triton": `CrossEntropyFunction` (CUDA, or CPU under TRITON_INTERPRET=1); "torch": the
    reference; "auto": triton on CUDA when it passes its self-check, else torch."""
    if resolve_backend(backend, logits) == "torch":
        return cross_entropy_reference(logits, labels, ignore_index)
    if torch.is_grad_enabled() and logits.requires_grad:
        return CrossEntropyFunction.apply(logits, labels, ignore_index)
    return cross_entropy_forward(logits, labels, ignore_index)
