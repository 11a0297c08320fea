"""The training recipe: read it top to bottom.

    config → [folder: lock, resume or fresh] → tokenizer + data → model (NF4 base + LoRA) → optimizer → [resume] → score before
           → loop (step, log, eval, checkpoint) → adapter → score after → summary

Stops cleanly: Ctrl-C or SIGTERM saves a checkpoint and raises Interrupted; a NaN/inf loss raises
FloatingPointError before the update (the last checkpoint stays the last good one); CUDA OOM
raises OutOfMemory with what was running and settings to try; a full disk raises StorageError.

The run holds its output folder's lock from start to end, refuses a folder that holds another run
(unless resuming it, or moving it aside with `overwrite`), and writes nothing into it before the
model, tokenizer and data have loaded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import os
import random
import signal
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console

from qtrain.config import DTYPES, Config, to_dict
from qtrain.data import (
    IGNORE_INDEX,
    Batches,
    describe_batches,
    eval_batches,
    format_prompt,
    load_data,
    write_skipped_rows,
)
from qtrain.device import pick_device
from qtrain.estimate import estimate, suggestions, workload_for
from qtrain.evaluate import exact_match, generate
from qtrain.fused import apply_fused_ops
from qtrain.kernels.linear_cross_entropy import linear_cross_entropy
from qtrain.kernels.backend import resolve_on_device
from qtrain.lora import LoRALinear
from qtrain.memory import OffloadActivations, peak_memory_bytes
from qtrain.memprof import MemoryProfiler
from qtrain.methods import PeftMethod, mark_trainable
from qtrain.methods.io import load_method, save_methods
from qtrain.metrics import MetricsLogger, plot_loss, read_metrics, summary_table
from qtrain.model import check_tokenizer, enable_checkpointing, load_model
from qtrain.optim import build_optimizer, lr_lambda, param_groups, resolve_optimizer
from qtrain.presets import resolve_config
from qtrain.progress import TrainProgress
from qtrain.resume import last_good_checkpoint, resolve_resume, save_checkpoint, set_rng_state
from qtrain.rundir import RunLock, atomic_write_text, check_fresh, move_aside
from qtrain.threads import ThreadGovernor
from qtrain.tiny import ensure_tiny_model

GiB = 2**30


class Interrupted(Exception):
    """Training stopped on request (Ctrl-C) after saving a checkpoint."""

    def __init__(self, step: int, checkpoint: Path):
        super().__init__(f"interrupted after step {step}; checkpoint saved to {checkpoint}")
        self.step, self.checkpoint = step, checkpoint


class OutOfMemory(RuntimeError):
    pass


class StorageError(RuntimeError):
    """Writing the run's files failed (disk full): says where, and what to resume from."""


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds CUDA
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def model_path(cfg: Config, output_dir: Path) -> str:
    """The checkpoint to load: the configured one, or the tiny model built (once, atomically) in
    output_dir/base; a base built from other model.tiny settings is refused."""
    if cfg.model.name_or_path is not None:
        return cfg.model.name_or_path
    return str(ensure_tiny_model(output_dir / "base", **dataclasses.asdict(cfg.model.tiny)))


# ---- one step ----


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over labelled positions. logits [B, S, V], labels [B, S]."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def loss_sum(
    model, batch: dict, offload: OffloadActivations | None = None, chunk: int | None = None, backend: str = "torch"
) -> torch.Tensor:
    """Forward one batch; summed loss over its target tokens. Packed batches carry position_ids
    (restarting per row) and no attention_mask, which makes attention block-diagonal.

    lm_head + cross-entropy run over chunks of `chunk` tokens (None: automatic) and never hold the
    full [B, S, V] logits; `chunk=0` computes the full logits (the plain path). `backend`: the chunks'
    cross-entropy ("torch", "triton" or "auto": `qtrain.kernels.linear_cross_entropy`)."""
    with offload or contextlib.nullcontext():  # only the decoder's activations are offloaded
        hidden = model.get_decoder()(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            position_ids=batch.get("position_ids"),
            use_cache=False,
        ).last_hidden_state  # [B, S, D]
    head = model.get_output_embeddings()
    if chunk == 0 or type(head) is not torch.nn.Linear or head.bias is not None:
        return causal_lm_loss_sum(head(hidden), batch["labels"])  # logits [B, S, V]
    next_labels = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)  # [B, S]: token t predicts t+1
    return linear_cross_entropy(hidden, head.weight, next_labels, chunk_size=chunk, ignore_index=IGNORE_INDEX, backend=backend)


