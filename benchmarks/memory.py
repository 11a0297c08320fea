"""GPU memory of QLoRA training steps on 7-8B models, measured against qtrain's estimator: the
7B-on-24GB proof.

    python benchmarks/memory.py                                    # Llama-2-7B and Llama-3.1-8B, all settings
    python benchmarks/memory.py --quick                            # Llama-3.1-8B, 2 steps per run, search to 32k
    python benchmarks/memory.py --models llama-3.1-8b --settings max@cap+offload   # one part of the full run
    python benchmarks/memory.py --models llama-3.1-8b mistral-7b --seq 4096 --cap-gib 16

Each model (architecture from `qtrain.presets`, random weights from `qtrain.synthetic.random_model`:
nothing is downloaded) is built on the GPU with an NF4 base in bf16, LoRA r=16 alpha=32 on every
linear (fp32), gradient checkpointing, paged AdamW 32-bit (bitsandbytes), and trained with
`qtrain.train.train_step` on random token batches [1, seq] (labels = input_ids; no padding, no
attention mask). Settings:

- `seq`: seq tokens (2048), batch 1;
- `seq+offload`: the same with the checkpointed activations offloaded to pinned CPU RAM;
- `max@cap`, `max@cap+offload`: under a cap (24 GB), the longest sequence that trains (multiples
  of 1024, up to --max-seq): the estimator's prediction (`qtrain.estimate.max_seq_len`), checked by
  running it, then doubling (or halving) and bisection; an out-of-memory error means "does not fit".

Per run: `torch.cuda.max_memory_allocated` over the measured steps (the first step warms up and is
not measured), the estimator's `peak` (the same quantity) and their ratio; what the GPU held, i.e.
the allocator's reserved peak plus the memory outside torch's allocator (CUDA context, kernels,
bitsandbytes' paged optimizer state: total - free - reserved), against the estimator's
`device_total`; tokens/s; whether it fits in the cap (24 GB) and in 8 GB.

The cap emulates a card of that size: torch's allocator may reserve the cap minus what lies
outside it at that moment (`torch.cuda.set_per_process_memory_fraction`), so the estimator's
device total (which counts the context and the paged state) is compared with a like quantity.
Each try runs --search-steps (2) steps under the cap; the first also allocates and, at a new
power-of-two length, runs the Triton autotuner, as the first step of real training does.

Writes `benchmarks/results/memory-<gpu>-<date>-<commit>.{json,md}` after every setting, merged
into the files an earlier invocation wrote for the same GPU, day and commit: the full run (not
timed yet; by FLOP counts tens of minutes on an H100, most of it the offloaded search, whose tries
near 100k tokens take about a minute per step) can be split into invocations of one model and
setting each and still give one table. Without a CUDA GPU it says so
and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import importlib.util
import inspect
import json
import re
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30

DEFAULT_MODELS = ["llama-2-7b", "llama-3.1-8b"]
SETTINGS = ["seq", "seq+offload", "max@cap", "max@cap+offload"]
LORA = {"rank": 16, "alpha": 32.0, "target_modules": "all-linear"}
OPTIMIZER = "paged_adamw_32bit"
LR = 2e-4
SEARCH_STEP = 1024  # the max-length search runs multiples of this
SEARCH_STEPS = 2  # steps per try in the search (the first one of a new shape also allocates)
TARGET_8GB = ("llama-3.1-8b", 2048)  # the 8 GB claim: this model at this length, batch 1

# ---- the loss path: the one place that decides it -------------------------------------------------
# qtrain.train.train_step(loss_chunk=...) runs lm_head + cross-entropy in chunks of that many tokens
# (None: automatic, a chunk's logits about the size of the hidden states; 0: full [B, S, V] logits).
# The estimator's Workload.loss_chunk takes the same values. Older train_step versions without the
# argument compute full logits, estimated as loss_chunk=0.
LOSS_CHUNK: int | None = None


def loss_path() -> tuple[int | None, dict]:
    """(Workload.loss_chunk, extra keyword arguments for train_step)."""
    from qtrain.train import train_step

    if "loss_chunk" in inspect.signature(train_step).parameters:
        return LOSS_CHUNK, {"loss_chunk": LOSS_CHUNK}
    return 0, {}


def describe_loss(chunk: int | None) -> str:
    return "full logits" if chunk == 0 else f"chunked lm_head + cross-entropy ({chunk or 'automatic'} tokens per chunk)"


# ---- one model ------------------------------------------------------------------------------------------


@dataclass
class Bench:
    """A model under test with its optimizer (reused by every run of the model: bitsandbytes never
    frees paged state, so a new optimizer per run would leak it)."""

    name: str
    config: object
    spec: object
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    trainable: list
    device: torch.device
    dtype: torch.dtype
    backend: str  # the NF4 backend "auto" resolves to on this device
    optimizer_name: str
    loss_chunk: int | None
    train_kwargs: dict
    build_seconds: float = 0.0


def build_bench(
    name: str, config, device, dtype=torch.bfloat16, optimizer_name: str = OPTIMIZER, seed: int = 0
) -> Bench:
    from qtrain.kernels.nf4_lora import resolve_backend

    from qtrain.lora import LoRASpec
    from qtrain.optim import build_optimizer, param_groups
    from qtrain.synthetic import random_model

    device = torch.device(device)
    spec = LoRASpec(**LORA)
    t0 = time.perf_counter()
    from qtrain.model import enable_checkpointing

    model = random_model(config, spec, dtype, device, quantize=True, backend="auto", seed=seed)
    enable_checkpointing(model)
    model.config.use_cache = False
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(optimizer_name, param_groups(model, LR, 0.0))
    backend = resolve_backend("auto", torch.empty(1, device=device, dtype=dtype))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    chunk, kwargs = loss_path()
    return Bench(name, config, spec, model, optimizer, trainable, device, dtype, backend, optimizer_name, chunk, kwargs,
                 time.perf_counter() - t0)  # fmt: skip


def workload(bench: Bench, seq: int, offload: bool):
    from qtrain.estimate import Workload

    return Workload(
        batch_size=1,
        seq_len=seq,
        dtype=bench.dtype,
        backend=bench.backend,
        gradient_checkpointing=True,
        offload_activations=offload,
        optimizer=bench.optimizer_name,
        device=bench.device.type,
        loss_chunk=bench.loss_chunk,
        autocast=bench.dtype != torch.float32,
    )


def random_batch(vocab: int, seq: int, seed: int) -> dict:
    ids = torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids.clone(), "num_tokens": torch.tensor(seq)}


def free_memory(bench: Bench) -> None:
    """Gradients, cached GPU blocks and cached pinned host blocks (offloaded activations) released."""
    bench.optimizer.zero_grad(set_to_none=True)
    if bench.device.type == "cuda":
        gc.collect()  # reference cycles that hold GPU tensors (e.g. an out-of-memory error's frames)
        torch.cuda.synchronize(bench.device)
        torch.cuda.empty_cache()
        empty_host_cache = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None)  # torch >= 2.10
        if empty_host_cache is not None:
            empty_host_cache()


def outside_allocator(device: torch.device) -> int:
    """GPU bytes in use that torch's allocator does not hold: CUDA context, loaded kernels, cuBLAS
    handles, bitsandbytes' paged (unified) memory resident on the GPU."""
    free, total = torch.cuda.mem_get_info(device)
    return total - free - torch.cuda.memory_reserved(device)


