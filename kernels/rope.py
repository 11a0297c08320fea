"""Rotary position embedding (RoPE) applied to Q and K in place, in one Triton launch.

The math is transformers' `apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)` (Llama, Mistral,
Qwen2, ...), the "rotate_half" convention: with x = [x1, x2] split into halves of d/2,

    out = x * cos + rotate_half(x) * sin,   rotate_half(x) = [-x2, x1]
    out1 = x1 * c1 - x2 * s1,   out2 = x2 * c2 + x1 * s2        (c = [c1, c2], s = [s1, s2])

LlamaRotaryEmbedding returns cos/sin with equal halves (c1 = c2 = cos(theta)), so this rotates
each pair (x1_i, x2_i) by theta_i. The backward is the transpose (for equal halves: the rotation by
-theta, i.e. the same kernel with sin negated), applied in place to the incoming gradient:

    dx1 = g1 * c1 + g2 * s2,    dx2 = g2 * c2 - g1 * s1

Shapes (unsqueeze_dim=1, transformers' default): q [B, H, S, d], k [B, K, S, d] (GQA: K <= H heads,
any K >= 1), cos/sin [B, S, d] or [1, S, d] (anything that broadcasts to [B, S, d]: per-row
position ids of packed sequences give per-row cos/sin). unsqueeze_dim=2: q [B, S, H, d], k [B, S,
K, d], the layout before attention's `.transpose(1, 2)`. d must be even. q and k may be any strided
views (transformers passes `q_proj(x).view(B, S, H, d).transpose(1, 2)`, not contiguous): the
kernel addresses them through their strides and writes into the given tensors.

Anatomy: `rope_reference` (PyTorch, fp32 math; ground truth and the CPU path) -> `_rope_kernel`
(one program per token (b, s): loads cos/sin once, rotates all H query and K key heads) ->
`rope_` (the launcher, no autograd) -> `RoPEFunction` (autograd for one tensor rotated in place)
-> `apply_rope` (dispatch; Q and K in one launch).

Autograd and in-place on views: PyTorch does not let one autograd.Function modify two views in
place (q and k are views of the projections' outputs), so under autograd `apply_rope` launches the
kernel once for both (no autograd), then records each tensor's in-place rotation with its own
`RoPEFunction(..., rotated=True)`, which marks it dirty (bumping its version, so any op that saved
the pre-rotation q/k fails loudly at backward) and whose backward rotates that tensor's gradient.
Forward: one launch; backward: one launch per tensor that needs a gradient.

Numerics: fp32 math in registers, one rounding to q's dtype per element (the reference does the
same; transformers rounds each product and the sum in q's dtype under bf16, so it is up to ~2 ulps
away from both). cos/sin are read in their own dtype and widened.

Gradients flow to q and k only: cos/sin are treated as constants (they come from a buffer of
inverse frequencies); `apply_rope` refuses cos/sin that require a gradient.
"""

from __future__ import annotations

import functools

import torch
from qtrain.kernels import backend as policy
from qtrain.kernels._triton import _jit, is_interpreting, tl, triton  # noqa: F401 - the kernels' globals
from qtrain.kernels.backend import BACKENDS, triton_available  # noqa: F401 - re-exported
from torch.autograd.graph import increment_version

__all__ = ["RoPEFunction", "apply_rope", "rope_", "rope_reference"]

# ---- reference --------------------------------------------------------------------------------------


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ground truth in fp32: `x * cos + rotate_half(x) * sin` for x in (q, k), new tensors in q/k's dtypes."""
    cos = cos.float().unsqueeze(unsqueeze_dim)  # [B, 1, S, d] (or [B, S, 1, d])
    sin = sin.float().unsqueeze(unsqueeze_dim)
    out = []
    for x in (q, k):
        x32 = x.float()  # once: its backward then rounds the summed fp32 gradient to x's dtype once
        out.append((x32 * cos + _rotate_half(x32) * sin).to(x.dtype))
    return out[0], out[1]


# ---- kernel -----------------------------------------------------------------------------------------


@_jit
def _rotate_heads(
    x_ptr, n_heads, stride_h, stride_d, c1, c2, s1, s2,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BACKWARD: tl.constexpr,
):  # fmt: skip
    """Rotate, in place, the [n_heads, 2 * HALF] rows at x_ptr (one token), BLOCK_H heads at a time."""
    offs_d = tl.arange(0, BLOCK_HALF)
    for h0 in range(0, n_heads, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mask = (offs_h[:, None] < n_heads) & (offs_d[None, :] < HALF)  # [BLOCK_H, BLOCK_HALF]
        ptr1 = x_ptr + offs_h[:, None] * stride_h + offs_d[None, :] * stride_d  # first halves
        ptr2 = ptr1 + HALF * stride_d  # second halves
        x1 = tl.load(ptr1, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(ptr2, mask=mask, other=0.0).to(tl.float32)
        if BACKWARD:  # the transpose: rotation by -theta
            y1 = x1 * c1 + x2 * s2
            y2 = x2 * c2 - x1 * s1
        else:
            y1 = x1 * c1 - x2 * s1
            y2 = x2 * c2 + x1 * s2
        tl.store(ptr1, y1.to(x_ptr.dtype.element_ty), mask=mask)
        tl.store(ptr2, y2.to(x_ptr.dtype.element_ty), mask=mask)


@_jit
def _rope_kernel(
    q_ptr, k_ptr, cos_ptr, sin_ptr, S, n_q_heads, n_k_heads,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_cb, stride_cs, stride_cd,
    stride_sb, stride_ss, stride_sd,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
    BACKWARD: tl.constexpr,
):  # fmt: skip
    """One program per token (b, s): q[b, :, s, :] and k[b, :, s, :] rotated in place (fp32 math)."""
    pid = tl.program_id(0).to(tl.int64)
    b = pid // S
    s = pid % S
    offs_d = tl.arange(0, BLOCK_HALF)
    mask_d = offs_d < HALF
    cos_row = cos_ptr + b * stride_cb + s * stride_cs
    sin_row = sin_ptr + b * stride_sb + s * stride_ss
    c1 = tl.load(cos_row + offs_d * stride_cd, mask=mask_d, other=0.0).to(tl.float32)[None, :]  # [1, BLOCK_HALF]
    c2 = tl.load(cos_row + (offs_d + HALF) * stride_cd, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(sin_row + offs_d * stride_sd, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(sin_row + (offs_d + HALF) * stride_sd, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    _rotate_heads(q_ptr + b * stride_qb + s * stride_qs, n_q_heads, stride_qh, stride_qd, c1, c2, s1, s2,
                  HALF, BLOCK_HQ, BLOCK_HALF, BACKWARD)  # fmt: skip
    _rotate_heads(k_ptr + b * stride_kb + s * stride_ks, n_k_heads, stride_kh, stride_kd, c1, c2, s1, s2,
                  HALF, BLOCK_HK, BLOCK_HALF, BACKWARD)  # fmt: skip


# ---- launcher ---------------------------------------------------------------------------------------

_MAX_TILE = 4096  # elements per half-tile [BLOCK_H, BLOCK_HALF] (Llama d=128: 32 heads x 64 per iteration)


def _heads_first(x: torch.Tensor, unsqueeze_dim: int) -> torch.Tensor:
    """A [B, heads, S, d] view of x (same storage), whichever layout unsqueeze_dim says x has."""
    return x if unsqueeze_dim == 1 else x.transpose(1, 2)


def _check_inputs(q, k, cos, sin, unsqueeze_dim) -> None:
    if unsqueeze_dim not in (1, 2):
        raise ValueError(f"rope: unsqueeze_dim must be 1 (q [B, H, S, d]) or 2 (q [B, S, H, d]), got {unsqueeze_dim}")
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"rope: q {tuple(q.shape)} and k {tuple(k.shape)} must be 4-d")
    qh, kh = _heads_first(q, unsqueeze_dim), _heads_first(k, unsqueeze_dim)  # [B, H, S, d], [B, K, S, d]
    B, _, S, d = qh.shape
    if d % 2 or kh.shape[0] != B or kh.shape[2:] != (S, d):
        raise ValueError(
            f"rope: q {tuple(q.shape)} and k {tuple(k.shape)} need the same batch, sequence and even head_dim "
            f"(unsqueeze_dim={unsqueeze_dim})"
        )
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() > 3 or not _broadcasts(t.shape, (B, S, d)):
            raise ValueError(f"rope: {name} must broadcast to [B, S, d] = {(B, S, d)}, got {tuple(t.shape)}")
    for name, t in (("k", k), ("cos", cos), ("sin", sin)):
        if t.device != q.device:
            raise ValueError(f"rope: {name} is on {t.device} but q on {q.device}")
    for name, x in (("q", q), ("k", k)):
        if x.is_leaf and x.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"rope: {name} is a leaf that requires grad: it cannot be rotated in place (pass a clone)")


def _broadcasts(shape, target) -> bool:
    return all(a in (1, b) for a, b in zip(reversed(shape), reversed(target)))


def rope_(
    q: torch.Tensor,
    k: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    unsqueeze_dim: int = 1,
    backward: bool = False,
) -> None:
    """Rotate q (and k, unless None) IN PLACE in one launch, no autograd: by theta, or with `backward`
    by the transpose (-theta). Any strides; q/k layouts as `unsqueeze_dim` says (see the module doc)."""
    if triton is None:
        raise ImportError("qtrain.kernels.rope: the Triton path needs triton (`pip install triton`, Linux)")
    if not (q.is_cuda or is_interpreting()):
        raise RuntimeError(
            f"rope: the Triton kernel needs CUDA tensors (q is on {q.device}); use backend='torch' on CPU, or set "
            "TRITON_INTERPRET=1 before triton is first imported (tests do)"
        )
    qh = _heads_first(q, unsqueeze_dim)  # [B, H, S, d]
    kh = qh[:, :0] if k is None else _heads_first(k, unsqueeze_dim)  # [B, K, S, d]; K = 0: q only
    B, H, S, d = qh.shape
    if B * S == 0 or H + kh.shape[1] == 0:
        return
    cos, sin = cos.expand(B, S, d), sin.expand(B, S, d)  # [B, S, d]; stride 0 over a broadcast batch
    half = d // 2
    block_half = triton.next_power_of_2(half)
    block_rows = max(1, _MAX_TILE // block_half)
    block_hq = min(triton.next_power_of_2(max(H, 1)), block_rows)
    block_hk = min(triton.next_power_of_2(max(kh.shape[1], 1)), block_rows)
    # memory-bound; 4 warps: at d=128 with 32 heads per tile ptxas gives ~140 registers and no spills
    # (sm_80/sm_90, compile-only statistics; NOT timed on a GPU yet)
    _rope_kernel[(B * S,)](
        qh, kh, cos, sin, S, H, kh.shape[1],
        *qh.stride(), *kh.stride(), *cos.stride(), *sin.stride(),
        HALF=half, BLOCK_HALF=block_half, BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BACKWARD=backward,
        num_warps=4 if block_half * max(block_hq, block_hk) >= 1024 else 2,
    )  # fmt: skip


# ---- autograd ---------------------------------------------------------------------------------------


def _writable_grad(grad: torch.Tensor, inplace: bool) -> torch.Tensor:
    """The incoming gradient itself when it may be overwritten, else a private copy.

    An expanded gradient (stride 0, e.g. from `.sum()`) cannot be written element by element."""
    overlapping = any(st == 0 and n > 1 for st, n in zip(grad.stride(), grad.shape))
    return grad if inplace and not overlapping else grad.clone()


class RoPEFunction(torch.autograd.Function):
    """`x` rotated IN PLACE by RoPE (q or k alone: one launch), marked dirty; returns x.

    `rotated=True`: x was already rotated by a launch outside autograd (`apply_rope` rotates q and
    k together, then records each with this Function); forward then only marks it dirty.
    Backward rotates the incoming gradient by the transpose, in place when `inplace_backward`
    (safe when that gradient is not shared with another branch of the graph, e.g. it comes from
    attention's backward; with False a copy is rotated). cos/sin get no gradient.
    """

    @staticmethod
    def forward(ctx, x, cos, sin, unsqueeze_dim: int = 1, inplace_backward: bool = True, rotated: bool = False):
        if not rotated:
            rope_(x, None, cos, sin, unsqueeze_dim)
        ctx.mark_dirty(x)
        ctx.save_for_backward(cos, sin)
        ctx.unsqueeze_dim, ctx.inplace_backward = unsqueeze_dim, inplace_backward
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        grad = _writable_grad(grad, ctx.inplace_backward)
        rope_(grad, None, cos, sin, ctx.unsqueeze_dim, backward=True)
        return grad, None, None, None, None, None


# ---- dispatch ---------------------------------------------------------------------------------------


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """The concrete backend, by the one policy of `qtrain.kernels.backend`: "auto" -> "triton" on CUDA
    sm_80+ with triton >= its floor once `triton_self_check` passed on that GPU, else "torch"."""
    return policy.resolve_backend("rope", backend, x)


@functools.cache
def triton_self_check(device: torch.device) -> bool:
    """The kernel against the reference once on `device`, as attention calls it (bf16 q and GQA k,
    per-row cos/sin, both gradients): the guard `qtrain.kernels.backend` runs before "auto" uses it."""

    def run(backend: str) -> list[torch.Tensor]:
        g = torch.Generator(device="cpu").manual_seed(0)
        q0, k0 = (torch.randn(s, generator=g).to(device, torch.bfloat16).requires_grad_() for s in ((2, 4, 5, 18), (2, 2, 5, 18)))
        theta = torch.rand(2, 5, 9, generator=g).mul(6).repeat(1, 1, 2).to(device)  # [B, S, d], equal halves
        q, k = apply_rope(q0 * 1, k0 * 1, theta.cos(), theta.sin(), backend=backend)
        (q.float().square().sum() + k.float().sum()).backward()
        return [q.detach(), k.detach(), q0.grad, k0.grad]

    return policy.compare_with_torch("RoPE", device, run, rtol=2e-2, atol=2e-2)


def _bump_version(x: torch.Tensor) -> None:
    """Record an in-place write made outside autograd (as a torch in-place op would)."""
    if not x.is_inference():
        increment_version(x)


def apply_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    unsqueeze_dim: int = 1,
    backend: str = "auto",
    inplace_backward: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE on q and k IN PLACE (a drop-in for transformers' `apply_rotary_pos_emb`); returns (q, k).

    q [B, H, S, d] and k [B, K, S, d] (unsqueeze_dim=1) or [B, S, H, d] / [B, S, K, d]
    (unsqueeze_dim=2), any strides; cos/sin broadcastable to [B, S, d]. The returned tensors are
    q and k themselves, rotated (use them: under autograd they carry the new history). q/k must
    not be leaves that require a gradient (as for any in-place op); cos/sin must not require one.

    backend "triton": one launch for q and k (CUDA, or CPU under TRITON_INTERPRET=1); "torch": the
    fp32 reference, copied into q and k; "auto": triton on CUDA when installed, else torch.
    `inplace_backward`: see `RoPEFunction`.
    """
    _check_inputs(q, k, cos, sin, unsqueeze_dim)
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("apply_rope: cos/sin get no gradient here; use rope_reference when they need one")
    if resolve_backend(backend, q) == "torch":
        q_rot, k_rot = rope_reference(q, k, cos, sin, unsqueeze_dim)
        return q.copy_(q_rot), k.copy_(k_rot)
    rope_(q, k, cos, sin, unsqueeze_dim)  # one launch, outside autograd
    out = []
    for x in (q, k):
        if torch.is_grad_enabled() and x.requires_grad:
            x = RoPEFunction.apply(x, cos, sin, unsqueeze_dim, inplace_backward, True)
        else:
            _bump_version(x)
        out.append(x)
    return out[0], out[1]
