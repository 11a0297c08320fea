"""Fused NF4 linear + LoRA in Triton: `Y = X @ dequant(W)^T + s * (X @ A^T) @ B^T + bias`.

Why a separate file from `nf4_lora.py`: that one (reference + torch backend + dispatch) must import
on CPU-only installs without triton; this one needs triton at import and is imported lazily by
`qtrain.kernels.nf4_lora.nf4_lora` when the `triton` backend is chosen.

Anatomy: `nf4_lora_reference` (fp32 PyTorch ground truth, from nf4_lora.py) -> `@triton.jit`
kernels: `_nf4_lora_fwd_kernel` (tiled), `_nf4_lora_fwd_small_m_kernel` (M <= 16, split-K),
`_nf4_lora_bwd_kernel` (dX) -> launchers `nf4_lora_fwd`, `nf4_lora_bwd_dx` -> `NF4LoRAFunction` ->
the backend entry point `nf4_lora_triton`.

Shapes: X [M, K], W [N, K] (NF4, 4-bit), A [r, K], B [N, r], bias [N], Y [M, N].

- Forward: the W tile [BLOCK_N, BLOCK_K] is dequantized in registers inside the K loop (4-bit
  bytes read once per tile, W never exists in 16 bits), rounded to X's dtype exactly as
  `dequantize_nf4(W, x.dtype)` would, and fed to `tl.dot` with fp32 accumulation. The low-rank
  product XA = X @ A^T [M, r] is computed first (torch, in the adapter dtype) and added in the
  epilogue: `acc + s * XA @ B^T + bias`, rounded once to X's dtype.
- Backward: dX = dY @ dequant(W) + s * (dY @ B) @ A with the same in-register tiles (now the
  reduction runs over N); dA = s * (dY @ B)^T @ X, dB = s * dY^T @ XA and dbias = sum(dY) are
  small products done in torch. The frozen base gets no gradient.
- Dropout (LoRA path only, as the torch backend): the dropped-out input h is passed separately;
  XA and dA use h, and the adapter's share of dX, s * (dY @ B) @ A, is returned as h's gradient
  (autograd then applies the dropout mask) instead of being fused into the dX kernel.
- The adapter stays in its own dtype (fp32 by default); its products run in fp32, but only the
  small [M, r] tensors and row chunks of X / dY are ever upcast: no fp32 copy of X [M, K] or
  dY [M, N] (9 GB at 80k tokens for a fused gate_up). The dX kernel reads dY in its own dtype.
- Autocast: `NF4LoRAFunction` computes in `compute_dtype(x)` (the autocast dtype under autocast)
  with autocast off inside forward and backward, and returns Y in that dtype and every gradient in
  its input's dtype; training runs the forward under autocast and the backward outside it.
- Row offsets: every product of a token index and a row stride goes through `_row_offsets`, in
  int64 (80k tokens x 28,672 columns passes 2^31).

Numerics: one rounding of the fp32 accumulator at the end (the torch backend rounds base, adapter
and sum separately, so this is at least as close to the fp32 reference). fp32 inputs use IEEE fp32
`tl.dot` (no TF32). The rank-r epilogue dots always use IEEE precision (`LORA_PRECISION`): they are
tiny, and TF32 would truncate their fp32 operands to 10 mantissa bits (a biased 2^-10 error).

Autotuning: keyed on a bucketed M (`m_bucket`, powers of two up to M_BUCKET_MAX) and (N, K); the
small-M path on (N, K) only, so generation does not re-tune per batch size. Timings use
`_bench_no_flush` (no 256 MB L2-flush buffer that could fake an OOM near the memory cap) and are
cached on disk where triton supports it. `fixed_configs()` switches tuning off (the self-check).

Interpreter (CPU tests, TRITON_INTERPRET=1): its `tl.dot` is wrong on bf16 operands, so there bf16
tiles are rounded to bf16 exactly and then multiplied in fp32 (`DOT_DTYPE`); one small config is
used, no autotuning.
"""

import contextlib
import functools
import inspect

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # pragma: no cover - exercised only on installs without triton
    raise ImportError(
        "qtrain.kernels.nf4_lora_triton needs triton (`pip install triton`, Linux); use backend='torch' without it"
    ) from exc

import torch
import torch.nn.functional as F
from qtrain.kernels._triton import _round_to, is_interpreting
from qtrain.kernels.backend import device_capability, run_triton_or_fall_back
from qtrain.kernels.nf4 import NF4Tensor, dequantize_nf4
from qtrain.kernels.nf4_dequant import _dequant_tile, check_device, nf4_args
from qtrain.kernels.nf4_lora import autocast_off, compute_dtype, nf4_lora_reference

