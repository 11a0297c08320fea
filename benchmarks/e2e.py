"""End to end: QLoRA training of 7-8B models, transformers + PEFT + bitsandbytes against qtrain.

    python benchmarks/e2e.py                      # Llama-3.1-8B and Llama-2-7B (~8 min on an H100, by estimate)
    python benchmarks/e2e.py --quick              # Llama-3.1-8B, baseline + qtrain, coarse sweep (~3 min, by estimate)
    python benchmarks/e2e.py --models llama-2-7b --settings seq --steps 6
    python benchmarks/e2e.py --stacks baseline qtrain --sweep-models llama-3.1-8b llama-2-7b --search-seconds 120

On the GPU machine (the device tool), from the project root. Here first, once: `bash
../shared/device/pack-wheels.sh liger-kernel==0.8.5` (bitsandbytes and datasets, plus Liger-Kernel
for the third column; without it that column is skipped with a note); then run with `carry: [".whl"]`:

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PYTHONPATH && pip install -q --no-deps --no-build-isolation -e . ; PYTHONUNBUFFERED=1 python benchmarks/e2e.py --out $OUT 2>&1 | tee $OUT/e2e.log

and copy the returned e2e-*.json/.md/.png into benchmarks/results/.

Stacks (one model architecture from `qtrain.presets`, the same weights, data and settings):

- `baseline`: transformers + bitsandbytes + PEFT, the standard QLoRA stack. Every linear but lm_head
  a bitsandbytes `Linear4bit` (NF4, double quant, bf16 compute), SDPA attention, PEFT LoRA, the
  model's own forward and loss (full [B, S, V] logits, upcast to fp32 by transformers' loss).
- `qtrain`: `qtrain.synthetic.random_model` (what `qtrain.model.load_model` gives for a checkpoint:
  NF4 base, LoRA, backend "auto": the Triton NF4 kernels on sm80+), `qtrain.builder.finish_model`
  with `FusedOps(enabled=--kernels)`, as training builds it (fused q/k/v and gate/up, Triton RMSNorm/RoPE/SwiGLU) and
  `qtrain.train.train_step` with its chunked lm_head + cross-entropy on `FusedOps.loss_backend`.
- `liger` (when `liger_kernel` imports; else skipped with a note): the baseline with
  `liger_kernel.transformers.apply_liger_kernel_to_llama(model=...)` (or `_to_mistral`, `_to_qwen2`:
  RoPE, RMSNorm, SwiGLU, fused linear cross-entropy) applied before PEFT.

Common to all: LoRA r=16 alpha=32 dropout 0 on every linear but lm_head (fp32 adapters), the same
LoRA init (qtrain's per-layer seeded Kaiming-uniform A, B = 0, copied into PEFT's lora_A/lora_B),
non-reentrant gradient checkpointing of every decoder layer, bf16 autocast (what the HF Trainer does
with bf16=True), bitsandbytes paged AdamW 32-bit lr 2e-4 no weight decay, gradient clipping 1.0,
batches of --batch x --seq random tokens drawn from a fixed seed per step (the same batches for
every stack; labels = input_ids, no padding), one micro-batch per step (the same effective batch).
`prepare_model_for_kbit_training` is NOT called: its effect beside the settings above (frozen base,
checkpointing, input gradients) is a cast of embeddings, norms and lm_head to fp32 (+2.1 GB on Llama-3's 128k vocabulary), which would
flatter qtrain; the baseline keeps them in bf16 as qtrain does.

Same weights, built in memory (the choice asked for in issue 7): every tensor is drawn on the GPU,
one at a time, by qtrain.synthetic's generators seeded by (seed, tensor name). qtrain quantizes
them into its NF4 layers; the baseline quantizes the same bf16 tensors with bitsandbytes exactly as
`AutoModelForCausalLM.from_pretrained(dir, quantization_config=BitsAndBytesConfig(...))` does
(transformers' Linear4bit swap, then `Params4bit(value, **old.__dict__).to(device)` per weight) and
flags the model as transformers does (`is_loaded_in_4bit`). A 16 GB (8B) + 13.5 GB (7B) bf16
checkpoint written and read back would cost about a minute of the 15-minute device budget per model
and 30 of the 64 GB of disk for no difference in what is timed. tests/test_benchmark_e2e.py shows on
a tiny model that this in-memory baseline IS `from_pretrained` of a checkpoint of the same tensors
(identical 4-bit codes, quantization state and logits), and that qtrain's NF4 codes of the same
tensors are bitsandbytes' byte for byte.

Isolation: on CUDA each (model, stack) runs in its own process (`--worker`), one after the other:
bitsandbytes never frees paged optimizer state, Liger patches transformers' classes, and a fresh
CUDA context per stack keeps the memory numbers and the cap of one stack from the others'. The main
process never touches the GPU.

Settings per (model, stack), by default `seq`, `max@cap`, `max@cap+offload` (--quick: `seq` and
`max@cap+offload`): `seq` (--seq tokens, default 2048: --steps steps, the first not measured),
`seq+offload` (the same with activations offloaded to pinned CPU RAM; on request), and on the
--sweep-models (default: the first model) `max@cap` / `max@cap+offload`: the longest sequence that
trains under a --cap-gib (24) card, torch's allocator capped with `set_per_process_memory_fraction`
at the cap minus the memory outside it (benchmarks/memory.py's `memory_cap`); multiples of
--search-step (1024; 4096 with --quick), doubling (or halving) from a start then bisection; an out-of-memory error
means "does not fit"; --search-steps (1) steps per try (the first step allocates everything the
later ones use, the optimizer state excepted, which the `seq` runs already created). qtrain starts
from its estimator's prediction (`qtrain.estimate.max_seq_len`), the others from --baseline-start.
Each search stops after --search-seconds (a try never starts later): the result names the longest
length that trained, the shortest above it that did not, and whether they are one step apart.
Offload: qtrain as its trainer does (`qtrain.memory.OffloadActivations` around the decoder); the
baseline with the same hook (pinned host copies of every saved tensor but parameters) around its
whole forward, logits and loss included, as `torch.autograd.graph.save_on_cpu` would.

Reported per run: tokens/s; MFU = model FLOPs per token x tokens/s / the GPU's dense bf16 peak, with
PaLM's count (appendix B): 6 N + 12 L H Q T, N = the parameters every token multiplies (decoder
linears, lm_head, LoRA; not the embedding lookup), L layers, H x Q = the query width, T = seq (the
same formula for every stack: ratios are unaffected by its conventions; a LoRA step computes no
gradient of the frozen weights, so 6N overstates its work by up to 1/3 and recomputation under
checkpointing is not counted); torch.cuda.max_memory_allocated (peak) and the GPU memory used
(reserved peak + memory outside torch's allocator: CUDA context, paged optimizer state); ratios
stack / baseline of tokens/s and peak; the largest loss difference from the baseline on the same
batches (same weights and init: an end-to-end agreement check in bf16). Targets (issue 7): tokens/s
>= 2.0x and peak <= 0.5x the baseline at seq 2048, Llama-3.1-8B trains >= 80k tokens under 24 GB.

Writes `benchmarks/results/e2e-<gpu>-<date>-<commit>.{json,md,png}` after every (model, stack),
merged into the files an earlier invocation wrote for the same GPU, day and commit (a run can be
split by --models / --stacks / --settings). Time (by FLOP counts, not measured: no GPU was
available when this was written): per worker ~10 s start, ~10-20 s build, ~30 s Triton autotuning
in qtrain's first steps, seconds per `seq` setting, and --search-seconds (45; 20 with --quick) plus
at most one try (up to ~1 min near 100k tokens) per sweep; a worker is stopped after
--worker-timeout (300 s) with its results so far kept. Without a CUDA GPU it says so and exits 0;
with --dry it trains a tiny Llama on CPU through the same driver instead (a check, not a measurement).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import functools
import gc
import importlib.metadata
import importlib.util
import json
import math
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30

DEFAULT_MODELS = ["llama-3.1-8b", "llama-2-7b"]
STACKS = ["baseline", "qtrain", "liger"]  # the baseline first: the others are compared with it
SETTINGS = ["seq", "seq+offload", "max@cap", "max@cap+offload"]
DEFAULT_SETTINGS = ["seq", "max@cap", "max@cap+offload"]
QUICK_SETTINGS = ["seq", "max@cap+offload"]
LORA = {"rank": 16, "alpha": 32.0, "target_modules": "all-linear"}
OPTIMIZER = "paged_adamw_32bit"
LR = 2e-4
MAX_GRAD_NORM = 1.0
SEED = 0
STD = 0.02  # the random weights' N(0, std), as qtrain.synthetic.random_model
TARGET_SPEEDUP = 2.0  # tokens/s, qtrain / baseline, at seq 2048
TARGET_MEMORY = 0.5  # peak allocated, qtrain / baseline, at seq 2048
TARGET_CONTEXT = ("llama-3.1-8b", 80_000)  # tokens that must train under the cap

# Dense bf16 tensor-core peaks (no sparsity; fp32 accumulate on GeForce), TFLOP/s, from NVIDIA's
# datasheets and architecture whitepapers. First substring of the device name that matches wins.
PEAK_BF16_TFLOPS = (
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM (HBM3)
    ("A100", 312.0),
    ("RTX 4090", 165.2),
    ("RTX 3090", 71.0),
)


# ---- benchmarks/memory.py: the cap, out-of-memory detection, commit, slugs --------------------------


@functools.cache
def memory_benchmark():
    """benchmarks/memory.py as a module (benchmarks/ is no package)."""
    spec = importlib.util.spec_from_file_location("qtrain_benchmark_memory", Path(__file__).with_name("memory.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def memory_cap(device: torch.device, cap_bytes: int):
    """Context: torch's allocator may reserve `cap_bytes` minus what lies outside it (a card of that size)."""
    return memory_benchmark().memory_cap(device, cap_bytes)


