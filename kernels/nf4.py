"""The NF4 format, bit-compatible with bitsandbytes: `NF4Tensor`, quantization, dequantization.

The ground floor of `qtrain.kernels` (it imports nothing from qtrain): every NF4 kernel reads this
layout and checks itself against `dequantize_nf4`. bitsandbytes' state-dict keys are qtrain's
(`qtrain/nf4.py`), not the kernels'.

Layout (bitsandbytes `quantize_4bit(quant_type="nf4", blocksize=64, compress_statistics=True)`):

- the weight is flattened and cut into blocks of 64 values; each block is scaled by its absmax
  into [-1, 1] and every value is replaced by the index of the nearest of the 16 NF4 levels;
- two 4-bit indices per byte, the first element in the HIGH nibble: `packed` is uint8 [ceil(n/2)];
- double quantization: the fp32 absmax vector [n/64] is centred (`offset` = its mean) and
  quantized again to 8 bits with bitsandbytes' signed dynamic map in blocks of 256, keeping one
  fp32 scale per 256 absmax values.

Dequantization is `code[idx] * absmax[block]` in fp32, then a cast to the output dtype, which is
what bitsandbytes does, so the two agree bit for bit.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
from dataclasses import dataclass, replace

import torch

BLOCKSIZE = 64
ABSMAX_BLOCKSIZE = 256

# The 16 NF4 levels: quantiles of N(0, 1) normalised to [-1, 1], with an exact zero (QLoRA paper,
# appendix E). The fp32 values are the ones bitsandbytes stores as `quant_map`.
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip

_NF4_ZERO = NF4_LEVELS.index(0.0)

# Elements processed at once while quantizing; bounds temporaries to a few MB per call.
_CHUNK = 1 << 22


def nf4_code(device: torch.device | str | None = None) -> torch.Tensor:
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


def dynamic_code(device: torch.device | str | None = None) -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (Dettmers 2016, "8-bit approximations").

    One sign bit, then a run of zeros whose length is the decimal exponent (10^-6 .. 10^0), an
    indicator bit, and the remaining bits a linear fraction in [0.1, 1]: level e holds
    2^e fractions, taken as midpoints of a linspace over [0.1, 1]. Plus 0 and 1; 256 sorted values.
    """
    values: list[float] = []
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        values += (10.0 ** (e - 6) * mids).tolist() + (-(10.0 ** (e - 6)) * mids).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32, device=device)


def _nf4_indices(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4 indices (int32 [n]) and per-block absmax (fp32 [nblocks]) of a flat tensor.

    As bitsandbytes' 4-bit quantizer: full blocks are scaled by the reciprocal of their absmax,
    a trailing partial block is divided by its absmax (floored at 1e-38, which is what is stored
    for it), and each value goes to the nearest level, a tie to the lower one.
    """
    x = x.float()
    full = x.numel() - x.numel() % blocksize
    blocks = x[:full].view(-1, blocksize)  # [nblocks, blocksize]
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).view(-1)
    if full < x.numel():
        tail_absmax = x[full:].abs().amax().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_absmax[None]])
        scaled = torch.cat([scaled, x[full:] / tail_absmax])
    code = nf4_code(x.device)
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled.clamp_(-1, 1), midpoints, out_int32=True), absmax


def _dynamic_indices(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit indices (uint8 [n]) and per-block absmax (fp32 [nblocks]) of a flat fp32 tensor.

    As bitsandbytes' CPU blockwise quantizer (0.50): v = x * (1/absmax) is placed on a grid of
    65536 points over [-1, 1] (bin = trunc(((v + 1) * 0.5) * 65535 + 0.5)), and each grid point
    holds the index of its nearest code, found through the midpoints between codes. An all-zero
    block gives index 0.
    """
    nblocks = math.ceil(x.numel() / blocksize)
    padded = torch.nn.functional.pad(x, (0, nblocks * blocksize - x.numel()))
    absmax = padded.view(nblocks, blocksize).abs().amax(dim=1)
    inv = (1.0 / absmax).repeat_interleave(blocksize)[: x.numel()]
    v = (x * inv).nan_to_num_(0.0).clamp_(-1, 1)  # 0 * inf in an all-zero block
    bins = (((v + 1.0) * 0.5) * 65535 + 0.5).long()  # each step rounds in fp32, then truncates
    grid = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32, device=x.device)) / 65535
    midpoints = 0.5 * (code[:-1] + code[1:])
    lut = torch.searchsorted(midpoints, grid)  # number of midpoints below each grid point
    idx = torch.where(absmax.repeat_interleave(blocksize)[: x.numel()] == 0, 0, lut[bins])
    return idx.to(torch.uint8), absmax


