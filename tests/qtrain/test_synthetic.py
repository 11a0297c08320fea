"""qtrain.synthetic.random_model: the training model of a config with random weights, built on the
device without a checkpoint and without a 16-bit copy of the model."""

from __future__ import annotations

import pytest
import torch
from torch._C._profiler import _EventType

from qtrain.lora import LoRALinear, LoRASpec
from qtrain.model import load_model
from qtrain.synthetic import random_model
from qtrain.tiny import tiny_config

ARCHS = ["llama", "qwen2"]  # qwen2: biased q/k/v projections
SPEC = LoRASpec(rank=4, alpha=8)


def linears(model) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def signature(model) -> dict:
    """Name → (shape, dtype, requires_grad) of every parameter and buffer (NF4 ones included)."""
    out = {n: (tuple(p.shape), p.dtype, p.requires_grad) for n, p in model.named_parameters()}
    out |= {n: (tuple(b.shape), b.dtype, False) for n, b in model.named_buffers()}
    return out


def batch(n: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 100, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("spec", [SPEC, LoRASpec(rank=2, target_modules=["q_proj", "v_proj"]), LoRASpec(rank=0)],
                         ids=["all-linear", "qv", "no-adapter"])  # fmt: skip
@pytest.mark.parametrize("arch", ARCHS)
def test_same_model_as_load_model(tiny_checkpoint, arch, spec):
    """Same modules, parameters, buffers, dtypes and trainable set as loading a checkpoint of the config."""
    path = tiny_checkpoint(arch)
    loaded = load_model(str(path), spec, compute_dtype=torch.float32)
    model = random_model(loaded.config, spec, torch.float32, "cpu")

    assert type(model) is type(loaded.model)
    assert signature(model) == signature(loaded.model)
    assert not [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    ours, theirs = linears(model), linears(loaded.model)
    assert ours.keys() == theirs.keys() and len(ours) == 7 * loaded.config.num_hidden_layers
    for name, m in ours.items():
        assert m.quantize_base and m.weight is None, name
        assert tuple(m.nf4_weight.shape) == (m.out_features, m.in_features) == tuple(theirs[name].nf4_weight.shape)
        assert m.nf4_weight.dtype == torch.float32
        assert (
            (m.bias is not None)
            == (theirs[name].bias is not None)
            == (arch == "qwen2" and name.rpartition(".")[2] in ("q_proj", "k_proj", "v_proj"))
        )
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == [n for n, p in loaded.model.named_parameters() if p.requires_grad]
    assert all(".lora_a." in n or ".lora_b." in n for n in trainable)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == sum(
        p.numel() for p in loaded.model.parameters() if p.requires_grad
    )
    if spec.rank:
        m = ours["model.layers.0.self_attn.q_proj"]
        assert m.lora_a.weight.dtype == torch.float32 and m.lora_a.weight.abs().sum() > 0  # Kaiming
        assert m.lora_b.weight.abs().sum() == 0  # zero: the adapter starts as the identity
        assert m.lora_a.weight.abs().max() <= 1 / m.in_features**0.5  # kaiming_uniform(a=sqrt(5)) bound


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_backward(arch):
    config = tiny_config(arch)
    model = random_model(config, SPEC, torch.float32, "cpu", seed=3)
    ids = batch()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and abs(loss.item() - torch.log(torch.tensor(100.0)).item()) < 1.0  # ~uniform
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        else:
            assert p.grad is None, name
    assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if ".lora_b." in n)


def test_bf16_weights_and_statistics():
    """Compute dtype bf16: frozen 16-bit tensors in bf16, the NF4 weights record bf16, and the
    weights are N(0, std), norms 1."""
    config = tiny_config("llama", hidden_size=128, intermediate_size=256)
    model = random_model(config, SPEC, torch.bfloat16, "cpu", std=0.05)
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    assert {p.dtype for p in frozen.values()} == {torch.bfloat16}
    assert {p.dtype for n, p in model.named_parameters() if p.requires_grad} == {torch.float32}
    emb = model.get_input_embeddings().weight.float()
    assert abs(emb.std().item() - 0.05) < 0.005 and abs(emb.mean().item()) < 0.005
    assert (model.model.norm.weight == 1).all() and (model.model.layers[0].input_layernorm.weight == 1).all()
    q = model.model.layers[0].self_attn.q_proj
    assert q.nf4_weight.dtype == torch.bfloat16
    w = q.base_weight(torch.float32)
    assert abs(w.std().item() - 0.05) < 0.005
    ids = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)


