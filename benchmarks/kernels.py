"""NF4 linear + LoRA: the fused Triton backend against what others run, on real projection shapes.

    python benchmarks/kernel_speed.py                       # every model, M in 1 16 512 4096 8192, all modes
    python benchmarks/kernel_speed.py --quick               # Llama-3-8B, M in 1 512 4096, fewer repetitions
    python benchmarks/kernel_speed.py --models llama-3-8b qwen2.5-7b --m 512 4096 --modes fwd fwd+bwd

Variants, all with the same rank-r LoRA adapter kept in fp32 (as PEFT and qtrain do for QLoRA):
- ours: `qtrain.kernels.nf4_lora_triton` (W dequantized in registers inside the matmul, fused epilogue);
- (a) bnb: bitsandbytes `matmul_4bit` (dequantize_4bit to bf16 + cuBLAS; its GEMV kernel for one
  row at inference) + the LoRA matmuls separately: what PEFT/Unsloth's QLoRA path does;
- (b) bf16: a plain bf16 weight with cuBLAS + the same LoRA matmuls: the ceiling, no quantization.

Modes: "fwd" (under inference_mode for M <= 16, i.e. generation; with autograd recording above),
"bwd" (backward of a recorded forward: dX, dA, dB), "fwd+bwd". Median time of
`triton.testing.do_bench`. TFLOP/s counts 2*M*N*K per base product plus the LoRA products; GB/s is
each variant's minimum traffic (its weight format, activations, outputs) over its time. Ratios are
times, ours / baseline: below 1 means ours is faster.

Writes `benchmarks/results/kernels-<gpu>-<date>-<commit>.{json,md}`. Without a CUDA GPU it says so
and exits 0.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import re
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# Architectures from the models' config.json (hidden_size, intermediate_size, num_attention_heads,
# num_key_value_heads, head_dim); Qwen2.5 has biases on q/k/v.
# fmt: off
MODELS = {
    "llama-3-8b": {"hidden": 4096, "intermediate": 14336, "heads": 32, "kv_heads": 8, "head_dim": 128, "qkv_bias": False},
    "llama-2-7b": {"hidden": 4096, "intermediate": 11008, "heads": 32, "kv_heads": 32, "head_dim": 128, "qkv_bias": False},
    "mistral-7b": {"hidden": 4096, "intermediate": 14336, "heads": 32, "kv_heads": 8, "head_dim": 128, "qkv_bias": False},
    "qwen2.5-7b": {"hidden": 3584, "intermediate": 18944, "heads": 28, "kv_heads": 4, "head_dim": 128, "qkv_bias": True},
}
# fmt: on
M_VALUES = [1, 16, 512, 4096, 8192]
MODES = ["fwd", "bwd", "fwd+bwd"]
VARIANTS = ["ours", "bnb", "bf16"]
SMALL_M = 16  # up to here "fwd" is generation (no autograd)


def projections(cfg: dict) -> list[tuple[str, int, int, bool]]:
    """(name, K = in_features, N = out_features, bias) of one decoder layer's linear layers."""
    h, inter, q, kv = (
        cfg["hidden"],
        cfg["intermediate"],
        cfg["heads"] * cfg["head_dim"],
        cfg["kv_heads"] * cfg["head_dim"],
    )
    b = cfg["qkv_bias"]
    return [
        ("q", h, q, b), ("k", h, kv, b), ("v", h, kv, b), ("o", q, h, False),
        ("gate", h, inter, False), ("up", h, inter, False), ("down", inter, h, False),
    ]  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), help="default: all")
    p.add_argument("--m", nargs="+", type=int, help=f"rows (tokens) per call; default {M_VALUES}")
    p.add_argument("--modes", nargs="+", choices=MODES, help="default: all")
    p.add_argument("--projections", nargs="+", choices=["q", "k", "v", "o", "gate", "up", "down"])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--quick", action="store_true", help="Llama-3-8B, M in 1 512 4096, shorter timing")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    if args.quick:
        args.models = args.models or ["llama-3-8b"]
        args.m = args.m or [1, 512, 4096]
    args.models = args.models or list(MODELS)
    args.m = args.m or M_VALUES
    args.modes = args.modes or MODES
    args.rep_ms = 40 if args.quick else 100
    return args


# ---- the three variants ------------------------------------------------------------------------------