__all__ = [
    "NF4LoRAFunction",
    "fixed_configs",
    "m_bucket",
    "nf4_lora_bwd_dx",
    "nf4_lora_fwd",
    "nf4_lora_reference",
    "nf4_lora_triton",
]

SMALL_M = 16  # rows up to which the forward takes the memory-bound split-K path (generation)
M_BUCKET_MAX = 16384  # the autotuner's M key: next power of two of M, at most this
LORA_PRECISION = "ieee"  # the rank-r epilogue dots: tiny, so exact fp32 costs nothing (TF32 would round)
_UPCAST_CHUNK = 1 << 24  # elements of a row chunk upcast to the adapter dtype at a time (64 MB in fp32)

# ---- configs ---------------------------------------------------------------------------------------
# NOT TIMED: no GPU was lent while writing them. Chosen from compile-only statistics (ptxas registers,
# spill stack, shared memory; `python benchmarks/compile_kernels.py`) for sm_80/86/89/90: the
# dequantization temporaries take many registers, so 128x256 / 256x128 tiles spill heavily (>1 KB
# per thread) and are left out; the ones below spill nothing or little (128x128 ~100-250 bytes).
# BLOCK_K is a multiple of the NF4 block (64): one absmax per 64 values of a tile row. Triton's
# autotuner times them per (M bucket, N, K, dtypes) on first use and drops any that do not fit.
# fmt: off
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
_FWD_COMMON = [            # sm_80/86/89 (A100, RTX 30xx/40xx, A10/L4/L40) and sm_90 (H100/H200)
    (128, 128, 64, 8, 3),  # large M: most weight reuse; mild spills
    (128, 64, 64, 8, 4),
    (64, 128, 64, 8, 4),
    (64, 64, 64, 8, 4),
    (32, 128, 64, 4, 4),   # 17 <= M <= 32: few row tiles
    (32, 64, 64, 4, 4),
]
_FWD_BIG_SMEM = [          # sm_80 (164 KB shared memory) and sm_90 (228 KB): deeper pipelines, 4 warpgroups
    (128, 128, 64, 8, 4),
    (128, 128, 64, 16, 3),
]
# dX = dY @ W: output tile [BLOCK_M, BLOCK_K], reduction over N in steps of BLOCK_N
_BWD_COMMON = [
    (128, 64, 128, 8, 3),
    (128, 64, 64, 8, 4),
    (64, 64, 128, 8, 4),
    (64, 128, 64, 8, 4),
    (32, 64, 128, 4, 4),
]
_BWD_BIG_SMEM = [
    (128, 128, 64, 8, 3),  # no spills on sm_90, ~330 bytes on sm_86
    (128, 64, 128, 16, 3),
]
# split-K GEMV-style path (M <= 16): BLOCK_M is 16 (tl.dot's minimum); memory-bound, so few warps
# and deep pipelining of the 4-bit loads; none of these spills. (BLOCK_N, BLOCK_K, num_warps, num_stages)
_SMALL_M_CONFIGS = [
    (64, 128, 4, 4),
    (64, 64, 4, 4),
    (128, 64, 4, 3),
    (32, 128, 2, 4),
]
# fmt: on
_GROUP_M = 8  # tile-row grouping for L2 reuse of the weight
_INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 2}
_INTERPRET_SMALL_M_CONFIG = {"BLOCK_N": 32, "BLOCK_K": 64}
# fixed_configs(): one config per kernel that compiles and fits on every sm_80+ GPU (no spills)
_FIXED_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": _GROUP_M, "num_warps": 4, "num_stages": 3}
_FIXED_SMALL_M_CONFIG = {"BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}
_FIXED = [False]  # process-wide (autograd runs backward on other threads): set by fixed_configs()
_SPLIT_K_ALIGN = 128  # splits start at multiples of every BLOCK_K: no tile straddles a (power-of-two) NF4 block


def _tiled_configs(shapes, m_name: str, n_name: str, k_name: str) -> list:
    return [
        triton.Config({m_name: bm, n_name: bn, k_name: bk, "GROUP_M": _GROUP_M}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in shapes
    ]


def _big_smem(capability: tuple[int, int]) -> bool:
    return capability == (8, 0) or capability[0] >= 9


@contextlib.contextmanager
def fixed_configs():
    """Within this context every launcher uses one fixed config per kernel instead of the
    autotuner: the self-check's odd shapes then compile nothing that real shapes would not reuse."""
    previous, _FIXED[0] = _FIXED[0], True
    try:
        yield
    finally:
        _FIXED[0] = previous


def _default_config(small_m: bool) -> dict | None:
    """The config a launcher uses when none is given: the interpreter's, the fixed one, or None (autotune)."""
    if is_interpreting():
        return _INTERPRET_SMALL_M_CONFIG if small_m else _INTERPRET_CONFIG
    if _FIXED[0]:
        return _FIXED_SMALL_M_CONFIG if small_m else _FIXED_CONFIG
    return None


def m_bucket(m: int) -> int:
    """The autotuner's key for M rows: the next power of two, capped at M_BUCKET_MAX."""
    return min(triton.next_power_of_2(max(m, 1)), M_BUCKET_MAX)


def _bench_no_flush(kernel_call, quantiles) -> list[float]:
    """Quantiles of `kernel_call`'s time in ms with CUDA events, for the autotuner. Unlike
    triton.testing.do_bench, no 256 MB buffer is allocated to flush L2 between runs: near the
    memory cap that allocation could fail (a fake OOM) in the middle of a training step."""
    kernel_call()  # compile / warm up
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    kernel_call()
    end.record()
    end.synchronize()
    reps = max(5, min(100, int(25.0 / max(start.elapsed_time(end), 1e-3))))  # ~25 ms of runs
    times = []
    for _ in range(reps):
        start.record()
        kernel_call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return torch.quantile(torch.tensor(times), torch.tensor(list(quantiles))).tolist()


def _autotune(configs: list, key: list[str]):
    """triton.autotune with our timing (no flush buffer) and on-disk results where triton has them."""
    params = inspect.signature(triton.autotune).parameters
    extra = {"do_bench": _bench_no_flush} if "do_bench" in params else {}
    if "cache_results" in params:
        extra["cache_results"] = True
    return triton.autotune(configs=configs, key=key, **extra)


# ---- device helpers --------------------------------------------------------------------------------


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of this program, grouped GROUP_M row tiles at a time for L2 reuse."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % width) % size_m, (pid % width) // size_m


@triton.jit
def _row_offsets(offs, stride):
    """offs * stride in int64: a token index times a row stride passes 2^31 at long contexts
    (80k tokens x 28,672 columns). Every such product in these kernels goes through here."""
    return offs.to(tl.int64) * stride


@triton.jit
def _to_dot_operand(w, X_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """fp32 dequantized tile -> the dot operand: rounded to X's dtype as `dequantize_nf4(W, x.dtype)`."""
    if DOT_DTYPE == X_DTYPE:
        return w.to(X_DTYPE)  # GPU: hardware round-to-nearest-even
    else:
        return _round_to(w, X_DTYPE).to(DOT_DTYPE)  # interpreter, bf16: exact rounding, fp32 dot


@triton.jit
def _fwd_k_step(
    acc, x_ptr, stride_xm, offs_m, M, k0, K,
    packed_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, code_ptr, absmax_offset, offs_n, N,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCKSIZE: tl.constexpr, ABSMAX_BLOCKSIZE: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr, ALIGNED: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """acc [BLOCK_M, BLOCK_N] += X[offs_m, k0:k0+BLOCK_K] @ dequant(W)[offs_n, k0:k0+BLOCK_K]^T."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    x_mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    x_rows = x_ptr + _row_offsets(offs_m, stride_xm)[:, None]
    x = tl.load(x_rows + offs_k[None, :], mask=x_mask, other=0.0)  # [BLOCK_M, BLOCK_K]
    w = _dequant_tile(packed_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, code_ptr, absmax_offset,
                      offs_n, k0, N, K, BLOCK_N, BLOCK_K, BLOCKSIZE, ABSMAX_BLOCKSIZE, DOUBLE_QUANT, ALIGNED)  # fmt: skip
    w = _to_dot_operand(w, x_ptr.dtype.element_ty, DOT_DTYPE)  # [BLOCK_N, BLOCK_K]
    return tl.dot(x.to(DOT_DTYPE), tl.trans(w), acc, input_precision=PRECISION)


@triton.jit
def _add_lowrank(
    acc, l_ptr, stride_lm, r_ptr, stride_rr, stride_ro, offs_m, offs_o, M, OUT, R, scale,
    R_BLOCK: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """acc + scale * L[offs_m, :R] @ Rm[:R, offs_o] in fp32; L [M, R] row-major, Rm [R, OUT] strided."""
    lowrank = tl.zeros(acc.shape, dtype=tl.float32)
    for r0 in range(0, R, R_BLOCK):
        offs_r = r0 + tl.arange(0, R_BLOCK)
        l_mask = (offs_m[:, None] < M) & (offs_r[None, :] < R)
        lo = tl.load(l_ptr + _row_offsets(offs_m, stride_lm)[:, None] + offs_r[None, :], mask=l_mask, other=0.0)
        r_mask = (offs_r[:, None] < R) & (offs_o[None, :] < OUT)
        ro = tl.load(r_ptr + offs_r[:, None] * stride_rr + offs_o[None, :] * stride_ro, mask=r_mask, other=0.0)
        lowrank = tl.dot(lo.to(tl.float32), ro.to(tl.float32), lowrank, input_precision=PRECISION)
    return acc + scale * lowrank


@triton.jit
def _add_bias(acc, bias_ptr, offs_n, N):
    return acc + tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]


# ---- kernels ---------------------------------------------------------------------------------------


@triton.jit
def _nf4_lora_fwd_kernel(
    x_ptr, packed_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, code_ptr, xa_ptr, b_ptr, bias_ptr, y_ptr,
    M, N, K, R, M_BUCKET, absmax_offset, scale,
    stride_xm, stride_xam, stride_bn, stride_br, stride_ym,
    BLOCKSIZE: tl.constexpr, ABSMAX_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, ALIGNED: tl.constexpr,
    HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, R_BLOCK: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """Y[BLOCK_M, BLOCK_N] tile = X @ dequant(W)^T + s * XA @ B^T + bias; M_BUCKET only keys the autotuner."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        acc = _fwd_k_step(acc, x_ptr, stride_xm, offs_m, M, k0, K,
                          packed_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, code_ptr, absmax_offset, offs_n, N,
                          BLOCK_N, BLOCK_K, BLOCKSIZE, ABSMAX_BLOCKSIZE, DOUBLE_QUANT, ALIGNED, DOT_DTYPE, PRECISION)  # fmt: skip
    if HAS_LORA:  # XA [M, R] @ B^T: B is [N, R], read as [R, N]
        acc = _add_lowrank(acc, xa_ptr, stride_xam, b_ptr, stride_br, stride_bn, offs_m, offs_n, M, N, R, scale,
                           R_BLOCK, LORA_PRECISION)  # fmt: skip
    if HAS_BIAS:
        acc = _add_bias(acc, bias_ptr, offs_n, N)
    y_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    y_rows = y_ptr + _row_offsets(offs_m, stride_ym)[:, None]
    tl.store(y_rows + offs_n[None, :], _round_to(acc, y_ptr.dtype.element_ty), mask=y_mask)


@triton.jit
def _nf4_lora_fwd_small_m_kernel(
    x_ptr, packed_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, code_ptr, xa_ptr, b_ptr, bias_ptr, part_ptr,
    M, N, K, R, K_PER_SPLIT, absmax_offset, scale,
    stride_xm, stride_xam, stride_bn, stride_br,
    BLOCKSIZE: tl.constexpr, ABSMAX_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, ALIGNED: tl.constexpr,
    HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, R_BLOCK: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Split-K partial sums for M <= BLOCK_M rows: part[split, M, N] (fp32) over K_PER_SPLIT columns of K.

    Memory-bound (generation): every program streams a [BLOCK_N, K_PER_SPLIT] slab of 4-bit W once;
    split 0 also adds the adapter and the bias. The caller sums over splits (deterministic; no atomics).
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * K_PER_SPLIT
    for k0 in range(k_start, tl.minimum(k_start + K_PER_SPLIT, K), BLOCK_K):
        acc = _fwd_k_step(acc, x_ptr, stride_xm, offs_m, M, k0, K,
                          packed_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, code_ptr, absmax_offset, offs_n, N,
                          BLOCK_N, BLOCK_K, BLOCKSIZE, ABSMAX_BLOCKSIZE, DOUBLE_QUANT, ALIGNED, DOT_DTYPE, PRECISION)  # fmt: skip
    if pid_k == 0:
        if HAS_LORA:
            acc = _add_lowrank(acc, xa_ptr, stride_xam, b_ptr, stride_br, stride_bn, offs_m, offs_n, M, N, R, scale,
                               R_BLOCK, LORA_PRECISION)  # fmt: skip
        if HAS_BIAS:
            acc = _add_bias(acc, bias_ptr, offs_n, N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    part_rows = part_ptr + _row_offsets(pid_k * M + offs_m, N)[:, None]  # row (split, m) of part [splits * M, N]
    tl.store(part_rows + offs_n[None, :], acc, mask=mask)


@triton.jit
def _nf4_lora_bwd_kernel(
    dy_ptr, packed_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, code_ptr, dyb_ptr, a_ptr, dx_ptr,
    M, N, K, R, M_BUCKET, absmax_offset, scale,
    stride_dym, stride_dybm, stride_ar, stride_dxm,
    BLOCKSIZE: tl.constexpr, ABSMAX_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, ALIGNED: tl.constexpr,
    HAS_LORA: tl.constexpr, R_BLOCK: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """dX[BLOCK_M, BLOCK_K] tile = dY @ dequant(W) + s * dYB @ A, reducing over N.

    The W tile [BLOCK_N, BLOCK_K] is the forward's tile, used untransposed: W^T's direction costs
    nothing extra in the 4-bit layout (a tile row is still BLOCK_K/2 contiguous bytes).
    """
    pid_m, pid_k = _tile_ids(M, K, BLOCK_M, BLOCK_K, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = pid_k * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    dy_rows = dy_ptr + _row_offsets(offs_m, stride_dym)[:, None]
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        dy_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        dy = tl.load(dy_rows + offs_n[None, :], mask=dy_mask, other=0.0)  # [BM, BN]
        w = _dequant_tile(packed_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, code_ptr, absmax_offset,
                          offs_n, k0, N, K, BLOCK_N, BLOCK_K, BLOCKSIZE, ABSMAX_BLOCKSIZE, DOUBLE_QUANT, ALIGNED)  # fmt: skip
        w = _to_dot_operand(w, dy_ptr.dtype.element_ty, DOT_DTYPE)  # [BLOCK_N, BLOCK_K]
        acc = tl.dot(dy.to(DOT_DTYPE), w, acc, input_precision=PRECISION)
    if HAS_LORA:  # dYB [M, R] @ A [R, K]
        acc = _add_lowrank(acc, dyb_ptr, stride_dybm, a_ptr, stride_ar, 1, offs_m, offs_k, M, K, R, scale,
                           R_BLOCK, LORA_PRECISION)  # fmt: skip
    dx_mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    dx_rows = dx_ptr + _row_offsets(offs_m, stride_dxm)[:, None]
    tl.store(dx_rows + offs_k[None, :], _round_to(acc, dx_ptr.dtype.element_ty), mask=dx_mask)


# ---- launchers -------------------------------------------------------------------------------------

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _common_constexprs(weight: NF4Tensor, dtype: torch.dtype, rank: int) -> dict:
    """Compile-time flags shared by the kernels, for activations of `dtype`."""
    if dtype not in _TL_DTYPES:
        raise TypeError(f"the Triton NF4 kernels take fp32/fp16/bf16 activations, got {dtype}")
    dot_dtype = tl.float32 if dtype == torch.bfloat16 and is_interpreting() else _TL_DTYPES[dtype]
    return {
        "BLOCKSIZE": weight.blocksize,
        "ABSMAX_BLOCKSIZE": weight.absmax_blocksize,
        "DOUBLE_QUANT": weight.double_quant,
        "ALIGNED": weight.shape[1] % weight.blocksize == 0,  # blocks never straddle rows
        "R_BLOCK": min(max(16, triton.next_power_of_2(max(rank, 1))), 32),  # tl.dot needs >= 16
        "DOT_DTYPE": dot_dtype,
        "PRECISION": "ieee" if dot_dtype == tl.float32 else "tf32",  # tf32 is ignored for 16-bit operands
        "LORA_PRECISION": LORA_PRECISION,
    }


@functools.cache
def _autotuned_fwd(capability: tuple[int, int]):
    shapes = _FWD_COMMON + (_FWD_BIG_SMEM if _big_smem(capability) else [])
    configs = _tiled_configs(shapes, "BLOCK_M", "BLOCK_N", "BLOCK_K")
    return _autotune(configs, ["M_BUCKET", "N", "K"])(_nf4_lora_fwd_kernel)


@functools.cache
def _autotuned_bwd(capability: tuple[int, int]):
    shapes = _BWD_COMMON + (_BWD_BIG_SMEM if _big_smem(capability) else [])
    configs = _tiled_configs(shapes, "BLOCK_M", "BLOCK_N", "BLOCK_K")
    return _autotune(configs, ["M_BUCKET", "N", "K"])(_nf4_lora_bwd_kernel)


@functools.cache
def _autotuned_small_m():
    configs = [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s) for bn, bk, w, s in _SMALL_M_CONFIGS
    ]
    return _autotune(configs, ["N", "K"])(_nf4_lora_fwd_small_m_kernel)  # not M: one tuning for every batch size


def _tiled_launch(kernel_fn, autotuned, config: dict | None, rows: int, cols_name: str, cols: int):
    """(kernel[grid], launch kwargs) for an explicit config, the default one (interpreter, fixed), or the autotuner."""
    if config is None:
        config = _default_config(small_m=False)
    if config is not None:
        grid = (triton.cdiv(rows, config["BLOCK_M"]) * triton.cdiv(cols, config[cols_name]),)
        return kernel_fn[grid], {"GROUP_M": _GROUP_M, "num_warps": 4, **config}
    grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(cols, meta[cols_name]),)
    return autotuned[grid], {}


def _check_inputs(a: torch.Tensor, weight: NF4Tensor, what: str) -> None:
    check_device(a, what)
    if weight.device != a.device:
        raise ValueError(f"{what} is on {a.device} but the NF4 weight on {weight.device}")
    if len(weight.shape) != 2:
        raise ValueError(f"the NF4 weight must be 2-D [N, K], got shape {tuple(weight.shape)}")


def _split_k(N: int, K: int, device: torch.device, splits: int | None = None) -> tuple[int, int]:
    """(splits, K per split) for the small-M path: by default enough programs to cover the GPU
    twice over (with 64-column tiles), each split at least 512 columns of K long."""
    if splits is None:
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
        splits = max(1, min(triton.cdiv(2 * sms, triton.cdiv(N, 64)), K // 512))
    per_split = triton.cdiv(triton.cdiv(K, splits), _SPLIT_K_ALIGN) * _SPLIT_K_ALIGN
    return triton.cdiv(K, per_split), per_split


def nf4_lora_fwd(
    x: torch.Tensor,
    weight: NF4Tensor,
    xa: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    bias: torch.Tensor | None,
    scale: float,
    path: str = "auto",
    config: dict | None = None,
    split_k: int | None = None,
) -> torch.Tensor:
    """Y [M, N] = X [M, K] @ dequant(W)^T + s * XA [M, r] @ B [N, r]^T + bias, in X's dtype.

    `path`: "auto" (split-K for M <= SMALL_M, else tiled), "tiled" or "small_m". `config` pins the
    kernel's tile sizes and `split_k` the small-M path's number of K splits (tests); by default
    the autotuner (GPU) or one small config (interpreter), and a split covering the GPU.
    """
    _check_inputs(x, weight, "x")
    (M, K), N = x.shape, weight.shape[0]
    if K != weight.shape[1] or x.stride(1) != 1:
        raise ValueError(f"x must be [M, {weight.shape[1]}] with unit column stride, got {tuple(x.shape)}")
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return y
    has_lora = xa is not None
    lora_b = lora_b.contiguous() if has_lora else x  # unused pointers stand in when absent
    xa = xa.contiguous() if has_lora else x
    ptrs, offset = nf4_args(weight)
    consts = _common_constexprs(weight, x.dtype, xa.shape[1] if has_lora else 1)
    flags = dict(HAS_LORA=has_lora, HAS_BIAS=bias is not None, **consts)
    bias = bias if bias is not None else x
    rank = xa.shape[1] if has_lora else 0
    if path == "small_m" or (path == "auto" and M <= SMALL_M):
        if M > SMALL_M:
            raise ValueError(f"the small-M path takes at most {SMALL_M} rows, got {M}")
        return _fwd_small_m(x, ptrs, offset, xa, lora_b, bias, y, rank, scale, flags, config, split_k)
    if path not in ("auto", "tiled"):
        raise ValueError(f"path must be 'auto', 'tiled' or 'small_m', got {path!r}")
    kernel, meta = _tiled_launch(_nf4_lora_fwd_kernel, _autotuned_fwd(device_capability(x.device)), config, M, "BLOCK_N", N)
    kernel(
        x, *ptrs, xa, lora_b, bias, y,
        M, N, K, rank, m_bucket(M), offset, float(scale),
        x.stride(0), xa.stride(0), lora_b.stride(0), lora_b.stride(1), y.stride(0),
        **flags, **meta, enable_fp_fusion=False,
    )  # fmt: skip
    return y


def _fwd_small_m(x, ptrs, offset, xa, lora_b, bias, y, rank, scale, flags, config, split_k):
    (M, K), N = x.shape, y.shape[1]
    splits, per_split = _split_k(N, K, x.device, split_k)
    part = torch.empty(splits, M, N, dtype=torch.float32, device=x.device)  # [splits, M, N]
    if config is None:
        config = _default_config(small_m=True)
    if config is not None:
        kernel = _nf4_lora_fwd_small_m_kernel[(triton.cdiv(N, config["BLOCK_N"]), splits)]
        meta = {"num_warps": 4, **config}
    else:
        kernel = _autotuned_small_m()[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), splits)]
        meta = {}
    kernel(
        x, *ptrs, xa, lora_b, bias, part,
        M, N, K, rank, per_split, offset, float(scale),
        x.stride(0), xa.stride(0), lora_b.stride(0), lora_b.stride(1),
        **flags, BLOCK_M=SMALL_M, **meta, enable_fp_fusion=False,
    )  # fmt: skip
    return y.copy_(part.sum(0) if splits > 1 else part[0])


def nf4_lora_bwd_dx(
    grad_y: torch.Tensor,
    weight: NF4Tensor,
    dyb: torch.Tensor | None,
    lora_a: torch.Tensor | None,
    scale: float,
    config: dict | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """dX [M, K] = dY [M, N] @ dequant(W) + s * dYB [M, r] @ A [r, K], computed in dY's dtype and
    written in `out_dtype` (default dY's): X's dtype, so that no cast copy of dX is made."""
    _check_inputs(grad_y, weight, "grad_y")
    (M, N), K = grad_y.shape, weight.shape[1]
    if N != weight.shape[0] or grad_y.stride(1) != 1:
        raise ValueError(f"grad_y must be [M, {weight.shape[0]}] with unit column stride, got {tuple(grad_y.shape)}")
    dx = torch.empty(M, K, dtype=out_dtype or grad_y.dtype, device=grad_y.device)
    if M == 0:
        return dx
    has_lora = dyb is not None
    lora_a = lora_a.contiguous() if has_lora else grad_y
    dyb = dyb.contiguous() if has_lora else grad_y
    rank = dyb.shape[1] if has_lora else 0
    ptrs, offset = nf4_args(weight)
    consts = _common_constexprs(weight, grad_y.dtype, max(rank, 1))
    kernel, meta = _tiled_launch(
        _nf4_lora_bwd_kernel, _autotuned_bwd(device_capability(grad_y.device)), config, M, "BLOCK_K", K
    )
    kernel(
        grad_y, *ptrs, dyb, lora_a, dx,
        M, N, K, rank, m_bucket(M), offset, float(scale),
        grad_y.stride(0), dyb.stride(0), lora_a.stride(0), dx.stride(0),
        HAS_LORA=has_lora, **consts, **meta, enable_fp_fusion=False,
    )  # fmt: skip
    return dx


# ---- autograd --------------------------------------------------------------------------------------


def _mm_upcast(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """(a @ b) [M, n] with a [M, k] cast to b's dtype (the adapter's), returned in `out_dtype`,
    one chunk of rows at a time when a cast is needed: never a full-size cast copy of `a`."""
    if a.dtype == b.dtype == out_dtype:
        return a @ b
    out = torch.empty(a.shape[0], b.shape[1], dtype=out_dtype, device=a.device)
    step = max(1, _UPCAST_CHUNK // max(a.shape[1], b.shape[1], 1))
    for i in range(0, a.shape[0], step):
        out[i : i + step] = a[i : i + step].to(b.dtype) @ b
    return out


def _tmm_upcast(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """a^T @ b [p, q] in `dtype` for a [M, p], b [M, q], reducing over M one chunk of rows at a
    time when a cast is needed: never a full-size cast copy of `a` or `b`."""
    if a.dtype == b.dtype == dtype:
        return a.T @ b
    out = torch.zeros(a.shape[1], b.shape[1], dtype=dtype, device=a.device)
    step = max(1, _UPCAST_CHUNK // max(a.shape[1], b.shape[1], 1))
    for i in range(0, a.shape[0], step):
        out.addmm_(a[i : i + step].T.to(dtype), b[i : i + step].to(dtype))
    return out


def _dx_torch(grad_y, weight, dyb, lora_a, scale, out_dtype) -> torch.Tensor:
    """The dX kernel's result with torch ops (the fallback when the kernel fails to compile or launch)."""
    dx = grad_y @ dequantize_nf4(weight, grad_y.dtype)  # [M, K]
    if dyb is not None:
        dx += _mm_upcast(scale * dyb, lora_a, grad_y.dtype)
    return dx.to(out_dtype)


class NF4LoRAFunction(torch.autograd.Function):
    """`Y = X @ dequant(W)^T + s * (H @ A^T) @ B^T + bias` with H = X, or the dropped-out X when given.

    Computes in `compute_dtype(x)` with autocast off inside forward and backward; Y comes out in
    that dtype, every gradient in its input's dtype. Saves X (or H) only when A needs a gradient,
    XA [M, r] only when B does, A and B (parameters) and the 4-bit weight: never a dense copy of W.
    `fall_back`: a Triton error in the backward's dX kernel recomputes dX with torch (backend "auto").
    """

    @staticmethod
    def forward(ctx, x, h, weight: NF4Tensor, lora_a, lora_b, bias, scale: float, fall_back: bool):
        # x [M, K], h None or [M, K], lora_a [r, K], lora_b [N, r], bias [N]
        dtype = compute_dtype(x)  # read before autocast is switched off
        with autocast_off(x):
            has_lora = lora_a is not None
            lora_in = x if h is None else h
            xa = _mm_upcast(lora_in, lora_a.T, lora_a.dtype) if has_lora else None  # [M, r], adapter dtype
            y = nf4_lora_fwd(x.to(dtype), weight, xa, lora_b, bias, scale)  # [M, N] in dtype
        needs = ctx.needs_input_grad
        ctx.weight, ctx.scale, ctx.has_h, ctx.fall_back = weight, scale, h is not None, fall_back
        ctx.x_dtype, ctx.h_dtype = x.dtype, (h.dtype if h is not None else None)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.save_for_backward(
            lora_in if has_lora and needs[3] else None,
            xa if has_lora and needs[4] else None,
            lora_a,
            lora_b,
        )
        return y

    @staticmethod
    def backward(ctx, grad_y):
        with autocast_off(grad_y):
            return NF4LoRAFunction._backward(ctx, grad_y.contiguous())  # [M, N], Y's dtype

    @staticmethod
    def _backward(ctx, grad_y):
        lora_in, xa, lora_a, lora_b = ctx.saved_tensors
        need_x, need_h, _, need_a, need_b, need_bias, _, _ = ctx.needs_input_grad
        s = ctx.scale
        dyb = None
        if lora_a is not None and (need_x or need_h or need_a):
            dyb = _mm_upcast(grad_y, lora_b, lora_b.dtype)  # [M, r], adapter dtype
        grad_x = grad_h = grad_a = grad_b = grad_bias = None
        if need_x:  # the adapter's share is fused here unless it belongs to h (dropout)
            args = (grad_y, ctx.weight, dyb if not ctx.has_h else None, lora_a, s, ctx.x_dtype)
            grad_x = run_triton_or_fall_back(
                lambda: nf4_lora_bwd_dx(*args[:5], out_dtype=args[5]),
                lambda: _dx_torch(*args),
                ctx.fall_back,
                grad_y.device,
            )  # [M, K]
        if need_h:
            grad_h = _mm_upcast(s * dyb, lora_a, ctx.h_dtype)  # [M, K]
        if need_a:
            grad_a = _tmm_upcast(s * dyb, lora_in, lora_a.dtype)  # [r, K]
        if need_b:
            grad_b = _tmm_upcast(grad_y, xa, lora_b.dtype).mul_(s)  # [N, r]
        if need_bias:
            grad_bias = grad_y.sum(0, dtype=torch.float32).to(ctx.bias_dtype)  # [N]
        return grad_x, grad_h, None, grad_a, grad_b, grad_bias, None, None


def nf4_lora_triton(
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
    """The `triton` backend, same signature and semantics as `nf4_lora_torch`; x [..., K] -> [..., N]
    in `compute_dtype(x)`. `fall_back` (set by backend "auto"): a Triton error in the backward
    recomputes dX with torch instead of raising."""
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    h = None
    if lora_a is not None and dropout > 0 and training:
        h = F.dropout(x2, p=dropout, training=True)  # LoRA path only; autograd applies the mask to dH
    y = NF4LoRAFunction.apply(x2, h, weight, lora_a, lora_b, bias, float(scale), fall_back)  # [M, N]
    return y if x.dim() == 2 else y.view(*lead, y.shape[-1])
