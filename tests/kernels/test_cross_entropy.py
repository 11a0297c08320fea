"""qtrain.kernels.cross_entropy: the in-place Triton cross-entropy, alone and inside linear_cross_entropy.

Without CUDA the kernel runs under Triton's interpreter (tests/kernels/conftest.py) on small odd
shapes in fp32 and fp16. bf16 runs only in the `gpu` tests: the interpreter's fp32 -> bf16 store
truncates instead of rounding to nearest (/work/shared/NOTES.md). The workspace formula of the
triton backend is checked on the GPU only: under the interpreter the kernel's own numpy/torch
temporaries (one [BLOCK_V] array per op) dwarf the op's allocations.
"""

from __future__ import annotations

import pytest
import torch
from qtrain.kernels.cross_entropy import (
    cross_entropy,
    cross_entropy_forward,
    cross_entropy_fwd_bwd,
    cross_entropy_reference,
    resolve_backend,
)
from qtrain.kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_workspace_bytes

IGNORE = -100
GRAD_SCALE = 0.37  # != 1: the kernel's gradient must carry it

# Kernel vs reference (logits in the same dtype, exactly widened to fp32 by both):
# loss: the same fp32 logsumexp, computed online over blocks vs in one pass: a few ulps per row,
# rtol 1e-6 of the sum (seen <= 1.4e-7). Gradient: fp32 softmax as exp(z - lse) vs exp(z - m) / sum
# (a few ulps of |dz| <= GRAD_SCALE): atol 1e-6 (seen 6e-8); in fp16 the kernel rounds it once to
# fp16, the reference (fp32 autograd) does not: half an ulp, 2^-11 relative, plus fp16's subnormal
# spacing (6e-8) near 0 (seen 1.2e-4 absolute at |dz| ~ 0.37).
LOSS_RTOL = 1e-6
GRAD_TOL = {torch.float32: {"rtol": 1e-5, "atol": 1e-6}, torch.float16: {"rtol": 2**-10, "atol": 1e-7}}
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

# (rows, V, BLOCK_V): one row and a tiny vocab; V = 1000 + 7 in blocks of 128 (8 blocks, the last
# one 111 wide) and in one masked block of 1024; 33 rows of V=37 in blocks of 16 (3 blocks).
CASES = [(1, 5, None), (7, 1007, 128), (7, 1007, None), (33, 37, 16)]


def _case_id(case):
    return "N{}-V{}-block{}".format(*case)


@pytest.fixture(scope="module")
def device(triton_device):
    """triton_device, and the same interpreter mode for this module's kernel."""
    from qtrain.kernels.cross_entropy import is_interpreting

    assert is_interpreting() == (triton_device == "cpu")
    return triton_device


def make_logits(n, v, dtype, device="cpu", seed=0, ignore_every=3):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=g) * 3).to(device, dtype)  # [N, V], |z| up to ~12
    labels = torch.randint(0, v, (n,), generator=g).to(device)  # [N]
    if ignore_every:
        labels[1::ignore_every] = IGNORE
    return logits, labels


def reference_loss_and_grad(logits, labels, grad_scale=GRAD_SCALE, ignore_index=IGNORE):
    z = logits.detach().cpu().float().requires_grad_()
    loss = cross_entropy_reference(z, labels.cpu(), ignore_index)
    (grad_scale * loss).backward()
    return loss.detach(), z.grad


def assert_grad_close(got, ref, dtype, name="grad"):
    assert got.dtype == dtype, name
    torch.testing.assert_close(got.cpu().float(), ref, **GRAD_TOL[dtype], msg=lambda m: f"{name}: {m}")


# ---- the reference ----------------------------------------------------------------------------------


def test_reference_is_summed_logsumexp_minus_target():
    logits, labels = make_logits(7, 1007, torch.float32)
    keep = labels != IGNORE
    expected = (logits.logsumexp(1) - logits.gather(1, labels.clamp(min=0)[:, None]).squeeze(1))[keep].sum()
    torch.testing.assert_close(cross_entropy_reference(logits, labels), expected)
    assert cross_entropy_reference(logits.half(), labels).dtype == torch.float32


