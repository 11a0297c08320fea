"""qtrain.fused: fused RMSNorm / RoPE / SwiGLU / q-k-v and gate-up projections swapped into tiny
NF4 + LoRA models must compute what the stock modules compute (logits, loss, every trainable
gradient), with packing, a padded mask, gradient checkpointing, generation with a cache, PEFT
methods hooking the projections or the attention/MLP, and without extra 4-bit code bytes.

CPU: `enabled="on"` forces the swap; the Triton kernels then run under the Triton interpreter
(TRITON_INTERPRET=1, set by tests/conftest.py). The interpreter is slow, so the scenario tests use
the `reference_kernels` fixture: RMSNorm/SwiGLU/RoPE run their PyTorch references (RoPE still in
place on the fused output's views), while the fusion logic, the attention and the fallbacks under
test are the same code. The parity tests run every kernel under the interpreter. The padding-free
packing path (op `varlen`) has its own file, test_varlen.py.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from qtrain.kernels.rms_norm import rms_norm_reference
from qtrain.kernels.swiglu import swiglu_reference

from qtrain import fused
from qtrain.fused import FusedAttention, FusedMLP, FusedOps, FusedRMSNorm, apply_fused_ops, projection
from qtrain.fused import attention as fused_attention
from qtrain.fused import mlp as fused_mlp
from qtrain.fused import norm as fused_norm
from qtrain.lora import LoRALinear, LoRASpec
from qtrain.methods.adapters import Houlsby
from qtrain.methods.bitfit import BitFit
from qtrain.methods.ia3 import IA3
from qtrain.methods.prefix import PTuningV2
from qtrain.model import enable_checkpointing, load_model
from qtrain.train import loss_sum

TINY = {"hidden_size": 64, "intermediate_size": 160, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2}
ODD = {"hidden_size": 40, "intermediate_size": 70, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2}
ARCHS = ["llama", "mistral", "qwen2"]
ON = FusedOps(enabled="on")

# fp32 tolerances. Fusing reorders fp32 sums (one matmul over the concatenated outputs, the LoRA
# product through a block-diagonal B, the kernels' own reductions) and RoPE rounds once instead of
# after each product: a few fp32 ulps per op, through 2 layers. Measured max differences (llama,
# mistral, qwen2; torch and Triton NF4 backends): logits <= 7.2e-7 absolute (values ~1), loss 0,
# gradients <= 4.4e-6 of their largest entry. Gradients are compared relative to that largest entry
# (GRAD_REL), since their scales differ by orders of magnitude between tensors.
FP32_TOL = {"rtol": 1e-4, "atol": 1e-5}
GRAD_REL = 1e-4


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    """Factory: a tiny NF4 model (fp32 compute) per argument set, loaded once per module (load_model
    is the slow part); `tiny` hands out copies."""
    cache = {}

    def load(arch, lora, quantize, dims, backend):
        key = (arch, repr(lora), quantize, repr(dims), backend)
        if key not in cache:
            torch.manual_seed(0)
            path = tiny_checkpoint(arch, **dims)
            cache[key] = load_model(
                str(path), lora, compute_dtype=torch.float32, quantize=quantize, backend=backend
            ).model
        return cache[key]

    return load


@pytest.fixture
def tiny(loaded):
    """Factory: a fresh tiny NF4 model, LoRA r=4 on every linear with a random B so that every A gets
    a gradient at once."""

    def make(arch="llama", lora=None, quantize=True, dims=TINY, backend="auto", sliding_window=None):
        model = copy.deepcopy(loaded(arch, lora or LoRASpec(rank=4), quantize, dims, backend))
        if sliding_window is not None:
            model.config.sliding_window = sliding_window
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, LoRALinear) and m.rank:
                    m.lora_b.weight.copy_(0.05 * torch.randn(m.lora_b.weight.shape, generator=g))
        return model

    return make


@pytest.fixture
def reference_kernels(monkeypatch):
    """RMSNorm/SwiGLU through their PyTorch references and RoPE through its torch backend (in place)."""
    monkeypatch.setattr(fused_norm, "rms_norm", rms_norm_reference)
    monkeypatch.setattr(fused_mlp, "swiglu", swiglu_reference)
    monkeypatch.setattr(fused_attention, "_rope_backend", lambda x: "torch")


@pytest.fixture
def fused_calls(monkeypatch):
    """The outputs widths of the fused projection calls that ran fused (None: fell back to the stock modules)."""
    calls: list[int | None] = []
    real = projection.fused_projection

    def spy(x, linears, absmax):
        y = real(x, linears, absmax)
        calls.append(None if y is None else y.shape[-1])
        return y

    monkeypatch.setattr(projection, "fused_projection", spy)
    return calls


def tokens(rows=2, length=9, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 100, (rows, length), generator=g)


def run(model, **inputs) -> dict:
    """Logits, loss and the gradients of every trainable parameter of one forward/backward."""
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return {"logits": out.logits.detach(), "loss": out.loss.detach(), "grads": grads}


def assert_same(got: dict, want: dict, positions=None) -> None:
    cols = slice(None) if positions is None else positions
    torch.testing.assert_close(got["logits"][cols], want["logits"][cols], **FP32_TOL)
    torch.testing.assert_close(got["loss"], want["loss"], **FP32_TOL)
    assert got["grads"].keys() == want["grads"].keys() and want["grads"]
    for name, g in want["grads"].items():
        assert g.abs().max() > 0, f"{name}: zero gradient in the stock model (the test would prove nothing)"
        torch.testing.assert_close(got["grads"][name], g, rtol=GRAD_REL, atol=GRAD_REL * g.abs().max().item(), msg=name)


def fused_vs_stock(model, ops=ON, **inputs) -> tuple[dict, dict, list]:
    stock = run(model, **inputs)
    swapped = apply_fused_ops(model, ops)
    return run(model, **inputs), stock, swapped


def storages(model, name: str) -> dict[int, int]:
    """{storage address: bytes} of the buffers called `name` (shared storage counted once)."""
    return {b.untyped_storage().data_ptr(): b.untyped_storage().nbytes() for n, b in model.named_buffers()
            if n.rpartition(".")[2] == name}  # fmt: skip


# ---- parity, every kernel (Triton interpreter) ----------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_model_equals_stock_logits_loss_and_every_gradient(tiny, fused_calls, arch):
    model = tiny(arch, sliding_window=5 if arch == "mistral" else None)  # Mistral: a window shorter than the input
    params = dict(model.named_parameters())
    keys = list(model.state_dict())
    ids = tokens()
    got, want, swapped = fused_vs_stock(model, input_ids=ids, labels=ids)
    assert_same(got, want)
    assert fused_calls == [64 + 2 * 32, 2 * 160] * 2  # q/k/v and gate/up of both layers ran fused
    layers = [f"model.layers.{i}.{m}" for i in range(2) for m in ("input_layernorm", "post_attention_layernorm")]
    layers += [f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn", "mlp")]
    assert sorted(swapped) == sorted([*layers, "model.norm"]) and swapped.skipped == {}
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn, FusedAttention) and isinstance(layer.mlp, FusedMLP)
    assert isinstance(layer.input_layernorm, FusedRMSNorm) and isinstance(model.model.norm, FusedRMSNorm)
    assert layer.self_attn.fuse_qkv and layer.self_attn.fuse_rope and layer.mlp.fuse_gate_up and layer.mlp.fuse_swiglu
    # the same Parameter objects under the same names; state-dict keys unchanged
    assert dict(model.named_parameters()).keys() == params.keys()
    assert all(p is params[n] for n, p in model.named_parameters())
    assert list(model.state_dict()) == keys
    assert "model.layers.0.self_attn.q_proj.lora_a.weight" in params


def test_triton_nf4_backend_fused_projections_equal_stock(tiny, reference_kernels, fused_calls):
    """The fused q/k/v and gate/up through the Triton NF4 + LoRA kernels (interpreter)."""
    model = tiny("qwen2", backend="triton")  # qwen2: the concatenated q/k/v biases through the kernel too
    ids = tokens(rows=1, length=5)
    got, want, _ = fused_vs_stock(model, input_ids=ids, labels=ids)
    assert_same(got, want)
    assert len(fused_calls) == 4 and None not in fused_calls


# ---- scenarios (reference kernels) ----------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_packing_position_ids_restart_without_mask(tiny, reference_kernels, fused_calls, arch):
    model = tiny(arch)
    ids = tokens(length=10)
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5, 6, 0, 1, 2]])
    # use_cache=False: with a cache (model.config.use_cache) transformers builds no block mask at all
    got, want, _ = fused_vs_stock(model, input_ids=ids, position_ids=pos, labels=ids, use_cache=False)
    assert_same(got, want)
    assert len(fused_calls) == 4 and None not in fused_calls


@pytest.mark.parametrize("arch", ARCHS)
def test_padded_attention_mask(tiny, reference_kernels, fused_calls, arch):
    model = tiny(arch)
    ids = tokens(length=9)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    mask[1, 7:] = 0  # right padding
    labels = ids.masked_fill(mask == 0, -100)
    got, want, _ = fused_vs_stock(model, input_ids=ids, attention_mask=mask, labels=labels)
    assert_same(got, want, positions=mask.bool())
    assert len(fused_calls) == 4 and None not in fused_calls


@pytest.mark.parametrize("arch", ARCHS)
def test_gradient_checkpointing_non_reentrant_through_the_training_loss(tiny, reference_kernels, fused_calls, arch):
    """qtrain.train's path: decoder + chunked lm_head/CE, layers recomputed in backward (in-place RoPE too)."""
    model = tiny(arch)
    model.train()
    ids = tokens(length=9)
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    loss = loss_sum(model, batch)
    loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    apply_fused_ops(model, ON)
    enable_checkpointing(model)
    calls = []
    model.model.layers[0].self_attn.register_forward_pre_hook(lambda *_: calls.append(1))
    model.zero_grad(set_to_none=True)
    fused_loss = loss_sum(model, batch)
    fused_loss.backward()
    assert len(calls) == 2  # the layer was recomputed in backward
    assert len(fused_calls) == 8 and None not in fused_calls  # 2 groups x 2 layers, forward and recomputation
    torch.testing.assert_close(fused_loss, loss, **FP32_TOL)
    for name, g in want.items():
        got = dict(model.named_parameters())[name].grad
        torch.testing.assert_close(got, g, rtol=GRAD_REL, atol=GRAD_REL * g.abs().max().item(), msg=name)


