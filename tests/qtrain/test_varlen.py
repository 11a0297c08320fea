"""qtrain.fused padding-free packing (op `varlen`): packed batches through variable-length attention
must give what the stock model gives with transformers' [B, 1, S, S] block mask (logits, loss, every
LoRA gradient), build no such mask, and leave every other call (padding, no restarts, a cache,
generation, PEFT methods that hook the attention) on the stock path.

CPU: `enabled="on"` forces the swap; RMSNorm/SwiGLU/RoPE run their PyTorch references (no Triton
interpreter: this file is about the attention path), and variable-length attention runs its CPU
path, `segment_attention` (exact SDPA per example). The CUDA kernels (torch's varlen_attn, or
flash_attn) are checked by the `gpu` tests; their argument translation is checked here on fakes.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import itertools

import pytest
import torch
from qtrain.kernels import varlen
from qtrain.kernels.rms_norm import rms_norm_reference
from qtrain.kernels.swiglu import swiglu_reference
from qtrain.kernels.varlen import packed_segments, segment_attention, varlen_attention
from torch.nn import functional as F
from transformers import DynamicCache, masking_utils
from transformers.models.llama import modeling_llama
from transformers.models.mistral import modeling_mistral
from transformers.models.qwen2 import modeling_qwen2

from qtrain import fused
from qtrain.data import IGNORE_INDEX, Example, collate_packed
from qtrain.fused import FusedOps, apply_fused_ops
from qtrain.fused import attention as fused_attention
from qtrain.fused import mlp as fused_mlp
from qtrain.fused import norm as fused_norm
from qtrain.lora import LoRALinear, LoRASpec
from qtrain.methods.adapters import Houlsby
from qtrain.methods.llama_adapter import LlamaAdapter
from qtrain.methods.prefix import PTuningV2
from qtrain.model import enable_checkpointing, load_model
from qtrain.train import loss_sum

TINY = {"hidden_size": 64, "intermediate_size": 160, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2}
ARCHS = ["llama", "mistral", "qwen2"]
ON = FusedOps(enabled="on")
WINDOW = 5  # Mistral's sliding window in these tests: shorter than most packed examples
LAYERS = 2

# fp32 tolerances. The fused model reorders fp32 sums (fused q/k/v and gate/up products, see
# test_fused.py) and the padding-free path computes each example's softmax over its own keys instead
# of over the row with the other examples' keys masked: a few ulps per op through 2 layers. Measured
# max differences against the stock model with the block mask (llama, mistral, qwen2; plain, gradient
# checkpointing, PEFT methods): logits 4.2e-7 absolute (values ~1), loss 8.7e-8 relative, gradients
# 3.6e-6 of their largest entry (compared relative to it: their scales differ by orders of magnitude).
FP32_TOL = {"rtol": 1e-4, "atol": 1e-5}
GRAD_REL = 1e-4
# attention alone (segment_attention against SDPA with the block mask, fp32): measured 3.0e-7 (output),
# 3.6e-7 (gradients)
ATTN_TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    """Factory: a tiny NF4 model (fp32 compute) per architecture, loaded once per module."""
    cache = {}

    def load(arch):
        if arch not in cache:
            torch.manual_seed(0)
            cache[arch] = load_model(
                str(tiny_checkpoint(arch, **TINY)), LoRASpec(rank=4), compute_dtype=torch.float32
            ).model
        return cache[arch]

    return load


@pytest.fixture
def tiny(loaded):
    """Factory: a fresh tiny NF4 model, LoRA r=4 on every linear with a random B (every A gets a gradient);
    Mistral with a sliding window of WINDOW."""

    def make(arch="llama"):
        model = copy.deepcopy(loaded(arch))
        if arch == "mistral":
            model.config.sliding_window = WINDOW
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, LoRALinear) and m.rank:
                    m.lora_b.weight.copy_(0.05 * torch.randn(m.lora_b.weight.shape, generator=g))
        return model

    return make


@pytest.fixture(autouse=True)
def reference_kernels(monkeypatch):
    """RMSNorm/SwiGLU through their PyTorch references and RoPE through its torch backend (in place)."""
    monkeypatch.setattr(fused_norm, "rms_norm", rms_norm_reference)
    monkeypatch.setattr(fused_mlp, "swiglu", swiglu_reference)
    monkeypatch.setattr(fused_attention, "_rope_backend", lambda x: "torch")


@pytest.fixture
def varlen_calls(monkeypatch):
    """The cu_seqlens of every variable-length attention call (one per layer per forward)."""
    calls: list[list[int]] = []
    real = fused_attention.varlen_attention

    def spy(q, k, v, cu, *args, **kwargs):
        calls.append(cu.tolist())
        return real(q, k, v, cu, *args, **kwargs)

    monkeypatch.setattr(fused_attention, "varlen_attention", spy)
    return calls


@pytest.fixture
def masks(monkeypatch):
    """What the decoder's mask functions returned and the attn_mask of every SDPA call, as
    ("decoder" | "sdpa", shape or None, bytes of its storage)."""
    seen: list[tuple[str, tuple | None, int]] = []

    def record(kind, mask):
        if mask is None:
            seen.append((kind, None, 0))
        else:
            seen.append((kind, tuple(mask.shape), mask.untyped_storage().nbytes()))

    for module in (modeling_llama, modeling_mistral, modeling_qwen2):
        for name in ("create_causal_mask", "create_sliding_window_causal_mask"):
            if hasattr(module, name):
                real = getattr(module, name)

                def spy(*args, _real=real, **kwargs):
                    mask = _real(*args, **kwargs)
                    record("decoder", mask)
                    return mask

                monkeypatch.setattr(module, name, spy)
    sdpa = F.scaled_dot_product_attention

    def sdpa_spy(*args, **kwargs):
        record("sdpa", kwargs.get("attn_mask", args[3] if len(args) > 3 else None))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa_spy)
    return seen


def packed_batch(seed=0) -> dict:
    """Two rows packed by qtrain.data.collate_packed: examples of 7, 9, 5 and 12, 10 tokens in rows of
    24 (padding 3 and 2, continuing the last example's positions). Labels: every token after an
    example's first."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for lengths in ([7, 9, 5], [12, 10]):
        row = []
        for n in lengths:
            ids = torch.randint(4, 100, (n,), generator=g).tolist()
            row.append(Example(ids, [IGNORE_INDEX, *ids[1:]]))
        rows.append(row)
    return collate_packed(rows, pad_id=0, length=24)


EXPECTED_CU = [0, 7, 16, 24, 36, 48]  # the padding joins its row's last example


def forward_backward(model, batch: dict) -> dict:
    """Logits of model(...) (no cache), and the training loss (qtrain.train.loss_sum: decoder + chunked
    lm_head/CE) with the gradients of every trainable parameter."""
    inputs = {k: batch[k] for k in ("input_ids", "position_ids", "attention_mask") if k in batch}
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits
    model.zero_grad(set_to_none=True)
    loss = loss_sum(model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return {"logits": logits, "loss": loss.detach(), "grads": grads}


def assert_same(got: dict, want: dict, rows=None) -> None:
    keep = slice(None) if rows is None else rows
    torch.testing.assert_close(got["logits"][keep], want["logits"][keep], **FP32_TOL)
    torch.testing.assert_close(got["loss"], want["loss"], **FP32_TOL)
    assert got["grads"].keys() == want["grads"].keys() and want["grads"]
    for name, g in want["grads"].items():
        assert g.abs().max() > 0, f"{name}: zero gradient in the stock model (the test would prove nothing)"
        torch.testing.assert_close(got["grads"][name], g, rtol=GRAD_REL, atol=GRAD_REL * g.abs().max().item(), msg=name)


def block_mask_was_built(seen) -> bool:
    return any(kind == "decoder" and shape == (2, 1, 24, 24) and nbytes >= 24 * 24 for kind, shape, nbytes in seen)


def assert_no_row_mask(seen, window=None) -> None:
    """No [B, 1, S, S] mask anywhere: the decoder got the 1-byte placeholder, SDPA no mask (or, with a
    sliding window, a band over one example longer than the window)."""
    decoder = [s for s in seen if s[0] == "decoder"]
    assert decoder and all(shape == (2, 1, 24, 24) and nbytes <= 1 for _, shape, nbytes in decoder)
    sdpa = [s for s in seen if s[0] == "sdpa"]
    assert sdpa
    for _, shape, _ in sdpa:
        assert shape is None or (window is not None and len(shape) == 2 and window < shape[0] <= 12), shape


# ---- the padding-free path equals the block mask -------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_batches_equal_the_block_mask_and_build_no_mask(tiny, varlen_calls, masks, arch):
    model = tiny(arch)
    batch = packed_batch()
    want = forward_backward(model, batch)
    assert block_mask_was_built(masks)  # the stock model really ran transformers' block-causal mask
    assert not varlen_calls
    swapped = apply_fused_ops(model, ON)
    assert swapped.varlen and "model.varlen" not in swapped.skipped
    masks.clear()
    got = forward_backward(model, batch)
    assert_same(got, want)
    assert varlen_calls == [EXPECTED_CU] * (2 * LAYERS)  # logits' forward and the loss's, each layer
    assert_no_row_mask(masks, WINDOW if arch == "mistral" else None)
    if arch == "mistral":  # the window really cut into examples: band masks over the long ones
        assert any(s[0] == "sdpa" and s[1] is not None for s in masks)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_gradient_checkpointing_recomputes_through_the_varlen_path(tiny, varlen_calls, masks, arch):
    """Non-reentrant checkpointing through qtrain.train.loss_sum: the recomputed layers see the
    examples' boundaries too (they travel in the checkpoint's kwargs)."""
    model = tiny(arch).train()
    batch = packed_batch(seed=1)
    want = forward_backward(model, batch)
    apply_fused_ops(model, ON)
    enable_checkpointing(model)
    masks.clear()
    got = forward_backward(model, batch)
    assert_same(got, want)
    assert varlen_calls == [EXPECTED_CU] * (3 * LAYERS)  # logits, loss, and the loss's recomputation
    assert_no_row_mask(masks, WINDOW if arch == "mistral" else None)


# ---- calls that keep the stock path --------------------------------------------------------------


def test_unpacked_batches_and_caches_keep_the_stock_path(tiny, varlen_calls):
    model = tiny("qwen2")
    stock = copy.deepcopy(model)
    apply_fused_ops(model, ON)
    batch = packed_batch()
    ids, pos = batch["input_ids"], batch["position_ids"]
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0  # right padding
    cache = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"  # < 5.24
    calls = {
        "padded 2D mask": {"input_ids": ids, "attention_mask": mask, "use_cache": False},
        "no mask, no positions": {"input_ids": ids, "use_cache": False},
        "no restarts": {"input_ids": ids, "position_ids": torch.arange(24).expand(2, -1), "use_cache": False},
        # use_cache makes a cache: transformers then builds no packed mask either (plain causal rows)
        "a cache": {"input_ids": ids, "position_ids": pos, "use_cache": True},
        "an empty cache": {"input_ids": ids, "position_ids": pos, cache: "empty"},
    }
    for what, inputs in calls.items():
        with torch.no_grad():
            want, got = (
                m(**{k: DynamicCache(config=m.config) if isinstance(v, str) else v for k, v in inputs.items()}).logits
                for m in (stock, model)
            )
        keep = mask.bool() if "attention_mask" in inputs else slice(None)
        torch.testing.assert_close(got[keep], want[keep], **FP32_TOL, msg=what)
        assert varlen_calls == [], what


def test_generation_with_a_cache_equals_stock(tiny, varlen_calls):
    model = tiny("mistral").eval()
    stock = copy.deepcopy(model)
    apply_fused_ops(model, ON)
    ids = packed_batch()["input_ids"][:, :8]
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padded, as qtrain.evaluate.generate
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0, "output_logits": True,
              "return_dict_in_generate": True}  # fmt: skip
    want = stock.generate(input_ids=ids, attention_mask=mask, **kwargs)
    got = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits):
        torch.testing.assert_close(a, b, **FP32_TOL)
    assert varlen_calls == []


