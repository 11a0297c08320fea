"""Fused ops for Llama-family models (Llama, Mistral, Qwen2), swapped into a model INSTANCE.

    apply_fused_ops(model, FusedOps())   # after load_model (and any PEFT method), before training

Per decoder layer (other architectures are left alone, the reason recorded):

* input_layernorm, post_attention_layernorm (and the decoder's final norm) -> `FusedRMSNorm`:
  `qtrain.kernels.rms_norm.rms_norm` with the SAME `weight` Parameter (op `rms_norm`);
* self_attn -> `FusedAttention` (a subclass of the stock attention class, so `isinstance` checks
  and transformers' output capture still see it; swapped for op `rope`, `qkv` or `varlen`, the
  padding-free packing below), with the SAME q/k/v/o_proj children:
    - op `qkv`: q, k, v from ONE NF4 + LoRA product over X (one read of X for the 4-bit weight and
      one for the low-rank path instead of three each):
          [q | k | v] = X [Wq; Wk; Wv]^T + s X A_cat^T B_bd^T + [bq; bk; bv]
      A_cat = [Aq; Ak; Av] [rq+rk+rv, K], B_bd = blockdiag(Bq, Bk, Bv) [Nq+Nk+Nv, rq+rk+rv]: the
      existing `nf4_lora` kernel and autograd run unchanged (backend from the projections), and
      autograd of cat/block_diag sends each projection's gradient to its own lora_a/lora_b (and
      bias). Unequal LoRA scales are folded into the blocks (s_i B_i, s = 1); a rank-0 projection
      is a zero-width block.
      The output is split into q, k, v by `columns` (`unsafe_split_with_sizes`): no copy, and the
      backward is one concatenation of the three gradients (slicing made a zero-filled full-width
      gradient per block, summed).
    - op `rope`: `qtrain.kernels.rope.apply_rope`, in place on the q/k blocks of that output (one
      launch for both; `rotate_own`: reshaped without autograd views, so the backward makes no
      zero-filled copy of the fused width), else transformers' `apply_rotary_pos_emb`;
    - then the cache update, transformers' attention function of `config._attn_implementation`
      (sdpa, eager, flash...) with the given mask and the architecture's sliding window, o_proj:
      the stock forward step by step, same signature and return value.
* mlp -> `FusedMLP` with the SAME gate/up/down_proj: op `gate_up` fuses [Wg; Wu] as above, op
  `swiglu` runs `qtrain.kernels.swiglu.swiglu` on the two column halves (no copy), then down_proj.

No extra base-weight memory: at swap time the 4-bit codes of the fused projections are
concatenated into ONE uint8 buffer and each projection's own `nf4_packed` becomes a view (slice)
of it, so the fused weight is the same bytes read as one [N, K] NF4 matrix. The quantization
blocks (64 values) must not straddle projections: each N_i * K must be a multiple of 64 (true for
every real model; else that fusion is skipped, the reason recorded). Each projection's double-
quantized absmax (uint8 + per-256 fp32 scales + one offset per weight) cannot be concatenated (one
offset per weight), so the fused weight carries its block absmax dequantized once to fp32
(`qkv_absmax` / `gate_up_absmax`, non-persistent buffers): bit-identical dequantization, at an
EXTRA 4 bytes per 64 fused weights (0.0625 byte per weight, 12.5% of those projections' 4-bit
codes; Llama-3-8B: 1.6 MB for q/k/v and 7.3 MB for gate/up per layer, ~285 MB over 32 layers).
A device move (`model.to`/`.cuda()`) moves each view on its own; the fused modules' `_apply`
concatenates and re-binds them again, and keeps the absmax in fp32 whatever `.to(dtype)` asks.

Per-call fallback to the stock computation (each projection called as a module), whenever fusing
would not be the same function: a forward hook / pre-hook (or backward hook) on any of the fused
projections (PEFT methods such as (IA)^3 or AdaLoRA hook them), DoRA on any of them, a base that is
not NF4 (quantize=False), projections no longer sharing the concatenated codes (a weight replaced,
a merge), different LoRA dtypes or backends, and CUDA inputs when the NF4 backend resolves to
torch (pre-Ampere GPUs, no triton: that backend dequantizes the whole weight first, so a fused one
is only a bigger transient for the same work; CPU keeps the fused torch path, which the tests use).
Global module hooks (torch.nn.modules.module.register_module_forward_hook) are not looked at: they
would not see the fused projections' calls. LoRA dropout in training keeps the base fused and adds
each projection's own low-rank term with its own dropout mask, drawn in the stock order (q, k, v;
gate, up): the same random numbers as the stock modules. In-place RoPE is used only on tensors this
module produced (fused output, or un-hooked LoRALinear outputs); otherwise transformers' out-of-place
rotary. Hooks on self_attn / mlp / the norms themselves (prefix tuning, adapters, LLaMA-Adapter) are
carried over by the swap (the new module adopts the old one's state, hooks included) and keep
working; methods applied after the swap hook the new modules.

Parameter and state-dict names do not change (`model.layers.0.self_attn.q_proj.lora_a.weight`...):
the swapped modules adopt the stock modules' parameters, buffers, children and attributes
(layer_idx, head_dim, scaling, config, num_key_value_groups, is_causal, attention_dropout,
sliding_window, layer_type, act_fn...). Only non-persistent buffers are added.

Padding-free packing (op `varlen`). A packed row (`qtrain.data.collate_packed`: examples back to
back, position_ids restarting per example, the padding continuing the last example's positions, no
attention_mask) makes transformers build a [B, 1, S, S] bool block-causal mask in the decoder
(masking_utils: a new example wherever position_ids[t] != position_ids[t-1] + 1), which SDPA then
runs through its memory-efficient or math kernel (a mask rules out its flash kernel). With `varlen`
on, an sdpa model whose every decoder layer's self_attn is a FusedAttention gets a forward pre-hook
on its decoder (`PackedBatches`) that, for a call transformers would treat as packed (position_ids
given, attention_mask None, no cache given and none about to be made: use_cache off, and at least
one restart), passes down
    * the examples' boundaries as transformers' FlashAttention kwargs: `cu_seq_lens_q` =
      `cu_seq_lens_k` (int32 [N+1], offsets into the B*S flattened tokens; rows never share an
      example) and `max_length_q` = `max_length_k` (int), which the decoder forwards to every layer
      and attention (gradient checkpointing keeps them in its partial, so recomputation sees them);
    * as attention_mask a 4D placeholder, one False expanded to [B, 1, S, S] (stride 0, ONE byte),
      which create_causal_mask / create_sliding_window_causal_mask return as they are (a 4D mask
      counts as prepared), so no mask is built. (An all-ones 2D mask would not do: for a sliding
      window W <= S, sdpa's causal skip does not apply and a [B, 1, S, S] window mask is built.)
      A layer that gets it but cannot take the padding-free path raises (it never attends across
      examples in silence).
FusedAttention, given `cu_seq_lens_q` (sdpa, no cache, causal), runs variable-length attention over
the flattened q [B*S, H, d], k, v [B*S, KV, d] (GQA without repeating k/v where the kernel allows),
causal within each example, with the layer's sliding window W (transformers: key j visible to query
i when i - W < j <= i; flash: window_size=(W-1, 0)) and scaling:
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

`FusedOps.enabled`: "auto" swaps for CUDA models only (CPU training keeps the stock modules and never
meets the Triton interpreter), "on" always (tests, small shapes), "off" never. The kernels dispatch
by themselves: Triton on CUDA tensors (and on CPU ones under TRITON_INTERPRET=1), PyTorch otherwise.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama import modeling_llama as llama
from transformers.models.mistral import modeling_mistral as mistral
from transformers.models.qwen2 import modeling_qwen2 as qwen2

from qtrain.kernels import rope as rope_kernels
from qtrain.kernels.nf4_lora import lora_delta, nf4_lora, resolve_backend
from qtrain.kernels.rms_norm import rms_norm
from qtrain.kernels.rope import apply_rope
from qtrain.kernels.swiglu import swiglu
from qtrain.lora import LoRALinear
from qtrain.nf4 import NF4Tensor, block_absmax

ENABLED = ("auto", "on", "off")
OPS = ("rms_norm", "rope", "swiglu", "qkv", "gate_up", "varlen")  # model changes (cross_entropy: the loss's)
QKV = ("q_proj", "k_proj", "v_proj")
GATE_UP = ("gate_proj", "up_proj")
SILU = ("silu", "swish")


@dataclass
class FusedOps:
    """Which fused ops replace the stock modules, and whether packed batches take the padding-free
    attention path (config section `kernels`)."""

    # auto: CUDA models only; YAML reads on/off (and true/false) as booleans: True is "on", False "off"
    enabled: Literal["auto", "on", "off"] | bool = "auto"
    rms_norm: bool = True  # the decoder's RMSNorms -> Triton RMSNorm
    rope: bool = True  # RoPE on q and k in place, one launch
    swiglu: bool = True  # silu(gate) * up in one kernel
    qkv: bool = True  # q/k/v projections (NF4 + LoRA) as one product over X
    gate_up: bool = True  # gate/up projections (NF4 + LoRA) as one product over X
    varlen: bool = True  # packed batches: variable-length attention per example, no [B, 1, S, S] mask (sdpa)
    cross_entropy: bool = True  # the chunked lm_head loss's softmax/CE/gradient in one in-place Triton kernel

    def __post_init__(self) -> None:
        if isinstance(self.enabled, bool):
            self.enabled = "on" if self.enabled else "off"
        if self.enabled not in ENABLED:
            raise ValueError(f"kernels.enabled: {self.enabled!r} is not one of {', '.join(ENABLED)}")
        for name in (*OPS, "cross_entropy"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"kernels.{name}: expected true or false, got {value!r}")  # noqa: TRY004

    def any_on(self) -> bool:
        return any(getattr(self, name) for name in OPS)

    def on_for(self, device_type: str) -> bool:
        """Whether the fused ops run on a `device_type` ("cuda", "cpu") model: "on", or "auto" on CUDA."""
        return self.enabled == "on" or (self.enabled == "auto" and device_type == "cuda")

    def loss_backend(self, device: torch.device) -> str:
        """`qtrain.kernels.linear_cross_entropy`'s backend: "auto" (Triton on CUDA after its self-check)
        when the fused ops are on for `device` and cross_entropy is, else "torch"."""
        return "auto" if self.on_for(device.type) and self.cross_entropy else "torch"


class Swapped(list):
    """The names of the swapped modules (a list), `skipped`: {name: why it was left alone}, and `varlen`:
    whether packed batches take the padding-free attention path (the decoder's pre-hook is installed)."""

    def __init__(self) -> None:
        super().__init__()
        self.skipped: dict[str, str] = {}
        self.varlen = False


# ---- the fused NF4 + LoRA projection ------------------------------------------------------------


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def fusable(linears: list[nn.Module]) -> str | None:
    """Why these projections cannot share one NF4 weight (None: they can). Checked once, at swap time."""
    if not all(type(m) is LoRALinear for m in linears):
        return "not all projections are qtrain LoRALinear layers"
    if not all(m.quantize_base and m._nf4_meta for m in linears):
        return "the base is not NF4-quantized (quantize=False): stock projections"
    first = linears[0]
    meta = first._nf4_meta
    for m in linears:
        if m.in_features != first.in_features or len(m._nf4_meta["shape"]) != 2:
            return "the projections read inputs of different widths"
        if m._nf4_meta["dtype"] != meta["dtype"] or m._nf4_meta["blocksize"] != meta["blocksize"]:
            return "the NF4 weights differ in dtype or blocksize"
        if not torch.equal(m.nf4_code, first.nf4_code) or not m.nf4_packed.is_contiguous():
            return "the NF4 weights use different code tables"
        numel = m.in_features * m.out_features
        if numel % meta["blocksize"] or numel % 2:
            return (
                f"{m.out_features} x {m.in_features} weights split NF4 blocks of {meta['blocksize']}: "
                "the quantization blocks would straddle projections"
            )
    return None


def shared_codes(linears: list[LoRALinear]) -> torch.Tensor | None:
    """The projections' 4-bit codes as ONE uint8 tensor [sum n_i / 2] when they lie back to back in
    one storage (what `share_codes` made), else None."""
    first = linears[0].nf4_packed
    storage, offset = first.untyped_storage().data_ptr(), first.storage_offset()
    for m in linears:
        packed = m.nf4_packed
        if packed.untyped_storage().data_ptr() != storage or packed.storage_offset() != offset:
            return None
        if not packed.is_contiguous() or packed.device != first.device:
            return None
        offset += packed.numel()
    return first.as_strided((offset - first.storage_offset(),), (1,))


@torch.no_grad()
def share_codes(linears: list[LoRALinear]) -> None:
    """Concatenate the projections' codes into one buffer; each projection keeps a view (slice) of it."""
    if shared_codes(linears) is not None:
        return
    codes = torch.cat([m.nf4_packed for m in linears])  # [sum n_i / 2] uint8
    start = 0
    for m in linears:
        n = m.nf4_packed.numel()
        m.register_buffer("nf4_packed", codes[start : start + n], persistent=False)
        start += n


@torch.no_grad()
def fused_absmax(linears: list[LoRALinear]) -> torch.Tensor:
    """fp32 [sum blocks]: each projection's block absmax, double quantization undone (the values its
    own dequantization multiplies by, bit for bit)."""
    return torch.cat([block_absmax(m.nf4_weight).float() for m in linears])


def fused_weight(linears: list[LoRALinear], absmax: torch.Tensor | None) -> NF4Tensor | None:
    """[Wq; Wk; Wv] (or [Wg; Wu]) as one NF4 weight [sum N_i, K] over the shared codes, or None."""
    codes = shared_codes(linears)
    if codes is None or absmax is None or absmax.device != codes.device:
        return None
    first = linears[0]
    meta = first._nf4_meta
    rows = sum(m.out_features for m in linears)
    if absmax.numel() * meta["blocksize"] != rows * first.in_features:
        return None
    return NF4Tensor(
        packed=codes,
        absmax=absmax,
        shape=torch.Size((rows, first.in_features)),
        dtype=meta["dtype"],
        code=first.nf4_code,
        blocksize=meta["blocksize"],
    )


def blocked(linears: list[nn.Module]) -> bool:
    """Whether this call must run the stock projections (see the module docstring)."""
    first = linears[0]
    for m in linears:
        if type(m) is not LoRALinear or _has_hooks(m) or m.use_dora or not m.quantize_base:
            return True
        if m.backend != first.backend:
            return True
        if m.rank and first.rank and m.lora_a.weight.dtype != first.lora_a.weight.dtype:
            return True
    return False


def _fused_bias(linears: list[LoRALinear]) -> torch.Tensor | None:
    """[bq; bk; bv] [sum N_i] (zeros for a projection without bias), or None when none has one."""
    biases = [m.bias for m in linears]
    present = next((b for b in biases if b is not None), None)
    if present is None:
        return None
    return torch.cat([b if b is not None else present.new_zeros(m.out_features) for b, m in zip(biases, linears)])


def _fused_lora(linears: list[LoRALinear]) -> tuple[torch.Tensor | None, torch.Tensor | None, float]:
    """(A_cat [R, K], B_bd [sum N_i, R], s): the projections' adapters as one low-rank product."""
    adapted = [m for m in linears if m.rank]
    if not adapted:
        return None, None, 0.0
    lora_a = torch.cat([m.lora_a.weight for m in adapted])  # [R, K]
    like = adapted[0].lora_b.weight
    same_scale = all(m.scale == adapted[0].scale for m in adapted)
    blocks = []
    for m in linears:
        if not m.rank:
            blocks.append(like.new_zeros(m.out_features, 0))  # a zero-width block: rows of zeros
        else:
            blocks.append(m.lora_b.weight if same_scale else m.scale * m.lora_b.weight)  # [N_i, r_i]
    return lora_a, torch.block_diag(*blocks), adapted[0].scale if same_scale else 1.0


def fused_projection(x: torch.Tensor, linears: list[nn.Module], absmax: torch.Tensor | None) -> torch.Tensor | None:
    """[..., sum N_i]: every projection of `linears` applied to x in one NF4 + LoRA call, or None when
    this call must use the stock modules. On CUDA only with the Triton NF4 kernels: the torch backend
    (pre-Ampere GPUs, no triton) dequantizes the whole weight first, and a fused one is a bigger
    transient for the same work."""
    if blocked(linears) or (x.is_cuda and resolve_backend(linears[0].backend, x) != "triton"):
        return None
    weight = fused_weight(linears, absmax)
    if weight is None:
        return None
    first = linears[0]
    bias = _fused_bias(linears)
    dropout = [m.dropout if m.rank else 0.0 for m in linears]
    if first.training and any(p > 0 for p in dropout):
        # each projection's own dropout mask on its low-rank path, in the stock order; the base stays fused
        y = nf4_lora(x, weight, None, None, 0.0, bias, backend=first.backend)
        deltas = [
            lora_delta(x, m.lora_a.weight, m.lora_b.weight, m.scale, m.dropout, True)
            if m.rank
            else y.new_zeros(*y.shape[:-1], m.out_features)
            for m in linears
        ]
        return y + torch.cat(deltas, dim=-1)
    lora_a, lora_b, scale = _fused_lora(linears)
    return nf4_lora(x, weight, lora_a, lora_b, scale, bias, backend=first.backend)


def columns(y: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """Column blocks of y [..., sum sizes] whose backward is ONE concatenation of their gradients.

    `aten.unsafe_split_with_sizes`: the blocks share y's memory (no copy) but autograd does not track
    them as views of y, so (a) its backward cats the blocks' gradients into one [..., sum sizes]
    tensor, where `narrow`/slicing sent each block's gradient through `slice_backward` (a zero-filled
    [..., sum sizes] tensor per block, summed: 1-1.4 GB transient per layer at 8k tokens for Llama's
    gate/up), and (b) RoPE may rotate q and k in place (`split`'s views may not be modified in place;
    on a block, the in-place rotation's bookkeeping is q- or k-sized, not of the fused width). Safe
    here because y is this call's own output and nothing saved it for the backward; an in-place write
    to a block does not bump y's version counter."""
    return list(torch.ops.aten.unsafe_split_with_sizes(y, list(sizes), -1))


class _FusedGroups:
    """What FusedAttention and FusedMLP share: fused projection groups {name: child names}, their
    fp32 absmax buffers `<name>_absmax`, and re-binding after device moves."""

    _groups: dict[str, tuple[str, ...]]

    def _linears(self, group: str) -> list[nn.Module]:
        return [getattr(self, n) for n in self._groups[group]]

    def _fuse_group(self, group: str) -> None:
        linears = self._linears(group)
        share_codes(linears)
        self.register_buffer(f"{group}_absmax", fused_absmax(linears), persistent=False)

    def _project(self, group: str, x: torch.Tensor) -> list[torch.Tensor] | None:
        """The group's outputs from one fused call, or None (fusion off or blocked for this call)."""
        if group not in self._groups or not getattr(self, f"fuse_{group}"):
            return None
        linears = self._linears(group)
        y = fused_projection(x, linears, getattr(self, f"{group}_absmax"))
        return None if y is None else columns(y, [m.out_features for m in linears])

    def _apply(self, fn, recurse=True):
        """Device moves split the shared codes into one copy per view: concatenate again, and keep the
        absmax in fp32 (recomputed from the projections, whatever `.to(dtype)` did to the buffer)."""
        super()._apply(fn, recurse)
        for group in self._groups:
            if fusable(self._linears(group)) is None:
                self._fuse_group(group)
        return self


def _adopt(cls: type, stock: nn.Module) -> nn.Module:
    """An instance of `cls` holding `stock`'s state: the same parameters, buffers, children, hooks and
    attributes (the dicts themselves, so hook handles taken on `stock` still remove their hooks).
    `stock` must not be used afterwards."""
    new = cls.__new__(cls)
    new.__dict__.update(stock.__dict__)
    return new


# ---- RMSNorm -------------------------------------------------------------------------------------


class FusedRMSNorm(nn.Module):
    """LlamaRMSNorm (Mistral's, Qwen2's: the same) through `qtrain.kernels.rms_norm.rms_norm`; holds
    the stock module's `weight` Parameter and `variance_epsilon`."""

    weight: nn.Parameter
    variance_epsilon: float

    @classmethod
    def from_stock(cls, norm: nn.Module) -> FusedRMSNorm:
        return _adopt(cls, norm)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden_states, self.weight, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, fused"


# ---- MLP -----------------------------------------------------------------------------------------


class FusedMLP(_FusedGroups, nn.Module):
    """down_proj(silu(gate_proj(x)) * up_proj(x)) with gate/up as one product and SwiGLU in one kernel."""

    @classmethod
    def from_stock(cls, mlp: nn.Module, ops: FusedOps) -> tuple[FusedMLP, dict[str, str]]:
        """(the swapped module, {op: why it is off}) for the stock MLP `mlp`."""
        new = _adopt(cls, mlp)
        skipped = {}
        new._groups = {}
        new.fuse_gate_up = ops.gate_up
        if ops.gate_up:
            reason = fusable([getattr(new, n) for n in GATE_UP])
            if reason is None:
                new._groups = {"gate_up": GATE_UP}
                new._fuse_group("gate_up")
            else:
                new.fuse_gate_up = False
                skipped["gate_up"] = reason
        act = getattr(getattr(new, "config", None), "hidden_act", None)
        new.fuse_swiglu = ops.swiglu and act in SILU
        if ops.swiglu and act not in SILU:
            skipped["swiglu"] = f"hidden_act {act!r} is not silu"
        return new, skipped

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self._project("gate_up", x)
        gate, up = gate_up if gate_up is not None else (self.gate_proj(x), self.up_proj(x))
        if self.fuse_swiglu and not _has_hooks(self.act_fn):
            h = swiglu(gate, up)  # [..., I]
        else:
            h = self.act_fn(gate) * up
        return self.down_proj(h)

    def extra_repr(self) -> str:
        return f"fused: gate_up={self.fuse_gate_up}, swiglu={self.fuse_swiglu}"


# ---- attention -----------------------------------------------------------------------------------


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


def _new_cache_api(stock_cls: type) -> bool:
    """Whether the stock attention takes `cache` (transformers >= 5.24) rather than `past_key_values`."""
    return "cache" in inspect.signature(stock_cls.forward).parameters


class FusedAttention(_FusedGroups, nn.Module):
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
        new = _adopt(cls, attn)
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
        own = all(type(m) is LoRALinear and not _has_hooks(m) for m in (self.q_proj, self.k_proj))
        return self.q_proj(x), self.k_proj(x), self.v_proj(x), own

    def _update_cache(self, cache, key, value, cos, sin, kwargs: dict):
        if self.new_cache_api:
            return cache.update(key, value, self.layer_idx, kwargs=kwargs)
        cache_kwargs = {"sin": sin, "cos": cos, "cache_position": kwargs.get("cache_position")}
        return cache.update(key, value, self.layer_idx, cache_kwargs)

    def attend(self, hidden_states, position_embeddings, attention_mask, cache, kwargs: dict):
        """The stock attention forward: projections, RoPE, cache, attention function, o_proj; for a packed
        batch (`PackedBatches` passed cu_seq_lens_q) variable-length attention instead of the function."""
        input_shape = hidden_states.shape[:-1]
        heads = (*input_shape, -1, self.head_dim)
        q, k, v, own = self._qkv(hidden_states)
        cos, sin = position_embeddings
        if self.fuse_rope and own:
            q, k = (t.transpose(1, 2) for t in rotate_own(q, k, cos, sin, heads))
            v = v.view(heads).transpose(1, 2)
        else:
            q, k, v = (t.view(heads).transpose(1, 2) for t in (q, k, v))  # [B, H|KV, S, d]
            q, k = self.rotary(q, k, cos, sin)
        if self._varlen_call(cache, kwargs):
            return self.o_proj(self._attend_varlen(q, k, v, kwargs)), None
        if is_placeholder(attention_mask):
            raise RuntimeError(
                f"qtrain.fused: layer {self.layer_idx} got the packed batch's placeholder mask but cannot run "
                "variable-length attention (a cache, another attn_implementation or is_causal=False set after "
                "apply_fused_ops?); set kernels.varlen=false"
            )
        if cache is not None:
            k, v = self._update_cache(cache, k, v, cos, sin, kwargs)
        if not self.new_cache_api:
            kwargs.pop("cache_position", None)  # a named argument of the stock forward there
        interface = _attention_interface(self.config._attn_implementation, self.eager)
        out, weights = interface(
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
        out = out.reshape(*input_shape, -1).contiguous()  # [B, S, H * d]
        return self.o_proj(out), weights

    def _varlen_call(self, cache, kwargs: dict) -> bool:
        """Whether this call runs variable-length attention: `PackedBatches` passed the examples'
        boundaries, sdpa, no cache, causal."""
        return (
            kwargs.get("cu_seq_lens_q") is not None
            and cache is None
            and self.config._attn_implementation == "sdpa"
            and _causal(kwargs, getattr(self, "is_causal", True))
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


def _forward_for(stock_cls: type) -> Callable:
    """A forward whose cache argument has the stock class's name (hooks, e.g. prefix tuning's, look it up)."""
    return _forward_cache if _new_cache_api(stock_cls) else _forward_past_key_values


class FusedLlamaAttention(FusedAttention, llama.LlamaAttention):
    rotary = staticmethod(llama.apply_rotary_pos_emb)
    eager = staticmethod(llama.eager_attention_forward)
    new_cache_api = _new_cache_api(llama.LlamaAttention)
    forward = _forward_for(llama.LlamaAttention)


class FusedMistralAttention(FusedAttention, mistral.MistralAttention):
    rotary = staticmethod(mistral.apply_rotary_pos_emb)
    eager = staticmethod(mistral.eager_attention_forward)
    new_cache_api = _new_cache_api(mistral.MistralAttention)
    forward = _forward_for(mistral.MistralAttention)

    def window_kwargs(self) -> dict:
        return {"sliding_window": getattr(self.config, "sliding_window", None)}


class FusedQwen2Attention(FusedAttention, qwen2.Qwen2Attention):
    rotary = staticmethod(qwen2.apply_rotary_pos_emb)
    eager = staticmethod(qwen2.eager_attention_forward)
    new_cache_api = _new_cache_api(qwen2.Qwen2Attention)
    forward = _forward_for(qwen2.Qwen2Attention)

    def window_kwargs(self) -> dict:
        return {"sliding_window": getattr(self, "sliding_window", None)}


@dataclass(frozen=True)
class Architecture:
    """The stock module classes of one model type and the fused attention class replacing its attention."""

    attention: type
    mlp: type
    norm: type
    fused_attention: type


ARCHITECTURES = {
    "llama": Architecture(llama.LlamaAttention, llama.LlamaMLP, llama.LlamaRMSNorm, FusedLlamaAttention),
    "mistral": Architecture(
        mistral.MistralAttention, mistral.MistralMLP, mistral.MistralRMSNorm, FusedMistralAttention
    ),
    "qwen2": Architecture(qwen2.Qwen2Attention, qwen2.Qwen2MLP, qwen2.Qwen2RMSNorm, FusedQwen2Attention),
}


# ---- padding-free packing -----------------------------------------------------------------------

VARLEN_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")  # transformers' FlashAttentionKwargs
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


def _causal(kwargs: dict, default: bool) -> bool:
    """Whether this call is causal: its `is_causal` keyword, else `default` (the module's or config's)."""
    causal = kwargs.get("is_causal")
    return (default if causal is None else causal) is True


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
    if not _causal(kwargs, getattr(decoder.config, "is_causal", True)):
        return None
    ids = args[0] if args else kwargs.get("input_ids")
    inputs = ids if ids is not None else kwargs.get("inputs_embeds")
    if inputs is None or position_ids.shape[-1] != inputs.shape[1] or varlen_blocker(decoder, hook) is not None:
        return None
    return position_ids.to(inputs.device).expand(inputs.shape[0], -1)


def is_placeholder(mask) -> bool:
    """Whether `mask` is `PackedBatches`' placeholder: a 4D bool False broadcast from one element."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.dtype != torch.bool or any(mask.stride()):
        return False
    return not mask[0, 0, 0, 0].item()


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


def install_varlen(decoder: nn.Module, name: str, out: Swapped) -> None:
    """Register `PackedBatches` on the decoder when its layers allow it, else record why under `name`."""
    if any(isinstance(h, PackedBatches) for h in decoder._forward_pre_hooks.values()):
        out.skipped[name] = "the padding-free path is already installed"
        return
    reason = varlen_blocker(decoder)
    if reason is not None:
        out.skipped[name] = f"{reason}: packed batches keep transformers' block mask"
        return
    decoder.register_forward_pre_hook(PackedBatches(), with_kwargs=True)
    out.varlen = True


# ---- the swap ------------------------------------------------------------------------------------


def fused_enabled(model: nn.Module, ops: FusedOps) -> bool:
    """Whether to swap: enabled "on", or "auto" with the model on CUDA."""
    first = next(model.parameters(), None)
    return ops.on_for(first.device.type if first is not None else "cpu")


def _swap(parent: nn.Module, child: str, new: nn.Module) -> None:
    setattr(parent, child, new)


def _swap_norm(parent: nn.Module, child: str, arch: Architecture, name: str, out: Swapped) -> None:
    norm = getattr(parent, child, None)
    if type(norm) is not arch.norm:
        out.skipped[name] = f"{type(norm).__name__} is not {arch.norm.__name__} (already fused?)"
        return
    _swap(parent, child, FusedRMSNorm.from_stock(norm))
    out.append(name)


def _swap_layer(layer: nn.Module, prefix: str, arch: Architecture, ops: FusedOps, out: Swapped) -> None:
    if ops.rms_norm:
        for child in ("input_layernorm", "post_attention_layernorm"):
            _swap_norm(layer, child, arch, f"{prefix}.{child}", out)
    if ops.rope or ops.qkv or ops.varlen:
        attn = layer.self_attn
        if type(attn) is arch.attention:
            new, skipped = arch.fused_attention.from_stock(attn, ops)
            _swap(layer, "self_attn", new)
            out.append(f"{prefix}.self_attn")
            out.skipped.update({f"{prefix}.self_attn.{op}": why for op, why in skipped.items()})
        else:
            out.skipped[f"{prefix}.self_attn"] = f"{type(attn).__name__} is not {arch.attention.__name__}"
    if ops.swiglu or ops.gate_up:
        mlp = layer.mlp
        if type(mlp) is arch.mlp:
            new, skipped = FusedMLP.from_stock(mlp, ops)
            _swap(layer, "mlp", new)
            out.append(f"{prefix}.mlp")
            out.skipped.update({f"{prefix}.mlp.{op}": why for op, why in skipped.items()})
        else:
            out.skipped[f"{prefix}.mlp"] = f"{type(mlp).__name__} is not {arch.mlp.__name__}"


def apply_fused_ops(model: nn.Module, ops: FusedOps | None = None) -> Swapped:
    """Swap the fused modules into `model` (an instance, modified in place); returns the swapped
    module names, with `.skipped` = {name: reason} for what was left alone."""
    ops = ops or FusedOps()
    out = Swapped()
    if not fused_enabled(model, ops) or not ops.any_on():
        out.skipped["model"] = f"kernels.enabled={ops.enabled!r}" + ("" if ops.any_on() else ", every op off")
        return out
    model_type = getattr(model.config, "model_type", None)
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        out.skipped["model"] = f"model_type {model_type!r} has no fused modules (only {', '.join(ARCHITECTURES)})"
        return out
    decoder = model.get_decoder()
    names = {id(m): n for n, m in model.named_modules()}
    with torch.no_grad():
        for layer in decoder.layers:
            _swap_layer(layer, names[id(layer)], arch, ops, out)
        if ops.rms_norm:
            _swap_norm(decoder, "norm", arch, f"{names[id(decoder)]}.norm".lstrip("."), out)
    if ops.varlen:
        install_varlen(decoder, f"{names[id(decoder)]}.varlen".lstrip("."), out)
    return out