def generate(model, ids, mask):
    return model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0,
        output_logits=True, return_dict_in_generate=True,
    )  # fmt: skip


@pytest.mark.parametrize("arch", ARCHS)
def test_generation_with_cache_equals_stock_and_recompute(tiny, reference_kernels, fused_calls, arch):
    model = tiny(arch).eval()
    ids, mask = tokens(length=6), torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0  # left padded, as qtrain.evaluate.generate
    want = generate(model, ids, mask)
    apply_fused_ops(model, ON)
    got = generate(model, ids, mask)
    assert len(fused_calls) == 4 * 5 and None not in fused_calls  # prefill + 4 decode steps (the 5th token needs none)
    assert torch.equal(got.sequences, want.sequences)
    seq, m = ids, mask
    for step in range(5):
        torch.testing.assert_close(got.logits[step], want.logits[step], **FP32_TOL)
        pos = (m.cumsum(-1) - 1).clamp(min=0)  # recompute the whole sequence, positions as generate makes them
        with torch.no_grad():
            last = model(input_ids=seq, attention_mask=m, position_ids=pos, use_cache=False).logits[:, -1]
        torch.testing.assert_close(got.logits[step], last, **FP32_TOL)
        nxt = got.sequences[:, 6 + step : 7 + step]
        seq, m = torch.cat([seq, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)


def test_eager_attention_and_captured_attention_weights(tiny, reference_kernels):
    """attn_implementation eager; output_attentions still captured (the fused class is a LlamaAttention)."""
    model = tiny("llama")
    model.set_attn_implementation("eager")
    ids = tokens()
    with torch.no_grad():
        want = model(input_ids=ids, output_attentions=True)
        apply_fused_ops(model, ON)
        got = model(input_ids=ids, output_attentions=True)
    torch.testing.assert_close(got.logits, want.logits, **FP32_TOL)
    assert len(got.attentions) == len(want.attentions) == 2
    for a, b in zip(got.attentions, want.attentions):
        torch.testing.assert_close(a, b, **FP32_TOL)


# ---- memory --------------------------------------------------------------------------------------


def test_no_extra_nf4_code_bytes_and_documented_absmax_bytes(tiny, reference_kernels):
    model = tiny("llama")
    codes_before = sum(storages(model, "nf4_packed").values())
    assert len(storages(model, "nf4_packed")) == 14  # 7 linears x 2 layers, one storage each
    apply_fused_ops(model, ON)
    codes = storages(model, "nf4_packed")
    assert sum(codes.values()) == codes_before  # concatenated, not copied: the same bytes
    assert len(codes) == 2 * 4  # per layer: q/k/v share one storage, gate/up one, o_proj and down_proj their own
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    ptr = {m.nf4_packed.untyped_storage().data_ptr() for m in (attn.q_proj, attn.k_proj, attn.v_proj)}
    assert len(ptr) == 1
    # the extra bytes: the fused weights' absmax in fp32, 4 bytes per 64 weights
    extra = sum(
        b.numel() * b.element_size() for n, b in model.named_buffers() if n.endswith("_absmax") and "proj" not in n
    )
    d, i, kv = 64, 160, 2 * 16
    assert extra == 2 * 4 * ((d * (d + 2 * kv)) // 64 + (2 * i * d) // 64)
    assert attn.qkv_absmax.dtype == mlp.gate_up_absmax.dtype == torch.float32


def test_moved_views_are_shared_again_and_absmax_stays_fp32(tiny, reference_kernels):
    """A device move copies each view on its own (simulated: every tensor cloned); the fused modules
    concatenate them again. `.to(dtype)` leaves the fused absmax in fp32."""
    model = tiny("llama")
    ids = tokens()
    with torch.no_grad():
        want = model(input_ids=ids).logits
    apply_fused_ops(model, ON)
    absmax = model.model.layers[0].self_attn.qkv_absmax.clone()
    codes_before = sum(storages(model, "nf4_packed").values())
    model._apply(lambda t: t.clone())
    assert len(storages(model, "nf4_packed")) == 8 and sum(storages(model, "nf4_packed").values()) == codes_before
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, want, **FP32_TOL)
    model.to(torch.float16)
    assert torch.equal(model.model.layers[0].self_attn.qkv_absmax, absmax)  # still fp32, the same values
    assert len(storages(model, "nf4_packed")) == 8


# ---- fallbacks and composition ------------------------------------------------------------------


def test_ia3_hooks_on_the_projections_fall_back_to_the_stock_computation(tiny, reference_kernels, fused_calls):
    model = tiny("llama")
    stock = copy.deepcopy(model)
    apply_fused_ops(model, ON)
    methods = []
    for m in (stock, model):  # (IA)^3 applied after the swap: hooks on k/v/down_proj
        method = IA3(target_modules=["k_proj", "v_proj", "up_proj", "down_proj"], feedforward_modules=["down_proj"])
        method.apply(m)
        methods.append(method)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if n.endswith("ia3_l"):
                    p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
                    p.requires_grad_(True)
    ids = tokens()
    assert_same(run(model, input_ids=ids, labels=ids), run(stock, input_ids=ids, labels=ids))
    assert fused_calls == [None] * 4  # both groups of both layers carry a hook: stock projections
    calls = []
    model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *_: calls.append(1))
    model(input_ids=ids)
    assert calls == [1]  # q_proj ran as a module: the group fell back, every hook sees its call