def _train_method_params(model, method, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if method.owns(n):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
                p.requires_grad_(True)


@pytest.mark.parametrize(
    ("method", "when", "varlen"),
    [
        (PTuningV2(num_virtual_tokens=3), "before", False),  # self_attn pre-hooks rewrite its mask and cache
        (PTuningV2(num_virtual_tokens=3), "after", False),
        (LlamaAdapter(adapter_len=3, adapter_layers=2), "after", False),  # a forward hook with kwargs
        (Houlsby(bottleneck=8), "before", True),  # output-only hooks on self_attn and mlp
    ],
    ids=["ptuning_v2-before", "ptuning_v2-after", "llama_adapter-after", "houlsby-before"],
)
def test_methods_hooking_the_attention_keep_the_block_mask(tiny, varlen_calls, masks, method, when, varlen):
    """PEFT methods applied before the swap (the reason recorded) or after it (checked per call)."""
    model = tiny("llama")
    if when == "before":
        method = dataclasses.replace(method)  # a fresh instance per model (apply may keep state)
        method.apply(model)
        _train_method_params(model, method, seed=2)
    stock = copy.deepcopy(model)
    swapped = apply_fused_ops(model, ON)
    if when == "after":
        for m in (stock, model):
            dataclasses.replace(method).apply(m)
            _train_method_params(m, method, seed=2)
    assert swapped.varlen == (varlen or when == "after")
    if when == "before" and not varlen:
        assert "sees its arguments" in swapped.skipped["model.varlen"]
    batch = packed_batch()
    want = forward_backward(stock, batch)
    masks.clear()
    got = forward_backward(model, batch)
    assert_same(got, want)
    assert bool(varlen_calls) == varlen
    assert block_mask_was_built(masks) != varlen


# ---- the pieces ----------------------------------------------------------------------------------


def test_packed_segments_match_transformers_packed_sequence_indices():
    batch = packed_batch()
    cu, longest = packed_segments(batch["position_ids"])
    assert cu.dtype == torch.int32 and cu.tolist() == EXPECTED_CU and longest == 12
    # a restart at 0 in the padding (virtual-token rows are padded so) is an example of its own; a
    # jump that is not a restart (positions 0 1 2 7 8) starts one too, as transformers counts them
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 0], [0, 1, 2, 7, 8, 9, 10]])
    cu, longest = packed_segments(pos)
    ids = masking_utils.find_packed_sequence_indices(pos)  # [B, S] example index per token, per row
    starts = [r * 7 + t for r in range(2) for t in range(7) if t == 0 or ids[r, t] != ids[r, t - 1]]
    assert cu.tolist() == [*starts, 14] == [0, 3, 5, 6, 7, 10, 14] and longest == 4
    assert packed_segments(torch.arange(6).expand(3, -1)) is None  # one example per row: not packed