def make_variants(K: int, N: int, bias: bool, rank: int, bnb):
    """{"ours"|"bnb"|"bf16": fn(x) -> y} sharing one random weight, adapter and bias."""
    from qtrain.kernels.nf4_lora_triton import nf4_lora_triton

    from qtrain.nf4 import quantize_nf4

    w16 = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
    a = (torch.randn(rank, K, device="cuda") * 0.02).requires_grad_(True)
    b = (torch.randn(N, rank, device="cuda") * 0.02).requires_grad_(True)
    bias_t = torch.randn(N, device="cuda", dtype=torch.bfloat16) * 0.1 if bias else None
    scale = 2.0
    nf4 = quantize_nf4(w16)

    def lora(x):  # PEFT: x cast to the adapter dtype, result cast back
        return (scale * ((x.to(a.dtype) @ a.T) @ b.T)).to(x.dtype)

    variants = {
        "ours": lambda x: nf4_lora_triton(x, nf4, a, b, scale, bias_t),
        "bf16": lambda x: torch.nn.functional.linear(x, w16, bias_t) + lora(x),
    }
    if bnb is not None:
        packed, state = bnb.functional.quantize_4bit(w16, blocksize=64, compress_statistics=True, quant_type="nf4")
        variants["bnb"] = lambda x: bnb.matmul_4bit(x, packed.t(), quant_state=state, bias=bias_t) + lora(x)
    return variants, [a, b]


def flops(M: int, K: int, N: int, r: int, mode: str) -> float:
    fwd = 2 * M * N * K + 2 * M * r * (K + N)
    bwd = 2 * M * N * K + 4 * M * r * (K + N)  # dX (base + adapter), dA, dB
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def traffic(variant: str, M: int, K: int, N: int, mode: str) -> float:
    """Minimum bytes moved: the weight in the variant's format, bf16 activations in and out."""
    w4 = N * K / 2 + N * K / 64  # packed nibbles + one 8-bit absmax per 64 values
    weight = {"ours": w4, "bnb": w4 + 2 * (2 * N * K), "bf16": 2 * N * K}[variant]  # bnb writes+reads bf16 W
    fwd = weight + 2 * M * K + 2 * M * N
    bwd = weight + 2 * M * N + 2 * 2 * M * K  # dY in; dX out and X again for dA
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def time_mode(fn, params, M: int, K: int, N: int, mode: str, rep_ms: int) -> float:
    """Median milliseconds of one mode of `fn` on fresh bf16 inputs."""
    from triton.testing import do_bench

    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    if mode == "fwd" and M <= SMALL_M:
        with torch.inference_mode():
            return do_bench(lambda: fn(x), rep=rep_ms, return_mode="median")
    x.requires_grad_(True)
    grads = [x, *params]
    if mode == "fwd":
        return do_bench(lambda: fn(x), rep=rep_ms, grad_to_none=grads, return_mode="median")
    if mode == "bwd":
        y = fn(x)
        return do_bench(lambda: y.backward(dy, retain_graph=True), rep=rep_ms, grad_to_none=grads, return_mode="median")
    return do_bench(lambda: fn(x).backward(dy), rep=rep_ms, grad_to_none=grads, return_mode="median")