@pytest.mark.parametrize("first", ["prefix", "houlsby"])
def test_prefix_tuning_and_houlsby_adapters_compose_before_and_after_the_swap(tiny, reference_kernels, first):
    """One method applied before the swap (its self_attn/mlp hooks carried over), the other after."""

    def methods(m):
        out = [PTuningV2(num_virtual_tokens=3), Houlsby(bottleneck=8)]
        return out if first == "prefix" else out[::-1]

    model = tiny("llama")
    a, b = methods(model)
    a.apply(model)
    stock = copy.deepcopy(model)
    b.apply(stock)
    apply_fused_ops(model, ON)
    b2 = methods(model)[1]
    b2.apply(model)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in stock.named_parameters():
            if a.owns(n) or b.owns(n):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
                p.requires_grad_(True)
        for n, p in model.named_parameters():
            if a.owns(n) or b2.owns(n):
                p.copy_(dict(stock.named_parameters())[n])
                p.requires_grad_(True)
    ids = tokens()
    assert_same(run(model, input_ids=ids, labels=ids), run(stock, input_ids=ids, labels=ids))
    model.eval()
    stock.eval()
    mask = torch.ones(2, 9, dtype=torch.long)
    assert torch.equal(generate(model, ids, mask).sequences, generate(stock, ids, mask).sequences)