def _block_mask(cu: list[int], total: int, window: int | None) -> torch.Tensor:
    """[T, T] bool: causal within each example (and its window), as transformers' packed mask."""
    example = torch.zeros(total, dtype=torch.long)
    for i, (a, b) in enumerate(itertools.pairwise(cu)):
        example[a:b] = i
    idx = torch.arange(total)
    mask = (example[:, None] == example[None, :]) & (idx[None, :] <= idx[:, None])
    if window is not None:
        mask &= idx[None, :] > idx[:, None] - window
    return mask


@pytest.mark.parametrize("window", [None, 3])
def test_segment_attention_equals_sdpa_with_the_block_mask(window):
    """Odd lengths (1, 6, 2, 9 tokens), GQA (6 query heads over 2 kv heads), a non-default scale;
    output and the gradients of q, k, v."""
    g = torch.Generator().manual_seed(3)
    cu = [0, 1, 7, 9, 18]
    q, k, v = (torch.randn(18, h, 8, generator=g, dtype=torch.float64).float().requires_grad_() for h in (6, 2, 2))
    out = segment_attention(q, k, v, torch.tensor(cu, dtype=torch.int32), scale=0.3, window=window)
    grads = torch.autograd.grad((out * torch.arange(out.numel()).view_as(out).sin()).sum(), (q, k, v))
    kr, vr = (t.repeat_interleave(3, dim=1).transpose(0, 1) for t in (k, v))  # [H, T, d]
    want = F.scaled_dot_product_attention(
        q.transpose(0, 1), kr, vr, attn_mask=_block_mask(cu, 18, window), scale=0.3
    ).transpose(0, 1)  # [T, H, d]
    want_grads = torch.autograd.grad((want * torch.arange(want.numel()).view_as(want).sin()).sum(), (q, k, v))
    torch.testing.assert_close(out, want, **ATTN_TOL)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b, **ATTN_TOL)
    # CPU tensors: varlen_attention is segment_attention
    torch.testing.assert_close(varlen_attention(q, k, v, torch.tensor(cu, dtype=torch.int32), 9, 0.3, window), out)


