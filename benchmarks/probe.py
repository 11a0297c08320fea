"""Correctness probe of every NF4+LoRA path as training calls it, at Llama-3-8B shapes on the GPU.

    python benchmarks/probe.py --json p.json      # M = 1, 16, 2048 on q, k (+bias), gate, down
    python benchmarks/probe.py --dry              # CPU: tiny shapes, Triton interpreter, fp16 autocast

Every path of benchmarks/_nf4bench.py `PATHS` (torch, fused, dequant, gemv, dispatch; one that does
not import here is "unavailable (...)") and bitsandbytes `matmul_4bit` + a PEFT-style LoRA on the
SAME 4-bit codes: forward under bf16 autocast, backward outside it (what `train_step` does), with
the same dY. Reference: the same math in fp32 on the dequantized codes (`nf4_lora_reference` with
autograd). Reported per path: max |error| / max |reference| of Y, dX, dA, dB, and the status: PASS
(ran, every error within TOL), FAIL (ran, an error above TOL), ERROR (raised: the error text; the
other paths still run), n/a (M above what the path takes), unavailable.

TOL: bf16 keeps 8 significant bits, so a bf16 result is off by up to 2^-9 of its value; the
products accumulate in fp32 (K <= 14336, M <= 2048 for dA/dB), and Y, dY and the saved X@A^T are
bf16-rounded once more on the way: 2e-2 of the largest reference value leaves room for those and
is well below what a wrong block, nibble, tile or dtype gives (>= 1e-1).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch
import torch.nn.functional as F


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"qtrain_benchmarks_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


B = _load("_nf4bench")

M_VALUES = [1, 16, 2048]
DRY_M = [1, 16, 37]
PROJECTIONS = ["q", "k", "gate", "down"]  # k with a bias (Qwen2.5 has q/k/v biases): the bias path too
TOL = 2e-2
QUANTITIES = ["y", "dx", "da", "db"]


def reference(layer: dict, x, dy) -> dict:
    """Y, dX, dA, dB in fp32 from the dequantized codes (the ground truth)."""
    w = layer["w"].float()  # [N, K]
    x32 = x.float().requires_grad_(True)
    a, b = (layer[k].detach().float().requires_grad_(True) for k in ("a", "b"))
    y = x32 @ w.T + layer["scale"] * (x32 @ a.T) @ b.T  # [M, N]
    if layer["bias"] is not None:
        y = y + layer["bias"].float()
    y.backward(dy.float())
    return {"y": y.detach(), "dx": x32.grad, "da": a.grad, "db": b.grad}


def bnb_peft(layer: dict, bnb, dtype):
    """bitsandbytes matmul_4bit on the same codes + peft's LoRA (under autocast: no input cast)."""
    packed, state = B.bnb_weight(layer["nf4"], dtype)

    def fn(x, nf4, a, b, scale, bias=None, dropout=0.0, training=False):
        y = bnb.matmul_4bit(x, packed.t(), quant_state=state, bias=bias).clone()
        return y + F.linear(F.linear(x, a), b) * scale

    return fn


def run_path(fn, layer: dict, x, dy, dtype) -> dict:
    """Forward under autocast, backward outside: {y, dx, da, db} (detached)."""
    xg = x.detach().clone().requires_grad_(True)
    a, b = (layer[k].detach().clone().requires_grad_(True) for k in ("a", "b"))
    with torch.autocast(x.device.type, dtype):
        y = fn(xg, layer["nf4"], a, b, layer["scale"], layer["bias"])
    y.backward(dy)
    return {"y": y.detach(), "dx": xg.grad, "da": a.grad, "db": b.grad}


