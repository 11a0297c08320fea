"""What the NF4 GPU benchmarks share (kernel_speed.py, dequant.py, probe.py, int32_probe.py): the table of
our NF4+LoRA paths by dotted name, the same 4-bit codes for qtrain and bitsandbytes, timing, metadata.

Our paths are named, not imported: `resolve` imports each at run time and turns a failure into a
reason, so a benchmark run on a commit that lacks a path reports it "unavailable (...)" and goes on.
bitsandbytes gets the SAME codes as qtrain (`bnb_weight`: our NF4Tensor through the state-dict keys
bitsandbytes itself writes, `qtrain.nf4.to_bnb_state_dict`, into a bnb `QuantState`): comparing
kernels on identical 4-bit codes shows kernel errors that the ~10% quantization error of a
comparison with the unquantized weight would hide.

`--dry` (every script): tiny shapes, every code path of the script, JSON included, in seconds; no
GPU needed. Without one the Triton kernels run under the interpreter on CPU (`setup` sets
TRITON_INTERPRET=1 before triton is first imported; bitsandbytes imports triton) with fp16
autocast instead of bf16 (the interpreter's `tl.dot` on bf16 operands returns garbage).

benchmarks/ is no package: scripts load this file by path (`_load("_nf4bench")`).
"""

from __future__ import annotations

import datetime as dt
import importlib
import importlib.util
import json
import os
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Our NF4+LoRA paths, each `(x, weight, lora_a, lora_b, scale, bias=None, dropout=0.0, training=False) -> y`,
# by "module:function" and the largest M the path takes (None: any).
PATHS = {
    "torch": ("qtrain.kernels.nf4_lora:nf4_lora_torch", None),
    "fused": ("qtrain.kernels.nf4_lora_triton:nf4_lora_triton", None),
    "dequant": ("qtrain.kernels.nf4_matmul:nf4_lora_dequant", None),
    "gemv": ("qtrain.kernels.nf4_gemv:nf4_lora_gemv", 16),
    "dispatch": ("qtrain.kernels.nf4_dispatch:nf4_lora_dispatch", None),
}

# Architectures from the models' config.json; Qwen2.5 has biases on q/k/v.
# fmt: off
MODELS = {
    "llama-3-8b": {"hidden": 4096, "intermediate": 14336, "heads": 32, "kv_heads": 8, "head_dim": 128, "qkv_bias": False},
    "llama-2-7b": {"hidden": 4096, "intermediate": 11008, "heads": 32, "kv_heads": 32, "head_dim": 128, "qkv_bias": False},
    "mistral-7b": {"hidden": 4096, "intermediate": 14336, "heads": 32, "kv_heads": 8, "head_dim": 128, "qkv_bias": False},
    "qwen2.5-7b": {"hidden": 3584, "intermediate": 18944, "heads": 28, "kv_heads": 4, "head_dim": 128, "qkv_bias": True},
}
# fmt: on
# (name, K, N, bias), interpreter-sized. K a multiple of 64 as in every real model: bitsandbytes 0.50's CPU
# dequantize_4bit restarts the 64-value blocks at each row of a 2-D shape (qtrain/nf4.py), wrong otherwise.
DRY_SHAPES = [("dry-a", 128, 80, False), ("dry-b", 192, 48, True)]


def projections(cfg: dict) -> list[tuple[str, int, int, bool]]:
    """(name, K = in_features, N = out_features, bias) of one decoder layer's linear layers."""
    h, inter = cfg["hidden"], cfg["intermediate"]
    q, kv, b = cfg["heads"] * cfg["head_dim"], cfg["kv_heads"] * cfg["head_dim"], cfg["qkv_bias"]
    return [
        ("q", h, q, b), ("k", h, kv, b), ("v", h, kv, b), ("o", q, h, False),
        ("gate", h, inter, False), ("up", h, inter, False), ("down", inter, h, False),
    ]  # fmt: skip


# ---- environment ---------------------------------------------------------------------------------


def setup(dry: bool):
    """(device, compute dtype) for a run: the GPU and bf16, or with `dry` and no GPU the CPU and fp16
    under the Triton interpreter. None when there is no GPU and `dry` is off (nothing to measure)."""
    import torch  # torch does not import triton

    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    if not dry:
        return None
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before bitsandbytes or qtrain.kernels import triton
    return torch.device("cpu"), torch.float16


def resolve(dotted: str):
    """(function, None), or (None, "unavailable (<why>)") when `module:function` does not import here."""
    module_name, _, attr = dotted.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr), None
    except (ImportError, AttributeError) as e:
        return None, f"unavailable ({type(e).__name__}: {e})"


def our_paths(names=None) -> tuple[dict, dict]:
    """({name: fn} of the paths that import, {name: reason} of those that do not)."""
    found, missing = {}, {}
    for name in names or PATHS:
        fn, why = resolve(PATHS[name][0])
        if fn is None:
            missing[name] = why
        else:
            found[name] = fn
    return found, missing


def path_takes(name: str, M: int) -> bool:
    max_m = PATHS[name][1] if name in PATHS else None
    return max_m is None or M <= max_m


