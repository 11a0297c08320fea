"""qtrain.kernels.nf4_gemv: the small-M (decode) path, a GEMV-style Triton kernel without tl.dot.

Against an fp64 reference: output and every gradient (x, A, B, bias; the backward is the dequant
path's), odd shapes, M above 16 (chunks of 16 rows), fp32 and forward under `torch.autocast`
(fp16, bf16: the kernel has no tl.dot, so bf16 is exact in the interpreter too) with the backward
outside it. Without CUDA the kernel runs in Triton's interpreter (tests/kernels/conftest.py).
"""

from __future__ import annotations

import pytest
import torch

from qtrain.nf4 import dequantize_nf4, quantize_nf4

# (M, N, K, r): decode (M 1), M 5, M 16 (one full chunk) and 37 (three chunks, the last partial);
# K aligned to NF4 blocks (192, 320), straddling rows (100) and odd (65, N*K odd).
CASES = [(1, 80, 192, 8), (5, 72, 320, 4), (16, 80, 100, 3), (37, 33, 65, 1)]
SCALE = 0.7
# Largest error relative to the largest reference value (see test_nf4_matmul.py): fp32 sums in
# another order; 16-bit: W, Y, XA and the gradients rounded to 16 bits.
REL_TOL = {torch.float32: 2e-6, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _case_id(case):
    return "M{}-N{}-K{}-r{}".format(*case)


def make_inputs(M, N, K, R, device="cpu", seed=0, **quant):
    g = torch.Generator().manual_seed(seed)
    weight = quantize_nf4(torch.randn(N, K, generator=g) * 0.1, **quant).to(device)
    x = torch.randn(M, K, generator=g)
    a = torch.randn(R, K, generator=g) * 0.3
    b = torch.randn(N, R, generator=g) * 0.3
    bias = torch.randn(N, generator=g) * 0.5
    grad_y = torch.randn(M, N, generator=g)
    return [t.to(device) for t in (x, a, b, bias, grad_y)], weight


def reference64(x, weight, a, b, bias, grad_y):
    leaves = [t.detach().cpu().double().requires_grad_(True) for t in (x, a, b, bias)]
    x64, a64, b64, bias64 = leaves
    w64 = dequantize_nf4(weight.to("cpu"), torch.float32).double()
    y = x64 @ w64.T + SCALE * (x64 @ a64.T) @ b64.T + bias64
    y.backward(grad_y.cpu().double())
    return y.detach(), [t.grad for t in leaves]


def assert_rel_close(got, ref, tol, name):
    assert got is not None and got.shape == ref.shape, name
    assert ref.abs().max() > 0, f"{name}: the reference is all zeros"
    err = (got.cpu().double() - ref).abs().max().item() / ref.abs().max().item()
    assert err <= tol, f"{name}: relative error {err:.3g} > {tol}"


def _gemv():
    from qtrain.kernels import nf4_gemv

    return nf4_gemv


@pytest.mark.parametrize("autocast", [None, torch.float16, torch.bfloat16], ids=["fp32", "autocast-fp16", "autocast-bf16"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_fp64_reference(triton_device, case, autocast):
    (x, a, b, bias, grad_y), weight = make_inputs(*case, device=triton_device)
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, a, b, bias)]
    with torch.autocast(x.device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        y = _gemv().nf4_lora_gemv(leaves[0], weight, leaves[1], leaves[2], SCALE, leaves[3])
    y.backward(grad_y.to(y.dtype))  # outside autocast, as training
    y_ref, grads_ref = reference64(x, weight, a, b, bias, grad_y)
    assert y.dtype == (autocast or torch.float32)
    tol = REL_TOL[autocast or torch.float32]
    assert_rel_close(y.detach(), y_ref, tol, "Y")
    for name, leaf, r in zip(("dX", "dA", "dB", "dbias"), leaves, grads_ref):
        assert leaf.grad.dtype == torch.float32, name
        assert_rel_close(leaf.grad, r, tol, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "fp32absmax"])
def test_base_product_uses_the_16bit_weight(triton_device, dtype, double_quant):
    # the kernel multiplies W rounded to X's dtype (as every NF4 path does), summed in fp32:
    # against an fp64 product of those same 16-bit weights, only fp32 summation error remains
    (x, _, _, bias, _), weight = make_inputs(17, 72, 192, 1, device=triton_device, double_quant=double_quant)
    y = _gemv().nf4_gemv(x.to(dtype), weight, bias.to(dtype))
    w = dequantize_nf4(weight.to("cpu"), dtype).double()
    ref = (x.to(dtype).cpu().double() @ w.T + bias.to(dtype).cpu().double()).to(dtype)
    assert y.dtype == dtype
    ulp = {torch.float32: 1e-6, torch.float16: 2**-10, torch.bfloat16: 2**-7}[dtype]
    torch.testing.assert_close(y.cpu(), ref, rtol=ulp, atol=ulp * ref.abs().max().item())  # cancellation near 0


def test_blocksize_128_and_no_adapter(triton_device):
    (x, _, _, _, grad_y), weight = make_inputs(3, 40, 256, 1, device=triton_device, blocksize=128)
    xg = x.clone().requires_grad_(True)
    y = _gemv().nf4_lora_gemv(xg, weight, None, None, SCALE)
    y.backward(grad_y)
    w = dequantize_nf4(weight.to("cpu"), torch.float32).double()
    assert_rel_close(y.detach(), x.cpu().double() @ w.T, 2e-6, "Y")
    assert_rel_close(xg.grad, grad_y.cpu().double() @ w, 2e-6, "dX")


def test_3d_input_and_empty_batch(triton_device):
    (x, a, b, bias, _), weight = make_inputs(6, 33, 64, 2, device=triton_device)
    y = _gemv().nf4_lora_gemv(x.reshape(2, 3, 64), weight, a, b, SCALE, bias)
    assert y.shape == (2, 3, 33)
    assert _gemv().nf4_lora_gemv(x[:0], weight, a, b, SCALE, bias).shape == (0, 33)


def test_gemv_config_chunks_of_16_rows():
    cfg = _gemv().gemv_config
    assert [cfg(m, 64)["BLOCK_M"] for m in (1, 2, 3, 16, 17, 4096)] == [1, 2, 4, 16, 16, 16]
    assert cfg(1, 128)["BLOCK_K"] == 128


def test_clear_error_on_plain_cpu(triton_device, monkeypatch):
    if triton_device != "cpu":
        pytest.skip("checks the CPU tensors' error")
    from qtrain.kernels import nf4_dequant

    monkeypatch.setattr(nf4_dequant, "is_interpreting", lambda: False)  # as without TRITON_INTERPRET
    (x, a, b, bias, _), weight = make_inputs(1, 33, 64, 2)
    with pytest.raises(RuntimeError, match="need CUDA tensors.*TRITON_INTERPRET=1"):
        _gemv().nf4_lora_gemv(x, weight, a, b, SCALE, bias)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 16, 33])
def test_llama_shape_on_gpu(M):
    from qtrain.kernels.nf4_dequant import is_interpreting

    if is_interpreting():
        pytest.skip("TRITON_INTERPRET=1: the compiled kernel is not in use")
    (x, a, b, bias, _), weight = make_inputs(M, 4096, 4096, 16, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = _gemv().nf4_lora_gemv(x, weight, a, b, SCALE, bias)
    w = dequantize_nf4(weight, torch.bfloat16).float()
    ref = x.to(torch.bfloat16).float() @ w.T + SCALE * (x @ a.T) @ b.T + bias
    err = (y.float() - ref).abs().max().item() / ref.abs().max().item()
    assert y.dtype == torch.bfloat16 and err <= REL_TOL[torch.bfloat16], err