def _fake_flash(q, k, v, cu, cu_k, max_q, max_k, *, window_size=(-1, -1), is_causal=None, scale=None,
                enable_gqa=False):  # fmt: skip
    """What torch's varlen_attn computes (flash's conventions: window_size (left, right) keys around the
    query, its default scale d^-0.5), through an independent dense computation."""
    assert torch.equal(cu, cu_k) and max_q == max_k
    if k.shape[1] != q.shape[1]:
        assert enable_gqa, "fewer kv heads without enable_gqa"
    causal = is_causal or window_size[1] == 0
    left = window_size[0]
    mask = _block_mask(cu.tolist(), q.shape[0], left + 1 if left >= 0 else None) if causal else None
    groups = q.shape[1] // k.shape[1]
    kr, vr = (t.repeat_interleave(groups, dim=1).transpose(0, 1) for t in (k, v))
    return F.scaled_dot_product_attention(q.transpose(0, 1), kr, vr, attn_mask=mask, scale=scale).transpose(0, 1)


def _varlen_attn_2_11(q, k, v, cu_q, cu_k, max_q, max_k, *, window_size=(-1, -1), scale=None, enable_gqa=False):
    return _fake_flash(q, k, v, cu_q, cu_k, max_q, max_k, window_size=window_size, scale=scale, enable_gqa=enable_gqa)


