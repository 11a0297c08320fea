"""qtrain.kernels.rms_norm: the RMSNorm Triton kernels against the reference and transformers' modules.

Without CUDA the kernels run under Triton's interpreter on CPU tensors (tests/kernels/conftest.py):
small odd shapes in fp32/fp16, output and both gradients against the reference in fp64; the bf16
test at Llama-3 8B's shape runs only on a GPU. The reference itself is checked to BE transformers'
LlamaRMSNorm / Qwen2RMSNorm (bitwise), and the kernel to follow its cast order (rounding the
normalized x to the input dtype before the weight multiplies it).
"""

from __future__ import annotations

import pytest
import torch
from qtrain.kernels import rms_norm as rms_mod
from qtrain.kernels.rms_norm import RMSNormFunction, rms_norm, rms_norm_reference
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

# Tolerances, in units of u, the dtype's unit roundoff (half an ulp at 1): every output and gradient
# must satisfy |got - ref| <= 2u * |ref| + ATOL_U * u * max|ref|, ref computed in fp64 from the same
# (rounded) inputs. The kernel rounds Y twice (xhat to x's dtype, then the product: 2u relative, no
# cancellation) and dX once, after fp32 math whose cancellation (g - xhat * mean(g * xhat)) leaves
# fp32-sized errors relative to the largest terms: ATOL_U = 2. dW sums M products dy * round(xhat),
# each off by <= u relative with random signs, so its error is ~u * sqrt(M) * rms(dy * xhat), about
# u * max|dW|; seen 1.2u at M <= 64 over 6 seeds: ATOL_U = 4 for it. For fp32, u is taken as 2^-20
# (16 fp32 ulps): the same fp32 math in another order, and the GPU's approximate rsqrt.
# Seen (max |err| / max|ref|): fp32 y 1e-7, dx 1e-7, dw 9e-8; fp16 6.0e-4, 3.7e-4, 5.7e-4.
UNIT_ROUNDOFF = {torch.float32: 2.0**-20, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
ATOL_U = {"Y": 2, "dX": 2, "dW": 4}
EPS = 1e-5  # Llama-3's rms_norm_eps
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread (OpenMP spin-waits cost more than they give on 2 shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_inputs(shape, dtype, device="cpu", seed=0, w_dtype=None):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 2).to(dtype)  # [..., N]
    w = (1 + 0.5 * torch.randn(shape[-1], generator=g)).to(w_dtype or dtype)  # [N], away from all-ones
    dy = torch.randn(shape, generator=g).to(torch.promote_types(dtype, w.dtype))  # in Y's dtype
    return x.to(device), w.to(device), dy.to(device)


def forward_and_grads(fn, x, w, dy, train_x=True, train_w=True):
    x = x.detach().requires_grad_(train_x)  # a new leaf on the same memory (strides kept)
    w = w.detach().requires_grad_(train_w)
    y = fn(x, w, EPS)
    y.backward(dy.to(y.dtype))
    return y.detach(), x.grad, w.grad


def fp64_reference(x, w, dy, train_x=True, train_w=True):
    return forward_and_grads(rms_norm_reference, x.cpu().double(), w.cpu().double(), dy.cpu(), train_x, train_w)


def assert_close(got, ref, dtype, name):
    """|got - ref| <= 2u |ref| + ATOL_U[name] u max|ref| (see the tolerance comment at the top)."""
    assert got is not None, f"{name} is missing"
    u = UNIT_ROUNDOFF[dtype]
    atol = ATOL_U[name] * u * ref.abs().max().item()
    torch.testing.assert_close(got.cpu().double(), ref, rtol=2 * u, atol=atol, msg=lambda m: f"{name}: {m}")


# ---- kernels against the fp64 reference ------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("N", [5, 37, 131])
@pytest.mark.parametrize("M", [1, 7, 33])
def test_forward_and_gradients_match_reference(triton_device, M, N, dtype):
    x, w, dy = make_inputs((M, N), dtype, triton_device)
    y, dx, dw = forward_and_grads(RMSNormFunction.apply, x, w, dy)
    y_ref, dx_ref, dw_ref = fp64_reference(x, w, dy)
    assert y.dtype == dx.dtype == dw.dtype == dtype
    for name, got, ref in (("Y", y, y_ref), ("dX", dx, dx_ref), ("dW", dw, dw_ref)):
        assert_close(got, ref, dtype, name)


def test_batched_and_strided_inputs(triton_device):
    # [B, S, N] column slice of a wider buffer (row stride N + 7: the kernels read it in place) and a
    # transposed [S, B, N] (no unit-stride rows view: copied), both through the public rms_norm
    N = 37
    wide, w, dy_wide = make_inputs((2, 5, N + 7), torch.float16, triton_device)
    x_sliced, w, dy_sliced = wide[..., :N], w[:N], dy_wide[..., :N]
    assert x_sliced.stride() == (5 * (N + 7), N + 7, 1)
    for x, dy in ((x_sliced, dy_sliced), (x_sliced.transpose(0, 1), dy_sliced.transpose(0, 1))):
        got = forward_and_grads(rms_norm, x, w, dy)
        ref = fp64_reference(x, w, dy)
        assert got[0].shape == got[1].shape == x.shape
        for name, g, r in zip(("Y", "dX", "dW"), got, ref):
            assert_close(g, r, torch.float16, name)


def test_frozen_weight_skips_dw_and_input_without_grad(triton_device, monkeypatch):
    x, w, dy = make_inputs((33, 37), torch.float32, triton_device)
    calls = []
    real = rms_mod.rms_norm_bwd
    monkeypatch.setattr(rms_mod, "rms_norm_bwd", lambda *a: calls.append(a[-2:]) or real(*a))
    y_ref, dx_ref, dw_ref = fp64_reference(x, w, dy)
    # frozen weight (qtrain's usual case): dX only, no dW work
    y, dx, dw = forward_and_grads(rms_norm, x, w, dy, train_w=False)
    assert dw is None
    assert_close(y, y_ref, torch.float32, "Y")
    assert_close(dx, dx_ref, torch.float32, "dX")
    # input without grad, trainable weight: dW only
    _, dx, dw = forward_and_grads(rms_norm, x, w, dy, train_x=False)
    assert dx is None
    assert_close(dw, dw_ref, torch.float32, "dW")
    assert calls == [(True, False), (False, True)]


def test_fp32_weight_with_16_bit_input(triton_device):
    # norms kept in fp32 (prepare_model_for_kbit_training) with fp16 activations: Y is fp32 as in
    # transformers (w * xhat.to(fp16) promotes), dX fp16, dW fp32
    x, w, dy = make_inputs((7, 131), torch.float16, triton_device, w_dtype=torch.float32)
    y, dx, dw = forward_and_grads(rms_norm, x, w, dy)
    assert (y.dtype, dx.dtype, dw.dtype) == (torch.float32, torch.float16, torch.float32)
    y_ref, dx_ref, dw_ref = fp64_reference(x, w, dy)
    # Y: xhat rounded to fp16 (u = 2^-11), the product then exact-ish in fp32: fp16's tolerance
    for name, got, ref in (("Y", y, y_ref), ("dX", dx, dx_ref), ("dW", dw, dw_ref)):
        assert_close(got, ref, torch.float16, name)
    # and it is the module's semantics: the same bits as the reference's fp16 rounding of xhat
    assert (y.cpu() != rms_norm_reference(x.cpu(), w.cpu(), EPS)).float().mean() <= 0.01


def test_zero_rows(triton_device):
    x = torch.empty(0, 3, 37, device=triton_device, requires_grad=True)
    w = torch.ones(37, device=triton_device, requires_grad=True)
    y = rms_norm(x, w, EPS)
    y.sum().backward()
    assert y.shape == (0, 3, 37) and x.grad.shape == x.shape
    assert torch.equal(w.grad.cpu(), torch.zeros(37))


def test_other_dtypes_take_the_reference(triton_device):
    x = torch.randn(3, 37, dtype=torch.float64, device=triton_device, requires_grad=True)
    w = torch.ones(37, dtype=torch.float64, device=triton_device)
    y = rms_norm(x, w, EPS)
    assert "RMSNormFunction" not in type(y.grad_fn).__name__
    assert torch.equal(y, rms_norm_reference(x, w, EPS))


# ---- the reference is transformers' module; the kernel follows its cast order ------------------------


@pytest.mark.parametrize("module_cls", [LlamaRMSNorm, Qwen2RMSNorm], ids=lambda c: c.__name__)
@pytest.mark.parametrize(
    "dtype,w_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
     (torch.bfloat16, torch.float32)],
    ids=["fp32", "bf16", "fp16", "bf16-fp32w"],
)  # fmt: skip
def test_reference_equals_transformers_module(module_cls, dtype, w_dtype):
    x, w, dy = make_inputs((2, 7, 131), dtype, w_dtype=w_dtype)
    module = module_cls(131, eps=EPS).to(w_dtype)
    with torch.no_grad():
        module.weight.copy_(w)
    y_hf, dx_hf, dw_hf = forward_and_grads(lambda x, w, eps: module(x), x, w, dy)
    dw_hf = module.weight.grad
    y, dx, dw = forward_and_grads(rms_norm_reference, x, w, dy)
    assert y.dtype == y_hf.dtype == torch.promote_types(dtype, w_dtype)
    for name, got, ref in (("Y", y, y_hf), ("dX", dx, dx_hf), ("dW", dw, dw_hf)):
        assert torch.equal(got, ref), name


