"""qtrain.kernels.nf4_matmul: the large-M path (dequantize once into a shared buffer, then cuBLAS).

Against an fp64 reference (dequantized fp32 weight, every product in fp64): the output and every
gradient (x, A, B, bias), odd shapes, fp32 and under `torch.autocast` (fp16, bf16) with the backward
outside autocast, as training calls it. Without CUDA the dequantization runs in Triton's interpreter
(tests/kernels/conftest.py) or, with the interpreter off, in plain torch (`dequantize_nf4`).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from qtrain.nf4 import dequantize_nf4, quantize_nf4

# (M, N, K, r): rows of W aligned to NF4 blocks (K 192/320), straddling them (K 100), an odd
# element count (K 65 with N 33), one row, rank 1.
CASES = [(37, 80, 192, 8), (5, 72, 320, 4), (1, 80, 192, 16), (17, 72, 100, 3), (3, 33, 65, 1)]
SCALE = 0.7
# Largest error relative to the largest reference value. fp32: reordered fp32 sums of <= 320 terms.
# fp16/bf16 (autocast): W rounded to 16 bits (2^-11 / 2^-8 relative), products in 16-bit operands
# with fp32 accumulation, Y, XA, dY @ B and the gradients rounded once more: a few units of the
# 16-bit epsilon (fp16 2^-10 ~ 1e-3, bf16 2^-7 ~ 8e-3).
REL_TOL = {torch.float32: 2e-6, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _case_id(case):
    return "M{}-N{}-K{}-r{}".format(*case)


def make_inputs(M, N, K, R, device="cpu", seed=0, bias_dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    weight = quantize_nf4(torch.randn(N, K, generator=g) * 0.1).to(device)
    x = torch.randn(M, K, generator=g)
    a = torch.randn(R, K, generator=g) * 0.3  # adapter in fp32, as LoRALinear keeps it
    b = torch.randn(N, R, generator=g) * 0.3  # non-zero, so the adapter path matters
    bias = (torch.randn(N, generator=g) * 0.5).to(bias_dtype)
    grad_y = torch.randn(M, N, generator=g)
    return [t.to(device) for t in (x, a, b, bias, grad_y)], weight


def reference64(x, weight, a, b, bias, grad_y, mask=None):
    """(Y, [dX, dA, dB, dbias]) in fp64; `mask` (0 or 1/(1-p)) is the adapter input's dropout."""
    leaves = [t.detach().cpu().double().requires_grad_(True) for t in (x, a, b, bias)]
    x64, a64, b64, bias64 = leaves
    w64 = dequantize_nf4(weight.to("cpu"), torch.float32).double()
    h = x64 if mask is None else x64 * mask.cpu().double()
    y = x64 @ w64.T + SCALE * (h @ a64.T) @ b64.T + bias64
    y.backward(grad_y.cpu().double())
    return y.detach(), [t.grad for t in leaves]


