"""The training recipe: read it top to bottom.

    config → model (NF4 base + LoRA) → data → score before → train loop → adapter → score after
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import AutoTokenizer

from qtrain.adapter import load_adapter_weights, read_adapter_config, save_adapter
from qtrain.config import DTYPES, Config, to_dict
from qtrain.data import IGNORE_INDEX, batches, load_rows, tokenize_row
from qtrain.evaluate import exact_match
from qtrain.lora import LoRASpec
from qtrain.model import load_model
from qtrain.tiny import build_tiny_model



def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but no CUDA GPU is visible; use device=cpu or device=auto")
    return torch.device(name)


def model_path(cfg: Config, output_dir: Path) -> str:
    """The checkpoint to load: the configured one, or the tiny model built (once) in output_dir/base."""
    if cfg.model.name_or_path is not None:
        return cfg.model.name_or_path
    base = output_dir / "base"
    if not (base / "config.json").exists():
        build_tiny_model(base, **dataclasses.asdict(cfg.model.tiny))
    return str(base)


def lr_lambda(cfg: Config):
    """Linear warmup, then cosine / linear decay to 0, or constant."""
    warmup, total = cfg.train.warmup_steps, cfg.train.max_steps

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if cfg.train.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if cfg.train.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0

    return f


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over labelled positions. logits [B, S, V], labels [B, S]."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def train_step(model, micro_batches: list[dict], optimizer, trainable: list, max_grad_norm: float, device) -> tuple[float, int]:
    """One optimizer step over `micro_batches` (gradient accumulation).

    The loss is the mean over the target tokens of the whole step, not a mean of per-micro-batch
    means, so accumulating k micro-batches equals one batch k times larger.
    Returns (loss, tokens processed).
    """
    n_targets = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro_batches)
    loss_total, tokens = 0.0, 0
    for batch in micro_batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # [B, S, V]
        loss = causal_lm_loss_sum(logits, batch["labels"]) / max(n_targets, 1)
        loss.backward()
        loss_total += loss.item()
        tokens += int(batch["attention_mask"].sum())
    if not math.isfinite(loss_total):  # before the update: the adapter keeps its last good values
        optimizer.zero_grad(set_to_none=True)
        raise FloatingPointError(f"loss is {loss_total}; lower train.lr or check the data")
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_total, tokens


def train(cfg: Config, console: Console | None = None) -> dict:
    console = console or Console()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    torch.manual_seed(cfg.train.seed)
    device = pick_device(cfg.device)
    dtype = DTYPES[cfg.model.dtype]

    # 1. model: NF4 base, LoRA adapters on the targets
    path = model_path(cfg, out)
    spec: LoRASpec = read_adapter_config(cfg.lora.init_from) if cfg.lora.init_from else cfg.lora
    t0 = time.perf_counter()
    loaded = load_model(path, spec, compute_dtype=dtype, device=device, quantize=cfg.model.quantize, backend=cfg.model.backend)
    model = loaded.model
    if cfg.lora.init_from:
        load_adapter_weights(model, cfg.lora.init_from)
    tokenizer = AutoTokenizer.from_pretrained(loaded.model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    n_total = sum(p.numel() for p in model.parameters()) + sum(
        m._nf4_meta["shape"].numel() for m in model.modules() if getattr(m, "_nf4_meta", None)
    )
    console.print(
        f"[bold]model[/] {path} ({loaded.config.model_type}, {'NF4' if cfg.model.quantize else cfg.model.dtype} base) "
        f"loaded in {time.perf_counter() - t0:.1f}s on {device}; LoRA r={spec.rank} on {len(loaded.targets)} linears; "
        f"trainable {n_trainable:,} / {n_total:,} ({100 * n_trainable / n_total:.2f}%)"
    )

    # 2. data
    train_rows, eval_rows = load_rows(cfg.data.train, cfg.data.eval, cfg.data.num_train, cfg.data.num_eval, cfg.data.seed)
    examples = [tokenize_row(tokenizer, r, cfg.data.max_length, cfg.data.train_on_prompt) for r in train_rows]
    if len(examples) < cfg.train.batch_size:
        raise ValueError(f"data.train: {len(examples)} rows, fewer than train.batch_size={cfg.train.batch_size}")
    console.print(f"[bold]data[/] {len(train_rows)} train rows, {len(eval_rows)} eval rows ({cfg.data.train})")

    # 3. score before
    result: dict = {"trainable_params": n_trainable}
    if cfg.eval.exact_match and eval_rows:
        result["exact_match_before"] = exact_match(model, tokenizer, eval_rows, cfg.eval.max_new_tokens, cfg.eval.batch_size)
        console.print(f"[bold]exact match before[/] {result['exact_match_before']:.1%}")

    # 4. train
    if cfg.train.gradient_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    optimizer = torch.optim.AdamW(trainable, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    data = batches(examples, cfg.train.batch_size, tokenizer.pad_token_id, cfg.data.seed)
    losses, tokens_seen, t_start = [], 0, time.perf_counter()
    with open(out / "metrics.jsonl", "w") as log, _progress(console) as progress:
        task = progress.add_task("train", total=cfg.train.max_steps, loss=float("nan"), lr=0.0, tps=0.0)
        for step in range(1, cfg.train.max_steps + 1):
            micro = [next(data) for _ in range(cfg.train.grad_accum)]
            try:
                loss_sum, n_tokens = train_step(model, micro, optimizer, trainable, cfg.train.max_grad_norm, device)
            except FloatingPointError as e:
                raise FloatingPointError(f"step {step}: {e}") from None
            scheduler.step()
            tokens_seen += n_tokens
            losses.append(loss_sum)
            lr = scheduler.get_last_lr()[0]
            tps = tokens_seen / (time.perf_counter() - t_start)
            log.write(json.dumps({"step": step, "loss": loss_sum, "lr": lr, "tokens_per_s": tps}) + "\n")
            progress.update(task, advance=1, loss=loss_sum, lr=lr, tps=tps)
            if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
                log.flush()
    train_time = time.perf_counter() - t_start
    model.config.use_cache = True

    # 5. adapter (PEFT format), score after
    adapter_dir = save_adapter(model, spec, loaded.targets, path, out / "adapter", dtype, cfg.model.quantize)
    first, last = _mean(losses[: cfg.train.log_every]), _mean(losses[-cfg.train.log_every :])
    result |= {"steps": len(losses), "loss_first": first, "loss_last": last, "train_seconds": train_time, "adapter": str(adapter_dir)}
    console.print(f"[bold]loss[/] {first:.3f} → {last:.3f} over {len(losses)} steps in {train_time:.0f}s; adapter: {adapter_dir}")
    if cfg.eval.exact_match and eval_rows:
        result["exact_match_after"] = exact_match(model, tokenizer, eval_rows, cfg.eval.max_new_tokens, cfg.eval.batch_size)
        console.print(f"[bold]exact match[/] before {result['exact_match_before']:.1%} → after {result['exact_match_after']:.1%}")
    (out / "result.json").write_text(json.dumps(result, indent=2))
    return result


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[tps]:.0f} tok/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )
