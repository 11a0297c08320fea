"""NF4 linear + LoRA for small M (decode, generation, eval): a GEMV-style Triton kernel, no tensor cores.

Why: with M <= 16 rows the product is bound by reading the 4-bit weight (0.5 byte per weight), and a
`tl.dot` tile pads M up to 16 and pays the MMA pipeline's latency for nothing. Here each program owns
BLOCK_N rows of W and up to 16 rows of X, streams K with wide byte loads (a row's bytes are
contiguous), maps each byte to its two fp32 levels through the 256-entry pair table
(`nf4_dequant.nf4_pair_table`, one 8-byte load per byte), applies one absmax per 64-value block,
rounds each weight to X's dtype exactly as `dequantize_nf4(W, x.dtype)` would (so every path
multiplies the same weights), and accumulates `x * w` in fp32 with a plain reduction. More than 16
rows of X: one program per (BLOCK_N rows of W, 16 rows of X).

The LoRA term (rank r, tiny) is added in torch as in the dequant path (`Y.addmm_(XA, B^T, alpha=s)`);
the backward is the dequant path's (`nf4_matmul.lora_backward`): decode rarely needs it, but autograd
must work.

Anatomy: `nf4_lora_reference` (nf4_lora.py) -> `_gemv_w_tile`, `_nf4_gemv_kernel` -> the launcher
`nf4_gemv` -> `NF4GemvLoRAFunction` -> `nf4_lora_gemv`. Needs CUDA, or TRITON_INTERPRET=1 on CPU.

Shapes: X [M, K], W [N, K] (NF4), A [r, K], B [N, r], bias [N], Y [M, N].
"""

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # pragma: no cover - exercised only on installs without triton
    raise ImportError(
        "qtrain.kernels.nf4_gemv needs triton (`pip install triton`, Linux); use backend='torch' without it"
    ) from exc

import torch
from qtrain.kernels._triton import _round_to, is_interpreting
from qtrain.kernels.nf4 import NF4Tensor, nf4_pair_table
from qtrain.kernels.nf4_dequant import _absmax, _pair_levels, check_device
from qtrain.kernels.nf4_matmul import apply_lora_function, lora_backward, lora_forward

__all__ = ["MAX_ROWS", "NF4GemvLoRAFunction", "nf4_gemv", "nf4_lora_gemv"]

MAX_ROWS = 16  # rows of X per program (X with more rows is cut into chunks of 16)
# BLOCK_M * BLOCK_N * BLOCK_K of one K step's product. NOT TIMED (no GPU yet): from compile-only
# statistics (sm_90, bf16, 4 warps, triton 3.9's ptxas): 2048 elements (16 per thread) take 72-107
# registers and no spills at BLOCK_M 1..16; 4096 took 210-255 registers (low occupancy for a
# memory-bound kernel).
_TILE_ELEMENTS = 2048


# ---- kernel ----------------------------------------------------------------------------------------


