"""The training recipe: read it top to bottom. `train` runs the phases of a `Recipe`, in order, over
one `TrainState` (the step and the counters a checkpoint keeps):

    setup_folder    lock, resume or fresh (a resumed finished run: its result), seed
    setup_data      tokenizer + data rows (before the weights: a bad row fails fast)
    setup_model     `qtrain.builder.build_model`: NF4 base + LoRA, the other methods, fused modules
    setup_batches   batches; open_folder: the run's first files
    setup_optimizer optimizer, schedule, precision
    resume          adapter, optimizer, schedule, scaler, data position, RNG, counters
    setup_reference DPO with preference.precompute_reference: the reference log-probs, one pass, cached
    score_before    exact match before training
    train_loop      one `train_one_step` per step (step, log, eval, checkpoint), final eval + checkpoint
    finish          adapter, score after, summary

Stops cleanly: Ctrl-C or SIGTERM saves a checkpoint and raises Interrupted; a NaN/inf loss raises
FloatingPointError before the update (the last checkpoint stays the last good one); CUDA OOM
raises OutOfMemory with what was running and settings to try (`qtrain.advice`); a full disk raises
StorageError.

The run holds its output folder's lock from start to end, refuses a folder that holds another run
(unless resuming it, or moving it aside with `overwrite`), and writes nothing into it before the
model, tokenizer and data have loaded.
"""

from __future__ import annotations

import contextlib
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
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from torch.distributed.tensor import DTensor

from qtrain.advice import check_memory, oom_advice
from qtrain.builder import BuiltModel, build_model, model_path, recorded_kernels
from qtrain.config import DTYPES, Config, PreferenceConfig, to_dict
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
from qtrain.distributed import (
    ONE_PROCESS,
    World,
    all_reduce_sum,
    any_rank,
    broadcast,
    broadcast_trainable,
    device_for,
    gather,
    init_world,
    no_sync,
    on_main,
    peer_failures,
    resolve_strategy,
    teardown,
    world_from_env,
)
from qtrain.estimate import estimate, workload_for
from qtrain.evaluate import exact_match, generate
from qtrain.kernels.backend import resolve_on_device
from qtrain.kernels.linear_cross_entropy import linear_cross_entropy, soft_cap
from qtrain.lora import LoRALinear
from qtrain.memory import OffloadActivations, peak_memory_bytes
from qtrain.memprof import MemoryProfiler
from qtrain.methods import PeftMethod
from qtrain.methods.io import load_method, save_methods
from qtrain.metrics import MetricsLogger, plot_loss, read_metrics, summary_table
from qtrain.model import check_tokenizer, enable_checkpointing
from qtrain.optim import build_optimizer, lr_lambda, param_groups, resolve_optimizer
from qtrain.preference import PAIR_OBJECTIVES, precompute_reference, preference_loss, reward_means, step_totals
from qtrain.preference_data import PreferenceBatches, eval_preference_batches, load_preference_data
from qtrain.progress import TrainProgress
from qtrain.resume import last_good_checkpoint, resolve_resume, rng_state, save_checkpoint, set_rng_state
from qtrain.rundir import RunLock, atomic_write_text, check_fresh, move_aside
from qtrain.threads import ThreadGovernor

__all__ = [  # the recipe, one step, and what tests and benchmarks import from here
    "Interrupted", "OutOfMemory", "Recipe", "RunOptions", "StorageError", "TrainState", "causal_lm_loss_sum",
    "check_memory", "eval_loss", "loss_sum", "model_path", "oom_advice", "pick_device", "preference_step", "train", "train_step",
]  # fmt: skip

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


# ---- one step ----


def logit_softcap(model) -> float | None:
    """The final logit soft cap the model's own forward applies (Gemma-2's `final_logit_softcapping`;
    None for the families without one): `loss_sum` runs lm_head itself and must apply it too."""
    config = getattr(model, "config", None)
    return getattr(config.get_text_config(), "final_logit_softcapping", None) if config is not None else None


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
    cross-entropy ("torch", "triton" or "auto": `qtrain.kernels.linear_cross_entropy`; a soft-capped
    head, `logit_softcap`, runs the torch chunks, which cap each chunk's logits as the model does)."""
    with offload or contextlib.nullcontext():  # only the decoder's activations are offloaded
        hidden = model.get_decoder()(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            position_ids=batch.get("position_ids"),
            use_cache=False,
        ).last_hidden_state  # [B, S, D]
    head, cap = model.get_output_embeddings(), logit_softcap(model)
    if chunk == 0 or type(head) is not torch.nn.Linear or head.bias is not None:
        return causal_lm_loss_sum(soft_cap(head(hidden), cap), batch["labels"])  # logits [B, S, V]
    next_labels = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)  # [B, S]: token t predicts t+1
    return linear_cross_entropy(
        hidden, head.weight, next_labels, chunk_size=chunk, ignore_index=IGNORE_INDEX, backend=backend, softcap=cap
    )


