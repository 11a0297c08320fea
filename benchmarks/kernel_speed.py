"""NF4 linear + LoRA: each of our paths against what users run, the best known recipe and the ceiling.

    python benchmarks/kernel_speed.py                          # Llama-3-8B, M in 1 16 256 2048 4096 8192, fwd and fwd+bwd
    python benchmarks/kernel_speed.py --quick --json k.json    # gate and o at M 1 16 4096, few repetitions (~90 s on an H200)
    python benchmarks/kernel_speed.py --models llama-3-8b qwen2.5-7b --m 16 4096 --paths dispatch dequant
    python benchmarks/kernel_speed.py --dry                    # CPU: tiny shapes, Triton interpreter, the whole code path

Ours (benchmarks/_nf4bench.py `PATHS`, each resolved at run time; one that does not import in this
build is a row "unavailable (...)"): torch, fused (W dequantized inside the GEMM), dequant (W
dequantized once into a buffer, then cuBLAS), gemv (M <= 16), dispatch (what training calls).
Baselines on the SAME 4-bit codes, with the same fp32 rank-r adapter:
- (a) bitsandbytes `matmul_4bit` + a PEFT-style LoRA (peft's bnb `Linear4bit.forward`: clone, then
  lora_B(lora_A(x)) * scaling): what users run today;
- (b) dequant-once + cuBLAS + LoRA folded in with bf16 `addmm` (bnb `dequantize_4bit` into one
  reusable buffer, re-dequantized for dX; Unsloth's recipe), written inline here: the best known recipe;
- (c) the dequantized weight kept in bf16, cuBLAS + the same addmm LoRA: the ceiling.

As training runs: forward under bf16 autocast, backward outside it. "fwd" at M <= 16 runs under
inference_mode (generation); above, with autograd recording. Median of CUDA-event timings after
warmup, the L2 flushed before each repetition. Speed-ups are baseline ms / ours ms (> 1: ours
faster). Targets (issue 16), per row of ours:
- M >= 4096, fwd+bwd: >= 0.95x (c) and >= 1.15x (a);
- M <= 16, fwd: >= 2.5x (c) (bf16 GEMV) and >= 1.0x (a) (bitsandbytes' 4-bit GEMV at M = 1);
- every row: not slower than (b), i.e. >= 0.97x (b) (3% for timing noise).
Output check: each path's forward output against (a) on the same codes, max |diff| / max |(a)| <=
OUTPUT_TOL. Markdown to stdout, JSON with --json (written after every shape and M).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def _load(name: str):
    """A sibling file of benchmarks/ (no package), loaded by path."""
    spec = importlib.util.spec_from_file_location(f"qtrain_benchmarks_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


B = _load("_nf4bench")

M_VALUES = [1, 16, 256, 2048, 4096, 8192]
QUICK_M = [1, 16, 4096]
QUICK_PROJECTIONS = ["gate", "o"]
DRY_M = [1, 16, 37]
MODES = ["fwd", "fwd+bwd"]
SMALL_M = 16
BASELINES = ["a", "b", "c"]
BASELINE_NAMES = {
    "a": "bnb matmul_4bit + PEFT LoRA",
    "b": "dequant-once + cuBLAS + addmm LoRA",
    "c": "bf16 cuBLAS + addmm LoRA",
}
# max |ours - (a)| / max |(a)| on the same codes: bf16 output rounding (2^-9) and fp32-accumulation order
# over K <= 18944, plus (a)'s fp32-adapter rounding; a wrong block, nibble or tile is >= 1e-1.
OUTPUT_TOL = 1e-2
NOT_SLOWER = 0.97


# ---- the baselines ------------------------------------------------------------------------------


class DequantAddmm(torch.autograd.Function):
    """(b) and (c): Y = X @ W^T (+ bias), then `Y.addmm_(X A^T, B^T, alpha=s)` with bf16 operands;
    `weight()` gives W in X's dtype (dequantized into a reusable buffer for (b), kept for (c)) and is
    called again in backward for dX = dY W + s (dY B) A."""

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, weight, scale, bias):
        a16, b16 = lora_a.to(x.dtype), lora_b.to(x.dtype)  # [r, K], [N, r]
        w = weight()  # [N, K]
        y = x @ w.T if bias is None else torch.addmm(bias, x, w.T)  # [M, N]
        xa = x @ a16.T  # [M, r]
        y.addmm_(xa, b16.T, alpha=scale)
        ctx.save_for_backward(x, xa, a16, b16)
        ctx.weight, ctx.scale, ctx.dtypes = weight, scale, (lora_a.dtype, lora_b.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, xa, a16, b16 = ctx.saved_tensors
        s, dy = ctx.scale, dy.to(x.dtype)
        dyb = dy @ b16  # [M, r]
        dx = (dy @ ctx.weight()).addmm_(dyb, a16, alpha=s)  # [M, K]
        da = (dyb.T @ x).mul_(s)  # [r, K]
        db = (dy.T @ xa).mul_(s)  # [N, r]
        return dx, da.to(ctx.dtypes[0]), db.to(ctx.dtypes[1]), None, None, None


def baselines(layer: dict, bnb, dtype) -> dict:
    """{"a"|"b"|"c": fn(x) -> y} on the layer's codes; (a) only with bitsandbytes, (b) then with
    qtrain's torch dequantization."""
    nf4, a, b, bias, s = layer["nf4"], layer["a"], layer["b"], layer["bias"], layer["scale"]
    buffer = torch.empty(nf4.shape, dtype=dtype, device=nf4.device)  # [N, K], reused every call
    w16 = layer["w"]
    fns = {"c": lambda x: DequantAddmm.apply(x, a, b, lambda: w16, s, bias)}
    if bnb is None:
        from qtrain.nf4 import dequantize_nf4

        fns["b"] = lambda x: DequantAddmm.apply(x, a, b, lambda: buffer.copy_(dequantize_nf4(nf4, dtype)), s, bias)
        return fns
    packed, state = B.bnb_weight(nf4, dtype)

    def dequant_once():
        if buffer.is_cuda:
            return bnb.functional.dequantize_4bit(packed, state, out=buffer)
        return buffer.copy_(bnb.functional.dequantize_4bit(packed, state))  # bnb's CPU op has no out=

    def peft(x):  # peft's bnb Linear4bit.forward under autocast (no input cast), dropout 0
        y = bnb.matmul_4bit(x, packed.t(), quant_state=state, bias=bias).clone()
        return y + F.linear(F.linear(x, a), b) * s

    fns["a"] = peft
    fns["b"] = lambda x: DequantAddmm.apply(x, a, b, dequant_once, s, bias)
    return fns


