"""qtrain.nf4 against bitsandbytes itself (CPU): same bits, same statistics, same dequantization."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from qtrain.kernels import nf4 as nf4_mod

from qtrain.nf4 import (
    NF4_LEVELS,
    QUANT_STATE_KEY,
    bitsandbytes_ops,
    block_absmax,
    dequantize_nf4,
    dequantize_nf4_torch,
    dynamic_code,
    from_bnb_state_dict,
    is_bnb_nf4,
    quantize_nf4,
    to_bnb_state_dict,
)

bnb = pytest.importorskip("bitsandbytes")
BF = pytest.importorskip("bitsandbytes.functional")

SHAPES = [(7, 9), (1, 63), (3, 65), (513, 77), (300, 130), (128,)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# Largest gap between neighbouring NF4 levels (between -1 and -0.696): a value is at most half of
# it (times its block's absmax) away from the level it is rounded to.
MAX_NF4_GAP = max(b - a for a, b in itertools.pairwise(NF4_LEVELS))


def bnb_quantize(w: torch.Tensor, double_quant: bool = True):
    return BF.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=double_quant)


def assert_same_as_bnb(w: torch.Tensor, double_quant: bool = True) -> None:
    packed, qs = bnb_quantize(w, double_quant)
    ours = quantize_nf4(w, double_quant=double_quant)
    assert torch.equal(ours.packed, packed.view(-1)), "packed NF4 bytes differ from bitsandbytes"
    assert ours.absmax.dtype == qs.absmax.dtype
    assert torch.equal(ours.absmax, qs.absmax), "absmax differs from bitsandbytes"
    assert ours.double_quant == double_quant
    if double_quant:
        assert ours.absmax.dtype == torch.uint8
        assert torch.equal(ours.absmax_scale, qs.state2.absmax), "nested absmax differs"
        assert torch.equal(ours.absmax_code, qs.state2.code), "nested quant map differs"
        assert ours.absmax_offset == qs.offset.item(), "nested offset differs"
    assert torch.equal(ours.code, qs.code)
    assert ours.dtype == qs.dtype == w.dtype
    ref = BF.dequantize_4bit(packed, qs)
    got = dequantize_nf4(ours)
    assert got.dtype == ref.dtype == w.dtype
    assert got.shape == w.shape
    # bit-for-bit; a 1-D weight comes back from bnb in its own layout, hence the flat compare
    assert torch.equal(got.view(-1), ref.view(-1)), "dequantized weight differs from bitsandbytes"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_quantize_matches_bitsandbytes(shape, dtype):
    torch.manual_seed(10 * SHAPES.index(shape) + DTYPES.index(dtype))  # deterministic per case
    w = (torch.randn(shape) * 0.05).to(dtype)
    assert_same_as_bnb(w)


@pytest.mark.parametrize("shape", [(3, 65), (300, 130)], ids=lambda s: "x".join(map(str, s)))
def test_single_quant_matches_bitsandbytes(shape):
    torch.manual_seed(7)
    assert_same_as_bnb(torch.randn(shape), double_quant=False)


def test_many_absmax_blocks_and_heavy_tails_match_bitsandbytes():
    # > 256 absmax values (several nested blocks, the last one partial) and a wide range of
    # block magnitudes, so the 8-bit dynamic map is used across its exponents.
    torch.manual_seed(3)
    w = torch.randn(257, 129) * torch.logspace(-4, 1, 129)[None, :]
    w[5, 7] = 300.0  # an outlier dominates its block and its nested block
    assert_same_as_bnb(w)


def test_zero_blocks_and_constant_rows_match_bitsandbytes():
    torch.manual_seed(5)
    w = torch.randn(6, 128)
    w[0] = 0.0  # two all-zero blocks
    w[1] = 0.25  # constant rows: every value equals its block's absmax
    w[2] = -3.0
    w[3, :64] = 0.0  # one zero block next to a normal one
    assert_same_as_bnb(w)
    ours = quantize_nf4(w)
    deq = dequantize_nf4(ours)
    assert torch.equal(deq[0], torch.zeros(128)), "an all-zero block must dequantize to exact zeros"
    idx_row = lambda r: torch.stack([ours.packed >> 4, ours.packed & 0xF], -1).view(-1)[r * 128 : (r + 1) * 128]
    assert (idx_row(0) == NF4_LEVELS.index(0.0)).all()
    assert (idx_row(1) == 15).all() and (idx_row(2) == 0).all()


def test_all_zero_and_odd_tail_match_bitsandbytes():
    assert_same_as_bnb(torch.zeros(5, 13))
    w = torch.zeros(3, 65)
    w.view(-1)[-1] = 1.5  # the tail (partial) block holds the only non-zero value
    assert_same_as_bnb(w)


def test_chunked_quantization_matches_bitsandbytes(monkeypatch):
    # quantize_nf4 works in chunks of _CHUNK elements; shrink it so chunk seams (and a partial
    # last chunk with an odd count) are exercised on a small tensor.
    monkeypatch.setattr(nf4_mod, "_CHUNK", 64 * 3 + 5)  # -> 192-element steps
    torch.manual_seed(11)
    for shape in [(7, 99), (1000,), (192 * 4,)]:
        assert_same_as_bnb(torch.randn(shape))


def test_exact_midpoints_round_down_like_bitsandbytes():
    # Values exactly halfway between two levels (block absmax 1, so no rescaling): bnb's
    # quantizer sends a tie to the lower level, in full blocks and in the tail block alike.
    code = torch.tensor(NF4_LEVELS)
    mids = (code[:-1] + code[1:]) / 2
    block = torch.cat([torch.tensor([1.0]), mids, -mids, torch.zeros(64 - 31)])
    w = torch.cat([block, block[:40]])  # a full block and a 40-value tail block
    for dq in (False, True):
        assert_same_as_bnb(w, double_quant=dq)
    nf4 = quantize_nf4(w, double_quant=False)
    idx = torch.stack([nf4.packed >> 4, nf4.packed & 0xF], -1).view(-1)
    assert idx[1:16].tolist() == list(range(15))  # midpoint i|i+1 -> i
    assert idx[65:80].tolist() == list(range(15))


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "sq"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", [(64, 160), (300, 130), (513, 78), (2, 1), (1536, 512), (7, 9)], ids=str)
def test_native_cpu_dequantization_is_the_pytorch_one_bit_for_bit(shape, dtype, double_quant):
    """On CPU, dequantize_nf4 runs bitsandbytes' native kernel (flat, so rows of any even or odd
    length, e.g. 160 or 130 values, keep bitsandbytes' flat 64-value blocks); odd element counts
    (7 x 9) take the PyTorch path. Both give the same bits in every dtype."""
    assert bitsandbytes_ops() is not None  # bitsandbytes is installed here: the native path runs
    torch.manual_seed(3)
    nf4 = quantize_nf4(torch.randn(shape).to(dtype) * 3, double_quant=double_quant)
    for out in (None, *DTYPES):
        got, want = dequantize_nf4(nf4, out), dequantize_nf4_torch(nf4, out)
        assert got.dtype == want.dtype == (out or dtype) and got.shape == want.shape == shape
        assert torch.equal(got, want), (shape, dtype, out)


def test_packing_high_nibble_first():
    # 16 values, each exactly one NF4 level (block absmax = 1): indices 0..15 in order.
    w = torch.tensor(NF4_LEVELS)
    nf4 = quantize_nf4(w, double_quant=False)
    assert nf4.packed.tolist() == [(2 * i) << 4 | (2 * i + 1) for i in range(8)]
    assert torch.equal(dequantize_nf4(nf4), w)


def test_dynamic_code_is_bitsandbytes_map():
    assert torch.equal(dynamic_code(), BF.create_dynamic_map(signed=True))


@pytest.mark.parametrize("shape", [(300, 130), (1, 63)])
def test_quantization_error_is_bounded(shape):
    torch.manual_seed(2)
    w = torch.randn(shape) * 0.1
    nf4 = quantize_nf4(w)
    n = w.numel()
    deq = dequantize_nf4(nf4).view(-1)
    flat = w.view(-1)
    pad = -n % 64
    true_absmax = torch.nn.functional.pad(flat.abs(), (0, pad)).view(-1, 64).amax(1)
    stored_absmax = block_absmax(nf4)
    # The stored (8-bit, double-quantized) absmax is within half a step of the dynamic map of the
    # true one: the map's coarsest step near 1 is 0.9/64 (7 bits of fraction), and bnb's CPU
    # quantizer places values on a 65536-point grid first (+1/65535) -> 0.5*0.9/64 + 2/65535 < 0.0075.
    nested_scale = nf4.absmax_scale.repeat_interleave(256)[: true_absmax.numel()]
    assert ((stored_absmax - true_absmax).abs() <= 0.0075 * nested_scale).all()
    # Each value is within half the largest NF4 gap (of its block's absmax) of its level, plus the
    # absmax error (|level| <= 1); 1e-6 relative slack for the fp32 products.
    bound = true_absmax * MAX_NF4_GAP / 2 + (stored_absmax - true_absmax).abs() + 1e-6 * true_absmax
    err = (deq - flat).abs()
    err_per_block = torch.nn.functional.pad(err, (0, pad)).view(-1, 64).amax(1)
    assert (err_per_block <= bound).all()
    # and the error is not trivially small either: the bound above is not vacuous
    assert err.max() > 0.1 * (true_absmax * MAX_NF4_GAP / 2).max()


def test_indices_are_nearest_levels():
    # Without double quantization the stored absmax is exact: every index must be a nearest level.
    torch.manual_seed(4)
    w = torch.randn(40, 64)
    nf4 = quantize_nf4(w, double_quant=False)
    idx = torch.stack([nf4.packed >> 4, nf4.packed & 0xF], -1).view(-1).long()
    scaled = (w.view(-1, 64) / w.view(-1, 64).abs().amax(1, keepdim=True)).view(-1)
    dist = (scaled[:, None] - nf4.code[None, :]).abs()
    chosen = dist.gather(1, idx[:, None]).squeeze(1)
    assert torch.all(chosen <= dist.min(1).values + 1e-7)


def test_rejects_non_float_weight():
    with pytest.raises(TypeError, match="fp32/fp16/bf16"):
        quantize_nf4(torch.ones(4, 4, dtype=torch.int32))


# ---- bitsandbytes state dicts ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_to_bnb_state_dict_loads_in_bitsandbytes(dtype):
    torch.manual_seed(8)
    w = torch.randn(33, 65).to(dtype)
    ours = quantize_nf4(w)
    sd = to_bnb_state_dict(ours, prefix="weight")
    assert is_bnb_nf4(sd) and not is_bnb_nf4(sd, prefix="other")
    packed = sd["weight"]
    qs_dict = {k.removeprefix("weight."): v for k, v in sd.items() if k != "weight"}
    qs = BF.QuantState.from_dict(qs_dict=qs_dict, device=torch.device("cpu"))
    assert qs.dtype == dtype and tuple(qs.shape) == (33, 65) and qs.nested
    ref = BF.dequantize_4bit(packed, qs)
    assert torch.equal(ref, dequantize_nf4(ours))
    # and it is exactly what bnb writes for the same weight
    bnb_packed, bnb_qs = bnb_quantize(w)
    bnb_sd = {"weight": bnb_packed, **{f"weight.{k}": v for k, v in bnb_qs.as_dict(packed=True).items()}}
    assert set(sd) == set(bnb_sd)
    for k in sd:
        if k.endswith(QUANT_STATE_KEY):
            assert json.loads(bytes(sd[k].tolist())) == json.loads(bytes(bnb_sd[k].tolist()))
        else:
            assert sd[k].dtype == bnb_sd[k].dtype and torch.equal(sd[k], bnb_sd[k]), k


def test_state_dict_round_trip_with_prefix():
    torch.manual_seed(9)
    ours = quantize_nf4(torch.randn(17, 31).half())
    sd = to_bnb_state_dict(ours, prefix="model.layers.0.mlp.up_proj.weight")
    back = from_bnb_state_dict(sd, prefix="model.layers.0.mlp.up_proj.weight")
    assert back.shape == ours.shape and back.dtype == torch.float16
    assert back.absmax_offset == ours.absmax_offset
    assert torch.equal(dequantize_nf4(back), dequantize_nf4(ours))


def test_from_bnb_linear4bit_state_dict():
    torch.manual_seed(10)
    lin = bnb.nn.Linear4bit(77, 33, bias=True, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
    w = lin.weight.data.clone()
    lin = lin.to("cpu")  # Params4bit quantizes on the move to a (non-meta) device, CPU included
    assert lin.weight.bnb_quantized and lin.weight.dtype == torch.uint8
    sd = lin.state_dict()
    assert is_bnb_nf4(sd)
    nf4 = from_bnb_state_dict(sd, prefix="weight")
    assert nf4.shape == (33, 77) and nf4.dtype == torch.float32 and nf4.double_quant
    ref = BF.dequantize_4bit(lin.weight.data, lin.weight.quant_state)
    assert torch.equal(dequantize_nf4(nf4), ref)
    # bnb quantized the same fp32 weight we would have: the bits agree with ours too
    assert torch.equal(nf4.packed, quantize_nf4(w).packed)


def test_fp4_state_dict_is_rejected():
    torch.manual_seed(12)
    packed, qs = BF.quantize_4bit(torch.randn(8, 64), quant_type="fp4", blocksize=64, compress_statistics=True)
    sd = {"weight": packed, **{f"weight.{k}": v for k, v in qs.as_dict(packed=True).items()}}
    with pytest.raises(ValueError, match="(?i)fp4"):
        from_bnb_state_dict(sd, prefix="weight")
    assert not is_bnb_nf4(sd)


def test_wrong_quant_type_in_metadata_is_rejected():
    sd = to_bnb_state_dict(quantize_nf4(torch.randn(4, 64)))
    meta = json.loads(bytes(sd[f"weight.{QUANT_STATE_KEY}"].tolist()))
    meta["quant_type"] = "fp4"
    sd[f"weight.{QUANT_STATE_KEY}"] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    with pytest.raises(ValueError, match="fp4"):
        from_bnb_state_dict(sd)


def test_missing_quant_state_is_a_key_error():
    with pytest.raises(KeyError, match="not a bitsandbytes 4-bit weight"):
        from_bnb_state_dict({"weight": torch.zeros(4, 1, dtype=torch.uint8)})


def test_nf4_tensor_to_moves_every_buffer():
    nf4 = quantize_nf4(torch.randn(4, 64))
    moved = nf4.to("meta")
    for name in ("packed", "absmax", "code", "absmax_scale", "absmax_code"):
        assert getattr(moved, name).device.type == "meta", name
        assert getattr(nf4, name).device.type == "cpu", name  # the original is untouched
    assert nf4.nbytes() == 128 + 4 + 16 * 4 + 1 * 4 + 256 * 4