def test_same_seed_same_weights():
    config = tiny_config("qwen2")

    def state(seed: int) -> dict[str, torch.Tensor]:
        model = random_model(config, SPEC, torch.float32, "cpu", seed=seed)
        return {**dict(model.named_parameters()), **dict(model.named_buffers())}

    a, b, c = state(0), state(0), state(1)
    assert a.keys() == b.keys() == c.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    differ = [n for n in a if not torch.equal(a[n], c[n])]
    assert "model.embed_tokens.weight" in differ and "model.layers.1.mlp.down_proj.nf4_packed" in differ
    assert "model.layers.0.self_attn.q_proj.lora_a.weight" in differ
    # each layer has its own stream: two layers of the same shape get different weights
    assert not torch.equal(a["model.layers.0.mlp.up_proj.nf4_packed"], a["model.layers.1.mlp.up_proj.nf4_packed"])


@pytest.mark.parametrize("quantize", [True, False], ids=["nf4", "16bit"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_tied_embeddings(tie, quantize):
    config = tiny_config("llama", tie_word_embeddings=tie)
    model = random_model(config, SPEC, torch.float32, "cpu", quantize=quantize)
    head, emb = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert (head is emb) == tie
    assert head.device.type == "cpu" and not head.requires_grad
    if not tie:
        assert not torch.equal(head, emb)
    ids = batch()
    assert torch.isfinite(model(input_ids=ids, labels=ids).loss)


def test_quantize_false():
    config = tiny_config("qwen2")
    model = random_model(config, SPEC, torch.float32, "cpu", quantize=False)
    for name, m in linears(model).items():
        assert not m.quantize_base and not m._nf4_meta and not hasattr(m, "nf4_packed"), name
        assert m.weight.shape == (m.out_features, m.in_features) and not m.weight.requires_grad
    assert abs(model.model.layers[0].mlp.up_proj.weight.std().item() - 0.02) < 0.002
    # the same draw as the NF4 model: its weights are these, quantized
    nf4 = random_model(config, SPEC, torch.float32, "cpu")
    w16 = model.model.layers[1].self_attn.o_proj.weight
    w4 = nf4.model.layers[1].self_attn.o_proj.base_weight(torch.float32)
    assert (w4 - w16).abs().max() < 0.2 * w16.abs().max()
    ids = batch()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)


def peak_bytes(fn):
    """(peak bytes allocated while `fn` runs above what was allocated before, bytes still allocated
    at its end, its result), from the CPU allocator events of the torch profiler."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append(node)
    events.sort(key=lambda e: e.start_time_ns)
    # total_allocated is the allocator's running total, including what existed before
    before = events[0].extra_fields.total_allocated - events[0].extra_fields.alloc_size
    peak = max(e.extra_fields.total_allocated for e in events) - before
    return peak, events[-1].extra_fields.total_allocated - before, result


def test_build_peak_is_far_below_a_16bit_copy():
    """12 layers of 7 equal linears: one linear is ~1% of the model. Building holds the NF4 model
    (~27% of the 16-bit size; with the rest of the model ~34%) plus one linear's quantization
    temporaries (~8%), never the 16-bit model (which alone would be 100%)."""
    config = tiny_config("llama", hidden_size=256, intermediate_size=256, num_layers=12, num_heads=4, num_kv_heads=4)
    peak, end, model = peak_bytes(lambda: random_model(config, SPEC, torch.bfloat16, "cpu"))
    sizes = [m.in_features * m.out_features * 2 for m in linears(model).values()]
    full16, largest = sum(sizes), max(sizes)
    assert largest < full16 / 50
    assert end > 0.25 * full16  # sanity: the NF4 model and the rest were allocated under the profiler
    assert peak < 0.6 * full16, f"peak {peak / 2**20:.1f} MiB vs a 16-bit copy of the linears {full16 / 2**20:.1f} MiB"
    # above the final model: one 16-bit weight, its fp32/int32 quantizer temporaries and the 8-bit
    # absmax quantizer's fixed 65536-entry tables (~0.75 MiB)
    assert peak - end < 8 * largest + 2**20, (
        f"transient {(peak - end) / 2**20:.2f} MiB, largest linear {largest / 2**20:.2f} MiB"
    )


def test_no_spec_is_the_frozen_base():
    model = random_model(tiny_config("llama"), None, torch.float32, "cpu")
    assert not [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(m.rank == 0 and m.lora_a is None and m._nf4_meta for m in linears(model).values())