def is_out_of_memory(e: BaseException) -> bool:
    return memory_benchmark().is_out_of_memory(e)


# ---- shared pieces of both stacks ---------------------------------------------------------------------


def source_tensor(name: str, shape, dtype: torch.dtype, device: torch.device, seed: int) -> torch.Tensor:
    """Tensor `name` of the random checkpoint (both stacks): qtrain.synthetic's own draw for it
    (matrices N(0, STD) from a generator seeded by (seed, name), 1-D weights 1, biases 0)."""
    from qtrain.synthetic import frozen_tensor

    return frozen_tensor(name, torch.Size(shape), STD, dtype, device, seed)


def lora_a_init(name: str, shape, dtype: torch.dtype, device: torch.device, seed: int) -> torch.Tensor:
    """LoRA A of module `name` as qtrain.synthetic.random_model draws it (Kaiming-uniform, a=sqrt(5))."""
    from qtrain.synthetic import tensor_generator

    a = torch.empty(shape, dtype=dtype, device=device)
    return torch.nn.init.kaiming_uniform_(
        a, a=math.sqrt(5), generator=tensor_generator(device, seed, f"{name}.lora_a.weight")
    )


def random_batch(vocab: int, batch: int, seq: int, seed: int) -> dict:
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids.clone(), "num_tokens": torch.tensor(ids.numel())}


@dataclass
class Stack:
    """One model under test, its optimizer (kept for every run of the stack: bitsandbytes never frees
    paged state) and its training step."""

    name: str  # baseline | qtrain | liger
    model_name: str
    config: object
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    trainable: list
    device: torch.device
    dtype: torch.dtype
    step: Callable  # step(stack, batch, offload) -> (loss, tokens)
    info: dict = field(default_factory=dict)

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


def _optimizer(name: str, trainable: list) -> torch.optim.Optimizer:
    from qtrain.optim import build_optimizer

    return build_optimizer(name, [{"params": trainable, "lr": LR, "weight_decay": 0.0}])


# ---- (a) transformers + bitsandbytes + PEFT -------------------------------------------------------------


def _set_module(model: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def quantize_like_transformers(model: torch.nn.Module, dtype: torch.dtype, device: torch.device, seed: int) -> int:
    """Every nn.Linear but the output layer -> bitsandbytes Linear4bit holding source_tensor quantized
    to NF4 with double quant, as transformers' bitsandbytes integration builds and fills it
    (replace_with_bnb_linear + Bnb4bitQuantize). Returns the number of layers quantized."""
    import bitsandbytes as bnb

    head = model.get_output_embeddings()
    names = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear and m is not head]
    for name in names:
        linear = model.get_submodule(name)
        with torch.device("meta"):
            new = bnb.nn.Linear4bit(linear.in_features, linear.out_features, linear.bias is not None, dtype,
                                    compress_statistics=True, quant_type="nf4", quant_storage=torch.uint8)  # fmt: skip
        new.requires_grad_(False)
        value = source_tensor(f"{name}.weight", (linear.out_features, linear.in_features), dtype, device, seed)
        new.weight = bnb.nn.Params4bit(value, requires_grad=False, **new.weight.__dict__).to(device)
        del value
        if linear.bias is not None:
            bias = source_tensor(f"{name}.bias", (linear.out_features,), dtype, device, seed)
            new.bias = torch.nn.Parameter(bias, requires_grad=False)
        _set_module(model, name, new)
    return len(names)


