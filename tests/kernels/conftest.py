"""Kernel tests: without CUDA, the Triton kernels run under Triton's interpreter on CPU tensors.

tests/conftest.py sets TRITON_INTERPRET=1 (when torch sees no CUDA) before anything imports triton:
triton 3.9 reads the variable in `triton.jit` itself, i.e. when a function is *decorated*, which for
triton.language's own helpers (tl.zeros, tl.interleave, ...) happens at `import triton` and for
qtrain's kernels when `qtrain.kernels.nf4_dequant` / `nf4_lora_triton` are first imported (lazily).
Setting it any later leaves compiled helpers inside interpreted kernels, which then fail with
"Cannot call @triton.jit'd outside of the scope of a kernel". The `triton_device` fixture checks
that both are in the same mode and fails loudly otherwise.

With CUDA the variable is left alone: the same tests then run the compiled kernels on the GPU (or
on CPU tensors under the interpreter if TRITON_INTERPRET=1 was set by hand before pytest started).
"""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def triton_device() -> str:
    """The device for kernel inputs: "cpu" under the interpreter, "cuda" when the kernels are compiled."""
    triton = pytest.importorskip("triton", reason="triton is not installed (CPU-only platforms)")
    from qtrain.kernels.nf4_dequant import is_interpreting
    from qtrain.kernels.nf4_lora_triton import _nf4_lora_fwd_kernel

    ours = [is_interpreting(), not isinstance(_nf4_lora_fwd_kernel, triton.runtime.JITFunction)]
    theirs = not isinstance(triton.language.standard.zeros, triton.runtime.JITFunction)  # decorated at import
    wanted = os.environ.get("TRITON_INTERPRET") == "1"
    if ours != [wanted, wanted] or theirs != wanted:
        pytest.fail(
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r} but qtrain's kernels interpreted: {ours}, "
            f"triton.language's helpers interpreted: {theirs}. The variable must be set before triton is first "
            "imported (tests/conftest.py does it at its top; something imported triton earlier)"
        )
    return "cpu" if wanted else "cuda"