def load_bnb():
    """bitsandbytes, or None when it is missing or broken (its CPU warning kept off the console)."""
    from qtrain.nf4 import bitsandbytes_ops

    if bitsandbytes_ops() is None:
        return None
    import bitsandbytes

    return bitsandbytes


def bnb_weight(nf4, dtype=None):
    """(packed uint8 [n/2, 1], QuantState) for bitsandbytes from our NF4Tensor: the same codes, through
    the state-dict keys bitsandbytes' Linear4bit writes. `dtype` (default: the quantized weight's) is
    what bitsandbytes dequantizes to: the compute dtype, as a Linear4bit with that compute dtype."""
    from bitsandbytes.functional import QuantState

    from qtrain.nf4 import to_bnb_state_dict

    state = to_bnb_state_dict(nf4, "weight")
    packed = state.pop("weight")
    quant_state = QuantState.from_dict(state, nf4.device)
    quant_state.dtype = dtype or nf4.dtype
    return packed, quant_state


def make_layer(K: int, N: int, rank: int, bias: bool, device, dtype, seed: int = 0) -> dict:
    """A random NF4 linear with a LoRA adapter: nf4 (quantized from a bf16 N(0, 0.02) weight), w
    (its dequantized codes in `dtype`), a [r, K] and b [N, r] fp32 (as PEFT keeps them; b not zero, so
    every gradient is non-trivial), bias [N] in `dtype` or None, scale."""
    import torch

    from qtrain.nf4 import dequantize_nf4, quantize_nf4

    g = torch.Generator(device="cpu").manual_seed(seed)
    w = (torch.randn(N, K, generator=g) * 0.02).to(device, torch.bfloat16)  # [N, K]
    nf4 = quantize_nf4(w)
    a = (torch.randn(rank, K, generator=g) / K**0.5).to(device)  # [r, K]
    b = (torch.randn(N, rank, generator=g) * 0.02).to(device)  # [N, r]
    bias_t = (torch.randn(N, generator=g) * 0.1).to(device, dtype) if bias else None
    return {"nf4": nf4, "w": dequantize_nf4(nf4, dtype), "a": a, "b": b, "bias": bias_t, "scale": 2.0}


def inputs(M: int, K: int, N: int, device, dtype, seed: int = 1):
    """x [M, K] and dy [M, N] in `dtype` (what a decoder layer hands the projection under autocast)."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    return (torch.randn(M, K, generator=g).to(device, dtype), (torch.randn(M, N, generator=g) * 0.1).to(device, dtype))


# ---- measuring -----------------------------------------------------------------------------------


class Timer:
    """Median milliseconds of `fn()`: CUDA events on a GPU, each repetition after an L2 flush (outside
    the timed interval: a 4-bit weight that fits in L2 must not look faster than it is); perf_counter on CPU."""

    def __init__(self, device, warmup: int, reps: int):
        import torch

        self.device, self.warmup, self.reps = device, warmup, reps
        self.flush = torch.empty(256 << 20, dtype=torch.uint8, device=device) if device.type == "cuda" else None

    def __call__(self, fn) -> float:
        import torch

        for _ in range(self.warmup):
            fn()
        if self.flush is None:
            times = []
            for _ in range(self.reps):
                start = time.perf_counter()
                fn()
                times.append((time.perf_counter() - start) * 1e3)
            return statistics.median(times)
        events = []
        for _ in range(self.reps):
            self.flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in events)


def max_errors(got, ref) -> dict:
    """{"max_abs": max |got - ref|, "max_rel": that over max |ref|} in fp32."""
    d = (got.float() - ref.float()).abs().max().item() if got.numel() else 0.0
    scale = ref.float().abs().max().item() if ref.numel() else 0.0
    return {"max_abs": d, "max_rel": d / scale if scale else d}


def error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


def metadata(device, dtype, dry: bool, **extra) -> dict:
    """GPU (or CPU) name, versions, commit ($COMMIT, else git), date and the run's settings."""
    import torch

    spec = importlib.util.spec_from_file_location("qtrain_benchmarks_common", Path(__file__).with_name("_common.py"))
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    git = common.git_state(ROOT)
    if os.environ.get("COMMIT"):
        git = {"commit": os.environ["COMMIT"], "dirty": git.get("dirty")}
    versions = {}
    for name in ("triton", "bitsandbytes"):
        try:
            versions[name] = importlib.import_module(name).__version__
        except ImportError:
            versions[name] = None
    cuda = device.type == "cuda"
    return {
        "device": torch.cuda.get_device_name(device) if cuda else common.cpu_name(),
        "capability": ".".join(map(str, torch.cuda.get_device_capability(device))) if cuda else None,
        **git,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        **versions,
        "dtype": str(dtype).removeprefix("torch."),
        "dry": dry,
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        **extra,
    }


def write_json(path: Path | None, result: dict) -> None:
    """Write `result` to `path` (temp file, then rename: a step killed mid-write leaves the last whole file)."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str))
    tmp.replace(path)


def fmt(x, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)
