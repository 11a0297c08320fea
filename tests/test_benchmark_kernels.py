"""benchmarks/kernel_speed.py, dequant.py, probe.py, int32_probe.py on CPU: their --dry runs (tiny shapes, the
Triton interpreter), the JSON they write, the baselines' math, and that a wrong, raising or missing
path is reported (FAIL, ERROR, unavailable) while the others still run.

The scripts are loaded by path under names that are not `kernels` (benchmarks/ is no package, and a
top-level `kernels` is the name bitsandbytes and transformers probe for Hugging Face's package).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"qtrain_test_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def kernels():
    return load("kernel_speed")


@pytest.fixture
def fake_paths(monkeypatch):
    """Registers paths `wrong` (the torch path + 0.5: a kernel bug), `broken` (raises) and `missing`
    (does not import) in a loaded script's path table; returns `add(script)`."""
    from qtrain.kernels.nf4_lora import nf4_lora_torch

    module = types.ModuleType("qtrain_test_fake_paths")
    module.wrong = lambda x, *args, **kw: nf4_lora_torch(x, *args, **kw) + 0.5

    def broken(x, *args, **kw):
        raise RuntimeError("illegal memory access (simulated)")

    module.broken = broken
    monkeypatch.setitem(sys.modules, module.__name__, module)

    def add(script):
        paths = {
            **script.B.PATHS,
            "wrong": (f"{module.__name__}:wrong", None),
            "broken": (f"{module.__name__}:broken", None),
            "missing": ("qtrain.kernels.no_such_module:fn", None),
        }
        monkeypatch.setattr(script.B, "PATHS", paths)

    return add


def read(path: Path) -> dict:
    return json.loads(path.read_text())


# ---- kernel_speed.py -----------------------------------------------------------------------------------


def test_model_shapes(kernels):
    llama3 = {p: (K, N, bias) for p, K, N, bias in kernels.B.projections(kernels.B.MODELS["llama-3-8b"])}
    assert llama3 == {"q": (4096, 4096, False), "k": (4096, 1024, False), "v": (4096, 1024, False),
                      "o": (4096, 4096, False), "gate": (4096, 14336, False), "up": (4096, 14336, False),
                      "down": (14336, 4096, False)}  # fmt: skip
    qwen = {p: (K, N, bias) for p, K, N, bias in kernels.B.projections(kernels.B.MODELS["qwen2.5-7b"])}
    assert qwen["k"] == (3584, 512, True) and qwen["down"] == (18944, 3584, False)
    args = kernels.parse_args(["--quick"])
    assert args.m == [1, 16, 4096] and "torch" not in args.paths and args.max_seconds == 80
    assert kernels.parse_args([]).m == [1, 16, 256, 2048, 4096, 8192]


def test_targets(kernels):
    big = kernels.targets(4096, "fwd+bwd", {"a": 1.2, "b": 1.0, "c": 0.96})
    assert big == {"not slower than (b)": True, ">=0.95x (c)": True, ">=1.15x (a)": True}
    assert kernels.targets(8192, "fwd+bwd", {"a": 1.1, "b": 0.9, "c": 0.99}) == {
        "not slower than (b)": False, ">=0.95x (c)": True, ">=1.15x (a)": False}  # fmt: skip
    small = kernels.targets(16, "fwd", {"a": 0.9, "b": 3.0, "c": 2.6})
    assert small == {"not slower than (b)": True, ">=2.5x bf16 GEMV (c)": True, ">=1.0x bnb 4-bit (a)": False}
    assert kernels.targets(2048, "fwd+bwd", {"a": None, "b": 1.0, "c": 0.5}) == {"not slower than (b)": True}
    assert kernels.targets(4096, "fwd", {"a": None, "b": None, "c": 2.0}) == {"not slower than (b)": None}


@pytest.mark.parametrize("bias", [False, True])
def test_baselines_b_and_c_match_fp32_autograd(kernels, bias):
    # (b) and (c) are a hand-written autograd.Function: forward and every gradient against fp32 autograd.
    B = kernels.B
    layer = B.make_layer(192, 40, 5, bias, torch.device("cpu"), torch.float32, seed=3)
    x, dy = B.inputs(7, 192, 40, "cpu", torch.float32)
    w, s = layer["w"], layer["scale"]
    fns = kernels.baselines(layer, B.load_bnb(), torch.float32)
    xr, ar, br = (t.clone().requires_grad_(True) for t in (x, layer["a"], layer["b"]))
    ref = xr @ w.T + s * (xr @ ar.T) @ br.T + (layer["bias"] if bias else 0)
    ref.backward(dy)
    for name in ("b", "c"):
        xg, ag, bg = (t.clone().requires_grad_(True) for t in (x, layer["a"], layer["b"]))
        layer_g = {**layer, "a": ag, "b": bg}
        y = kernels.baselines(layer_g, B.load_bnb(), torch.float32)[name](xg)
        y.backward(dy)
        for got, want, what in (
            (y, ref, "y"),
            (xg.grad, xr.grad, "dx"),
            (ag.grad, ar.grad, "da"),
            (bg.grad, br.grad, "db"),
        ):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"({name}) {what}")
    if "a" in fns:  # bitsandbytes + PEFT on the same codes
        torch.testing.assert_close(fns["a"](x), ref.detach(), rtol=1e-5, atol=1e-5)


