"""qtrain's compute kernels, imported as `qtrain.kernels` (this folder is mapped in pyproject.toml).

One file per op: a PyTorch reference in fp32, the PyTorch backend used on CPU, and (where
written) Triton kernels with their launchers and autograd.Function.

Triton modules (`nf4_dequant`, `nf4_lora_triton`, `nf4_gemv`) are never imported here: they need
triton. To run them on CPU under Triton's interpreter, TRITON_INTERPRET=1 must be set before triton
itself is first imported (tests/conftest.py does this). The entry point is
`qtrain.kernels.nf4_lora.nf4_lora` (not re-exported here, where its name would shadow the module):
backend torch, or triton, where `nf4_dispatch.choose_path` picks the GEMV (`nf4_gemv`), fused
(`nf4_lora_triton`) or dequant + cuBLAS (`nf4_matmul`) path by the number of rows.

Imported as a top-level `kernels` (Python started in the repository root), it raises ImportError:
that name belongs to Hugging Face's `kernels` package, which bitsandbytes and transformers look for.
"""

if __name__ == "kernels":
    raise ImportError(
        "this kernels/ folder is qtrain's, imported as qtrain.kernels: import qtrain.kernels, "
        "or start Python outside the qtrain repository root to reach Hugging Face's `kernels` package"
    )

from qtrain.kernels.nf4_lora import (
    BACKENDS,
    NF4MatmulFunction,
    nf4_lora_reference,
    nf4_lora_torch,
    resolve_backend,
    triton_available,
)

__all__ = [
    "BACKENDS",
    "NF4MatmulFunction",
    "nf4_lora_reference",
    "nf4_lora_torch",
    "resolve_backend",
    "triton_available",
]