def measure(bench: Bench, seq: int, steps: int, offload: bool, warmup: int = 1) -> dict:
    """`steps` optimizer steps on [1, seq] batches; the first `warmup` are not measured. CUDA numbers
    are None on other devices. Raises torch.OutOfMemoryError."""
    from qtrain.memory import OffloadActivations
    from qtrain.train import train_step

    cuda = bench.device.type == "cuda"
    warmup = min(warmup, steps - 1)
    vocab = bench.config.get_text_config().vocab_size
    autocast = (
        (lambda: torch.autocast(bench.device.type, dtype=bench.dtype))
        if bench.dtype != torch.float32
        else (lambda: None)
    )
    off = OffloadActivations() if offload else None
    losses, tokens, t0 = [], 0, time.perf_counter()
    for i in range(steps):
        if i == warmup:
            if cuda:
                torch.cuda.synchronize(bench.device)
                torch.cuda.reset_peak_memory_stats(bench.device)
            tokens, t0 = 0, time.perf_counter()
        batch = random_batch(vocab, seq, seed=i)
        loss, n = train_step(bench.model, [batch], bench.optimizer, bench.trainable, 1.0, bench.device, autocast(),
                             offload=off, **bench.train_kwargs)  # fmt: skip
        losses.append(loss)
        tokens += n
    if cuda:
        torch.cuda.synchronize(bench.device)
    seconds = time.perf_counter() - t0
    out = {
        "measured_steps": steps - warmup,
        "losses": losses,
        "tokens_per_s": tokens / seconds,
        "step_seconds": seconds / (steps - warmup),
    }
    if cuda:
        out |= {
            "peak_allocated": torch.cuda.max_memory_allocated(bench.device),
            "peak_reserved": torch.cuda.max_memory_reserved(bench.device),
            "outside_allocator": outside_allocator(bench.device),
        }
        out["device_used"] = out["peak_reserved"] + out["outside_allocator"]
    else:
        out |= dict.fromkeys(("peak_allocated", "peak_reserved", "outside_allocator", "device_used"))
    if off is not None:
        out["offloaded_bytes_per_step"] = off.bytes // steps
    return out


