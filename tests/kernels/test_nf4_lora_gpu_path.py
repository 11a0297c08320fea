"""The fused NF4+LoRA path as a first GPU run meets it (issue 16, items 1-6).

Autocast (forward inside, backward outside, as training runs), int64 row offsets, the IEEE rank-r
epilogue, the Triton -> torch fall-back, the self-check and the autotuning keys. On CPU the kernels
run under Triton's interpreter (tests/kernels/conftest.py); `gpu` tests need CUDA.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import inspect
import re
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed (CPU-only platforms)")
import qtrain.kernels.backend as policy
import qtrain.kernels.nf4_lora as nfl
import triton.language as tl
from qtrain.kernels.nf4_lora import nf4_lora, nf4_lora_reference, nf4_lora_torch

from qtrain.nf4 import dequantize_nf4, quantize_nf4

ROOT = Path(__file__).resolve().parents[2]
SCALE = 0.7
# 16-bit outputs against an fp64 reference on the same (rounded) X: the kernel rounds W to the
# compute dtype (2^-9 bf16 / 2^-12 fp16 relative per element) and the result once; K <= 192 terms
# of size ~0.1 -> 1-2 ulps of outputs of size 1-5, plus an absolute floor for outputs near zero
# (the same bounds as test_nf4_lora_triton.py).
TOLS = {torch.bfloat16: {"atol": 2e-2, "rtol": 1.6e-2}, torch.float16: {"atol": 1e-3, "rtol": 2e-3}}
# dA, dB: fp32 sums of products of the same values (dY and X exact in fp64): fp32 rounding only.
ADAPTER_TOL = {"atol": 1e-4, "rtol": 1e-4}


def _kernels():
    from qtrain.kernels import nf4_lora_triton

    return nf4_lora_triton


def _inputs(M, K, N, R, x_dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = quantize_nf4(torch.randn(N, K, generator=g) * 0.1).to(device)
    x = torch.randn(M, K, generator=g).to(x_dtype).to(device)
    a = (torch.randn(R, K, generator=g) * 0.3).to(device)  # fp32 adapter, as LoRALinear keeps it
    b = (torch.randn(N, R, generator=g) * 0.3).to(device)
    bias = (torch.randn(N, generator=g) * 0.5).to(x_dtype).to(device)
    return x, w, a, b, bias


def _fp64_reference(x, w, a, b, bias, grad_y, cdtype):
    """Y and (dX, dA, dB, dbias) in fp64 by the formulas: the base reads X rounded to the compute
    dtype (what autocast does), the adapter the X it was given."""
    x64, w64, a64, b64 = x.double(), dequantize_nf4(w, torch.float32).double(), a.double(), b.double()
    g = grad_y.double()
    y = x.to(cdtype).double() @ w64.T + SCALE * (x64 @ a64.T) @ b64.T + bias.double()
    dx = g @ w64 + SCALE * (g @ b64) @ a64
    return y, [dx, SCALE * (g @ b64).T @ x64, SCALE * g.T @ (x64 @ a64.T), g.sum(0)]


# ---- item 1: autocast forward, backward outside ---------------------------------------------------


# The GEMV and dequant paths add the LoRA term with 16-bit operands (XA and B rounded to the compute
# dtype, Y rounded before `addmm_` adds it: no fp32 [M, N] pass), the fused kernel in fp32 in its
# epilogue: two more roundings, each at the size of its term (base and LoRA terms of size 1-5 that
# may nearly cancel), so three times the fused kernel's bounds.
_16BIT_LORA_TOLS = {dt: {k: 3 * v for k, v in tol.items()} for dt, tol in TOLS.items()}
PATH_TOLS = {"fused": TOLS, "gemv": _16BIT_LORA_TOLS, "dequant": _16BIT_LORA_TOLS}

# Their adapter gradients are products of 16-bit operands too (dY @ B and its product with X, as
# PEFT's under autocast; the fused kernel's are fp32): an error of a few units of the 16-bit format's
# rounding of the largest gradient (2^-8 bf16, 2^-11 fp16), relative to that largest gradient.
ADAPTER_16BIT_TOL = {torch.bfloat16: {"atol": 3e-2, "rtol": 0.0}, torch.float16: {"atol": 4e-3, "rtol": 0.0}}


@pytest.mark.parametrize(
    "path,M",
    [("fused", 37), ("fused", 5), ("gemv", 5), ("dequant", 37)],
    ids=["fused-M37", "fused-M5", "gemv-M5", "dequant-M37"],
)
@pytest.mark.parametrize(
    "cdtype,x_dtype",
    [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float16, torch.float32)],
    ids=["bf16-autocast-bf16-x", "bf16-autocast-fp32-x", "fp16-autocast-fp32-x"],
)
def test_triton_backend_under_autocast_matches_fp64(triton_device, monkeypatch, path, M, cdtype, x_dtype):
    # Before the fix: XA came out of the forward in the autocast dtype and the backward (outside
    # autocast) multiplied it with an fp32 dY: "expected m1 and m2 to have the same dtype".
    # backend "triton" goes through nf4_dispatch; each path is forced in turn.
    import qtrain.kernels.nf4_dispatch as dispatch

    monkeypatch.setattr(dispatch, "choose_path", lambda *args: path)
    K, N, R = 100, 50, 8  # K=100: NF4 blocks straddle rows
    x, w, a, b, bias = _inputs(M, K, N, R, x_dtype, triton_device)
    grad_y = torch.randn(M, N, generator=torch.Generator().manual_seed(1)).to(cdtype).to(triton_device)
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, a, b, bias)]
    with torch.autocast(triton_device, dtype=cdtype):
        y = nf4_lora(leaves[0], w, leaves[1], leaves[2], SCALE, leaves[3], backend="triton")
    y.backward(grad_y)  # outside autocast, as the trainer's backward
    y_ref, grads_ref = _fp64_reference(*(t.cpu() for t in (x,)), w.to("cpu"), a.cpu(), b.cpu(), bias.cpu(),
                                       grad_y.cpu(), cdtype)  # fmt: skip
    assert y.dtype == cdtype, "Y comes out in the compute (autocast) dtype"
    tol = PATH_TOLS[path][cdtype]
    torch.testing.assert_close(y.cpu().double(), y_ref, **tol)
    adapter_tol = ADAPTER_TOL if path == "fused" else ADAPTER_16BIT_TOL[cdtype]
    tols = [tol, adapter_tol, adapter_tol, tol]
    for name, leaf, ref, tol in zip(("dX", "dA", "dB", "dbias"), leaves, grads_ref, tols):
        assert leaf.grad is not None and leaf.grad.dtype == leaf.dtype, f"{name}: {leaf.grad and leaf.grad.dtype}"
        assert ref.abs().max() > 0, name
        if name in ("dA", "dB") and path != "fused":  # relative to the largest gradient
            tol = {"atol": tol["atol"] * ref.abs().max().item(), "rtol": 0.0}
        torch.testing.assert_close(leaf.grad.cpu().double(), ref, **tol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_train_step_with_triton_backend_under_autocast(triton_device, dtype):
    # The reproduction: a bf16 model, backend "triton", one train_step (forward under
    # autocast, backward outside). Before the fix: "expected m1 and m2 to have the same dtype".
    from transformers import LlamaConfig

    from qtrain.lora import LoRASpec
    from qtrain.synthetic import random_model
    from qtrain.train import train_step

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128)  # fmt: skip
    model = random_model(config, LoRASpec(rank=4), compute_dtype=dtype, device=triton_device, backend="triton")
    trainable = [p for p in model.parameters() if p.requires_grad]
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    before = [p.detach().clone() for p in trainable]
    optimizer = torch.optim.SGD(trainable, lr=0.1)
    device = torch.device(triton_device)
    loss, tokens = train_step(
        model, [batch], optimizer, trainable, 1.0, device, torch.autocast(device.type, dtype=dtype)
    )
    assert tokens == 18 and 0 < loss < 10
    assert all(torch.isfinite(p).all() for p in trainable)
    assert any(not torch.equal(p, q) for p, q in zip(trainable, before))  # B (zero at init) got a gradient


def test_torch_backend_returns_the_compute_dtype(triton_device):
    # the path chosen for a shape must never change Y's dtype: torch and triton agree on it
    x, w, a, b, bias = _inputs(5, 64, 33, 3, torch.float32, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = nf4_lora_torch(x, w, a, b, SCALE, bias)
        y_base = nf4_lora_torch(x, w, None, None, SCALE)
    assert y.dtype == y_base.dtype == torch.bfloat16
    xr = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = nf4_lora_torch(xr, w, a, b, SCALE, bias)
    out.float().sum().backward()
    assert xr.grad.dtype == torch.float32


def test_no_full_size_upcast_of_x_or_dy(triton_device, monkeypatch):
    # Item 5: the adapter's products cast X [M, K] and dY [M, N] to fp32 a chunk of rows at a time.
    # With chunks of at most 2 rows no tensor of more than 2 rows' size may be cast to fp32.
    kernels = _kernels()
    M, K, N, R = 17, 64, 50, 4
    monkeypatch.setattr(kernels, "_UPCAST_CHUNK", 2 * N)
    x, w, a, b, _ = _inputs(M, K, N, R, torch.float16, triton_device)
    casts = []
    real_to = torch.Tensor.to

    def spy(self, *args, **kwargs):
        out = real_to(self, *args, **kwargs)
        if out.dtype == torch.float32 and self.dtype != torch.float32:
            casts.append(self.shape)
        return out

    leaves = [t.detach().clone().requires_grad_(True) for t in (x, a, b)]
    grad_y = torch.randn(M, N, generator=torch.Generator().manual_seed(1)).to(torch.float16).to(triton_device)
    monkeypatch.setattr(torch.Tensor, "to", spy)
    y = kernels.nf4_lora_triton(leaves[0], w, leaves[1], leaves[2], SCALE)
    y.backward(grad_y)
    monkeypatch.undo()
    assert casts, "the adapter path does upcast 16-bit rows: the spy must have seen it"
    too_big = [tuple(shape) for shape in casts if shape.numel() > 2 * max(K, N)]  # more than 2 rows of X or dY
    assert not too_big, too_big
    _, grads_ref = _fp64_reference(x.cpu(), w.to("cpu"), a.cpu(), b.cpu(), torch.zeros(N), grad_y.cpu(), torch.float16)
    for name, leaf, ref in zip(("dX", "dA", "dB"), leaves, grads_ref):
        tol = TOLS[torch.float16] if name == "dX" else ADAPTER_TOL
        torch.testing.assert_close(leaf.grad.cpu().double(), ref, **tol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 16, 2048])
def test_gpu_autocast_at_llama_shapes(M):
    # bf16 autocast forward, backward outside, Llama-3-8B's q projection with a rank-16 fp32 adapter:
    # the triton backend against the torch backend (both bf16 compute) and the fp64 formulas.
    from qtrain.kernels.nf4_dequant import is_interpreting

    if is_interpreting():
        pytest.skip("TRITON_INTERPRET=1: the compiled kernels are not in use")
    K, N, R = 4096, 4096, 16
    g = torch.Generator().manual_seed(0)
    w = quantize_nf4(torch.randn(N, K, generator=g) * 0.02).to("cuda")
    x = torch.randn(M, K, generator=g).to("cuda", torch.bfloat16)
    a, b = (torch.randn(s, generator=g).mul(0.02).cuda() for s in ((R, K), (N, R)))
    bias = torch.zeros(N, dtype=torch.bfloat16, device="cuda")
    grad_y = torch.randn(M, N, generator=g).to("cuda", torch.bfloat16)
    out = {}
    for backend in ("torch", "triton"):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, a, b)]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = nf4_lora(leaves[0], w, leaves[1], leaves[2], SCALE, bias, backend=backend)
        y.backward(grad_y)
        out[backend] = [y.detach()] + [t.grad for t in leaves]
    y_ref, (dx_ref, da_ref, db_ref, _) = _fp64_reference(x.cpu(), w.to("cpu"), a.cpu(), b.cpu(), bias.cpu(),
                                                         grad_y.cpu(), torch.bfloat16)  # fmt: skip
    for name, got, tb, ref in zip(
        ("Y", "dX", "dA", "dB"), out["triton"], out["torch"], (y_ref, dx_ref, da_ref, db_ref)
    ):
        assert got.dtype == tb.dtype, name
        err = (got.cpu().double() - ref).abs().max().item()
        err_torch = (tb.cpu().double() - ref).abs().max().item()
        assert err <= 2 * err_torch + 1e-6 * ref.abs().max().item(), (name, err, err_torch)


# ---- item 2: the self-check runs as training runs, with one fixed config --------------------------


def test_self_check_runs_like_training_with_fixed_configs(triton_device, monkeypatch):
    kernels = _kernels()
    seen = []
    real = kernels.nf4_lora_triton

    def spy(x, *args, **kwargs):
        seen.append((x.shape[0], nfl.autocast_enabled(x), kernels._FIXED[0]))
        return real(x, *args, **kwargs)

    monkeypatch.setattr(kernels, "nf4_lora_triton", spy)
    assert nfl.triton_self_check.__wrapped__(torch.device(triton_device)) is True
    assert sorted(m for m, _, _ in seen) == [5, 37], "the tiled (odd M) and the small-M path are both checked"
    assert all(autocast for _, autocast, _ in seen), "the forward runs under autocast"
    assert all(fixed for _, _, fixed in seen), "with one fixed config, no autotuning"
    assert kernels._FIXED[0] is False


def test_fixed_configs_replace_the_autotuner(triton_device, monkeypatch):
    kernels = _kernels()
    monkeypatch.setattr(kernels, "is_interpreting", lambda: False)  # as on a GPU: the autotuner by default
    assert kernels._default_config(small_m=False) is None and kernels._default_config(small_m=True) is None
    with kernels.fixed_configs():
        assert kernels._default_config(small_m=False) == kernels._FIXED_CONFIG
        assert kernels._default_config(small_m=True) == kernels._FIXED_SMALL_M_CONFIG
        _, meta = kernels._tiled_launch(kernels._nf4_lora_fwd_kernel, None, None, 37, "BLOCK_N", 80)
        assert meta["BLOCK_M"] == kernels._FIXED_CONFIG["BLOCK_M"] and meta["num_warps"] == 4
    assert kernels._default_config(small_m=False) is None


def test_self_check_fails_cleanly_when_a_kernel_raises(triton_device, monkeypatch):
    from triton.runtime.errors import OutOfResources

    kernels = _kernels()

    def broken(*args, **kwargs):
        raise OutOfResources(300000, 232448, "shared memory")

    monkeypatch.setattr(kernels, "nf4_lora_bwd_dx", broken)  # the backward's kernel: the forward passes
    with pytest.warns(UserWarning, match="failed their self-check"):
        assert nfl.triton_self_check.__wrapped__(torch.device(triton_device)) is False


# ---- item 3: int64 row offsets --------------------------------------------------------------------

TOKEN_INDEX = ("offs_m",)  # names holding token (row of X / Y / dY / dX) indices
ROW_SIZES = ("stride", "N", "K")  # a row stride, or a row length used as one


def _names(node) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def test_no_int32_token_times_stride_products():
    # Every `token index * stride` must go through _row_offsets (int64); before the fix the kernels
    # formed `offs_m[:, None] * stride_xm` etc. in int32, which wraps at M*N > 2^31.
    kernels = _kernels()
    tree = ast.parse(Path(kernels.__file__).read_text())
    bad = []
    for fn in (n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name != "_row_offsets"):
        if not any("jit" in ast.unparse(d) for d in fn.decorator_list):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
                sides = [_names(node.left), _names(node.right)]
                token = [any(n.startswith(TOKEN_INDEX) for n in s) for s in sides]
                size = [any(n.startswith(ROW_SIZES) for n in s) for s in sides]
                if (token[0] and size[1]) or (token[1] and size[0]):
                    bad.append(f"{fn.name}: {ast.unparse(node)}")
    assert not bad, bad
    assert "_row_offsets(offs_m" in inspect.getsource(kernels._fwd_k_step.fn)


# the helper under test, looked up so that its absence fails this test only, not the whole module
_row_offsets = getattr(importlib.import_module("qtrain.kernels.nf4_lora_triton"), "_row_offsets", None)


@triton.jit
def _row_offsets_probe(out_ptr, first, stride):
    offs = first + tl.arange(0, 16)
    tl.store(out_ptr + tl.arange(0, 16), _row_offsets(offs, stride))


def test_row_offsets_are_int64(triton_device):
    out = torch.empty(16, dtype=torch.int64, device=triton_device)
    _row_offsets_probe[(1,)](out, 80000, 28672)  # 80k tokens x Llama-3-8B's fused gate_up width: past 2^31
    expected = (80000 + torch.arange(16, dtype=torch.int64)) * 28672
    assert expected.max() > 2**31
    assert torch.equal(out.cpu(), expected)


@pytest.mark.gpu
def test_gpu_launch_past_int32_offsets():
    # M*N > 2^31 on the forward's Y and the backward's dY: rows at the end must be right.
    from qtrain.kernels.nf4_dequant import is_interpreting

    if is_interpreting():
        pytest.skip("TRITON_INTERPRET=1: the compiled kernels are not in use")
    M, K, N, R = 75000, 64, 28672, 8  # 2.15e9 elements of Y
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs ~20 GB of GPU memory")
    kernels = _kernels()
    x, w, a, b, _ = _inputs(M, K, N, R, torch.bfloat16, "cpu")
    x, w, a, b = x.cuda(), w.to("cuda"), a.cuda(), b.cuda()
    xa = x.float() @ a.T
    y = kernels.nf4_lora_fwd(x, w, xa, b, None, SCALE)
    rows = torch.tensor([0, M // 2, M - 2, M - 1], device="cuda")
    ref = nf4_lora_reference(x[rows], w, a, b, SCALE)
    torch.testing.assert_close(y[rows].float(), ref.float(), **TOLS[torch.bfloat16])
    del y
    dy = torch.zeros(M, N, dtype=torch.bfloat16, device="cuda")
    dy[-1] = 1.0
    dx = kernels.nf4_lora_bwd_dx(dy, w, None, None, SCALE)
    expected = dequantize_nf4(w, torch.float32).sum(0)
    torch.testing.assert_close(dx[-1].float(), expected, **TOLS[torch.bfloat16])
    assert dx[:-1].abs().max() == 0


# ---- item 4: IEEE precision for the rank-r epilogue ------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
def test_lora_epilogue_uses_ieee_precision(triton_device, dtype):
    # The interpreter ignores input_precision (its dot is exact), so TF32's truncation of the fp32
    # epilogue operands cannot show on CPU: this checks the precision that reaches the kernels'
    # rank-r dots. Before the fix 16-bit activations got "tf32".
    kernels = _kernels()
    w = quantize_nf4(torch.randn(33, 64) * 0.1)
    assert kernels.LORA_PRECISION == "ieee"
    assert kernels._common_constexprs(w, dtype, 8)["LORA_PRECISION"] == "ieee"
    for kernel in (kernels._nf4_lora_fwd_kernel, kernels._nf4_lora_fwd_small_m_kernel, kernels._nf4_lora_bwd_kernel):
        source = inspect.getsource(kernel.fn)
        assert "R_BLOCK, LORA_PRECISION)" in source, kernel.fn.__name__  # _add_lowrank's dots get it


# ---- item 4 (packaging) and 5: the triton floor, the fall-back at run time --------------------------


def test_triton_floor_is_3_4():
    # (read as text: tomllib is Python 3.11+, the project supports 3.10)
    (triton_dep,) = re.findall(r'^\s*"(triton[^";]*)', (ROOT / "pyproject.toml").read_text(), flags=re.MULTILINE)
    assert triton_dep.strip() == "triton>=3.4", triton_dep
    assert nfl.MIN_TRITON == (3, 4)


def _fail_kernel(*args, **kwargs):
    from triton.runtime.errors import OutOfResources

    raise OutOfResources(300000, 232448, "shared memory")


@pytest.fixture
def auto_picks_triton(triton_device, monkeypatch):
    """backend="auto" takes Triton on this device (as on a GPU that passed its self-check)."""
    monkeypatch.setattr(policy, "_auto_may_use_triton", lambda op, x: True)
    monkeypatch.setattr(policy, "_TRITON_FAILED", {})
    return triton_device


def test_auto_falls_back_once_on_a_forward_error(auto_picks_triton, monkeypatch):
    kernels = _kernels()
    calls = []
    monkeypatch.setattr(kernels, "nf4_lora_fwd", lambda *a, **k: calls.append(1) or _fail_kernel())
    x, w, a, b, bias = _inputs(17, 64, 33, 3, torch.float32, auto_picks_triton)
    ref = nf4_lora_torch(x, w, a, b, SCALE, bias)
    with pytest.warns(UserWarning, match="OutOfResources.*backend 'torch'"):
        y = nf4_lora(x, w, a, b, SCALE, bias, backend="auto")
    torch.testing.assert_close(y, ref)
    assert nfl.resolve_backend("auto", x) == "torch" and calls == [1]
    y2 = nf4_lora(x, w, a, b, SCALE, bias, backend="auto")  # no second try, no second warning
    torch.testing.assert_close(y2, ref)
    assert calls == [1]
    with pytest.raises(RuntimeError, match="could not compile or run.*backend 'torch'"):
        nf4_lora(x, w, a, b, SCALE, bias, backend="triton")  # asked for by name: an error, with a hint


def test_auto_falls_back_on_a_backward_error(auto_picks_triton, monkeypatch):
    kernels = _kernels()
    monkeypatch.setattr(kernels, "nf4_lora_bwd_dx", _fail_kernel)
    x, w, a, b, bias = _inputs(17, 64, 33, 3, torch.float32, auto_picks_triton)
    grad_y = torch.randn(17, 33, generator=torch.Generator().manual_seed(1)).to(auto_picks_triton)

    def grads(backend):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, a, b)]
        nf4_lora(leaves[0], w, leaves[1], leaves[2], SCALE, bias, backend=backend).backward(grad_y)
        return [t.grad for t in leaves]

    ref = grads("torch")
    with pytest.warns(UserWarning, match="OutOfResources"):
        got = grads("auto")
    for name, g, r in zip(("dX", "dA", "dB"), got, ref):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    with pytest.raises(RuntimeError, match="could not compile or run"):
        grads("triton")


def test_errors_that_are_not_triton_errors_propagate(auto_picks_triton, monkeypatch):
    kernels = _kernels()
    monkeypatch.setattr(kernels, "nf4_lora_fwd", lambda *a, **k: 1 / 0)
    x, w, a, b, _ = _inputs(17, 64, 33, 3, torch.float32, auto_picks_triton)  # M=17: the fused path
    with pytest.raises(ZeroDivisionError):
        nf4_lora(x, w, a, b, SCALE, backend="auto")
    assert not policy._TRITON_FAILED


@pytest.mark.parametrize("M", [5, 600], ids=["gemv-M5", "dequant-M600"])
def test_auto_falls_back_on_a_backward_dequant_error(auto_picks_triton, monkeypatch, M):
    # The GEMV and dequant paths' backward dequantizes W with the Triton kernel again: an error
    # there (beyond the reach of nf4_lora's forward fall-back) dequantizes with torch under "auto"
    # and raises RuntimeError with the hint under "triton".
    import qtrain.kernels.nf4_dequant as dequant
    import qtrain.kernels.nf4_dispatch as dispatch

    assert dispatch.choose_path(M, 33, 64, torch.device(auto_picks_triton)) == ("gemv" if M == 5 else "dequant")
    x, w, a, b, bias = _inputs(M, 64, 33, 3, torch.float32, auto_picks_triton)
    grad_y = torch.randn(M, 33, generator=torch.Generator().manual_seed(1)).to(auto_picks_triton)

    def grads(backend):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, a, b)]
        y = nf4_lora(leaves[0], w, leaves[1], leaves[2], SCALE, bias, backend=backend)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(dequant, "nf4_dequantize_triton", _fail_kernel)  # the backward's kernel fails
            y.backward(grad_y)
        return [t.grad for t in leaves]

    ref = grads("torch")
    with pytest.warns(UserWarning, match="OutOfResources"):
        got = grads("auto")
    for name, g, r in zip(("dX", "dA", "dB"), got, ref):  # fp32 sums of up to 600 terms, in another order
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    with pytest.raises(RuntimeError, match="could not compile or run"):
        grads("triton")


def test_is_triton_error():
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

    assert nfl.is_triton_error(OutOfResources(1, 0, "shared memory"))
    assert issubclass(CompilationError, Exception) and CompilationError.__module__.startswith("triton")
    assert not nfl.is_triton_error(ValueError("x must be [M, 64]"))
    assert not nfl.is_triton_error(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    # a RuntimeError raised from inside triton's package (e.g. an MLIR pass failure) is one
    triton_dir = Path(importlib.util.find_spec("triton").origin).parent
    assert nfl._in_triton_package(str(triton_dir / "compiler" / "compiler.py"))
    assert not nfl._in_triton_package(__file__)
    hint = nfl.triton_error_hint(OutOfResources(1, 0, "shared memory"))
    assert "\n" not in hint and "backend 'torch'" in hint


# ---- item 6: autotuning keys, timing, cache ---------------------------------------------------------


def test_m_bucket():
    kernels = _kernels()
    assert [kernels.m_bucket(m) for m in (1, 17, 37, 4096, 4097, 80000)] == [1, 32, 64, 4096, 8192, 16384]
    assert kernels.M_BUCKET_MAX == 16384


def test_autotuners_key_on_buckets_and_time_without_flush(triton_device, monkeypatch):
    kernels = _kernels()
    made = []
    fake = functools.wraps(triton.autotune)(lambda **kw: made.append(kw) or (lambda fn: fn))  # same signature
    monkeypatch.setattr(kernels.triton, "autotune", fake)
    kernels._autotuned_fwd.__wrapped__((9, 0))
    kernels._autotuned_bwd.__wrapped__((8, 6))
    kernels._autotuned_small_m.__wrapped__()
    assert [kw["key"] for kw in made] == [["M_BUCKET", "N", "K"], ["M_BUCKET", "N", "K"], ["N", "K"]]
    for kw in made:
        assert kw["do_bench"] is kernels._bench_no_flush  # no 256 MB flush buffer while tuning
        assert kw["cache_results"] is True  # triton 3.9 has it; older versions are guarded


def test_compile_script_specialises_as_triton_does():
    # benchmarks/compile_kernels.py must compile with the runtime's specialisation: checked against
    # triton's own specialize function where this triton exposes it. (Loaded in-process, the script
    # leaves TRITON_INTERPRET alone: it only drops it when run as a program.)
    native = pytest.importorskip("triton._C.libtriton").__dict__.get("native_specialize_impl")
    if native is None:
        pytest.skip("this triton has no native_specialize_impl")
    from triton.backends.compiler import BaseBackend  # the CUDA backend inherits its specialisation rules
    from triton.runtime.jit import MockTensor

    spec = importlib.util.spec_from_file_location("qtrain_compile_kernels", ROOT / "benchmarks" / "compile_kernels.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for value in (1, 16, 37, 4096, 14336, 2**31 + 16, 0.5):
        assert script.specialize(value) == native(BaseBackend, value, False, True, True), value
    assert script.specialize(script.Pointer("bf16")) == native(
        BaseBackend, MockTensor(torch.bfloat16), False, True, True
    )
    _, fn, consts, _, _, launch = next(job for job in script.jobs("bf16", quick=True) if job[0].startswith("fwd"))
    assert launch == script.launch_args("fwd", "bf16", *script.DEFAULT_SHAPE)
    src = script.runtime_source(fn, launch, consts)
    names = fn.arg_names
    assert src.signature["stride_br"] == "constexpr"  # B [N, r] contiguous: stride 1 is a constant
    assert src.attrs[(names.index("stride_xm"),)] == [["tt.divisibility", 16]]
    assert src.attrs[(names.index("x_ptr"),)] == [["tt.divisibility", 16]]


def test_compile_script_launch_args_match_the_launchers(triton_device, monkeypatch):
    # the arguments compile_kernels.py assumes are those nf4_lora_fwd / nf4_lora_bwd_dx pass
    kernels = _kernels()
    spec = importlib.util.spec_from_file_location("qtrain_compile_kernels2", ROOT / "benchmarks" / "compile_kernels.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    recorded = {}

    class Recorder:
        def __init__(self, fn, name):
            self.fn, self.name = fn, name

        def __getitem__(self, grid):
            return lambda *args, **kw: recorded.__setitem__(self.name, dict(zip(self.fn.arg_names, args)))

    for attr, name in (("_nf4_lora_fwd_kernel", "fwd"), ("_nf4_lora_bwd_kernel", "bwd")):
        monkeypatch.setattr(kernels, attr, Recorder(getattr(kernels, attr), name))
    M, K, N, R = 48, 128, 96, 16
    x = torch.randn(M, K, dtype=torch.float16, device=triton_device)
    w = quantize_nf4(torch.randn(N, K) * 0.1).to(triton_device)
    kernels.nf4_lora_fwd(x, w, torch.randn(M, R, device=triton_device), torch.randn(N, R, device=triton_device),
                         torch.zeros(N, dtype=torch.float16, device=triton_device), SCALE)  # fmt: skip
    kernels.nf4_lora_bwd_dx(torch.randn(M, N, dtype=torch.float16, device=triton_device), w,
                            torch.randn(M, R, device=triton_device), torch.randn(R, K, device=triton_device), SCALE)  # fmt: skip
    for name in ("fwd", "bwd"):
        assumed = script.launch_args(name, "fp16", M, N, K, R)
        assert recorded[name], name
        for arg, value in recorded[name].items():
            if isinstance(value, torch.Tensor):
                assert isinstance(assumed[arg], script.Pointer), (name, arg)
            elif isinstance(value, int):
                assert assumed[arg] == value, (name, arg, assumed[arg], value)  # M, N, K, R, M_BUCKET, strides
            else:
                assert type(assumed[arg]) is type(value), (name, arg)
