"""Turning a stock module instance into a fused one, in place of it: the one spot that does so.

The fused modules (`FusedRMSNorm`, `FusedMLP`, `FusedAttention`...) are not built from their
constructor arguments: they take over the stock instance's whole state, so that nothing is copied
and nothing is renamed. `adopt` makes an instance of the fused class without running `__init__`
and gives it the stock instance's `__dict__` entries. What callers rely on (tests/qtrain/
test_fused_adopt.py checks each):
    * the parameters, buffers and children are the same objects (an optimizer, a PEFT method or a
      tied weight holding them keeps working), so `named_parameters()` and state_dict keys are
      unchanged;
    * the hook dicts are the same dict objects, so hooks registered on the stock module run on the
      fused one and the handles taken on the stock module still remove them;
    * the plain attributes (config, layer_idx, head_dim, scaling, act_fn, variance_epsilon...) are
      there for the fused forward, and a fused class that also subclasses the stock class (the
      attention classes) still reaches the stock methods through its MRO.
"""

from __future__ import annotations

from typing import TypeVar

from torch import nn

M = TypeVar("M", bound=nn.Module)


def adopt(module: nn.Module, fused_cls: type[M]) -> M:
    """An instance of `fused_cls` holding `module`'s state: the same parameters, buffers, children,
    hooks and attributes (the dicts themselves, so hook handles taken on `module` still remove their
    hooks). `module` must not be used afterwards: it shares every dict with the new instance."""
    new = fused_cls.__new__(fused_cls)
    new.__dict__.update(module.__dict__)
    return new
