"""int32 offsets: launch the NF4+LoRA paths where token index x row stride passes 2^31, check rows vs torch.

    python benchmarks/int32_probe.py --json i.json   # M = 80000 tokens of Llama-3-8B's fused gate_up (N = 28672)
    python benchmarks/int32_probe.py --dry           # CPU: a tiny shape through the same code, Triton interpreter

80000 x 28672 = 2.29e9 elements of Y (and of dY in the backward) > 2^31 - 1: a kernel that forms
`offs_m * stride` in int32 wraps around from row 2^31 / 28672 = 74898 on, and either reads and
writes the wrong rows or faults with an illegal address. Each path (fused, dequant, dispatch; one
that does not import here is "unavailable (...)") runs forward under bf16 autocast and backward
outside it, and sampled rows of Y and dX (the first, the middle, rows around 74898 and the last)
are compared with the same rows computed in fp32 from the dequantized codes; max |error| / max
|reference| <= TOL (bf16 rounding, see probe.py). About 15 GB of GPU memory per path.

Run it LAST in a GPU session: an illegal address poisons the CUDA context, and every later CUDA
call in the process fails. The result JSON is written after each path, so what ran before a crash
is kept.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"qtrain_benchmarks_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


B = _load("_nf4bench")

SHAPE = (80000, 4096, 28672)  # M, K, N: Llama-3-8B's fused gate_up at 80k tokens per micro-batch
DRY_SHAPE = (70, 128, 48)
PATH_NAMES = ["fused", "dequant", "dispatch"]
TOL = 2e-2
INT32_MAX = 2**31 - 1


def sample_rows(M: int, N: int) -> list[int]:
    """Rows to check: the ends, the middle, and those on both sides of where M x N offsets pass 2^31."""
    first_wrapped = (INT32_MAX + 1) // N
    rows = {0, 1, M // 2, M - 2, M - 1, first_wrapped - 1, first_wrapped, first_wrapped + 1}
    return sorted(r for r in rows if 0 <= r < M)


def expected_rows(layer: dict, x, dy, rows: list[int]) -> dict:
    """Y and dX of `rows` in fp32 from the dequantized codes."""
    w, a, b, s = layer["w"].float(), layer["a"].float(), layer["b"].float(), layer["scale"]
    xr, dyr = x[rows].float(), dy[rows].float()  # [R, K], [R, N]
    return {"y": xr @ w.T + s * (xr @ a.T) @ b.T, "dx": dyr @ w + s * (dyr @ b) @ a}


def probe(name: str, fn, layer: dict, x, dy, dtype, rows: list[int]) -> dict:
    """Forward under autocast, backward outside; errors of the sampled rows, or the exception's text."""
    xg = x.detach().requires_grad_(True)
    a, b = (layer[k].detach().clone().requires_grad_(True) for k in ("a", "b"))
    try:
        with torch.autocast(x.device.type, dtype):
            y = fn(xg, layer["nf4"], a, b, layer["scale"])
        got_y = y.detach()[rows]
        y.backward(dy)
        del y
        got_dx = xg.grad[rows]
        if x.is_cuda:
            torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - the crash is the finding; recorded
        return {"path": name, "status": "ERROR", "error": B.error_text(e)}
    ref = expected_rows(layer, x, dy, rows)
    errors = {"y": B.max_errors(got_y, ref["y"])["max_rel"], "dx": B.max_errors(got_dx, ref["dx"])["max_rel"]}
    per_row = (got_y.float() - ref["y"]).abs().amax(1) / ref["y"].abs().max()
    bad = [r for r, e in zip(rows, per_row.tolist()) if e > TOL]
    status = "PASS" if all(e <= TOL for e in errors.values()) else "FAIL"
    return {"path": name, "status": status, "max_rel": errors, "rows_over_tol": bad}


def run(args, device, dtype) -> dict:
    M, K, N = DRY_SHAPE if args.dry else (args.m, SHAPE[1], SHAPE[2])
    rows = sample_rows(M, N)
    paths, missing = B.our_paths(args.paths)
    max_offset = (M - 1) * N + (N - 1)
    result = {
        "meta": B.metadata(device, dtype, args.dry, tol=TOL),
        "shape": {"M": M, "K": K, "N": N, "max_offset": max_offset, "exceeds_int32": max_offset > INT32_MAX},
        "rows_checked": rows,
        "results": [{"path": n, "status": why} for n, why in missing.items()],
    }
    B.write_json(args.json, result)
    print(
        f"M={M} K={K} N={N}: largest element offset {max_offset} ({'>' if max_offset > INT32_MAX else '<='} 2^31 - 1)"
    )
    layer = B.make_layer(K, N, 16, False, device, dtype)
    x, dy = B.inputs(M, K, N, device, dtype)
    for name, fn in paths.items():
        r = probe(name, fn, layer, x, dy, dtype, rows)
        result["results"].append(r)
        print(
            f"{name}: {r['status']} {r.get('max_rel', '')} {r.get('rows_over_tol', '')} {r.get('error', '')}",
            flush=True,
        )
        B.write_json(args.json, result)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--m", type=int, default=SHAPE[0], help=f"tokens (default {SHAPE[0]})")
    p.add_argument("--paths", nargs="+", choices=list(B.PATHS), default=PATH_NAMES)
    p.add_argument(
        "--dry",
        action="store_true",
        help=f"M, K, N = {DRY_SHAPE}: a check of the code path (without a GPU: on CPU, Triton interpreter)",
    )
    p.add_argument("--json", type=Path)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    env = B.setup(args.dry)
    if env is None:
        print(
            "benchmarks/int32_probe.py needs a CUDA GPU (torch.cuda.is_available() is False): nothing probed; --dry runs it on CPU."
        )
        return 0
    result = run(args, *env)
    if args.json:
        print(f"wrote {args.json}")
    return 0 if result["results"] else 1


if __name__ == "__main__":
    sys.exit(main())