def test_bnb_gets_the_same_codes(kernels):
    bnb = pytest.importorskip("bitsandbytes")
    from qtrain.nf4 import dequantize_nf4_torch, quantize_nf4

    nf4 = quantize_nf4(torch.randn(48, 192) * 0.02)
    packed, state = kernels.B.bnb_weight(nf4)
    assert torch.equal(bnb.functional.dequantize_4bit(packed, state), dequantize_nf4_torch(nf4, torch.float32))


def test_kernels_dry_json_and_reports(kernels, fake_paths, tmp_path, capsys):
    fake_paths(kernels)
    out = tmp_path / "k.json"
    assert (
        kernels.main(["--dry", "--paths", "torch", "wrong", "broken", "missing", "--m", "1", "5", "--json", str(out)])
        == 0
    )
    result = read(out)
    assert {"device", "commit", "date", "torch", "triton", "bitsandbytes", "dtype", "dry", "output_tol"} <= set(
        result["meta"]
    )
    assert result["meta"]["dry"] is True and result["meta"]["dtype"] == "float16"
    assert result["paths"]["torch"] == "ok" and result["paths"]["missing"].startswith(
        "unavailable (ModuleNotFoundError"
    )
    rows = result["rows"]
    shapes = {(r["K"], r["N"], r["bias"]) for r in rows}
    assert shapes == {(K, N, b) for _, K, N, b in kernels.B.DRY_SHAPES}
    by = {(r["K"], r["M"], r["mode"], r["path"]): r for r in rows}
    for K in (128, 192):
        assert by[(K, "-", "-", "missing")]["unavailable"].startswith("unavailable")
        for M in (1, 5):
            for mode in ("fwd", "fwd+bwd"):
                torch_row = by[(K, M, mode, "torch")]
                assert torch_row["ms"] > 0 and set(torch_row["speedup"]) == {"a", "b", "c"}
                assert all(v > 0 for v in torch_row["baseline_ms"].values())
                assert torch_row["check"]["ok"] and torch_row["check"]["max_rel"] <= kernels.OUTPUT_TOL
                assert "not slower than (b)" in torch_row["targets"]
                assert not by[(K, M, mode, "wrong")]["check"]["ok"]  # 0.5 off: the check catches it
                broken = by[(K, M, mode, "broken")]
                assert broken["ms"] is None and "illegal memory access (simulated)" in broken["error"]
                assert by[(K, M, mode, "baselines")]["check"]["c"]["ok"]
    assert result["summary"]["errors"] == 8 and result["summary"]["check_fail"] == 16  # wrong + broken rows
    text = capsys.readouterr().out
    assert "| dry | dry-a | 128x80 | 1 | fwd | torch |" in text and "FAIL (tol 1e-02)" in text
    assert "unavailable (ModuleNotFoundError" in text and "ERROR RuntimeError: illegal memory access" in text


def test_kernels_dry_runs_every_triton_path(kernels, tmp_path):
    # Every Triton path under the interpreter, the way training calls it (forward under autocast,
    # backward outside), checked against bitsandbytes on the same codes.
    out = tmp_path / "k.json"
    paths = ["fused", "dequant", "gemv", "dispatch"]
    assert kernels.main(["--dry", "--paths", *paths, "--m", "3", "--json", str(out)]) == 0
    rows = [r for r in read(out)["rows"] if r["path"] in paths]
    assert {(r["path"], r["mode"]) for r in rows} == {(p, m) for p in paths for m in ("fwd", "fwd+bwd")}
    for r in rows:
        assert r["check"]["ok"] and r["ms"] > 0, r