# ---- the kernel -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", list(GRAD_TOL), ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_fwd_bwd_in_place_matches_reference(device, case, dtype):
    n, v, block_v = case
    logits, labels = make_logits(n, v, dtype, device)
    ref_loss, ref_grad = reference_loss_and_grad(logits, labels)
    buffer = logits.clone()
    loss, grad = cross_entropy_fwd_bwd(buffer, labels, IGNORE, GRAD_SCALE, block_v=block_v)
    assert grad is buffer  # the gradient lives in the logits' buffer
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss.cpu(), ref_loss, rtol=LOSS_RTOL, atol=0)
    assert_grad_close(grad, ref_grad, dtype)
    ignored = labels == IGNORE
    if ignored.any():
        assert torch.equal(grad[ignored], torch.zeros_like(grad[ignored]))  # exactly zero rows


@pytest.mark.parametrize("dtype", list(GRAD_TOL), ids=DTYPE_IDS.get)
def test_forward_only_reads_the_logits(device, dtype):
    logits, labels = make_logits(7, 1007, dtype, device)
    before = logits.clone()
    loss = cross_entropy_forward(logits, labels, IGNORE, block_v=256)
    assert torch.equal(logits, before)
    torch.testing.assert_close(loss.cpu(), cross_entropy_reference(before.cpu(), labels.cpu()), rtol=LOSS_RTOL, atol=0)


def test_ignore_index_inside_the_vocab_and_all_rows_ignored(device):
    logits, labels = make_logits(7, 37, torch.float32, device, ignore_every=0)
    labels[2] = labels[5] = 3  # class 3 is the "ignored" label here
    ref_loss, ref_grad = reference_loss_and_grad(logits, labels, ignore_index=3)
    loss, grad = cross_entropy_fwd_bwd(logits.clone(), labels, 3, GRAD_SCALE, block_v=16)
    torch.testing.assert_close(loss.cpu(), ref_loss, rtol=LOSS_RTOL, atol=0)
    assert_grad_close(grad, ref_grad, torch.float32)
    assert torch.equal(grad[[2, 5]], torch.zeros_like(grad[[2, 5]]))
    loss, grad = cross_entropy_fwd_bwd(logits.clone(), torch.full_like(labels, IGNORE), IGNORE)
    assert loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("dtype", list(GRAD_TOL), ids=DTYPE_IDS.get)
def test_rows_whose_leading_blocks_are_all_minus_inf(device, dtype):
    # issue 16, item 7: the online logsumexp's running max started at -inf, so a first block of only
    # -inf gave exp(-inf - -inf) = NaN. V=37 in blocks of 16 (3 blocks): row 0's first block is -inf,
    # row 2's first two blocks (every block but the last), row 4 all but one column of its first
    # block; row 1 is ignored with its first block -inf too; labels sit on finite logits.
    logits, labels = make_logits(7, 37, dtype, device, ignore_every=0)
    logits[0, :16] = logits[1, :16] = logits[2, :32] = float("-inf")
    logits[4, 1:16] = float("-inf")
    labels[0], labels[1], labels[2], labels[4] = 20, IGNORE, 33, 0
    ref_loss, ref_grad = reference_loss_and_grad(logits, labels)
    assert ref_loss.isfinite()
    for block_v in (16, None):  # three blocks, and one masked block of 64
        loss, grad = cross_entropy_fwd_bwd(logits.clone(), labels, IGNORE, GRAD_SCALE, block_v=block_v)
        torch.testing.assert_close(loss.cpu(), ref_loss, rtol=LOSS_RTOL, atol=0)
        assert_grad_close(grad, ref_grad, dtype)
        assert torch.equal(grad[0, :16], torch.zeros_like(grad[0, :16]))  # softmax of -inf is exactly 0
        loss = cross_entropy_forward(logits, labels, IGNORE, block_v=block_v)
        torch.testing.assert_close(loss.cpu(), ref_loss, rtol=LOSS_RTOL, atol=0)


