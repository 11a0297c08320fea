"""qtrain.kernels.nf4_lora: the torch backend against the fp32 reference, forward and backward."""

from __future__ import annotations

import pytest
import torch
from qtrain.kernels.nf4_lora import NF4MatmulFunction, nf4_lora_reference, nf4_lora_torch

from qtrain.nf4 import dequantize_nf4, quantize_nf4

# Odd shapes on purpose: K*N is odd (a half-filled last byte) and neither K nor K*N is a multiple
# of the 64-value block, so blocks straddle rows.
M, K, N, R = 5, 65, 33, 3
SCALE = 2.0 / R

# fp32: the backend and the reference do the same fp32 math in a different order (a separate
# base and adapter sum); K=65 terms of size ~0.1 -> differences of a few fp32 ulps of O(1) values.
FP32_TOL = {"atol": 1e-5, "rtol": 1e-5}
# bf16: the backend rounds W, X@W^T, the adapter term and their sum to bf16 (8 significant bits,
# 2^-8 relative each), the reference only the final result: ~2 bf16 ulps (2 * 2^-7 relative) of
# outputs of size 1-5 (seen: 1 ulp, 0.031 at |y|~4.6), plus an absolute floor for tiny outputs.
BF16_TOL = {"atol": 2e-2, "rtol": 1.6e-2}
TOLS = {torch.float32: FP32_TOL, torch.bfloat16: BF16_TOL}


def make_inputs(dtype: torch.dtype, seed: int = 0, bias: bool = True, batch: tuple[int, ...] = (M,)):
    g = torch.Generator().manual_seed(seed)
    weight = quantize_nf4((torch.randn(N, K, generator=g) * 0.1).to(dtype))
    x = torch.randn(*batch, K, generator=g).to(dtype)
    a = torch.randn(R, K, generator=g) * 0.3  # adapter in fp32, as LoRALinear keeps it
    b = torch.randn(N, R, generator=g) * 0.3  # non-zero, so the adapter path matters
    bias_t = (torch.randn(N, generator=g) * 0.1).to(dtype) if bias else None
    return x, weight, a, b, bias_t


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_torch_backend_forward_matches_reference(dtype, with_bias):
    x, w, a, b, bias = make_inputs(dtype, bias=with_bias)
    got = nf4_lora_torch(x, w, a, b, SCALE, bias)
    ref = nf4_lora_reference(x, w, a, b, SCALE, bias)
    assert got.dtype == ref.dtype == dtype and got.shape == (M, N)
    torch.testing.assert_close(got, ref, **TOLS[dtype])
    # the adapter and the bias do contribute (a wrong scale or a dropped term would show)
    no_lora = nf4_lora_reference(x, w, None, None, SCALE, bias)
    assert (ref.float() - no_lora.float()).abs().max() > 10 * TOLS[dtype]["atol"]


def test_reference_is_dequantize_then_linear():
    x, w, a, b, bias = make_inputs(torch.float32)
    expected = x @ dequantize_nf4(w).T + SCALE * (x @ a.T) @ b.T + bias
    torch.testing.assert_close(nf4_lora_reference(x, w, a, b, SCALE, bias), expected, **FP32_TOL)


def test_no_adapter_is_base_only_and_batched_inputs_work():
    x, w, a, b, bias = make_inputs(torch.float32, batch=(2, 3))
    got = nf4_lora_torch(x, w, None, None, SCALE, bias)
    assert got.shape == (2, 3, N)
    torch.testing.assert_close(got, x @ dequantize_nf4(w).T + bias, **FP32_TOL)
    torch.testing.assert_close(
        nf4_lora_torch(x, w, a, b, SCALE),
        (x.view(-1, K) @ dequantize_nf4(w).T + SCALE * x.view(-1, K) @ a.T @ b.T).view(2, 3, N),
        **FP32_TOL,
    )


