"""NF4 dequantization in Triton: `W = code[idx] * absmax[block]`, bit-identical to bitsandbytes.

Anatomy: `nf4_dequantize_reference` (PyTorch, the ground truth) -> `@triton.jit` helpers shared with
the fused NF4+LoRA kernels (`_absmax`, `_nf4_levels`, `_dequant_tile`; `_round_to` from `_triton.py`) and with the
GEMV kernel (`_pair_levels`) -> `_nf4_dequant_kernel` -> the launcher `nf4_dequantize_triton`.
Needs triton >= 3.4 (`tl.gather`, used by the fused kernels' tiles).

The standalone kernel (the large-M path of nf4_matmul.py dequantizes every weight with it, once per
forward and once per backward, so it must run at memory speed): each program takes whole 64-value
blocks, reads a block's 32 packed bytes contiguously (wide loads), maps every byte to its two fp32
levels with ONE 8-byte load from the 256-entry pair table (`nf4_pair_table`), applies one absmax
per block, and computes int64 offsets (a weight may pass 2^31 elements). It writes into an optional
`out=` buffer (nf4_matmul's reusable per-device buffer).

Layout (see kernels/nf4.py): `packed` is uint8 [ceil(n/2)] over the flattened weight, the FIRST
element of a pair in the HIGH nibble; one absmax per BLOCKSIZE (64) consecutive elements of the
flattened weight. Double-quantized, absmax[b] = absmax_code[absmax_u8[b]] * absmax_scale[b // 256]
+ absmax_offset, in fp32, a multiply then an add (two roundings): launches pass
`enable_fp_fusion=False` so that the GPU compiler does not contract them into one FMA, which would
round once and break bit-equality with the reference.

Needs triton at import; `qtrain.kernels` imports this module lazily, so CPU-only installs without
triton keep working with the `torch` backend. On CPU the kernel runs under the Triton interpreter:
`TRITON_INTERPRET=1` must be set before triton itself is first imported, because `@triton.jit` reads
it when it decorates, and triton.language's own helpers (tl.zeros, tl.interleave) are decorated at
`import triton` (tests/conftest.py does this). The interpreter's fp32->bf16 cast truncates, so bf16
outputs are rounded with integer ops (`_round_to`), which give the GPU's and torch's bits.
"""

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # pragma: no cover - exercised only on installs without triton
    raise ImportError(
        "qtrain.kernels.nf4_dequant needs triton (`pip install triton`, Linux); use backend='torch' without it"
    ) from exc

import torch
from qtrain.kernels._triton import _round_to, is_interpreting
from qtrain.kernels.nf4 import NF4Tensor, dequantize_nf4, nf4_pair_table

# Elements per program of the standalone dequant kernel, in whole NF4 blocks (16 blocks of 64: 512
# bytes in, 1024 values out, 16 absmax). Memory-bound. Not tuned: no GPU measured yet.
_DEQUANT_ELEMENTS = 1024