def ours(paths: dict, layer: dict) -> dict:
    nf4, a, b, bias, s = layer["nf4"], layer["a"], layer["b"], layer["bias"], layer["scale"]
    return {name: (lambda x, fn=fn: fn(x, nf4, a, b, s, bias)) for name, fn in paths.items()}


# ---- one row ------------------------------------------------------------------------------------


def step_fn(fn, x, dy, params, mode: str, M: int, dtype):
    """What one timed call runs: the forward under autocast, and for fwd+bwd the backward outside it."""
    device = x.device.type
    if mode == "fwd" and M <= SMALL_M:

        def fwd_inference():
            with torch.inference_mode(), torch.autocast(device, dtype):
                return fn(x)

        return fwd_inference
    xg = x.detach().requires_grad_(True)

    def fwd_bwd():
        for p in (xg, *params):
            p.grad = None
        with torch.autocast(device, dtype):
            y = fn(xg)
        if mode == "fwd+bwd":
            y.backward(dy)

    return fwd_bwd


def check(fns: dict, ref_fn, x, dtype) -> dict:
    """Each fn's forward output (autocast) against (a)'s: {name: {max_abs, max_rel, tol, ok} | {error}}."""
    out = {}
    with torch.no_grad(), torch.autocast(x.device.type, dtype):
        ref = ref_fn(x) if ref_fn is not None else None
        for name, fn in fns.items():
            if ref is None:
                out[name] = {"error": "no reference: bitsandbytes is not installed"}
                continue
            try:
                err = B.max_errors(fn(x), ref)
            except Exception as e:  # noqa: BLE001 - a failing path is a result, not the end of the run
                out[name] = {"error": B.error_text(e)}
                continue
            out[name] = {**err, "tol": OUTPUT_TOL, "ok": err["max_rel"] <= OUTPUT_TOL}
    return out


def targets(M: int, mode: str, speedup: dict) -> dict:
    """{target: True | False | None (baseline not measured)} for one row of ours; {} when none applies."""

    def at_least(base, bar):
        return None if speedup.get(base) is None else speedup[base] >= bar

    t = {"not slower than (b)": at_least("b", NOT_SLOWER)}
    if M >= 4096 and mode == "fwd+bwd":
        t |= {">=0.95x (c)": at_least("c", 0.95), ">=1.15x (a)": at_least("a", 1.15)}
    if M <= SMALL_M and mode == "fwd":
        t |= {">=2.5x bf16 GEMV (c)": at_least("c", 2.5), ">=1.0x bnb 4-bit (a)": at_least("a", 1.0)}
    return t