def _varlen_attn_2_9(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False, return_aux=None):
    return _fake_flash(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=is_causal, enable_gqa=True)


SIGNATURES = {"window_size": _varlen_attn_2_11, "is_causal": _varlen_attn_2_9}  # torch 2.11+ (2.13 here); 2.9, 2.10


@pytest.mark.parametrize("signature", list(SIGNATURES))
@pytest.mark.parametrize("window", [None, 4])
def test_torch_varlen_arguments_follow_its_signature(monkeypatch, signature, window):
    """varlen._torch_varlen_call on fakes with each torch version's signature: the window in flash's
    convention (W - 1 keys to the left), GQA, the scale passed or folded into q; None where the
    signature cannot express the call (a sliding window on torch 2.9/2.10)."""
    fake = SIGNATURES[signature]
    monkeypatch.setattr(varlen, "_torch_varlen", lambda: (fake, frozenset(inspect.signature(fake).parameters)))
    g = torch.Generator().manual_seed(4)
    cu = torch.tensor([0, 5, 6, 13], dtype=torch.int32)
    q, k, v = (torch.randn(13, h, 8, generator=g) for h in (4, 2, 2))
    got = varlen._torch_varlen_call(q, k, v, cu, 7, 0.2, window)
    if signature == "is_causal" and window:
        assert got is None  # varlen_attention then takes segment_attention
        return
    torch.testing.assert_close(got, segment_attention(q, k, v, cu, 0.2, window), **ATTN_TOL)


