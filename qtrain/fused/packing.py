"""Padding-free packing (op `varlen`): packed batches through variable-length attention, no [B, 1, S, S] mask.

A packed row (`qtrain.data.collate_packed`: examples back to back, position_ids restarting per
example, the padding continuing the last example's positions, no attention_mask) makes transformers
build a [B, 1, S, S] bool block-causal mask in the decoder (masking_utils: a new example wherever
position_ids[t] != position_ids[t-1] + 1), which SDPA then runs through its memory-efficient or math
kernel (a mask rules out its flash kernel). With `varlen` on, an sdpa model whose every decoder
layer's self_attn is a FusedAttention gets a forward pre-hook on its decoder (`PackedBatches`,
installed by `qtrain.fused.swap.install_varlen`) that, for a call transformers would treat as packed
(position_ids given, attention_mask None, no cache given and none about to be made: use_cache off,
and at least one restart), passes down
    * the examples' boundaries as transformers' FlashAttention kwargs: `cu_seq_lens_q` =
      `cu_seq_lens_k` (int32 [N+1], offsets into the B*S flattened tokens; rows never share an
      example) and `max_length_q` = `max_length_k` (int), which the decoder forwards to every layer
      and attention (gradient checkpointing keeps them in its partial, so recomputation sees them);
    * as attention_mask a 4D placeholder, one False expanded to [B, 1, S, S] (stride 0, ONE byte),
      which create_causal_mask / create_sliding_window_causal_mask return as they are (a 4D mask
      counts as prepared), so no mask is built. (An all-ones 2D mask would not do: for a sliding
      window W <= S, sdpa's causal skip does not apply and a [B, 1, S, S] window mask is built.)
FusedAttention, given `cu_seq_lens_q`, runs `qtrain.kernels.varlen.varlen_attention` (the kernels
and their CPU loop are described there).
Not used (the stock mask path stays, the reason in `Swapped.skipped["<decoder>.varlen"]` when known
at swap time, else per call): another attention implementation (flash_attention_2 handles packed
position_ids itself; eager keeps the block mask), a self_attn that is not a FusedAttention, a hook
that sees a decoder layer's or its self_attn's arguments (a forward pre-hook, or a forward hook
with kwargs: prefix tuning / P-tuning v2, LLaMA-Adapter, parallel adapters; output-only forward
hooks such as Houlsby adapters' or transformers' output capture are fine), a decoder pre-hook
registered after ours (it could rewrite the inputs we read), output_attentions, is_causal=False.
Memory (for the estimator), per packed row of S tokens, what the padding-free path saves:
    * the bool block mask, S^2 bytes (S = 4096: 16 MiB), built once per decoder forward and alive
      through it (with gradient checkpointing until the last recomputation: the partials hold it);
    * per layer, SDPA's additive copy of that mask in the compute dtype, S^2 * 2 bytes in bf16
      (S = 4096: 32 MiB; 1 GiB over 32 layers), which SDPA makes from a bool mask and keeps for
      backward (measured on CPU: one fp32 [1, 1, S, S] tensor saved per layer; with gradient
      checkpointing one layer's at a time);
    * the kernel: with a mask SDPA cannot use its flash kernel and runs the memory-efficient one
      (or the math path, H * S^2 scores per row, where that one does not apply); the varlen
      kernels keep O(S) state (the output and a log-sum-exp per query and head) and skip the
      masked-out blocks (sum L_i^2 instead of S^2 work for examples of L_i tokens).
The padding-free path adds the boundaries (4 bytes per example) and the 1-byte placeholder.
Unpacked batches (a padded 2D mask, or no restarts) are unchanged: SDPA's causal path needs no mask.
"""

from __future__ import annotations

import torch
from torch import nn

from qtrain.fused.attention import CACHE_NAMES, FusedAttention, is_causal_call
from qtrain.kernels.varlen import packed_segments

VARLEN_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")  # transformers' FlashAttentionKwargs


