"""Which torch device a run uses: shared by training, generation and the tools (no model code here)."""

from __future__ import annotations

import torch


def pick_device(name: str) -> torch.device:
    """`device:` of a config or `--device`: auto (CUDA when visible, else CPU), cuda, cpu, or a torch device string."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but no CUDA GPU is visible; use device=cpu or device=auto")
    return torch.device(name)
