"""qtrain.kernels.rope: RoPE on Q and K in place (one Triton launch) against the fp32 reference.

Without CUDA the kernel runs under Triton's interpreter (tests/kernels/conftest.py) on small odd
shapes in fp32 and fp16. bf16 runs only in the `gpu` tests: the interpreter's fp32 -> bf16 store
truncates instead of rounding to nearest (see /work/shared/NOTES.md), so bf16 there would test
the interpreter, not the kernel.
"""

from __future__ import annotations

import pytest
import torch
from qtrain.kernels.rope import RoPEFunction, apply_rope, resolve_backend, rope_reference
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

# Tolerances. fp32: kernel and reference do the same fp32 products and sum per element (the GPU
# may fuse a product and the sum into an FMA: ~1 ulp); values here reach ~10, so 1e-6 relative
# (~8 ulps) plus 1e-6 absolute for values near 0 (seen on CPU: bit-identical).
FP32_TOL = {"rtol": 1e-6, "atol": 1e-6}
# fp16: both compute in fp32 and round once to fp16, so they agree unless an FMA moves a value
# across a rounding boundary: 1 ulp = 2^-10 relative at most (seen on CPU: bit-identical).
FP16_TOL = {"rtol": 2**-10, "atol": 1e-5}
# bf16 (GPU): the kernel rounds once (vs the fp32 reference: <= 1 ulp = 2^-7 relative after an FMA
# moves a boundary; atol for results near 0, where an FMA's 2^-24 of the terms is a large relative
# change). transformers rounds both products and their sum in bf16: up to ~3 ulps from either, and
# where the sum cancels, the products' own rounding stays: half an ulp of each term, terms up to
# |x| ~ 5.5 (ulp 2^-5 in [4, 8)), so atol 2^-4.
BF16_TOL = {"rtol": 2**-7, "atol": 2**-7}
BF16_VS_TRANSFORMERS_TOL = {"rtol": 3 * 2**-8, "atol": 2**-4}
TOLS = {torch.float32: FP32_TOL, torch.float16: FP16_TOL}
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

# (B, H, K, S, d), odd on purpose: GQA with one kv head (H=5, K=1), GQA 2:1, plain multi-head
# with d=20 (half 10, not a power of two: the masked lanes) and one token.
CASES = [(2, 5, 1, 7, 16), (1, 4, 2, 7, 64), (3, 3, 3, 1, 20)]
PACKED_POSITIONS = [0, 1, 2, 0, 1, 2, 3]  # two sequences packed in one row of 7


def _case_id(case):
    return "B{}-H{}-K{}-S{}-d{}".format(*case)


@pytest.fixture(scope="module")
def device(triton_device):
    """triton_device, and the same interpreter mode for this module's kernel."""
    from qtrain.kernels.rope import is_interpreting

    assert is_interpreting() == (triton_device == "cpu")
    return triton_device


def llama_cos_sin(B, S, d, dtype=torch.float32, device="cpu", packed=True, **rope):
    """cos/sin [B, S, d] from LlamaRotaryEmbedding; row 0 at positions 0..S-1, the others packed."""
    config = LlamaConfig(hidden_size=4 * d, num_attention_heads=4, head_dim=d, **rope)
    rotary = LlamaRotaryEmbedding(config=config).to(device)
    positions = torch.arange(S).repeat(B, 1)  # [B, S]
    if packed and S == len(PACKED_POSITIONS):
        positions[1:] = torch.tensor(PACKED_POSITIONS)
    return rotary(torch.zeros(1, dtype=dtype, device=device), positions.to(device))


def projections(B, H, K, S, d, dtype, device="cpu", seed=0, requires_grad=False):
    """Leaves shaped like q_proj/k_proj outputs: [B, S, H * d] and [B, S, K * d]."""
    g = torch.Generator().manual_seed(seed)
    xq = torch.randn(B, S, H * d, generator=g).to(device, dtype).requires_grad_(requires_grad)
    xk = torch.randn(B, S, K * d, generator=g).to(device, dtype).requires_grad_(requires_grad)
    return xq, xk


