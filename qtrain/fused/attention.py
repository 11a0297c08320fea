"""`FusedAttention`: the stock attention's forward, step by step, with fused q/k/v and in-place RoPE.

A subclass of the stock attention class (the concrete classes in `qtrain.fused.architectures`), so
`isinstance` checks and transformers' output capture still see it, with the SAME q/k/v/o_proj
children; swapped in for op `rope`, `qkv` or `varlen`:
    * op `qkv`: q, k, v from ONE NF4 + LoRA product over X (`qtrain.fused.projection`);
    * op `rope`: `qtrain.kernels.rope.apply_rope`, in place on the q/k blocks of that output (one
      launch for both; `rotate_own`: reshaped without autograd views, so the backward makes no
      zero-filled copy of the fused width), else transformers' `apply_rotary_pos_emb`. In-place RoPE
      only on tensors this module produced (fused output, or un-hooked LoRALinear outputs);
    * then the cache update, transformers' attention function of `config._attn_implementation`
      (sdpa, eager, flash...) with the given mask and the architecture's sliding window, o_proj:
      same signature and return value as the stock forward;
    * for a packed batch (`qtrain.fused.packing.PackedBatches` passed the examples' boundaries as
      `cu_seq_lens_q`; sdpa, no cache, causal): `qtrain.kernels.varlen.varlen_attention` over the
      flattened tokens instead of the attention function. A layer that gets the packed batch's
      placeholder mask but cannot take that path raises (it never attends across examples in silence).

The transformers-version shims live here too: the attention-function lookup (`get_interface`,
>= 5.x), and the cache argument's name (`cache` from transformers 5.24, `past_key_values` before):
the forward is chosen per stock class so that hooks looking the cache up by name find it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from qtrain.fused.adopt import adopt
from qtrain.fused.ops import QKV, FusedOps
from qtrain.fused.projection import FusedGroups, fusable, has_hooks
from qtrain.kernels import rope as rope_kernels
from qtrain.kernels.rope import apply_rope
from qtrain.kernels.varlen import varlen_attention
from qtrain.lora import LoRALinear


def _attention_interface(impl: str, eager: Callable) -> Callable:
    """transformers' attention function for `impl` (get_interface where it exists, >= 5.x)."""
    get = getattr(ALL_ATTENTION_FUNCTIONS, "get_interface", None)
    if get is not None:
        return get(impl, eager)
    return eager if impl == "eager" else ALL_ATTENTION_FUNCTIONS[impl]


def _rope_backend(x: torch.Tensor) -> str:
    """The RoPE kernel's backend: its own "auto" (Triton on CUDA), or Triton on CPU tensors under the
    Triton interpreter (tests), as rms_norm/swiglu dispatch."""
    return "triton" if rope_kernels.is_interpreting() and not x.is_cuda else "auto"