def test_dora_and_unquantized_bases_fall_back(tiny, reference_kernels, fused_calls):
    model = tiny("llama", lora=LoRASpec(rank=4, use_dora=True))
    ids = tokens()
    got, want, swapped = fused_vs_stock(model, input_ids=ids, labels=ids)
    assert_same(got, want)
    assert fused_calls == [None] * 4
    assert model.model.layers[0].self_attn.fuse_qkv  # fusable weights; DoRA makes each call take the stock path
    model = tiny("llama", quantize=False)
    got, want, swapped = fused_vs_stock(model, input_ids=ids, labels=ids)
    assert_same(got, want)
    assert "quantize=False" in swapped.skipped["model.layers.0.self_attn.qkv"]
    assert "quantize=False" in swapped.skipped["model.layers.1.mlp.gate_up"]
    assert fused_calls == [None] * 4  # no group to fuse: the projections run as modules


def test_lora_dropout_in_training_draws_the_stock_masks(tiny, reference_kernels, fused_calls):
    model = tiny("mistral", lora=LoRASpec(rank=4, dropout=0.3)).train()
    ids = tokens()
    torch.manual_seed(5)
    want = run(model, input_ids=ids, labels=ids)
    apply_fused_ops(model, ON)
    torch.manual_seed(5)
    assert_same(run(model, input_ids=ids, labels=ids), want)
    assert len(fused_calls) == 4 and None not in fused_calls


