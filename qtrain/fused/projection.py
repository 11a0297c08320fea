"""The fused NF4 + LoRA projection: several projections that read the same X as ONE product.

Op `qkv` (q/k/v) and op `gate_up` (gate/up):
    [q | k | v] = X [Wq; Wk; Wv]^T + s X A_cat^T B_bd^T + [bq; bk; bv]
A_cat = [Aq; Ak; Av] [rq+rk+rv, K], B_bd = blockdiag(Bq, Bk, Bv) [Nq+Nk+Nv, rq+rk+rv]: the existing
`nf4_lora` kernel and autograd run unchanged (backend from the projections), and autograd of
cat/block_diag sends each projection's gradient to its own lora_a/lora_b (and bias). Unequal LoRA
scales are folded into the blocks (s_i B_i, s = 1); a rank-0 projection is a zero-width block. The
output is split by `columns` (`unsafe_split_with_sizes`): no copy, and the backward is one
concatenation of the gradients (slicing made a zero-filled full-width gradient per block, summed).

No extra base-weight memory: at swap time the 4-bit codes of the fused projections are concatenated
into ONE uint8 buffer and each projection's own `nf4_packed` becomes a view (slice) of it, so the
fused weight is the same bytes read as one [N, K] NF4 matrix. The quantization blocks (64 values)
must not straddle projections: each N_i * K must be a multiple of 64 (true for every real model;
else that fusion is skipped, the reason recorded). Each projection's double-quantized absmax (uint8
+ per-256 fp32 scales + one offset per weight) cannot be concatenated (one offset per weight), so
the fused weight carries its block absmax dequantized once to fp32 (`qkv_absmax` / `gate_up_absmax`,
non-persistent buffers): bit-identical dequantization, at an EXTRA 4 bytes per 64 fused weights
(0.0625 byte per weight, 12.5% of those projections' 4-bit codes; Llama-3-8B: 1.6 MB for q/k/v and
7.3 MB for gate/up per layer, ~285 MB over 32 layers). A device move (`model.to`/`.cuda()`) moves
each view on its own; `FusedGroups._apply` concatenates and re-binds them again, and keeps the
absmax in fp32 whatever `.to(dtype)` asks.

Per-call fallback to the stock computation (each projection called as a module), whenever fusing
would not be the same function: a forward hook / pre-hook (or backward hook) on any of the fused
projections (PEFT methods such as (IA)^3 or AdaLoRA hook them), DoRA on any of them, a base that is
not NF4 (quantize=False), projections no longer sharing the concatenated codes (a weight replaced, a
merge), different LoRA dtypes or backends, and CUDA inputs when the NF4 backend resolves to torch
(pre-Ampere GPUs, no triton: that backend dequantizes the whole weight first, so a fused one is
only a bigger transient for the same work; CPU keeps the fused torch path, which the tests use).
Global module hooks (torch.nn.modules.module.register_module_forward_hook) are not looked at: they
would not see the fused projections' calls. LoRA dropout in training keeps the base fused and adds
each projection's own low-rank term with its own dropout mask, drawn in the stock order (q, k, v;
gate, up): the same random numbers as the stock modules.
"""

from __future__ import annotations

import torch
from torch import nn

from qtrain.kernels.nf4_lora import lora_delta, nf4_lora, resolve_backend
from qtrain.lora import LoRALinear
from qtrain.nf4 import NF4Tensor, block_absmax


def has_hooks(m: nn.Module) -> bool:
    """Whether a module hook would see m's call (read only): a fused call would skip it, so it falls back."""
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def fusable(linears: list[nn.Module]) -> str | None:
    """Why these projections cannot share one NF4 weight (None: they can). Checked once, at swap time."""
    if not all(type(m) is LoRALinear for m in linears):
        return "not all projections are qtrain LoRALinear layers"
    if not all(m.quantize_base and m.has_nf4 for m in linears):
        return "the base is not NF4-quantized (quantize=False): stock projections"
    if any(m.nf4_in_rows for m in linears):
        return "the NF4 base is sharded across ranks (qtrain.fsdp): each projection keeps its own rows"
    first = linears[0]
    for m in linears:
        if m.in_features != first.in_features or len(m.nf4_shape) != 2:
            return "the projections read inputs of different widths"
        if m.nf4_dtype != first.nf4_dtype or m.nf4_blocksize != first.nf4_blocksize:
            return "the NF4 weights differ in dtype or blocksize"
        if not torch.equal(m.nf4_code, first.nf4_code) or not m.nf4_packed.is_contiguous():
            return "the NF4 weights use different code tables"
        numel = m.in_features * m.out_features
        if numel % first.nf4_blocksize or numel % 2:
            return (
                f"{m.out_features} x {m.in_features} weights split NF4 blocks of {first.nf4_blocksize}: "
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
    rows = sum(m.out_features for m in linears)
    if absmax.numel() * first.nf4_blocksize != rows * first.in_features:
        return None
    return NF4Tensor(
        packed=codes,
        absmax=absmax,
        shape=torch.Size((rows, first.in_features)),
        dtype=first.nf4_dtype,
        code=first.nf4_code,
        blocksize=first.nf4_blocksize,
    )


def blocked(linears: list[nn.Module]) -> bool:
    """Whether this call must run the stock projections (see the module docstring)."""
    first = linears[0]
    for m in linears:
        if type(m) is not LoRALinear or has_hooks(m) or m.use_dora or not m.quantize_base:
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


class FusedGroups:
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