def bnb_base_model(config, device: torch.device, dtype: torch.dtype, seed: int = SEED) -> torch.nn.Module:
    """The model `from_pretrained(dir, quantization_config=BitsAndBytesConfig(nf4, double quant, compute
    dtype), dtype=dtype, attn_implementation="sdpa")` gives for a checkpoint of the source tensors."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    quantize_like_transformers(model, dtype, device, seed)
    head = model.get_output_embeddings()
    tie = head is not None and getattr(config.get_text_config(), "tie_word_embeddings", False)
    for name, param in list(model.named_parameters(remove_duplicate=False)):
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        if param.device.type != "meta" or (tie and module is head and attr == "weight"):
            continue
        value = source_tensor(name, param.shape, dtype, device, seed)
        setattr(module, attr, torch.nn.Parameter(value, requires_grad=False))
    if tie:
        head.weight = model.get_input_embeddings().weight
    model.to(device)  # buffers (rotary tables)
    model.is_loaded_in_4bit = True  # what transformers' bnb quantizer sets on the instance (PEFT reads it)
    model.is_quantized = True
    model.quantization_method = "bitsandbytes"
    return model.eval()  # from_pretrained's models start in eval mode


def peft_lora(model: torch.nn.Module, seed: int = SEED) -> torch.nn.Module:
    """PEFT LoRA r=16 alpha=32 on all linears but lm_head, with qtrain's init copied in."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    lora = LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules="all-linear",
                      bias="none", task_type="CAUSAL_LM")  # fmt: skip
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if isinstance(module, LoraLayer) and "default" in module.lora_A:
                a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
                a.copy_(lora_a_init(name.removeprefix("base_model.model."), a.shape, a.dtype, a.device, seed))
                b.zero_()
    return peft_model


def hf_step(stack: Stack, batch: dict, offload) -> tuple[float, int]:
    """One optimizer step of the standard stack: the model's forward and loss, backward, clip, step."""
    batch = {k: v.to(stack.device) for k, v in batch.items()}
    with stack.autocast(), offload or contextlib.nullcontext():
        loss = stack.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    loss.backward()
    value = loss.item()
    if not math.isfinite(value):
        stack.optimizer.zero_grad(set_to_none=True)
        raise FloatingPointError(f"{stack.name}: loss is {value}")
    torch.nn.utils.clip_grad_norm_(stack.trainable, MAX_GRAD_NORM)
    stack.optimizer.step()
    stack.optimizer.zero_grad(set_to_none=True)
    return value, int(batch["num_tokens"])


def build_baseline(name: str, config, device, dtype, optimizer_name: str, liger: bool = False) -> Stack:
    from qtrain.model import enable_checkpointing

    model = bnb_base_model(config, device, dtype)
    info = {"attn_implementation": model.config._attn_implementation, "loss": "transformers (full logits, fp32)"}
    if liger:
        import liger_kernel.transformers as liger_transformers

        model_type = config.get_text_config().model_type
        apply = getattr(liger_transformers, f"apply_liger_kernel_to_{model_type}")  # llama, mistral, qwen2
        apply(model=model)  # rope, rms_norm, swiglu, fused_linear_cross_entropy
        info["loss"] = "Liger fused linear cross-entropy"
    enable_checkpointing(model)
    model.config.use_cache = False
    model = peft_lora(model)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(optimizer_name, trainable)
    return Stack(
        "liger" if liger else "baseline", name, config, model, optimizer, trainable, device, dtype, hf_step, info
    )


# ---- (b) qtrain -------------------------------------------------------------------------------------------


def qtrain_step(stack: Stack, batch: dict, offload) -> tuple[float, int]:
    from qtrain.train import train_step

    return train_step(stack.model, [batch], stack.optimizer, stack.trainable, MAX_GRAD_NORM, stack.device,
                      stack.autocast(), offload=offload, loss_backend=stack.info["loss_backend"])  # fmt: skip


def build_qtrain(name: str, config, device, dtype, optimizer_name: str, kernels: str = "auto") -> Stack:
    from qtrain.kernels.nf4_lora import resolve_backend

    from qtrain.builder import finish_model
    from qtrain.fused import FusedOps
    from qtrain.lora import LoRASpec
    from qtrain.methods.lora import LoRA
    from qtrain.model import enable_checkpointing
    from qtrain.synthetic import random_model

    spec = LoRASpec(**LORA)
    model = random_model(config, spec, dtype, device, quantize=True, backend="auto", seed=SEED)
    ops = FusedOps(enabled=kernels)
    swapped = finish_model(model, [], ops, present=[LoRA()])  # random_model's LoRA trainable, the fused modules: as training
    enable_checkpointing(model)
    model.config.use_cache = False
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    info = {
        "attn_implementation": model.config._attn_implementation,
        "nf4_backend": resolve_backend("auto", torch.empty(1, device=device, dtype=dtype)),
        "fused_modules": len(swapped),
        "fused_skipped": dict(list(swapped.skipped.items())[:5]),
        "fused_groups": [g for g in ("qkv", "gate_up") if any(getattr(m, f"fuse_{g}", False) for m in model.modules())],
        "loss_backend": ops.loss_backend(device),
        "loss": f"qtrain chunked lm_head + cross-entropy ({ops.loss_backend(device)})",
    }
    return Stack("qtrain", name, config, model, _optimizer(optimizer_name, trainable), trainable, device, dtype,
                 qtrain_step, info)  # fmt: skip


def build_stack(stack: str, name: str, config, device, dtype, optimizer_name: str, kernels: str) -> Stack:
    if stack == "qtrain":
        return build_qtrain(name, config, device, dtype, optimizer_name, kernels)
    return build_baseline(name, config, device, dtype, optimizer_name, liger=stack == "liger")


# ---- FLOPs and MFU ------------------------------------------------------------------------------------------


def flops_per_token(config, seq: int, rank: int = LORA["rank"]) -> dict:
    """PaLM's model FLOPs per token (appendix B): 6 N + 12 L H Q T. N: parameters every token
    multiplies (decoder linears, lm_head, LoRA A and B); H x Q: the query width; T: seq."""
    c = config.get_text_config()
    d, layers, inter, vocab = c.hidden_size, c.num_hidden_layers, c.intermediate_size, c.vocab_size
    heads = c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or d // heads
    q, k = heads * head_dim, kv * head_dim
    shapes = [(d, q), (d, k), (d, k), (q, d), (d, inter), (d, inter), (inter, d)]  # (in, out): q k v o gate up down
    base = layers * sum(i * o for i, o in shapes) + vocab * d
    lora = layers * sum(rank * (i + o) for i, o in shapes)
    attention = 12 * layers * q * seq
    return {"params": base + lora, "base_params": base, "lora_params": lora, "attention": attention,
            "per_token": 6 * (base + lora) + attention}  # fmt: skip


