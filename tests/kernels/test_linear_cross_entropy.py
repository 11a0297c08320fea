"""qtrain.kernels.linear_cross_entropy: the chunked lm_head + cross-entropy against the fp32 reference.

Loss, dH and dW through autograd, odd shapes and chunkings, ignored labels, autocast, the no-grad
path, input checks, and the workspace formula against the CPU allocator's measured peak.
"""

from __future__ import annotations

import pytest
import torch
from qtrain.kernels.linear_cross_entropy import (
    default_chunk_size,
    linear_cross_entropy,
    linear_cross_entropy_reference,
    linear_cross_entropy_workspace_bytes,
)
from torch._C._profiler import _EventType

IGNORE = -100
# Odd on purpose: N=37 tokens is no multiple of any chunk size below (16 leaves a 5-row last chunk;
# 64 > N is one short chunk), D=48, V=101 (prime). None -> default_chunk_size = N (one chunk), 0 -> unchunked.
N, D, V = 37, 48, 101
CHUNKS = [1, 16, 37, 64, None, 0]
GRAD_SCALE = 0.37  # backward gets d(out)/d(loss) != 1: the saved gradients must be scaled by it

# Tolerances: (loss rtol, gradient rtol, gradient atol as a fraction of the reference's max |grad|).
# fp32: the same fp32 math in another order (per-chunk sums, in-place softmax, D=48 and V=101-term
# dot products): loss (~200) within 1e-6 relative (seen 2.4e-7, ~3 ulps), gradients (|g| <= 1.6)
# within a few ulps: rtol 1e-5, atol 2^-20 * max (~6 ulps of the largest; seen <= 0.35 of the bound).
# fp16/bf16: the kernel rounds the logits to the input dtype (u = 2^-11 / 2^-9 relative) before
# the fp32 softmax, as F.linear under autocast does; the reference does not. Each row's loss then
# moves by <= 2u*max|z| with random signs across rows: rtol 2.5e-4 / 1e-3 of the sum (seen 3.5e-5 /
# 2.1e-4 over 50 seeds). The gradients are rounded once to the dtype in both (2 ulps: rtol 2e-3 /
# 1.6e-2), and inherit the shifted softmax p*dz, |dz| <= u*|z| with |z| up to ~8 here, times |W| or
# |h|: about 1-2 ulps of the largest gradient, so atol = 2^-9 / 2^-6 of max|grad| (seen <= 0.5 of it).
TOLS = {
    torch.float32: (1e-6, 1e-5, 2**-20),
    torch.float16: (2.5e-4, 2e-3, 2**-9),
    torch.bfloat16: (1e-3, 1.6e-2, 2**-6),
}
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small matmuls: one intra-op thread. With two, OpenMP threads spin-waiting for each other made
    this file 15x slower (2 s -> 34 s) on a 2-core CPU shared with other processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_inputs(dtype=torch.float32, n=N, d=D, v=V, seed=0, ignore_every=5):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g).to(dtype)  # [N, D]
    weight = (torch.randn(v, d, generator=g) * 0.3).to(dtype)  # [V, D]; logits |z| up to ~8
    labels = torch.randint(0, v, (n,), generator=g)  # [N]
    labels[::ignore_every] = IGNORE
    return hidden, weight, labels


def loss_and_grads(fn, hidden, weight, labels, weight_grad=True, **kw):
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_(weight_grad)
    loss = fn(h, w, labels, **kw)
    (loss * GRAD_SCALE).backward()
    return loss.detach(), h.grad, w.grad


def assert_grad_close(got, ref, dtype, name):
    _, rtol, atol = TOLS[dtype]
    assert got is not None and got.dtype == ref.dtype == dtype and got.shape == ref.shape, name
    torch.testing.assert_close(got, ref, rtol=rtol, atol=atol * ref.abs().max().item(), msg=lambda m: f"{name}: {m}")