def test_kernel_rounds_xhat_before_the_weight_like_transformers(triton_device):
    # fp16, same inputs: the kernel gives the module's bits except where fp32 sum order or rsqrt
    # flips a rounding (seen 0.02% of elements, at most 1 ulp); multiplying by w BEFORE rounding
    # (one rounding) changes ~27% of them, so this test tells the two orders apart.
    x, w, _ = make_inputs((33, 131), torch.float16, triton_device)
    module = LlamaRMSNorm(131, eps=EPS).half()
    with torch.no_grad():
        module.weight.copy_(w.cpu())
        y_hf = module(x.cpu())
    y = rms_norm(x, w, EPS).cpu()
    assert (y != y_hf).float().mean() <= 0.01
    ulp = torch.finfo(torch.float16).eps * y_hf.float().abs().clamp_min(2.0**-14)
    assert ((y.float() - y_hf.float()).abs() <= ulp).all()
    x32 = x.cpu().float()
    one_rounding = (w.cpu().float() * x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + EPS)).half()
    assert (one_rounding != y_hf).float().mean() >= 0.1


# ---- memory: what is saved for backward ------------------------------------------------------------


def saved_bytes(fn, *params) -> int:
    """Bytes of the distinct tensors autograd saves while running `fn()`, parameters excluded."""
    seen = {}
    skip = {p.data_ptr() for p in params}

    def pack(t):
        if t.data_ptr() not in skip:
            seen[(t.data_ptr(), t.nbytes)] = t.nbytes
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize("train_w", [False, True], ids=["frozen-w", "trainable-w"])
def test_saved_bytes_per_token(triton_device, train_w):
    # bf16 model, hidden N: ours saves x (2N) + rstd fp32 (4) per token; the stock module its fp32
    # copy of x (4N) + rsqrt (4), and with a trainable weight also xhat.to(bf16) (2N): the docstring's numbers
    M, N = 6, 37
    x = torch.randn(M, N, device=triton_device).to(torch.bfloat16).requires_grad_()
    module = LlamaRMSNorm(N, eps=EPS).to(device=triton_device, dtype=torch.bfloat16).requires_grad_(train_w)
    ours = saved_bytes(lambda: rms_norm(x, module.weight, EPS), module.weight)
    stock = saved_bytes(lambda: module(x), module.weight)
    assert ours == M * (2 * N + 4)
    assert stock == M * ((6 if train_w else 4) * N + 4)