def peak_tflops(device_name: str, override: float | None = None) -> float | None:
    if override:
        return override
    for key, value in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return value
    return None


def device_info(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"gpu": device.type, "capability": "-", "gpu_memory_gib": 0.0}
    props = torch.cuda.get_device_properties(device)
    return {"gpu": torch.cuda.get_device_name(device), "capability": f"{props.major}.{props.minor}",
            "gpu_memory_gib": props.total_memory / GiB}  # fmt: skip


# ---- measuring ---------------------------------------------------------------------------------------------


def free_memory(stack: Stack) -> None:
    """Gradients, cached GPU blocks and cached pinned host blocks released (benchmarks/memory.py's)."""
    memory_benchmark().free_memory(stack)


def measure(stack: Stack, batch: int, seq: int, steps: int, offload: bool, warmup: int = 1) -> dict:
    """`steps` optimizer steps on the fixed random batches; the first `warmup` are not measured. Raises
    torch.OutOfMemoryError. CUDA-only numbers are None elsewhere."""
    from qtrain.memory import OffloadActivations

    cuda = stack.device.type == "cuda"
    warmup = min(warmup, steps - 1)
    vocab = stack.config.get_text_config().vocab_size
    off = OffloadActivations() if offload else None
    losses, tokens, t0 = [], 0, time.perf_counter()
    for i in range(steps):
        if i == warmup:
            if cuda:
                torch.cuda.synchronize(stack.device)
                torch.cuda.reset_peak_memory_stats(stack.device)
            tokens, t0 = 0, time.perf_counter()
        loss, n = stack.step(stack, random_batch(vocab, batch, seq, seed=SEED + i), off)
        losses.append(loss)
        tokens += n
    if cuda:
        torch.cuda.synchronize(stack.device)
    seconds = time.perf_counter() - t0
    out = {"measured_steps": steps - warmup, "losses": losses, "tokens_per_s": tokens / seconds,
           "step_seconds": seconds / (steps - warmup)}  # fmt: skip
    keys = ("peak_allocated", "peak_reserved", "outside_allocator", "device_used")
    if cuda:
        outside = memory_benchmark().outside_allocator(stack.device)
        reserved = torch.cuda.max_memory_reserved(stack.device)
        out |= dict(zip(keys, (torch.cuda.max_memory_allocated(stack.device), reserved, outside, reserved + outside)))
    else:
        out |= dict.fromkeys(keys)
    if off is not None:
        out["offloaded_bytes_per_step"] = off.bytes // steps
    return out


def run_setting(stack: Stack, setting: str, batch: int, seq: int, steps: int, offload: bool,
                peak: float | None = None, allocator_limit: int | None = None) -> dict:  # fmt: skip
    """One measured run; an out-of-memory error is recorded, not raised."""
    row = {"model": stack.model_name, "stack": stack.name, "setting": setting, "seq": seq, "batch": batch,
           "offload": offload, "steps": steps, "allocator_limit": allocator_limit, "error": None}  # fmt: skip
    try:
        row |= measure(stack, batch, seq, steps, offload)
    except RuntimeError as e:  # torch.OutOfMemoryError is one
        if not is_out_of_memory(e):
            raise
        row["error"] = "out of memory: " + str(e).split("\n")[0][:300]
    free_memory(stack)
    if row["error"] is None:
        fpt = flops_per_token(stack.config, seq)["per_token"]
        row["model_tflops_per_s"] = fpt * row["tokens_per_s"] / 1e12
        row["mfu"] = row["model_tflops_per_s"] / peak if peak else None
    return row


# ---- the longest sequence under a cap ------------------------------------------------------------------------


def search_max_seq(fits, start: int, step: int, limit: int, deadline: float | None = None,
                   clock: Callable[[], float] = time.monotonic) -> dict:  # fmt: skip
    """benchmarks/memory.py's `bracket_max_seq` (time-boxed by `deadline`): found, fails_at, complete, tries."""
    return memory_benchmark().bracket_max_seq(fits, start, step, limit, deadline, clock)


def search_start(stack: Stack, batch: int, offload: bool, cap_bytes: int, limit: int, default: int) -> int:
    """qtrain: its estimator's longest sequence under the cap; the other stacks: `default`."""
    if stack.name != "qtrain":
        return default
    from qtrain.estimate import Workload, max_seq_len
    from qtrain.lora import LoRASpec

    wanted = {"batch_size": batch, "seq_len": 2048, "dtype": stack.dtype, "backend": stack.info["nf4_backend"],
              "gradient_checkpointing": True, "offload_activations": offload, "optimizer": stack.info["optimizer"],
              "device": stack.device.type, "loss_chunk": None, "autocast": stack.dtype != torch.float32,
              "fused": tuple(stack.info["fused_groups"])}  # fmt: skip
    names = {f.name for f in dataclasses.fields(Workload)}
    workload = Workload(**{k: v for k, v in wanted.items() if k in names})
    try:
        return max_seq_len(stack.config, LoRASpec(**LORA), workload, cap_bytes, limit=limit) or default
    except Exception:  # noqa: BLE001 - an estimator failure must not stop the measurement
        traceback.print_exc()
        return default


def max_seq_under_cap(stack: Stack, offload: bool, args, peak: float | None) -> tuple[dict, dict | None]:
    """(search summary, the row of the longest sequence that trained) under an args.cap_gib card."""
    cap = int(args.cap_gib * GiB)
    setting = "max@cap" + ("+offload" if offload else "")
    start = search_start(stack, args.batch, offload, cap, args.max_seq, args.baseline_start)
    rows: dict[int, dict] = {}

    def fits(seq: int) -> bool:
        with memory_cap(stack.device, cap) as limit_bytes:
            row = run_setting(stack, setting, args.batch, seq, args.search_steps, offload, peak, limit_bytes)
        rows[seq] = row
        print(f"  {stack.model_name} {stack.name} {setting}: seq {seq}: "
              f"{'OOM' if row['error'] else 'trains, peak ' + _gib(row['peak_allocated']) + ' GiB'}", flush=True)  # fmt: skip
        return row["error"] is None

    t0 = time.monotonic()
    result = search_max_seq(fits, start, args.search_step, args.max_seq, t0 + args.search_seconds)
    summary = {"model": stack.model_name, "stack": stack.name, "offload": offload, "cap_gib": args.cap_gib,
               "start": start, "step": args.search_step, "limit": args.max_seq, "steps_per_try": args.search_steps,
               "seconds": time.monotonic() - t0, **result}  # fmt: skip
    return summary, rows.get(result["found"])