def probe(name: str, fn, layer: dict, x, dy, dtype, ref: dict) -> dict:
    try:
        got = run_path(fn, layer, x, dy, dtype)
        if x.is_cuda:
            torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - a failing path is a result; the others still run
        return {"path": name, "status": "ERROR", "error": B.error_text(e)}
    missing = [q for q in QUANTITIES if got[q] is None]
    if missing:
        return {"path": name, "status": "FAIL", "error": f"no gradient for {', '.join(missing)}"}
    errors = {q: B.max_errors(got[q], ref[q])["max_rel"] for q in QUANTITIES}
    dtypes = {q: str(got[q].dtype).removeprefix("torch.") for q in QUANTITIES}
    ok = all(e <= TOL for e in errors.values())
    return {"path": name, "status": "PASS" if ok else "FAIL", "max_rel": errors, "dtypes": dtypes}


def shapes(dry: bool) -> list[tuple[str, int, int, bool]]:
    if dry:
        return B.DRY_SHAPES
    by_name = {p: (p, K, N, p == "k") for p, K, N, _ in B.projections(B.MODELS["llama-3-8b"])}
    return [by_name[p] for p in PROJECTIONS]


HEADER = (
    "| proj | KxN | bias | M | path | status | Y | dX | dA | dB | note |\n|---|---|---|---|---|---|---|---|---|---|---|"
)


def format_row(r: dict) -> str:
    errs = r.get("max_rel") or {}
    cells = " | ".join(B.fmt(errs.get(q), ".1e") for q in QUANTITIES)
    return f"| {r['proj']} | {r['K']}x{r['N']} | {r['bias']} | {r['M']} | {r['path']} | {r['status']} | {cells} | {r.get('error', '')} |"


def run(args, device, dtype) -> dict:
    bnb = B.load_bnb()
    paths, missing = B.our_paths(args.paths)
    if bnb is not None:
        paths["bnb"] = None  # built per layer
    else:
        missing["bnb"] = "unavailable (bitsandbytes is not installed)"
    names = [*args.paths, "bnb"]
    result = {
        "meta": B.metadata(device, dtype, args.dry, tol=TOL),
        "paths": {n: missing.get(n, "ok") for n in names},
        "rows": [],
    }
    print(HEADER)
    for proj, K, N, bias in shapes(args.dry):
        layer = B.make_layer(K, N, 8 if args.dry else 16, bias, device, dtype)
        for M in args.m:
            x, dy = B.inputs(M, K, N, device, dtype)
            ref = reference(layer, x, dy)
            rows = [{"path": n, "status": why} for n, why in missing.items()]
            for name, fn in paths.items():
                if not B.path_takes(name, M):
                    rows.append({"path": name, "status": f"n/a (M > {B.PATHS[name][1]})"})
                    continue
                rows.append(probe(name, fn or bnb_peft(layer, bnb, dtype), layer, x, dy, dtype, ref))
            for r in rows:
                r.update(proj=proj, K=K, N=N, bias=bias, M=M)
                print(format_row(r), flush=True)
            result["rows"] += rows
            B.write_json(args.json, result)
        del layer
    statuses = [r["status"] for r in result["rows"]]
    result["summary"] = {s: statuses.count(s) for s in ("PASS", "FAIL", "ERROR")}
    B.write_json(args.json, result)
    return result


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--m", nargs="+", type=int, help=f"rows (tokens); default {M_VALUES} ({DRY_M} with --dry)")
    p.add_argument("--paths", nargs="+", choices=list(B.PATHS), help="ours to probe (default: all); bnb always")
    p.add_argument(
        "--dry",
        action="store_true",
        help="tiny shapes: a check of the code path (without a GPU: on CPU, Triton interpreter)",
    )
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    args.paths = args.paths or list(B.PATHS)
    args.m = args.m or (DRY_M if args.dry else M_VALUES)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    env = B.setup(args.dry)
    if env is None:
        print(
            "benchmarks/probe.py needs a CUDA GPU (torch.cuda.is_available() is False): nothing probed; --dry runs it on CPU."
        )
        return 0
    result = run(args, *env)
    print(f"\nsummary: {result['summary']}")
    if args.json:
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