def peak_bytes(fn) -> tuple[int, list[int]]:
    """(peak bytes allocated by `fn` above what was allocated before, sizes of its allocations) on CPU."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation:
            events.append(node)
    events.sort(key=lambda e: e.start_time_ns)
    # total_allocated is the allocator's running total, including tensors that existed before
    before = events[0].extra_fields.total_allocated - events[0].extra_fields.alloc_size
    sizes = [e.extra_fields.alloc_size for e in events if e.extra_fields.alloc_size > 0]
    return max(e.extra_fields.total_allocated for e in events) - before, sizes


# ---- correctness -----------------------------------------------------------------------------------


@pytest.mark.parametrize("weight_grad", [False, True], ids=["frozen_w", "train_w"])
@pytest.mark.parametrize("chunk_size", CHUNKS, ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("dtype", list(TOLS), ids=DTYPE_IDS.get)
def test_matches_reference(dtype, chunk_size, weight_grad):
    inputs = make_inputs(dtype)
    loss, gh, gw = loss_and_grads(linear_cross_entropy, *inputs, weight_grad, chunk_size=chunk_size)
    ref_loss, ref_gh, ref_gw = loss_and_grads(linear_cross_entropy_reference, *inputs, weight_grad)
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss, ref_loss, rtol=TOLS[dtype][0], atol=0)
    assert_grad_close(gh, ref_gh, dtype, "grad_hidden")
    if weight_grad:
        assert_grad_close(gw, ref_gw, dtype, "grad_weight")
    else:
        assert gw is None


SOFTCAP = 2.0  # logits |z| up to ~8 here: well past the cap, so an uncapped loss is far off


@pytest.mark.parametrize("chunk_size", [16, None, 0], ids=lambda c: f"chunk{c}")
def test_softcap_matches_the_capped_reference(chunk_size):
    """Gemma-2's final logit soft cap: loss and gradients are those of `c * tanh(z / c)`, on the
    chunked path (the cap's slope carried into dz) and the full-logits one."""
    inputs = make_inputs(torch.float32)
    loss, gh, gw = loss_and_grads(linear_cross_entropy, *inputs, chunk_size=chunk_size, softcap=SOFTCAP)
    ref_loss, ref_gh, ref_gw = loss_and_grads(linear_cross_entropy_reference, *inputs, softcap=SOFTCAP)
    uncapped = loss_and_grads(linear_cross_entropy_reference, *inputs)[0]
    assert abs(ref_loss - uncapped) > 0.05 * uncapped  # the cap changes the loss: the test can fail
    torch.testing.assert_close(loss, ref_loss, rtol=TOLS[torch.float32][0], atol=0)
    assert_grad_close(gh, ref_gh, torch.float32, "grad_hidden")
    assert_grad_close(gw, ref_gw, torch.float32, "grad_weight")


def test_softcap_runs_the_torch_path_whatever_the_backend():
    """The Triton kernel has no cap: a soft-capped loss asked of it is the torch path's, bit for bit."""
    inputs = make_inputs(torch.float32)
    torch_path = loss_and_grads(linear_cross_entropy, *inputs, chunk_size=16, softcap=SOFTCAP, backend="torch")
    asked_triton = loss_and_grads(linear_cross_entropy, *inputs, chunk_size=16, softcap=SOFTCAP, backend="triton")
    assert all(torch.equal(a, b) for a, b in zip(torch_path, asked_triton))


def test_softcap_reference_is_the_tanh_cap():
    hidden, weight, labels = make_inputs(torch.float32)
    capped = SOFTCAP * torch.tanh(hidden @ weight.T / SOFTCAP)
    expected = torch.nn.functional.cross_entropy(capped, labels, ignore_index=IGNORE, reduction="sum")
    torch.testing.assert_close(linear_cross_entropy_reference(hidden, weight, labels, IGNORE, SOFTCAP), expected)


def test_softcap_workspace_formula_matches_measured_peak():
    hidden, weight, labels = make_inputs(n=MN, d=MD, v=MV)

    def run():
        linear_cross_entropy(hidden.requires_grad_(), weight, labels, chunk_size=64, softcap=SOFTCAP).backward()

    measured = peak_bytes(run)[0]
    formula = linear_cross_entropy_workspace_bytes(MN, MV, MD, 64, torch.float32, softcap=True)
    assert abs(measured - formula) <= 0.15 * formula, (measured, formula)
    assert formula > linear_cross_entropy_workspace_bytes(MN, MV, MD, 64, torch.float32)


def test_reference_is_logsumexp_minus_target_logit():
    hidden, weight, labels = make_inputs()
    z = hidden @ weight.T  # [N, V]
    keep = labels != IGNORE
    expected = (z.logsumexp(1) - z.gather(1, labels.clamp(min=0)[:, None]).squeeze(1))[keep].sum()
    torch.testing.assert_close(linear_cross_entropy_reference(hidden, weight, labels), expected)


def test_ignored_rows_and_an_all_ignored_chunk():
    hidden, weight, labels = make_inputs(ignore_every=7)
    labels[16:32] = IGNORE  # the whole second chunk of 16
    loss, gh, gw = loss_and_grads(linear_cross_entropy, hidden, weight, labels, chunk_size=16)
    ref_loss, ref_gh, ref_gw = loss_and_grads(linear_cross_entropy_reference, hidden, weight, labels)
    torch.testing.assert_close(loss, ref_loss, rtol=TOLS[torch.float32][0], atol=0)
    assert_grad_close(gh, ref_gh, torch.float32, "grad_hidden")
    assert_grad_close(gw, ref_gw, torch.float32, "grad_weight")
    assert torch.equal(gh[labels == IGNORE], torch.zeros_like(gh[labels == IGNORE]))  # exactly zero rows
    # another ignore_index value works the same
    other = labels.where(labels != IGNORE, 7_000)
    assert linear_cross_entropy(hidden, weight, other, chunk_size=16, ignore_index=7_000) == loss


@pytest.mark.parametrize("chunk_size", [16, 0], ids=["chunked", "unchunked"])
def test_all_labels_ignored_gives_zero_loss_and_zero_grads(chunk_size):
    hidden, weight, labels = make_inputs()
    ignored = torch.full_like(labels, IGNORE)
    loss, gh, gw = loss_and_grads(linear_cross_entropy, hidden, weight, ignored, chunk_size=chunk_size)
    assert loss.item() == 0.0
    assert torch.equal(gh, torch.zeros_like(gh)) and torch.equal(gw, torch.zeros_like(gw))


def test_batched_input_is_flattened():
    hidden, weight, labels = make_inputs(n=3 * 13)
    h3, y3 = hidden.view(3, 13, D), labels.view(3, 13)  # [B, S, D], [B, S]
    loss, gh, gw = loss_and_grads(linear_cross_entropy, h3, weight, y3, chunk_size=8)
    ref_loss, ref_gh, ref_gw = loss_and_grads(linear_cross_entropy_reference, hidden, weight, labels)
    assert gh.shape == (3, 13, D)
    torch.testing.assert_close(loss, ref_loss, rtol=TOLS[torch.float32][0], atol=0)
    assert_grad_close(gh.view(-1, D), ref_gh, torch.float32, "grad_hidden")
    assert_grad_close(gw, ref_gw, torch.float32, "grad_weight")


def test_under_bf16_autocast():
    bf16 = make_inputs(torch.bfloat16)
    plain = loss_and_grads(linear_cross_entropy, *bf16, chunk_size=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = loss_and_grads(linear_cross_entropy, *bf16, chunk_size=16)
    for got, ref in zip(auto, plain):  # bf16 inputs: autocast changes nothing
        assert torch.equal(got, ref)
    ref_loss, ref_gh, ref_gw = loss_and_grads(linear_cross_entropy_reference, *bf16)
    torch.testing.assert_close(auto[0], ref_loss, rtol=TOLS[torch.bfloat16][0], atol=0)
    assert_grad_close(auto[1], ref_gh, torch.bfloat16, "grad_hidden")
    assert_grad_close(auto[2], ref_gw, torch.bfloat16, "grad_weight")
    # fp32 inputs are cast to bf16 as F.linear would be; gradients come back in fp32
    hidden, weight, labels = make_inputs(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, gh, gw = loss_and_grads(linear_cross_entropy, hidden, weight, labels, chunk_size=16)
    assert gh.dtype == gw.dtype == torch.float32
    assert loss == linear_cross_entropy(hidden.bfloat16(), weight.bfloat16(), labels, chunk_size=16)
    torch.testing.assert_close(gh, plain[1].float(), rtol=0, atol=0)  # bf16 grad, exactly upcast


def test_no_grad_path_same_loss_and_no_grad_buffer():
    hidden, weight, labels = make_inputs()
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with_grad = linear_cross_entropy(h, w, labels, chunk_size=16)
    grad_buffers = {N * D * 4, V * D * 4}  # dH [N, D] and dW [V, D] in fp32
    with torch.no_grad():
        peak, sizes = peak_bytes(lambda: linear_cross_entropy(h, w, labels, chunk_size=16))
        loss = linear_cross_entropy(h, w, labels, chunk_size=16)
    assert loss.grad_fn is None and loss == with_grad.detach()
    assert not grad_buffers & set(sizes), sizes
    assert peak <= 1.15 * linear_cross_entropy_workspace_bytes(N, V, D, 16, torch.float32, needs_grad=False)
    # inputs that need no gradient (grad mode on) take the same path
    peak2, sizes2 = peak_bytes(lambda: linear_cross_entropy(hidden, weight, labels, chunk_size=16))
    assert not grad_buffers & set(sizes2) and peak2 == peak
    assert linear_cross_entropy(hidden, weight, labels, chunk_size=16) == loss


@pytest.mark.parametrize("labelled", [0, 3, N], ids=["none", "three", "all"])
def test_rows_without_a_label_are_never_multiplied(labelled):
    """Prompt tokens (ignored labels) cost no lm_head work: the logits matmuls take the labelled rows
    only; the loss and both gradients equal the reference, dH is zero on the other rows."""
    hidden, weight, labels = make_inputs(ignore_every=N + 1)
    keep = torch.randperm(N, generator=torch.Generator().manual_seed(1))[:labelled]
    labels = torch.full_like(labels, IGNORE).index_copy_(0, keep, labels[keep])
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        loss = linear_cross_entropy(h, w, labels, chunk_size=16)
        loss.backward()
    matmuls = [e.input_shapes for e in prof.events() if e.name in ("aten::mm", "aten::addmm")]
    token_rows = {shapes[0][0] if shapes[0][0] != V else shapes[0][1] for shapes in matmuls}  # dW: [V, C] @ [C, D]
    assert token_rows <= set(range(1, min(labelled, 16) + 1)), matmuls  # never all N = 37 rows
    assert bool(matmuls) == (labelled > 0)
    ref_loss, ref_h, ref_w = loss_and_grads(linear_cross_entropy_reference, hidden, weight, labels)
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h.grad, ref_h / GRAD_SCALE, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, ref_w / GRAD_SCALE, rtol=1e-5, atol=1e-6)
    unlabelled = torch.ones(N, dtype=torch.bool).index_fill_(0, keep, False)
    assert torch.all(h.grad[unlabelled] == 0)


def test_bad_inputs_raise_value_errors():
    hidden, weight, labels = make_inputs()
    with pytest.raises(ValueError, match=r"hidden \(37, 48\).*weight \(101, 47\)"):
        linear_cross_entropy(hidden, weight[:, :47], labels)
    with pytest.raises(ValueError, match=r"labels \(36,\).*\(37,\)"):
        linear_cross_entropy(hidden, weight, labels[:36])
    with pytest.raises(ValueError, match=r"labels \(37,\).*\(3, 13\)"):
        linear_cross_entropy(hidden.new_zeros(3, 13, D), weight, labels)
    with pytest.raises(ValueError, match="int64"):
        linear_cross_entropy(hidden, weight, labels.int())
    with pytest.raises(ValueError, match="bfloat16"):
        linear_cross_entropy(hidden, weight.bfloat16(), labels)
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy(hidden, weight, labels, chunk_size=-1)


def test_default_chunk_size():
    assert default_chunk_size(8192, 128256, 4096) == 256  # Llama-3 8B: ceil(V/D)=32, 8192/32
    assert default_chunk_size(65536, 128256, 4096) == 2048  # long context: the logits stay about H's size
    assert default_chunk_size(3000, 101, 48) == 1024  # ceil(101/48)=3, ceil(3000/3)=1000 -> 1024
    # otherwise 256 rows, or all of them below that (the Liger rule alone gives 2 rows at N=64, V=32000, D=512)
    assert [default_chunk_size(n, 32000, 512) for n in (64, 128, 256, 512, 2048)] == [64, 128, 256, 256, 256]
    assert default_chunk_size(N, V, D) == 37 and default_chunk_size(5, 10, 100) == 5  # at most N
    assert default_chunk_size(1, 128256, 4096) == 1 and default_chunk_size(0, 100, 10) == 1


# ---- memory ----------------------------------------------------------------------------------------

MN, MD, MV = 512, 64, 4096  # one chunk of logits matters: [C, 4096] fp32 vs dH [512, 64]


def op_peak_bytes(hidden, weight, labels, chunk_size) -> int:
    """Measured peak of the op's forward, and of its backward when it has one."""

    def run():
        loss = linear_cross_entropy(hidden, weight, labels, chunk_size=chunk_size)
        if loss.requires_grad:
            loss.backward()

    return peak_bytes(run)[0]


@pytest.mark.parametrize("grads", [(True, False), (True, True), (False, True), (False, False)], ids=str)
@pytest.mark.parametrize("chunk_size", [8, 64, None, 0], ids=lambda c: f"chunk{c}")
def test_workspace_formula_matches_measured_peak(chunk_size, grads):
    hidden, weight, labels = make_inputs(n=MN, d=MD, v=MV)
    measured = op_peak_bytes(hidden.requires_grad_(grads[0]), weight.requires_grad_(grads[1]), labels, chunk_size)
    formula = linear_cross_entropy_workspace_bytes(MN, MV, MD, chunk_size, torch.float32, *grads)
    assert abs(measured - formula) <= 0.15 * formula, (measured, formula)


def test_chunked_peak_is_far_below_unchunked_for_a_large_vocab():
    hidden, weight, labels = make_inputs(n=MN, d=MD, v=16384)
    chunked = op_peak_bytes(hidden.clone().requires_grad_(), weight, labels, 2)
    default = op_peak_bytes(hidden.clone().requires_grad_(), weight, labels, None)
    unchunked = op_peak_bytes(hidden.clone().requires_grad_(), weight, labels, 0)
    # chunks of 2: dH (128 KiB) + two logit rows of 16384 (128 KiB); unchunked: 3 fp32 [512, 16384] = 96 MiB;
    # the default (256 rows, half of N) holds one [256, 16384] fp32 chunk: 16 MiB
    assert chunked * 100 < unchunked, (chunked, unchunked)
    assert default * 5 < unchunked, (default, unchunked)
    assert unchunked >= 12 * MN * 16384