class StepLoss(torch.nn.Module):
    """`loss_sum` as a module: DistributedDataParallel wraps this, since its gradient hooks are armed
    by its own forward (the recipe calls the decoder and the head itself, not `model.forward`)."""

    def __init__(self, model, offload: OffloadActivations | None, chunk: int | None, backend: str):
        super().__init__()
        self.model, self.offload, self.chunk, self.backend = model, offload, chunk, backend

    def forward(self, batch: dict) -> torch.Tensor:
        return loss_sum(self.model, batch, self.offload, self.chunk, self.backend)


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
    world: World = ONE_PROCESS,
    ddp: torch.nn.parallel.DistributedDataParallel | None = None,
) -> tuple[float, int]:
    """One optimizer step over `micro_batches` (gradient accumulation).

    The loss is the mean over the target tokens of the whole step, not a mean of per-micro-batch
    means, so accumulating k micro-batches equals one batch k times larger. The PEFT `methods`'
    regularisers (AdaLoRA's orthogonality, AdapterFusion's) join the gradient once per step, and
    each method's `after_step(model, step, total_steps)` runs after the update, gradients in place.
    `on_phase` (memory profiling) is told "forward", "backward", "optimizer" and "end" as they start.
    Returns (loss, tokens processed); the loss is the language-model loss, without regularisers.

    Distributed (`world`, `ddp`: the `StepLoss` wrapped in DDP): the target count is all-reduced, so
    every rank divides by the global step's targets (a rank's padding weighs nothing on another's);
    DDP (and FSDP, `model` sharded by `qtrain.fsdp`) averages the ranks' gradients, so each rank's loss
    is scaled by the number of ranks to make the sum. Gradients are reduced on the last micro-batch
    only (`no_sync` before it); the loss, tokens and NaN check are the global ones, so all ranks raise
    or step together.
    """
    phase = on_phase or (lambda name: None)
    forward = ddp or StepLoss(model, offload, loss_chunk, loss_backend)
    loss_total, tokens = accumulate(forward, micro_batches, device, autocast, scaler, phase, world)
    update(model, optimizer, trainable, max_grad_norm, scaler, methods, step, total_steps, loss_total, phase)
    return loss_total, tokens


def preference_step(
    model,
    micro_batches: list[dict],
    optimizer,
    trainable: list,
    max_grad_norm: float,
    device,
    objective: str,
    preference: PreferenceConfig,
    autocast: contextlib.AbstractContextManager | None = None,
    scaler: torch.amp.GradScaler | None = None,
    offload: OffloadActivations | None = None,
    on_phase: Callable[[str], None] | None = None,
    loss_chunk: int | None = None,
    methods: Sequence[PeftMethod] = (),
    step: int = 0,
    total_steps: int = 0,
) -> tuple[float, int, dict[str, float]]:
    """`train_step` for a preference objective (`qtrain.preference`): the loss is the mean over the
    step's pairs (KTO: examples), so accumulation equals a larger batch; each micro-batch runs the
    reference (adapter off, no-grad) and then its chosen and rejected rows in one forward. Returns
    (loss, tokens processed, the implicit-reward metrics: `qtrain.preference.reward_means`)."""
    phase = on_phase or (lambda name: None)
    totals = step_totals(micro_batches, objective)
    loss_total, tokens, sums = 0.0, 0, {}
    for batch in micro_batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        phase("forward")
        with autocast or contextlib.nullcontext():
            loss, batch_sums = preference_loss(model, methods, batch, objective, preference, totals, loss_chunk, offload)
        phase("backward")
        (scaler.scale(loss) if scaler else loss).backward()
        loss_total += loss.item()
        tokens += n_tokens(batch)
        sums = {k: sums.get(k, 0.0) + v for k, v in batch_sums.items()}
    update(model, optimizer, trainable, max_grad_norm, scaler, methods, step, total_steps, loss_total, phase)
    return loss_total, tokens, reward_means(sums, totals["units"])


def update(model, optimizer, trainable: list, max_grad_norm: float, scaler, methods: Sequence[PeftMethod], step: int,
           total_steps: int, loss_total: float, phase: Callable[[str], None]) -> None:  # fmt: skip
    """The end of every step, once the micro-batches' gradients are in: the methods' regularisers,
    the NaN/inf check (FloatingPointError before the update), clipping, the optimizer (through the
    fp16 scaler), the methods' `after_step`, zeroed gradients."""
    reg = regularization(model, methods)
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


def accumulate(forward, micro_batches: list[dict], device, autocast, scaler, phase, world: World) -> tuple[float, int]:
    """Forward and backward of each micro-batch, gradients summed; returns (the step's loss, its
    tokens), over all ranks. `forward(batch)`: the summed loss (`StepLoss`, or it wrapped in DDP).

    Distributed, each rank's loss is scaled by the number of ranks: DDP's all-reduce and FSDP's
    reduce-scatter both average the ranks' gradients, and the scaling makes that mean the gradient of
    the global step's summed loss over its global target count."""
    total_targets = max(all_reduce_sum(world, [sum(n_targets(b) for b in micro_batches)])[0], 1)
    loss_total, tokens = 0.0, 0
    for i, batch in enumerate(micro_batches):
        batch = {k: v.to(device) for k, v in batch.items()}
        phase("forward")
        with no_sync(forward if world.distributed else None, last=i == len(micro_batches) - 1):
            with autocast or contextlib.nullcontext():
                loss = forward(batch) / total_targets
            phase("backward")
            scaled = loss * world.size if world.distributed else loss
            (scaler.scale(scaled) if scaler else scaled).backward()
        loss_total += loss.item()
        tokens += n_tokens(batch)
    if world.distributed:
        loss_total, tokens = all_reduce_sum(world, [loss_total, tokens])
    return loss_total, int(tokens)


def regularization(model, methods: Sequence[PeftMethod]) -> torch.Tensor | None:
    """The sum of the methods' regularisers for this step (None when no method has one)."""
    regs = [r for r in (m.regularization(model) for m in methods) if r is not None]
    return sum(regs) if regs else None