# ---- one (model, stack): in this process or in a worker process ---------------------------------------------


def settings_for(args, model: str) -> list[str]:
    return [s for s in args.settings if not s.startswith("max@cap") or model in args.sweep_models]


def run_stack(args, model: str, stack_name: str, config, device: torch.device, dtype: torch.dtype,
              optimizer_name: str, save: Callable[[dict], None] | None = None) -> dict:  # fmt: skip
    """Build one stack of one model and run its settings; `save(part)` after each (partial results
    survive a crash or a time limit). Returns {"info", "rows", "max_seq"}."""
    part = {"model": model, "stack": stack_name, "info": {"device": device_info(device)}, "rows": [], "max_seq": []}
    save = save or (lambda p: None)
    print(f"## {model}: {stack_name}", flush=True)
    t0 = time.perf_counter()
    try:
        stack = build_stack(stack_name, model, config, device, dtype, optimizer_name, args.kernels)
    except Exception as e:  # noqa: BLE001 - recorded: one stack failing must not stop the others
        traceback.print_exc()
        part["rows"].append({"model": model, "stack": stack_name, "setting": "build", "seq": None,
                             "error": f"{type(e).__name__}: {e}"[:500]})  # fmt: skip
        save(part)
        return part
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    stack.info |= {"build_seconds": time.perf_counter() - t0, "optimizer": optimizer_name,
                   "trainable_params": sum(p.numel() for p in stack.trainable),
                   "allocated_after_build": torch.cuda.memory_allocated(device) if device.type == "cuda" else None}  # fmt: skip
    part["info"] |= stack.info
    print(f"built in {stack.info['build_seconds']:.1f}s: {json.dumps(stack.info, default=str)}", flush=True)
    peak = peak_tflops(part["info"]["device"]["gpu"], args.peak_tflops)
    for setting in settings_for(args, model):
        offload = setting.endswith("+offload")
        try:
            if setting.startswith("max@cap"):
                summary, row = max_seq_under_cap(stack, offload, args, peak)
                part["max_seq"].append(summary)
                print(format_search(summary), flush=True)
                if row is not None:
                    part["rows"].append(row)
            else:
                part["rows"].append(run_setting(stack, setting, args.batch, args.seq, args.steps, offload, peak))
                print(format_row(part["rows"][-1], {}), flush=True)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            part["rows"].append({"model": model, "stack": stack_name, "setting": setting, "seq": None,
                                 "error": f"{type(e).__name__}: {e}"[:500]})  # fmt: skip
        free_memory(stack)
        save(part)
    return part


