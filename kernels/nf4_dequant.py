"""NF4 dequantization in Triton: `W = code[idx] * absmax[block]`, bit-identical to bitsandbytes.

Anatomy: `nf4_dequantize_reference` (PyTorch, the ground truth) -> `@triton.jit` helpers shared with
the fused NF4+LoRA kernels (`_absmax`, `_nf4_levels`, `_dequant_tile`, `_round_to`) ->
`_nf4_dequant_kernel` -> the launcher `nf4_dequantize_triton`. Needs triton >= 3.2 (`tl.gather`).

Layout (see qtrain/nf4.py): `packed` is uint8 [ceil(n/2)] over the flattened weight, the FIRST
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

from qtrain.nf4 import NF4Tensor, dequantize_nf4

# Elements per program of the standalone dequant kernel (memory-bound: 512 bytes in, 1024 values
# out; the absmax is gathered per element, so any blocksize works). Not tuned: no GPU measured yet.
_DEQUANT_BLOCK = 1024


def nf4_dequantize_reference(nf4: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Ground truth: `qtrain.nf4.dequantize_nf4` (bit-identical to bitsandbytes `dequantize_4bit`)."""
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


@triton.jit
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


# ---- the standalone dequantization kernel ---------------------------------------------------------


@triton.jit
def _nf4_dequant_kernel(
    packed_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, code_ptr, out_ptr,
    n, absmax_offset,
    BLOCK: tl.constexpr, BLOCKSIZE: tl.constexpr, ABSMAX_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
):  # fmt: skip
    """out[i] = (code[idx[i]] * absmax[i // BLOCKSIZE]).to(out dtype) for BLOCK elements per program."""
    pid = tl.program_id(0)
    offs_b = pid * (BLOCK // 2) + tl.arange(0, BLOCK // 2)  # [BLOCK/2] bytes
    byte = tl.load(packed_ptr + offs_b, mask=offs_b < (n + 1) // 2, other=0)
    idx = tl.interleave(byte >> 4, byte & 0xF).to(tl.int32)  # [BLOCK], element 2b from the high nibble
    offs = pid * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] flat element indices
    mask = offs < n
    amax = _absmax(absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset, offs // BLOCKSIZE, mask,
                   DOUBLE_QUANT, ABSMAX_BLOCKSIZE)  # fmt: skip
    w = tl.gather(tl.load(code_ptr + tl.arange(0, 16)), idx, axis=0) * amax  # fp32, as the reference
    tl.store(out_ptr + offs, _round_to(w, out_ptr.dtype.element_ty), mask=mask)


# ---- launcher ------------------------------------------------------------------------------------


def is_interpreting() -> bool:
    """Whether this module's kernels were built for the Triton interpreter (CPU tensors)."""
    return not isinstance(_nf4_dequant_kernel, triton.runtime.JITFunction)


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


def nf4_dequantize_triton(nf4: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dequantized weight in `dtype` (default: the original dtype), bit-identical to the reference."""
    check_device(nf4.packed, "the NF4 weight")
    n = nf4.numel()
    out = torch.empty(nf4.shape, dtype=dtype or nf4.dtype, device=nf4.device)
    if n == 0:
        return out
    ptrs, offset = nf4_args(nf4)
    _nf4_dequant_kernel[(triton.cdiv(n, _DEQUANT_BLOCK),)](
        *ptrs, out, n, offset,
        BLOCK=_DEQUANT_BLOCK, BLOCKSIZE=nf4.blocksize, ABSMAX_BLOCKSIZE=nf4.absmax_blocksize, DOUBLE_QUANT=nf4.double_quant,
        num_warps=4, enable_fp_fusion=False,
    )  # fmt: skip
    return out
