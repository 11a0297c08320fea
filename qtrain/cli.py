"""`qtrain` command line: train, memory (estimate, profile), merge, generate, kernels tune.

Only the standard library is imported here: torch, transformers and qtrain's modules load inside
the subcommand that needs them, so `qtrain --help` and usage errors answer at once.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DTYPE_NAMES = ("bf16", "fp16", "fp32")  # the keys of qtrain.config.DTYPES (which imports torch)
NO_CONFIG = "give a config file, e.g. qtrain train configs/quickstart.yaml"


def _train(args: argparse.Namespace) -> int:
    if args.config is None:
        args.usage_error(NO_CONFIG)  # exits 2, before torch is imported
    from qtrain.config import load_config

    overrides = list(args.overrides)
    if args.resume is not None and "=" in args.resume and not Path(args.resume).exists():
        overrides.append(args.resume)  # `--resume key=value`: argparse took an override for the checkpoint
        args.resume = "auto"
    if args.resume is not None:
        overrides.append(f"checkpoint.resume={args.resume}")
    cfg = load_config(args.config, overrides)  # fails on bad keys before anything loads
    from qtrain.train import Interrupted, OutOfMemory, StorageError, train

    again = f"qtrain train {args.config} {' '.join(args.overrides)} --resume".replace("  ", " ")
    try:
        train(cfg, profile_memory=args.profile_memory, overwrite=args.overwrite)
    except Interrupted as e:
        print(f"qtrain train: {e}; continue with: {again}")
        return 130  # the shell convention for Ctrl-C
    except KeyboardInterrupt:  # a second Ctrl-C: stopped at once, mid-step; checkpoints are whole or absent
        print(f"\nqtrain train: stopped at once (second Ctrl-C); {_resume_hint(cfg.output_dir, again)}", file=sys.stderr)
        return 130
    except (OutOfMemory, StorageError) as e:
        print(f"qtrain train: error: {e}", file=sys.stderr)
        return 2
    return 0


def _quiet_exit_on_ctrl_c() -> None:
    """The command is done: a Ctrl-C from here on (while the interpreter's shutdown waits for
    threads) exits at once with 130 instead of printing a traceback. For the process (`qtrain`), not
    for callers of main()."""
    import os
    import signal

    def leave(signum, frame):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)

    signal.signal(signal.SIGINT, leave)


def _resume_hint(output_dir: str, again: str) -> str:
    from qtrain.resume import last_good_checkpoint, list_checkpoints, run_of

    found = list_checkpoints(Path(output_dir))
    good = found and last_good_checkpoint(Path(output_dir), run_of(found[-1]) or "")
    return f"continue from {good} with: {again}" if good else "no checkpoint was saved yet: run it again"


BUDGETS_GIB = (8, 12, 16, 24)


def _memory_estimate(args: argparse.Namespace) -> int:
    """`qtrain memory estimate`: from a config (+ overrides), or from --model and flags."""
    import json
    from dataclasses import replace

    from rich.console import Console
    from rich.table import Table

    from qtrain.config import load_config
    from qtrain.estimate import GiB, carries_mask, estimate, estimate_table, fmt_gib, max_seq_len, workload_for
    from qtrain.presets import resolve_config
    from qtrain.tiny import tiny_config

    if args.config is not None and "=" in args.config and not Path(args.config).exists():
        args.overrides.insert(0, args.config)  # `qtrain memory estimate lora.rank=8 --model ...`: no config file
        args.config = None
    if args.config is None and args.model is None:
        raise ValueError("give a config (qtrain memory estimate configs/llama-3.1-8b.yaml) or --model ID_OR_PATH")
    model_keys = [f"model.name_or_path={args.model}", "model.tiny=null"] if args.model else []
    cfg = load_config(args.config, [*args.overrides, *model_keys])
    model = cfg.model.name_or_path
    if model is not None:
        config = resolve_config(model)
    else:
        tiny = cfg.model.tiny
        config = tiny_config(tiny.arch, tiny.hidden_size, tiny.intermediate_size, tiny.num_layers, tiny.num_heads, tiny.num_kv_heads)
        model = "tiny " + tiny.arch
    if args.rank is not None:  # --rank: the lora section's rank, alpha scaled with it (used when the run has LoRA)
        cfg.lora.rank, cfg.lora.alpha = args.rank, cfg.lora.alpha * args.rank / cfg.lora.rank
    w = workload_for(cfg, args.device, config=config)
    # a multi-GPU config (distributed.strategy ddp or fsdp) is estimated per rank of 2 unless --nproc says
    strategy = args.strategy or (cfg.distributed.strategy if cfg.distributed.strategy != "auto" else None)
    nproc = args.nproc if args.nproc is not None else (2 if strategy else None)
    flags = {
        "seq_len": args.seq,
        "batch_size": args.batch,
        "optimizer": args.optimizer,
        "gradient_checkpointing": False if args.no_checkpointing else None,
        "offload_activations": True if args.offload else None,
        "ranks": nproc,
        "strategy": strategy,
    }
    if nproc is not None and (nproc < 1 or (nproc > 1 and strategy is None)):
        raise ValueError(f"--nproc {nproc}: give a number of processes >= 1, and with more than one --strategy ddp or fsdp")
    w = replace(w, **{k: v for k, v in flags.items() if v is not None})
    w = replace(w, attention_mask=carries_mask(cfg.data.packing, w.batch_size, w.fused))
    est = estimate(config, None, w)
    fits = {b: max_seq_len(config, None, w, b * GiB) for b in args.budgets}
    beside = {}  # a preference objective: the SFT step of the same examples and the two-model stack beside it
    if w.objective != "sft":
        beside = {"sft_device_total_bytes": estimate(config, None, replace(w, objective="sft")).device_total}
        if w.objective in ("dpo", "kto"):
            beside["two_model_device_total_bytes"] = estimate(config, None, replace(w, reference_copy=True)).device_total
    if args.json:
        print(json.dumps({"model": model, **est.to_dict(), **beside, "max_seq_len": {f"{b}GiB": n for b, n in fits.items()}}, indent=2))
        return 0
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)  # files and pipes: no wrapping
    method = " + ".join(m.describe() for m in w.methods)
    what = f"{model}: {method}, batch {w.batch_size} x {w.seq_len} tokens, {str(w.dtype).removeprefix('torch.')}, "
    what += f"{'NF4' if w.quantize else '16-bit'} base, {w.backend} kernels, checkpointing {'on' if w.gradient_checkpointing else 'off'}"
    what += (", offload on" if w.offload_activations else "") + f", {w.optimizer}, on {w.device}"
    what += f", per rank of {w.ranks} ({w.strategy})" if w.ranks > 1 else ""
    console.print(what, soft_wrap=True)  # one line, however long
    console.print(estimate_table(est, title=None))
    if beside:
        rows = "2 x " if w.objective in ("dpo", "orpo", "simpo") else ""
        line = f"{w.objective}: {fmt_gib(est.device_total)} GPU total for {w.batch_size} x {rows}{w.seq_len} tokens (reference: the adapter switched off); "
        line += f"SFT of {w.batch_size} x {w.seq_len} tokens {fmt_gib(beside['sft_device_total_bytes'])}"
        if "two_model_device_total_bytes" in beside:
            line += f"; with a second copy of the base as the reference model {fmt_gib(beside['two_model_device_total_bytes'])}"
        console.print(line, soft_wrap=True)
    table = Table(title=f"longest seq_len that fits (batch {w.batch_size})", title_justify="left")
    table.add_column("GPU memory")
    table.add_column("max seq_len", justify="right")
    table.add_column(f"at seq_len {w.seq_len}")
    for b, n in fits.items():
        table.add_row(f"{b} GiB", f"{n:,}" if n else "does not fit", "fits" if est.device_total <= b * GiB else f"needs {fmt_gib(est.device_total)}")
    console.print(table)
    return 0


def _memory_profile(args: argparse.Namespace) -> int:
    """`qtrain memory profile CONFIG`: a few real training steps, measured, and the report."""
    import tempfile

    from qtrain.config import load_config
    from qtrain.train import train

    overrides = list(args.overrides) + [
        f"train.max_steps={args.steps}",
        "eval.exact_match=false",
        "eval.every=0",
        "eval.samples=[]",
        "data.eval=null",
        "data.eval_fraction=0",
        "data.num_eval=0",
        "checkpoint.every=0",
        "log.tensorboard=false",
        "log.plot=false",
    ]
    cfg = load_config(args.config, overrides)
    report_dir = Path(args.output_dir or Path(cfg.output_dir) / "memory-profile")
    # The measured steps are a run of their own: its files (config, metrics, a tiny base) go to a
    # temporary folder, never over the run in output_dir; the report alone is kept.
    with tempfile.TemporaryDirectory(prefix="qtrain-memory-profile-") as run_dir:
        cfg.output_dir = run_dir
        result = train(cfg, profile_memory=args.steps, report_dir=report_dir, profile_only=True)
    print(f"memory report: {result['memory_report']}")
    return 0


def _merge(args: argparse.Namespace) -> int:
    from qtrain.adapter import merge_adapter
    from qtrain.config import DTYPES

    out = merge_adapter(
        args.base, args.adapter, args.out, dtype=DTYPES[args.dtype], base_weights=args.base_weights, force=args.force
    )
    print(f"merged checkpoint written to {out}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from qtrain.config import DTYPES
    from qtrain.export import export

    r = export(
        args.base, args.adapter, args.out, fmt=args.format, gguf_types=tuple(args.gguf_type), dtype=DTYPES[args.dtype],
        base_weights=args.base_weights, check_tokens=args.check_tokens,
    )  # fmt: skip
    print(f"exported to {r.out}: {', '.join(p.name for p in r.files)}")
    if r.logit_diff is not None:
        print(f"max |logit difference| merged ({args.base_weights} base) vs base + adapter: {r.logit_diff:.3g} "
              f"(first {args.check_tokens} tokens; merged weights in {args.dtype})")  # fmt: skip
    return 0


BASE_WEIGHTS_HELP = (
    "nf4 (default): merge into the base as training saw it, every linear layer but lm_head "
    "NF4-quantized and dequantized (the merged model computes what the trained one did); "
    "original: merge into the checkpoint's own 16-bit weights (what most users expect, but the adapter was "
    "not trained against them: outputs shift by about the NF4 error; the command reports by how much)"
)


def _generate(args: argparse.Namespace) -> int:
    import json

    import torch
    from rich.console import Console
    from rich.markup import escape
    from rich.text import Text

    from qtrain.generate import Prompt, check_options, complete, load_for_inference, read_prompts_file, resolve_template

    check_options(args.max_new_tokens, args.temperature, args.batch_size)
    prompts = [Prompt(text, extra) for text, extra in args.prompt or []]
    if args.prompts_file:
        prompts += read_prompts_file(args.prompts_file)
    interactive = not prompts and sys.stdin.isatty()
    if not prompts and not interactive:  # `echo hi | qtrain generate ...`: one prompt per line
        prompts = [Prompt.from_line(line) for line in sys.stdin.read().splitlines() if line.strip()]
        if not prompts:
            raise ValueError("no prompts: give --prompt TEXT, --prompts-file FILE, or prompts on stdin, one per line")
    model, tokenizer, info = load_for_inference(
        args.adapter, args.base, device=args.device, dtype=args.dtype, backend=args.backend, base_only=args.base_only
    )
    template = resolve_template(args.template, info)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    what = "base only (adapter not applied)" if args.base_only else f"adapter {escape(info['adapter'])}"
    err.print(
        f"[bold]generate[/] {what} on {escape(info['base'])} ({'NF4' if info['quantized'] else info['dtype']} base, "
        f"{info['dtype']} compute) on {info['device']}; template {template}",
        markup=True,
    )
    out = Console(highlight=False, soft_wrap=True)

    def show(pairs) -> None:
        torch.manual_seed(args.seed)  # sampling (--temperature > 0) is reproducible
        for prompt, completion in pairs:
            text = prompt.text + (f"\n\n{prompt.input}" if prompt.input else "")
            if args.json:
                print(json.dumps({"prompt": text, "completion": completion}), flush=True)
            else:
                out.print(Text("▶ prompt", style="bold cyan"))
                out.print(Text(text))
                out.print(Text("◀ completion", style="bold green"))
                out.print(Text(completion))
                out.print()

    options = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "batch_size": args.batch_size}
    if not interactive:
        show(complete(model, tokenizer, prompts, template, **options))
        return 0
    err.print("type a prompt and press Enter; Ctrl-D to quit", style="dim")
    for line in sys.stdin:
        if line.strip():
            show(complete(model, tokenizer, [Prompt.from_line(line)], template, **options))
    return 0


def _shape(text: str) -> tuple[int, int]:
    """`--shapes N,K`: an NF4 weight's [N, K]."""
    n, _, k = text.partition(",")
    if not (n.strip().isdigit() and k.strip().isdigit() and int(n) > 0 and int(k) > 0):
        raise argparse.ArgumentTypeError(f"expected N,K (two positive integers, e.g. 4096,4096), got {text!r}")
    return int(n), int(k)