def _sees_arguments(m: nn.Module) -> bool:
    """Whether a hook on m sees (or may rewrite) its call's arguments: a forward pre-hook, or a forward
    hook with kwargs. Output-only forward hooks (adapters, transformers' output capture) do not."""
    return bool(m._forward_pre_hooks or m._forward_hooks_with_kwargs)


def varlen_blocker(decoder: nn.Module, hook: PackedBatches | None = None) -> str | None:
    """Why packed batches cannot take the padding-free path in `decoder` now (None: they can)."""
    impl = decoder.config._attn_implementation
    if impl != "sdpa":
        return f"attn_implementation {impl!r} is not sdpa"
    layers = getattr(decoder, "layers", None)
    if layers is None:
        return f"{type(decoder).__name__} has no decoder layers"
    for i, layer in enumerate(layers[: decoder.config.num_hidden_layers]):
        attn = getattr(layer, "self_attn", None)
        if not isinstance(attn, FusedAttention):
            return f"layer {i}'s self_attn is {type(attn).__name__}, not a FusedAttention"
        for where, m in (("", layer), (".self_attn", attn)):
            if _sees_arguments(m):
                return f"a hook on layer {i}{where} sees its arguments (a PEFT method: prefix tuning, LLaMA-Adapter...)"
    if hook is not None and list(decoder._forward_pre_hooks.values())[-1] is not hook:
        return "a decoder forward pre-hook registered after the padding-free one"
    return None


def _cache_wanted(decoder: nn.Module, kwargs: dict) -> bool:
    """Whether this decoder call has a cache or will make one (transformers then builds no packed mask)."""
    if any(kwargs.get(name) is not None for name in CACHE_NAMES):
        return True
    use_cache = kwargs.get("use_cache")
    if use_cache is None:
        use_cache = getattr(decoder.config, "use_cache", False)
    checkpointing = getattr(decoder, "gradient_checkpointing", False) and decoder.training
    return bool(use_cache) and not (checkpointing and torch.is_grad_enabled())  # as merge_with_config_defaults


def _packed_positions(decoder: nn.Module, args: tuple, kwargs: dict, hook: PackedBatches) -> torch.Tensor | None:
    """position_ids [B, S] (on the inputs' device) when transformers would build a packed block mask for
    this call, else None."""
    position_ids = kwargs.get("position_ids")
    if len(args) > 1 or position_ids is None or position_ids.dim() != 2 or kwargs.get("attention_mask") is not None:
        return None
    if _cache_wanted(decoder, kwargs) or kwargs.get("output_attentions") or any(n in kwargs for n in VARLEN_KWARGS):
        return None
    if not is_causal_call(kwargs, getattr(decoder.config, "is_causal", True)):
        return None
    ids = args[0] if args else kwargs.get("input_ids")
    inputs = ids if ids is not None else kwargs.get("inputs_embeds")
    if inputs is None or position_ids.shape[-1] != inputs.shape[1] or varlen_blocker(decoder, hook) is not None:
        return None
    return position_ids.to(inputs.device).expand(inputs.shape[0], -1)


class PackedBatches:
    """Forward pre-hook (with_kwargs) of the decoder: for a packed call, the examples' boundaries as
    transformers' FlashAttention kwargs and a 1-byte 4D placeholder mask (see the module docstring).
    A class, so that deepcopy/pickle of the model carry the hook."""

    def __call__(self, decoder: nn.Module, args: tuple, kwargs: dict):
        position_ids = _packed_positions(decoder, args, kwargs, self)
        segments = None if position_ids is None else packed_segments(position_ids)
        if segments is None:
            return None  # the stock path (one example per row: SDPA's causal path needs no mask)
        cu, max_len = segments
        b, s = position_ids.shape
        placeholder = torch.zeros((), dtype=torch.bool, device=position_ids.device).expand(b, 1, s, s)
        varlen = dict(zip(VARLEN_KWARGS, (cu, cu, max_len, max_len)))
        return args, {**kwargs, "attention_mask": placeholder, **varlen}
