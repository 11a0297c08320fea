"""The ONE backend policy of `qtrain.kernels`: which implementation ("torch" or "triton") an op runs.

Every op (`OPS`) resolves its `backend` argument here, and so does anything above the kernels that
must know in advance what training will run (the memory pre-flight), so that the answer is the same
everywhere. "torch" and "triton" mean themselves; "auto" means triton only when all of:

- the input is on a CUDA device of compute capability >= `MIN_CAPABILITY` (the Triton configs and
  bf16 tensor cores assume Ampere or newer);
- triton >= `MIN_TRITON` is installed (checked from its metadata, without importing it);
- the op's self-check (`OPS[op]`, a `module:function` taking a device) passed on that device: the
  kernels run once on small odd shapes and are compared with the torch path (a guard for GPUs and
  triton versions they were not measured on);
- no Triton kernel has failed to compile or launch on that device in this process
  (`run_triton_or_fall_back` records it).

This module imports no triton (CPU-only installs use it too) and no op module at import: a
self-check's module is imported when "auto" first asks for it on a GPU.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import traceback
import warnings
from collections.abc import Callable

import torch

BACKENDS = ("auto", "torch", "triton")
# triton 3.3.x aborts the process compiling `tl.gather` on 1-D tensors (triton#6958): no Python
# exception to catch, so "auto" never picks Triton below this version (pyproject.toml's floor too).
MIN_TRITON = (3, 4)
MIN_CAPABILITY = (8, 0)

# op -> its self-check, "module:function" (function(device) -> bool). A new Triton op adds one line.
OPS = {
    "nf4_lora": "qtrain.kernels.nf4_lora:triton_self_check",
    "rms_norm": "qtrain.kernels.rms_norm:triton_self_check",
    "rope": "qtrain.kernels.rope:triton_self_check",
    "swiglu": "qtrain.kernels.swiglu:triton_self_check",
    "cross_entropy": "qtrain.kernels.cross_entropy:triton_self_check",
    "linear_cross_entropy": "qtrain.kernels.cross_entropy:triton_self_check",  # its chunks run that kernel
}

# Devices ("cuda:0", ...) on which a Triton kernel failed to compile or launch under backend="auto":
# "auto" uses the torch backend there for the rest of the process.
_TRITON_FAILED: dict[str, str] = {}


@functools.cache
def triton_available() -> bool:
    """Whether triton is installed (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


@functools.cache
def triton_version() -> tuple[int, ...]:
    """The installed triton's (major, minor), read from its metadata without importing it; () if unknown."""
    try:
        parts = importlib.metadata.version("triton").split(".")[:2]
        return tuple(int("".join(c for c in p if c.isdigit()) or 0) for p in parts)
    except importlib.metadata.PackageNotFoundError:
        return ()


def device_capability(device: torch.device | str) -> tuple[int, int]:
    """The CUDA compute capability of `device`; (0, 0) for any other device."""
    device = torch.device(device)
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else (0, 0)


@functools.cache
def interpreting() -> bool:
    """Whether Triton kernels run in its interpreter (TRITON_INTERPRET=1: CPU tensors); False without
    triton. Imports triton only when it is installed: `qtrain.kernels._triton.is_interpreting`."""
    if not triton_available():
        return False
    from qtrain.kernels._triton import is_interpreting

    return is_interpreting()


def resolve_backend(op: str, backend: str, x: torch.Tensor) -> str:
    """The concrete backend ("torch" or "triton") that `backend` means for op `op` on input `x`."""
    return resolve_on_device(op, backend, x.device)


def resolve_on_device(op: str, backend: str, device: torch.device | str) -> str:
    """`resolve_backend` for inputs on `device`, before any exist (the memory pre-flight asks so)."""
    device = torch.device(device)
    if op not in OPS:
        raise KeyError(f"unknown kernel op {op!r}; known: {sorted(OPS)}")
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend {backend!r} is not one of {BACKENDS}")
    if backend != "auto":
        return backend
    if str(device) in _TRITON_FAILED:
        return "torch"
    return "triton" if _auto_may_use_triton(op, device) else "torch"


def _auto_may_use_triton(op: str, device: torch.device) -> bool:
    if not (device.type == "cuda" and triton_available() and triton_version() >= MIN_TRITON):
        return False
    return device_capability(device) >= MIN_CAPABILITY and self_check(op, device)


def self_check(op: str, device: torch.device) -> bool:
    """Whether op `op`'s Triton kernels passed their self-check on `device` (each check caches itself)."""
    module, name = OPS[op].split(":")
    return getattr(importlib.import_module(module), name)(torch.device(device))


def compare_with_torch(what: str, device, run: Callable[[str], list[torch.Tensor]], rtol: float, atol: float) -> bool:
    """A self-check: `run("triton")` against `run("torch")` (lists of tensors, same dtypes, close);
    on an error or a mismatch warn once and return False, so that "auto" uses torch there."""
    try:
        pairs = list(zip(run("torch"), run("triton"), strict=True))
    except Exception as e:  # noqa: BLE001 - any failure means: do not use these kernels here
        warnings.warn(f"qtrain: the Triton {what} failed its self-check on {device} ({e!r}); using torch", stacklevel=2)
        return False
    for ref, got in pairs:
        if got.dtype != ref.dtype or not torch.allclose(got.float(), ref.float(), rtol=rtol, atol=atol):
            warnings.warn(f"qtrain: the Triton {what} disagrees with torch on {device}; using torch", stacklevel=2)
            return False
    return True


# ---- falling back after a Triton error --------------------------------------------------------------


def is_triton_error(exc: BaseException) -> bool:
    """Whether `exc` comes from triton compiling or launching a kernel (CompilationError,
    OutOfResources, PTXASError, an MLIR pass failure...): an exception type defined in triton, or
    any exception raised from inside triton's package. Errors raised by qtrain's own argument
    checks or by torch are not: those are the caller's to see, an out-of-memory error above all
    (raised by an allocation inside triton's code, it is still the trainer's to handle)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return False
    if type(exc).__module__.split(".")[0] == "triton":
        return True
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and _in_triton_package(frames[-1].filename)


def _in_triton_package(filename: str) -> bool:
    spec = importlib.util.find_spec("triton") if triton_available() else None
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    return any(filename.startswith(root) for root in roots)


def triton_error_hint(exc: BaseException) -> str:
    """One line for the user: what failed and what to do."""
    version = ".".join(map(str, triton_version())) or "?"
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    return (
        f"Triton {version} could not compile or run qtrain's NF4 kernels ({type(exc).__name__}: {first}); "
        f"use backend 'torch' (model.backend: torch), or triton >= {'.'.join(map(str, MIN_TRITON))}"
    )


def run_triton_or_fall_back(
    triton_call: Callable[[], torch.Tensor], torch_call: Callable[[], torch.Tensor], fall_back: bool, device
) -> torch.Tensor:
    """`triton_call()`, or on a Triton compile/launch error: with `fall_back` (backend "auto") warn
    once, use the torch backend on `device` for the rest of the process and return `torch_call()`;
    without it (backend "triton" asked for by name) raise RuntimeError with a one-line hint."""
    key = str(device)
    if fall_back and key in _TRITON_FAILED:
        return torch_call()
    try:
        return triton_call()
    except Exception as exc:
        if not is_triton_error(exc):
            raise
        if not fall_back:
            raise RuntimeError(triton_error_hint(exc)) from exc
        _TRITON_FAILED[key] = repr(exc)
        warnings.warn(f"qtrain: {triton_error_hint(exc)}. Using the torch backend on {key} from now on", stacklevel=2)
    return torch_call()