@dataclass
class NF4Tensor:
    """A 4-bit NF4 weight in bitsandbytes' layout. Not a tensor subclass: a bag of buffers."""

    packed: torch.Tensor  # uint8 [ceil(n/2)], first element in the high nibble
    absmax: torch.Tensor  # uint8 [nblocks] when double-quantized, else fp32 [nblocks]
    shape: torch.Size
    dtype: torch.dtype  # dtype of the weight that was quantized (bnb's quant_state.dtype)
    code: torch.Tensor  # fp32 [16], NF4 levels (bnb `quant_map`)
    blocksize: int = BLOCKSIZE
    absmax_scale: torch.Tensor | None = None  # fp32 [ceil(nblocks/256)] (bnb `nested_absmax`)
    absmax_code: torch.Tensor | None = None  # fp32 [256] (bnb `nested_quant_map`)
    absmax_offset: float = 0.0  # (bnb `nested_offset`)
    absmax_blocksize: int = ABSMAX_BLOCKSIZE

    @property
    def double_quant(self) -> bool:
        return self.absmax_scale is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def numel(self) -> int:
        return math.prod(self.shape)

    def nbytes(self) -> int:
        tensors = [self.packed, self.absmax, self.code, self.absmax_scale, self.absmax_code]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def to(self, device: torch.device | str) -> NF4Tensor:
        def move(t):
            return None if t is None else t.to(device)

        return replace(
            self,
            packed=move(self.packed),
            absmax=move(self.absmax),
            code=move(self.code),
            absmax_scale=move(self.absmax_scale),
            absmax_code=move(self.absmax_code),
        )


