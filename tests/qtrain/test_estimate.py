"""qtrain.estimate: the analytic peak against exact measurement (CPU allocator events + tensor
accounting) on tiny models across settings; the exact parts (NF4 bytes, adapters, optimizer state);
the 7-8B presets; what fits."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from qtrain.estimate import (
    GiB,
    Workload,
    estimate,
    max_seq_len,
    meta_model,
    nf4_bytes,
    optimizer_bytes,
    suggestions,
)
from qtrain.fused import FusedOps, apply_fused_ops
from qtrain.lora import LoRASpec
from qtrain.memprof import MemoryProfiler, peak_sample
from qtrain.methods import IA3, AdaLoRA, BitFit, Houlsby, LlamaAdapter, PrefixTuning, PromptTuning, PTuning, PTuningV2
from qtrain.model import enable_checkpointing, load_model
from qtrain.nf4 import quantize_nf4
from qtrain.presets import preset_config, resolve_config
from qtrain.train import train_step

TOLERANCE = 0.10  # the target: estimate within 10% of the measured peak

# (name, model kwargs, workload changes, LoRA spec). Tiny models whose peak has different causes:
# recomputed layers, saved activations without checkpointing, full logits of a large vocabulary,
# the chunked loss, many adapters, unquantized bases.
SETTINGS = [
    ("bf16 checkpointed", {}, {}, LoRASpec(rank=8)),
    ("fp32 checkpointed", {}, {"dtype": torch.float32}, LoRASpec(rank=8)),
    ("bf16 no checkpointing", {}, {"gradient_checkpointing": False}, LoRASpec(rank=8)),
    ("fp32 no checkpointing, full logits", {}, {"dtype": torch.float32, "gradient_checkpointing": False, "loss_chunk": 0}, LoRASpec(rank=8)),
    ("rank 32, q/v only", {}, {}, LoRASpec(rank=32, alpha=64, target_modules=["q_proj", "v_proj"])),
    ("rank 64 all-linear", {}, {"seq_len": 64}, LoRASpec(rank=64, alpha=128)),
    ("rsLoRA, longer rows", {}, {"batch_size": 2, "seq_len": 512}, LoRASpec(rank=16, use_rslora=True)),
    ("large vocab, full logits", {"vocab_size": 8192}, {"loss_chunk": 0}, LoRASpec(rank=8)),
    ("large vocab, chunked loss", {"vocab_size": 8192}, {"dtype": torch.float32}, LoRASpec(rank=8)),
    ("16-bit base (LoRA without Q)", {}, {"quantize": False, "dtype": torch.float32}, LoRASpec(rank=8)),
    ("qwen2 (biases)", {"arch": "qwen2"}, {}, LoRASpec(rank=8)),
    ("mistral", {"arch": "mistral"}, {"gradient_checkpointing": False}, LoRASpec(rank=8)),
    ("gemma2 (tied, soft-capped, eager attention)", {"arch": "gemma2"}, {}, LoRASpec(rank=8)),
    ("gemma2, no checkpointing", {"arch": "gemma2"}, {"gradient_checkpointing": False}, LoRASpec(rank=8)),
    ("gemma3_text (q/k norms)", {"arch": "gemma3_text"}, {}, LoRASpec(rank=8)),
    ("gemma3_text, no checkpointing", {"arch": "gemma3_text"}, {"gradient_checkpointing": False}, LoRASpec(rank=8)),
    ("qwen3 (q/k norms)", {"arch": "qwen3"}, {}, LoRASpec(rank=8)),
    ("qwen3, no checkpointing", {"arch": "qwen3"}, {"gradient_checkpointing": False}, LoRASpec(rank=8)),
    ("phi3 (fused qkv_proj, gate_up_proj)", {"arch": "phi3"}, {}, LoRASpec(rank=8)),
    ("phi3, no checkpointing", {"arch": "phi3"}, {"gradient_checkpointing": False}, LoRASpec(rank=8)),
    ("olmo2 (post-norms, q/k norms)", {"arch": "olmo2"}, {}, LoRASpec(rank=8)),
    ("olmo2, no checkpointing", {"arch": "olmo2"}, {"gradient_checkpointing": False}, LoRASpec(rank=8)),
    ("qwen3_moe (NF4 experts)", {"arch": "qwen3_moe"}, {}, LoRASpec(rank=8)),
    ("qwen3_moe, LoRA on the experts, no checkpointing", {"arch": "qwen3_moe"}, {"gradient_checkpointing": False}, LoRASpec(rank=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "experts"])),
    ("mixtral (NF4 experts)", {"arch": "mixtral"}, {}, LoRASpec(rank=8)),
    ("mixtral, no checkpointing", {"arch": "mixtral"}, {"gradient_checkpointing": False}, LoRASpec(rank=8)),
    ("DoRA", {}, {}, LoRASpec(rank=8, use_dora=True)),
    ("(IA)3 alone", {}, {"methods": (IA3(),)}, LoRASpec(rank=0)),
    ("Houlsby adapters alone", {}, {"methods": (Houlsby(bottleneck=32),)}, LoRASpec(rank=0)),
    ("LoRA + BitFit", {}, {"methods": (BitFit(),)}, LoRASpec(rank=8)),
    ("AdaLoRA all-linear", {}, {"methods": (AdaLoRA(target_modules="all-linear"),)}, LoRASpec(rank=0)),
    ("prefix tuning", {}, {"methods": (PrefixTuning(num_virtual_tokens=16),)}, LoRASpec(rank=0)),
    ("LoRA + P-tuning v2, no checkpointing", {}, {"methods": (PTuningV2(num_virtual_tokens=32),), "gradient_checkpointing": False}, LoRASpec(rank=8)),
    ("prompt tuning, longer rows", {}, {"methods": (PromptTuning(num_virtual_tokens=16),), "seq_len": 256}, LoRASpec(rank=0)),
    ("P-tuning (LSTM encoder)", {}, {"methods": (PTuning(num_virtual_tokens=16),)}, LoRASpec(rank=0)),
    ("LLaMA-Adapter", {}, {"methods": (LlamaAdapter(adapter_layers=2),)}, LoRASpec(rank=0)),
    ("LoRA dropout", {}, {}, LoRASpec(rank=8, dropout=0.1)),
    ("LoRA dropout, fp32, no checkpointing", {}, {"dtype": torch.float32, "gradient_checkpointing": False}, LoRASpec(rank=8, dropout=0.1)),
    ("fused q/k/v and gate/up", {}, {"fused": ("qkv", "gate_up")}, LoRASpec(rank=8)),
    ("fused, fp32, no checkpointing", {}, {"dtype": torch.float32, "gradient_checkpointing": False, "fused": ("qkv", "gate_up")}, LoRASpec(rank=8)),
]
# Settings the estimate misses today, with what was measured (strict: a fix must remove the entry).
KNOWN_GAPS: dict[str, str] = {}
MODEL = {"hidden_size": 192, "intermediate_size": 512, "num_layers": 3, "num_heads": 6, "num_kv_heads": 2, "vocab_size": 1024}
BASE = Workload(batch_size=4, seq_len=128, dtype=torch.bfloat16, backend="torch", optimizer="adamw", device="cpu")


def measure(path, spec: LoRASpec, w: Workload):
    """Peak and the sample at it of one profiled training step (after one unprofiled step)."""
    model = load_model(str(path), spec, compute_dtype=w.dtype, quantize=w.quantize, backend="torch").model
    lora = {n for n, p in model.named_parameters() if p.requires_grad}
    for method in w.methods:
        method.apply(model)
    for n, p in model.named_parameters():
        p.requires_grad = n in lora or any(m.owns(n) for m in w.methods)
    if w.fused:  # the fused projections only (the small kernels would run under the Triton interpreter)
        groups = {op: op in w.fused for op in ("qkv", "gate_up")}
        apply_fused_ops(model, FusedOps(enabled="on", rms_norm=False, rope=False, swiglu=False, varlen=False, **groups))
    if w.gradient_checkpointing:
        enable_checkpointing(model)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, model.config.vocab_size, (w.batch_size, w.seq_len), generator=g)
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    autocast = torch.autocast("cpu", dtype=w.dtype) if w.dtype != torch.float32 else None
    args = (model, [batch], optimizer, trainable, 1.0, "cpu", autocast)
    train_step(*args, loss_chunk=w.loss_chunk)  # creates the optimizer state
    profiler = MemoryProfiler(model, optimizer, torch.device("cpu"))
    with profiler.step(2):
        train_step(*args, on_phase=profiler.phase, loss_chunk=w.loss_chunk)
    samples = profiler.samples()
    profiler.detach()
    return model, samples


@pytest.mark.parametrize("name,model_kw,changes,spec", SETTINGS, ids=[s[0] for s in SETTINGS])
def test_estimate_within_10_percent_of_the_measured_peak(tiny_checkpoint, name, model_kw, changes, spec, request):
    if name in KNOWN_GAPS:
        request.applymarker(pytest.mark.xfail(strict=True, reason=KNOWN_GAPS[name]))
    torch.set_num_threads(1)  # deterministic BLAS scratch; faster on the 2-core CI machine
    kw = {**MODEL, **model_kw}
    path = tiny_checkpoint(kw.pop("arch", "llama"), **kw)
    w = replace(BASE, **changes)
    _, samples = measure(path, spec, w)
    est = estimate(resolve_config(str(path)), spec, w)
    peak = peak_sample(samples)
    print(f"{name}: estimate / measured = {est.peak / peak.peak:.3f}")
    assert abs(est.peak / peak.peak - 1) < TOLERANCE, (name, est.peak, peak.peak, est.phases)
    # the persistent parts are exact: same bytes as the live tensors
    parts, cats = samples[0].parts, est.by_category()
    assert cats["weights"] == pytest.approx(parts["weights"], rel=0.01)
    assert sum(i.bytes for i in est.items if i.category == "adapters") == parts["adapters"]
    assert sum(i.bytes for i in est.items if i.name == "Adam moments") == parts["optimizer"]


def test_nf4_bytes_is_what_quantize_nf4_stores():
    for shape in [(64, 64), (37, 96), (513, 128), (3, 5)]:
        assert nf4_bytes(math.prod(shape)) == quantize_nf4(torch.randn(shape)).nbytes(), shape


def test_8bit_optimizer_state_formula_matches_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes")
    params = [torch.nn.Parameter(torch.randn(n)) for n in (1000, 4096, 70_000, 130_001)]  # below/above 4096
    opt = bnb.optim.AdamW8bit(params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    state = [t for s in opt.state.values() for k, t in s.items() if isinstance(t, torch.Tensor) and k not in ("qmap1", "qmap2", "step")]
    real = sum(t.numel() * t.element_size() for t in state)
    in_allocator, paged = optimizer_bytes(params, "paged_adamw_8bit", "cpu")
    assert paged == 0 and in_allocator == real


def test_paged_state_is_outside_the_allocator_on_cuda_only():
    params = [torch.nn.Parameter(torch.empty(n, device="meta")) for n in (50_000, 200_000)]
    cuda = optimizer_bytes(params, "paged_adamw_32bit", "cuda")
    assert cuda == (8 * 50_000, 8 * 200_000)  # bitsandbytes pages tensors of 1e5 elements or more
    assert optimizer_bytes(params, "adamw", "cuda") == (8 * 250_000 + 2 * 4, 0)  # + torch's step tensors


@pytest.mark.parametrize(
    "name,params_b",
    [("llama-2-7b", 6.74), ("llama-3.1-8b", 8.03), ("mistral-7b", 7.25), ("qwen2.5-7b", 7.62), ("gemma-2-9b", 9.24),
     ("qwen3-8b", 8.19), ("phi-4-mini", 3.84), ("qwen3-30b-a3b", 30.53), ("mixtral-8x7b", 46.70), ("llama-3.1-70b", 70.55)],
)
def test_presets_have_the_published_parameter_counts(name, params_b):
    config = preset_config(name)
    model = meta_model(config, LoRASpec(rank=16), Workload())
    linears = sum(m.in_features * m.out_features for m in model.modules() if hasattr(m, "_nf4_meta"))
    dense = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    assert (linears + dense) / 1e9 == pytest.approx(params_b, abs=0.01)


def test_hub_ids_resolve_to_presets_without_network():
    assert resolve_config("meta-llama/Llama-3.1-8B-Instruct").vocab_size == 128256
    assert resolve_config("Qwen/Qwen2.5-7B-Instruct").num_hidden_layers == 28
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_config("/tmp")


def test_llama_3_1_8b_qlora_at_2048_is_estimated_under_8_gib():
    config, spec = preset_config("llama-3.1-8b"), LoRASpec(rank=16, alpha=32)
    est = estimate(config, spec, Workload(batch_size=1, seq_len=2048))
    cats = est.by_category()
    assert 5.2 * GiB < cats["weights"] < 5.4 * GiB  # 6.98B NF4 linear weights + 2 x 128256 x 4096 bf16
    assert sum(p for p in [cats["adapters"]]) == 41_943_040 * 4  # r=16 on all 224 linears, fp32
    assert est.peak < 8 * GiB and est.device_total < 8 * GiB
    full = estimate(config, spec, Workload(batch_size=1, seq_len=2048, loss_chunk=0))
    assert full.peak > est.peak + 2 * GiB  # [2048, 128256] fp32 logits and their gradient


def test_fsdp_estimate_is_per_rank():
    """FSDP (qtrain.fsdp): base, adapters and Adam moments 1/N per rank (lm_head whole), plus the
    all-gather buffers of unsharded layers; DDP: everything on each rank plus its gradient buckets."""
    config, spec = preset_config("llama-3.1-70b"), LoRASpec(rank=16, alpha=32)
    w = Workload(batch_size=1, seq_len=1024, optimizer="adamw", fused=("qkv", "gate_up"))
    one = estimate(config, spec, w)
    items = {n: {i.name: i.bytes for i in estimate(config, spec, replace(w, ranks=n, strategy="fsdp")).items} for n in (2, 4)}
    whole = {i.name: i.bytes for i in one.items}
    assert "fused projections' absmax" in whole and "fused projections' absmax" not in items[2]  # sharded: not fused
    head = config.vocab_size * config.hidden_size * 2
    for n in (2, 4):
        assert items[n]["NF4 linears"] == math.ceil(whole["NF4 linears"] / n)
        assert items[n]["16-bit embeddings, lm_head, norms"] == head + math.ceil((whole["16-bit embeddings, lm_head, norms"] - head) / n)
        assert items[n]["adapter parameters"] == math.ceil(whole["adapter parameters"] / n)
        assert items[n]["Adam moments"] == math.ceil(whole["Adam moments"] / n)
        layer = whole["NF4 linears"] // 80 + whole["adapter parameters"] // 80
        assert items[n]["FSDP all-gather buffers"] == pytest.approx(3 * layer, rel=1e-3)
    assert 32 * GiB < one.device_total and estimate(config, spec, replace(w, ranks=4, strategy="fsdp")).device_total < 24 * GiB
    assert estimate(config, spec, replace(w, ranks=1, strategy="fsdp")).peak == one.peak
    ddp = {i.name: i.bytes for i in estimate(config, spec, replace(w, ranks=2, strategy="ddp")).items}
    assert ddp["NF4 linears"] == whole["NF4 linears"] and ddp["DDP gradient buckets"] == whole["adapter parameters"]


def test_what_lowers_memory_lowers_the_estimate():
    config, spec = preset_config("llama-3.1-8b"), LoRASpec(rank=16)
    w = Workload(batch_size=2, seq_len=4096)
    peak = estimate(config, spec, w).peak
    assert estimate(config, spec, replace(w, offload_activations=True)).peak < peak
    assert estimate(config, spec, replace(w, gradient_checkpointing=False)).peak > 3 * peak
    assert estimate(config, spec, replace(w, seq_len=2048)).peak < peak
    assert estimate(config, LoRASpec(rank=64), w).peak > peak


def test_max_seq_len_is_the_longest_that_fits():
    config, spec, w = preset_config("llama-3.1-8b"), LoRASpec(rank=16), Workload(batch_size=1)
    for budget in (8 * GiB, 24 * GiB):
        n = max_seq_len(config, spec, w, budget)
        assert n % 64 == 0
        assert estimate(config, spec, replace(w, seq_len=n)).device_total <= budget
        assert estimate(config, spec, replace(w, seq_len=n + 64)).device_total > budget
    assert max_seq_len(config, spec, w, 4 * GiB) == 0  # the NF4 weights alone take 5.3 GiB


def test_suggestions_name_config_keys_and_lower_the_estimate():
    config, spec = preset_config("llama-3.1-8b"), LoRASpec(rank=16)
    w = Workload(batch_size=4, seq_len=4096, loss_chunk=0)
    need = estimate(config, spec, w).device_total
    tips = suggestions(config, spec, w, grad_accum=2, budget=12 * GiB)
    texts = [t for t, _ in tips]
    assert texts[0] == "train.batch_size=2 train.grad_accum=4 (same effective batch)"
    assert any(t.startswith("train.offload_activations=true") for t in texts)
    assert any(t.startswith("train.loss_chunk_tokens=null") for t in texts)
    assert "train.optimizer=paged_adamw_8bit" in texts and "lora.rank=8" in texts
    shorter = next(t for t in texts if t.startswith("data.max_length="))
    assert int(shorter.split("=")[1]) < 4096
    assert all(n < need for _, n in tips)


def test_fused_ops_on_cuda_in_the_estimate():
    """qtrain.fused on a GPU (kernels: defaults): the fused projections' fp32 absmax is counted (4 bytes per
    64 weights of q/k/v and gate/up), the RMSNorm and SwiGLU kernels keep less per token than the stock
    modules (x instead of its fp32 copy; gate and up without silu(gate)), and packed rows lose their mask
    on the varlen path, unless a method hooks the attention."""
    from qtrain.config import load_config
    from qtrain.estimate import fused_groups, layer_saved_bytes, layer_shape, workload_for
    from qtrain.fused import FusedOps

    config = preset_config("llama-3.1-8b")
    spec = LoRASpec(rank=16, target_modules="all-linear")
    assert fused_groups(FusedOps(), "cuda", "triton") == ("qkv", "gate_up", "rms_norm", "swiglu", "varlen")
    assert fused_groups(FusedOps(), "cpu", "torch") == ()  # auto: CUDA only
    assert fused_groups(FusedOps(), "cuda", "torch") == ("rms_norm", "swiglu", "varlen")  # no fused NF4 without Triton
    assert "varlen" not in fused_groups(FusedOps(), "cuda", "triton", (PTuningV2(),))
    stock = Workload(seq_len=2048, device="cuda")
    fused = replace(stock, fused=fused_groups(FusedOps(), "cuda", "triton"))
    absmax = [i for i in estimate(config, spec, fused).items if i.name == "fused projections' absmax"]
    qkv_gate_up = 32 * 4096 * (4096 + 2 * 1024 + 2 * 14336)
    assert [i.bytes for i in absmax] == [qkv_gate_up // 16]
    shape = layer_shape(meta_model(config, spec, stock), config)
    assert layer_saved_bytes(shape, stock) - layer_saved_bytes(shape, fused) == 2 * (4 - 2) * 4096 + 2 * 14336
    cfg = load_config(None, ["model.name_or_path=llama-3.1-8b", "data.packing=true", "train.batch_size=2"])
    assert not workload_for(cfg, "cuda").attention_mask and workload_for(cfg, "cpu").attention_mask
    off = load_config(None, ["model.name_or_path=llama-3.1-8b", "data.packing=true", "kernels.enabled=off"])
    assert workload_for(off, "cuda").attention_mask and workload_for(off, "cuda").fused == ()


def test_nf4_path_by_tokens_per_micro_batch():
    from qtrain.estimate import DEQUANT_MIN_TOKENS, GEMV_MAX_TOKENS, _nf4_path

    assert [_nf4_path(t) for t in (1, GEMV_MAX_TOKENS)] == ["gemv", "gemv"]
    assert [_nf4_path(t) for t in (GEMV_MAX_TOKENS + 1, DEQUANT_MIN_TOKENS - 1)] == ["fused", "fused"]
    assert [_nf4_path(t) for t in (DEQUANT_MIN_TOKENS, 80_000)] == ["dequant", "dequant"]


def test_dequant_buffer_is_one_compute_dtype_copy_of_the_largest_projection():
    """The dequant-once path (issue 16): one buffer per device, sized to the largest NF4 weight one
    call dequantizes (the fused gate/up [2I, D] when fused, else a [I, D] MLP projection), in the
    compute dtype, there from the forward on; none for the torch backend, short micro-batches or a
    16-bit base."""
    config = preset_config("llama-3.1-8b")
    spec = LoRASpec(rank=16)
    d, i = config.hidden_size, config.intermediate_size
    stock = Workload(batch_size=1, seq_len=2048)

    def buffer(w):
        est = estimate(config, spec, w)
        items = [x.bytes for x in est.items if x.name == "dequantized-weight buffer"]
        assert est.phases["loss forward"] > 0 and len(items) <= 1
        return items[0] if items else 0

    assert buffer(stock) == i * d * 2
    assert buffer(replace(stock, fused=("qkv", "gate_up"))) == 2 * i * d * 2
    assert buffer(replace(stock, fused=("qkv",))) == i * d * 2  # [I, D] is wider than q/k/v's [6144, D]
    assert buffer(replace(stock, dtype=torch.float32)) == i * d * 4
    assert buffer(replace(stock, seq_len=128)) == 0  # 128 tokens: the fused kernel, no buffer
    assert buffer(replace(stock, batch_size=2, seq_len=128)) == i * d * 2  # tokens per micro-batch count
    assert buffer(replace(stock, backend="torch")) == 0 and buffer(replace(stock, quantize=False)) == 0
    with_buffer, without = estimate(config, spec, stock), estimate(config, spec, replace(stock, backend="torch"))
    assert with_buffer.phases["optimizer step"] - without.phases["optimizer step"] == i * d * 2  # kept throughout


def test_layer_backward_buffers_of_fused_projections():
    """With one concatenation as the split's backward, fused gate/up costs no more than the stock
    projections when SwiGLU's saved gate/up and down's input are released first; without an adapter on
    down_proj (nothing saves its input) the concatenation's extra [T, I] shows."""
    from qtrain.estimate import layer_backward_bytes, layer_shape

    config = preset_config("llama-3.1-8b")
    d, i = config.hidden_size, config.intermediate_size
    for targets, extra in (("all-linear", 0), (["q_proj", "v_proj"], i)):
        spec = LoRASpec(rank=16, target_modules=targets)
        stock = Workload(seq_len=2048)
        fused = replace(stock, fused=("qkv", "gate_up", "swiglu"))
        shape = layer_shape(meta_model(config, spec, stock), config)
        assert layer_backward_bytes(shape, stock) == 2 * (d + i)  # bf16: the residual gradient and dH
        assert layer_backward_bytes(shape, fused) == 2 * (d + i + extra)
        stock_act = replace(fused, fused=("qkv", "gate_up"))  # stock silu saves silu(gate) too: released as well
        assert layer_backward_bytes(shape, stock_act) == 2 * (d + i + max(0, extra - i))
