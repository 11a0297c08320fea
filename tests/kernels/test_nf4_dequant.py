"""qtrain.kernels.nf4_dequant: the Triton dequantization kernel is bit-identical to the reference.

On CPU it runs under Triton's interpreter (tests/kernels/conftest.py); on a GPU the compiled kernel.
"""

from __future__ import annotations

import pytest
import torch

from qtrain.nf4 import dequantize_nf4, quantize_nf4

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]

# (rows, cols): blocks straddling rows (100 % 64 != 0), an odd element count (a half-used last
# byte and a 9-value partial last block), and more than 256 blocks (48000 values = 750 blocks, so
# the double-quant scale index block // 256 takes the values 0, 1 and 2).
SHAPES = [(33, 100), (7, 9), (48, 1000)]


def _weight(shape, dtype, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    # rows of different magnitude: absmax (and its 8-bit code) varies a lot between blocks
    w = torch.randn(*shape, generator=g) * torch.logspace(-3, 0, shape[0])[:, None]
    return quantize_nf4(w.to(dtype), **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "fp32absmax"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_dequant_is_bit_exact(triton_device, shape, dtype, double_quant):
    from qtrain.kernels.nf4_dequant import nf4_dequantize_reference, nf4_dequantize_triton

    nf4 = _weight(shape, torch.float32, double_quant=double_quant)
    ref = nf4_dequantize_reference(nf4, dtype)
    got = nf4_dequantize_triton(nf4.to(triton_device), dtype).cpu()
    assert got.dtype == dtype and got.shape == torch.Size(shape)
    assert ref.abs().max() > 0  # a kernel that writes zeros must not pass
    assert torch.equal(got, ref), f"{(got.float() - ref.float()).abs().max().item()} max abs difference"


@pytest.mark.parametrize("orig_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_default_dtype_is_the_quantized_weights(triton_device, orig_dtype):
    from qtrain.kernels.nf4_dequant import nf4_dequantize_triton

    nf4 = _weight((5, 64), orig_dtype)
    got = nf4_dequantize_triton(nf4.to(triton_device)).cpu()
    assert got.dtype == orig_dtype
    assert torch.equal(got, dequantize_nf4(nf4))


def test_blocksize_128(triton_device):
    # bitsandbytes allows other power-of-two blocksizes; the kernels take BLOCKSIZE as a constexpr
    from qtrain.kernels.nf4_dequant import nf4_dequantize_triton

    nf4 = _weight((9, 100), torch.float32, blocksize=128)
    assert torch.equal(
        nf4_dequantize_triton(nf4.to(triton_device), torch.float16).cpu(), dequantize_nf4(nf4, torch.float16)
    )


def test_bf16_rounding_ties_to_even(triton_device):
    # fp32 -> bf16 must round to nearest, ties to even (torch's and the GPU's rounding); random
    # weights almost never produce an exact tie, so build them: NF4 level +-1.0 times an absmax
    # whose low 16 bits are exactly 0x8000 (half a bf16 ulp), one block per absmax value.
    from qtrain.kernels.nf4_dequant import nf4_dequantize_triton

    from qtrain.nf4 import NF4Tensor, nf4_code

    absmax = torch.tensor([0x3F808000, 0x3F818000, 0x40490FDB, 0x3F800001], dtype=torch.int32).view(torch.float32)
    packed = torch.tensor([0xF0] * 32 * absmax.numel(), dtype=torch.uint8)  # levels 1.0, -1.0, 1.0, ...
    nf4 = NF4Tensor(packed=packed, absmax=absmax, shape=torch.Size([4, 64]), dtype=torch.float32, code=nf4_code())
    ref = dequantize_nf4(nf4, torch.bfloat16)
    got = nf4_dequantize_triton(nf4.to(triton_device), torch.bfloat16).cpu()
    assert ref[0, 0].item() == 1.0 and ref[1, 0].item() == 1.0 + 2 * 2**-7  # ties went to the even neighbour
    assert torch.equal(got, ref)


def test_reference_is_qtrain_dequantize():
    from qtrain.kernels.nf4_dequant import nf4_dequantize_reference

    nf4 = _weight((7, 9), torch.float32)
    assert torch.equal(nf4_dequantize_reference(nf4, torch.float16), dequantize_nf4(nf4, torch.float16))


def test_empty_weight(triton_device):
    from qtrain.kernels.nf4_dequant import nf4_dequantize_triton

    nf4 = quantize_nf4(torch.zeros(0, 64))
    assert nf4_dequantize_triton(nf4.to(triton_device)).shape == (0, 64)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_dequant_bit_exact_on_gpu_real_shape(dtype):
    from qtrain.kernels.nf4_dequant import is_interpreting, nf4_dequantize_triton

    if is_interpreting():
        pytest.skip("TRITON_INTERPRET=1: the compiled kernel is not in use")
    g = torch.Generator(device="cuda").manual_seed(0)
    nf4 = quantize_nf4(torch.randn(4096, 4096, device="cuda", generator=g).to(dtype) * 0.02)
    assert torch.equal(nf4_dequantize_triton(nf4, dtype), dequantize_nf4(nf4, dtype))