@triton.jit
def _gemv_w_tile(
    packed_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, pairs_ptr, absmax_offset,
    offs_n, k0, N, K,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCKSIZE: tl.constexpr, ABSMAX_BLOCKSIZE: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    """fp32 tile W[offs_n, k0:k0+BLOCK_K] -> [BLOCK_N, BLOCK_K]; out-of-range entries finite.

    ALIGNED (K % BLOCKSIZE == 0 and BLOCKSIZE divides BLOCK_K): a tile row is BLOCK_K/2 contiguous
    bytes and BLOCK_K/BLOCKSIZE whole quantization blocks. Otherwise every element finds its byte,
    its nibble and its block from its flat index.
    """
    row_ok = offs_n < N  # [BLOCK_N]
    if ALIGNED:
        offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # [BLOCK_K/2]
        byte = tl.load(packed_ptr + offs_n[:, None] * (K // 2) + offs_b[None, :],
                       mask=row_ok[:, None] & (offs_b[None, :] < K // 2), other=0)  # fmt: skip
        hi, lo = _pair_levels(pairs_ptr, byte)
        values = tl.interleave(hi, lo)  # [BLOCK_N, BLOCK_K]
        G: tl.constexpr = BLOCK_K // BLOCKSIZE
        offs_g = tl.arange(0, G)
        blk = (offs_n[:, None] * K + k0) // BLOCKSIZE + offs_g[None, :]  # [BLOCK_N, G]
        g_mask = row_ok[:, None] & (k0 + offs_g[None, :] * BLOCKSIZE < K)
        amax = _absmax(absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset, blk, g_mask,
                       DOUBLE_QUANT, ABSMAX_BLOCKSIZE)  # fmt: skip
        return tl.reshape(tl.reshape(values, (BLOCK_N, G, BLOCKSIZE)) * amax[:, :, None], (BLOCK_N, BLOCK_K))
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = row_ok[:, None] & (offs_k[None, :] < K)
        flat = offs_n[:, None] * K + offs_k[None, :]  # [BLOCK_N, BLOCK_K] int64 index into the flat weight
        hi, lo = _pair_levels(pairs_ptr, tl.load(packed_ptr + flat // 2, mask=mask, other=0))
        values = tl.where(flat % 2 == 0, hi, lo)  # even flat index: high nibble
        amax = _absmax(absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset, flat // BLOCKSIZE, mask,
                       DOUBLE_QUANT, ABSMAX_BLOCKSIZE)  # fmt: skip
        return values * amax


@triton.jit
def _nf4_gemv_kernel(
    x_ptr, packed_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, pairs_ptr, bias_ptr, y_ptr,
    M, N, K, absmax_offset, stride_xm, stride_ym,
    BLOCKSIZE: tl.constexpr, ABSMAX_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, ALIGNED: tl.constexpr,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Y[BLOCK_M, BLOCK_N] tile = X @ dequant(W)^T (+ bias), fp32 multiply-add reduction, no tl.dot."""
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] rows of W
    offs_m = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] rows of X
    x_dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        w = _gemv_w_tile(packed_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, pairs_ptr, absmax_offset,
                         offs_n, k0, N, K, BLOCK_N, BLOCK_K, BLOCKSIZE, ABSMAX_BLOCKSIZE, DOUBLE_QUANT, ALIGNED)  # fmt: skip
        w = _round_to(w, x_dtype).to(tl.float32)  # the weight every NF4 path multiplies: W in X's dtype
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x_mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=x_mask, other=0.0).to(tl.float32)
        acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)  # [BLOCK_M, BLOCK_N]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    y_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], _round_to(acc, y_ptr.dtype.element_ty), mask=y_mask)


# ---- launcher --------------------------------------------------------------------------------------


def gemv_config(M: int, blocksize: int) -> dict:
    """Tile sizes for M rows: BLOCK_M = next power of two <= 16, BLOCK_K one or two NF4 blocks,
    BLOCK_N filling `_TILE_ELEMENTS` (4..64 rows of W). Interpreter: small tiles."""
    block_m = min(MAX_ROWS, triton.next_power_of_2(max(M, 1)))
    block_k = max(blocksize, 64)
    if is_interpreting():
        return {"BLOCK_M": block_m, "BLOCK_N": 16, "BLOCK_K": block_k}
    block_n = min(64, max(4, _TILE_ELEMENTS // (block_m * block_k)))
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": 4}


def nf4_gemv(x: torch.Tensor, weight: NF4Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Y [M, N] = X [M, K] @ dequant(W)^T + bias, in X's dtype (fp32/fp16/bf16)."""
    check_device(x, "x")
    if weight.device != x.device or len(weight.shape) != 2 or x.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x [M, K] on the NF4 weight's device ({weight.device}) with K={weight.shape[-1]}, got {tuple(x.shape)} on {x.device}")
    if weight.blocksize & (weight.blocksize - 1) or weight.absmax_blocksize & (weight.absmax_blocksize - 1):
        raise ValueError(f"NF4 blocksizes must be powers of two, got {weight.blocksize}/{weight.absmax_blocksize}")
    x = x if x.stride(1) == 1 else x.contiguous()
    (M, K), N = x.shape, weight.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    if K == 0:
        return y.zero_() if bias is None else y.copy_(bias.expand(M, N))
    cfg = gemv_config(M, weight.blocksize)
    absmax_code = weight.absmax_code if weight.double_quant else weight.absmax
    absmax_scale = weight.absmax_scale if weight.double_quant else weight.absmax
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(M, cfg["BLOCK_M"]))
    _nf4_gemv_kernel[grid](
        x, weight.packed, weight.absmax, absmax_code, absmax_scale, nf4_pair_table(torch.float32, x.device),
        bias if bias is not None else x, y,
        M, N, K, float(weight.absmax_offset), x.stride(0), y.stride(0),
        BLOCKSIZE=weight.blocksize, ABSMAX_BLOCKSIZE=weight.absmax_blocksize, DOUBLE_QUANT=weight.double_quant,
        ALIGNED=K % weight.blocksize == 0, HAS_BIAS=bias is not None, **cfg, enable_fp_fusion=False,
    )  # fmt: skip
    return y


# ---- autograd --------------------------------------------------------------------------------------


def _gemv_base(x: torch.Tensor, weight: NF4Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return nf4_gemv(x, weight, bias)


class NF4GemvLoRAFunction(torch.autograd.Function):
    """`Y = X @ dequant(W)^T + s * (H @ A^T) @ B^T + bias`: GEMV forward, the dequant path's backward."""

    @staticmethod
    def forward(ctx, x, h, weight: NF4Tensor, lora_a, lora_b, bias, scale: float, fall_back: bool):
        return lora_forward(ctx, _gemv_base, x, h, weight, lora_a, lora_b, bias, scale, fall_back)

    @staticmethod
    def backward(ctx, grad_y):
        return lora_backward(ctx, grad_y.contiguous())


def nf4_lora_gemv(
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
    """The small-M path, same signature and semantics as `nf4_lora_torch`; returns compute_dtype(x).
    `fall_back` (set by backend "auto"): a Triton error in the backward dequantizes with torch."""
    check_device(x, "x")
    args = (x, weight, lora_a, lora_b, scale, bias, dropout, training, fall_back)
    return apply_lora_function(NF4GemvLoRAFunction, *args)