def test_strided_logits_write_only_their_elements(device):
    # rows of a wider buffer (row stride 1015 > V), and every other column (column stride 2)
    logits, labels = make_logits(7, 1007, torch.float32, device)
    wide = torch.full((7, 1015), 7.0, device=device)
    wide[:, :1007] = logits
    ref_loss, ref_grad = reference_loss_and_grad(logits, labels)
    loss, grad = cross_entropy_fwd_bwd(wide[:, :1007], labels, IGNORE, GRAD_SCALE, block_v=256)
    torch.testing.assert_close(loss.cpu(), ref_loss, rtol=LOSS_RTOL, atol=0)
    assert_grad_close(grad, ref_grad, torch.float32)
    assert (wide[:, 1007:] == 7.0).all()
    every_other = torch.full((7, 2 * 37), 7.0, device=device)
    small, small_labels = make_logits(7, 37, torch.float32, device)
    every_other[:, ::2] = small
    ref_loss, ref_grad = reference_loss_and_grad(small, small_labels)
    loss, grad = cross_entropy_fwd_bwd(every_other[:, ::2], small_labels, IGNORE, GRAD_SCALE, block_v=16)
    torch.testing.assert_close(loss.cpu(), ref_loss, rtol=LOSS_RTOL, atol=0)
    assert_grad_close(grad, ref_grad, torch.float32)
    assert (every_other[:, 1::2] == 7.0).all()


def test_out_of_range_label_gives_nan(device):
    logits, labels = make_logits(3, 37, torch.float32, device, ignore_every=0)
    labels[1] = 37
    loss, _ = cross_entropy_fwd_bwd(logits, labels, IGNORE)
    assert loss.isnan()


def test_bad_inputs_raise(device):
    logits, labels = make_logits(3, 37, torch.float32, device)
    with pytest.raises(ValueError, match="int64"):
        cross_entropy_fwd_bwd(logits, labels.int())
    with pytest.raises(ValueError, match=r"\[N, V\]"):
        cross_entropy_fwd_bwd(logits[None], labels)
    with pytest.raises(ValueError, match="backend"):
        cross_entropy(logits, labels, backend="cuda")


# ---- the autograd wrapper ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", list(GRAD_TOL), ids=DTYPE_IDS.get)
def test_autograd_wrapper_leaves_its_input_intact(device, dtype):
    logits, labels = make_logits(7, 1007, dtype, device)
    ref_loss, ref_grad = reference_loss_and_grad(logits, labels)
    z = logits.clone().requires_grad_()
    loss = cross_entropy(z, labels, IGNORE, backend="triton")
    (GRAD_SCALE * loss).backward()
    assert torch.equal(z.detach(), logits)
    torch.testing.assert_close(loss.detach().cpu(), ref_loss, rtol=LOSS_RTOL, atol=0)
    assert_grad_close(z.grad, ref_grad, dtype)
    with torch.no_grad():
        assert cross_entropy(z, labels, IGNORE, backend="triton") == loss


def test_torch_backend_and_auto_on_cpu():
    logits, labels = make_logits(7, 37, torch.float32)
    assert resolve_backend("auto", logits) == "torch"
    assert cross_entropy(logits, labels) == cross_entropy_reference(logits, labels)


# ---- inside linear_cross_entropy: the triton backend vs the torch backend --------------------------

# Both backends compute the same logits (h @ W^T in h's dtype) and the same fp32 softmax math.
# fp32: per-chunk sums in another order: loss rtol 1e-6, gradients rtol 1e-5 and atol 2^-20 of the
# largest (tests/kernels/test_linear_cross_entropy.py's fp32 bounds). fp16: the loss is the same
# fp32 math (rtol 1e-6); dH: both round dz to fp16, but exp(z - lse) vs exp(z - m) / sum can land
# on neighbouring fp16 values (1 ulp of dz), times |W|: rtol 2e-3, atol 2^-9 of the largest; dW: the
# torch path multiplies fp32 dz, the triton path dz rounded to fp16 (2^-11 relative per term, random
# signs over C*chunks terms): the same bounds (seen 3e-4 of the largest).
LCE_TOLS = {torch.float32: (1e-6, 1e-5, 2**-20), torch.float16: (1e-6, 2e-3, 2**-9)}
N, D, V = 37, 48, 1007


