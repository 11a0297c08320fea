"""Compile qtrain's Triton kernels for NVIDIA GPUs without one: registers, spills, shared memory.

    python benchmarks/compile_kernels.py                    # every autotune config, sm_80 86 89 90, bf16
    python benchmarks/compile_kernels.py --arch 90 --dtypes bf16 fp16 fp32
    python benchmarks/compile_kernels.py --quick            # one config per kernel (the test suite's check)

Uses triton's own compiler and the ptxas it ships (no driver, no GPU): it catches what the CPU
interpreter cannot (code that interprets but does not compile, layouts, shared memory over a GPU's
limit) and gives ptxas's resource usage, the only performance signal available without a GPU. It
says nothing about speed. Exit status 1 if any compile fails. Not a timing benchmark: see kernels.py.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # compile for real, before triton is imported

import triton
import triton.language as tl
from qtrain.kernels import nf4_dequant
from qtrain.kernels import nf4_lora_triton as lt
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TL_DTYPES = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32}
FLOAT_ARGS = {"absmax_offset", "scale"}
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}  # bytes a block may use (opt-in maximum)


def arg_types(fn, dtype: str, consts: dict) -> dict:
    """Triton signature of `fn`: activations in `dtype`, adapter fp32, double-quantized NF4 state."""
    ptrs = {"packed_ptr": "*u8", "absmax_ptr": "*u8", "xa_ptr": "*fp32", "b_ptr": "*fp32", "dyb_ptr": "*fp32",
            "a_ptr": "*fp32", "part_ptr": "*fp32"}  # fmt: skip
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = ptrs.get(name, "*fp32" if "code" in name or "scale" in name else f"*{dtype}")
        else:
            sig[name] = "fp32" if name in FLOAT_ARGS else "i32"
    return sig


def jobs(dtype: str, quick: bool):
    """(name, kernel, constexprs, num_warps, num_stages) for every config of every kernel."""
    dot = TL_DTYPES[dtype]
    common = {"BLOCKSIZE": 64, "ABSMAX_BLOCKSIZE": 256, "DOUBLE_QUANT": True, "ALIGNED": True, "HAS_LORA": True,
              "R_BLOCK": 16, "DOT_DTYPE": dot, "PRECISION": "ieee" if dtype == "fp32" else "tf32",
              "LORA_PRECISION": "ieee" if dtype == "fp32" else "tf32"}  # fmt: skip
    fwd = lt._FWD_COMMON + lt._FWD_BIG_SMEM
    bwd = lt._BWD_COMMON + lt._BWD_BIG_SMEM
    small = lt._SMALL_M_CONFIGS
    if quick:
        fwd, bwd, small = fwd[:1], bwd[:1], small[:1]
    yield "dequant", nf4_dequant._nf4_dequant_kernel, {**{k: common[k] for k in ("BLOCKSIZE", "ABSMAX_BLOCKSIZE", "DOUBLE_QUANT")}, "BLOCK": 1024}, 4, 3  # fmt: skip
    for bm, bn, bk, w, s in fwd:
        tiles = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}
        yield f"fwd {bm}x{bn}x{bk}", lt._nf4_lora_fwd_kernel, {**common, "HAS_BIAS": True, **tiles}, w, s
    for bm, bn, bk, w, s in bwd:
        tiles = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}
        yield f"bwd {bm}x{bn}x{bk}", lt._nf4_lora_bwd_kernel, {**common, **tiles}, w, s
    for bn, bk, w, s in small:
        tiles = {"BLOCK_M": lt.SMALL_M, "BLOCK_N": bn, "BLOCK_K": bk}
        yield f"small_m {lt.SMALL_M}x{bn}x{bk}", lt._nf4_lora_fwd_small_m_kernel, {**common, "HAS_BIAS": True, **tiles}, w, s  # fmt: skip


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
    args = p.parse_args(argv)
    failures = 0
    for arch in args.arch:
        target = GPUTarget("cuda", arch, 32)
        for dtype in args.dtypes:
            for name, fn, consts, warps, stages in jobs(dtype, args.quick):
                tag = f"sm_{arch} {dtype} {name} w{warps} s{stages}"
                src = ASTSource(fn=fn, signature=arg_types(fn, dtype, consts), constexprs=consts)
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
