"""Every PEFT method on the NF4 base: trainable parameters of Llama-3.1-8B at the method's default
settings, and the peak memory of a training step, measured beside qtrain's estimate.

    python benchmarks/methods.py                      # all methods
    python benchmarks/methods.py --methods ia3 prompt_tuning --seq 1024
    python benchmarks/methods.py --layers 32 --seq 2048   # the whole model (a GPU, or a lot of CPU RAM and time)

Per method (`method:` value, settings = the config defaults, LoRA r=16 on every linear where LoRA is
used):

- trainable parameters of Llama-3.1-8B, counted on a meta-device model built as `qtrain train`
  builds it (NF4 linears, then the method applied) and checked against the method's formula
  (`expected_trainable`);
- the estimator's peak (`qtrain.estimate`) for the full model at `--full-seq` (2048) tokens, bf16,
  gradient checkpointing, paged AdamW on a GPU;
- the measured peak of one training step (after one unmeasured step) of a model with Llama-3.1-8B's
  widths, vocabulary and head layout but only `--layers` decoder layers (2 by default, so that a
  CPU runs it), random weights (`qtrain.synthetic.random_model`), batch 1 x `--seq` random tokens,
  gradient checkpointing, the chunked loss, and beside it the estimator's peak for exactly that
  model and workload. On CUDA: `torch.cuda.max_memory_allocated` (bf16, paged AdamW 32-bit); on CPU:
  the allocator events the torch profiler records (`qtrain.memprof`, fp32, AdamW): "CPU-accounted".

AdapterFusion fuses two random stage-1 Pfeiffer adapters written to a temp dir. Writes
`benchmarks/results/methods-<device>-<date>-<commit>.{json,md}`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30
MODEL = "llama-3.1-8b"
# (label, method names, overrides): each at the config's defaults
RUNS = [
    ("LoRA", ["lora"], []),
    ("DoRA", ["lora"], ["lora.use_dora=true"]),
    ("AdaLoRA", ["adalora"], []),
    ("(IA)³", ["ia3"], []),
    ("BitFit", ["bitfit"], []),
    ("Houlsby adapters", ["houlsby"], []),
    ("Pfeiffer adapters", ["pfeiffer"], []),
    ("parallel adapter", ["parallel_adapter"], []),
    ("AdapterFusion (2 adapters)", ["adapter_fusion"], []),
    ("prompt tuning", ["prompt_tuning"], []),
    ("P-tuning", ["p_tuning"], []),
    ("prefix tuning", ["prefix_tuning"], []),
    ("P-tuning v2", ["p_tuning_v2"], []),
    ("LLaMA-Adapter", ["llama_adapter"], []),
    ("LoRA + prompt tuning", ["lora", "prompt_tuning"], []),
]


def write_pfeiffer(out: Path, config, seed: int) -> str:
    """A random stage-1 Pfeiffer adapter dir (as `qtrain train method=pfeiffer` writes it), for AdapterFusion."""
    from qtrain.methods import Pfeiffer
    from qtrain.methods.io import METHOD_CONFIG, METHOD_WEIGHTS

    c, m = config.get_text_config(), Pfeiffer()
    d, g = c.hidden_size, torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}.adapter_mlp."
        tensors |= {p + "down.weight": 0.02 * torch.randn(m.bottleneck, d, generator=g), p + "down.bias": torch.zeros(m.bottleneck),
                    p + "up.weight": 0.02 * torch.randn(d, m.bottleneck, generator=g), p + "up.bias": torch.zeros(d)}  # fmt: skip
    target = out / m.name
    target.mkdir(parents=True, exist_ok=True)
    save_file(tensors, target / METHOD_WEIGHTS)
    (target / METHOD_CONFIG).write_text(json.dumps(m.config_dict()))
    return str(out)


def run_config(names: list[str], overrides: list[str], fusion_dirs: list[str]):
    """The Config of one run: its LoRA spec (rank 0 without LoRA) and its other methods."""
    from qtrain.config import load_config
    from qtrain.lora import LoRASpec

    extra = [f"adapter_fusion.adapters=[{', '.join(fusion_dirs)}]"] if "adapter_fusion" in names else []
    cfg = load_config(None, ["model.name_or_path=unused", f"method=[{', '.join(names)}]", *overrides, *extra])
    spec = cfg.lora if "lora" in names else LoRASpec(rank=0)
    return cfg, spec, tuple(getattr(cfg, n) for n in names if n != "lora")


def count_trainable(config, spec, methods) -> int:
    """Trainable parameters on a meta model of `config` (nothing allocated)."""
    from qtrain.estimate import Workload, adapter_params, meta_model, with_lora

    w = with_lora(Workload(methods=methods, device="cpu"), spec)  # LoRA (when spec has a rank) among the methods
    model = meta_model(config, None, w)
    return sum(p.numel() for p in adapter_params(model, w.methods))


def workload(seq: int, device: torch.device, methods) -> object:
    """The estimator's view of a step: qtrain's defaults on `device` (on CUDA: bf16, Triton NF4 kernels,
    the fused modules of `kernels:`, paged AdamW; on CPU: fp32, torch kernels, AdamW)."""
    from qtrain.estimate import Workload, fused_groups
    from qtrain.fused import FusedOps

    cuda = device.type == "cuda"
    return Workload(
        fused=fused_groups(FusedOps(), device.type, "triton" if cuda else "torch", methods),
        batch_size=1,
        seq_len=seq,
        dtype=torch.bfloat16 if cuda else torch.float32,
        backend="triton" if cuda else "torch",
        optimizer="paged_adamw_32bit" if cuda else "adamw",
        device=device.type,
        methods=methods,
    )


def measure_peak(config, spec, methods, w, device: torch.device) -> tuple[int, float]:
    """(peak bytes, seconds per step) of the second of two training steps on a random model."""
    from qtrain.builder import finish_model
    from qtrain.fused import FusedOps
    from qtrain.memprof import MemoryProfiler, peak_sample
    from qtrain.methods.lora import LoRA
    from qtrain.model import enable_checkpointing
    from qtrain.optim import build_optimizer, param_groups
    from qtrain.synthetic import random_model
    from qtrain.train import train_step

    model = random_model(config, spec, w.dtype, device, backend="auto" if device.type == "cuda" else "torch")
    ops = FusedOps()  # qtrain's defaults: the fused modules on CUDA, stock modules on CPU
    lora = [LoRA()] if spec.rank else []  # random_model built it: trained, not applied again
    finish_model(model, list(methods), ops, present=lora)  # methods, trainable, fused: as training
    enable_checkpointing(model)
    model.config.use_cache = False
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(w.optimizer, param_groups(model, 1e-4, 0.0))
    ids = torch.randint(0, config.vocab_size, (1, w.seq_len), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.clone(), "num_tokens": torch.tensor(w.seq_len)}
    autocast = (lambda: torch.autocast(device.type, dtype=w.dtype)) if w.dtype != torch.float32 else (lambda: None)
    step = lambda **kw: train_step(model, [batch], optimizer, trainable, 1.0, device, autocast(), methods=methods,
                                   loss_backend=ops.loss_backend(device), **kw)  # fmt: skip
    step(step=1, total_steps=2)  # optimizer state exists from here on
    t0 = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step(step=2, total_steps=2)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        profiler = MemoryProfiler(model, optimizer, device)
        with profiler.step(2):
            step(step=2, total_steps=2, on_phase=profiler.phase)
        peak = peak_sample(profiler.samples()).peak
        profiler.detach()
    return peak, time.perf_counter() - t0


def _common():
    """benchmarks/_common.py, loaded by path (benchmarks/ is no package; the tests load this script by path)."""
    spec = importlib.util.spec_from_file_location("qtrain_benchmarks_common", Path(__file__).with_name("_common.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="*", help="labels or method names to run (default: all)")
    p.add_argument("--layers", type=int, default=2, help="decoder layers of the measured model (Llama-3.1-8B has 32)")
    p.add_argument("--seq", type=int, default=512, help="tokens of the measured step")
    p.add_argument("--full-seq", type=int, default=2048, help="tokens of the full-model estimate")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    return p.parse_args(argv)


def selected(args) -> list[tuple]:
    if not args.methods:
        return RUNS
    want = set(args.methods)
    runs = [r for r in RUNS if r[0] in want or "+".join(r[1]) in want]
    if not runs:
        raise SystemExit(f"--methods {args.methods}: none of {[r[0] for r in RUNS]}")
    return runs


def main(argv=None) -> int:
    from qtrain.estimate import estimate
    from qtrain.presets import preset_config

    args = parse_args(argv)
    commit, started = _common().git_state(ROOT), dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")  # the code that runs
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else args.device if args.device != "auto" else "cpu")
    full = preset_config(MODEL)
    small = replace_layers(full, args.layers)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        fusion = {key: [write_pfeiffer(Path(tmp) / f"{key}{i}", c, i) for i in range(2)] for key, c in (("full", full), ("small", small))}
        for label, names, overrides in selected(args):
            _, spec, methods = run_config(names, overrides, fusion["full"])
            trainable = count_trainable(full, spec, methods)
            est_full = estimate(full, spec, workload(args.full_seq, torch.device("cuda"), methods))
            slice_overrides = [f"llama_adapter.adapter_layers={min(30, args.layers)}"]  # the paper's 30, or every layer of the slice
            _, spec_s, methods_s = run_config(names, overrides + slice_overrides, fusion["small"])
            w = workload(args.seq, device, methods_s)
            est_small = estimate(small, spec_s, w)
            peak, seconds = measure_peak(small, spec_s, methods_s, w, device)
            row = {
                "method": label,
                "config": names,
                "overrides": overrides,
                "trainable_params": trainable,
                "formula_params": None if spec.rank else sum(m.expected_trainable(full) for m in methods),
                "estimated_peak_full": est_full.peak,
                "estimated_device_total_full": est_full.device_total,
                "measured_peak": peak,
                "frozen_weights": est_small.by_category()["weights"],  # exact (tests/qtrain/test_estimate.py)
                "estimated_peak": est_small.peak,
                "estimate_over_measured": est_small.peak / peak,
                "step_seconds": seconds,
            }
            rows.append(row)
            print(f"{label:28s} trainable {trainable:>13,}  measured {peak / GiB:6.2f} GiB  estimated {est_small.peak / GiB:6.2f} GiB"
                  f"  ({row['estimate_over_measured']:.2f})  full-model estimate {est_full.peak / GiB:6.2f} GiB", flush=True)  # fmt: skip
    meta = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (CPU-accounted: torch profiler allocator events)",
        **commit,  # commit, dirty
        "date": started,
        "torch": torch.__version__,
        "model": MODEL,
        "measured_model": f"{MODEL} widths, {args.layers} of {full.num_hidden_layers} layers",
        "seq": args.seq,
        "full_seq": args.full_seq,
        "dtype": str(workload(1, device, ()).dtype).removeprefix("torch."),
    }
    write_results({"meta": meta, "rows": rows}, args.out)
    return 0


def replace_layers(config, layers: int):
    c = type(config).from_dict(config.to_dict())
    c.num_hidden_layers = layers
    return c


def write_results(result: dict, out: Path) -> None:
    meta = result["meta"]
    slug = re.sub(r"[^A-Za-z0-9]+", "-", meta["device"].split(" (")[0]).strip("-").lower()
    stem = out / f"methods-{slug}-{meta['date'][:10]}-{meta['commit']}"
    out.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# PEFT methods on the NF4 base: {meta['model']}",
        "",
        f"{meta['device']}, commit {_common().describe_commit(meta)}, {meta['date']}, torch {meta['torch']}, {meta['dtype']}.",
        (
            f"Measured: one training step of {meta['measured_model']}, batch 1 x {meta['seq']} tokens, gradient "
            f"checkpointing, chunked loss; estimated (full model): 32 layers, 1 x {meta['full_seq']} tokens, bf16, paged AdamW."
        ),
        "",
        "| method | trainable params (8B) | measured peak | above the frozen weights | estimate | estimate / measured | full 8B estimate |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['method']} | {r['trainable_params']:,} | {r['measured_peak'] / GiB:.2f} GiB "
            f"| {(r['measured_peak'] - r['frozen_weights']) / 2**20:,.0f} MiB | {r['estimated_peak'] / GiB:.2f} GiB "
            f"| {r['estimate_over_measured']:.2f} | {r['estimated_peak_full'] / GiB:.2f} GiB |"
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    sys.exit(main())