def measure(layer, paths, bnb, M, modes, dtype, timer) -> list[dict]:
    """Rows for one (shape, M): per mode, every baseline and path timed, with speed-ups and targets."""
    (N, K), device = layer["nf4"].shape, layer["nf4"].device
    x, dy = B.inputs(M, K, N, device, dtype)
    base = baselines(layer, bnb, dtype)
    mine = {n: fn for n, fn in ours(paths, layer).items() if B.path_takes(n, M)}
    checks = check({**mine, **{k: v for k, v in base.items() if k != "a"}}, base.get("a"), x, dtype)
    params = [layer["a"].requires_grad_(True), layer["b"].requires_grad_(True)]
    rows = []
    for mode in modes:
        ms, errors = {}, {}
        for name, fn in {**base, **mine}.items():
            try:
                ms[name] = timer(step_fn(fn, x, dy, params, mode, M, dtype))
            except Exception as e:  # noqa: BLE001 - recorded; the other paths still run
                ms[name], errors[name] = None, B.error_text(e)
        for name in mine:
            t = ms[name]
            speedup = {k: (ms[k] / t if t and ms.get(k) else None) for k in BASELINES}
            row = {"M": M, "mode": mode, "path": name, "ms": t, "error": errors.get(name), "speedup": speedup}
            row |= {"baseline_ms": {k: ms.get(k) for k in BASELINES}, "check": checks.get(name)}
            rows.append(row | {"targets": targets(M, mode, speedup) if t else {}})
        rows.append({
            "M": M, "mode": mode, "path": "baselines", "baseline_ms": {k: ms.get(k) for k in BASELINES},
            "errors": {k: v for k, v in errors.items() if k in BASELINES}, "check": {k: checks.get(k) for k in ("b", "c")},
        })  # fmt: skip
    return rows


# ---- report -------------------------------------------------------------------------------------