def test_different_ranks_scales_and_unadapted_projections(tiny, reference_kernels, fused_calls):
    """k_proj and gate_proj without LoRA (zero-width blocks), v_proj at another scale (folded into B)."""
    model = tiny("qwen2", lora=LoRASpec(rank=4, target_modules=["q_proj", "v_proj", "up_proj", "o_proj"]))
    for layer in model.model.layers:
        layer.self_attn.v_proj.scale = 3.5
    ids = tokens()
    got, want, _ = fused_vs_stock(model, input_ids=ids, labels=ids)
    assert_same(got, want)
    assert len(fused_calls) == 4 and None not in fused_calls
    assert not any("k_proj.lora" in n for n in got["grads"])


def test_bitfit_biases_train_through_the_concatenated_bias(tiny, reference_kernels, fused_calls):
    """BitFit on k_proj and up_proj only (applied after the swap): q/v and gate get zero bias blocks."""
    model = tiny("llama")
    stock = copy.deepcopy(model)
    apply_fused_ops(model, ON)
    for m in (stock, model):
        BitFit(target_modules=["k_proj", "up_proj"]).apply(m)
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if n.endswith(".bias"):
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
    ids = tokens()
    got, want = run(model, input_ids=ids, labels=ids), run(stock, input_ids=ids, labels=ids)
    assert_same(got, want)
    assert "model.layers.1.mlp.up_proj.bias" in got["grads"]
    assert len(fused_calls) == 4 and None not in fused_calls


def test_odd_shapes_skip_the_projection_fusion_with_a_reason(tiny):
    """hidden 40, head_dim 10: k/v weights of 20 x 40 split NF4 blocks of 64; RoPE/norms/SwiGLU still fuse
    (every kernel under the interpreter, forward only)."""
    model = tiny("llama", dims=ODD)
    ids = tokens(rows=1, length=5)
    with torch.no_grad():
        want = model(input_ids=ids).logits
        swapped = apply_fused_ops(model, ON)
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, **FP32_TOL)
    assert "straddle" in swapped.skipped["model.layers.0.self_attn.qkv"]
    assert "straddle" in swapped.skipped["model.layers.0.mlp.gate_up"]
    assert "model.layers.0.self_attn" in swapped and not model.model.layers[0].self_attn.fuse_qkv


