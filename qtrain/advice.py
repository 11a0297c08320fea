"""Memory advice beside the estimator: the pre-flight check before a run loads (will it fit on this
GPU?) and what to say when CUDA runs out of memory during a step. Both put the estimate
(`qtrain.estimate`) of the run's settings, and of settings that need less, in front of the user;
the recipe (`qtrain.train`) only calls them.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from rich.console import Console

from qtrain.config import Config
from qtrain.estimate import estimate, suggestions, workload_for
from qtrain.kernels.backend import resolve_on_device
from qtrain.memory import peak_memory_bytes
from qtrain.presets import resolve_config

GiB = 2**30


def oom_advice(cfg: Config, step: int, batch_shape: tuple[int, int], device: torch.device, config) -> str:
    """What was running when CUDA ran out of memory, and settings that need less, with the
    estimated GPU memory each needs."""
    b, s = batch_shape
    peak = peak_memory_bytes(device) / GiB
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    w = replace(workload_for(cfg, "cuda", config=config), batch_size=b, seq_len=s)
    tips = suggestions(config, None, w, cfg.train.grad_accum, budget=total)
    of = f" of {total / GiB:.1f} GiB" if total else ""
    return (
        f"CUDA out of memory at step {step}: micro-batch {b} x {s} tokens (train.batch_size={b}, "
        f"data.max_length={cfg.data.max_length}, packing={cfg.data.packing}); peak {peak:.1f} GiB{of}. "
        "Try, in this order: " + "; ".join(f"{text} (est. {need / GiB:.1f} GiB)" for text, need in tips)
    )


def check_memory(cfg: Config, path: str, device: torch.device, console: Console, ranks: int = 1, strategy: str = "single") -> None:
    """Before loading: the estimated peak against the GPU's free memory; when it will not fit, say
    so with the settings that would (training still starts: paged memory can absorb some excess).
    `ranks`, `strategy` (a torchrun launch): the estimate per rank (FSDP: 1/ranks of the base)."""
    if device.type != "cuda":
        return
    try:
        config = resolve_config(path)
    except (OSError, ValueError):  # no config.json to read: loading will say why
        return
    backend = resolve_on_device("nf4_lora", cfg.model.backend, device)  # what training will run, self-check included
    w = replace(workload_for(cfg, "cuda", backend, config), ranks=ranks, strategy=strategy)
    need = estimate(config, None, w).device_total
    free, total = torch.cuda.mem_get_info(device)
    if need <= free:
        console.print(f"[bold]memory[/] estimated {need / GiB:.1f} GiB of the {free / GiB:.1f} GiB free")
        return
    console.print(
        f"[yellow]memory: this run needs about {need / GiB:.1f} GiB but {free / GiB:.1f} GiB of {total / GiB:.1f} GiB "
        "is free; it will likely run out of memory. Settings that need less (estimated GPU total):[/]"
    )
    for text, n in suggestions(config, None, w, cfg.train.grad_accum, budget=free):
        console.print(f"  {text}: {n / GiB:.1f} GiB" + (" [green](fits)[/]" if n <= free else ""))