def worker_argv(args, model: str, stack: str, out: Path) -> list[str]:
    """The command line of a worker process running `stack` of `model` with this run's settings."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", stack, "--worker-out", str(out),
            "--models", model, "--sweep-models", *args.sweep_models, "--settings", *args.settings,
            "--seq", str(args.seq), "--batch", str(args.batch), "--steps", str(args.steps),
            "--cap-gib", str(args.cap_gib), "--max-seq", str(args.max_seq), "--search-step", str(args.search_step),
            "--search-steps", str(args.search_steps), "--search-seconds", str(args.search_seconds),
            "--baseline-start", str(args.baseline_start), "--kernels", args.kernels]  # fmt: skip
    if args.peak_tflops:
        argv += ["--peak-tflops", str(args.peak_tflops)]
    return argv


def spawn(argv: list[str], timeout: float) -> int:
    """Run a worker process to its end (its output goes to ours); its exit status. Raises TimeoutExpired."""
    return subprocess.run(argv, check=False, cwd=ROOT, timeout=timeout).returncode


def run_worker_process(args, model: str, stack: str) -> dict:
    """Run one (model, stack) in a fresh process; its partial results if it fails or times out."""
    with tempfile.TemporaryDirectory(prefix="qtrain-e2e-") as tmp:
        out = Path(tmp) / "part.json"
        error = None
        try:
            status = spawn(worker_argv(args, model, stack, out), args.worker_timeout)
            if status != 0:
                error = f"worker exited with status {status}"
        except subprocess.TimeoutExpired:
            error = f"worker stopped after --worker-timeout {args.worker_timeout:g} s"
        part = json.loads(out.read_text()) if out.exists() else {"info": {}, "rows": [], "max_seq": []}
    if error:
        print(f"{model} {stack}: {error}", flush=True)
        part["rows"].append({"model": model, "stack": stack, "setting": "worker", "seq": None, "error": error})
    return part


def worker_main(args, configs: dict | None = None, device=None, dtype=torch.bfloat16, optimizer_name=OPTIMIZER) -> int:
    """`--worker STACK`: one (model, stack), results written to --worker-out after every setting."""
    from qtrain.presets import preset_config

    model = args.models[0]
    config = (configs or {}).get(model) or preset_config(model)
    device = device or torch.device("cuda", torch.cuda.current_device())

    def save(part: dict) -> None:
        tmp = args.worker_out.with_suffix(".tmp")
        tmp.write_text(json.dumps(part, default=str))
        tmp.replace(args.worker_out)

    run_stack(args, model, args.worker, config, device, dtype, optimizer_name, save)
    return 0


# ---- the driver ----------------------------------------------------------------------------------------------


def available_stacks(args, isolate: bool) -> tuple[list[str], list[str]]:
    """(stacks to run, notes on the ones left out)."""
    stacks, notes = [], []
    for s in args.stacks:
        if s == "liger" and importlib.util.find_spec("liger_kernel") is None:
            notes.append("liger: skipped, liger_kernel is not installed (pack it: pack-wheels.sh liger-kernel)")
        elif s == "liger" and not isolate:
            notes.append("liger: skipped in one process (it patches transformers' classes for every later stack)")
        else:
            stacks.append(s)
    return stacks, notes


def git_commit() -> str:
    return memory_benchmark().git_commit()


def metadata(args, dtype: torch.dtype, optimizer_name: str, notes: list[str]) -> dict:
    def version(dist: str):  # from the installed metadata: importing bitsandbytes here could start CUDA
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "gpu": None, "capability": "-", "gpu_memory_gib": 0.0,  # filled in from the first stack's process
        "commit": git_commit(), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "triton": version("triton"), "bitsandbytes": version("bitsandbytes"),
        "transformers": version("transformers"), "peft": version("peft"), "liger_kernel": version("liger-kernel"),
        "lora": LORA, "dtype": str(dtype).removeprefix("torch."), "optimizer": optimizer_name, "lr": LR,
        "seq": args.seq, "batch": args.batch, "steps": args.steps, "cap_gib": args.cap_gib,
        "peak_tflops": None, "notes": notes,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }  # fmt: skip


def run(args, device: torch.device | None = None, configs: dict | None = None, dtype: torch.dtype = torch.bfloat16,
        optimizer_name: str = OPTIMIZER, save=None, isolate: bool | None = None) -> dict:  # fmt: skip
    """Every stack of every model of `args`, one after the other; `save(result)` after each. `isolate`
    (default: on CUDA unless --in-process) runs each in a worker process. `device`, `configs` (name ->
    config), `dtype` and `optimizer_name` let the tests run this on CPU with a tiny model."""
    device = device or torch.device("cuda", 0)
    isolate = (device.type == "cuda" and not args.in_process) if isolate is None else isolate
    stacks, notes = available_stacks(args, isolate)
    result = {"meta": metadata(args, dtype, optimizer_name, notes), "stacks": {}, "rows": [], "max_seq": []}
    t0 = time.monotonic()
    for model in args.models:
        for stack in stacks:
            print(f"[{time.monotonic() - t0:.0f} s] {model}: {stack}", flush=True)
            if isolate:
                part = run_worker_process(args, model, stack)
            else:
                from qtrain.presets import preset_config

                config = (configs or {}).get(model) or preset_config(model)
                part = run_stack(args, model, stack, config, device, dtype, optimizer_name)
            add_part(result, model, stack, part, args.peak_tflops)
            if save is not None and result["meta"]["gpu"]:
                save(result)
            gc.collect()
    print(f"[{time.monotonic() - t0:.0f} s] done", flush=True)
    result["meta"]["gpu"] = result["meta"]["gpu"] or "unknown-gpu"  # no stack reported its device: still write
    finish(result)
    if save is not None:
        save(result)
    return result


def add_part(result: dict, model: str, stack: str, part: dict, override: float | None) -> None:
    info = part.get("info", {})
    dev = info.get("device")
    if dev and not result["meta"]["gpu"]:
        result["meta"] |= dev
        result["meta"]["peak_tflops"] = peak_tflops(dev["gpu"], override)
    result["stacks"][f"{model}/{stack}"] = info
    result["rows"] += part.get("rows", [])
    result["max_seq"] += part.get("max_seq", [])
    finish(result)


# ---- comparisons and targets -----------------------------------------------------------------------------------


def _row_key(r: dict) -> tuple:
    setting = r.get("setting")
    return r.get("model"), r.get("stack"), setting, None if str(setting).startswith("max@cap") else r.get("seq")


def _ratio(a, b):
    return None if a is None or not b else a / b


def comparisons(rows: list[dict]) -> dict:
    """{row key: {speedup, memory_ratio, loss_diff}} of every measured row against the baseline's
    row of the same model, setting and seq."""
    base = {
        (r["model"], r["setting"], r["seq"]): r for r in rows if r.get("stack") == "baseline" and not r.get("error")
    }
    out = {}
    for r in rows:
        b = base.get((r.get("model"), r.get("setting"), r.get("seq")))
        if r.get("error") or b is None or str(r.get("setting")).startswith("max@cap"):
            continue
        pairs = list(zip(r.get("losses") or [], b.get("losses") or []))
        out[_row_key(r)] = {
            "speedup": _ratio(r.get("tokens_per_s"), b.get("tokens_per_s")),
            "memory_ratio": _ratio(r.get("peak_allocated"), b.get("peak_allocated")),
            "loss_diff": max((abs(x - y) for x, y in pairs), default=None),
        }
    return out


def targets(result: dict) -> list[dict]:
    """Issue 7's targets, each met / missed / not measured in this result."""
    comp = comparisons(result["rows"])
    out = []
    for (model, stack, setting, seq), c in sorted(comp.items(), key=str):
        if stack == "qtrain" and setting == "seq" and seq == 2048:
            out.append({"target": f"{model}: tokens/s >= {TARGET_SPEEDUP:g}x baseline at seq 2048",
                        "value": c["speedup"], "met": None if c["speedup"] is None else c["speedup"] >= TARGET_SPEEDUP})  # fmt: skip
            out.append({"target": f"{model}: peak memory <= {TARGET_MEMORY:g}x baseline at seq 2048",
                        "value": c["memory_ratio"],
                        "met": None if c["memory_ratio"] is None else c["memory_ratio"] <= TARGET_MEMORY})  # fmt: skip
    model, tokens = TARGET_CONTEXT
    found = [s["found"] for s in result["max_seq"] if s["model"] == model and s["stack"] == "qtrain"]
    out.append({"target": f"{model}: trains >= {tokens} tokens under {result['meta']['cap_gib']:g} GiB (best of offload on/off)",
                "value": max(found) if found else None, "met": (max(found) >= tokens) if found else None})  # fmt: skip
    return out


def finish(result: dict) -> None:
    result["comparisons"] = [{"model": k[0], "stack": k[1], "setting": k[2], "seq": k[3], **v}
                             for k, v in comparisons(result["rows"]).items()]  # fmt: skip
    result["targets"] = targets(result)


# ---- output --------------------------------------------------------------------------------------------------------


def _gib(n) -> str:
    return "-" if n is None else f"{n / GiB:.2f}"


def _fmt(x, spec=".2f") -> str:
    return "-" if x is None else format(x, spec)