def test_dropout_only_in_training():
    x, w, a, b, _ = make_inputs(torch.float32)
    ref = nf4_lora_reference(x, w, a, b, SCALE)
    torch.testing.assert_close(nf4_lora_torch(x, w, a, b, SCALE, dropout=0.5, training=False), ref, **FP32_TOL)
    torch.manual_seed(0)
    y = nf4_lora_torch(x, w, a, b, SCALE, dropout=0.5, training=True)
    assert (y - ref).abs().max() > 1e-3  # half of the adapter inputs were dropped (and the rest x2)
    # dropout touches the adapter input only: the base output is the same with and without it
    base = nf4_lora_torch(x, w, None, None, SCALE)
    torch.manual_seed(0)
    mask_scaled = torch.nn.functional.dropout(torch.ones_like(x), 0.5, training=True)
    torch.testing.assert_close(y, base + SCALE * ((x * mask_scaled) @ a.T) @ b.T, **FP32_TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_torch_backend_gradients_match_reference(dtype):
    x, w, a, b, bias = make_inputs(dtype, seed=1)
    grad_y = torch.randn(M, N, generator=torch.Generator().manual_seed(2)).to(dtype)

    def grads(fn):
        xs, as_, bs, bias_s = (t.detach().clone().requires_grad_(True) for t in (x, a, b, bias))
        fn(xs, w, as_, bs, SCALE, bias_s).backward(grad_y)
        return [xs.grad, as_.grad, bs.grad, bias_s.grad]

    got = grads(nf4_lora_torch)
    ref = grads(nf4_lora_reference)
    for name, g, r in zip(("dX", "dA", "dB", "dbias"), got, ref):
        assert g is not None, name
        assert g.dtype == r.dtype, name
        assert g.abs().max() > 0, name  # non-trivial: B != 0 so dA != 0
        torch.testing.assert_close(g, r, **TOLS[dtype], msg=lambda m, name=name: f"{name}: {m}")


def test_nf4_matmul_gradcheck_fp64():
    # The frozen NF4 base: Y = X @ dequant(W)^T. In fp64 the dequantized weight is exact (fp32 values),
    # so the analytical dX must match finite differences at gradcheck's default tolerances.
    x, w, *_ = make_inputs(torch.float32)
    x64 = x.double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: NF4MatmulFunction.apply(t, w), (x64,))
    # and equal autograd through the dequantized weight
    w64 = dequantize_nf4(w, torch.float64)
    g = torch.randn(M, N, dtype=torch.float64)
    (dx_fn,) = torch.autograd.grad(NF4MatmulFunction.apply(x64, w), x64, g)
    (dx_ref,) = torch.autograd.grad(x64 @ w64.T, x64, g)
    torch.testing.assert_close(dx_fn, dx_ref, atol=1e-12, rtol=1e-12)  # same fp64 matmul: rounding only


def test_nf4_matmul_skips_dx_when_not_needed():
    x, w, *_ = make_inputs(torch.float32)
    a = torch.randn(R, K, requires_grad=True)
    y = NF4MatmulFunction.apply(x, w) + (x @ a.T).sum()  # x needs no grad
    y.sum().backward()
    assert a.grad is not None and x.grad is None


def _nf4_nodes(y: torch.Tensor):
    seen, stack, out = set(), [y.grad_fn], []
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if type(fn).__name__.startswith("NF4MatmulFunction"):
            out.append(fn)
        stack.extend(f for f, _ in fn.next_functions)
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_backward_keeps_no_dequantized_weight(dtype):
    x, w, a, b, _ = make_inputs(dtype)
    x.requires_grad_(True)
    a.requires_grad_(True)
    b.requires_grad_(True)
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = nf4_lora_torch(x, w, a, b, SCALE)
    assert saved, "the adapter path saves its inputs: the hook must have seen something"
    dense_sizes = {N * K * s for s in (2, 4)}  # a bf16/fp16 or fp32 copy of W
    for t in saved:
        assert t.numel() * t.element_size() not in dense_sizes, f"a dense weight {tuple(t.shape)} {t.dtype} is saved"
        assert t.numel() != N * K, f"a dense weight {tuple(t.shape)} is saved"
    # NF4MatmulFunction keeps the NF4 weight on ctx (outside the hooks): nothing else dense on it
    (node,) = _nf4_nodes(y)
    assert not node.saved_tensors
    for attr, value in vars(node).items():
        tensors = [value] if isinstance(value, torch.Tensor) else []
        if hasattr(value, "packed"):  # the NF4Tensor: only 4-bit data and its statistics
            assert value is w
            tensors = [value.packed, value.absmax, value.code, value.absmax_scale, value.absmax_code]
        for t in tensors:
            assert t.numel() < N * K, f"ctx.{attr} holds a tensor of {t.numel()} elements"
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_torch_backend_on_cuda_matches_reference(dtype):
    x, w, a, b, bias = make_inputs(dtype)
    ref = nf4_lora_reference(x, w, a, b, SCALE, bias)
    got = nf4_lora_torch(x.cuda(), w.to("cuda"), a.cuda(), b.cuda(), SCALE, bias.cuda())
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), ref, **TOLS[dtype])
