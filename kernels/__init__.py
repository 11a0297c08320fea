"""qtrain's compute kernels, imported as `qtrain.kernels` (this folder is mapped in pyproject.toml).

One file per op: a PyTorch reference in fp32, the PyTorch backend used on CPU, and (where
written) Triton kernels with their launchers and autograd.Function.
"""

from qtrain.kernels.nf4_lora import NF4MatmulFunction, nf4_lora_reference, nf4_lora_torch

BACKENDS = ("auto", "torch")

__all__ = ["BACKENDS", "NF4MatmulFunction", "nf4_lora_reference", "nf4_lora_torch"]