HEADER = (
    "| model | stack | setting | seq | tok/s | MFU | peak GiB | GPU used GiB | tok/s vs baseline | peak vs baseline "
    "| max Δloss vs baseline | note |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def _times(x) -> str:
    return "-" if x is None else f"{x:.2f}x"


def format_row(r: dict, comp: dict) -> str:
    c = comp.get(_row_key(r), {})
    note = r.get("error") or ""
    if r.get("allocator_limit"):
        note = (note + "; " if note else "") + f"allocator limit {_gib(r['allocator_limit'])} GiB"
    mfu = r.get("mfu")
    return (
        f"| {r.get('model')} | {r.get('stack')} | {r.get('setting')} | {r.get('seq') or '-'} | "
        f"{_fmt(r.get('tokens_per_s'), '.0f')} | {'-' if mfu is None else f'{100 * mfu:.1f}%'} | "
        f"{_gib(r.get('peak_allocated'))} | {_gib(r.get('device_used'))} | {_times(c.get('speedup'))} | "
        f"{_times(c.get('memory_ratio'))} | {_fmt(c.get('loss_diff'), '.3g')} | {note} |"
    )


SEARCH_HEADER = (
    "| model | stack | offload | longest that trains | shortest that does not | complete | seconds | tries (seq: fits) |\n"
    "|---|---|---|---|---|---|---|---|"
)


def format_search(s: dict) -> str:
    tries = ", ".join(f"{n}: {'y' if ok else 'n'}" for n, ok in s["tries"])
    found = f"≥ {s['found']}" if s["found"] and s["found"] == s["limit"] // s["step"] * s["step"] else str(s["found"])
    return (
        f"| {s['model']} | {s['stack']} | {'yes' if s['offload'] else 'no'} | {found} | {s['fails_at'] or '-'} | "
        f"{'yes' if s['complete'] else 'no (out of time)'} | {s['seconds']:.0f} | {tries} |"
    )


def result_stem(meta: dict) -> str:
    return f"e2e-{memory_benchmark().gpu_slug(meta['gpu'])}-{meta['date'][:10]}-{meta['commit']}"


def markdown(result: dict) -> str:
    meta = result["meta"]
    comp = comparisons(result["rows"])
    peak = f"{meta['peak_tflops']:g} TFLOP/s dense bf16" if meta.get("peak_tflops") else "unknown (no MFU)"
    compute = f"{meta['dtype']} autocast" if meta["dtype"] != "float32" else "float32 (no autocast)"
    title = (
        f"# End-to-end QLoRA training on {meta['gpu']} (sm_{meta['capability'].replace('.', '')}, "
        f"{meta['gpu_memory_gib']:.0f} GiB): qtrain vs transformers + PEFT + bitsandbytes"
    )
    versions = (
        f"commit {meta['commit']}, {meta['date']}; torch {meta['torch']}, triton {meta['triton']}, transformers "
        f"{meta['transformers']}, peft {meta['peft']}, bitsandbytes {meta['bitsandbytes']}, "
        f"liger_kernel {meta['liger_kernel']}."
    )
    setup = (
        f"Same random weights (qtrain.synthetic's seeded draws, NF4 double quant), {compute}, LoRA "
        f"r={LORA['rank']} alpha={LORA['alpha']:g} on every linear but lm_head (same init), gradient checkpointing, "
        f"{meta['optimizer']} lr {meta['lr']:g}, clip 1.0; batches of {meta['batch']} x seq random tokens (the same "
        f"for every stack); {meta['steps']} steps per run, the first not measured. baseline = transformers + "
        "bitsandbytes Linear4bit + PEFT LoRA, SDPA, the model's own loss; qtrain = NF4 Triton kernels, fused ops, "
        "chunked lm_head + cross-entropy; liger = the baseline with Liger-Kernel's patches."
    )
    legend = (
        "peak = torch.cuda.max_memory_allocated; GPU used = reserved peak + memory outside torch's allocator. "
        f"MFU: (6 N + 12 L H Q T) x tokens/s / peak ({peak}), PaLM's count. Ratios: stack / baseline, same "
        "model, setting and seq."
    )
    lines = [
        title,
        "",
        versions,
        setup,
        legend,
        "",
        "## Throughput and memory",
        "",
        HEADER,
        *(format_row(r, comp) for r in result["rows"]),
    ]
    if result["max_seq"]:
        lines += ["", f"## Longest sequence that trains under a {meta['cap_gib']:g} GiB cap (set_per_process_memory_fraction)",
                  "", SEARCH_HEADER, *map(format_search, result["max_seq"])]  # fmt: skip
    lines += ["", "## Targets (issue 7)", ""]
    for t in result.get("targets", []):
        state = "not measured" if t["met"] is None else ("met" if t["met"] else "MISSED")
        value = (
            "" if t["value"] is None else f": {t['value']:.3g}" if isinstance(t["value"], float) else f": {t['value']}"
        )
        lines.append(f"- {t['target']}{value} ({state})")
    if meta.get("notes"):
        lines += ["", "## Notes", "", *(f"- {n}" for n in meta["notes"])]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> Path:
    """tokens/s and peak memory per model and stack (setting `seq`), and the longest sequence under the cap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r.get("setting") == "seq" and not r.get("error")]
    models = list(dict.fromkeys(r["model"] for r in result["rows"] if r.get("model")))
    stacks = [s for s in STACKS if any(r.get("stack") == s for r in result["rows"])]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    width = 0.8 / max(len(stacks), 1)
    panels = [("tokens_per_s", "tokens/s (seq setting)", 1.0), ("peak_allocated", "peak allocated, GiB", GiB)]
    for ax, (key, title, unit) in zip(axes, panels):
        for i, stack in enumerate(stacks):
            values = [next(((r.get(key) or 0) / unit for r in rows if r["model"] == m and r["stack"] == stack), 0)
                      for m in models]  # fmt: skip
            ax.bar([j + i * width for j in range(len(models))], values, width, label=stack)
        ax.set_xticks([j + width * (len(stacks) - 1) / 2 for j in range(len(models))], models)
        ax.set_title(title)
    swept = list(dict.fromkeys((x["model"], x["offload"]) for x in result["max_seq"]))  # (model, offload)
    labels = [f"{m}\n{'offload' if off else 'no offload'}" for m, off in swept]
    for i, stack in enumerate(stacks):
        found = {(x["model"], x["offload"]): x["found"] for x in result["max_seq"] if x["stack"] == stack}
        values = [found.get(key, 0) for key in swept]
        axes[2].bar([j + i * width for j in range(len(values))], values, width, label=stack)
    axes[2].set_xticks([j + width * (len(stacks) - 1) / 2 for j in range(len(labels))], labels, fontsize=7)
    axes[2].set_title(f"longest sequence under {result['meta']['cap_gib']:g} GiB")
    axes[0].legend()
    fig.suptitle(
        f"qtrain vs transformers + PEFT + bitsandbytes on {result['meta']['gpu']} ({result['meta']['commit']})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def merge_results(old: dict, new: dict) -> dict:
    """`new` over `old` (an earlier invocation on the same GPU, day and commit)."""
    new_rows = {_row_key(r) for r in new["rows"]}
    key = lambda s: (s["model"], s["stack"], s["offload"], s["cap_gib"])
    new_searches = {key(s) for s in new["max_seq"]}
    meta = dict(new["meta"])
    meta["invocations"] = old["meta"].get("invocations", [old["meta"].get("args")]) + [new["meta"].get("args")]
    merged = {"meta": meta, "stacks": {**old.get("stacks", {}), **new["stacks"]},
              "rows": [r for r in old.get("rows", []) if _row_key(r) not in new_rows] + new["rows"],
              "max_seq": [s for s in old.get("max_seq", []) if key(s) not in new_searches] + new["max_seq"]}  # fmt: skip
    finish(merged)
    return merged


def write_results(result: dict, out_dir: Path, base: dict | None = None) -> tuple[Path, Path, Path]:
    """JSON + Markdown + PNG under `out_dir`; `base`: an earlier result to merge this one into."""
    if base is not None:
        result = merge_results(base, result)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / result_stem(result["meta"])
    json_path, md_path, png_path = stem.with_suffix(".json"), stem.with_suffix(".md"), stem.with_suffix(".png")
    json_path.write_text(json.dumps(result, indent=1, default=str))
    md_path.write_text(markdown(result))
    plot(result, png_path)
    return json_path, md_path, png_path


class Saver:
    """`save(result)` for `run`: writes the result files, merged into those an earlier invocation wrote
    for the same GPU, day and commit (read once, when this invocation first saves)."""

    def __init__(self, out_dir: Path):
        self.out_dir, self.base, self.loaded = out_dir, None, False
        self.paths: tuple[Path, Path, Path] | None = None

    def __call__(self, result: dict) -> tuple[Path, Path, Path]:
        json_path = self.out_dir / (result_stem(result["meta"]) + ".json")
        if not self.loaded:
            self.loaded = True
            if json_path.exists():
                try:
                    self.base = json.loads(json_path.read_text())
                    print(f"merging into {json_path}", flush=True)
                except (OSError, ValueError) as e:
                    print(f"{json_path}: not readable ({e}); overwriting it", flush=True)
        self.paths = write_results(result, self.out_dir, self.base)
        return self.paths


def parse_args(argv=None) -> argparse.Namespace:
    from qtrain.presets import PRESETS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=sorted(PRESETS), help=f"default: {' '.join(DEFAULT_MODELS)}")
    p.add_argument("--stacks", nargs="+", choices=STACKS, help="default: all (liger when installed); "
                   "baseline qtrain with --quick")  # fmt: skip
    p.add_argument("--settings", nargs="+", choices=SETTINGS, help=f"default: {' '.join(DEFAULT_SETTINGS)}; "
                   f"{' '.join(QUICK_SETTINGS)} with --quick")  # fmt: skip
    p.add_argument("--sweep-models", nargs="+", choices=sorted(PRESETS), help="models that get the max@cap settings "
                   "(default: the first of --models)")  # fmt: skip
    p.add_argument("--seq", type=int, default=2048, help="tokens per sequence of the seq settings")
    p.add_argument("--batch", type=int, default=1, help="sequences per step (one micro-batch)")
    p.add_argument("--steps", type=int, help="steps per seq run, the first not measured (default 4; 3 with --quick)")
    p.add_argument("--cap-gib", type=float, default=24.0, help="the card size of the max-context sweep, GiB")
    p.add_argument("--max-seq", type=int, default=131072, help="upper end of the sweep")
    p.add_argument("--search-step", type=int, help="the sweep's resolution, tokens (default 1024; 4096 with --quick)")
    p.add_argument("--search-steps", type=int, default=1, help="steps per try of the sweep")
    p.add_argument(
        "--search-seconds", type=float, help="time per sweep; no try starts later (default 45; 20 with --quick)"
    )
    p.add_argument("--baseline-start", type=int, default=4096, help="first length the baseline/liger sweeps try")
    p.add_argument("--kernels", choices=["auto", "on", "off"], default="auto", help="qtrain's FusedOps.enabled")
    p.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak for MFU (default: from the table)")
    p.add_argument("--quick", action="store_true", help="Llama-3.1-8B, baseline and qtrain, 3 steps, a coarse "
                   "offloaded sweep (~3 min)")  # fmt: skip
    p.add_argument("--dry", action="store_true", help="without a GPU: baseline and qtrain on a tiny Llama on CPU, "
                   "in this process (the driver and result files, in seconds)")  # fmt: skip
    p.add_argument("--in-process", action="store_true", help="run every stack in this process (no isolation)")
    p.add_argument("--worker-timeout", type=float, default=300.0, help="seconds a (model, stack) process may take")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--worker", choices=STACKS, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.models = args.models or (["llama-3.1-8b"] if args.quick else DEFAULT_MODELS)
    args.sweep_models = args.sweep_models or args.models[:1]
    args.steps = args.steps or (3 if args.quick else 4)
    args.search_step = args.search_step or (4096 if args.quick else 1024)
    args.search_seconds = args.search_seconds if args.search_seconds is not None else (20.0 if args.quick else 45.0)
    args.stacks = [s for s in STACKS if s in (args.stacks or (STACKS[:2] if args.quick else STACKS))]
    args.settings = args.settings or (QUICK_SETTINGS if args.quick else DEFAULT_SETTINGS)
    if args.steps < 2 or args.search_steps < 1 or args.seq < 2 or args.batch < 1:
        p.error("--steps must be >= 2 (the first is not measured), --search-steps and --batch >= 1, --seq >= 2")
    if args.search_step < 1 or args.max_seq < args.search_step:
        p.error("--search-step must be >= 1 and <= --max-seq")
    if args.worker and not args.worker_out:
        p.error("--worker needs --worker-out")
    return args


def dry_run(args) -> int:
    """--dry on CPU: the baseline and qtrain stacks train a tiny Llama (fp32, plain AdamW, one thread) for
    two steps through `run`, in this process, and write the result files: a check of the whole driver
    for benchmarks/gpu_session.sh --dry, not a measurement."""
    from qtrain.tiny import tiny_config

    args.models = args.sweep_models = ["tiny"]
    args.settings, args.seq, args.steps, args.stacks = ["seq"], 32, 2, ["baseline", "qtrain"]
    # multiples of 64: bitsandbytes 0.50's CPU dequantize is wrong for rows that are not
    configs = {"tiny": tiny_config("llama", hidden_size=64, intermediate_size=128, num_layers=1, vocab_size=128)}
    torch.set_num_threads(1)
    save = Saver(args.out)
    result = run(args, torch.device("cpu"), configs, torch.float32, "adamw", save=save)
    print(markdown(result))
    for path in save.paths or ():
        print(f"wrote {path}")
    return 0 if all(r["error"] is None for r in result["rows"]) else 1


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        if args.dry:
            return dry_run(args)
        print("benchmarks/e2e.py needs a CUDA GPU (torch.cuda.is_available() is False): nothing measured.")
        return 0
    if args.worker:
        return worker_main(args)
    save = Saver(args.out)
    result = run(args, save=save)
    print(markdown(result))
    for path in save.paths or ():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
