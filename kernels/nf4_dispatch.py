"""Which NF4+LoRA path runs for an M x N x K product: GEMV (decode), fused (mid M) or dequant (training).

Why three: dequantizing inside the GEMM main loop (the fused kernel, `nf4_lora_triton`) redoes the
dequantization M / BLOCK_M times and leaves the MMA idle meanwhile: it wins only while the weight's
4-bit read dominates. At training sizes, dequantizing W once into a 16-bit buffer and calling cuBLAS
(`nf4_matmul.nf4_lora_dequant`) costs a few percent of the GEMM. For M <= 16 a GEMV-style kernel
without tensor cores (`nf4_gemv.nf4_lora_gemv`) reads the 4-bit weight at memory speed.

`choose_path(M, N, K, device)`: "gemv" for M <= 16 (or the measured GEMV limit), "dequant" for M at
or above the crossover, "fused" in between. Crossovers: measured per (GPU, N, K) by `tune` (`qtrain
kernels tune`), cached as JSON under $XDG_CACHE_HOME/qtrain/kernels/ (default ~/.cache), one file per
GPU name + torch + triton version; else the defaults below, by compute capability, which are NOT
MEASURED YET (from issue 16's compile-only analysis of the fused kernel: break-even near M 128-256 on
H100, ~600 on an RTX 4090). Plain CPU (no Triton interpreter): only the dequant path runs there.

Shapes: X [M, K], W [N, K] (NF4), Y [M, N].
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from qtrain.kernels.backend import MIN_CAPABILITY, device_capability, interpreting, triton_available
from qtrain.kernels.nf4 import NF4Tensor

__all__ = [
    "DEFAULT_CROSSOVER",
    "GEMV_MAX_M",
    "PATHS",
    "cache_path",
    "choose_path",
    "crossover",
    "gemv_max_m",
    "load_tuning",
    "nf4_lora_dispatch",
    "path_function",
    "projection_shapes",
    "save_tuning",
    "tune",
]

PATHS = ("gemv", "fused", "dequant")
GEMV_MAX_M = 16  # rows up to which the GEMV kernel runs by default (it handles X 16 rows at a time)
# NOT MEASURED YET: M from which dequant + cuBLAS beats the fused kernel, by compute capability,
# from issue 16's analysis (sm_90 ~128-256, sm_89 ~600); `qtrain kernels tune` measures the real ones.
DEFAULT_CROSSOVER = {(9, 0): 256, (8, 9): 600, (8, 6): 512, (8, 0): 256}
FALLBACK_CROSSOVER = 512  # other GPUs (and the interpreter)
CACHE_VERSION = 1
TUNE_MS = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # M measured for the fused/dequant crossover
TUNE_SMALL_MS = (1, 2, 4, 8, 16)  # M measured for GEMV against the fused kernel's small-M path


# ---- the cache of measured crossovers --------------------------------------------------------------


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qtrain" / "kernels"


def cache_path(device: torch.device | str) -> Path:
    """The JSON file of `device`'s measurements: one per GPU name + torch and triton versions."""
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", f"{device_name(device)}-torch{torch.__version__}-triton{_version('triton')}")
    return cache_dir() / f"nf4-dispatch-{slug.strip('-')}.json"


_LOADED: dict[str, dict[tuple[int, int], dict]] = {}  # path -> {(N, K): entry}; read once per process


def _valid_entry(entry) -> bool:
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("crossover"), int)
        and entry["crossover"] >= 1
        and isinstance(entry.get("gemv_max_m"), int)
        and 0 <= entry["gemv_max_m"] <= GEMV_MAX_M
    )


def _parse(text: str) -> dict[tuple[int, int], dict]:
    data = json.loads(text)
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("shapes"), dict):
        raise ValueError(f"not a version-{CACHE_VERSION} qtrain dispatch cache")
    shapes = {}
    for key, entry in data["shapes"].items():
        n, _, k = key.partition("x")
        if not (n.isdigit() and k.isdigit() and _valid_entry(entry)):
            raise ValueError(f"bad entry {key!r}: {entry!r}")
        shapes[int(n), int(k)] = entry
    return shapes