def as_heads(x, n_heads, d, unsqueeze_dim):
    """transformers' view of a projection: [B, S, n, d] (unsqueeze_dim=2) or its transpose [B, n, S, d]."""
    B, S = x.shape[:2]
    view = x.view(B, S, n_heads, d)
    return view.transpose(1, 2) if unsqueeze_dim == 1 else view


def assert_close(got, ref, tol, name):
    assert got.dtype == ref.dtype and got.shape == ref.shape, f"{name}: {got.dtype}{tuple(got.shape)}"
    torch.testing.assert_close(got.cpu(), ref.cpu(), **tol, msg=lambda m: f"{name}: {m}")


# ---- the reference ---------------------------------------------------------------------------------


@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
def test_reference_matches_transformers(unsqueeze_dim):
    B, H, K, S, d = 2, 5, 1, 7, 16
    cos, sin = llama_cos_sin(B, S, d)  # per-row (packed) positions: cos differs between rows
    assert not torch.equal(cos[0], cos[1])
    xq, xk = projections(B, H, K, S, d, torch.float32)
    q, k = as_heads(xq, H, d, unsqueeze_dim), as_heads(xk, K, d, unsqueeze_dim)
    ref = rope_reference(q, k, cos, sin, unsqueeze_dim)
    hf = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
    for got, want, name in zip(ref, hf, "qk"):
        assert_close(got, want, FP32_TOL, name)
    # also with the [1, S, d] cos/sin of unpacked batches, and random (unequal-halves) cos/sin
    cos1, sin1 = llama_cos_sin(1, S, d)
    torch.testing.assert_close(rope_reference(q, k, cos1, sin1, unsqueeze_dim)[0], apply_rotary_pos_emb(
        q, k, cos1, sin1, unsqueeze_dim=unsqueeze_dim)[0], rtol=1e-6, atol=1e-6)  # fmt: skip
    cos_r, sin_r = torch.randn(2, B, S, d, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(rope_reference(q, k, cos_r, sin_r, unsqueeze_dim)[1], apply_rotary_pos_emb(
        q, k, cos_r, sin_r, unsqueeze_dim=unsqueeze_dim)[1], rtol=1e-6, atol=1e-6)  # fmt: skip


def test_reference_matches_transformers_in_bf16():
    # transformers rounds q*cos, rotate_half(q)*sin and their sum to bf16; the reference rounds once
    B, H, K, S, d = 2, 5, 1, 7, 64
    cos, sin = llama_cos_sin(B, S, d, torch.bfloat16)
    xq, xk = projections(B, H, K, S, d, torch.bfloat16)
    q, k = as_heads(xq, H, d, 1), as_heads(xk, K, d, 1)
    for got, want, name in zip(rope_reference(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin), "qk"):
        assert_close(got, want, BF16_VS_TRANSFORMERS_TOL, name)


# ---- the Triton kernel: forward ---------------------------------------------------------------------


@pytest.mark.parametrize("unsqueeze_dim", [1, 2], ids=["BHSd-view", "BSHd"])
@pytest.mark.parametrize("dtype", list(TOLS), ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_forward_in_place_matches_reference(device, case, dtype, unsqueeze_dim):
    B, H, K, S, d = case
    cos, sin = llama_cos_sin(B, S, d, device=device, packed=B > 1)  # fp32 cos/sin with fp16 q: widened as-is
    if case == CASES[0]:
        cos, sin = cos[:1], sin[:1]  # [1, S, d], broadcast over the batch
    xq, xk = projections(B, H, K, S, d, dtype, device)
    q, k = as_heads(xq, H, d, unsqueeze_dim), as_heads(xk, K, d, unsqueeze_dim)
    ref_q, ref_k = rope_reference(q, k, cos, sin, unsqueeze_dim)
    version = xq._version
    out_q, out_k = apply_rope(q, k, cos, sin, unsqueeze_dim, backend="triton")
    assert out_q is q and out_k is k  # the same tensors, rotated
    assert xq._version > version  # an in-place write, as autograd sees it
    assert_close(out_q, ref_q, TOLS[dtype], "q")
    assert_close(out_k, ref_k, TOLS[dtype], "k")
    assert_close(as_heads(xq, H, d, unsqueeze_dim), ref_q, TOLS[dtype], "q_proj output")  # the storage itself
    assert_close(as_heads(xk, K, d, unsqueeze_dim), ref_k, TOLS[dtype], "k_proj output")


def test_contiguous_heads_first_and_unequal_halves(device):
    # a contiguous [B, H, S, d] q (not a view) and cos/sin whose halves differ: the general formula
    B, H, K, S, d = 2, 5, 1, 7, 16
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(B, H, S, d, generator=g).to(device), torch.randn(B, K, S, d, generator=g).to(device)
    cos, sin = torch.randn(2, B, S, d, generator=g).to(device)
    ref_q, ref_k = rope_reference(q, k, cos, sin)
    apply_rope(q, k, cos, sin, backend="triton")
    assert_close(q, ref_q, FP32_TOL, "q")
    assert_close(k, ref_k, FP32_TOL, "k")


# ---- gradients ---------------------------------------------------------------------------------------


def forward_backward(fn, xq, xk, H, K, d, unsqueeze_dim, grads):
    """Rotate views of (xq * 1, xk * 1), backward random output gradients, return outputs and leaf grads."""
    xq, xk = (x.detach().clone().requires_grad_(x.requires_grad) for x in (xq, xk))
    q, k = as_heads(xq * 1, H, d, unsqueeze_dim), as_heads(xk * 1, K, d, unsqueeze_dim)  # non-leaf views
    out_q, out_k = fn(q, k)
    loss = (out_q.float() * grads[0]).sum() + (out_k.float() * grads[1]).sum()
    loss.backward()
    return out_q.detach(), out_k.detach(), xq.grad, xk.grad


@pytest.mark.parametrize("unsqueeze_dim", [1, 2], ids=["BHSd-view", "BSHd"])
@pytest.mark.parametrize("dtype", list(TOLS), ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", CASES[:2], ids=_case_id)
def test_gradients_match_reference(device, case, dtype, unsqueeze_dim):
    B, H, K, S, d = case
    g = torch.Generator().manual_seed(1)
    cos, sin = (torch.randn(B, S, d, generator=g).to(device) for _ in range(2))  # unequal halves: the transpose
    xq, xk = projections(B, H, K, S, d, dtype, device, requires_grad=True)
    shape_q = as_heads(xq, H, d, unsqueeze_dim).shape
    shape_k = as_heads(xk, K, d, unsqueeze_dim).shape
    grads = [torch.randn(s, generator=g).to(device) for s in (shape_q, shape_k)]
    got = forward_backward(lambda q, k: apply_rope(q, k, cos, sin, unsqueeze_dim, backend="triton"),
                           xq, xk, H, K, d, unsqueeze_dim, grads)  # fmt: skip
    ref = forward_backward(lambda q, k: rope_reference(q, k, cos, sin, unsqueeze_dim),
                           xq, xk, H, K, d, unsqueeze_dim, grads)  # fmt: skip
    for a, b, name in zip(got, ref, ("q", "k", "dq_proj", "dk_proj")):
        assert b.abs().max() > 0, name
        assert_close(a, b, TOLS[dtype], name)


def test_only_q_needs_a_gradient(device):
    # LoRA on q_proj and v_proj only: key_states does not require grad, and must not start to
    B, H, K, S, d = CASES[0]
    cos, sin = llama_cos_sin(B, S, d, device=device)
    xq, xk = projections(B, H, K, S, d, torch.float32, device)
    xq.requires_grad_()
    grads = [torch.randn(B, H, S, d).to(device), torch.zeros(B, K, S, d).to(device)]
    q, k = as_heads(xq * 1, H, d, 1), as_heads(xk.clone(), K, d, 1)
    out_q, out_k = apply_rope(q, k, cos, sin, backend="triton")
    assert out_q.requires_grad and not out_k.requires_grad
    (out_q * grads[0]).sum().backward()
    ref = forward_backward(lambda q, k: rope_reference(q, k, cos, sin), xq, xk, H, K, d, 1, grads)
    assert_close(xq.grad, ref[2], FP32_TOL, "dq_proj")
    assert_close(out_k, ref[1], FP32_TOL, "k")
    # and only k (q frozen)
    xq2, xk2 = xq.detach().clone(), xk.clone().requires_grad_()
    _, out_k2 = apply_rope(as_heads(xq2, H, d, 1), as_heads(xk2 * 1, K, d, 1), cos, sin, backend="triton")
    (out_k2 * grads[1] + out_k2).sum().backward()
    assert_close(xk2.grad, _rope_grad(cos, sin, grads[1] + 1, K, d), FP32_TOL, "dk_proj")


def _rope_grad(cos, sin, grad_out, n_heads, d):
    """d(rope(x))/dx applied to grad_out [B, n, S, d] (by autograd on the reference), as [B, S, n * d]."""
    B, _, S, _ = grad_out.shape
    x = torch.zeros(B, n_heads, S, d, device=grad_out.device, requires_grad=True)
    out = rope_reference(x, x, cos, sin)[0]
    (dx,) = torch.autograd.grad(out, x, grad_out)
    return dx.transpose(1, 2).reshape(B, S, n_heads * d)


def test_q_and_k_views_of_one_fused_projection(device):
    # a fused qkv projection (Phi-3 style): q and k are views of the same [B, S, (H + 2K) * d] output
    B, H, K, S, d = CASES[0]
    cos, sin = llama_cos_sin(B, S, d, device=device)
    g = torch.Generator().manual_seed(4)
    qkv = torch.randn(B, S, (H + 2 * K) * d, generator=g).to(device).requires_grad_()
    grad_q, grad_k = torch.randn(B, H, S, d, generator=g).to(device), torch.randn(B, K, S, d, generator=g).to(device)

    def run(fn):
        qkv.grad = None
        fused = (qkv * 1).view(B, S, H + 2 * K, d).transpose(1, 2)  # [B, H + 2K, S, d]
        out_q, out_k = fn(fused[:, :H], fused[:, H : H + K])
        ((out_q * grad_q).sum() + (out_k * grad_k).sum() + fused[:, H + K :].sum()).backward()
        return out_q.detach().clone(), out_k.detach().clone(), qkv.grad.clone()

    got = run(lambda q, k: apply_rope(q, k, cos, sin, backend="triton"))
    ref = run(lambda q, k: rope_reference(q, k, cos, sin))
    for a, b, name in zip(got, ref, ("q", "k", "dqkv")):
        assert_close(a, b, FP32_TOL, name)


def test_expanded_incoming_gradient(device):
    # `.sum()` sends a stride-0 gradient: the backward must not write into it element by element
    B, H, K, S, d = CASES[0]
    cos, sin = llama_cos_sin(B, S, d, device=device)
    xq, xk = projections(B, H, K, S, d, torch.float32, device, requires_grad=True)
    out_q, out_k = apply_rope(as_heads(xq * 1, H, d, 1), as_heads(xk * 1, K, d, 1), cos, sin, backend="triton")
    (out_q.sum() + out_k.sum()).backward()
    assert_close(xq.grad, _rope_grad(cos, sin, torch.ones(B, H, S, d, device=device), H, d), FP32_TOL, "dq_proj")
    assert_close(xk.grad, _rope_grad(cos, sin, torch.ones(B, K, S, d, device=device), K, d), FP32_TOL, "dk_proj")


def test_shared_incoming_gradient_needs_inplace_backward_false(device):
    # (rope(q) + x) * w: add's backward hands the SAME gradient tensor to rope(q) and to x. Rotating
    # it in place would change x.grad; inplace_backward=False rotates a copy.
    B, H, K, S, d = CASES[0]
    cos, sin = llama_cos_sin(B, S, d, device=device)
    xq, xk = projections(B, H, K, S, d, torch.float32, device, requires_grad=True)
    other = torch.zeros(B, H, S, d, device=device, requires_grad=True)
    w = torch.randn(B, H, S, d).to(device)
    q, k = as_heads(xq * 1, H, d, 1), as_heads(xk * 1, K, d, 1)
    out_q, _ = apply_rope(q, k, cos, sin, backend="triton", inplace_backward=False)
    ((out_q + other) * w).sum().backward()
    assert torch.equal(other.grad, w)
    assert_close(xq.grad, _rope_grad(cos, sin, w, H, d), FP32_TOL, "dq_proj")


def test_rope_function_alone(device):
    # the public autograd.Function on one tensor (its own launch)
    B, H, K, S, d = CASES[1]
    cos, sin = llama_cos_sin(B, S, d, device=device)
    xq, _ = projections(B, H, K, S, d, torch.float32, device, requires_grad=True)
    q = as_heads(xq * 1, H, d, 2)
    ref = rope_reference(q.detach(), q.detach(), cos, sin, 2)[0]
    out = RoPEFunction.apply(q, cos, sin, 2)
    assert out is q
    assert_close(out, ref, FP32_TOL, "q")
    grad = torch.randn(B, S, H, d).to(device)
    out.backward(grad.clone())
    assert_close(xq.grad, _rope_grad(cos, sin, grad.transpose(1, 2), H, d), FP32_TOL, "dq_proj")


def test_a_saved_pre_rotation_tensor_fails_loudly(device):
    # an op that saved q before the in-place rotation must not silently use rotated values
    B, H, K, S, d = CASES[0]
    cos, sin = llama_cos_sin(B, S, d, device=device)
    xq, xk = projections(B, H, K, S, d, torch.float32, device)
    w = torch.ones(B, H, S, d, device=device, requires_grad=True)
    q = as_heads(xq, H, d, 1)
    saved = q * w  # saves q for w's gradient
    apply_rope(q, as_heads(xk, K, d, 1), cos, sin, backend="triton")
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.sum().backward()


# ---- the torch backend and dispatch --------------------------------------------------------------


def test_torch_backend_is_in_place_and_matches():
    B, H, K, S, d = CASES[0]
    cos, sin = llama_cos_sin(B, S, d)
    xq, xk = projections(B, H, K, S, d, torch.float32, requires_grad=True)
    g = torch.Generator().manual_seed(2)
    grads = [torch.randn(B, H, S, d, generator=g), torch.randn(B, K, S, d, generator=g)]
    got = forward_backward(lambda q, k: apply_rope(q, k, cos, sin, backend="torch"), xq, xk, H, K, d, 1, grads)
    ref = forward_backward(lambda q, k: rope_reference(q, k, cos, sin), xq, xk, H, K, d, 1, grads)
    for a, b, name in zip(got, ref, ("q", "k", "dq_proj", "dk_proj")):
        assert_close(a, b, FP32_TOL, name)
    q, k = as_heads(xq.detach().clone(), H, d, 1), as_heads(xk.detach().clone(), K, d, 1)
    out_q, out_k = apply_rope(q, k, cos, sin, backend="torch")
    assert out_q is q and out_k is k
    assert resolve_backend("auto", q) == "torch"  # CPU tensors: auto never takes triton


def test_no_grad_and_inference_mode(device):
    B, H, K, S, d = CASES[0]
    cos, sin = llama_cos_sin(B, S, d, device=device)
    xq, xk = projections(B, H, K, S, d, torch.float32, device, requires_grad=True)
    ref_q, _ = rope_reference(as_heads(xq, H, d, 1), as_heads(xk, K, d, 1), cos, sin)
    with torch.no_grad():
        q, k = as_heads(xq * 1, H, d, 1), as_heads(xk * 1, K, d, 1)
        out_q, _ = apply_rope(q, k, cos, sin, backend="triton")
    assert not out_q.requires_grad
    assert_close(out_q, ref_q.detach(), FP32_TOL, "q")
    with torch.inference_mode():
        q, k = as_heads(xq * 1, H, d, 1), as_heads(xk * 1, K, d, 1)
        out_q, _ = apply_rope(q, k, cos, sin, backend="triton")
    assert_close(out_q, ref_q.detach(), FP32_TOL, "q")


def test_bad_inputs_raise():
    B, H, K, S, d = CASES[0]
    cos, sin = llama_cos_sin(B, S, d)
    q, k = torch.randn(B, H, S, d), torch.randn(B, K, S, d)
    with pytest.raises(ValueError, match="even head_dim"):
        apply_rope(q[..., :15], k[..., :15], cos[..., :15], sin[..., :15])
    with pytest.raises(ValueError, match="same batch"):
        apply_rope(q, k[:, :, :6], cos, sin)
    with pytest.raises(ValueError, match="cos must broadcast"):
        apply_rope(q, k, cos[:, :6], sin)
    with pytest.raises(ValueError, match="unsqueeze_dim"):
        apply_rope(q, k, cos, sin, unsqueeze_dim=3)
    with pytest.raises(ValueError, match="leaf"):
        apply_rope(q.requires_grad_(), k, cos, sin)
    with pytest.raises(ValueError, match="cos/sin"):
        apply_rope(q.detach(), k, cos.requires_grad_(), sin)
    with pytest.raises(ValueError, match="backend"):
        apply_rope(q.detach(), k, cos.detach(), sin, backend="cuda")
    with pytest.raises(ValueError, match="cos is on meta"):
        apply_rope(q.detach(), k, cos.detach().to("meta"), sin)


# ---- GPU: bf16 at Llama-3.1-8B shapes ---------------------------------------------------------------


def _gpu_only():
    from qtrain.kernels.rope import is_interpreting

    if is_interpreting():
        pytest.skip("TRITON_INTERPRET=1: the compiled kernel is not in use")


LLAMA31_ROPE = {
    "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "max_position_embeddings": 131072,
}  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 2])
def test_gpu_llama31_8b_bf16(B):
    # 32 query heads, 8 kv heads, d=128, S=2048; B=2 with packed positions in row 1
    _gpu_only()
    H, K, S, d = 32, 8, 2048, 128
    cos, sin = llama_cos_sin(B, S, d, torch.bfloat16, "cuda", packed=False, **LLAMA31_ROPE)
    if B == 2:  # row 1: four packed sequences of 512
        cos2, sin2 = llama_cos_sin(1, 512, d, torch.bfloat16, "cuda", **LLAMA31_ROPE)
        cos, sin = cos.clone(), sin.clone()
        cos[1], sin[1] = cos2[0].repeat(4, 1), sin2[0].repeat(4, 1)
    xq, xk = projections(B, H, K, S, d, torch.bfloat16, "cuda", requires_grad=True)
    g = torch.Generator(device="cuda").manual_seed(1)
    grads = [torch.randn(B, H, S, d, device="cuda", generator=g), torch.randn(B, K, S, d, device="cuda", generator=g)]
    got = forward_backward(lambda q, k: apply_rope(q, k, cos, sin, backend="triton"), xq, xk, H, K, d, 1, grads)
    ref = forward_backward(lambda q, k: rope_reference(q, k, cos, sin), xq, xk, H, K, d, 1, grads)
    hf = forward_backward(lambda q, k: apply_rotary_pos_emb(q, k, cos, sin), xq, xk, H, K, d, 1, grads)
    for a, b, c, name in zip(got, ref, hf, ("q", "k", "dq_proj", "dk_proj")):
        assert_close(a, b, BF16_TOL, name)
        assert_close(a, c, BF16_VS_TRANSFORMERS_TOL, f"{name} vs transformers")
    assert resolve_backend("auto", xq) == "triton"