@torch.no_grad()
def eval_loss(
    model, examples: list, batch_size: int, pad_id: int, device, autocast=None, loss_chunk: int | None = None, world: World = ONE_PROCESS,
    lockstep: bool = False,
) -> float:  # fmt: skip
    """Mean next-token loss over the eval examples' target tokens. Distributed, each rank scores every
    `world.size`-th example and the sums are all-reduced: the same mean, computed once. `lockstep`
    (FSDP: every forward all-gathers, a collective): every rank runs as many forwards, a rank with
    fewer batches repeating one of the eval set's, uncounted."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    batches = list(eval_batches(examples[world.rank :: world.size], batch_size, pad_id))
    extra = max(gather(world, len(batches))) - len(batches) if lockstep else 0
    filler = list(eval_batches(examples[:1], 1, pad_id)) * extra  # forwards to keep the ranks in step
    try:
        for i, batch in enumerate(batches + filler):
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast or contextlib.nullcontext():
                loss = loss_sum(model, batch, chunk=loss_chunk).item()
            if i < len(batches):
                total += loss
                count += n_targets(batch)
    finally:
        model.train(was_training)
    total, count = all_reduce_sum(world, [total, count])
    return total / max(count, 1)


# ---- the recipe: `train` runs the phases of a `Recipe` over a `TrainState` ----


@dataclass
class TrainState:
    """What the loop advances and a checkpoint keeps: the step and the trainer counters (saved as the
    checkpoint's "trainer" dict, with the keys and values it always had), and where the run can go
    back to when a step diverges."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    tokens_seen: int = 0
    train_seconds: float = 0.0
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    exact_match_before: float | None = None  # scored once per run, before its first step
    resumed_from: Path | None = None  # the checkpoint this session started from
    last_checkpoint: Path | None = None

    def trainer(self) -> dict:
        """The checkpoint's "trainer" dict (exact_match_before only once scored)."""
        out = {"losses": self.losses, "tokens_seen": self.tokens_seen, "train_seconds": self.train_seconds, "run_id": self.run_id}
        if self.exact_match_before is not None:
            out["exact_match_before"] = self.exact_match_before
        return out

    @classmethod
    def resumed(cls, ckpt: Path, state: dict, meta: dict) -> TrainState:
        """The state a checkpoint saved; run_id "" for a checkpoint from before run ids."""
        t = state["trainer"]
        run_id = t.get("run_id") or meta.get("run_id") or ""
        return cls(state["step"], t["losses"], t["tokens_seen"], t["train_seconds"], run_id, t.get("exact_match_before"), ckpt, ckpt)


@dataclass
class RunOptions:
    """`train`'s options beside the config (see `train`)."""

    should_stop: Callable[[int], bool] | None = None
    profile_memory: int = 0
    report_dir: Path | None = None
    profile_only: bool = False
    overwrite: bool = False


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
    that holds a run is refused, or with `overwrite` moves that run aside (never deletes it).
    Under torchrun / accelerate launch (`qtrain.distributed`), every rank runs this: rank 0 holds the
    lock, prints and writes the run's files; see `Recipe.distribute` for what the strategies do."""
    world = world_from_env()
    console = console or Console()
    if not world.is_main:
        console = Console(quiet=True)
    out = Path(cfg.output_dir)
    device = device_for(world, pick_device(cfg.device))
    optimizer_name = resolve_optimizer(cfg.train.optimizer, device)  # fails before the model loads
    strategy = resolve_strategy(cfg.distributed.strategy, world, lambda: _fits_one_card(cfg, device))
    check_strategy(cfg, strategy, world, profile_memory)
    recipe = Recipe(cfg, console, device, optimizer_name, RunOptions(should_stop, profile_memory, report_dir, profile_only, overwrite), world, strategy)
    joined = init_world(world, device.type, cfg.distributed.timeout_s)
    try:
        lock = RunLock(out, say=lambda text: console.print(f"[yellow]{text}[/]")) if world.is_main else contextlib.nullcontext()
        with lock, _resource_errors(out), peer_failures(world):
            return recipe.run()
    finally:
        if joined:
            teardown(world)


# PEFT methods DDP cannot run (none known): name -> why; refused before the model loads.
DDP_REFUSED: dict[str, str] = {}


def check_strategy(cfg: Config, strategy: str, world: World, profile_memory: int) -> None:
    """Refuse, before anything loads, what a strategy cannot run: one line naming it."""
    if strategy == "single":
        return
    if strategy == "fsdp":
        from qtrain.fsdp import fsdp_refusal

        refusal = fsdp_refusal(cfg.method_objects())
        if refusal:
            raise ValueError(refusal)
    for name in cfg.methods():
        if strategy == "ddp" and name in DDP_REFUSED:
            raise ValueError(f"method {name} cannot train under distributed.strategy=ddp ({DDP_REFUSED[name]}); run it in one process")
    if profile_memory:
        raise ValueError(f"memory profiling measures one process; run it without torchrun (this run has {world.size} ranks)")
    if cfg.objective != "sft":
        raise ValueError(f"objective {cfg.objective} trains in one process for now (distributed.strategy={strategy}); start it without torchrun")


def _fits_one_card(cfg: Config, device: torch.device) -> bool:
    """distributed.strategy=auto: does the estimated GPU total fit this rank's card (CPU: always)?"""
    if device.type != "cuda" or cfg.model.name_or_path is None:
        return True
    from qtrain.model import resolve_config

    backend = resolve_on_device("nf4_lora", cfg.model.backend, device)
    config = resolve_config(cfg.model.name_or_path)
    need = estimate(config, None, workload_for(cfg, "cuda", backend, config)).device_total
    return need <= torch.cuda.get_device_properties(device).total_memory


class Recipe:
    """One run, phase by phase (`run` lists them); each phase sets the attributes the later ones read.
    The recipe holds the output folder's lock while it runs (see `train`)."""

    def __init__(
        self, cfg: Config, console: Console, device: torch.device, optimizer_name: str, options: RunOptions, world: World = ONE_PROCESS, strategy: str = "single"
    ):
        self.cfg, self.console, self.device, self.optimizer_name, self.options = cfg, console, device, optimizer_name, options
        self.world, self.strategy = world, strategy
        self.ddp: torch.nn.parallel.DistributedDataParallel | None = None
        self.shard_local = False  # FSDP with a bitsandbytes optimizer: its state per rank (setup_optimizer)
        self.out = Path(cfg.output_dir)
        self.state = TrainState()
        self.start = 0  # the step this session starts after
        self.memory_report: Path | None = None
        self.reference: torch.Tensor | None = None  # preference.precompute_reference: pi_ref's log-probs [N, 2]
        self.rewards: dict[str, float] | None = None  # the last step's implicit-reward metrics (preference objectives)

    def run(self) -> dict:
        """The phases in order; a resumed run that had finished returns its result at once."""
        finished = self.setup_folder()
        if finished is not None:
            return finished
        self.setup_data()
        self.setup_model()
        self.setup_batches()
        self.open_folder()
        self.setup_optimizer()
        self.resume()
        self.setup_reference()
        self.score_before()
        profiled = self.train_loop()
        return profiled if profiled is not None else self.finish()

    # -- 0. the folder: resume its run, or start a fresh one where no run is

    def setup_folder(self) -> dict | None:
        """Find the checkpoint to resume (a finished run's result: nothing to do) or check that the
        folder is free; seed the RNGs and start the thread governor."""
        cfg, out, console = self.cfg, self.out, self.console
        say = lambda text: console.print(f"[yellow]{text}[/]")  # noqa: E731
        self.resumed = resolve_resume(cfg.checkpoint.resume, out, say=say) if cfg.checkpoint.resume else None
        if self.resumed and self.resumed[1]["step"] >= cfg.train.max_steps and (out / "result.json").exists():
            return _already_finished(cfg, out, self.resumed, console)
        foreign_resume = self.resumed and self.resumed[0].parent.parent.resolve() != out.resolve()
        fresh = not self.resumed or foreign_resume
        self.move = on_main(self.world, lambda: check_fresh(out, self.options.overwrite) if fresh else [])  # rank 0 checks before any rank writes
        self.dtype = DTYPES[cfg.model.dtype]
        seed_everything(cfg.train.seed, cfg.train.deterministic)
        self.state.run_id = broadcast(self.world, self.state.run_id)  # one run id for all ranks
        self.threads = ThreadGovernor(cfg.train.threads)  # adaptive by default: a core fewer per core of other work
        return None

    # -- 1. tokenizer and data first: a missing tokenizer or a bad row is reported before the weights load

    def setup_data(self) -> None:
        self.path = on_main(self.world, lambda: model_path(self.cfg, self.out))  # a tiny base is built once, by rank 0
        self.tokenizer = check_tokenizer(self.path)
        if self.cfg.objective == "sft":
            self.train_data, self.eval_data = load_data(self.cfg.data, self.tokenizer)
        else:  # {prompt, chosen, rejected} pairs, or KTO's {prompt, completion, label}
            self.train_data, self.eval_data = load_preference_data(self.cfg.data, self.tokenizer, self.cfg.objective)

    # -- 2. model: NF4 base, LoRA adapters on the targets, the other methods, the fused modules

    def setup_model(self) -> None:
        cfg, device, console = self.cfg, self.device, self.console
        check_memory(cfg, self.path, device, console, self.world.size, self.strategy)
        t0 = time.perf_counter()
        self.built = self.build_sharded() if self.strategy == "fsdp" else build_model(cfg, self.path, device)
        self.methods = self.built.methods
        model, loaded, fused = self.built.model, self.built.loaded, self.built.fused
        self.model = model
        self.loss_backend = cfg.kernels.loss_backend(device)
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.n_trainable = n_trainable = sum(p.numel() for p in self.trainable)
        n_total = sum(p.numel() for p in model.parameters() if p.is_floating_point()) + sum(
            m.nf4_shape.numel() for m in model.modules() if isinstance(m, LoRALinear) and m.has_nf4
        )  # the weights: sharded, the NF4 codes are uint8 parameters (counted by nf4_shape) and a DTensor counts whole
        threads = f" ({self.threads.describe()})" if device.type == "cpu" else ""
        console.print(
            f"[bold]model[/] {self.path} ({loaded.config.model_type}, {'NF4' if cfg.model.quantize else cfg.model.dtype} base) "
            f"loaded in {time.perf_counter() - t0:.1f}s on {device}{threads}; "
            f"{describe_methods(self.methods)}; "
            f"trainable {n_trainable:,} / {n_total:,} ({100 * n_trainable / n_total:.2f}%)"
        )
        if self.strategy == "fsdp":
            from qtrain.fsdp import nf4_bytes

            local, whole = nf4_bytes(model)
            console.print(f"[bold]fsdp[/] the NF4 base sharded over {self.world.size} ranks: {local / whole:.0%} of its {whole / GiB:.2f} GiB on this rank")
        if fused:
            console.print(f"[bold]kernels[/] {len(fused)} fused modules, loss {self.loss_backend}" + (f"; kept: {', '.join(sorted(fused.skipped))}" if fused.skipped else ""))

    def build_sharded(self) -> BuiltModel:
        """distributed.strategy=fsdp: the model sharded over the ranks before the optimizer sees its
        parameters. `qtrain.fsdp.load_sharded` (each rank reads its rows of every projection; no rank
        ever holds the NF4 base whole); for a 16-bit base, or methods it cannot build while loading
        (bottleneck adapters, prompt and prefix tuning: `ShardedLoadRefused`, said before any tensor is
        read), the model is loaded whole on every rank and `shard_model`-ed. Both draw the adapters'
        starting weights as one process does (the RNG is rewound for the second try). The fused
        modules are not swapped in: sharded, they fall back to the per-projection kernels anyway."""
        from qtrain.fsdp import ShardedLoadRefused, load_sharded, shard_model
        from qtrain.fused import Swapped

        cfg, device = self.cfg, self.device
        if cfg.model.quantize:
            rng, methods = torch.get_rng_state(), cfg.method_objects()
            try:
                loaded = load_sharded(self.path, methods, self.dtype, device, cfg.model.backend, self.world.size)
                return BuiltModel(loaded.model, loaded, methods, Swapped())
            except ShardedLoadRefused as e:
                torch.set_rng_state(rng)
                self.console.print(f"[yellow]fsdp:[/] {e}: loading it whole on every rank")
        built = build_model(cfg, self.path, device, compute_dtype=self.dtype)
        shard_model(built.model, self.world.size)
        return built

    # -- 3. data: batches; then, model, tokenizer and data valid, the run's first files

    def setup_batches(self) -> None:
        cfg, train_data, eval_data = self.cfg, self.train_data, self.eval_data
        mode = "pack" if cfg.data.packing else "group" if cfg.data.group_by_length else "pad"
        world = self.world
        if cfg.objective == "sft":
            self.data = Batches(train_data.examples, cfg.train.batch_size, self.tokenizer.pad_token_id, cfg.data.seed, mode, cfg.data.max_length, world.rank, world.size)
        else:  # each batch: B pairs as 2B rows, chosen first (qtrain.preference_data); one process (check_strategy)
            self.data = PreferenceBatches(train_data.examples, cfg.train.batch_size, self.tokenizer.pad_token_id, cfg.data.seed, mode)
        self.eval_examples = eval_data.examples[: cfg.eval.max_rows] if eval_data else []
        self.eval_rendered = eval_data.rendered[: cfg.eval.max_rows] if eval_data else []
        self.console.print(
            f"[bold]data[/] {len(train_data.examples)} train rows ({train_data.source}, {train_data.format}), "
            f"{len(self.eval_examples)} eval rows, {describe_batches(mode, len(self.data.plan()), self.data.batch_size, cfg.data.max_length)}"
            + (f", {cfg.train.batch_size} per rank on {world.size} ranks ({self.strategy})" if world.distributed else "")
        )
        for ds in (train_data, eval_data) if eval_data else (train_data,):
            if ds.skipped:
                self.console.print(f"[yellow]skipped {len(ds.skipped)} malformed rows[/] of {ds.source} (data.bad_rows=skip); first: {ds.skipped[0]}")
            if ds.too_long:
                self.console.print(f"[yellow]dropped {ds.too_long} rows[/] of {ds.source}: the prompt fills data.max_length={cfg.data.max_length}")

    def open_folder(self) -> None:
        """Only now does the run write into its folder: a previous run moved aside (--overwrite),
        config.json, the skipped rows."""
        out, console = self.out, self.console
        if not self.world.is_main:
            return
        if self.move:
            console.print(f"[yellow]output_dir:[/] the previous run moved to {move_aside(out, self.move)} (--overwrite)")
        write_json(out / "config.json", to_dict(self.cfg))
        if not self.options.profile_only and write_skipped_rows([self.train_data, self.eval_data], out / "skipped_rows.jsonl"):
            console.print(f"[yellow]skipped rows recorded in[/] {out / 'skipped_rows.jsonl'}")

    # -- 4. optimizer, schedule, precision

    def setup_optimizer(self) -> None:
        t, dtype, device = self.cfg.train, self.dtype, self.device
        groups = param_groups(self.model, t.lr, t.weight_decay, t.lora_plus_ratio, self.methods)
        self.shard_local = self.strategy == "fsdp" and self.optimizer_name != "adamw"  # bitsandbytes' on each rank's rows
        if self.shard_local:
            from qtrain.fsdp import shard_local_optimizer

            self.optimizer = shard_local_optimizer(lambda g: build_optimizer(self.optimizer_name, g), groups)
        else:
            self.optimizer = build_optimizer(self.optimizer_name, groups)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(t.warmup_steps, t.max_steps, t.schedule))
        use_autocast = t.autocast and dtype != torch.float32
        self.autocast = torch.autocast(device.type, dtype=dtype) if use_autocast else None
        self.scaler = torch.amp.GradScaler(device.type) if use_autocast and dtype == torch.float16 else None
        self.offload = OffloadActivations() if t.offload_activations else None
        if t.gradient_checkpointing:
            enable_checkpointing(self.model)
        self.model.config.use_cache = False
        self.distribute()

    def distribute(self) -> None:
        """More than one process: "ddp" gives every rank the whole model and all-reduces only the
        trainable parameters' gradients (the frozen NF4 base is loaded by each rank, never sent);
        rank 0's trainable values are broadcast first, then each rank draws its own dropout.
        "fsdp" was sharded by `build_sharded`, before the optimizer, every rank drawing the same
        adapters; each rank then draws its own dropout."""
        world, cfg = self.world, self.cfg
        if self.strategy == "fsdp":
            seed_everything(cfg.train.seed + world.rank, cfg.train.deterministic)
        if self.strategy != "ddp":
            return
        broadcast_trainable(world, self.trainable)
        seed_everything(cfg.train.seed + world.rank, cfg.train.deterministic)
        step_loss = StepLoss(self.model, self.offload, cfg.train.loss_chunk_tokens, self.loss_backend)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        self.ddp = torch.nn.parallel.DistributedDataParallel(step_loss, device_ids=device_ids, init_sync=False, broadcast_buffers=False)

    # -- 5. resume: adapter, optimizer, schedule, scaler, data position, RNG, counters

    def resume(self) -> None:
        if not self.resumed:
            return
        ckpt, state, meta = self.resumed
        for method in self.methods:
            load_method(self.model, method, ckpt / "adapter", resume=True)
            method.load_trainer_state(self.model, state.get("methods", {}).get(method.name, {}))
        if self.strategy == "fsdp":  # the checkpoint's whole moments, cut as the parameters are
            from qtrain.fsdp import shard_optimizer_state

            state = state | {"optimizer": shard_optimizer_state(self.optimizer, _rank_optimizer(state, self.world, ckpt, self.shard_local))}
        elif "optimizer_ranks" in state:
            raise ValueError(
                f"{ckpt}: its optimizer state is each rank's own rows (bitsandbytes' optimizer under distributed.strategy fsdp "
                f"on {len(state['optimizer_ranks'])} ranks); resume it that way"
            )
        _load_optimizer_state(self.optimizer, self.scheduler, state, ckpt)
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.data.load_state_dict(state["data"])
        set_rng_state(_rank_rng(state, self.world, self.console))
        self.state = TrainState.resumed(ckpt, state, meta)
        self.start = self.state.step
        _warn_config_changes(self.console, meta["config"], to_dict(self.cfg), self.start)
        self.console.print(f"[bold]resumed[/] from {ckpt} at step {self.start}")

    def setup_reference(self) -> None:
        """DPO with preference.precompute_reference: pi_ref's log-probs of every train pair, one pass
        (adapter off, no-grad), cached in the output folder (a resumed run reads them back)."""
        cfg = self.cfg
        if not (cfg.objective == "dpo" and cfg.preference.precompute_reference):
            return
        t0 = time.perf_counter()
        path = self.out / "reference_logps.safetensors"
        self.reference = precompute_reference(
            self.model, self.methods, self.train_data.examples, self.tokenizer.pad_token_id, cfg.eval.batch_size,
            self.device, self.autocast, cfg.train.loss_chunk_tokens, path, str(self.path),
        )  # fmt: skip
        self.console.print(f"[bold]reference[/] log-probs of {len(self.reference)} pairs in {path} ({time.perf_counter() - t0:.1f}s)")

    # -- 6. score before

    def score_before(self) -> None:
        cfg, state = self.cfg, self.state
        self.can_score = cfg.eval.exact_match and any(r.answer is not None for r in self.eval_rendered)
        if self.strategy == "fsdp" and (self.can_score or cfg.eval.samples):
            self.can_score = False
            self.console.print("[yellow]fsdp:[/] eval.exact_match and eval.samples generate text, which is not sharded yet: skipped (the eval loss is computed)")
        self.threads.tick()
        if self.can_score and state.exact_match_before is None:
            state.exact_match_before = exact_match(self.model, self.tokenizer, self.eval_rendered, cfg.eval.max_new_tokens, cfg.eval.batch_size)
            self.console.print(f"[bold]exact match before[/] {state.exact_match_before:.1%}")

    # -- 7. train (the first `profile_memory` steps measured)

    def train_loop(self) -> dict | None:
        """Steps start+1 .. train.max_steps, then the final eval and checkpoint. Returns the profile's
        result when a profile_only run ends after its measured steps, else None."""
        cfg, profile_memory = self.cfg, self.options.profile_memory
        self.profiler, self.profiled_shapes = None, []
        if profile_memory:
            self.profiler = MemoryProfiler(self.model, self.optimizer, self.device)
            if self.offload:
                self.offload.keep = self.profiler.saved  # what stays on the GPU is still counted
        self.model.train()
        resume_step = self.start if cfg.checkpoint.resume else None
        self.logger = MetricsLogger(self.out, cfg.log, to_dict(cfg), resume_step) if self.world.is_main else _NoLogger()
        self.stop = _StopOnSignals()
        self.state.last_checkpoint = self.state.resumed_from
        self.t_start, self.tokens_here, self.seconds_before = time.perf_counter(), 0, self.state.train_seconds
        try:
            self.progress = TrainProgress(self.console, cfg.train.max_steps, self.start, self.device.type, cfg.train.log_every, cfg.log.progress_seconds)
            with self.logger, self.stop, self.progress:
                for step in range(self.start + 1, cfg.train.max_steps + 1):
                    if self.train_one_step(step):
                        return {"steps": step - self.start, "memory_report": str(self.memory_report)}
                self.eval_metrics = self.final_eval()
                if self.state.step > self.start:
                    self.state.last_checkpoint = self.save(self.state.step)
        finally:
            self.model.config.use_cache = True
        return None

    def train_one_step(self, step: int) -> bool:
        """One optimizer step with its log, eval, checkpoint and stop request. True: a profile_only
        run has measured its steps and ends here."""
        self.state.step = step
        self.threads.tick()
        micro = [next(self.data) for _ in range(self.cfg.train.grad_accum)]
        measure = self.profiler is not None and step - self.start <= self.options.profile_memory
        loss, n_tok = self.run_step(step, micro, measure)
        if measure and self.record_profile(step, micro):
            return True
        self.scheduler.step()
        elapsed = self.log_step(step, loss, n_tok)
        self.after_step(step, elapsed)
        return False

    def run_step(self, step: int, micro: list[dict], measure: bool) -> tuple[float, int]:
        """`train_step` with the run's settings; a NaN/inf loss or CUDA running out of memory becomes
        an error that says what to do."""
        cfg, profiler = self.cfg, self.profiler
        try:
            with profiler.step(step) if measure else contextlib.nullcontext():
                if cfg.objective != "sft":
                    if self.reference is not None:  # the precomputed pi_ref log-probs of these pairs
                        micro = [b | {"ref_logps": self.reference[b["index"]]} for b in micro]
                    loss, n_tok, self.rewards = preference_step(
                        self.model, micro, self.optimizer, self.trainable, cfg.train.max_grad_norm, self.device, cfg.objective, cfg.preference,
                        self.autocast, self.scaler, self.offload, on_phase=profiler.phase if measure else None,
                        loss_chunk=cfg.train.loss_chunk_tokens, methods=self.methods, step=step, total_steps=cfg.train.max_steps,
                    )  # fmt: skip
                    return loss, n_tok
                return train_step(
                    self.model, micro, self.optimizer, self.trainable, cfg.train.max_grad_norm, self.device, self.autocast, self.scaler, self.offload,
                    on_phase=profiler.phase if measure else None, loss_chunk=cfg.train.loss_chunk_tokens,
                    methods=self.methods, step=step, total_steps=cfg.train.max_steps, loss_backend=self.loss_backend,
                    world=self.world, ddp=self.ddp,
                )  # fmt: skip
        except FloatingPointError as e:
            raise FloatingPointError(f"step {step}: {e}; stopped before the update ({_last_good(self.out, self.state.run_id, self.state.resumed_from)}") from None
        except torch.OutOfMemoryError:
            self.optimizer.zero_grad(set_to_none=True)
            shape = max((tuple(b["input_ids"].shape) for b in micro), key=lambda s: s[0] * s[1])
            raise OutOfMemory(oom_advice(cfg, step, shape, self.device, self.built.loaded.config)) from None

    def record_profile(self, step: int, micro: list[dict]) -> bool:
        """The measured micro-batches' shapes; after the last measured step, the report. True when
        the run ends there (profile_only)."""
        self.profiled_shapes += [(*b["input_ids"].shape, "position_ids" in b, "attention_mask" in b and not b["attention_mask"].all()) for b in micro]
        if step - self.start == self.options.profile_memory or step == self.cfg.train.max_steps:
            where = self.options.report_dir or self.out / "memory"
            self.memory_report = _memory_report(self.cfg, self.profiler, self.built.loaded, self.methods, self.device, self.profiled_shapes, where, self.progress.console)
            self.profiler = None
            if self.options.profile_only:
                return True
            if self.offload:
                self.offload.keep = None
        return False

    def log_step(self, step: int, loss: float, n_tok: int) -> float:
        """Count the step, log its record and show it; returns the seconds since this session began."""
        state = self.state
        self.tokens_here += n_tok
        state.tokens_seen += n_tok
        state.losses.append(loss)
        elapsed = time.perf_counter() - self.t_start
        record = {
            "loss": loss,
            "lr": self.scheduler.get_last_lr()[0],
            "tokens_per_s": self.tokens_here / elapsed,
            "peak_mem_gib": peak_memory_bytes(self.device) / GiB,
        }
        self.logger.log(step, record | (self.rewards or {}))
        self.progress.update(step, loss, record["lr"], record["tokens_per_s"], record["peak_mem_gib"], self.rewards)
        if step % self.cfg.train.log_every == 0:
            self.logger.flush()
        return elapsed

    def after_step(self, step: int, elapsed: float) -> None:
        """The periodic eval and checkpoint; a stop request (Ctrl-C, SIGTERM, should_stop) saves and raises Interrupted."""
        cfg = self.cfg
        if self.eval_examples and cfg.eval.every and step % cfg.eval.every == 0 and step < cfg.train.max_steps:
            self.evaluate(step, self.progress.console)
        self.state.train_seconds = self.seconds_before + elapsed
        if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < cfg.train.max_steps:
            self.state.last_checkpoint = self.save(step)
        stop = self.stop.requested or bool(self.options.should_stop and self.options.should_stop(step))
        if any_rank(self.world, stop):  # Ctrl-C on any rank stops all at this step
            raise Interrupted(step, self.save(step))

    def final_eval(self) -> dict:
        """The eval metrics at the last step; a run resumed at its end (killed before the adapter was
        written) logs nothing twice: the ones already logged."""
        step = self.state.step
        if step == self.start:
            return {k: v for r in read_metrics(self.out / "metrics.jsonl") if r.get("step") == step for k, v in r.items() if k.startswith("eval_")}
        if self.eval_examples:
            return self.evaluate(step, self.console)
        return {}

    def evaluate(self, step: int, console: Console) -> dict:
        if self.cfg.objective != "sft":
            return _evaluate_preference(self.cfg, self.model, self.methods, self.eval_examples, self.tokenizer.pad_token_id, self.device, self.autocast, self.logger, step, console)
        return _evaluate(self.cfg, self.model, self.tokenizer, self.eval_examples, self.train_data.format, self.device, self.autocast, self.logger, step, console, self.world, self.strategy == "fsdp")

    def save(self, step: int) -> Path:
        """Checkpoint `step` (adapter + trainer_state.pt); a diverged adapter is never saved."""
        state = self.state
        _check_finite(self.model, step, self.out, state.run_id, state.resumed_from, self.world)
        write_adapter = self.adapter_writer()
        trainer_state = {
            "optimizer": self.optimizer_state(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "data": self.data.state_dict(),
            "trainer": state.trainer(),
            "methods": {m.name: m.trainer_state() for m in self.methods},
        }
        if self.shard_local:
            trainer_state["optimizer_ranks"] = gather(self.world, trainer_state["optimizer"])
        if self.world.distributed:  # each rank's RNG (its own dropout); DDP's optimizer state is the same on all
            trainer_state["rng_ranks"] = gather(self.world, rng_state())
        loss = state.losses[-1] if state.losses else None
        keep = self.cfg.checkpoint.keep_last
        return on_main(self.world, lambda: save_checkpoint(self.out, step, write_adapter, trainer_state, to_dict(self.cfg), keep, state.run_id, loss))

    def optimizer_state(self) -> dict:
        """The optimizer's state for a checkpoint; sharded (FSDP), gathered whole by every rank
        (`qtrain.fsdp.full_optimizer_state`: the file one process writes, so it resumes on any number
        of ranks, and on as many bit-for-bit)."""
        if self.strategy != "fsdp":
            return self.optimizer.state_dict()
        if self.shard_local:  # bitsandbytes' state of each rank's rows: rank 0's here, every rank's in optimizer_ranks
            return self.optimizer.state_dict()
        from qtrain.fsdp import full_optimizer_state

        return full_optimizer_state(self.optimizer)

    def adapter_writer(self) -> Callable[[Path], Path]:
        """`write_adapter` for rank 0 to call; sharded (FSDP), the methods' parameters are gathered
        whole first, here, by every rank (`PeftMethod.state_dict`: a collective)."""
        states = [m.state_dict(self.model) for m in self.methods] if self.strategy == "fsdp" else None
        return lambda target: self.write_adapter(target, states)

    def write_adapter(self, target: Path, states: list[dict] | None = None) -> Path:
        """The adapter in PEFT's format, with qtrain.json: how the base was held, the data format and
        (when not the defaults) the kernels settings, which `qtrain generate` builds with."""
        info = {"data_format": self.train_data.format} | recorded_kernels(self.cfg.kernels)
        return save_methods(self.model, self.methods, self.path, target, self.dtype, self.cfg.model.quantize, extra_info=info, states=states)

    # -- 8. adapter (PEFT format), score after, summary

    def finish(self) -> dict:
        cfg, state = self.cfg, self.state
        write_adapter = self.adapter_writer()
        adapter_dir = on_main(self.world, lambda: write_adapter(self.out / "adapter"))  # once, by rank 0
        losses = state.losses
        first, last = _mean(losses[: cfg.train.log_every]), _mean(losses[-cfg.train.log_every :])
        result = {
            "steps": len(losses),
            "loss_first": first,
            "loss_last": last,
            **self.eval_metrics,
            "trainable_params": self.n_trainable,
            "tokens_seen": state.tokens_seen,
            "train_seconds": state.train_seconds,
            "peak_mem_bytes": peak_memory_bytes(self.device),
            "adapter": str(adapter_dir),
            "checkpoint": str(state.last_checkpoint),
        }
        if not self.world.is_main:  # rank 0 scores, plots and writes result.json
            return result
        if self.can_score:
            result["exact_match_before"] = state.exact_match_before
            result["exact_match_after"] = exact_match(self.model, self.tokenizer, self.eval_rendered, cfg.eval.max_new_tokens, cfg.eval.batch_size)
        if self.memory_report:
            result["memory_report"] = str(self.memory_report)
        if cfg.log.plot:
            result["loss_plot"] = str(plot_loss(read_metrics(self.out / "metrics.jsonl"), self.out / "loss.png"))
        write_json(self.out / "result.json", result)
        self.console.print(summary_table(result))
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


def _check_finite(model, step: int, out: Path, run_id: str, resumed_from: Path | None, world: World = ONE_PROCESS) -> None:
    """FloatingPointError naming the first trainable tensor that holds NaN/inf, on every rank (each
    checks the rows it holds: sharded, another rank's may be the bad ones)."""
    bad = next((name for name, p in model.named_parameters() if p.requires_grad and not torch.isfinite(_local(p)).all()), None)
    bad = next((b for b in gather(world, bad) if b), None)
    if bad is not None:
        raise FloatingPointError(f"step {step}: the update made {bad} NaN/inf; not saved ({_last_good(out, run_id, resumed_from)}")


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded (FSDP) tensor; any other tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


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
    w = workload_for(cfg, device.type, backend, loaded.config)
    if cfg.objective in PAIR_OBJECTIVES:  # the measured rows are the pairs' chosen and rejected: B pairs
        b //= 2
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


@torch.no_grad()
def _evaluate_preference(cfg, model, methods, examples, pad_id, device, autocast, logger, step, console) -> dict:
    """The objective's loss and implicit-reward metrics over the eval pairs (KTO: examples), logged at `step`."""
    was_training = model.training
    model.eval()
    total, units, sums = 0.0, 0, {}
    try:
        for batch in eval_preference_batches(examples, cfg.eval.batch_size, pad_id):
            batch = {k: v.to(device) for k, v in batch.items()}
            totals = step_totals([batch], cfg.objective)
            with autocast or contextlib.nullcontext():
                loss, batch_sums = preference_loss(model, methods, batch, cfg.objective, cfg.preference, totals, cfg.train.loss_chunk_tokens)
            total += loss.item() * totals["units"]
            units += totals["units"]
            sums = {k: sums.get(k, 0.0) + v for k, v in batch_sums.items()}
    finally:
        model.train(was_training)
    metrics = {"eval_loss": total / max(units, 1)} | {f"eval_{k}": v for k, v in reward_means(sums, max(units, 1)).items()}
    logger.log(step, metrics)
    console.print(f"[bold]eval[/] step {step}: loss {metrics['eval_loss']:.4f}, reward accuracy {metrics['eval_rewards_accuracy']:.1%}, margin {metrics['eval_rewards_margins']:.3f}")
    return metrics


def _evaluate(cfg, model, tokenizer, examples, data_format, device, autocast, logger, step, console, world: World = ONE_PROCESS, sharded: bool = False) -> dict:
    """Eval loss / perplexity, and the fixed sample prompts, logged at `step`. `sharded` (FSDP): the
    ranks' forwards in lockstep, no samples (generation is not sharded yet)."""
    loss = eval_loss(model, examples, cfg.eval.batch_size, tokenizer.pad_token_id, device, autocast, cfg.train.loss_chunk_tokens, world, sharded)
    metrics = {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}
    logger.log(step, metrics)
    console.print(f"[bold]eval[/] step {step}: loss {loss:.4f}, perplexity {metrics['eval_ppl']:.2f}")
    if cfg.eval.samples and not sharded:
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


class _NoLogger:
    """The metrics sinks of a rank other than 0: rank 0 logs the (all-reduced) numbers."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def log(self, step: int, record: dict) -> None:
        pass

    def text(self, step: int, tag: str, text: str) -> None:
        pass

    def flush(self) -> None:
        pass


def _rank_rng(state: dict, world: World, console: Console) -> dict:
    """This rank's RNG state from a checkpoint. Saved by as many ranks as now: its own (bit-for-bit);
    otherwise rank 0's (or the single process's), with a warning saying what changed."""
    saved = state.get("rng_ranks") or [state["rng"]]
    if len(saved) == world.size:
        return saved[world.rank]
    console.print(
        f"[yellow]resume:[/] the checkpoint was saved by {len(saved)} process(es), this run has {world.size}: the global batch is now "
        f"train.batch_size x {world.size}, so the data position (epoch {state['data']['epoch']}, batch {state['data']['index']}) "
        "and each rank's RNG (from rank 0's) continue, but not bit-for-bit"
    )
    return saved[0]


def _rank_optimizer(state: dict, world: World, ckpt: Path, shard_local: bool) -> dict:
    """This rank's optimizer state under FSDP: the whole state (torch AdamW's, gathered), or with a
    bitsandbytes optimizer (`qtrain.fsdp.shard_local_optimizer`) this rank's own, saved by as many ranks."""
    ranks = state.get("optimizer_ranks")
    if not shard_local and ranks is None:
        return state["optimizer"]
    if not shard_local or ranks is None or len(ranks) != world.size:
        saved = f"{len(ranks)} ranks' own" if ranks is not None else "one whole"
        raise ValueError(
            f"{ckpt}: the checkpoint holds {saved} optimizer state and this run's train.optimizer under "
            f"distributed.strategy fsdp on {world.size} ranks needs {'its own per rank' if shard_local else 'a whole one'}; "
            "resume with the optimizer and number of ranks it was saved with"
        )
    return ranks[world.rank]


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")