def nf4_dequantize_reference(nf4: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Ground truth: `qtrain.kernels.nf4.dequantize_nf4` (bit-identical to bitsandbytes `dequantize_4bit`)."""
    return dequantize_nf4(nf4, dtype)


# ---- device helpers, shared with the fused NF4+LoRA kernels --------------------------------------


@triton.jit
def _absmax(
    absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset, blk, mask,
    DOUBLE_QUANT: tl.constexpr, ABSMAX_BLOCKSIZE: tl.constexpr,
):  # fmt: skip
    """fp32 absmax of quantization blocks `blk` (any shape), undoing double quantization."""
    if DOUBLE_QUANT:
        q = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)  # uint8 index into absmax_code
        value = tl.load(absmax_code_ptr + q)
        scale = tl.load(absmax_scale_ptr + blk // ABSMAX_BLOCKSIZE, mask=mask, other=0.0)
        return value * scale + absmax_offset  # two roundings: launch with enable_fp_fusion=False
    else:
        return tl.load(absmax_ptr + blk, mask=mask, other=0.0)


@triton.jit
def _nf4_levels(code_ptr, idx, BLOCK_N: tl.constexpr):
    """The NF4 levels code[idx] of an index tile [BLOCK_N, X], looked up in registers.

    `tl.gather` on the 16-entry table instead of a global-memory gather `tl.load(code_ptr + idx)`:
    compiled for sm_80-90, the latter had the software pipeliner stage every gathered fp32 value
    through shared memory (~64 KB more for a 128x64 tile at 3 stages), the former needs none.
    """
    levels = tl.load(code_ptr + tl.arange(0, 16))  # [16] fp32
    return tl.gather(tl.broadcast_to(levels[None, :], (BLOCK_N, 16)), idx, axis=1)


@triton.jit
def _dequant_tile(
    packed_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, code_ptr, absmax_offset,
    offs_n, k0, N, K,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCKSIZE: tl.constexpr, ABSMAX_BLOCKSIZE: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    """fp32 tile W[offs_n, k0:k0+BLOCK_K] of the NF4 weight [N, K]: `code[idx] * absmax` -> [BLOCK_N, BLOCK_K].

    Out-of-range entries are finite (not necessarily zero): callers mask the other operand.
    ALIGNED (K % BLOCKSIZE == 0, k0 a multiple of min(BLOCK_K, BLOCKSIZE), and one of BLOCK_K,
    BLOCKSIZE divides the other): each row's bytes are contiguous and a row's run of BLOCKSIZE
    values is one quantization block, so the tile reads BLOCK_K/2 bytes per row and one absmax per
    (row, block). Otherwise (K not a multiple of 64: blocks and bytes straddle rows) every element
    gathers its byte and its absmax.
    """
    row_ok = offs_n < N  # [BLOCK_N]
    if ALIGNED:
        offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # [BLOCK_K/2] byte columns of the tile
        b_mask = row_ok[:, None] & (offs_b[None, :] < K // 2)
        byte = tl.load(packed_ptr + offs_n[:, None] * (K // 2) + offs_b[None, :], mask=b_mask, other=0)
        idx = tl.interleave(byte >> 4, byte & 0xF).to(tl.int32)  # [BLOCK_N, BLOCK_K], high nibble first
        values = _nf4_levels(code_ptr, idx, BLOCK_N)  # [BLOCK_N, BLOCK_K] fp32
        if BLOCK_K <= BLOCKSIZE:  # the whole tile row lies in one quantization block
            blk = (offs_n * K + k0) // BLOCKSIZE  # [BLOCK_N]
            amax = _absmax(absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset, blk, row_ok,
                           DOUBLE_QUANT, ABSMAX_BLOCKSIZE)  # fmt: skip
            w = values * amax[:, None]
        else:  # BLOCK_K / BLOCKSIZE whole blocks per tile row
            G: tl.constexpr = BLOCK_K // BLOCKSIZE
            offs_g = tl.arange(0, G)
            g_mask = row_ok[:, None] & (k0 + offs_g[None, :] * BLOCKSIZE < K)
            blk = (offs_n[:, None] * K + k0) // BLOCKSIZE + offs_g[None, :]  # [BLOCK_N, G]
            amax = _absmax(absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset, blk, g_mask,
                           DOUBLE_QUANT, ABSMAX_BLOCKSIZE)  # fmt: skip
            w = tl.reshape(tl.reshape(values, (BLOCK_N, G, BLOCKSIZE)) * amax[:, :, None], (BLOCK_N, BLOCK_K))
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = row_ok[:, None] & (offs_k[None, :] < K)
        flat = offs_n[:, None] * K + offs_k[None, :]  # [BLOCK_N, BLOCK_K] index into the flat weight
        byte = tl.load(packed_ptr + flat // 2, mask=mask, other=0).to(tl.int32)
        idx = (byte >> ((1 - flat % 2) * 4)) & 0xF  # even flat index: high nibble
        values = _nf4_levels(code_ptr, idx, BLOCK_N)
        amax = _absmax(absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset, flat // BLOCKSIZE, mask,
                       DOUBLE_QUANT, ABSMAX_BLOCKSIZE)  # fmt: skip
        w = values * amax
    return w


# ---- the standalone dequantization kernel ---------------------------------------------------------


@triton.jit
def _pair_levels(pairs_ptr, byte):
    """(code[byte >> 4], code[byte & 15]) in fp32 for a tile of packed bytes: one table load per byte."""
    pair = tl.load(pairs_ptr + byte.to(tl.int32))  # int64, two fp32 bit patterns
    hi = (pair & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True)
    lo = ((pair >> 32) & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True)
    return hi, lo


@triton.jit
def _nf4_dequant_kernel(
    packed_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, pairs_ptr, out_ptr,
    n, n_blocks, absmax_offset,
    BLOCKS: tl.constexpr, BLOCKSIZE: tl.constexpr, ABSMAX_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
):  # fmt: skip
    """out[i] = (code[idx[i]] * absmax[i // BLOCKSIZE]).to(out dtype) for BLOCKS whole NF4 blocks per program.

    A block's BLOCKSIZE/2 bytes are contiguous (wide loads); each byte maps to its two levels through
    the pair table; one absmax per block. Offsets are int64 (weights may pass 2^31 elements).
    """
    blk = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)  # [BLOCKS] block indices
    blk_ok = blk < n_blocks
    offs_b = blk[:, None] * (BLOCKSIZE // 2) + tl.arange(0, BLOCKSIZE // 2)[None, :]  # [BLOCKS, BLOCKSIZE/2]
    byte = tl.load(packed_ptr + offs_b, mask=blk_ok[:, None] & (offs_b < (n + 1) // 2), other=0)
    hi, lo = _pair_levels(pairs_ptr, byte)
    values = tl.interleave(hi, lo)  # [BLOCKS, BLOCKSIZE], element 2b from the high nibble
    amax = _absmax(absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset, blk, blk_ok,
                   DOUBLE_QUANT, ABSMAX_BLOCKSIZE)  # fmt: skip
    w = values * amax[:, None]  # fp32, as the reference
    offs = blk[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]  # [BLOCKS, BLOCKSIZE] int64
    tl.store(out_ptr + offs, _round_to(w, out_ptr.dtype.element_ty), mask=offs < n)


# ---- launcher ------------------------------------------------------------------------------------


def check_device(t: torch.Tensor, what: str) -> None:
    """Fail clearly when a compiled kernel would get CPU tensors (or the interpreter CUDA ones)."""
    if t.is_cuda or is_interpreting():
        return
    raise RuntimeError(
        f"the Triton kernels need CUDA tensors ({what} is on {t.device}); on CPU use backend='torch', or set "
        "TRITON_INTERPRET=1 before qtrain.kernels' Triton modules are first imported (tests do)"
    )


def nf4_args(nf4: NF4Tensor) -> tuple:
    """Pointer arguments (packed, absmax, absmax_code, absmax_scale, code) and absmax_offset of `nf4`.

    Without double quantization the absmax_code/scale pointers are unused: absmax stands in.
    """
    if nf4.blocksize & (nf4.blocksize - 1) or nf4.absmax_blocksize & (nf4.absmax_blocksize - 1):
        raise ValueError(f"NF4 blocksizes must be powers of two, got {nf4.blocksize}/{nf4.absmax_blocksize}")
    if nf4.numel() >= 2**31:
        raise ValueError(f"NF4 weights of {nf4.numel()} elements overflow the kernels' int32 indexing")
    absmax_code = nf4.absmax_code if nf4.double_quant else nf4.absmax
    absmax_scale = nf4.absmax_scale if nf4.double_quant else nf4.absmax
    return (nf4.packed, nf4.absmax, absmax_code, absmax_scale, nf4.code), float(nf4.absmax_offset)


def _dequant_out(nf4: NF4Tensor, dtype: torch.dtype, out: torch.Tensor | None) -> torch.Tensor:
    """`out` checked (contiguous, nf4's numel, dtype, device) and viewed as nf4's shape, or a new tensor."""
    if out is None:
        return torch.empty(nf4.shape, dtype=dtype, device=nf4.device)
    if out.dtype != dtype or out.device != nf4.device or out.numel() != nf4.numel() or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous {dtype} tensor of {nf4.numel()} elements on {nf4.device}, "
            f"got {out.dtype} {tuple(out.shape)} on {out.device}"
        )
    return out.view(nf4.shape)


def nf4_dequantize_triton(nf4: NF4Tensor, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The dequantized weight in `dtype` (default: the original dtype), bit-identical to the reference.

    `out`: a contiguous buffer of nf4's numel in `dtype` (e.g. a slice of a reusable workspace) to
    write into instead of allocating; returned viewed as the weight's shape.
    """
    check_device(nf4.packed, "the NF4 weight")
    dtype = dtype or nf4.dtype
    out = _dequant_out(nf4, dtype, out)
    n = nf4.numel()
    if n == 0:
        return out
    if nf4.blocksize & (nf4.blocksize - 1) or nf4.absmax_blocksize & (nf4.absmax_blocksize - 1):
        raise ValueError(f"NF4 blocksizes must be powers of two, got {nf4.blocksize}/{nf4.absmax_blocksize}")
    absmax_code = nf4.absmax_code if nf4.double_quant else nf4.absmax
    absmax_scale = nf4.absmax_scale if nf4.double_quant else nf4.absmax
    n_blocks = triton.cdiv(n, nf4.blocksize)
    blocks = max(1, _DEQUANT_ELEMENTS // nf4.blocksize)
    _nf4_dequant_kernel[(triton.cdiv(n_blocks, blocks),)](
        nf4.packed, nf4.absmax, absmax_code, absmax_scale, nf4_pair_table(torch.float32, nf4.device), out,
        n, n_blocks, float(nf4.absmax_offset),
        BLOCKS=blocks, BLOCKSIZE=nf4.blocksize, ABSMAX_BLOCKSIZE=nf4.absmax_blocksize, DOUBLE_QUANT=nf4.double_quant,
        num_warps=4, enable_fp_fusion=False,
    )  # fmt: skip
    return out