# ---- switches and reasons ------------------------------------------------------------------------


def test_varlen_off_other_attention_and_unfused_layers_record_why(tiny, varlen_calls):
    batch = packed_batch()
    model = tiny("llama")
    swapped = apply_fused_ops(model, FusedOps(enabled="on", varlen=False))
    assert not swapped.varlen and "model.varlen" not in swapped.skipped
    forward_backward(model, batch)
    assert varlen_calls == []
    model = tiny("llama")
    model.set_attn_implementation("eager")
    swapped = apply_fused_ops(model, ON)
    assert not swapped.varlen and "'eager' is not sdpa" in swapped.skipped["model.varlen"]
    again = apply_fused_ops(model, ON)  # the attention already fused: nothing swapped, the hook not doubled
    assert again == [] and "already" not in again.skipped["model.varlen"]
    model = tiny("llama")
    swapped = apply_fused_ops(model, ON)
    assert "already installed" in apply_fused_ops(model, ON).skipped["model.varlen"]
    assert sum(isinstance(h, fused.PackedBatches) for h in model.model._forward_pre_hooks.values()) == 1
    with pytest.raises(ValueError, match="kernels.varlen"):
        FusedOps(varlen="yes")


def test_a_layer_that_cannot_take_the_varlen_path_raises_instead_of_using_the_placeholder(tiny, monkeypatch):
    model = tiny("llama")
    apply_fused_ops(model, ON)
    monkeypatch.setattr(fused.FusedAttention, "_varlen_call", lambda self, cache, kwargs: False)
    with pytest.raises(RuntimeError, match="placeholder mask"):
        forward_backward(model, packed_batch())
    assert not fused.is_placeholder(torch.ones((), dtype=torch.bool).expand(2, 1, 4, 4))  # an all-visible mask
    assert not fused.is_placeholder(torch.zeros(2, 1, 4, 4, dtype=torch.bool))  # a real (materialized) mask


# ---- GPU (skipped without CUDA) -----------------------------------------------------------------


def _gpu_case():
    """S = 4096 packed with 10 examples of uneven lengths, 32 heads over 8 kv heads, d = 128, bf16."""
    lengths = [700, 123, 511, 64, 1000, 300, 77, 450, 600, 271]
    assert sum(lengths) == 4096
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(4096, h, 128, generator=g, device="cuda", dtype=torch.bfloat16) for h in (32, 8, 8))
    dout = torch.randn(4096, 32, 128, generator=g, device="cuda", dtype=torch.bfloat16)
    return cu, max(lengths), q, k, v, dout


