"""Compile qtrain's Triton kernels for NVIDIA GPUs without one: registers, spills, shared memory.

    python benchmarks/compile_kernels.py                    # every autotune config, sm_80 86 89 90, bf16
    python benchmarks/compile_kernels.py --arch 90 --dtypes bf16 fp16 fp32
    python benchmarks/compile_kernels.py --quick            # one config per kernel (the test suite's check)
    python benchmarks/compile_kernels.py --shape 8192 28672 4096 16   # M N K r of the launches to mimic

Kernels are compiled as the runtime compiles them for a real launch (default: Llama-3-8B's gate
projection, M=4096 N=14336 K=4096 r=16; M=1 for the small-M path): the same argument values the
launchers pass, specialised by triton's rules (`specialize`: an int equal to 1 becomes a
constant, ints and pointers divisible by 16 get `tt.divisibility=16`, large ints are i64), so
that vectorisation, registers and spills are those of the kernels that will run.

Uses triton's own compiler and the ptxas it ships (no driver, no GPU): it catches what the CPU
interpreter cannot (code that interprets but does not compile, layouts, shared memory over a GPU's
limit) and gives ptxas's resource usage, the only performance signal available without a GPU. It
says nothing about speed. Exit status 1 if any compile fails. Not a timing benchmark: see kernel_speed.py.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from typing import NamedTuple

if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)  # compile for real, before triton is imported

import torch
import triton
import triton.language as tl
from qtrain.kernels import nf4_dequant, nf4_gemv
from qtrain.kernels import nf4_lora_triton as lt
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TL_DTYPES = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32}
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}  # bytes a block may use (opt-in maximum)
DEFAULT_SHAPE = (4096, 14336, 4096, 16)  # M N K r: Llama-3-8B gate at 4k tokens per micro-batch, rank 16


class Pointer(NamedTuple):
    """A tensor argument as the launcher sees it: its element type (torch allocations are 256-byte aligned)."""

    ty: str


def specialize(value) -> tuple[str, str | None]:
    """(type, specialisation) of one non-constexpr argument, by the rules of triton's launcher
    (`native_specialize_impl` with the CUDA backend, which keeps BaseBackend's): ints equal to 1 become constexprs, ints
    and pointers divisible by 16 are marked "D" (tt.divisibility=16), ints past int32 are i64."""
    if isinstance(value, Pointer):
        return "*" + value.ty, "D"
    if isinstance(value, bool):
        return "u1", None
    if isinstance(value, int):
        if value == 1:
            return "constexpr", 1
        ty = "i32" if -(2**31) <= value < 2**31 else ("u64" if value >= 2**63 else "i64")
        return ty, "D" if value % 16 == 0 else ""
    if isinstance(value, float):
        return "fp32", None
    raise TypeError(f"no triton specialisation for {value!r}")


def launch_args(kernel: str, dtype: str, M: int, N: int, K: int, r: int) -> dict:
    """The non-constexpr arguments the launchers (nf4_dequantize_triton, nf4_gemv, nf4_lora_fwd,
    _fwd_small_m, nf4_lora_bwd_dx) pass for contiguous activations of `dtype`, an fp32 adapter of rank r and a double-quantized
    NF4 weight [N, K], by argument name."""
    nf4 = {"packed_ptr": Pointer("u8"), "absmax_ptr": Pointer("u8"), "absmax_code_ptr": Pointer("fp32"),
           "absmax_scale_ptr": Pointer("fp32"), "code_ptr": Pointer("fp32"), "absmax_offset": 0.5, "scale": 2.0}  # fmt: skip
    act, f32 = Pointer(dtype), Pointer("fp32")
    table = {k: v for k, v in nf4.items() if k not in ("code_ptr", "scale")} | {"pairs_ptr": Pointer("i64")}
    if kernel == "dequant":
        return {**table, "out_ptr": act, "n": N * K, "n_blocks": N * K // 64}
    if kernel == "gemv":
        return {
            **table,
            "x_ptr": act,
            "bias_ptr": act,
            "y_ptr": act,
            "M": M,
            "N": N,
            "K": K,
            "stride_xm": K,
            "stride_ym": N,
        }
    if kernel == "bwd":
        return {**nf4, "dy_ptr": act, "dyb_ptr": f32, "a_ptr": f32, "dx_ptr": act, "M": M, "N": N, "K": K, "R": r,
                "M_BUCKET": lt.m_bucket(M), "stride_dym": N, "stride_dybm": r, "stride_ar": K, "stride_dxm": K}  # fmt: skip
    lora = {"x_ptr": act, "xa_ptr": f32, "b_ptr": f32, "bias_ptr": act, "M": M, "N": N, "K": K, "R": r,
            "stride_xm": K, "stride_xam": r, "stride_bn": r, "stride_br": 1}  # fmt: skip
    if kernel == "small_m":
        _, per_split = lt._split_k(N, K, torch.device("cpu"))
        return {**nf4, **lora, "part_ptr": f32, "K_PER_SPLIT": per_split}
    return {**nf4, **lora, "y_ptr": act, "M_BUCKET": lt.m_bucket(M), "stride_ym": N}


def runtime_source(fn, args: dict, consts: dict) -> ASTSource:
    """`fn` with the signature, constexprs and attributes triton's launcher derives from `args`."""
    signature, constexprs, attrs = {}, dict(consts), {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            signature[name] = "constexpr"
            continue
        ty, spec = specialize(args[name])
        signature[name] = ty
        if ty == "constexpr":
            constexprs[name] = args[name]
        elif spec is not None:
            attrs[(i,)] = [["tt.divisibility", 16]] if "D" in spec else []
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)


def jobs(dtype: str, quick: bool, shape: tuple[int, int, int, int] = DEFAULT_SHAPE):
    """(name, kernel, constexprs, num_warps, num_stages, launch args) for every config of every kernel."""
    dot = TL_DTYPES[dtype]
    M, N, K, r = shape
    common = {"BLOCKSIZE": 64, "ABSMAX_BLOCKSIZE": 256, "DOUBLE_QUANT": True, "ALIGNED": K % 64 == 0, "HAS_LORA": True,
              "R_BLOCK": min(max(16, triton.next_power_of_2(r)), 32), "DOT_DTYPE": dot,
              "PRECISION": "ieee" if dtype == "fp32" else "tf32", "LORA_PRECISION": lt.LORA_PRECISION}  # fmt: skip
    args = {kind: launch_args(kind, dtype, M, N, K, r) for kind in ("dequant", "fwd", "bwd")}
    args["small_m"] = launch_args("small_m", dtype, 1, N, K, r)
    gemv_ms = (1, nf4_gemv.MAX_ROWS)  # decode, and a full chunk of rows
    fwd = lt._FWD_COMMON + lt._FWD_BIG_SMEM
    bwd = lt._BWD_COMMON + lt._BWD_BIG_SMEM
    small = lt._SMALL_M_CONFIGS
    if quick:
        fwd, bwd, small = fwd[:1], bwd[:1], small[:1]
    nf4 = {k: common[k] for k in ("BLOCKSIZE", "ABSMAX_BLOCKSIZE", "DOUBLE_QUANT")}
    yield "dequant", nf4_dequant._nf4_dequant_kernel, {**nf4, "BLOCKS": nf4_dequant._DEQUANT_ELEMENTS // 64}, 4, 3, args["dequant"]  # fmt: skip
    for m in gemv_ms:
        tiles = {k: v for k, v in nf4_gemv.gemv_config(m, 64).items() if k != "num_warps"}
        consts = {**nf4, "ALIGNED": K % 64 == 0, "HAS_BIAS": False, **tiles}
        yield f"gemv {tiles['BLOCK_M']}x{tiles['BLOCK_N']}x{tiles['BLOCK_K']}", nf4_gemv._nf4_gemv_kernel, consts, 4, 3, launch_args("gemv", dtype, m, N, K, r)  # fmt: skip
    for bm, bn, bk, w, s in fwd:
        tiles = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}
        yield f"fwd {bm}x{bn}x{bk}", lt._nf4_lora_fwd_kernel, {**common, "HAS_BIAS": False, **tiles}, w, s, args["fwd"]
    for bm, bn, bk, w, s in bwd:
        tiles = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}
        yield f"bwd {bm}x{bn}x{bk}", lt._nf4_lora_bwd_kernel, {**common, **tiles}, w, s, args["bwd"]
    for bn, bk, w, s in small:
        tiles = {"BLOCK_M": lt.SMALL_M, "BLOCK_N": bn, "BLOCK_K": bk}
        yield f"small_m {lt.SMALL_M}x{bn}x{bk}", lt._nf4_lora_fwd_small_m_kernel, {**common, "HAS_BIAS": False, **tiles}, w, s, args["small_m"]  # fmt: skip


