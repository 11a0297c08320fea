"""qtrain.kernels.nf4_lora_triton: the fused NF4+LoRA Triton kernels against the fp32 reference.

Without CUDA the kernels run under Triton's interpreter (tests/kernels/conftest.py): small, odd
shapes, fp32 and fp16 (the interpreter's `tl.dot` is wrong on bf16 operands; its bf16 path rounds
tiles to bf16 exactly and multiplies in fp32, tested here too, but the GPU's bf16 `tl.dot` only by
the `gpu` tests at real shapes).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from qtrain.kernels.nf4_lora import nf4_lora, nf4_lora_reference, nf4_lora_torch

from qtrain.nf4 import quantize_nf4

# fp32: kernel and reference do the same fp32 math in a different order (tile-wise K sums, one
# epilogue); K <= 384 terms of size ~0.1 -> a few fp32 ulps of O(1-10) values.
FP32_TOL = {"atol": 1e-5, "rtol": 1e-5}
# fp16: the kernel rounds each dequantized weight to fp16 (2^-11 relative; bitsandbytes and the
# torch backend do the same), the reference keeps it in fp32; both round the result once, so they
# can land on neighbouring fp16 values: up to ~2 ulps (an ulp is 2^-11..2^-10 relative, seen: 1 ulp,
# 0.0039 at |y|~5). atol covers outputs near zero, where the absolute weight-rounding error
# (~1e-4 for these sizes) exceeds 2 ulps.
FP16_TOL = {"atol": 1e-3, "rtol": 2e-3}
# bf16: the same with 8 significant bits: weights rounded by 2^-9, results 1-2 ulps (2^-8..2^-7
# relative) apart; the bound used for the torch backend in test_nf4_lora.py.
BF16_TOL = {"atol": 2e-2, "rtol": 1.6e-2}
TOLS = {torch.float32: FP32_TOL, torch.float16: FP16_TOL, torch.bfloat16: BF16_TOL}
# Gradients of the fp32 adapter (dA, dB) are fp32 products of the same fp32-cast inputs in both.
ADAPTER_GRAD_TOL = {"atol": 1e-4, "rtol": 1e-5}

# (M, K, N, r), odd on purpose. M <= 16 takes the split-K path, M > 16 the tiled one. K=64/192:
# NF4 blocks align with rows; K=96/100: blocks straddle rows (the gather path); K=65: odd, rows
# start mid-byte and N*K is odd (a half-used last byte).
CASES = [
    (1, 64, 33, 3),
    (5, 96, 50, 8),
    (17, 100, 33, 8),
    (33, 192, 50, 3),
    (5, 65, 33, 3),
]
SCALE = 0.7


def _case_id(case):
    return "M{}-K{}-N{}-r{}".format(*case)


def make_inputs(M, K, N, R, dtype, device="cpu", seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    weight = quantize_nf4(torch.randn(N, K, generator=g) * 0.1).to(device)
    x = torch.randn(M, K, generator=g).to(dtype)
    a = torch.randn(R, K, generator=g) * 0.3  # adapter in fp32, as LoRALinear keeps it
    b = torch.randn(N, R, generator=g) * 0.3  # non-zero, so the adapter path matters
    bias_t = (torch.randn(N, generator=g) * 0.5).to(dtype) if bias else None
    move = lambda t: None if t is None else t.to(device)
    return move(x), weight, move(a), move(b), move(bias_t)


def forward_and_grads(fn, x, w, a, b, bias, grad_y, **kw):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, a, b, bias)]
    y = fn(leaves[0], w, leaves[1], leaves[2], SCALE, leaves[3], **kw)
    y.backward(grad_y)
    return y.detach(), [t.grad for t in leaves]


def assert_close(got, ref, tol, name):
    assert got is not None, f"{name} is missing"
    assert got.dtype == ref.dtype and got.shape == ref.shape, f"{name}: {got.dtype}{tuple(got.shape)}"
    torch.testing.assert_close(got.cpu(), ref.cpu(), **tol, msg=lambda m: f"{name}: {m}")


def _triton():
    from qtrain.kernels import nf4_lora_triton

    return nf4_lora_triton


# ---- the backend end to end: output and every gradient -------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_forward_and_gradients_match_reference(triton_device, case, dtype):
    M, K, N, R = case
    x, w, a, b, bias = make_inputs(M, K, N, R, dtype, triton_device)
    grad_y = torch.randn(M, N, generator=torch.Generator().manual_seed(1)).to(dtype).to(triton_device)
    y, grads = forward_and_grads(_triton().nf4_lora_triton, x, w, a, b, bias, grad_y)
    y_ref, grads_ref = forward_and_grads(
        nf4_lora_reference, x.cpu(), w.to("cpu"), a.cpu(), b.cpu(), bias.cpu(), grad_y.cpu()
    )
    assert_close(y, y_ref, TOLS[dtype], "Y")
    tols = [TOLS[dtype], ADAPTER_GRAD_TOL, ADAPTER_GRAD_TOL, TOLS[dtype]]
    for name, g, r, tol in zip(("dX", "dA", "dB", "dbias"), grads, grads_ref, tols):
        assert r.abs().max() > 0, name
        assert_close(g, r, tol, name)
    # the adapter contributes far above the tolerance: a dropped or mis-scaled epilogue would show
    no_lora = nf4_lora_reference(x.cpu(), w.to("cpu"), None, None, SCALE, bias.cpu())
    assert (y_ref.float() - no_lora.float()).abs().max() > 0.1


@pytest.mark.parametrize("case", [CASES[1], CASES[3]], ids=_case_id)
def test_bf16_tiles_match_reference(triton_device, case):
    # On CPU this is the interpreter's path (bf16 tiles rounded exactly, fp32 dot); on a GPU the real one.
    M, K, N, R = case
    x, w, a, b, bias = make_inputs(M, K, N, R, torch.bfloat16, triton_device)
    grad_y = torch.randn(M, N, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16).to(triton_device)
    y, grads = forward_and_grads(_triton().nf4_lora_triton, x, w, a, b, bias, grad_y)
    y_ref, grads_ref = forward_and_grads(
        nf4_lora_reference, x.cpu(), w.to("cpu"), a.cpu(), b.cpu(), bias.cpu(), grad_y.cpu()
    )
    assert_close(y, y_ref, BF16_TOL, "Y")
    assert_close(grads[0], grads_ref[0], BF16_TOL, "dX")


# ---- the launchers: tile configurations and the small-M path -------------------------------------

# Tile shapes beyond the interpreter's default (16, 32, 64): BLOCK_K of two NF4 blocks (absmax
# reshaped per 64 values), of half a block, several row tiles grouped, and 1-wide groups.
CONFIGS = [
    {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 128, "GROUP_M": 2},
    {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 1},
    {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 4},
]


@pytest.mark.parametrize("K", [192, 100], ids=["K192-aligned", "K100-straddling"])
@pytest.mark.parametrize(
    "config", CONFIGS, ids=lambda c: "x".join(str(c[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
)
def test_tiled_kernels_with_other_tile_shapes(triton_device, config, K):
    M, N, R = 33, 50, 8
    kernels = _triton()
    x, w, a, b, bias = make_inputs(M, K, N, R, torch.float32, triton_device)
    xa = x @ a.T
    y = kernels.nf4_lora_fwd(x, w, xa, b, bias, SCALE, path="tiled", config=config)
    assert_close(y, nf4_lora_reference(x.cpu(), w.to("cpu"), a.cpu(), b.cpu(), SCALE, bias.cpu()), FP32_TOL, "Y")
    # dX = dY @ W + s * (dY @ B) @ A: the reference's autograd gives the same
    dy = torch.randn(M, N, generator=torch.Generator().manual_seed(3)).to(triton_device)
    dx = kernels.nf4_lora_bwd_dx(dy, w, dy @ b, a, SCALE, config=config)
    xr = x.cpu().requires_grad_(True)
    nf4_lora_reference(xr, w.to("cpu"), a.cpu(), b.cpu(), SCALE).backward(dy.cpu())
    assert_close(dx, xr.grad, FP32_TOL, "dX")


@pytest.mark.parametrize("M", [1, 5, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_small_m_split_k_path(triton_device, M, dtype):
    # K=384 in 3 splits of 128: the partial sums over splits, and the epilogue added by split 0 only
    K, N, R = 384, 50, 8
    kernels = _triton()
    x, w, a, b, bias = make_inputs(M, K, N, R, dtype, triton_device)
    assert kernels._split_k(N, K, x.device, 3) == (3, 128)
    y = kernels.nf4_lora_fwd(x, w, x.float() @ a.T, b, bias, SCALE, path="small_m", split_k=3)
    assert_close(y, nf4_lora_reference(x.cpu(), w.to("cpu"), a.cpu(), b.cpu(), SCALE, bias.cpu()), TOLS[dtype], "Y")


def test_small_m_path_is_chosen_up_to_16_rows(triton_device, monkeypatch):
    kernels = _triton()
    calls = []
    real = kernels._fwd_small_m
    monkeypatch.setattr(kernels, "_fwd_small_m", lambda *args: calls.append(args[0].shape[0]) or real(*args))
    for M in (16, 17):
        x, w, a, b, bias = make_inputs(M, 64, 33, 3, torch.float32, triton_device)
        y = kernels.nf4_lora_triton(x, w, a, b, SCALE, bias)
        assert_close(y, nf4_lora_reference(x.cpu(), w.to("cpu"), a.cpu(), b.cpu(), SCALE, bias.cpu()), FP32_TOL, "Y")
    assert calls == [16]
    with pytest.raises(ValueError, match="at most 16"):
        kernels.nf4_lora_fwd(torch.zeros(17, 64, device=triton_device), w, None, None, None, 1.0, path="small_m")


# ---- autograd details -----------------------------------------------------------------------------


def test_no_adapter_no_bias_and_batched_input(triton_device):
    x, w, a, b, _ = make_inputs(6, 96, 33, 3, torch.float32, triton_device)
    x3 = x.view(2, 3, 96)
    y = _triton().nf4_lora_triton(x3, w, None, None, SCALE)
    assert y.shape == (2, 3, 33)
    assert_close(y.view(6, 33), nf4_lora_reference(x.cpu(), w.to("cpu"), None, None, SCALE), FP32_TOL, "Y")
    xr = x3.detach().clone().requires_grad_(True)
    _triton().nf4_lora_triton(xr, w, a, b, SCALE).sum().backward()
    xc = x3.detach().cpu().requires_grad_(True)
    nf4_lora_reference(xc.view(6, 96), w.to("cpu"), a.cpu(), b.cpu(), SCALE).sum().backward()
    assert_close(xr.grad, xc.grad, FP32_TOL, "dX")


def test_dropout_matches_torch_backend(triton_device):
    # Same seed, same mask: F.dropout is applied to the same-sized input in both backends.
    x, w, a, b, bias = make_inputs(17, 64, 33, 8, torch.float32, triton_device)
    grad_y = torch.randn(17, 33, generator=torch.Generator().manual_seed(1)).to(triton_device)
    torch.manual_seed(7)
    y, grads = forward_and_grads(_triton().nf4_lora_triton, x, w, a, b, bias, grad_y, dropout=0.5, training=True)
    torch.manual_seed(7)
    y_ref, grads_ref = forward_and_grads(nf4_lora_torch, x, w, a, b, bias, grad_y, dropout=0.5, training=True)
    no_drop = nf4_lora_torch(x, w, a, b, SCALE, bias)
    assert (y_ref - no_drop).abs().max() > 0.1  # dropout did change the output
    assert_close(y, y_ref, FP32_TOL, "Y")
    for name, g, r in zip(("dX", "dA", "dB", "dbias"), grads, grads_ref):
        assert_close(g, r, ADAPTER_GRAD_TOL if name in ("dA", "dB") else FP32_TOL, name)
    # eval mode: no dropout at all
    y_eval = _triton().nf4_lora_triton(x, w, a, b, SCALE, bias, dropout=0.5, training=False)
    assert_close(y_eval, no_drop, FP32_TOL, "Y (eval)")


def test_only_needed_gradients_are_computed(triton_device, monkeypatch):
    kernels = _triton()
    x, w, a, b, _ = make_inputs(17, 64, 33, 3, torch.float32, triton_device)

    def no_dx(*args, **kwargs):
        raise AssertionError("dX kernel launched for an input that needs no gradient")

    monkeypatch.setattr(kernels, "nf4_lora_bwd_dx", no_dx)
    a_, b_ = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    kernels.nf4_lora_triton(x, w, a_, b_, SCALE).sum().backward()  # x needs no grad
    ar, br = a.cpu().requires_grad_(True), b.cpu().requires_grad_(True)
    nf4_lora_reference(x.cpu(), w.to("cpu"), ar, br, SCALE).sum().backward()
    assert_close(a_.grad, ar.grad, ADAPTER_GRAD_TOL, "dA")
    assert_close(b_.grad, br.grad, ADAPTER_GRAD_TOL, "dB")


def test_saves_no_dense_weight(triton_device):
    M, K, N, R = 17, 64, 33, 3
    x, w, a, b, _ = make_inputs(M, K, N, R, torch.float16, triton_device)
    x, a, b = (t.requires_grad_(True) for t in (x, a, b))
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = _triton().nf4_lora_triton(x, w, a, b, SCALE)
    assert saved, "the adapter's inputs are saved: the hook must have seen them"
    for t in saved:
        assert t.numel() != N * K, f"a dense weight {tuple(t.shape)} {t.dtype} is saved"
    assert sum(t.numel() for t in saved) <= M * K + M * R + R * K + N * R  # X, XA, A, B and no more
    node = y.grad_fn
    assert type(node).__name__.startswith("NF4LoRAFunction")
    assert node.weight is w  # the 4-bit weight itself, not a copy
    y.sum().backward()
    assert x.grad is not None and a.grad is not None and b.grad is not None


# ---- dispatch ------------------------------------------------------------------------------------


def test_dispatch_backends(triton_device, monkeypatch):
    x, w, a, b, bias = make_inputs(5, 64, 33, 3, torch.float32, triton_device)
    ref = nf4_lora_reference(x.cpu(), w.to("cpu"), a.cpu(), b.cpu(), SCALE, bias.cpu())
    for backend in ("torch", "triton", "auto"):
        assert_close(nf4_lora(x, w, a, b, SCALE, bias, backend=backend), ref, FP32_TOL, backend)
    with pytest.raises(ValueError, match="backend"):
        nf4_lora(x, w, a, b, SCALE, bias, backend="cuda-magic")
    # "auto" on CPU tensors is the torch backend, never Triton
    kernels = _triton()
    monkeypatch.setattr(kernels, "nf4_lora_triton", lambda *args, **kw: pytest.fail("triton used for CPU input"))
    nf4_lora(x.cpu(), w.to("cpu"), a.cpu(), b.cpu(), SCALE, backend="auto")


def test_lora_linear_triton_backend_matches_torch_backend(triton_device):
    from qtrain.lora import LoRALinear

    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 50, bias=True)
    layers = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(1)
        layers[backend] = LoRALinear.from_linear(linear, rank=8, alpha=16.0, backend=backend).to(triton_device)
        torch.nn.init.normal_(layers[backend].lora_b.weight, std=0.3)  # B = 0 at init would hide the adapter
    x = torch.randn(2, 9, 96, device=triton_device)
    grad_y = torch.randn(2, 9, 50, device=triton_device)
    outs, grads = {}, {}
    for backend, layer in layers.items():
        outs[backend] = layer(x)
        outs[backend].backward(grad_y)
        grads[backend] = (layer.lora_a.weight.grad, layer.lora_b.weight.grad)
    assert_close(outs["triton"], outs["torch"], FP32_TOL, "Y")
    for name, g, r in zip(("dA", "dB"), grads["triton"], grads["torch"]):
        assert_close(g, r, ADAPTER_GRAD_TOL, name)


def test_kernels_compile_for_nvidia_targets(tmp_path):
    # The interpreter runs Python, not the compiler: this compiles every kernel (one config each, bf16,
    # whose tl.dot the interpreter cannot run) for sm_80 and sm_90 with triton's bundled ptxas, in a
    # subprocess without TRITON_INTERPRET. No GPU needed; ~15 s on 2 cores.
    triton = pytest.importorskip("triton")
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip("this triton has no bundled ptxas")
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "compile_kernels.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_CACHE_DIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, str(script), "--quick", "--arch", "80", "90"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("regs=") == 12 and "all compiled" in proc.stdout, proc.stdout


# ---- GPU: bf16 at real shapes ---------------------------------------------------------------------


def _gpu_only():
    from qtrain.kernels.nf4_dequant import is_interpreting

    if is_interpreting():
        pytest.skip("TRITON_INTERPRET=1: the compiled kernels are not in use")


def _real_inputs(M, K, N, R, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    w = quantize_nf4(torch.randn(N, K, device="cuda", generator=g).to(dtype) * 0.02)
    x = torch.randn(M, K, device="cuda", generator=g).to(dtype)
    a = torch.randn(R, K, device="cuda", generator=g) * 0.02
    b = torch.randn(N, R, device="cuda", generator=g) * 0.02
    bias = (torch.randn(N, device="cuda", generator=g) * 0.1).to(dtype)
    return x, w, a, b, bias


def _max_err(got, ref):
    return (got.float() - ref.float()).abs().max().item()


# dA, dB at M=512, K=N=4096: fp32 sums of 512 products from the same fp32-cast inputs, in cuBLAS's
# order in both; 1e-3 relative to their mean magnitude leaves room for TF32 should a caller enable it.
GPU_ADAPTER_GRAD_RTOL = 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_real_shape_matches_reference(dtype):
    # 4096x4096 NF4 weight, M=512, rank 16: the triton backend's error against the fp32 reference
    # must be within the 16-bit tolerance and no worse than 2x the torch backend's (which rounds
    # W, the base product and the adapter term separately).
    _gpu_only()
    M, K, N, R = 512, 4096, 4096, 16
    x, w, a, b, bias = _real_inputs(M, K, N, R, dtype)
    grad_y = torch.randn(M, N, device="cuda", dtype=dtype)
    y, grads = forward_and_grads(_triton().nf4_lora_triton, x, w, a, b, bias, grad_y)
    y_ref, grads_ref = forward_and_grads(nf4_lora_reference, x, w, a, b, bias, grad_y)
    y_tb, grads_tb = forward_and_grads(nf4_lora_torch, x, w, a, b, bias, grad_y)
    tol = TOLS[dtype]
    scale_y = y_ref.float().abs().mean().item()
    torch.testing.assert_close(y, y_ref, atol=tol["rtol"] * scale_y, rtol=tol["rtol"])
    assert _max_err(y, y_ref) <= 2 * _max_err(y_tb, y_ref) + 1e-6
    for name, g, r, t in zip(("dX", "dA", "dB", "dbias"), grads, grads_ref, grads_tb):
        scale_g = r.float().abs().mean().item()
        rtol = GPU_ADAPTER_GRAD_RTOL if name in ("dA", "dB") else tol["rtol"]
        torch.testing.assert_close(g.float(), r.float(), atol=rtol * scale_g, rtol=rtol, msg=name)
        if name == "dX":  # dA, dB (fp32) and dbias (one torch sum) are computed alike in both backends
            assert _max_err(g, r) <= 2 * _max_err(t, r) + 1e-6 * scale_g, name


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 16])
def test_gpu_small_m_bf16(M):
    _gpu_only()
    K, N, R = 4096, 14336, 16
    x, w, a, b, bias = _real_inputs(M, K, N, R, torch.bfloat16)
    y = _triton().nf4_lora_fwd(x, w, x.float() @ a.T, b, bias, SCALE)
    y_ref = nf4_lora_reference(x, w, a, b, SCALE, bias)
    scale_y = y_ref.float().abs().mean().item()
    torch.testing.assert_close(y, y_ref, atol=BF16_TOL["rtol"] * scale_y, rtol=BF16_TOL["rtol"])


@pytest.mark.gpu
def test_gpu_auto_backend_is_triton():
    _gpu_only()
    from qtrain.kernels.nf4_lora import resolve_backend, triton_self_check

    x = torch.zeros(2, 64, device="cuda")
    assert triton_self_check(x.device)  # the kernels agree with torch on this GPU
    if torch.cuda.get_device_capability() < (8, 0):
        assert resolve_backend("auto", x) == "torch"
    else:
        assert resolve_backend("auto", x) == "triton"
    assert resolve_backend("auto", x.cpu()) == "torch"


# ---- the self-check that guards backend="auto" --------------------------------------------------


def test_self_check_passes_on_correct_kernels(triton_device):
    from qtrain.kernels.nf4_lora import triton_self_check

    assert triton_self_check.__wrapped__(torch.device(triton_device)) is True


def test_self_check_rejects_wrong_kernels(triton_device, monkeypatch):
    # a kernel off by 5% in its output must make "auto" fall back to torch, with a warning
    import qtrain.kernels.nf4_lora_triton as mod
    from qtrain.kernels.nf4_lora import triton_self_check

    real = mod.nf4_lora_triton
    monkeypatch.setattr(mod, "nf4_lora_triton", lambda *args, **kw: real(*args, **kw) * 1.05)
    with pytest.warns(UserWarning, match="disagree with torch"):
        assert triton_self_check.__wrapped__(torch.device(triton_device)) is False
    monkeypatch.setattr(mod, "nf4_lora_triton", lambda *args, **kw: 1 / 0)
    with pytest.warns(UserWarning, match="failed their self-check"):
        assert triton_self_check.__wrapped__(torch.device(triton_device)) is False