def run(fn, x, weight, a, b, bias, grad_y, autocast=None, **kw):
    """Forward (under autocast when given), backward outside it, as training does."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, a, b, bias)]
    if autocast is None:
        y = fn(leaves[0], weight, leaves[1], leaves[2], SCALE, leaves[3], **kw)
    else:
        with torch.autocast(x.device.type, dtype=autocast):
            y = fn(leaves[0], weight, leaves[1], leaves[2], SCALE, leaves[3], **kw)
    y.backward(grad_y.to(y.dtype))
    return y.detach(), [t.grad for t in leaves]


def assert_rel_close(got, ref, tol, name):
    assert got is not None, f"{name} is missing"
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert ref.abs().max() > 0, f"{name}: the reference is all zeros"
    err = (got.cpu().double() - ref).abs().max().item() / ref.abs().max().item()
    assert err <= tol, f"{name}: relative error {err:.3g} > {tol}"


def check_path(fn, case, device, autocast=None, **kw):
    (x, a, b, bias, grad_y), weight = make_inputs(*case, device=device)
    y, grads = run(fn, x, weight, a, b, bias, grad_y, autocast=autocast, **kw)
    y_ref, grads_ref = reference64(x, weight, a, b, bias, grad_y)
    assert y.dtype == (autocast or x.dtype)  # compute_dtype(x)
    assert [g.dtype for g in grads] == [torch.float32] * 4  # leaves' own dtypes
    tol = REL_TOL[autocast or torch.float32]
    assert_rel_close(y, y_ref, tol, "Y")
    for name, g, r in zip(("dX", "dA", "dB", "dbias"), grads, grads_ref):
        assert_rel_close(g, r, tol, name)


def _dequant():
    from qtrain.kernels import nf4_matmul

    return nf4_matmul


@pytest.fixture(autouse=True)
def _fresh_buffers():
    yield
    _dequant().release_buffers()


# ---- output and every gradient --------------------------------------------------------------------


@pytest.mark.parametrize("autocast", [None, torch.float16, torch.bfloat16], ids=["fp32", "autocast-fp16", "autocast-bf16"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_fp64_reference(triton_device, case, autocast):
    check_path(_dequant().nf4_lora_dequant, case, triton_device, autocast)


@pytest.mark.parametrize("autocast", [None, torch.bfloat16], ids=["fp32", "autocast-bf16"])
def test_plain_torch_dequantization_without_the_interpreter(monkeypatch, autocast):
    # On a CPU without TRITON_INTERPRET the path dequantizes with qtrain.nf4 (no Triton at all)
    mod = _dequant()
    monkeypatch.setattr(mod, "_use_triton", lambda weight: False)
    check_path(mod.nf4_lora_dequant, CASES[0], "cpu", autocast)


def test_16bit_inputs_without_autocast(triton_device):
    (x, a, b, bias, grad_y), weight = make_inputs(*CASES[1], device=triton_device)
    y, grads = run(_dequant().nf4_lora_dequant, x.half(), weight, a, b, bias.half(), grad_y)
    y_ref, grads_ref = reference64(x.half(), weight, a, b, bias.half(), grad_y.half())
    assert y.dtype == torch.float16 and [g.dtype for g in grads] == [torch.float16, torch.float32, torch.float32, torch.float16]
    assert_rel_close(y, y_ref, REL_TOL[torch.float16], "Y")
    for name, g, r in zip(("dX", "dA", "dB", "dbias"), grads, grads_ref):
        assert_rel_close(g, r, REL_TOL[torch.float16], name)


def test_dropout_masks_the_adapter_input_only(triton_device):
    (x, a, b, bias, grad_y), weight = make_inputs(*CASES[0], device=triton_device)
    torch.manual_seed(5)
    y, grads = run(_dequant().nf4_lora_dequant, x, weight, a, b, bias, grad_y, dropout=0.5, training=True)
    torch.manual_seed(5)  # the same draw: F.dropout of a same-shaped fp32 tensor
    mask = torch.nn.functional.dropout(torch.ones_like(x), p=0.5, training=True)
    assert 0 < (mask == 0).sum() < mask.numel()
    y_ref, grads_ref = reference64(x, weight, a, b, bias, grad_y, mask=mask)
    assert_rel_close(y, y_ref, REL_TOL[torch.float32], "Y")
    for name, g, r in zip(("dX", "dA", "dB", "dbias"), grads, grads_ref):
        assert_rel_close(g, r, REL_TOL[torch.float32], name)
    y_eval, _ = run(_dequant().nf4_lora_dequant, x, weight, a, b, bias, grad_y, dropout=0.5, training=False)
    assert_rel_close(y_eval, reference64(x, weight, a, b, bias, grad_y)[0], REL_TOL[torch.float32], "Y (eval)")


def test_no_adapter_no_bias_and_3d_input(triton_device):
    (x, _, _, _, grad_y), weight = make_inputs(*CASES[0], device=triton_device)
    x3 = x[:36].reshape(4, 9, -1).requires_grad_(True)  # [batch, seq, K]
    y = _dequant().nf4_lora_dequant(x3, weight, None, None, SCALE)
    assert y.shape == (4, 9, weight.shape[0])
    y.backward(grad_y[:36].reshape(4, 9, -1))
    w = dequantize_nf4(weight.to("cpu"), torch.float32).double()
    torch.testing.assert_close(y.detach().cpu().double(), x3.detach().cpu().double() @ w.T, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x3.grad.cpu().double(), grad_y[:36].reshape(4, 9, -1).cpu().double() @ w, atol=1e-5, rtol=1e-5)


def test_empty_batch(triton_device):
    (x, a, b, bias, _), weight = make_inputs(*CASES[0], device=triton_device)
    xe = x[:0].clone().requires_grad_(True)
    y = _dequant().nf4_lora_dequant(xe, weight, a, b, SCALE, bias)
    assert y.shape == (0, weight.shape[0])
    y.sum().backward()
    assert xe.grad.shape == xe.shape


# ---- the shared buffer -----------------------------------------------------------------------------


def test_one_buffer_sized_to_the_largest_weight(triton_device):
    mod = _dequant()
    mod.release_buffers()
    (x, a, b, _, _), small = make_inputs(5, 33, 64, 2, device=triton_device)
    _, big = make_inputs(5, 80, 64, 2, device=triton_device, seed=1)
    mod.nf4_lora_dequant(x, small, a, b, SCALE)
    assert list(mod.buffer_numels().values()) == [33 * 64]
    first = mod.dequantize_into(big, torch.float32).data_ptr()
    y_small = mod.nf4_lora_dequant(x, small, a, b, SCALE)  # after the big one: reuses its buffer
    assert mod.buffer_numels() == {(str(x.device), torch.float32): 80 * 64}
    assert mod.dequantize_into(small, torch.float32).data_ptr() == first
    ref = x.double().cpu() @ dequantize_nf4(small.to("cpu"), torch.float32).double().T
    ref += SCALE * (x.double().cpu() @ a.double().cpu().T) @ b.double().cpu().T
    assert_rel_close(y_small, ref, REL_TOL[torch.float32], "Y")
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        mod.nf4_lora_dequant(x, small, a, b, SCALE)
    assert mod.buffer_numels()[(str(x.device), torch.bfloat16)] == 33 * 64  # one buffer per dtype
    mod.release_buffers()
    assert mod.buffer_numels() == {}


class _RecordAllocations(TorchDispatchMode):
    """Records (dtype, numel) of every tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.outputs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.outputs.append((str(func), t.dtype, t.numel()))
        return out