def resources(kernel) -> str:
    """ptxas's registers and spill stack per thread, read back from the cubin with cuobjdump."""
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True, check=False)
    m = re.search(r"REG:(\d+).*?STACK:(\d+)", out.stdout)
    return f"regs={m.group(1)} spill_stack={m.group(2)}B" if m else "regs=?"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", nargs="+", type=int, default=[80, 86, 89, 90], help="compute capabilities, e.g. 80 90")
    p.add_argument("--dtypes", nargs="+", choices=sorted(TL_DTYPES), default=["bf16"])
    p.add_argument("--quick", action="store_true", help="the first config of each kernel only")
    p.add_argument("--shape", nargs=4, type=int, default=list(DEFAULT_SHAPE), metavar=("M", "N", "K", "R"),
                   help="the launch to mimic (the small-M kernel uses M=1)")  # fmt: skip
    args = p.parse_args(argv)
    failures = 0
    for arch in args.arch:
        target = GPUTarget("cuda", arch, 32)
        for dtype in args.dtypes:
            for name, fn, consts, warps, stages, launch in jobs(dtype, args.quick, tuple(args.shape)):
                tag = f"sm_{arch} {dtype} {name} w{warps} s{stages}"
                src = runtime_source(fn, launch, consts)
                options = {"num_warps": warps, "num_stages": stages, "enable_fp_fusion": False}
                try:
                    kernel = triton.compile(src, target=target, options=options)
                except Exception as exc:  # noqa: BLE001 - report every failure, then exit 1
                    failures += 1
                    print(f"{tag}: FAILED {type(exc).__name__}: {exc}", flush=True)
                    continue
                smem = kernel.metadata.shared
                over = (
                    " (over this GPU's shared memory: skipped by the autotuner)"
                    if smem > SMEM_LIMIT.get(arch, smem)
                    else ""
                )
                print(f"{tag}: {resources(kernel)} smem={smem}B{over}", flush=True)
    print(f"{failures} failed" if failures else "all compiled")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