@pytest.mark.parametrize("op", fused.OPS)
def test_each_op_alone(tiny, op):
    """One op on, the others off: only its modules swap, and the output is the stock one (interpreter)."""
    model = tiny("llama")
    ids = tokens(rows=1, length=5)
    ops = FusedOps(enabled="on", **{o: o == op for o in fused.OPS})
    with torch.no_grad():
        want = model(input_ids=ids).logits
        swapped = apply_fused_ops(model, ops)
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, **FP32_TOL)
    kinds = {n.rpartition(".")[2] for n in swapped}
    expected = {"rms_norm": {"input_layernorm", "post_attention_layernorm", "norm"}, "rope": {"self_attn"},
                "qkv": {"self_attn"}, "swiglu": {"mlp"}, "gate_up": {"mlp"}, "varlen": {"self_attn"}}[op]  # fmt: skip
    assert kinds == expected
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    if "self_attn" in kinds:
        assert (attn.fuse_qkv, attn.fuse_rope) == (op == "qkv", op == "rope")
    if "mlp" in kinds:
        assert (mlp.fuse_gate_up, mlp.fuse_swiglu) == (op == "gate_up", op == "swiglu")
    assert swapped.varlen == (op == "varlen")  # varlen alone: the stock attention computation + the padding-free path


# ---- the split of a fused output: one concatenation in backward ------------------------------------


def narrow_columns(y: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """The split before issue 16 (item 5): `narrow` views, each block's gradient a zero-filled full-width tensor."""
    return [y.narrow(-1, start, n) for start, n in zip(itertools.accumulate([0, *sizes[:-1]]), sizes)]


def rotate_views(q, k, cos, sin, heads):
    """RoPE before issue 16: in place on `view(...).transpose(1, 2)` views (autograd views of the fused output)."""
    q, k = (t.view(heads).transpose(1, 2) for t in (q, k))  # [B, H|K, S, d]
    q, k = fused_attention.apply_rope(q, k, cos, sin, backend=fused_attention._rope_backend(q))
    return q.transpose(1, 2), k.transpose(1, 2)


def graph_nodes(root) -> list[str]:
    """Names of every autograd node reachable from `root`."""
    seen, stack = set(), [root]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(child for child, _ in node.next_functions)
    return [node.name() for node in seen]


def consumers(root, target) -> list[str]:
    """Names of the autograd nodes reachable from `root` that send a gradient into node `target`."""
    seen, stack, out = set(), [root], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for child, _ in node.next_functions:
            if child is target:
                out.append(node.name())
            stack.append(child)
    return out


@pytest.fixture
def fused_nodes(monkeypatch):
    """The autograd nodes of the fused projections' outputs [..., sum N_i] (before the split)."""
    nodes = []
    real = projection.fused_projection

    def spy(x, linears, absmax):
        y = real(x, linears, absmax)
        nodes.append(y.grad_fn)
        return y

    monkeypatch.setattr(projection, "fused_projection", spy)
    return nodes


@pytest.mark.parametrize("arch,kernels", [("llama", "reference"), ("qwen2", "reference"), ("llama", "interpreter")])
def test_split_backward_is_one_concatenation_and_bit_identical(tiny, fused_nodes, monkeypatch, request, arch, kernels):
    """Each fused output's gradient comes from ONE node that concatenates the q/k/v (gate/up)
    gradients: no slice_backward / as_strided_backward / CopySlices of the fused width (a zero-filled
    [T, sum N_i] tensor each), and RoPE, still in place on q and k, rotates no autograd view (no
    CopySlices / as_strided_backward, whose zero-filled buffer spans the fused output); the
    gradients are bit for bit those of the narrow views rotated in place. RoPE through its torch
    backend (copy_) and its Triton kernel (RoPEFunction, interpreter)."""
    if kernels == "reference":
        request.getfixturevalue("reference_kernels")
    model = tiny(arch)
    apply_fused_ops(model, ON)
    ids = tokens(rows=2, length=7)
    out = model(input_ids=ids, labels=ids)
    assert len(fused_nodes) == 4  # q/k/v and gate/up of both layers
    for node in fused_nodes:
        assert consumers(out.loss.grad_fn, node) == ["UnsafeSplitWithSizesBackward0"]
    names = graph_nodes(out.loss.grad_fn)
    assert "AsStridedBackward0" not in names and "torch::autograd::CopySlices" not in names
    out.loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    monkeypatch.setattr(projection, "columns", narrow_columns)
    monkeypatch.setattr(fused_attention, "rotate_own", rotate_views)
    fused_nodes.clear()
    out = model(input_ids=ids, labels=ids)
    old = consumers(out.loss.grad_fn, fused_nodes[0])  # the checks see the old code's full-width nodes
    assert set(old) & {"SliceBackward0", "torch::autograd::CopySlices"} and "UnsafeSplitWithSizesBackward0" not in old, old
    assert {"AsStridedBackward0", "torch::autograd::CopySlices"} <= set(graph_nodes(out.loss.grad_fn))
    out.loss.backward()
    want = {"grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}}
    assert got.keys() == want["grads"].keys()
    for name, g in want["grads"].items():
        assert g.abs().max() > 0 and torch.equal(got[name], g), name


# ---- switches and errors -------------------------------------------------------------------------


def test_enabled_auto_leaves_cpu_models_alone_and_off_does_nothing(tiny):
    model = tiny("llama")
    for enabled in ("auto", "off"):
        swapped = apply_fused_ops(model, FusedOps(enabled=enabled))
        assert swapped == [] and "kernels.enabled" in swapped.skipped["model"]
    assert type(model.model.layers[0].self_attn).__name__ == "LlamaAttention"
    assert fused.fused_enabled(model, FusedOps()) is False and fused.fused_enabled(model, ON) is True


def test_unknown_architectures_are_left_alone_with_the_reason():
    from transformers import Phi3Config, Phi3ForCausalLM  # a family without fused modules (qtrain.families)

    config = Phi3Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, pad_token_id=0)  # fmt: skip
    model = Phi3ForCausalLM(config)
    swapped = apply_fused_ops(model, ON)
    assert swapped == [] and "'phi3' keeps the stock modules" in swapped.skipped["model"]
    assert not any(isinstance(m, (FusedAttention, FusedMLP, FusedRMSNorm)) for m in model.modules())


def test_applying_twice_changes_nothing(tiny, reference_kernels):
    model = tiny("llama")
    apply_fused_ops(model, ON)
    attn = model.model.layers[0].self_attn
    again = apply_fused_ops(model, ON)
    assert again == [] and model.model.layers[0].self_attn is attn
    assert "model.layers.0.self_attn" in again.skipped


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"enabled": "yes"}, "kernels.enabled"),
        ({"rope": "no"}, "kernels.rope"),
        ({"qkv": 1}, "kernels.qkv"),
        ({"varlen": "on"}, "kernels.varlen"),
    ],
)
def test_bad_config_values_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FusedOps(**kwargs)


