"""CPU training speed and step memory: qtrain against transformers + bitsandbytes NF4 + PEFT, side by side.

    python benchmarks/cpu.py                                  # the six settings of issue 14, one thread (~10 min)
    python benchmarks/cpu.py --settings 1x64:fp32 4x256:bf16 --rounds 3
    python benchmarks/cpu.py --threads 2

Both stacks train the same random Llama (hidden 512, 4 layers, 8 heads, intermediate 1536, vocab
32,000), built as benchmarks/e2e.py builds its stacks: the same NF4 codes of the same weights (e2e's
`baseline` quantizes them with bitsandbytes as `from_pretrained(..., BitsAndBytesConfig(nf4, double
quant))` does, qtrain with its own bit-identical quantizer), LoRA r=16 alpha=32 on every linear but
lm_head with the same init, non-reentrant gradient checkpointing of every decoder layer, torch AdamW,
clipping 1.0, the same random batches (labels = input_ids). fp32 runs in fp32; bf16 holds the base in
bf16 under bf16 autocast (fp32 adapters), as `qtrain train model.dtype=bf16` does.

Per setting (batch x seq : dtype), after --warmup unmeasured steps of each, the stacks take turns step
by step (ABBA order, so that a drift of the machine's speed hits both alike) for --rounds steps each.
Reported: the median step time, tokens/s, the ratio qtrain / baseline (above 1: qtrain is faster),
the step memory of each (the most bytes the CPU allocator held during one more step above what it
held before it: activations, gradients, temporaries; weights and optimizer state, allocated
earlier, are not counted; measured from the torch profiler's allocator events, untimed), its ratio
(below 1: qtrain needs less), and the largest difference between the two stacks' losses on the same
batches (same weights, init and data: an end-to-end agreement check).

Writes benchmarks/results/cpu-<cpu>-<date>-<commit>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import importlib.metadata
import importlib.util
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20
STACKS = ("baseline", "qtrain")
DEFAULT_SETTINGS = ["4x256:fp32", "4x256:bf16", "1x2048:fp32", "1x2048:bf16", "2x128:fp32", "1x64:fp32"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODELS = {  # LlamaConfig keyword arguments
    "llama-512": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=8, vocab_size=32000),  # fmt: skip
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),  # fmt: skip (for the test of this script)
}


@functools.cache
def _sibling(name: str):
    """benchmarks/<name>.py as a module, loaded by path (benchmarks/ is no package; the tests load
    this script by path too)."""
    spec = importlib.util.spec_from_file_location(f"qtrain_benchmark_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def e2e():
    """benchmarks/e2e.py: its stacks are the ones timed here."""
    return _sibling("e2e")


def _common():
    """benchmarks/_common.py: commit, CPU name, result files."""
    return _sibling("_common")


def model_config(name: str):
    from transformers import LlamaConfig

    return LlamaConfig(**MODELS[name], max_position_embeddings=4096)


def parse_setting(text: str) -> tuple[int, int, str]:
    """"4x256:bf16" -> (4, 256, "bf16")."""
    m = re.fullmatch(r"(\d+)x(\d+):(fp32|bf16)", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r}: expected BATCHxSEQ:DTYPE, e.g. 4x256:fp32 or 1x2048:bf16")
    return int(m[1]), int(m[2]), m[3]


def build(stack: str, config, dtype: torch.dtype):
    return e2e().build_stack(stack, "cpu", config, torch.device("cpu"), dtype, "adamw", "auto")


def timed_step(stack, batch: dict) -> tuple[float, float]:
    """(seconds, loss) of one optimizer step."""
    t0 = time.perf_counter()
    loss, _ = stack.step(stack, batch, None)
    return time.perf_counter() - t0, loss


def step_memory(stack, batch: dict) -> int:
    """Most bytes allocated during one step above what was allocated before it (CPU allocator events)."""
    from qtrain.memprof import cpu_peak_bytes

    return cpu_peak_bytes(lambda: stack.step(stack, batch, None))[0]


def run_setting(config, batch: int, seq: int, dtype_name: str, rounds: int, warmup: int) -> dict:
    """Both stacks on one setting, step by step in turns; see the module docstring."""
    dtype, vocab = DTYPES[dtype_name], config.vocab_size
    stacks = {name: build(name, config, dtype) for name in STACKS}
    seconds = {name: [] for name in STACKS}
    losses = {name: [] for name in STACKS}
    for r in range(warmup + rounds):
        data = e2e().random_batch(vocab, batch, seq, seed=r)
        for name in STACKS if r % 2 == 0 else STACKS[::-1]:
            t, loss = timed_step(stacks[name], data)
            losses[name].append(loss)
            if r >= warmup:
                seconds[name].append(t)
    data = e2e().random_batch(vocab, batch, seq, seed=warmup + rounds)
    row = {"setting": f"{batch}x{seq}:{dtype_name}", "batch": batch, "seq": seq, "dtype": dtype_name}
    for name in STACKS:
        step = statistics.median(seconds[name])
        row[name] = {"step_seconds": step, "tokens_per_s": batch * seq / step, "all_step_seconds": seconds[name],
                     "losses": losses[name], "step_memory_bytes": step_memory(stacks[name], data)}  # fmt: skip
    row["speed_ratio"] = row["qtrain"]["tokens_per_s"] / row["baseline"]["tokens_per_s"]
    row["memory_ratio"] = row["qtrain"]["step_memory_bytes"] / row["baseline"]["step_memory_bytes"]
    row["max_loss_diff"] = max(abs(a - b) for a, b in zip(losses["qtrain"], losses["baseline"]))
    return row


def metadata(args) -> dict:
    common = _common()
    versions = {}
    for dist in ("torch", "transformers", "bitsandbytes", "peft"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        **common.git_state(ROOT),  # commit, dirty
        "cpu": common.cpu_name(),
        "cpu_flags": common.cpu_flags(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "model": args.model,
        "model_config": MODELS[args.model],
        "lora": "r=16 alpha=32, every linear but lm_head",
        "rounds": args.rounds,
        "warmup": args.warmup,
        **versions,
    }


def _mib(n: int) -> str:
    return f"{n / MiB:,.1f}"


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [
        f"# CPU training: qtrain vs transformers + bitsandbytes NF4 + PEFT ({meta['date'][:10]}, commit {_common().describe_commit(meta)})",
        "",
        f"{meta['cpu']}, {meta['threads']} thread(s); torch {meta['torch']}, transformers {meta['transformers']}, "
        f"bitsandbytes {meta['bitsandbytes']}, peft {meta['peft']}. Model `{meta['model']}` {meta['model_config']}; "
        f"LoRA {meta['lora']}; checkpointing; AdamW; median of {meta['rounds']} steps per stack, in turns.",
        "",
        "| setting | baseline tok/s | qtrain tok/s | speed (qtrain / baseline) | baseline step MiB | qtrain step MiB "
        "| memory (qtrain / baseline) | max loss diff |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        b, q = r["baseline"], r["qtrain"]
        lines.append(
            f"| {r['setting']} | {b['tokens_per_s']:,.0f} | {q['tokens_per_s']:,.0f} | {r['speed_ratio']:.2f}x "
            f"| {_mib(b['step_memory_bytes'])} | {_mib(q['step_memory_bytes'])} | {r['memory_ratio']:.2f}x "
            f"| {r['max_loss_diff']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", type=parse_setting, default=[parse_setting(s) for s in DEFAULT_SETTINGS],
                   metavar="BxS:DTYPE", help=f"default: {' '.join(DEFAULT_SETTINGS)}")  # fmt: skip
    p.add_argument("--rounds", type=int, default=9, help="measured steps per stack and setting (default 9)")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured steps per stack first (default 2)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1; 0: torch's default)")
    p.add_argument("--model", choices=sorted(MODELS), default="llama-512")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0:
        p.error("--rounds must be >= 1 and --warmup >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = model_config(args.model)
    result = {"meta": metadata(args), "rows": []}
    for batch, seq, dtype_name in args.settings:
        row = run_setting(config, batch, seq, dtype_name, args.rounds, args.warmup)
        result["rows"].append(row)
        b, q = row["baseline"], row["qtrain"]
        print(f"{row['setting']:>12}: baseline {b['tokens_per_s']:8,.0f} tok/s {_mib(b['step_memory_bytes']):>8} MiB | "
              f"qtrain {q['tokens_per_s']:8,.0f} tok/s {_mib(q['step_memory_bytes']):>8} MiB | "
              f"speed {row['speed_ratio']:.2f}x memory {row['memory_ratio']:.2f}x | max loss diff {row['max_loss_diff']:.1e}",
              flush=True)  # fmt: skip
        paths = _common().write_results(result, args.out, "cpu", markdown(result))  # after every setting
    print(f"results: {paths[0]} and {paths[1].name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