def quantize_nf4(weight: torch.Tensor, blocksize: int = BLOCKSIZE, double_quant: bool = True) -> NF4Tensor:
    """Quantize `weight` (fp32/fp16/bf16, any shape) to NF4, bit-identical to bitsandbytes."""
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"NF4 quantization takes fp32/fp16/bf16 weights, got {weight.dtype}")
    flat = weight.detach().reshape(-1)
    n = flat.numel()
    step = (_CHUNK // blocksize) * blocksize
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=weight.device)
    absmax = torch.empty(math.ceil(n / blocksize), dtype=torch.float32, device=weight.device)
    for start in range(0, n, step):  # chunks are whole blocks and even-sized, except the last
        idx, amax = _nf4_indices(flat[start : start + step], blocksize)
        absmax[start // blocksize : start // blocksize + amax.numel()] = amax
        if idx.numel() % 2:  # an odd count ends on a padding zero, whose NF4 index is 7
            idx = torch.nn.functional.pad(idx, (0, 1), value=_NF4_ZERO)
        idx = idx.to(torch.uint8)
        packed[start // 2 : start // 2 + idx.numel() // 2] = (idx[0::2] << 4) | idx[1::2]
    nf4 = NF4Tensor(packed=packed, absmax=absmax, shape=weight.shape, dtype=weight.dtype, code=nf4_code(weight.device), blocksize=blocksize)
    return double_quantize(nf4) if double_quant else nf4


def double_quantize(nf4: NF4Tensor) -> NF4Tensor:
    """Quantize the fp32 absmax to 8 bits (bnb `compress_statistics=True`)."""
    offset = nf4.absmax.mean()
    code = dynamic_code(nf4.device)
    idx, scale = _dynamic_indices(nf4.absmax - offset, code, ABSMAX_BLOCKSIZE)
    return replace(
        nf4,
        absmax=idx,
        absmax_scale=scale,
        absmax_code=code,
        absmax_offset=offset.item(),
    )


def block_absmax(nf4: NF4Tensor) -> torch.Tensor:
    """The fp32 per-block absmax [nblocks], undoing double quantization if present."""
    if not nf4.double_quant:
        return nf4.absmax.float()
    nblocks = nf4.absmax.numel()
    values = nf4.absmax_code[nf4.absmax.long()]  # [nblocks]
    scale = nf4.absmax_scale.repeat_interleave(nf4.absmax_blocksize)[:nblocks]
    return values * scale + nf4.absmax_offset


def dequantize_nf4(nf4: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight in `dtype` (default: the original dtype), as bitsandbytes `dequantize_4bit`.

    On CPU, bitsandbytes' native kernel when it is installed (bit-identical to `dequantize_nf4_torch`,
    17-21x faster on one core: 0.27 ms instead of 5.6 ms for a 1536 x 512 weight to fp32), else the
    PyTorch code (`dequantize_nf4_torch`, also the path of pre-Ampere GPUs)."""
    dtype = dtype or nf4.dtype
    if nf4.device.type == "cpu" and nf4.numel() % 2 == 0 and (ops := bitsandbytes_ops()) is not None:
        return _dequantize_nf4_native(ops, nf4, dtype)
    return dequantize_nf4_torch(nf4, dtype)


@functools.cache
def bitsandbytes_ops():
    """`torch.ops.bitsandbytes` (its native CPU kernels), or None when bitsandbytes is not installed.

    Importing bitsandbytes on a CPU with AVX512-BF16 logs a warning that Hugging Face's optional
    `kernels` package is missing (its bf16 inference kernel, which qtrain never uses): kept off the
    console."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return None
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import bitsandbytes  # noqa: F401  (registers torch.ops.bitsandbytes)
    except (ImportError, OSError, RuntimeError):  # a broken install: the PyTorch path still works
        return None
    finally:
        logger.setLevel(level)
    return torch.ops.bitsandbytes


def _dequantize_nf4_native(ops, nf4: NF4Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bitsandbytes' CPU kernel over the flat weight. The flat shape (n,) is on purpose: given the 2-D
    shape, bitsandbytes 0.50 restarts the 64-value blocks at every row, wrong for rows whose length is
    no multiple of 64 (bitsandbytes quantizes the flat tensor); it needs an even n (whole bytes)."""
    n = nf4.numel()
    if nf4.double_quant:  # code[idx] * scale[block] + offset, in fp32 as `block_absmax`
        absmax = ops.dequantize_blockwise(nf4.absmax, nf4.absmax_scale, nf4.absmax_code, nf4.absmax_blocksize, torch.float32)
        absmax += nf4.absmax_offset
    else:
        absmax = nf4.absmax.float()  # [nblocks]
    w = ops.dequantize_4bit(nf4.packed, absmax, nf4.blocksize, "nf4", (n,), dtype)  # [1, n]
    return w.view(nf4.shape)


def dequantize_nf4_torch(nf4: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`dequantize_nf4` in PyTorch. Each packed byte indexes a table of its two levels (high nibble
    first), so the only fp32 temporary is the weight itself: about 6 bytes per element beyond the
    output, where indexing the levels nibble by nibble would take 28.
    """
    n = nf4.numel()
    w = byte_levels(nf4.code)[nf4.packed.int()].view(-1)[:n]  # [n] fp32
    absmax = block_absmax(nf4)  # [nblocks]
    full = n - n % nf4.blocksize
    w[:full].view(-1, nf4.blocksize).mul_(absmax[: full // nf4.blocksize, None])
    if full < n:
        w[full:].mul_(absmax[-1])
    return w.to(dtype or nf4.dtype).view(nf4.shape)


# ---- the byte-pair table -------------------------------------------------------------------------


def byte_levels(code: torch.Tensor) -> torch.Tensor:
    """[256, 2]: byte b -> (code[b >> 4], code[b & 15]), the levels of its two nibbles, high first.

    Indexing it with the packed bytes dequantizes two elements per lookup, in PyTorch and in the
    Triton kernels alike (`nf4_pair_table`)."""
    return torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1)


def nf4_pair_table(dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 256-entry byte -> (high-nibble level, low-nibble level) table, int64 [256]: entry b holds
    code[b >> 4] in its low 32 bits and code[b & 15] in its high 32 bits (fp32 bit patterns, i.e. the
    [256, 2] fp32 table viewed as int64), so a kernel gets both levels of a byte with ONE 8-byte load.

    Built once per (dtype, device) from the NF4 code book (bitsandbytes' `quant_map` for nf4 is always
    these 16 values). Only fp32 levels are exact: dequantization multiplies the fp32 level by the fp32
    absmax and rounds once, as bitsandbytes does, so `dtype` must be fp32 (it names the level dtype).
    """
    return _pair_table(dtype, torch.device(device))


@functools.cache
def _pair_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if dtype != torch.float32:
        raise ValueError(f"the pair table holds fp32 levels (bit-exact dequantization), got {dtype}")
    pairs = byte_levels(nf4_code())  # [256, 2]: byte -> (hi, lo)
    return pairs.contiguous().view(torch.int64).view(256).to(device)  # little-endian: hi in the low word