def load_tuning(device: torch.device | str) -> dict[tuple[int, int], dict]:
    """{(N, K): {"crossover", "gemv_max_m", ...}} measured on `device`, or {} (no file, or a bad one:
    warned about once, naming the file, then ignored)."""
    path = cache_path(device)
    key = str(path)
    if key not in _LOADED:
        try:
            _LOADED[key] = _parse(path.read_text())
        except FileNotFoundError:
            _LOADED[key] = {}
        except (OSError, ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
            warnings.warn(f"qtrain: ignoring the kernel dispatch cache {path} ({e}); run `qtrain kernels tune` to rewrite it")
            _LOADED[key] = {}
    return _LOADED[key]


def forget_loaded() -> None:
    """Read the cache files again on next use (tests, or after another process tuned)."""
    _LOADED.clear()


def save_tuning(device: torch.device | str, results: dict[tuple[int, int], dict]) -> Path:
    """Merge `results` into `device`'s cache file, written atomically (temp file + os.replace)."""
    path = cache_path(device)
    shapes = {**load_tuning(device), **results}
    payload = {
        "version": CACHE_VERSION,
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "shapes": {f"{n}x{k}": entry for (n, k), entry in sorted(shapes.items())},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _LOADED[str(path)] = shapes
    return path


# ---- the choice ------------------------------------------------------------------------------------


def crossover(N: int, K: int, device: torch.device | str) -> int:
    """The M from which the dequant path runs for an [N, K] weight on `device` (measured, else default)."""
    device = torch.device(device)
    measured = load_tuning(device).get((N, K))
    if measured is not None:
        return measured["crossover"]
    return DEFAULT_CROSSOVER.get(device_capability(device), FALLBACK_CROSSOVER)


def gemv_max_m(N: int, K: int, device: torch.device | str) -> int:
    """The largest M the GEMV path takes for an [N, K] weight on `device` (measured, else 16)."""
    measured = load_tuning(torch.device(device)).get((N, K))
    return measured["gemv_max_m"] if measured is not None else GEMV_MAX_M


def _triton_runs_on(device: torch.device) -> bool:
    if device.type == "cuda":
        return triton_available() and device_capability(device) >= MIN_CAPABILITY
    return device.type == "cpu" and interpreting()


def choose_path(M: int, N: int, K: int, device: torch.device | str) -> str:
    """"gemv", "fused" or "dequant" for X [M, K] @ W [N, K]^T on `device`."""
    device = torch.device(device)
    if not _triton_runs_on(device):
        return "dequant"  # plain CPU, pre-Ampere GPUs, no triton: the one path that needs no Triton kernel
    if M <= gemv_max_m(N, K, device):
        return "gemv"
    if M >= crossover(N, K, device):
        return "dequant"
    return "fused"


def path_function(path: str) -> Callable:
    """The NF4+LoRA function of `path` (imported lazily: gemv and fused need triton)."""
    if path == "dequant":
        from qtrain.kernels.nf4_matmul import nf4_lora_dequant

        return nf4_lora_dequant
    if path == "gemv":
        from qtrain.kernels.nf4_gemv import nf4_lora_gemv

        return nf4_lora_gemv
    if path == "fused":
        from qtrain.kernels.nf4_lora_triton import nf4_lora_triton

        return nf4_lora_triton
    raise ValueError(f"path must be one of {PATHS}, got {path!r}")


def nf4_lora_dispatch(
    x: torch.Tensor,
    weight: NF4Tensor,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    scale: float,
    bias: torch.Tensor | None = None,
    dropout: float = 0.0,
    training: bool = False,
    *,
    fall_back: bool = False,
) -> torch.Tensor:
    """`X @ dequant(W)^T + s * (dropout(X) @ A^T) @ B^T + bias` on the path `choose_path` picks; x [..., K].
    `fall_back` (backend "auto"): a Triton error in a backward falls back to torch (see each path)."""
    K, N = x.shape[-1], weight.shape[0]
    M = x.numel() // K if K else 0
    fn = path_function(choose_path(M, N, K, x.device))
    return fn(x, weight, lora_a, lora_b, scale, bias, dropout, training, fall_back=fall_back)


# ---- measuring -------------------------------------------------------------------------------------


def projection_shapes(hidden: int, intermediate: int, heads: int, kv_heads: int, head_dim: int | None = None) -> dict[str, tuple[int, int]]:
    """{name: (N, K)} of a Llama-style decoder layer's projections, fused q/k/v and gate/up included."""
    head_dim = head_dim or hidden // heads
    q, kv = heads * head_dim, kv_heads * head_dim
    return {
        "q": (q, hidden),
        "k/v": (kv, hidden),
        "o": (hidden, q),
        "gate/up": (intermediate, hidden),
        "down": (hidden, intermediate),
        "qkv": (q + 2 * kv, hidden),
        "gate_up": (2 * intermediate, hidden),
    }


def _first_win(ms: Iterable[int], wins: dict[int, bool]) -> int | None:
    """The smallest M from which `wins` holds for every larger measured M, or None."""
    ms = sorted(ms)
    for i, m in enumerate(ms):
        if all(wins[n] for n in ms[i:]):
            return m
    return None


def crossovers_from_timings(timings: dict[str, dict[int, float]]) -> dict:
    """{"crossover", "gemv_max_m", "timings_ms"} from {path: {M: ms}}: dequant from the first M after
    which it is never slower than fused; GEMV up to the last M (from 1) at which it is never slower."""
    fused, dequant, gemv = timings["fused"], timings["dequant"], timings.get("gemv", {})
    mid = [m for m in dequant if m in fused and m > GEMV_MAX_M]
    first = _first_win(mid, {m: dequant[m] <= fused[m] for m in mid})
    if first is None:
        first = 2 * max(mid) if mid else FALLBACK_CROSSOVER  # dequant never won: past what was measured
    gemv_max = 0
    for m in sorted(m for m in gemv if m in fused):
        if gemv[m] > fused[m]:
            break
        gemv_max = m
    return {"crossover": int(first), "gemv_max_m": int(gemv_max), "timings_ms": {p: {str(m): t for m, t in ts.items()} for p, ts in timings.items()}}


def _cuda_measure(device: torch.device, dtype: torch.dtype, rank: int, rep_ms: float):
    """measure(path, M, N, K) -> ms: forward + backward (forward only for M <= 16, where decode runs
    without gradients) of one NF4+LoRA projection with `triton.testing.do_bench`."""
    from qtrain.kernels.nf4 import quantize_nf4
    from triton.testing import do_bench

    weights: dict[tuple[int, int], tuple] = {}

    def measure(path: str, M: int, N: int, K: int) -> float:
        if (N, K) not in weights:
            weights.clear()  # one weight alive at a time
            g = torch.Generator(device=device).manual_seed(0)
            w = quantize_nf4(torch.randn(N, K, device=device, generator=g, dtype=dtype) * 0.02)
            a = (torch.randn(rank, K, device=device, generator=g) * 0.01).requires_grad_(True)
            b = (torch.randn(N, rank, device=device, generator=g) * 0.01).requires_grad_(True)
            weights[N, K] = (w, a, b)
        w, a, b = weights[N, K]
        fn = path_function(path)
        x = torch.randn(M, K, device=device, dtype=dtype)
        if M <= GEMV_MAX_M:
            def step():
                with torch.no_grad():
                    fn(x, w, a, b, 2.0)
        else:
            x.requires_grad_(True)
            dy = torch.randn(M, N, device=device, dtype=dtype)

            def step():
                fn(x, w, a, b, 2.0).backward(dy)

        step()  # compile / autotune outside the timing
        return float(do_bench(step, rep=rep_ms, grad_to_none=[x, a, b]))

    return measure


def tune(
    device: torch.device | str,
    shapes: Iterable[tuple[int, int]],
    rank: int = 16,
    rep_ms: float = 100.0,
    dtype: torch.dtype = torch.bfloat16,
    ms: Iterable[int] = TUNE_MS,
    small_ms: Iterable[int] = TUNE_SMALL_MS,
    measure: Callable[[str, int, int, int], float] | None = None,
    save: bool = True,
) -> dict[tuple[int, int], dict]:
    """Time fused vs dequant (M in `ms`) and GEMV vs fused (M in `small_ms`) for each (N, K) weight
    shape on `device`; returns {(N, K): {"crossover", "gemv_max_m", "timings_ms"}} and (save) merges
    it into the cache file. `measure(path, M, N, K) -> ms` replaces the CUDA timing (tests)."""
    device = torch.device(device)
    if measure is None:
        if device.type != "cuda":
            raise RuntimeError(f"tuning measures CUDA kernels; {device} is not a CUDA device")
        measure = _cuda_measure(device, dtype, rank, rep_ms)
    results = {}
    for N, K in shapes:
        timings: dict[str, dict[int, float]] = {"gemv": {}, "fused": {}, "dequant": {}}
        for M in small_ms:
            timings["gemv"][M] = measure("gemv", M, N, K)
            timings["fused"][M] = measure("fused", M, N, K)
        for M in ms:
            timings["fused"][M] = measure("fused", M, N, K)
            timings["dequant"][M] = measure("dequant", M, N, K)
        results[N, K] = crossovers_from_timings(timings)
    if save:
        save_tuning(device, results)
    return results