def check_outputs(variants, K: int) -> dict[str, float]:
    """Relative max error of each variant against bf16 cuBLAS on one batch (guards the timings)."""
    x = torch.randn(64, K, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        ref = variants["bf16"](x).float()
        return {name: ((fn(x).float() - ref).abs().max() / ref.abs().max()).item() for name, fn in variants.items()}


# ---- driver --------------------------------------------------------------------------------------------


def _common():
    """benchmarks/_common.py, loaded by path (benchmarks/ is no package; the tests load this script by path)."""
    spec = importlib.util.spec_from_file_location("qtrain_benchmarks_common", Path(__file__).with_name("_common.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(args) -> dict:
    try:
        import bitsandbytes as bnb
    except ImportError:
        bnb = None
        print("bitsandbytes is not installed: baseline (a) is skipped", file=sys.stderr)
    rows, cache = [], {}
    for model in args.models:
        for proj, K, N, bias in projections(MODELS[model]):
            if args.projections and proj not in args.projections:
                continue
            key = (K, N, bias)
            if key not in cache:  # Mistral-7B shares Llama-3-8B's shapes: measure once
                cache[key] = measure_shape(K, N, bias, args, bnb)
            for m_mode, times, errors in cache[key]:
                rows.append(dict(model=model, proj=proj, K=K, N=N, bias=bias, M=m_mode[0], mode=m_mode[1],
                                 ms=times, max_rel_err=errors, **derived(times, *m_mode, K, N, args.rank)))  # fmt: skip
                print(format_row(rows[-1]), flush=True)
    return {"meta": metadata(args, bnb), "rows": rows}


def measure_shape(K: int, N: int, bias: bool, args, bnb) -> list:
    variants, params = make_variants(K, N, bias, args.rank, bnb)
    errors = check_outputs(variants, K)
    out = []
    for M in args.m:
        for mode in args.modes:
            times = {name: time_mode(fn, params, M, K, N, mode, args.rep_ms) for name, fn in variants.items()}
            out.append(((M, mode), times, errors))
    del variants, params
    torch.cuda.empty_cache()
    return out


def derived(times: dict, M: int, mode: str, K: int, N: int, r: int) -> dict:
    ours = times["ours"]
    return {
        "tflops": {v: flops(M, K, N, r, mode) / (t * 1e9) for v, t in times.items()},
        "gbps": {v: traffic(v, M, K, N, mode) / (t * 1e6) for v, t in times.items()},
        "ours_over_bnb": ours / times["bnb"] if "bnb" in times else None,
        "ours_over_bf16": ours / times["bf16"],
    }


def metadata(args, bnb) -> dict:
    import triton

    return {
        "gpu": torch.cuda.get_device_name(),
        "capability": ".".join(map(str, torch.cuda.get_device_capability())),
        **_common().git_state(ROOT),  # commit, dirty
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "bitsandbytes": getattr(bnb, "__version__", None),
        "rank": args.rank,
        "dtype": "bfloat16",
        "adapter_dtype": "float32",
        "timing": f"triton.testing.do_bench median, rep={args.rep_ms} ms",
    }


def _fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def format_row(r: dict) -> str:
    ms = r["ms"]
    return (
        f"| {r['model']} | {r['proj']} | {r['K']}x{r['N']} | {r['M']} | {r['mode']} | {_fmt(ms.get('ours'))} | "
        f"{_fmt(ms.get('bnb'))} | {_fmt(ms.get('bf16'))} | {_fmt(r['tflops']['ours'], '.1f')} | "
        f"{_fmt(r['gbps']['ours'], '.0f')} | {_fmt(r['ours_over_bnb'], '.2f')} | {_fmt(r['ours_over_bf16'], '.2f')} |"
    )


HEADER = (
    "| model | proj | KxN | M | mode | ours ms | bnb ms | bf16 ms | ours TFLOP/s | ours GB/s | ours/bnb | ours/bf16 |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def write_results(result: dict, out_dir: Path) -> tuple[Path, Path]:
    meta = result["meta"]
    slug = re.sub(r"[^A-Za-z0-9]+", "-", meta["gpu"]).strip("-").lower()
    stem = f"kernels-{slug}-{meta['date'][:10]}-{meta['commit']}"
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(result, indent=1))
    ratios = [r["ours_over_bnb"] for r in result["rows"] if r["ours_over_bnb"] is not None]
    lines = [
        f"# NF4+LoRA kernels on {meta['gpu']} (sm_{meta['capability'].replace('.', '')})",
        "",
        (
            f"commit {_common().describe_commit(meta)}, {meta['date']}; torch {meta['torch']}, triton {meta['triton']}, "
            f"bitsandbytes {meta['bitsandbytes']}; bf16 activations, rank {meta['rank']} fp32 adapter; {meta['timing']}."
        ),
        "Ratios are times (ours / baseline; < 1: ours faster). bnb = bitsandbytes matmul_4bit + LoRA, bf16 = cuBLAS bf16 + LoRA.",
        "",
        HEADER,
        *map(format_row, result["rows"]),
        "",
        f"Median ours/bnb over all rows: {_fmt(statistics.median(ratios), '.2f') if ratios else '-'}",
    ]
    md_path.write_text("\n".join(lines) + "\n")
    return json_path, md_path


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/kernel_speed.py needs a CUDA GPU (torch.cuda.is_available() is False): nothing measured.")
        return 0
    print(HEADER)
    result = run(args)
    for path in write_results(result, args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