def _tune_shapes(args: argparse.Namespace) -> dict[str, tuple[int, int]]:
    """{name: (N, K)} from --shapes, else the projections of --model (a preset, Hub id or checkpoint)."""
    if args.shapes:
        return {f"{n}x{k}": (n, k) for n, k in args.shapes}
    from qtrain.kernels.nf4_dispatch import projection_shapes
    from qtrain.presets import resolve_config

    c = resolve_config(args.model)
    return projection_shapes(c.hidden_size, c.intermediate_size, c.num_attention_heads,
                             getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
                             getattr(c, "head_dim", None))  # fmt: skip


def _kernels_tune(args: argparse.Namespace) -> int:
    """`qtrain kernels tune`: measure the NF4 path crossovers on this GPU and cache them."""
    import torch

    if not torch.cuda.is_available():
        print("qtrain kernels tune: needs a CUDA GPU (torch.cuda.is_available() is False); nothing was measured", file=sys.stderr)
        return 1
    from qtrain.kernels.nf4_dispatch import cache_path, tune

    shapes = _tune_shapes(args)
    device = torch.device("cuda", torch.cuda.current_device())
    results = tune(device, dict.fromkeys(shapes.values()), rank=args.rank, rep_ms=args.ms_budget)
    print(f"{torch.cuda.get_device_name(device)}: NF4+LoRA paths by rows M (rank {args.rank}, bf16)")
    print(f"{'projection':<12} {'N x K':>13} {'gemv':>9} {'fused':>13} {'dequant':>10}")
    for name, (n, k) in shapes.items():
        r = results[n, k]
        gemv = f"M<={r['gemv_max_m']}" if r["gemv_max_m"] else "-"
        fused = f"{r['gemv_max_m'] + 1}-{r['crossover'] - 1}" if r["crossover"] > r["gemv_max_m"] + 1 else "-"
        dequant = f"M>={r['crossover']}"
        print(f"{name:<12} {f'{n}x{k}':>13} {gemv:>9} {fused:>13} {dequant:>10}")
    print(f"saved to {cache_path(device)}")
    return 0