def is_out_of_memory(e: BaseException) -> bool:
    """torch's allocator refusing (torch.OutOfMemoryError), or a library failing to allocate past
    the cap (cuBLAS workspaces: CUBLAS_STATUS_ALLOC_FAILED; others: "out of memory")."""
    text = str(e)
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in text.lower() or "ALLOC_FAILED" in text


def _ratio(a, b):
    return None if a is None or not b else a / b


def run_setting(bench: Bench, setting: str, seq: int, steps: int, offload: bool, cap_bytes: int | None = None,
                cap_gib: float = 24.0) -> dict:  # fmt: skip
    """One measured run with the estimate beside it; an out-of-memory error is recorded, not raised."""
    from qtrain.estimate import estimate

    est = estimate(bench.config, bench.spec, workload(bench, seq, offload))
    row = {
        "model": bench.name, "setting": setting, "seq": seq, "batch": 1, "offload": offload, "steps": steps,
        "estimate_peak": est.peak, "estimate_device_total": est.device_total, "estimate_phase": est.phase,
        "estimate_paged": est.paged, "estimate_host": est.host, "allocator_limit": cap_bytes, "error": None,
    }  # fmt: skip
    try:
        row |= measure(bench, seq, steps, offload)
    except RuntimeError as e:  # torch.OutOfMemoryError is one
        if not is_out_of_memory(e):
            raise
        row["error"] = "out of memory: " + str(e).split("\n")[0][:300]
    free_memory(bench)
    if row["error"] is None:
        row["ratio_peak"] = _ratio(est.peak, row["peak_allocated"])  # estimate / measured
        row["ratio_device"] = _ratio(est.device_total, row["device_used"])
        used = row["device_used"]
        row["fits_cap"] = None if used is None else used <= cap_gib * GiB
        row["fits_8gb"] = None if used is None else used <= 8 * GiB
    return row


# ---- the longest sequence under a cap -----------------------------------------------------------------


@contextlib.contextmanager
def memory_cap(device: torch.device, cap_bytes: int):
    """torch's allocator may reserve `cap_bytes` minus what lies outside it now (a card of that size).
    Yields the allocator limit in bytes."""
    gc.collect()
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(device).total_memory
    limit = min(cap_bytes - outside_allocator(device), total)
    torch.cuda.set_per_process_memory_fraction(max(limit, 0) / total, device)
    try:
        yield limit
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        gc.collect()
        torch.cuda.empty_cache()


class _OutOfTime(Exception):
    pass