# ---- GPU: bf16 at Llama-3 8B's shape -----------------------------------------------------------------


def check_bf16_at_shape(device: str, M: int, N: int, train_w: bool) -> None:
    """Kernels (bf16) against the fp32 reference on the same bf16 inputs (bf16 u = 2^-8 in the
    tolerance rule above), and against the stock bf16 module's bits."""
    dtype = torch.bfloat16
    x, w, dy = make_inputs((M, N), dtype, device)
    assert rms_mod._use_triton(x, w)
    y, dx, dw = forward_and_grads(rms_norm, x, w, dy, train_w=train_w)
    y_ref, dx_ref, dw_ref = forward_and_grads(rms_norm_reference, x.float(), w.float(), dy, train_w=train_w)
    assert_close(y, y_ref.double(), dtype, "Y")
    assert_close(dx, dx_ref.double(), dtype, "dX")
    if train_w:
        assert_close(dw, dw_ref.double(), dtype, "dW")
    else:
        assert dw is None
    y_hf = rms_norm_reference(x, w, EPS)  # == LlamaRMSNorm in bf16 (tested above)
    assert (y != y_hf).float().mean().item() <= 0.01


@pytest.mark.gpu
@pytest.mark.parametrize("train_w", [False, True], ids=["frozen-w", "trainable-w"])
def test_bf16_llama_shape_on_gpu(train_w):
    # 2048 tokens x 4096 hidden (Llama-3 8B), compiled kernels. The same check run by hand on CPU
    # under the interpreter (~150 s) passed with max |err| / max|ref|: Y 5.4e-3 (1.4u), dX 2.8e-3
    # (0.7u), dW 4.0e-3 (1.0u); not yet run on a GPU.
    check_bf16_at_shape("cuda", 2048, 4096, train_w)