# ---- GPU (skipped without CUDA) -----------------------------------------------------------------


def _errors(got: dict, ref: dict) -> dict[str, float]:
    """Max abs error of the logits and of each gradient, relative to the reference's largest entry."""
    out = {"logits": ((got["logits"].float() - ref["logits"]).abs().max() / ref["logits"].abs().max()).item()}
    for name, g in ref["grads"].items():
        out[name] = ((got["grads"][name].float() - g).abs().max() / g.abs().max()).item()
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ARCHS)
def test_gpu_bf16_fused_is_as_accurate_as_stock(tiny_checkpoint, arch):
    """bf16 on CUDA, the compiled kernels (Triton NF4 + LoRA, RMSNorm, RoPE, SwiGLU): against the same
    model run in fp32, the fused model's logits and gradients are no less accurate than the stock
    model's (bf16 rounds differently in each, so they are compared through their errors)."""
    dims = {"hidden_size": 512, "intermediate_size": 1408, "num_layers": 2, "num_heads": 8, "num_kv_heads": 2}
    torch.manual_seed(0)
    model = load_model(str(tiny_checkpoint(arch, **dims)), LoRASpec(rank=16), compute_dtype=torch.bfloat16,
                       device="cuda").model  # fmt: skip
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear) and m.rank:
                m.lora_b.weight.normal_(0, 0.02)
    ids = torch.randint(4, 100, (2, 256), device="cuda")
    ref = run(copy.deepcopy(model).float(), input_ids=ids, labels=ids)  # the same NF4 weights, fp32 compute
    stock = run(model, input_ids=ids, labels=ids)
    assert fused.fused_enabled(model, FusedOps())  # "auto" is on for CUDA models
    swapped = apply_fused_ops(model, FusedOps())
    assert swapped.skipped == {} and len(swapped) == 2 * 4 + 1
    got = run(model, input_ids=ids, labels=ids)
    err_stock, err_fused = _errors(stock, ref), _errors(got, ref)
    for name, e in err_stock.items():
        assert err_fused[name] <= 1.5 * e + 1e-3, (name, err_fused[name], e)  # bf16: ~4e-3 relative per rounding