def lce_inputs(dtype, n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, D, generator=g).to(dtype)  # [N, D]
    weight = (torch.randn(V, D, generator=g) * 0.3).to(dtype)  # [V, D]
    labels = torch.randint(0, V, (n,), generator=g)  # [N]
    labels[::5] = IGNORE
    labels[16:32] = IGNORE  # with chunk_size 16: one chunk entirely ignored
    return hidden, weight, labels


def lce_loss_and_grads(hidden, weight, labels, device, weight_grad, **kw):
    h = hidden.detach().to(device, copy=True).requires_grad_()  # fresh leaves: no grad shared between calls
    w = weight.detach().to(device, copy=True).requires_grad_(weight_grad)
    loss = linear_cross_entropy(h, w, labels.to(device), **kw)
    (loss * GRAD_SCALE).backward()
    return loss.detach().cpu(), h.grad.cpu(), None if w.grad is None else w.grad.cpu()


def assert_lce_close(got, ref, dtype):
    loss_rtol, rtol, atol = LCE_TOLS[dtype]
    torch.testing.assert_close(got[0], ref[0], rtol=loss_rtol, atol=0)
    for name, g, r in zip(("dH", "dW"), got[1:], ref[1:]):
        if r is None:
            assert g is None, name
            continue
        assert g.dtype == r.dtype == dtype, name
        torch.testing.assert_close(g, r, rtol=rtol, atol=atol * r.abs().max().item(), msg=name)


@pytest.mark.parametrize("weight_grad", [False, True], ids=["frozen_w", "train_w"])
@pytest.mark.parametrize("chunk_size", [16, 64], ids=lambda c: f"chunk{c}")  # 3 chunks (the last 5 rows), 1 chunk
@pytest.mark.parametrize("dtype", list(LCE_TOLS), ids=DTYPE_IDS.get)
def test_linear_cross_entropy_triton_matches_torch(device, dtype, chunk_size, weight_grad):
    inputs = lce_inputs(dtype)
    got = lce_loss_and_grads(*inputs, device, weight_grad, chunk_size=chunk_size, backend="triton")
    ref = lce_loss_and_grads(*inputs, "cpu", weight_grad, chunk_size=chunk_size, backend="torch")
    assert_lce_close(got, ref, dtype)
    assert torch.equal(got[1][inputs[2] == IGNORE], torch.zeros_like(got[1][inputs[2] == IGNORE]))


def test_linear_cross_entropy_triton_batched_and_no_grad(device):
    hidden, weight, labels = lce_inputs(torch.float32, n=3 * 13)
    h3, y3 = hidden.view(3, 13, D).to(device), labels.view(3, 13).to(device)  # [B, S, D], [B, S]
    got = lce_loss_and_grads(h3, weight, y3, device, True, chunk_size=8, backend="triton")
    ref = lce_loss_and_grads(hidden, weight, labels, "cpu", True, chunk_size=8, backend="torch")
    assert got[1].shape == (3, 13, D)
    assert_lce_close((got[0], got[1].view(-1, D), got[2]), ref, torch.float32)
    with torch.no_grad():
        loss = linear_cross_entropy(h3, weight.to(device), y3, chunk_size=8, backend="triton")
    torch.testing.assert_close(loss.cpu(), ref[0], rtol=LCE_TOLS[torch.float32][0], atol=0)