def _block_masked(q, k, v, cu, window):
    """SDPA over the whole row with transformers' block mask [1, 1, S, S] (the stock path)."""
    mask = _block_mask(cu.tolist(), q.shape[0], window).to(q.device)[None, None]
    kr, vr = (t.repeat_interleave(4, dim=1).transpose(0, 1)[None] for t in (k, v))
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], kr, vr, attn_mask=mask, scale=128**-0.5)
    return out[0].transpose(0, 1)


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 1024])
def test_gpu_bf16_varlen_kernel_equals_the_block_mask_path(monkeypatch, window):
    """The CUDA path (flash_attn or torch's varlen_attn) in bf16 against the block-masked SDPA in bf16,
    both measured against fp32: the output and the q/k/v gradients are as accurate (bf16 rounds
    differently in each: ~4e-3 relative per rounding, so they are compared through their errors)."""
    cu, longest, q, k, v, dout = _gpu_case()
    assert varlen._flash_attn_varlen() is not None or varlen._torch_varlen() is not None, "no CUDA varlen kernel"

    def run(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        out.backward(dout.to(dtype))
        return [out.detach().float(), *(t.grad.float() for t in leaves)]

    calls = []
    segment = varlen.segment_attention
    monkeypatch.setattr(varlen, "segment_attention", lambda *a, **kw: calls.append(1) or segment(*a, **kw))
    got = run(lambda *t: varlen_attention(*t, cu, longest, 128**-0.5, window), torch.bfloat16)
    assert calls == []  # a CUDA kernel ran, not the per-example loop
    stock = run(lambda *t: _block_masked(*t, cu, window), torch.bfloat16)
    ref = run(lambda *t: _block_masked(*t, cu, window), torch.float32)
    for name, a, b, r in zip(("out", "dq", "dk", "dv"), got, stock, ref):
        scale = r.abs().max()
        err, err_stock = ((a - r).abs().max() / scale).item(), ((b - r).abs().max() / scale).item()
        assert err <= 2 * err_stock + 2e-3, (name, err, err_stock)
        assert ((a - b).abs().max() / scale).item() <= 2e-2, name  # bf16 against bf16: a few roundings


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_gpu_bf16_packed_model_equals_the_block_mask(tiny_checkpoint, varlen_calls, masks, monkeypatch, arch):
    """A packed bf16 model on CUDA (fused modules, the CUDA varlen kernel; Mistral with a window shorter
    than its examples) against the same model with the block mask: the training loss and every LoRA
    gradient as accurate against fp32 (bf16: ~4e-3 relative per rounding, compared through their
    errors), and no [B, 1, S, S] mask."""
    dims = {"hidden_size": 512, "intermediate_size": 1408, "num_layers": 2, "num_heads": 8, "num_kv_heads": 2}
    torch.manual_seed(0)
    model = load_model(str(tiny_checkpoint(arch, **dims)), LoRASpec(rank=16), compute_dtype=torch.bfloat16,
                       device="cuda").model  # fmt: skip
    if arch == "mistral":
        model.config.sliding_window = 256
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear) and m.rank:
                m.lora_b.weight.normal_(0, 0.02)
    g = torch.Generator().manual_seed(0)
    rows = [[Example(torch.randint(4, 100, (n,), generator=g).tolist(), [IGNORE_INDEX] * n) for n in lengths]
            for lengths in ([300, 500, 180], [700, 250])]  # fmt: skip
    for row in rows:
        for e in row:
            e.labels[1:] = e.input_ids[1:]
    batch = {k: v.cuda() for k, v in collate_packed(rows, pad_id=0, length=1024).items()}

    def run(m):
        m.zero_grad(set_to_none=True)
        loss = loss_sum(m, batch)
        loss.backward()
        return {
            "loss": loss.detach().float(),
            **{n: p.grad.float() for n, p in m.named_parameters() if p.requires_grad},
        }

    ref = run(copy.deepcopy(model).float())
    stock = run(model)
    swapped = apply_fused_ops(model, FusedOps())
    assert swapped.varlen
    loops = []
    masks.clear()
    segment = varlen.segment_attention
    monkeypatch.setattr(varlen, "segment_attention", lambda *a, **kw: loops.append(1) or segment(*a, **kw))
    got = run(model)
    assert len(varlen_calls) == 2 and loops == []  # both layers through a CUDA varlen kernel
    assert all(nbytes <= 1 for kind, _, nbytes in masks) and masks  # the placeholder only: no mask built
    for name, r in ref.items():
        scale = r.abs().max()
        err, err_stock = ((got[name] - r).abs().max() / scale).item(), ((stock[name] - r).abs().max() / scale).item()
        assert err <= 2 * err_stock + 2e-3, (name, err, err_stock)
