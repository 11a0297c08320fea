"""Variable-length (packed) causal attention: examples back to back in one flattened token axis,
attention within each example only, no [B, 1, S, S] mask.

The boundaries are cu_seqlens (int32 [N + 1], offsets into the B * S flattened tokens, as flash
attention takes them); `packed_segments` reads them off position_ids that restart per example.
`varlen_attention(q [T, H, d], k, v [T, KV, d], cu, max_len, scale, window, dropout)` is causal
within each example cu[i]:cu[i+1], with the sliding window of W keys in transformers' convention
(key j visible to query i when i - W < j <= i; flash: window_size=(W-1, 0)):
    * CUDA, fp16/bf16, head_dim % 8 == 0 and <= 256: `flash_attn.flash_attn_varlen_func` when the
      flash_attn package imports, else `torch.nn.attention.varlen.varlen_attn` (torch >= 2.9; its
      signature is read: window_size=(-1, 0) / (W-1, 0) (torch >= 2.11), or is_causal=True (2.9,
      2.10: no sliding window), enable_gqa and scale when it has them, else k/v repeated and q
      pre-scaled; no dropout: attention dropout in training takes the loop);
    * otherwise (CPU, fp32, no kernel): `segment_attention`, exact SDPA per example with
      is_causal=True (a [L, L] band mask only for an example longer than the window). A loop rather
      than one SDPA call with a block mask built per layer: it holds one example's L x L scores at a
      time, and keeps sum L_i^2 of them for backward, against S^2 mask bytes plus H * S^2 scores
      per row for the block-masked call.

Plain PyTorch (flash_attn and torch's varlen_attn are looked up lazily): no triton, nothing from
qtrain. `qtrain.fused.attention` calls it for packed batches (see `qtrain.fused.packing`).
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import itertools
from collections.abc import Callable

import torch
from torch.nn import functional as F

HALF = (torch.float16, torch.bfloat16)  # what the flash kernels take


def packed_segments(position_ids: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """(cu_seqlens int32 [N + 1], the longest example's length) of the packed examples in position_ids
    [B, S]: a new example wherever a position is not the previous one + 1 (transformers'
    find_packed_sequence_indices; the padding continues the last example, so it belongs to it), at
    offsets into the B * S flattened tokens. None when every row is one example (not packed)."""
    b, s = position_ids.shape
    starts = torch.ones_like(position_ids, dtype=torch.bool)  # [B, S]: the first token of an example
    starts[:, 1:] = position_ids[:, 1:] - position_ids[:, :-1] != 1
    first = starts.flatten().nonzero().flatten()  # [N]
    if first.numel() == b:
        return None
    cu = torch.cat([first, first.new_tensor([b * s])]).to(torch.int32)  # [N + 1]
    return cu, int(cu.diff().max())


def _window_mask(length: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    """[L, L] bool: key j visible to query i when i - W < j <= i; None when the window covers the example."""
    if window is None or length <= window:
        return None
    ones = torch.ones(length, length, dtype=torch.bool, device=device)
    return ones.tril() & ~ones.tril(-window)


def segment_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, scale: float,
    window: int | None = None, dropout: float = 0.0,
) -> torch.Tensor:  # fmt: skip
    """[T, H, d]: exact causal attention within each example cu[i]:cu[i+1] of q [T, H, d], k, v
    [T, KV, d] (KV divides H: each kv head serves H / KV consecutive query heads), one SDPA call
    per example. The CPU path and the reference of the kernels."""
    groups = q.shape[1] // k.shape[1]
    bounds = cu.tolist()
    out = []
    for start, end in itertools.pairwise(bounds):
        qs, ks, vs = (t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, H|KV, L, d]
        if groups > 1:
            ks, vs = ks.repeat_interleave(groups, dim=1), vs.repeat_interleave(groups, dim=1)  # [1, H, L, d]
        mask = _window_mask(end - start, window, q.device)
        o = F.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=mask, dropout_p=dropout, is_causal=mask is None, scale=scale
        )  # [1, H, L, d]
        out.append(o[0].transpose(0, 1))
    return torch.cat(out)  # [T, H, d]


@functools.cache
def _flash_attn_varlen() -> Callable | None:
    """flash_attn.flash_attn_varlen_func (the flash-attention 2 package), or None where it is missing."""
    if importlib.util.find_spec("flash_attn") is None:
        return None
    try:
        from flash_attn import flash_attn_varlen_func
    except (ImportError, OSError):  # installed but built for another torch / CUDA
        return None
    return flash_attn_varlen_func


@functools.cache
def _torch_varlen() -> tuple[Callable, frozenset[str]] | None:
    """(torch.nn.attention.varlen.varlen_attn, its parameter names) on torch >= 2.9, else None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def _torch_varlen_call(q, k, v, cu, max_len: int, scale: float, window: int | None) -> torch.Tensor | None:
    """varlen_attn with what this torch's signature offers, or None when it cannot compute this call."""
    found = _torch_varlen()
    if found is None:
        return None
    varlen_attn, params = found
    kwargs = {}
    if "window_size" in params:  # torch >= 2.11: (left, right) as flash's; (-1, 0) is plain causal
        kwargs["window_size"] = (window - 1 if window else -1, 0)
    elif "is_causal" in params and not window:  # torch 2.9, 2.10: no sliding window
        kwargs["is_causal"] = True
    else:
        return None
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # [T, H, d]
    if "scale" in params:
        kwargs["scale"] = scale
    else:
        q = q * (scale * q.shape[-1] ** 0.5)  # its default scale is d^-0.5
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, **kwargs)


def varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int, scale: float,
    window: int | None = None, dropout: float = 0.0,
) -> torch.Tensor:  # fmt: skip
    """[T, H, d]: causal attention within each example cu[i]:cu[i+1] (int32 [N + 1]) of the flattened
    q [T, H, d], k, v [T, KV, d], with a sliding window of W keys (transformers' convention, the query
    included) when given. flash_attn or torch's varlen_attn on CUDA (fp16/bf16), else
    `segment_attention`; see the module docstring."""
    d = q.shape[-1]
    if q.is_cuda and q.dtype in HALF and d % 8 == 0 and d <= 256:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        flash = _flash_attn_varlen()
        if flash is not None:
            return flash(
                q, k, v, cu, cu, max_len, max_len, dropout_p=dropout, softmax_scale=scale, causal=True,
                window_size=(window - 1 if window else -1, 0 if window else -1),
            )  # fmt: skip
        out = _torch_varlen_call(q, k, v, cu, max_len, scale, window) if dropout == 0 else None
        if out is not None:
            return out
    return segment_attention(q, k, v, cu, scale, window, dropout)