def test_linear_cross_entropy_backend_argument():
    hidden, weight, labels = lce_inputs(torch.float32)
    default = linear_cross_entropy(hidden, weight, labels, chunk_size=16)
    assert linear_cross_entropy(hidden, weight, labels, chunk_size=16, backend="auto") == default  # CPU: torch
    with pytest.raises(ValueError, match="backend"):
        linear_cross_entropy(hidden, weight, labels, backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        linear_cross_entropy_workspace_bytes(N, V, D, 16, torch.float32, backend="auto")
    # the triton backend needs no fp32 copy of 16-bit chunk logits
    torch_bytes = linear_cross_entropy_workspace_bytes(8192, 128256, 4096, None, torch.bfloat16, needs_grad=False)
    triton_bytes = linear_cross_entropy_workspace_bytes(
        8192, 128256, 4096, None, torch.bfloat16, False, backend="triton"
    )
    gathered = 9 * 8192 + 256 * 4096 * 2  # the labelled rows' indices and gathered rows, the same in both
    assert (triton_bytes - gathered) * 3 == pytest.approx(torch_bytes - gathered, rel=1e-3)  # C*V*2 instead of C*V*(2 + 4)


# ---- GPU: bf16 at Llama-3 shapes --------------------------------------------------------------------


def _gpu_only():
    from qtrain.kernels.cross_entropy import is_interpreting

    if is_interpreting():
        pytest.skip("TRITON_INTERPRET=1: the compiled kernel is not in use")


LLAMA3_VOCAB, LLAMA3_HIDDEN = 128256, 4096


@pytest.mark.gpu
def test_gpu_kernel_bf16_llama3_vocab():
    # one default chunk of logits at 8B scale: 256 rows x 128256 (16 blocks of 8192, the last partial)
    _gpu_only()
    logits, labels = make_logits(256, LLAMA3_VOCAB, torch.bfloat16, "cuda")
    z = logits.float().requires_grad_()
    ref_loss = cross_entropy_reference(z, labels)
    (GRAD_SCALE * ref_loss).backward()
    loss, grad = cross_entropy_fwd_bwd(logits.clone(), labels, IGNORE, GRAD_SCALE)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)  # fp32 math over 128k terms per row
    # bf16 gradient: one rounding of |dz| <= GRAD_SCALE (2^-9 relative), subnormal-free near 0
    torch.testing.assert_close(grad.float(), z.grad, rtol=2**-8, atol=1e-9)
    assert resolve_backend("auto", logits) == "triton"


@pytest.mark.gpu
@pytest.mark.parametrize("weight_grad", [False, True], ids=["frozen_w", "train_w"])
def test_gpu_linear_cross_entropy_bf16_triton_vs_torch(weight_grad):
    # N=2048 tokens, D=4096, V=128256 (Llama-3 8B's lm_head, 1 GB in bf16), default chunking
    _gpu_only()
    n = 2048
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(n, LLAMA3_HIDDEN, device="cuda", generator=g).bfloat16()
    weight = (torch.randn(LLAMA3_VOCAB, LLAMA3_HIDDEN, device="cuda", generator=g) * 0.02).bfloat16()
    labels = torch.randint(0, LLAMA3_VOCAB, (n,), device="cuda", generator=g)
    labels[::7] = IGNORE
    got = lce_loss_and_grads(hidden, weight, labels, "cuda", weight_grad, backend="triton")
    ref = lce_loss_and_grads(hidden, weight, labels, "cuda", weight_grad, backend="torch")
    # same logits and fp32 softmax; dz rounded to bf16 for dH in both (1 ulp apart at most), and for
    # dW only in the triton path: bf16 gradients 1-2 ulps apart (test_linear_cross_entropy's bf16 bounds)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=0)
    for name, a, b in zip(("dH", "dW"), got[1:], ref[1:]):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1.6e-2, atol=2**-6 * b.abs().max().item(), msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("grads", [(True, False), (True, True), (False, False)], ids=str)
def test_gpu_triton_workspace_formula(grads):
    _gpu_only()
    n, d, v, chunk = 4096, 1024, 32768, 256
    hidden = torch.randn(n, d, device="cuda").bfloat16().requires_grad_(grads[0])
    weight = (torch.randn(v, d, device="cuda") * 0.02).bfloat16().requires_grad_(grads[1])
    labels = torch.randint(0, v, (n,), device="cuda")
    linear_cross_entropy(hidden, weight, labels, chunk_size=chunk, backend="triton")  # compile first
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss = linear_cross_entropy(hidden, weight, labels, chunk_size=chunk, backend="triton")
    if loss.requires_grad:
        loss.backward()
    peak = torch.cuda.max_memory_allocated() - before
    formula = linear_cross_entropy_workspace_bytes(n, v, d, chunk, torch.bfloat16, *grads, backend="triton")
    assert abs(peak - formula) <= 0.15 * formula, (peak, formula)