def test_no_fp32_activation_sized_tensors_under_autocast(triton_device):
    # Issue 16 item 5: no fp32 copy of X or dY, no fp32 [M, N] pass: under bf16 autocast every
    # tensor of activation size (M*K or M*N elements) the forward and backward create is 16-bit
    # (the interpreter's own uint8 storage copies aside).
    M, N, K, R = 64, 80, 192, 8
    (x, a, b, bias, grad_y), weight = make_inputs(M, N, K, R, device=triton_device)
    x16 = x.to(torch.bfloat16).requires_grad_(True)
    a, b = a.requires_grad_(True), b.requires_grad_(True)
    with _RecordAllocations() as rec:
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            y = _dequant().nf4_lora_dequant(x16, weight, a, b, SCALE, bias.requires_grad_(True))
        y.backward(grad_y.to(torch.bfloat16))
    big = [(f, d) for f, d, n in rec.outputs if n >= min(M * N, M * K) and d.is_floating_point]
    assert len(big) >= 4, big  # Y, XA @ B^T into Y, dX, the buffer: the check sees the products
    assert all(d == torch.bfloat16 for _, d in big), [o for o in big if o[1] != torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("N", [4096, 14336], ids=["q", "gate"])
def test_llama_shape_on_gpu(N):
    # Llama-3-8B projection at a training micro-batch, bf16 autocast forward, backward outside it;
    # reference: the same fp32 math on the GPU (fp64 would be slow at this size)
    M, K, R = 2048, 4096, 16
    (x, a, b, bias, grad_y), weight = make_inputs(M, N, K, R, device="cuda")
    y, grads = run(_dequant().nf4_lora_dequant, x, weight, a, b, bias, grad_y, autocast=torch.bfloat16)
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, a, b, bias)]
    w32 = dequantize_nf4(weight, torch.float32)
    y_ref = leaves[0] @ w32.T + SCALE * (leaves[0] @ leaves[1].T) @ leaves[2].T + leaves[3]
    y_ref.backward(grad_y)
    assert y.dtype == torch.bfloat16
    for name, got, ref in [("Y", y, y_ref.detach())] + [(n, g, l.grad) for n, g, l in zip(("dX", "dA", "dB", "dbias"), grads, leaves)]:
        err = (got.double() - ref.double()).abs().max().item() / ref.abs().max().item()
        assert err <= REL_TOL[torch.bfloat16], f"{name}: relative error {err:.3g}"
