"""qtrain.kernels.swiglu: the SwiGLU Triton kernels against the reference and transformers' LlamaMLP.

Without CUDA the kernels run under Triton's interpreter on CPU tensors (tests/kernels/conftest.py):
small odd shapes in fp32/fp16, the output and both gradients against the reference in fp64; the bf16
test at Llama-3 8B's shape runs only on a GPU. The reference itself is checked to BE LlamaMLP's
`act_fn(gate_proj(x)) * up_proj(x)` (bitwise), and the kernel to round silu(gate) to the model
dtype before multiplying by up, as that module does.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from qtrain.kernels import swiglu as swiglu_mod
from qtrain.kernels.swiglu import SwiGLUFunction, swiglu, swiglu_reference
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

# Tolerances, in units of u, the dtype's unit roundoff (half an ulp at 1): every output and gradient
# must satisfy |got - ref| <= 2u * |ref| + 2u * max|ref|, ref computed in fp64 from the same (rounded)
# inputs. The kernel rounds h twice (silu to gate's dtype, then the product: 2u relative, no
# cancellation) and d_up likewise (dh * round(silu)); d_gate once after fp32 math, but its factor
# 1 + g(1 - s) vanishes near g = -1.28, where fp32-sized errors of the terms remain: the absolute
# part. For fp32, u is taken as 2^-20 (16 fp32 ulps): exp and division differ by a few ulps between
# numpy (interpreter), torch and the GPU's approximate exp.
# Seen (max |err| / max|ref|): fp32 h 9e-8, d_gate 9e-8, d_up 1e-7; fp16 6e-5, 3.1e-4, 7.1e-4.
UNIT_ROUNDOFF = {torch.float32: 2.0**-20, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread (OpenMP spin-waits cost more than they give on 2 shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_inputs(shape, dtype, device="cpu", seed=0, gate_scale=3.0):
    g = torch.Generator().manual_seed(seed)
    gate = (torch.randn(shape, generator=g) * gate_scale).to(dtype)  # covers silu's curved part and tails
    up = torch.randn(shape, generator=g).to(dtype)
    dh = torch.randn(shape, generator=g).to(dtype)
    return gate.to(device), up.to(device), dh.to(device)


def forward_and_grads(fn, gate, up, dh, train_gate=True, train_up=True):
    gate = gate.detach().requires_grad_(train_gate)  # a new leaf on the same memory (strides kept)
    up = up.detach().requires_grad_(train_up)
    h = fn(gate, up)
    h.backward(dh.to(h.dtype))
    return h.detach(), gate.grad, up.grad


def fp64_reference(gate, up, dh, train_gate=True, train_up=True):
    return forward_and_grads(swiglu_reference, gate.cpu().double(), up.cpu().double(), dh.cpu(), train_gate, train_up)


def assert_close(got, ref, dtype, name):
    """|got - ref| <= 2u |ref| + 2u max|ref| (see the tolerance comment at the top)."""
    assert got is not None, f"{name} is missing"
    u = UNIT_ROUNDOFF[dtype]
    atol = 2 * u * ref.abs().max().item()
    torch.testing.assert_close(got.cpu().double(), ref, rtol=2 * u, atol=atol, msg=lambda m: f"{name}: {m}")


NAMES = ("h", "d_gate", "d_up")


# ---- kernels against the fp64 reference ------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("N", [5, 37, 1027])  # 1027: two column blocks of 1024, the second masked
@pytest.mark.parametrize("M", [1, 7, 33])
def test_forward_and_gradients_match_reference(triton_device, M, N, dtype):
    gate, up, dh = make_inputs((M, N), dtype, triton_device)
    got = forward_and_grads(SwiGLUFunction.apply, gate, up, dh)
    ref = fp64_reference(gate, up, dh)
    assert all(t.dtype == dtype for t in got)
    for name, g, r in zip(NAMES, got, ref):
        assert_close(g, r, dtype, name)


def test_fused_gate_up_projection_halves(triton_device):
    # gate, up = chunk(gate_up_proj(x), 2): column halves of one [B, S, 2N] tensor (row stride 2N),
    # read in place; the gradient reaches the fused tensor
    N = 37
    fused, _, dh = make_inputs((2, 5, 2 * N), torch.float16, triton_device)
    dh = dh[..., :N].contiguous()
    leaf = fused.detach().requires_grad_()
    gate, up = leaf.chunk(2, dim=-1)
    assert gate.stride() == (5 * 2 * N, 2 * N, 1)
    h = swiglu(gate, up)
    h.backward(dh)
    assert h.shape == (2, 5, N)
    ref_leaf = fused.detach().cpu().double().requires_grad_()
    h_ref = swiglu_reference(*ref_leaf.chunk(2, dim=-1))
    h_ref.backward(dh.cpu().double())
    assert_close(h, h_ref.detach(), torch.float16, "h")
    for half, name in ((slice(None, N), "d_gate"), (slice(N, None), "d_up")):
        assert_close(leaf.grad[..., half], ref_leaf.grad[..., half], torch.float16, name)


def test_only_one_input_needs_grad(triton_device, monkeypatch):
    gate, up, dh = make_inputs((7, 37), torch.float32, triton_device)
    calls = []
    real = swiglu_mod.swiglu_bwd
    monkeypatch.setattr(swiglu_mod, "swiglu_bwd", lambda *a: calls.append(a[-2:]) or real(*a))
    ref = fp64_reference(gate, up, dh)
    _, d_gate, d_up = forward_and_grads(swiglu, gate, up, dh, train_up=False)
    assert d_up is None
    assert_close(d_gate, ref[1], torch.float32, "d_gate")
    _, d_gate, d_up = forward_and_grads(swiglu, gate, up, dh, train_gate=False)
    assert d_gate is None
    assert_close(d_up, ref[2], torch.float32, "d_up")
    assert calls == [(True, False), (False, True)]


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # numpy's exp, interpreter
@pytest.mark.parametrize("dtype,scale", [(torch.float32, 100.0), (torch.float16, 2000.0)], ids=["fp32", "fp16"])
def test_large_gates_stay_finite(triton_device, dtype, scale):
    # |g| up to ~300 / ~6000: exp(-g) overflows to inf in fp32 for g < -88: silu -> -0, sigmoid -> 0,
    # no NaN anywhere (fp16's scale keeps |h| below its 65504 maximum)
    gate, up, dh = make_inputs((7, 37), dtype, triton_device, gate_scale=scale)
    got = forward_and_grads(swiglu, gate, up, dh)
    ref = fp64_reference(gate, up, dh)
    for name, g, r in zip(NAMES, got, ref):
        assert torch.isfinite(g).all(), name
        assert_close(g, r, dtype, name)


def test_zero_rows_and_other_dtypes(triton_device):
    gate = torch.empty(0, 3, 37, device=triton_device, requires_grad=True)
    up = torch.empty(0, 3, 37, device=triton_device, requires_grad=True)
    swiglu(gate, up).sum().backward()
    assert gate.grad.shape == up.grad.shape == gate.shape
    gate64, up64 = (torch.randn(3, 5, dtype=torch.float64, device=triton_device) for _ in range(2))
    h = swiglu(gate64.requires_grad_(), up64)
    assert "SwiGLUFunction" not in type(h.grad_fn).__name__
    assert torch.equal(h, swiglu_reference(gate64, up64))


# ---- the reference is LlamaMLP's act_fn(gate) * up; the kernel follows its rounding ------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=DTYPE_IDS.get)
def test_reference_equals_llama_mlp(dtype):
    config = LlamaConfig(hidden_size=48, intermediate_size=131, num_attention_heads=4, hidden_act="silu")
    mlp = LlamaMLP(config).to(dtype)
    x = torch.randn(2, 7, 48, generator=torch.Generator().manual_seed(0)).to(dtype)
    gate, up = mlp.gate_proj(x).detach(), mlp.up_proj(x).detach()
    dh = torch.randn(gate.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    stock = forward_and_grads(lambda g, u: mlp.act_fn(g) * u, gate, up, dh)
    ours = forward_and_grads(swiglu_reference, gate, up, dh)
    for name, g, r in zip(NAMES, ours, stock):
        assert torch.equal(g, r), name
    with torch.no_grad():  # the whole module: down_proj(act_fn(gate_proj(x)) * up_proj(x))
        assert torch.equal(mlp(x), mlp.down_proj(swiglu_reference(gate, up)))


def test_kernel_rounds_silu_before_the_product_like_transformers(triton_device):
    # fp16, same inputs: the kernel gives the stock bits except where exp differs by an fp32 ulp
    # (numpy's in the interpreter, the GPU's approximate one) and flips a rounding (seen 0.02%, at
    # most 1 ulp); one rounding of silu(g) * u in fp32 changes ~27% of them: the test tells them apart.
    gate, up, _ = make_inputs((33, 131), torch.float16, triton_device)
    stock = F.silu(gate.cpu()) * up.cpu()
    h = swiglu(gate, up).cpu()
    assert (h != stock).float().mean() <= 0.01
    ulp = torch.finfo(torch.float16).eps * stock.float().abs().clamp_min(2.0**-14)
    assert ((h.float() - stock.float()).abs() <= ulp).all()
    one_rounding = (F.silu(gate.cpu().float()) * up.cpu().float()).half()
    assert (one_rounding != stock).float().mean() >= 0.1


# ---- memory: what is saved for backward ------------------------------------------------------------


def saved_bytes(fn) -> int:
    """Bytes of the distinct tensors autograd saves while running `fn()`."""
    seen = {}

    def pack(t):
        seen[(t.data_ptr(), t.nbytes)] = t.nbytes
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_saved_bytes_per_token(triton_device):
    # bf16, intermediate size I: ours saves gate and up (4I bytes per token), the stock
    # act_fn(gate) * up also silu(gate): 6I, the docstring's numbers
    M, N = 6, 37
    gate, up, _ = make_inputs((M, N), torch.bfloat16, triton_device)
    gate, up = gate.requires_grad_(), up.requires_grad_()
    act_fn = LlamaMLP(LlamaConfig(hidden_size=8, intermediate_size=N, num_attention_heads=1, hidden_act="silu")).act_fn
    assert saved_bytes(lambda: swiglu(gate, up)) == M * 4 * N
    assert saved_bytes(lambda: act_fn(gate) * up) == M * 6 * N


# ---- GPU: bf16 at Llama-3 8B's shape -----------------------------------------------------------------


def check_bf16_at_shape(device: str, M: int, N: int) -> None:
    """Kernels (bf16) against the fp32 reference on the same bf16 inputs (bf16 u = 2^-8 in the
    tolerance rule above), and against the stock bf16 module's bits."""
    dtype = torch.bfloat16
    gate, up, dh = make_inputs((M, N), dtype, device)
    assert swiglu_mod._use_triton(gate, up)
    got = forward_and_grads(swiglu, gate, up, dh)
    ref = forward_and_grads(swiglu_reference, gate.float(), up.float(), dh)
    for name, g, r in zip(NAMES, got, ref):
        assert_close(g, r.double(), dtype, name)
    assert (got[0] != F.silu(gate) * up).float().mean().item() <= 0.01


@pytest.mark.gpu
def test_bf16_llama_shape_on_gpu():
    # 2048 tokens x 14336 (Llama-3 8B's intermediate size), compiled kernels. Not yet run on a GPU;
    # the same check run by hand on CPU under the interpreter at 256 x 14336 passed (numbers in the report).
    check_bf16_at_shape("cuda", 2048, 14336)