def rotate_own(q: torch.Tensor, k: torch.Tensor, cos, sin, heads: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE in place on this call's own q [B, S, H * d] and k [B, S, K * d] (fused column blocks or
    un-hooked LoRALinear outputs), returned as [B, S, H|K, d].

    Reshaped with `aten._unsafe_view`, which autograd does not track as a view, and rotated in that
    layout (unsqueeze_dim=2): the in-place rotation then only rebases these tensors' history. On an
    autograd view (`view(...).transpose(1, 2)` of a block of the fused output) it made a CopySlices
    node and an `as_strided_backward` whose zero-filled buffer spans the view's base, i.e. every row
    of the fused [T, (H + 2K)d] output, for q and for k. Same numbers, bit for bit."""
    q4, k4 = (torch.ops.aten._unsafe_view(t, heads) for t in (q, k))  # [B, S, H|K, d]
    return apply_rope(q4, k4, cos, sin, unsqueeze_dim=2, backend=_rope_backend(q4))


def takes_cache_argument(stock_cls: type) -> bool:
    """Whether the stock attention takes `cache` (transformers >= 5.24) rather than `past_key_values`."""
    return "cache" in inspect.signature(stock_cls.forward).parameters


class FusedAttention(FusedGroups, nn.Module):
    """The stock attention's forward with fused q/k/v and in-place RoPE; see the module docstring.

    Concrete classes (`FusedLlamaAttention`...) also subclass the stock class; they set `rotary`,
    `eager` (the architecture's apply_rotary_pos_emb and eager_attention_forward), `new_cache_api`
    and `window_kwargs`."""

    rotary: Callable
    eager: Callable
    new_cache_api: bool

    @classmethod
    def from_stock(cls, attn: nn.Module, ops: FusedOps) -> tuple[FusedAttention, dict[str, str]]:
        """(the swapped module, {op: why it is off}) for the stock attention `attn`."""
        new = adopt(attn, cls)
        skipped = {}
        new._groups = {}
        new.fuse_rope = ops.rope
        new.fuse_qkv = ops.qkv
        if ops.qkv:
            reason = fusable([getattr(new, n) for n in QKV])
            if reason is None:
                new._groups = {"qkv": QKV}
                new._fuse_group("qkv")
            else:
                new.fuse_qkv = False
                skipped["qkv"] = reason
        return new, skipped

    def window_kwargs(self) -> dict:
        return {}

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        """(q, k, v) [..., N_i] and whether q and k are this call's own tensors (safe to rotate in place)."""
        fused = self._project("qkv", x)
        if fused is not None:
            return (*fused, True)
        own = all(type(m) is LoRALinear and not has_hooks(m) for m in (self.q_proj, self.k_proj))
        return self.q_proj(x), self.k_proj(x), self.v_proj(x), own

    def _update_cache(self, cache, key, value, cos, sin, kwargs: dict):
        if self.new_cache_api:
            return cache.update(key, value, self.layer_idx, kwargs=kwargs)
        cache_kwargs = {"sin": sin, "cos": cos, "cache_position": kwargs.get("cache_position")}
        return cache.update(key, value, self.layer_idx, cache_kwargs)

    def attend(self, hidden_states, position_embeddings, attention_mask, cache, kwargs: dict):
        """The stock attention forward: projections, RoPE, cache, attention function, o_proj; for a packed
        batch (`PackedBatches` passed cu_seq_lens_q) variable-length attention instead of the function."""
        q, k, v = self._rotated_qkv(hidden_states, position_embeddings)
        if self._varlen_call(cache, kwargs):
            return self.o_proj(self._attend_varlen(q, k, v, kwargs)), None
        if is_placeholder(attention_mask):
            raise RuntimeError(
                f"qtrain.fused: layer {self.layer_idx} got the packed batch's placeholder mask but cannot run "
                "variable-length attention (a cache, another attn_implementation or is_causal=False set after "
                "apply_fused_ops?); set kernels.varlen=false"
            )
        if cache is not None:
            cos, sin = position_embeddings
            k, v = self._update_cache(cache, k, v, cos, sin, kwargs)
        if not self.new_cache_api:
            kwargs.pop("cache_position", None)  # a named argument of the stock forward there
        out, weights = self._attention_function(q, k, v, attention_mask, kwargs)
        out = out.reshape(*hidden_states.shape[:-1], -1).contiguous()  # [B, S, H * d]
        return self.o_proj(out), weights

    def _rotated_qkv(self, hidden_states, position_embeddings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q, k, v) [B, H|KV, S, d], RoPE applied to q and k: in place on this call's own tensors."""
        heads = (*hidden_states.shape[:-1], -1, self.head_dim)
        q, k, v, own = self._qkv(hidden_states)
        cos, sin = position_embeddings
        if self.fuse_rope and own:
            q, k = (t.transpose(1, 2) for t in rotate_own(q, k, cos, sin, heads))
            return q, k, v.view(heads).transpose(1, 2)
        q, k, v = (t.view(heads).transpose(1, 2) for t in (q, k, v))  # [B, H|KV, S, d]
        q, k = self.rotary(q, k, cos, sin)
        return q, k, v

    def _attention_function(self, q, k, v, attention_mask, kwargs: dict):
        """transformers' attention function of `config._attn_implementation`: (out [B, S, H, d], weights)."""
        interface = _attention_interface(self.config._attn_implementation, self.eager)
        return interface(
            self,
            q,
            k,
            v,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **self.window_kwargs(),
            **kwargs,
        )

    def _varlen_call(self, cache, kwargs: dict) -> bool:
        """Whether this call runs variable-length attention: `PackedBatches` passed the examples'
        boundaries, sdpa, no cache, causal."""
        return (
            kwargs.get("cu_seq_lens_q") is not None
            and cache is None
            and self.config._attn_implementation == "sdpa"
            and is_causal_call(kwargs, getattr(self, "is_causal", True))
        )

    def _attend_varlen(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """[B, S, H * d]: attention within each packed example of q [B, H, S, d], k, v [B, KV, S, d]."""
        b, _, s, d = q.shape
        cu = kwargs["cu_seq_lens_q"]  # [N + 1]; keys are the same tokens (no cache): cu_seq_lens_k = cu
        max_len = kwargs.get("max_length_q")
        out = varlen_attention(
            *(t.transpose(1, 2).reshape(b * s, t.shape[1], d) for t in (q, k, v)),  # [B * S, H|KV, d]
            cu,
            int(max_len) if max_len is not None else int(cu.diff().max()),
            scale=self.scaling,
            window=self.window_kwargs().get("sliding_window"),
            dropout=self.attention_dropout if self.training else 0.0,
        )  # [B * S, H, d]
        return out.reshape(b, s, -1)

    def extra_repr(self) -> str:
        return f"fused: qkv={self.fuse_qkv}, rope={self.fuse_rope}"


def is_causal_call(kwargs: dict, default: bool) -> bool:
    """Whether this call is causal: its `is_causal` keyword, else `default` (the module's or config's)."""
    causal = kwargs.get("is_causal")
    return (default if causal is None else causal) is True


def is_placeholder(mask) -> bool:
    """Whether `mask` is `PackedBatches`' placeholder: a 4D bool False broadcast from one element."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.dtype != torch.bool or any(mask.stride()):
        return False
    return not mask[0, 0, 0, 0].item()


CACHE_NAMES = ("cache", "past_key_values", "past_key_value")  # transformers >= 5.24, older, 4.5x


def _cache_argument(cache, kwargs: dict):
    """The cache, whichever name the caller gave it (the other names are removed from kwargs)."""
    for name in CACHE_NAMES:
        other = kwargs.pop(name, None)
        cache = cache if cache is not None else other
    return cache


def _forward_cache(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
    """forward(hidden_states, position_embeddings, attention_mask, cache, **kwargs) -> (out, weights)."""
    cache = _cache_argument(cache, kwargs)
    return self.attend(hidden_states, position_embeddings, attention_mask, cache, kwargs)


def _forward_past_key_values(
    self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs
):
    """forward(hidden_states, position_embeddings, attention_mask, past_key_values, **kwargs) (transformers < 5.24)."""
    cache = _cache_argument(past_key_values, kwargs)
    return self.attend(hidden_states, position_embeddings, attention_mask, cache, kwargs)


def forward_for(stock_cls: type) -> Callable:
    """A forward whose cache argument has the stock class's name (hooks, e.g. prefix tuning's, look it up)."""
    return _forward_cache if takes_cache_argument(stock_cls) else _forward_past_key_values
