"""Shared fixtures: tiny local checkpoints (built once per session) and the `gpu` marker skip."""

from __future__ import annotations

import os
import re

import torch  # does not import triton

if not torch.cuda.is_available():
    # Without CUDA, qtrain's Triton kernels can only run under Triton's interpreter (tests/kernels).
    # triton reads TRITON_INTERPRET when a function is decorated with @triton.jit, and triton.language's
    # own helpers (tl.zeros, tl.interleave, ...) are decorated when triton is first imported, which
    # transformers does during `import qtrain.tiny` below: so this must run before that import.
    # tests/kernels/conftest.py checks that it took effect.
    os.environ["TRITON_INTERPRET"] = "1"

import pytest

from qtrain.tiny import build_tiny_model


def pytest_collection_modifyitems(config, items):
    """Tests marked `@pytest.mark.gpu` skip (with a reason) when no CUDA device is visible."""
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Factory: `tiny_checkpoint(arch="llama", **kw)` -> directory of a tiny random HF checkpoint.

    Built with `qtrain.tiny.build_tiny_model` into a session temp dir; one build per distinct
    argument set, so tests that ask for the same model share it. Treat the directory as read-only.
    """
    cache: dict[tuple, object] = {}

    def make(arch: str = "llama", **kw):
        key = (arch, tuple(sorted((k, repr(v)) for k, v in kw.items())))
        if key not in cache:
            slug = re.sub(r"[^A-Za-z0-9]+", "_", f"{arch}_{'_'.join(f'{k}{v}' for k, v in key[1])}")[:60]
            cache[key] = build_tiny_model(tmp_path_factory.mktemp(slug), arch=arch, **kw)
        return cache[key]

    return make


@pytest.fixture
def seeded():
    """A fixed torch seed for the test; returns the seed."""
    torch.manual_seed(1234)
    return 1234