def bracket_max_seq(fits, start: int, step: int, limit: int, deadline: float | None = None,
                   clock: Callable[[], float] = time.monotonic) -> dict:  # fmt: skip
    """The largest multiple of `step` up to `limit` with `fits(seq)` True: from `start`, doubling (or
    halving) to bracket it, then bisection. No try starts after `deadline` (by `clock`; the first
    always runs). Returns found (0: none), fails_at (the shortest failing length above found, None
    if none tried), complete (found is the answer to one step), tries [(seq, fits)]."""
    known: dict[int, bool] = {}
    tries: list[tuple[int, bool]] = []
    top = limit // step

    def ok(k: int) -> bool:
        n = k * step
        if n not in known:
            if deadline is not None and tries and clock() > deadline:
                raise _OutOfTime
            known[n] = bool(fits(n))
            tries.append((n, known[n]))
        return known[n]

    with contextlib.suppress(_OutOfTime):
        k = max(1, min(start // step, top))
        lo, hi = (k, None) if ok(k) else (None, k)
        while hi is None and lo < top:  # doubling up to the first failure (or the limit)
            nxt = min(2 * lo, top)
            lo, hi = (nxt, None) if ok(nxt) else (lo, nxt)
        while lo is None and hi > 1:  # halving down to the first success
            nxt = hi // 2
            lo, hi = (nxt, hi) if ok(nxt) else (None, nxt)
        while lo is not None and hi is not None and hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    found = max((n for n, f in known.items() if f), default=0)
    above = [n for n, f in known.items() if not f and n > found]
    fails_at = min(above) if above else None
    complete = found == top * step or (fails_at is not None and fails_at - found <= step)
    return {"found": found, "fails_at": fails_at, "complete": complete, "tries": tries}


def search_max_seq(fits, start: int, step: int = SEARCH_STEP, limit: int = 131072) -> tuple[int, list]:
    """The largest multiple of `step` up to `limit` for which `fits(seq)` is True (0 if none),
    starting at `start`: doubling (or halving) to bracket it, then bisection. Returns (seq, tries)."""
    result = bracket_max_seq(fits, start, step, limit)
    return result["found"], result["tries"]


def max_seq_under_cap(bench: Bench, offload: bool, cap_gib: float, steps: int = SEARCH_STEPS, limit: int = 131072,
                      step: int | None = None) -> tuple[dict, dict | None]:  # fmt: skip
    """(search summary, the run row of the longest sequence that trained) under a `cap_gib` card;
    lengths are multiples of `step` (default SEARCH_STEP)."""
    from qtrain.estimate import max_seq_len

    step = step or SEARCH_STEP
    cap = int(cap_gib * GiB)
    predicted = max_seq_len(bench.config, bench.spec, workload(bench, 2048, offload), cap, limit=limit)
    rows: dict[int, dict] = {}

    def fits(seq: int) -> bool:
        with memory_cap(bench.device, cap) as limit_bytes:
            row = run_setting(
                bench, "max@cap" + ("+offload" if offload else ""), seq, steps, offload, limit_bytes, cap_gib
            )
        rows[seq] = row
        print(f"  {'offload' if offload else 'no offload'}: seq {seq}: "
              f"{'OOM' if row['error'] else 'trains, peak ' + _gib(row['peak_allocated'])}", flush=True)  # fmt: skip
        return row["error"] is None

    found, tries = search_max_seq(fits, predicted, step, limit)
    summary = {
        "model": bench.name, "offload": offload, "cap_gib": cap_gib, "predicted": predicted, "found": found,
        "found_is_limit": found == limit // step * step,
        "predicted_over_found": _ratio(predicted, found), "tries": tries, "steps_per_try": steps,
    }  # fmt: skip
    return summary, rows.get(found)


# ---- driver --------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    from qtrain.presets import PRESETS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=sorted(PRESETS), help=f"default: {' '.join(DEFAULT_MODELS)}")
    p.add_argument("--seq", type=int, default=2048, help="tokens per sequence of the fixed-length runs")
    p.add_argument("--steps", type=int, help="steps per fixed-length run, the first one not measured (default 3)")
    p.add_argument("--cap-gib", type=float, default=24.0, help="the card size to fit in, GiB")
    p.add_argument("--settings", nargs="+", choices=SETTINGS, help="default: all")
    p.add_argument(
        "--max-seq", type=int, help="upper end of the max-length search (default 131072; 32768 with --quick)"
    )
    p.add_argument("--search-steps", type=int, default=SEARCH_STEPS, help="steps per try of the max-length search")
    p.add_argument("--quick", action="store_true", help="Llama-3.1-8B only, 2 steps per run, search up to 32768")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    args.models = args.models or (["llama-3.1-8b"] if args.quick else DEFAULT_MODELS)
    args.steps = args.steps or (2 if args.quick else 3)
    args.settings = args.settings or SETTINGS
    args.max_seq = args.max_seq or (32768 if args.quick else 131072)
    if args.steps < 1 or args.search_steps < 1 or args.seq < 2 or args.max_seq < SEARCH_STEP:
        p.error(f"--steps and --search-steps must be >= 1, --seq >= 2, --max-seq >= {SEARCH_STEP}")
    return args


def _common():
    """benchmarks/_common.py, loaded by path (benchmarks/ is no package; the tests load this script by path)."""
    spec = importlib.util.spec_from_file_location("qtrain_benchmarks_common", Path(__file__).with_name("_common.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def git_state() -> dict:
    """{"commit": HEAD's short hash, "dirty": uncommitted changes or not} (benchmarks/_common.py)."""
    return _common().git_state(ROOT)


def git_commit() -> str:
    """HEAD's short hash, which result file names carry (benchmarks/e2e.py's too)."""
    return git_state()["commit"]


def gpu_slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def metadata(args, device: torch.device, dtype: torch.dtype, optimizer_name: str) -> dict:
    def version(module: str):
        try:
            return __import__(module).__version__
        except Exception:  # noqa: BLE001 - not installed or broken: record that
            return None

    chunk, _ = loss_path()
    cuda = device.type == "cuda"
    return {
        "gpu": torch.cuda.get_device_name(device) if cuda else device.type,
        "capability": ".".join(map(str, torch.cuda.get_device_capability(device))) if cuda else "-",
        "gpu_memory_gib": torch.cuda.get_device_properties(device).total_memory / GiB if cuda else 0.0,
        **git_state(),  # commit, dirty
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": version("triton"),
        "bitsandbytes": version("bitsandbytes"),
        "transformers": version("transformers"),
        "lora": LORA,
        "dtype": str(dtype).removeprefix("torch."),
        "optimizer": optimizer_name,
        "loss": describe_loss(chunk),
        "loss_chunk": chunk,
        "cap_gib": args.cap_gib,
        "steps": args.steps,
        "seq": args.seq,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }


def _allocated(device: torch.device) -> int | None:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


def run(args, device: torch.device | None = None, configs: dict | None = None, dtype: torch.dtype = torch.bfloat16,
        optimizer_name: str = OPTIMIZER, save=None) -> dict:  # fmt: skip
    """Every model of `args.models` in every setting of `args.settings`; `save(result)` is called after
    each setting (partial results survive a crash or a time limit). `device` (default: the current
    CUDA device), `configs` (name -> config; default: qtrain.presets), `dtype` and `optimizer_name` let
    the tests run this on CPU with a tiny model."""
    from qtrain.presets import preset_config

    # with an index: set_per_process_memory_fraction refuses a bare "cuda"
    device = device or torch.device("cuda", torch.cuda.current_device())
    configs = configs or {name: preset_config(name) for name in args.models}
    result = {
        "meta": metadata(args, device, dtype, optimizer_name),
        "models": {},
        "rows": [],
        "max_seq": [],
        "target_8gb": [],
    }
    rows, searches, models = result["rows"], result["max_seq"], result["models"]

    def checkpoint():
        result["target_8gb"] = target_8gb(rows)
        if save is not None:
            save(result)

    for name in args.models:
        print(f"## {name}", flush=True)
        try:
            bench = build_bench(name, configs[name], device, dtype, optimizer_name)
        except Exception as e:  # noqa: BLE001 - one model failing must not stop the others
            traceback.print_exc()
            rows.append({"model": name, "setting": "build", "seq": None, "error": f"{type(e).__name__}: {e}"})
            checkpoint()
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        models[name] = {
            "backend": bench.backend,
            "build_seconds": bench.build_seconds,
            "model_allocated": _allocated(device),
        }
        print(
            f"built in {bench.build_seconds:.1f}s, NF4 backend {bench.backend}, {_gib(_allocated(device))} GiB allocated",
            flush=True,
        )
        for setting in args.settings:
            offload = setting.endswith("+offload")
            try:
                if setting.startswith("max@cap"):
                    summary, row = max_seq_under_cap(bench, offload, args.cap_gib, args.search_steps, args.max_seq)
                    searches.append(summary)
                    print(SEARCH_HEADER + "\n" + format_search(summary), flush=True)
                    if row is not None:
                        rows.append(row)
                        print(format_row(row), flush=True)
                else:
                    rows.append(run_setting(bench, setting, args.seq, args.steps, offload, cap_gib=args.cap_gib))
                    print(format_row(rows[-1]), flush=True)
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                rows.append({"model": name, "setting": setting, "seq": None, "error": f"{type(e).__name__}: {e}"})
            free_memory(bench)  # here, once the exception and the frames it holds are gone
            checkpoint()
        del bench
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    checkpoint()
    return result


def target_8gb(rows: list[dict]) -> list[dict]:
    """The 8 GB claim: TARGET_8GB's model at its length, batch 1, with and without offload."""
    name, seq = TARGET_8GB
    out = []
    for r in rows:
        if (
            r.get("model") == name
            and r.get("seq") == seq
            and r.get("setting") in ("seq", "seq+offload")
            and not r.get("error")
        ):
            out.append({"setting": r["setting"], "peak_allocated": r["peak_allocated"], "device_used": r["device_used"],
                        "estimate_device_total": r["estimate_device_total"], "fits_8gb": r["fits_8gb"]})  # fmt: skip
    return out


# ---- output --------------------------------------------------------------------------------------------


def _gib(n) -> str:
    return "-" if n is None else f"{n / GiB:.2f}"


def _fmt(x, spec=".2f") -> str:
    return "-" if x is None else format(x, spec)


def _yes(x) -> str:
    return "-" if x is None else ("yes" if x else "no")


HEADER = (
    "| model | setting | seq | peak GiB | est. peak GiB | est/measured | GPU used GiB | est. GPU GiB | est/measured | tok/s | fits cap | fits 8 GB | note |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def format_row(r: dict) -> str:
    note = r.get("error") or ""
    if r.get("allocator_limit"):
        note = (note + "; " if note else "") + f"allocator limit {_gib(r['allocator_limit'])} GiB"
    return (
        f"| {r.get('model')} | {r.get('setting')} | {r.get('seq') or '-'} | {_gib(r.get('peak_allocated'))} | "
        f"{_gib(r.get('estimate_peak'))} | {_fmt(r.get('ratio_peak'))} | {_gib(r.get('device_used'))} | "
        f"{_gib(r.get('estimate_device_total'))} | {_fmt(r.get('ratio_device'))} | {_fmt(r.get('tokens_per_s'), '.0f')} | "
        f"{_yes(r.get('fits_cap'))} | {_yes(r.get('fits_8gb'))} | {note} |"
    )


SEARCH_HEADER = "| model | offload | cap GiB | predicted max seq | found max seq | predicted/found | tries (seq: fits) |\n|---|---|---|---|---|---|---|"


def format_search(s: dict) -> str:
    tries = ", ".join(f"{n}: {'y' if ok else 'n'}" for n, ok in s["tries"])
    found = f"≥ {s['found']}" if s["found_is_limit"] else str(s["found"])
    return (
        f"| {s['model']} | {_yes(s['offload'])} | {s['cap_gib']:g} | {s['predicted']} | {found} | "
        f"{_fmt(s['predicted_over_found'])} | {tries} |"
    )


def _row_key(r: dict) -> tuple:
    setting = r.get("setting")
    return r.get("model"), setting, None if str(setting).startswith("max@cap") else r.get("seq")


def merge_results(old: dict, new: dict) -> dict:
    """`new` over `old` (an earlier run on the same GPU, day and commit): rows of the same model,
    setting (and seq) and searches of the same model, offload and cap are replaced, others kept."""
    new_rows = {_row_key(r) for r in new["rows"]}
    new_searches = {(s["model"], s["offload"], s["cap_gib"]) for s in new["max_seq"]}
    rows = [r for r in old.get("rows", []) if _row_key(r) not in new_rows] + new["rows"]
    searches = [s for s in old.get("max_seq", []) if (s["model"], s["offload"], s["cap_gib"]) not in new_searches]
    meta = dict(new["meta"])
    meta["invocations"] = old["meta"].get("invocations", [old["meta"].get("args")]) + [new["meta"].get("args")]
    meta["dirty"] = bool(old["meta"].get("dirty") or new["meta"].get("dirty"))  # any rows from uncommitted code
    return {"meta": meta, "models": {**old.get("models", {}), **new["models"]}, "rows": rows,
            "max_seq": searches + new["max_seq"], "target_8gb": target_8gb(rows)}  # fmt: skip


def result_paths(meta: dict, out_dir: Path) -> tuple[Path, Path]:
    stem = f"memory-{gpu_slug(meta['gpu'])}-{meta['date'][:10]}-{meta['commit']}"
    return out_dir / f"{stem}.json", out_dir / f"{stem}.md"


class Saver:
    """`save(result)` for `run`: writes the result files, merged into those an earlier invocation
    wrote for the same GPU, day and commit (read once, when this invocation first saves), so that
    the benchmark can run one model or setting at a time and still give one table."""

    def __init__(self, out_dir: Path):
        self.out_dir, self.base, self.loaded = out_dir, None, False
        self.paths: tuple[Path, Path] | None = None

    def __call__(self, result: dict) -> tuple[Path, Path]:
        json_path = result_paths(result["meta"], self.out_dir)[0]
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


def write_results(result: dict, out_dir: Path, base: dict | None = None) -> tuple[Path, Path]:
    """JSON + Markdown under `out_dir`; `base`: an earlier result to merge this one into."""
    if base is not None:
        result = merge_results(base, result)
    meta = result["meta"]
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = result_paths(meta, out_dir)
    json_path.write_text(json.dumps(result, indent=1))
    cap = f"{meta['cap_gib']:g}"
    lines = [
        f"# QLoRA training memory on {meta['gpu']} (sm_{meta['capability'].replace('.', '')}, {meta['gpu_memory_gib']:.0f} GiB)",
        "",
        (
            f"commit {_common().describe_commit(meta)}, {meta['date']}; torch {meta['torch']}, triton {meta['triton']}, "
            f"bitsandbytes {meta['bitsandbytes']}, transformers {meta['transformers']}."
        ),
        (
            f"Random weights (qtrain.synthetic), NF4 base, bf16, LoRA r={LORA['rank']} alpha={LORA['alpha']:g} on all linears "
            f"(fp32), gradient checkpointing, {meta['optimizer']}, {meta['loss']}; batch 1 of random tokens; "
            f"{meta['steps']} steps per run, the first not measured."
        ),
        (
            "peak = torch.cuda.max_memory_allocated; GPU used = max_memory_reserved + memory outside torch's "
            "allocator (CUDA context, kernels, paged optimizer state); est. = qtrain.estimate (peak, device_total). "
            f"fits cap = GPU used <= {cap} GiB."
        ),
        "",
        HEADER,
        *map(format_row, result["rows"]),
    ]
    if result["max_seq"]:
        lines += [
            "",
            f"## Longest sequence that trains on a {cap} GiB card (multiples of {SEARCH_STEP})",
            "",
            f"The allocator may reserve {cap} GiB minus the memory outside it; {SEARCH_STEPS} steps per try.",
            "",
            SEARCH_HEADER,
            *map(format_search, result["max_seq"]),
        ]
    name, seq = TARGET_8GB
    lines += ["", f"## 8 GB target: {name}, seq {seq}, batch 1", ""]
    if result["target_8gb"]:
        for t in result["target_8gb"]:
            lines.append(
                f"- {t['setting']}: peak {_gib(t['peak_allocated'])} GiB, GPU used {_gib(t['device_used'])} GiB "
                f"(estimated {_gib(t['estimate_device_total'])} GiB): {'fits' if t['fits_8gb'] else 'does not fit'} in 8 GiB"
            )
    else:
        lines.append("- not measured in this run")
    md_path.write_text("\n".join(lines) + "\n")
    return json_path, md_path


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/memory.py needs a CUDA GPU (torch.cuda.is_available() is False): nothing measured.")
        return 0
    print(HEADER)
    save = Saver(args.out)
    run(args, save=save)
    for path in save.paths or ():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
