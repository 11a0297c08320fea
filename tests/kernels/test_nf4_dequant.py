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


# ---- the vectorized kernel: pair table, whole blocks, out= ------------------------------------------


def test_pair_table_is_high_nibble_first():
    from qtrain.kernels.nf4_dequant import nf4_pair_table

    from qtrain.nf4 import nf4_code

    pairs = nf4_pair_table(torch.float32).view(torch.float32).view(256, 2)  # [byte, (hi, lo)]
    code = nf4_code()
    for byte in (0x00, 0x0F, 0xF0, 0x7A, 0xA7, 0xFF):
        assert pairs[byte, 0] == code[byte >> 4] and pairs[byte, 1] == code[byte & 0xF], hex(byte)
    assert nf4_pair_table(torch.float32) is nf4_pair_table(torch.float32)  # built once per (dtype, device)
    with pytest.raises(ValueError, match="fp32"):
        nf4_pair_table(torch.bfloat16)


# Block counts around the kernel's 16 blocks per program: 1, 15, 17 (a partial program), 33 with
# a 17-value partial last block and an odd element count (2065 = 32 * 64 + 17).
@pytest.mark.parametrize("numel", [64, 15 * 64, 17 * 64, 2065], ids=lambda n: f"n{n}")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_odd_numbers_of_blocks(triton_device, numel, dtype):
    from qtrain.kernels.nf4_dequant import nf4_dequantize_triton

    nf4 = _weight((1, numel), torch.float32, seed=numel)
    got = nf4_dequantize_triton(nf4.to(triton_device), dtype).cpu()
    assert torch.equal(got, dequantize_nf4(nf4, dtype))


def test_same_bits_as_bitsandbytes_on_its_codes(triton_device):
    BF = pytest.importorskip("bitsandbytes.functional")
    from qtrain.kernels.nf4_dequant import nf4_dequantize_triton

    from qtrain.nf4 import from_bnb_state_dict, to_bnb_state_dict

    w = torch.randn(37, 192, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    packed, qs = BF.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=True)
    ref = BF.dequantize_4bit(packed, qs)  # bitsandbytes' own dequantization of its own codes
    # bitsandbytes' codes, read through our state-dict loader (its quant_state, as a checkpoint holds it)
    state = {"weight": packed, **{f"weight.{k}": v for k, v in qs.as_dict(packed=True).items()}}
    nf4 = from_bnb_state_dict(state)
    assert torch.equal(nf4.packed, packed.view(-1))
    assert set(to_bnb_state_dict(nf4)) <= set(state)
    got = nf4_dequantize_triton(nf4.to(triton_device), torch.bfloat16).cpu()
    assert torch.equal(got, ref.view(got.shape))


def test_out_buffer_is_written_and_reused(triton_device):
    from qtrain.kernels.nf4_dequant import nf4_dequantize_triton

    big = torch.full((40 * 100,), float("nan"), dtype=torch.float16, device=triton_device)
    for shape in [(33, 100), (7, 9)]:  # the second, smaller weight reuses the front of the same buffer
        nf4 = _weight(shape, torch.float32).to(triton_device)
        out = big[: nf4.numel()]
        got = nf4_dequantize_triton(nf4, torch.float16, out=out)
        assert got.data_ptr() == big.data_ptr() and got.shape == torch.Size(shape)
        assert torch.equal(got.cpu(), dequantize_nf4(nf4.to("cpu"), torch.float16))
    assert torch.isnan(big[33 * 100 :]).all()  # nothing written past the weight


@pytest.mark.parametrize(
    "bad", [{"dtype": torch.float32}, {"numel": 99}, {"strided": True}], ids=["dtype", "numel", "strided"]
)
def test_out_buffer_is_checked(triton_device, bad):
    from qtrain.kernels.nf4_dequant import nf4_dequantize_triton

    nf4 = _weight((10, 10), torch.float32).to(triton_device)
    n = bad.get("numel", 100) * (2 if bad.get("strided") else 1)
    out = torch.empty(n, dtype=bad.get("dtype", torch.float16), device=triton_device)
    with pytest.raises(ValueError, match="out must be"):
        nf4_dequantize_triton(nf4, torch.float16, out=out[::2] if bad.get("strided") else out)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_dequant_bit_exact_on_gpu_real_shape(dtype):
    from qtrain.kernels.nf4_dequant import is_interpreting, nf4_dequantize_triton

    if is_interpreting():
        pytest.skip("TRITON_INTERPRET=1: the compiled kernel is not in use")
    g = torch.Generator(device="cuda").manual_seed(0)
    nf4 = quantize_nf4(torch.randn(4096, 4096, device="cuda", generator=g).to(dtype) * 0.02)
    assert torch.equal(nf4_dequantize_triton(nf4, dtype), dequantize_nf4(nf4, dtype))