@pytest.mark.parametrize("script", ["kernel_speed", "dequant", "probe", "int32_probe"])
def test_without_gpu_and_without_dry_nothing_runs(script, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the script would run")
    assert load(script).main(["--json", str(tmp_path / "r.json")]) == 0
    assert "needs a CUDA GPU" in capsys.readouterr().out and not (tmp_path / "r.json").exists()


# ---- dequant.py -----------------------------------------------------------------------------------


def test_dequant_dry(tmp_path):
    dequant = load("dequant")
    out = tmp_path / "d.json"
    assert dequant.main(["--dry", "--json", str(out)]) == 0
    result = read(out)
    assert result["meta"]["bandwidth_source"].startswith("measured") and result["meta"]["bandwidth_gbps"] > 0
    assert [r["shape"] for r in result["rows"]] == [s[0] for s in dequant.DRY_SHAPES]
    for r in result["rows"]:
        assert set(r["ms"]) == {"ours", "bnb", "torch"} and not r["errors"]
        assert r["bit_exact_vs_bnb"] == {"torch": True, "ours": True}
        assert (
            r["bytes"]
            == r["N"] * r["K"] // 2 + r["N"] * r["K"] // 64 + 4 * -(-r["N"] * r["K"] // 64 // 256) + 2 * r["N"] * r["K"]
        )
        assert set(r["targets"]) == {">=2.5x bnb", ">=80% HBM"}
        assert r["ours_vs_bnb"] == pytest.approx(r["ms"]["bnb"] / r["ms"]["ours"])


def test_dequant_bandwidth_table():
    dequant = load("dequant")
    names = {"NVIDIA H200": 4.8, "NVIDIA H100 80GB HBM3": 3.35, "NVIDIA A100-SXM4-80GB": 2.039,
             "NVIDIA GeForce RTX 4090": 1.008, "NVIDIA GeForce RTX 3090": 0.936}  # fmt: skip
    for name, tbs in names.items():
        assert next(v for frag, v in dequant.BANDWIDTH_TBS if frag in name) == tbs, name


# ---- probe.py -------------------------------------------------------------------------------------


def test_probe_dry(fake_paths, tmp_path):
    probe = load("probe")
    fake_paths(probe)
    out = tmp_path / "p.json"
    assert (
        probe.main(
            ["--dry", "--paths", "torch", "gemv", "wrong", "broken", "missing", "--m", "1", "20", "--json", str(out)]
        )
        == 0
    )
    result = read(out)
    by = {(r["K"], r["M"], r["path"]): r for r in result["rows"]}
    for K in (128, 192):
        for M in (1, 20):
            for name in ("torch", "bnb"):
                r = by[(K, M, name)]
                assert r["status"] == "PASS" and set(r["max_rel"]) == {"y", "dx", "da", "db"}, r
                assert max(r["max_rel"].values()) <= probe.TOL and r["dtypes"]["y"] == "float16"
            assert by[(K, M, "wrong")]["status"] == "FAIL" and by[(K, M, "wrong")]["max_rel"]["y"] > probe.TOL
            assert by[(K, M, "broken")]["status"] == "ERROR" and "simulated" in by[(K, M, "broken")]["error"]
            assert by[(K, M, "missing")]["status"].startswith("unavailable")
        gemv = result["paths"]["gemv"]
        assert by[(K, 20, "gemv")]["status"] == ("n/a (M > 16)" if gemv == "ok" else gemv)
    assert result["summary"]["FAIL"] == 4 and result["summary"]["ERROR"] == 4 and result["summary"]["PASS"] >= 8


# ---- int32_probe.py -------------------------------------------------------------------------------


def test_int32_rows_and_shape():
    int32 = load("int32_probe")
    M, _, N = int32.SHAPE
    assert (M - 1) * N + N - 1 > 2**31 - 1  # the shape does pass int32
    rows = int32.sample_rows(M, N)
    assert {0, M - 1, 74897, 74898, 74899} <= set(rows)
    assert 74897 * N + N - 1 < 2**31 <= 74898 * N + N - 1  # row 74898 is the first to reach past int32


def test_int32_probe_dry(fake_paths, tmp_path):
    int32 = load("int32_probe")
    fake_paths(int32)
    out = tmp_path / "i.json"
    assert int32.main(["--dry", "--paths", "torch", "wrong", "broken", "missing", "--json", str(out)]) == 0
    result = read(out)
    assert result["shape"] == {"M": 70, "K": 128, "N": 48, "max_offset": 69 * 48 + 47, "exceeds_int32": False}
    status = {r["path"]: r for r in result["results"]}
    assert status["torch"]["status"] == "PASS" and status["torch"]["rows_over_tol"] == []
    assert status["wrong"]["status"] == "FAIL" and status["wrong"]["rows_over_tol"] == result["rows_checked"]
    assert status["broken"]["status"] == "ERROR" and status["missing"]["status"].startswith("unavailable")