class _PromptAction(argparse.Action):
    """`--prompt TEXT`: a new [text, input] pair in namespace.prompt."""

    def __call__(self, parser, namespace, value, option_string=None):
        namespace.prompt = [*(namespace.prompt or []), [value, ""]]


class _InputAction(argparse.Action):
    """`--input TEXT`: the input of the --prompt just before it (an alpaca row's input)."""

    def __call__(self, parser, namespace, value, option_string=None):
        if not namespace.prompt or namespace.prompt[-1][1]:
            parser.error("--input TEXT belongs to the --prompt before it: --prompt 'Is this number even or odd?' --input 42")
        namespace.prompt[-1][1] = value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qtrain", description="Low-VRAM QLoRA fine-tuning.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser(
        "train",
        help="fine-tune from a YAML config",
        description="qtrain train CONFIG.yaml [key.sub=value ...]",
        usage="%(prog)s CONFIG [key.sub=value ...] [--resume [CHECKPOINT] | --overwrite] [--profile-memory [STEPS]]",
    )
    t.add_argument("config", nargs="?", help="YAML config, e.g. configs/quickstart.yaml")  # missing: NO_CONFIG
    t.add_argument("overrides", nargs="*", help="overrides such as train.max_steps=50 lora.rank=8")
    t.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        metavar="CHECKPOINT",
        help="continue from the newest checkpoint in output_dir (or from CHECKPOINT, a checkpoint dir)",
    )
    t.add_argument(
        "--profile-memory",
        nargs="?",
        type=int,
        const=3,
        default=0,
        metavar="STEPS",
        help="measure the first STEPS steps (default 3) and write a memory report to output_dir/memory",
    )
    t.add_argument(
        "--overwrite",
        action="store_true",
        help="output_dir holds a finished or stopped run: move it aside to OUTPUT_DIR.old-DATE-TIME (nothing is deleted) and start afresh",
    )
    t.set_defaults(func=_train, usage_error=t.error)

    mem = sub.add_parser("memory", help="will it fit? estimate or measure training memory")
    msub = mem.add_subparsers(dest="memory_command", required=True)
    e = msub.add_parser(
        "estimate",
        help="analytic peak-memory breakdown (no GPU, no weights)",
        description="qtrain memory estimate [CONFIG] [key=value ...] [--model ID] [--seq N] ...; flags override the config",
    )
    e.add_argument("config", nargs="?", help="YAML config (default: the built-in defaults)")
    e.add_argument("overrides", nargs="*", help="config overrides such as lora.rank=8 data.max_length=4096")
    e.add_argument("--model", metavar="ID_OR_PATH", help="Hub id, checkpoint dir, config.json, or a preset: llama-2-7b, llama-3.1-8b, mistral-7b, qwen2.5-7b")
    e.add_argument("--rank", type=int, help="LoRA rank (alpha scales with it)")
    e.add_argument("--seq", type=int, help="sequence length (default: data.max_length)")
    e.add_argument("--batch", type=int, help="micro-batch size (default: train.batch_size)")
    e.add_argument("--optimizer", choices=("adamw", "paged_adamw_32bit", "paged_adamw_8bit"))
    e.add_argument("--no-checkpointing", action="store_true", help="gradient checkpointing off")
    e.add_argument("--offload", action="store_true", help="offload checkpointed activations to CPU RAM")
    e.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="where training runs (default cuda)")
    e.add_argument("--nproc", type=int, help="processes (GPUs) of a torchrun launch: the estimate is per rank (default 2 for a ddp or fsdp config)")
    e.add_argument("--strategy", choices=("ddp", "fsdp"), help="ddp (the model on every rank) or fsdp (sharded); default: the config's distributed.strategy")
    e.add_argument("--budgets", type=int, nargs="+", default=list(BUDGETS_GIB), metavar="GIB", help="GPU sizes for the max seq_len table")
    e.add_argument("--json", action="store_true", help="print the estimate as JSON")
    e.set_defaults(func=_memory_estimate)
    pr = msub.add_parser(
        "profile",
        help="run a few real training steps and write a memory report (HTML, Markdown, PNG)",
        description="qtrain memory profile CONFIG [key=value ...] [--steps N]",
    )
    pr.add_argument("config", help="YAML config, e.g. configs/quickstart.yaml")
    pr.add_argument("overrides", nargs="*", help="overrides such as data.max_length=4096")
    pr.add_argument("--steps", type=int, default=3, help="training steps measured (default 3; the first includes optimizer set-up)")
    pr.add_argument("--output-dir", help="where the report goes (default: OUTPUT_DIR/memory-profile); nothing else is written")
    pr.set_defaults(func=_memory_profile)

    m = sub.add_parser(
        "merge",
        help="merge a LoRA/DoRA adapter into a standalone 16-bit checkpoint",
        description="qtrain merge --base PATH_OR_ID --adapter DIR --out DIR: adds a LoRA (or DoRA) adapter's "
        "update to its base model's weights and writes a standalone 16-bit checkpoint (safetensors, config, "
        "tokenizer) that transformers' AutoModelForCausalLM.from_pretrained loads without qtrain or PEFT. "
        "Only LoRA and DoRA adapters merge; an adapter that holds other methods (IA3, AdaLoRA, bottleneck "
        "adapters, prompt or prefix tuning, ...) does not: run it with qtrain generate --adapter DIR.",
    )
    m.add_argument("--base", required=True, metavar="PATH_OR_ID", help="base model directory or Hub id (the one the adapter was trained on)")
    m.add_argument("--adapter", required=True, metavar="DIR", help="LoRA/DoRA adapter directory in PEFT format (e.g. runs/quickstart/adapter)")
    m.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="output folder for the merged checkpoint: new, empty, or a previous merge's (else --force)",
    )
    m.add_argument("--dtype", choices=DTYPE_NAMES, default="bf16", help="dtype of the merged weights (default bf16)")
    m.add_argument(
        "--base-weights",
        choices=("nf4", "original"),
        default="nf4",
        help="nf4 (default): merge into the base as training saw it, every linear layer but lm_head "
        "NF4-quantized and dequantized (the merged model computes what the trained one did); "
        "original: merge into the checkpoint's own 16-bit weights (what the adapter was not trained against)",
    )
    m.add_argument(
        "--force",
        action="store_true",
        help="merge into a non-empty --out that is not a previous merge; only the files a merge writes "
        "(model*.safetensors, index, config.json, generation_config.json, tokenizer files) are replaced there, "
        "the rest stays",
    )
    m.set_defaults(func=_merge)

    x = sub.add_parser(
        "export",
        help="base + adapter -> a merged Hugging Face checkpoint, or GGUF files + an Ollama Modelfile",
        description="qtrain export --base PATH --adapter DIR --out DIR [--format hf|gguf]: hf writes the merged "
        "16-bit checkpoint (sharded safetensors + index, config, tokenizer, chat template, generation config) "
        "that transformers, vLLM and TGI load; gguf writes one GGUF per --gguf-type (tokenizer and chat template "
        "inside) and an Ollama Modelfile, for llama.cpp, Ollama (ollama create NAME -f OUT/Modelfile) and LM "
        "Studio. Streamed: host RAM stays about one tensor plus one shard. OUT must be new or empty. Only LoRA "
        "and DoRA adapters merge; others are refused by name. Without --adapter the base itself is exported.",
    )
    x.add_argument("--base", required=True, metavar="PATH_OR_ID", help="base model directory or Hub id")
    x.add_argument("--adapter", metavar="DIR", help="LoRA/DoRA adapter directory (omit: convert the base alone)")
    x.add_argument("--out", required=True, metavar="DIR", help="output folder: new or empty")
    x.add_argument("--format", choices=("hf", "gguf"), default="hf", help="hf (default) or gguf")
    x.add_argument(
        "--gguf-type",
        nargs="+",
        choices=("f16", "bf16", "q8_0", "q4_0"),
        default=["q8_0"],
        help="GGUF types to write (default q8_0); q4_0 keeps embeddings and output in q8_0",
    )
    x.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16", help="dtype of the merged weights (default bf16)")
    x.add_argument("--base-weights", choices=("nf4", "original"), default="nf4", help=BASE_WEIGHTS_HELP)
    x.add_argument(
        "--check-tokens",
        type=int,
        default=8,
        metavar="N",
        help="at the end, run base + adapter and the merged model on N tokens on the CPU and print the largest "
        "logit difference (default 8; 0: skip, e.g. when the model does not fit twice in host RAM)",
    )
    x.set_defaults(func=_export)

    g = sub.add_parser(
        "generate",
        help="complete prompts with a base model + a trained adapter (any method qtrain trains)",
        description="qtrain generate --adapter DIR [--prompt TEXT ...]: loads the base model as it was held in "
        "training, applies the adapter qtrain train wrote (LoRA, DoRA and every other method: IA3, AdaLoRA, "
        "bottleneck adapters, prompt and prefix tuning, ...) and completes the prompts. Without "
        "--prompt/--prompts-file, prompts are read from stdin, one per line, PROMPT or PROMPT<tab>INPUT "
        "(printf 'Is this number even or odd?\\t42\\n' | qtrain generate --adapter DIR)",
    )
    g.add_argument(
        "--adapter",
        required=True,
        metavar="DIR",
        help="the adapter directory qtrain train wrote (e.g. runs/quickstart/adapter): LoRA/DoRA in PEFT format "
        "and the other methods in their subfolders",
    )
    g.add_argument(
        "--base",
        metavar="PATH_OR_ID",
        help="base model directory or Hub id (default: the adapter's base_model_name_or_path)",
    )
    g.add_argument("--prompt", action=_PromptAction, metavar="TEXT", help="a prompt (repeat for several)")
    g.add_argument(
        "--input",
        action=_InputAction,
        metavar="TEXT",
        help="the input of the --prompt before it, as in an alpaca row (instruction + input)",
    )
    g.add_argument(
        "--prompts-file",
        metavar="FILE",
        help='one prompt per line, or .jsonl with a "prompt" or "instruction" (+ optional "input") per line',
    )
    g.add_argument(
        "--template",
        choices=("auto", "alpaca", "chat", "none"),
        default="auto",
        help="how prompts are rendered: auto = the adapter's training data format (alpaca if not recorded); "
        "none = the prompt as is",
    )
    g.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="default 128")
    g.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 (default): greedy; > 0: sampling")
    g.add_argument("--seed", type=int, default=0, metavar="N", help="random seed for sampling (default 0)")
    g.add_argument("--batch-size", type=int, default=8, metavar="N", help="prompts generated together (default 8)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    g.add_argument(
        "--dtype", choices=DTYPE_NAMES, help="compute dtype (default: the one the adapter was trained with)"
    )
    g.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto", help="NF4 + LoRA kernels")
    g.add_argument(
        "--base-only", action="store_true", help="the base alone, without the adapter's weights (to compare)"
    )
    g.add_argument("--json", action="store_true", help="print one JSON line {prompt, completion} per prompt")
    g.set_defaults(func=_generate)

    kern = sub.add_parser("kernels", help="the NF4 kernels: measure where each path wins on this GPU")
    ksub = kern.add_subparsers(dest="kernels_command", required=True)
    kt = ksub.add_parser(
        "tune",
        help="time the GEMV / fused / dequant+cuBLAS NF4 paths per weight shape and cache the crossovers",
        description="qtrain kernels tune [--model NAME | --shapes N,K ...]: times the three NF4+LoRA paths "
        "(forward + backward, bf16) at a range of rows M for each weight shape and caches, per GPU, from "
        "which M each path runs (under $XDG_CACHE_HOME/qtrain/kernels, default ~/.cache). Needs a CUDA GPU.",
    )
    which = kt.add_mutually_exclusive_group()
    which.add_argument("--model", default="llama-3.1-8b", metavar="NAME", help="the projections of this model (a preset, Hub id or checkpoint; default llama-3.1-8b)")
    which.add_argument("--shapes", type=_shape, nargs="+", metavar="N,K", help="weight shapes [N, K] to measure instead, e.g. 4096,4096 28672,4096")
    kt.add_argument("--rank", type=int, default=16, help="LoRA rank of the measured adapter (default 16)")
    kt.add_argument("--ms-budget", type=float, default=100.0, metavar="MS", help="milliseconds of timing per path and M (default 100)")
    kt.set_defaults(func=_kernels_tune)
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args, extra = p.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra  # overrides after an option (`--resume CHECKPOINT k=v`, `--steps 2 k=v`)
    elif extra:
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, FloatingPointError) as e:  # qtrain.config.ConfigError is a ValueError
        print(f"qtrain {args.command}: error: {e}", file=sys.stderr)
        return 2
    finally:
        if argv is None:
            _quiet_exit_on_ctrl_c()


if __name__ == "__main__":
    sys.exit(main())