def n_targets(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def n_tokens(batch: dict) -> int:
    return int(batch["num_tokens"]) if "num_tokens" in batch else int(batch["attention_mask"].sum())


def train_step(
    model,
    micro_batches: list[dict],
    optimizer,
    trainable: list,
    max_grad_norm: float,
    device,
    autocast: contextlib.AbstractContextManager | None = None,
    scaler: torch.amp.GradScaler | None = None,
    offload: OffloadActivations | None = None,
    on_phase: Callable[[str], None] | None = None,
    loss_chunk: int | None = None,
    methods: Sequence[PeftMethod] = (),
    step: int = 0,
    total_steps: int = 0,
    loss_backend: str = "torch",
) -> tuple[float, int]:
    """One optimizer step over `micro_batches` (gradient accumulation).

    The loss is the mean over the target tokens of the whole step, not a mean of per-micro-batch
    means, so accumulating k micro-batches equals one batch k times larger. The PEFT `methods`'
    regularisers (AdaLoRA's orthogonality, AdapterFusion's) join the gradient once per step, and
    each method's `after_step(model, step, total_steps)` runs after the update, gradients in place.
    `on_phase` (memory profiling) is told "forward", "backward", "optimizer" and "end" as they start.
    Returns (loss, tokens processed); the loss is the language-model loss, without regularisers.
    """
    phase = on_phase or (lambda name: None)
    total_targets = max(sum(n_targets(b) for b in micro_batches), 1)
    loss_total, tokens = 0.0, 0
    for batch in micro_batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        phase("forward")
        with autocast or contextlib.nullcontext():
            loss = loss_sum(model, batch, offload, loss_chunk, loss_backend) / total_targets
        phase("backward")
        (scaler.scale(loss) if scaler else loss).backward()
        loss_total += loss.item()
        tokens += n_tokens(batch)
    regs = [r for r in (m.regularization(model) for m in methods) if r is not None]
    reg = sum(regs) if regs else None
    if reg is not None:
        (scaler.scale(reg) if scaler else reg).backward()
    if not math.isfinite(loss_total + (reg.item() if reg is not None else 0.0)):  # the adapter keeps its last good values
        optimizer.zero_grad(set_to_none=True)
        what = f"loss is {loss_total}" + (f", regularization {reg.item()}" if reg is not None else "")
        raise FloatingPointError(what)
    phase("optimizer")
    if scaler:
        scaler.unscale_(optimizer)
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
    if scaler:
        scaler.step(optimizer)  # skipped when fp16 gradients overflowed; the scale then shrinks
        scaler.update()
    else:
        optimizer.step()
    for method in methods:
        method.after_step(model, step, total_steps)
    optimizer.zero_grad(set_to_none=True)
    phase("end")
    return loss_total, tokens


@torch.no_grad()
def eval_loss(model, examples: list, batch_size: int, pad_id: int, device, autocast=None, loss_chunk: int | None = None) -> float:
    """Mean next-token loss over the eval examples' target tokens."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in eval_batches(examples, batch_size, pad_id):
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast or contextlib.nullcontext():
                total += loss_sum(model, batch, chunk=loss_chunk).item()
            count += n_targets(batch)
    finally:
        model.train(was_training)
    return total / max(count, 1)


def oom_advice(cfg: Config, step: int, batch_shape: tuple[int, int], device: torch.device, config) -> str:
    """What was running when CUDA ran out of memory, and settings that need less, with the
    estimated GPU memory each needs."""
    b, s = batch_shape
    peak = peak_memory_bytes(device) / GiB
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    w = replace(workload_for(cfg, "cuda"), batch_size=b, seq_len=s)
    tips = suggestions(config, None, w, cfg.train.grad_accum, budget=total)
    of = f" of {total / GiB:.1f} GiB" if total else ""
    return (
        f"CUDA out of memory at step {step}: micro-batch {b} x {s} tokens (train.batch_size={b}, "
        f"data.max_length={cfg.data.max_length}, packing={cfg.data.packing}); peak {peak:.1f} GiB{of}. "
        "Try, in this order: " + "; ".join(f"{text} (est. {need / GiB:.1f} GiB)" for text, need in tips)
    )


def check_memory(cfg: Config, path: str, device: torch.device, console: Console) -> None:
    """Before loading: the estimated peak against the GPU's free memory; when it will not fit, say
    so with the settings that would (training still starts: paged memory can absorb some excess)."""
    if device.type != "cuda":
        return
    try:
        config = resolve_config(path)
    except (OSError, ValueError):  # no config.json to read: loading will say why
        return
    backend = resolve_on_device("nf4_lora", cfg.model.backend, device)  # what training will run, self-check included
    w = workload_for(cfg, "cuda", backend)
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


# ---- the recipe ----


def train(
    cfg: Config,
    console: Console | None = None,
    should_stop: Callable[[int], bool] | None = None,
    profile_memory: int = 0,
    report_dir: Path | None = None,
    profile_only: bool = False,
    overwrite: bool = False,
) -> dict:
    """Run `cfg`. `should_stop(step)` → True stops after that step like Ctrl-C (checkpoint + Interrupted).
    `profile_memory=N` measures the first N steps and writes a report to `report_dir` (default
    output_dir/memory); with `profile_only`, the run ends right after the report, saving nothing
    else (no checkpoint, adapter or result: `qtrain memory profile`). A fresh run in an output_dir
    that holds a run is refused, or with `overwrite` moves that run aside (never deletes it)."""
    console = console or Console()
    out = Path(cfg.output_dir)
    device = pick_device(cfg.device)
    optimizer_name = resolve_optimizer(cfg.train.optimizer, device)  # fails before the model loads
    with RunLock(out, say=lambda text: console.print(f"[yellow]{text}[/]")), _resource_errors(out):
        return _run(cfg, console, out, device, optimizer_name, should_stop, profile_memory, report_dir, profile_only, overwrite)


def _run(cfg, console, out, device, optimizer_name, should_stop, profile_memory, report_dir, profile_only, overwrite) -> dict:
    """The recipe, in a locked output folder (see `train`)."""
    # 0. the folder: resume its run, or start a fresh one where no run is (a resumed finished run: done)
    resumed = resolve_resume(cfg.checkpoint.resume, out, say=lambda text: console.print(f"[yellow]{text}[/]")) if cfg.checkpoint.resume else None
    if resumed and resumed[1]["step"] >= cfg.train.max_steps and (out / "result.json").exists():
        return _already_finished(cfg, out, resumed, console)
    foreign_resume = resumed and resumed[0].parent.parent.resolve() != out.resolve()
    move = check_fresh(out, overwrite) if not resumed or foreign_resume else []
    dtype = DTYPES[cfg.model.dtype]
    seed_everything(cfg.train.seed, cfg.train.deterministic)
    threads = ThreadGovernor(cfg.train.threads)  # adaptive by default: a core fewer per core of other work

    # 1. tokenizer and data first: a missing tokenizer or a bad row is reported before the weights load
    path = model_path(cfg, out)
    tokenizer = check_tokenizer(path)
    train_data, eval_data = load_data(cfg.data, tokenizer)

    # 2. model: NF4 base, then the PEFT methods (LoRA too), new objects from their config sections: what
    # training adds to a method (its hooks, AdaLoRA's EMAs and rank pattern) lives on these, never on `cfg`
    methods = cfg.method_objects()
    check_memory(cfg, path, device, console)
    t0 = time.perf_counter()
    loaded = load_model(path, None, compute_dtype=dtype, device=device, quantize=cfg.model.quantize, backend=cfg.model.backend)
    model = loaded.model
    for method in methods:
        method.apply(model)
        if method.init_dir():  # lora.init_from: start from a saved adapter
            load_method(model, method, method.init_dir())
    mark_trainable(model, methods)
    fused = apply_fused_ops(model, cfg.kernels)  # fused Triton modules (Llama family; CUDA unless kernels.enabled=on)
    loss_backend = cfg.kernels.loss_backend(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    n_total = sum(p.numel() for p in model.parameters()) + sum(
        m.nf4_shape.numel() for m in model.modules() if isinstance(m, LoRALinear) and m.has_nf4
    )
    console.print(
        f"[bold]model[/] {path} ({loaded.config.model_type}, {'NF4' if cfg.model.quantize else cfg.model.dtype} base) "
        f"loaded in {time.perf_counter() - t0:.1f}s on {device}{f' ({threads.describe()})' if device.type == 'cpu' else ''}; "
        f"{describe_methods(methods)}; "
        f"trainable {n_trainable:,} / {n_total:,} ({100 * n_trainable / n_total:.2f}%)"
    )
    if fused:
        console.print(f"[bold]kernels[/] {len(fused)} fused modules, loss {loss_backend}" + (f"; kept: {', '.join(sorted(fused.skipped))}" if fused.skipped else ""))

    # 3. data: batches
    mode = "pack" if cfg.data.packing else "group" if cfg.data.group_by_length else "pad"
    data = Batches(train_data.examples, cfg.train.batch_size, tokenizer.pad_token_id, cfg.data.seed, mode, cfg.data.max_length)
    eval_examples = eval_data.examples[: cfg.eval.max_rows] if eval_data else []
    eval_rendered = eval_data.rendered[: cfg.eval.max_rows] if eval_data else []
    console.print(
        f"[bold]data[/] {len(train_data.examples)} train rows ({train_data.source}, {train_data.format}), "
        f"{len(eval_examples)} eval rows, {describe_batches(mode, len(data.plan()), cfg.train.batch_size, cfg.data.max_length)}"
    )
    for ds in (train_data, eval_data) if eval_data else (train_data,):
        if ds.skipped:
            console.print(f"[yellow]skipped {len(ds.skipped)} malformed rows[/] of {ds.source} (data.bad_rows=skip); first: {ds.skipped[0]}")
        if ds.too_long:
            console.print(f"[yellow]dropped {ds.too_long} rows[/] of {ds.source}: the prompt fills data.max_length={cfg.data.max_length}")
    # model, tokenizer and data are valid: only now does the run write into its folder
    if move:
        console.print(f"[yellow]output_dir:[/] the previous run moved to {move_aside(out, move)} (--overwrite)")
    write_json(out / "config.json", to_dict(cfg))
    if not profile_only and write_skipped_rows([train_data, eval_data], out / "skipped_rows.jsonl"):
        console.print(f"[yellow]skipped rows recorded in[/] {out / 'skipped_rows.jsonl'}")

    # 4. optimizer, schedule, precision
    groups = param_groups(model, cfg.train.lr, cfg.train.weight_decay, cfg.train.lora_plus_ratio, methods)
    optimizer = build_optimizer(optimizer_name, groups)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg.train.warmup_steps, cfg.train.max_steps, cfg.train.schedule)
    )
    use_autocast = cfg.train.autocast and dtype != torch.float32
    autocast = torch.autocast(device.type, dtype=dtype) if use_autocast else None
    scaler = torch.amp.GradScaler(device.type) if use_autocast and dtype == torch.float16 else None
    offload = OffloadActivations() if cfg.train.offload_activations else None
    if cfg.train.gradient_checkpointing:
        enable_checkpointing(model)
    model.config.use_cache = False

    # 5. resume: adapter, optimizer, schedule, scaler, data position, RNG, counters
    start, trainer = 0, {"losses": [], "tokens_seen": 0, "train_seconds": 0.0, "run_id": uuid.uuid4().hex}
    ckpt = None
    if resumed:
        ckpt, state, meta = resumed
        for method in methods:
            load_method(model, method, ckpt / "adapter", resume=True)
            method.load_trainer_state(model, state.get("methods", {}).get(method.name, {}))
        _load_optimizer_state(optimizer, scheduler, state, ckpt)
        if scaler and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        data.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        start, trainer = state["step"], state["trainer"]
        trainer["run_id"] = trainer.get("run_id") or meta.get("run_id") or ""  # "": a checkpoint from before run ids
        _warn_config_changes(console, meta["config"], to_dict(cfg), start)
        console.print(f"[bold]resumed[/] from {ckpt} at step {start}")
    run_id = trainer["run_id"]

    def save(step: int) -> Path:
        _check_finite(model, step, out, run_id, ckpt)  # a diverged adapter is never saved as a checkpoint
        state = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler else None,
            "data": data.state_dict(),
            "trainer": trainer,
            "methods": {m.name: m.trainer_state() for m in methods},
        }
        loss = trainer["losses"][-1] if trainer["losses"] else None
        return save_checkpoint(out, step, write_adapter, state, to_dict(cfg), cfg.checkpoint.keep_last, run_id, loss)

    def write_adapter(target: Path) -> Path:
        info = {"data_format": train_data.format}
        return save_methods(model, methods, path, target, dtype, cfg.model.quantize, extra_info=info)

    # 6. score before
    can_score = cfg.eval.exact_match and any(r.answer is not None for r in eval_rendered)
    threads.tick()
    if can_score and "exact_match_before" not in trainer:
        trainer["exact_match_before"] = exact_match(model, tokenizer, eval_rendered, cfg.eval.max_new_tokens, cfg.eval.batch_size)
        console.print(f"[bold]exact match before[/] {trainer['exact_match_before']:.1%}")

    # 7. train (the first `profile_memory` steps measured)
    profiler, profiled_shapes, memory_report = None, [], None
    if profile_memory:
        profiler = MemoryProfiler(model, optimizer, device)
        if offload:
            offload.keep = profiler.saved  # what stays on the GPU is still counted
    model.train()
    logger = MetricsLogger(out, cfg.log, to_dict(cfg), resume_step=start if cfg.checkpoint.resume else None)
    stop = _StopOnSignals()
    last_checkpoint: Path | None = ckpt
    t_start, tokens_here, seconds_before = time.perf_counter(), 0, trainer["train_seconds"]
    step = start
    try:
        progress = TrainProgress(console, cfg.train.max_steps, start, device.type, cfg.train.log_every, cfg.log.progress_seconds)
        with logger, stop, progress:
            for step in range(start + 1, cfg.train.max_steps + 1):
                threads.tick()
                micro = [next(data) for _ in range(cfg.train.grad_accum)]
                measure = profiler is not None and step - start <= profile_memory
                try:
                    with profiler.step(step) if measure else contextlib.nullcontext():
                        loss, n_tok = train_step(
                            model, micro, optimizer, trainable, cfg.train.max_grad_norm, device, autocast, scaler, offload,
                            on_phase=profiler.phase if measure else None, loss_chunk=cfg.train.loss_chunk_tokens,
                            methods=methods, step=step, total_steps=cfg.train.max_steps, loss_backend=loss_backend,
                        )  # fmt: skip
                except FloatingPointError as e:
                    raise FloatingPointError(f"step {step}: {e}; stopped before the update ({_last_good(out, run_id, ckpt)}") from None
                except torch.OutOfMemoryError:
                    optimizer.zero_grad(set_to_none=True)
                    shape = max((tuple(b["input_ids"].shape) for b in micro), key=lambda s: s[0] * s[1])
                    raise OutOfMemory(oom_advice(cfg, step, shape, device, loaded.config)) from None
                if measure:
                    profiled_shapes += [(*b["input_ids"].shape, "position_ids" in b, "attention_mask" in b and not b["attention_mask"].all()) for b in micro]
                    if step - start == profile_memory or step == cfg.train.max_steps:
                        where = report_dir or out / "memory"
                        memory_report = _memory_report(cfg, profiler, loaded, methods, device, profiled_shapes, where, progress.console)
                        profiler = None
                        if profile_only:
                            return {"steps": step - start, "memory_report": str(memory_report)}
                        if offload:
                            offload.keep = None
                scheduler.step()
                tokens_here += n_tok
                trainer["tokens_seen"] += n_tok
                trainer["losses"].append(loss)
                elapsed = time.perf_counter() - t_start
                record = {
                    "loss": loss,
                    "lr": scheduler.get_last_lr()[0],
                    "tokens_per_s": tokens_here / elapsed,
                    "peak_mem_gib": peak_memory_bytes(device) / GiB,
                }
                logger.log(step, record)
                progress.update(step, loss, record["lr"], record["tokens_per_s"], record["peak_mem_gib"])
                if step % cfg.train.log_every == 0:
                    logger.flush()
                if eval_examples and cfg.eval.every and step % cfg.eval.every == 0 and step < cfg.train.max_steps:
                    _evaluate(cfg, model, tokenizer, eval_examples, train_data.format, device, autocast, logger, step, progress.console)
                trainer["train_seconds"] = seconds_before + elapsed
                if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < cfg.train.max_steps:
                    last_checkpoint = save(step)
                if stop.requested or (should_stop and should_stop(step)):
                    raise Interrupted(step, save(step))
            eval_metrics = {}
            if step == start:  # resumed at the end (killed before the adapter was written): finish, log nothing twice
                eval_metrics = {k: v for r in read_metrics(out / "metrics.jsonl") if r.get("step") == step for k, v in r.items() if k.startswith("eval_")}
            elif eval_examples:
                eval_metrics = _evaluate(cfg, model, tokenizer, eval_examples, train_data.format, device, autocast, logger, step, console)
            if step > start:
                last_checkpoint = save(step)
    finally:
        model.config.use_cache = True

    # 8. adapter (PEFT format), score after, summary
    adapter_dir = write_adapter(out / "adapter")
    losses = trainer["losses"]
    first, last = _mean(losses[: cfg.train.log_every]), _mean(losses[-cfg.train.log_every :])
    result = {
        "steps": len(losses),
        "loss_first": first,
        "loss_last": last,
        **eval_metrics,
        "trainable_params": n_trainable,
        "tokens_seen": trainer["tokens_seen"],
        "train_seconds": trainer["train_seconds"],
        "peak_mem_bytes": peak_memory_bytes(device),
        "adapter": str(adapter_dir),
        "checkpoint": str(last_checkpoint),
    }
    if can_score:
        result["exact_match_before"] = trainer["exact_match_before"]
        result["exact_match_after"] = exact_match(model, tokenizer, eval_rendered, cfg.eval.max_new_tokens, cfg.eval.batch_size)
    if memory_report:
        result["memory_report"] = str(memory_report)
    if cfg.log.plot:
        result["loss_plot"] = str(plot_loss(read_metrics(out / "metrics.jsonl"), out / "loss.png"))
    write_json(out / "result.json", result)
    console.print(summary_table(result))
    return result


def write_json(path: Path, data: dict) -> None:
    """`data` as indented JSON at `path`, atomically (temp file + rename)."""
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def _already_finished(cfg: Config, out: Path, resumed: tuple, console: Console) -> dict:
    """--resume of a run whose checkpoint is at (or past) train.max_steps: nothing to train, nothing written."""
    ckpt, state, _ = resumed
    if state["step"] > cfg.train.max_steps:
        raise ValueError(f"{ckpt} is at step {state['step']}, past train.max_steps={cfg.train.max_steps}; raise train.max_steps to continue")
    console.print(f"[bold]resume:[/] {ckpt} is the end of the run (train.max_steps={cfg.train.max_steps}): nothing to do; raise train.max_steps to train further")
    return json.loads((out / "result.json").read_text())


def _load_optimizer_state(optimizer, scheduler, state: dict, ckpt: Path) -> None:
    """The optimizer's and scheduler's state from the checkpoint, with this config's lr, weight decay
    and LoRA+ ratio (the schedule's shape always comes from the config): a changed train.lr applies."""
    fresh = [(g["initial_lr"], g["weight_decay"]) for g in optimizer.param_groups]
    if len(state["optimizer"]["param_groups"]) != len(fresh):
        raise ValueError(
            f"{ckpt}: train.lora_plus_ratio switches LoRA+ {'off' if len(fresh) == 1 else 'on'} (one lr for A and B, or two): "
            "a run cannot change that on resume; keep LoRA+ as it was (a ratio of 1 is off), or start a new run"
        )
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    for i, (group, (lr, weight_decay)) in enumerate(zip(optimizer.param_groups, fresh)):
        group["initial_lr"], group["weight_decay"] = lr, weight_decay
        scheduler.base_lrs[i] = lr
        group["lr"] = lr * scheduler.lr_lambdas[i](scheduler.last_epoch)  # what LambdaLR computes


def _check_finite(model, step: int, out: Path, run_id: str, resumed_from: Path | None) -> None:
    """FloatingPointError naming the first trainable tensor that holds NaN/inf."""
    for name, p in model.named_parameters():
        if p.requires_grad and not torch.isfinite(p).all():
            raise FloatingPointError(f"step {step}: the update made {name} NaN/inf; not saved ({_last_good(out, run_id, resumed_from)}")


def _last_good(out: Path, run_id: str, resumed_from: Path | None) -> str:
    """Where a diverged run can go back to, and what to change."""
    good = last_good_checkpoint(out, run_id) or resumed_from
    if not good:
        return "no checkpoint was saved yet). Lower train.lr, raise train.warmup_steps, or check the data"
    return (
        f"last good checkpoint: {good}). Continue from it with --resume {good} and a lower train.lr or a higher "
        "train.warmup_steps (a resume applies them), or check the data"
    )


@contextlib.contextmanager
def _resource_errors(out: Path):
    """A full disk (or quota) while the run writes → StorageError naming the path and the checkpoint
    to resume; host RAM exhausted → OutOfMemory with what to lower."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - safetensors and torch wrap OS errors in their own types
        if "DefaultCPUAllocator" in str(e):
            raise OutOfMemory(
                f"out of host memory (RAM): {str(e).splitlines()[0]}. Lower lora.rank, train.batch_size or "
                "data.max_length, or see qtrain memory estimate CONFIG --device cpu"
            ) from None
        full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(e)
        if not full:
            raise
        from qtrain.resume import list_checkpoints

        where = getattr(e, "filename", None) or f"the disk holding {out}"
        found = list_checkpoints(out)
        resume = f"free space, then continue with --resume (newest checkpoint: {found[-1]})" if found else "free space and run again"
        raise StorageError(f"no space left on {where}; {resume}") from None


def describe_methods(methods: Sequence[PeftMethod]) -> str:
    """"LoRA r=16 on 28 linears + bitfit", for the console."""
    return " + ".join(m.describe() for m in methods)


def _memory_report(cfg, profiler, loaded, methods, device, shapes, report_dir: Path, console: Console) -> Path:
    """Stop measuring; write the report into `report_dir`: the measurement beside the estimate for
    the largest micro-batch the measured steps ran."""
    from qtrain.memreport import fmt_bytes, summary_lines, write_report

    samples = profiler.samples()
    profiler.detach()
    b, s, packed, padded = max(shapes, key=lambda shape: shape[0] * shape[1])
    backend = resolve_on_device("nf4_lora", cfg.model.backend, device)
    w = workload_for(cfg, device.type, backend)
    w = replace(w, batch_size=b, seq_len=s, attention_mask=padded or (packed and "varlen" not in w.fused))  # varlen: no mask
    est = estimate(loaded.config, None, w)
    info = {
        "title": f"qtrain memory: {cfg.model.name_or_path or 'tiny ' + cfg.model.tiny.arch}",
        "model": str(cfg.model.name_or_path or loaded.model_dir),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": cfg.model.dtype,
        "micro-batch": f"{b} x {s} tokens",
        "method": describe_methods(methods),
        "gradient checkpointing": cfg.train.gradient_checkpointing,
        "offload activations": cfg.train.offload_activations,
        "optimizer": w.optimizer,
        "NF4 kernels": w.backend,
        "loss chunk": "full logits" if w.loss_chunk == 0 else (w.loss_chunk or "auto"),
        "torch": torch.__version__,
    }
    path = write_report(report_dir, samples, est, info)
    peak = max(x.peak for x in samples)
    console.print(f"[bold]memory[/] measured peak {fmt_bytes(peak)}, estimated {fmt_bytes(est.peak)}; report: {path}")
    for line in summary_lines(path):  # the ratio, and each phase the estimate under-estimates
        console.print(f"[bold]memory[/] {line}", highlight=False)
    return path


def _evaluate(cfg, model, tokenizer, examples, data_format, device, autocast, logger, step, console) -> dict:
    """Eval loss / perplexity, and the fixed sample prompts, logged at `step`."""
    loss = eval_loss(model, examples, cfg.eval.batch_size, tokenizer.pad_token_id, device, autocast, cfg.train.loss_chunk_tokens)
    metrics = {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}
    logger.log(step, metrics)
    console.print(f"[bold]eval[/] step {step}: loss {loss:.4f}, perplexity {metrics['eval_ppl']:.2f}")
    if cfg.eval.samples:
        for sample in cfg.eval.samples:
            prompt, extra = (sample, "") if isinstance(sample, str) else (sample.prompt, sample.input)
            text, specials = format_prompt(prompt, data_format, tokenizer, extra)
            answer = generate(model, tokenizer, [text], cfg.eval.max_new_tokens, add_special_tokens=specials)[0]
            shown = repr(prompt) + (f" (input {extra!r})" if extra else "")
            console.print(f"  {shown} → {answer!r}", markup=False, highlight=False)
            logger.text(step, "samples", f"{prompt}{' | ' + extra if extra else ''} → {answer}")
    return metrics


# Applied from the first resumed step: the optimizer's hyperparameters and the schedule's shape.
APPLIED_ON_RESUME = ("train.lr", "train.weight_decay", "train.lora_plus_ratio", "train.warmup_steps", "train.schedule", "train.max_grad_norm")


def _warn_config_changes(console: Console, saved: dict, now: dict, step: int, prefix: str = "") -> None:
    """Say what a resume changes: the optimizer's settings apply from the next step; other changes
    (data, batch) continue the run, but not bit-for-bit."""
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            _warn_config_changes(console, a, b, step, f"{name}.")
        elif a != b and name not in ("checkpoint.resume", "train.max_steps", "output_dir"):
            applied = f": applied from step {step + 1}" if name in APPLIED_ON_RESUME else ""
            console.print(f"[yellow]resume:[/] {name} was {a!r} in the checkpoint, now {b!r}{applied}")


class _StopOnSignals:
    """While active, the first Ctrl-C (SIGINT) or SIGTERM (a scheduler's or `docker stop`'s request)
    only sets `requested`: the loop saves and stops after the current step. Then the previous handlers
    are back: a second Ctrl-C interrupts at once (KeyboardInterrupt; checkpoints stay whole)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self._previous: dict = {}

    def _handle(self, signum, frame):
        self.requested = True
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        self._restore()
        return False


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")