HEADER = (
    "| model | proj | KxN | M | mode | path | ms | (a) ms | (b) ms | (c) ms | x(a) | x(b) | x(c) | vs bnb codes | targets |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def _check_cell(c) -> str:
    if not c:
        return "-"
    if "error" in c:
        return f"ERROR {c['error']}"
    return f"{c['max_rel']:.1e} {'ok' if c['ok'] else 'FAIL'} (tol {c['tol']:.0e})"


def format_row(r: dict) -> str:
    head = f"| {r['model']} | {r['proj']} | {r['K']}x{r['N']} | {r['M']} | {r['mode']} | {r['path']} |"
    if r.get("unavailable"):
        return f"{head} {r['unavailable']} | | | | | | | | |"
    bms = r["baseline_ms"]
    if r["path"] == "baselines":
        errs = "; ".join(f"({k}) {v}" for k, v in r["errors"].items())
        checks = "; ".join(f"({k}) {_check_cell(c)}" for k, c in r["check"].items())
        return f"{head} - | {B.fmt(bms['a'])} | {B.fmt(bms['b'])} | {B.fmt(bms['c'])} | | | | {checks} | {errs} |"
    if r["ms"] is None:
        return f"{head} ERROR {r['error']} | | | | | | | {_check_cell(r['check'])} | |"
    sp = r["speedup"]
    tgt = "; ".join(f"{k} {'-' if v is None else 'PASS' if v else 'FAIL'}" for k, v in r["targets"].items())
    return (
        f"{head} {B.fmt(r['ms'])} | {B.fmt(bms['a'])} | {B.fmt(bms['b'])} | {B.fmt(bms['c'])} | "
        f"{B.fmt(sp['a'], '.2f')} | {B.fmt(sp['b'], '.2f')} | {B.fmt(sp['c'], '.2f')} | {_check_cell(r['check'])} | {tgt} |"
    )


def summary(rows: list[dict]) -> dict:
    """Counts over the rows of ours: targets met / missed, output checks failed, paths that errored."""
    mine = [r for r in rows if r["path"] not in ("baselines",) and not r.get("unavailable")]
    verdicts = [v for r in mine for v in r.get("targets", {}).values() if v is not None]
    return {
        "targets_pass": sum(verdicts),
        "targets_fail": len(verdicts) - sum(verdicts),
        "check_fail": sum(1 for r in mine if r.get("check") and not r["check"].get("ok", False)),
        "errors": sum(1 for r in mine if r.get("error")),
    }


# ---- driver -------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=sorted(B.MODELS), help="default: llama-3-8b")
    p.add_argument("--projections", nargs="+", choices=["q", "k", "v", "o", "gate", "up", "down"])
    p.add_argument("--m", nargs="+", type=int, help=f"rows (tokens) per call; default {M_VALUES}")
    p.add_argument("--modes", nargs="+", choices=MODES, default=MODES)
    p.add_argument(
        "--paths", nargs="+", choices=list(B.PATHS), help="ours to time (default: all; --quick: all but torch)"
    )
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--reps", type=int, help="timed repetitions (default 20; --quick 8; --dry 1)")
    p.add_argument("--max-seconds", type=float, help="start no new shape after this (default none; --quick 80)")
    p.add_argument(
        "--quick", action="store_true", help=f"projections {QUICK_PROJECTIONS}, M in {QUICK_M}, few repetitions"
    )
    p.add_argument(
        "--dry",
        action="store_true",
        help="tiny shapes: a check of the code path (without a GPU: on CPU, Triton interpreter)",
    )
    p.add_argument("--json", type=Path, help="write the result here (after every shape)")
    args = p.parse_args(argv)
    args.models = args.models or ["llama-3-8b"]
    args.projections = args.projections or (QUICK_PROJECTIONS if args.quick else None)
    args.m = args.m or (DRY_M if args.dry else QUICK_M if args.quick else M_VALUES)
    args.paths = args.paths or [n for n in B.PATHS if not (args.quick and n == "torch")]
    args.reps = args.reps or (1 if args.dry else 8 if args.quick else 20)
    args.max_seconds = args.max_seconds or (80.0 if args.quick else None)
    return args


def shapes(args) -> list[tuple[str, str, int, int, bool]]:
    """(model, proj, K, N, bias), each distinct (K, N, bias) once (Mistral-7B shares Llama-3-8B's)."""
    if args.dry:
        return [("dry", name, K, N, bias) for name, K, N, bias in B.DRY_SHAPES]
    seen, out = set(), []
    for model in args.models:
        for proj, K, N, bias in B.projections(B.MODELS[model]):
            if (args.projections is None or proj in args.projections) and (K, N, bias) not in seen:
                seen.add((K, N, bias))
                out.append((model, proj, K, N, bias))
    return out


def run(args, device, dtype) -> dict:
    bnb = B.load_bnb()
    paths, missing = B.our_paths(args.paths)
    timer = B.Timer(device, warmup=0 if args.dry else 3, reps=args.reps)
    result = {"meta": B.metadata(device, dtype, args.dry, rank=args.rank, reps=args.reps, baselines=BASELINE_NAMES,
                                 output_tol=OUTPUT_TOL, not_slower=NOT_SLOWER),
              "paths": {n: missing.get(n, "ok") for n in args.paths}, "rows": []}  # fmt: skip
    if bnb is None:
        print("bitsandbytes is not installed: baseline (a) and the output check are skipped", file=sys.stderr)
    start = time.monotonic()
    for model, proj, K, N, bias in shapes(args):
        if args.max_seconds and time.monotonic() - start > args.max_seconds:
            result["stopped"] = f"--max-seconds {args.max_seconds:g} reached before {model} {proj}"
            print(result["stopped"], file=sys.stderr)
            break
        layer = B.make_layer(K, N, args.rank, bias, device, dtype)
        new = [{"M": "-", "mode": "-", "path": n, "unavailable": why} for n, why in missing.items()]
        for M in args.m:
            new += measure(layer, paths, bnb, M, args.modes, dtype, timer)
            for r in new:
                r.update(model=model, proj=proj, K=K, N=N, bias=bias)
                print(format_row(r), flush=True)
            result["rows"] += new
            result["summary"] = summary(result["rows"])
            B.write_json(args.json, result)  # after every (shape, M): a step killed at its cap keeps what ran
            new = []
        del layer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result["summary"] = summary(result["rows"])
    B.write_json(args.json, result)
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    env = B.setup(args.dry)
    if env is None:
        print(
            "benchmarks/kernel_speed.py needs a CUDA GPU (torch.cuda.is_available() is False): nothing measured; --dry runs it on CPU."
        )
        return 0
    print(HEADER)
    result = run(args, *env)
    print(f"\nsummary: {result['summary']}; paths: {result['paths']}")
    if args.json:
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
