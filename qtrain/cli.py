"""`qtrain` command line: train, merge, generate."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qtrain.config import DTYPES, ConfigError, load_config


def _train(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.resume is not None and "=" in args.resume and not Path(args.resume).exists():
        overrides.append(args.resume)  # `--resume key=value`: argparse took an override for the checkpoint
        args.resume = "auto"
    if args.resume is not None:
        overrides.append(f"checkpoint.resume={args.resume}")
    cfg = load_config(args.config, overrides)  # fails on bad keys before anything loads
    from qtrain.train import Interrupted, OutOfMemory, train

    try:
        train(cfg)
    except Interrupted as e:
        print(f"qtrain train: {e}; continue with: qtrain train {args.config} {' '.join(args.overrides)} --resume".rstrip())
        return 130  # the shell convention for Ctrl-C
    except OutOfMemory as e:
        print(f"qtrain train: error: {e}", file=sys.stderr)
        return 2
    return 0


def _merge(args: argparse.Namespace) -> int:
    from qtrain.adapter import merge_adapter

    out = merge_adapter(args.base, args.adapter, args.out, dtype=DTYPES[args.dtype], base_weights=args.base_weights)
    print(f"merged checkpoint written to {out}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    import json

    import torch
    from rich.console import Console
    from rich.markup import escape
    from rich.text import Text

    from qtrain.generate import Prompt, check_options, complete, load_for_inference, read_prompts_file, resolve_template

    check_options(args.max_new_tokens, args.temperature, args.batch_size)
    prompts = [Prompt(p) for p in args.prompt or []]
    if args.prompts_file:
        prompts += read_prompts_file(args.prompts_file)
    interactive = not prompts and sys.stdin.isatty()
    if not prompts and not interactive:  # `echo hi | qtrain generate ...`: one prompt per line
        prompts = [Prompt(line) for line in sys.stdin.read().splitlines() if line.strip()]
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
            show(complete(model, tokenizer, [Prompt(line.rstrip("\n"))], template, **options))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qtrain", description="Low-VRAM QLoRA fine-tuning.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="fine-tune from a YAML config", description="qtrain train CONFIG.yaml [key.sub=value ...]")
    t.add_argument("config", help="YAML config, e.g. configs/quickstart.yaml")
    t.add_argument("overrides", nargs="*", help="overrides such as train.max_steps=50 lora.rank=8")
    t.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        metavar="CHECKPOINT",
        help="continue from the newest checkpoint in output_dir (or from CHECKPOINT, a checkpoint dir)",
    )
    t.set_defaults(func=_train)

    m = sub.add_parser("merge", help="merge a LoRA adapter into a 16-bit checkpoint")
    m.add_argument("--base", required=True, help="base model directory or Hub id")
    m.add_argument("--adapter", required=True, help="adapter directory (PEFT format)")
    m.add_argument("--out", required=True, help="output directory")
    m.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    m.add_argument(
        "--base-weights",
        choices=("nf4", "original"),
        default="nf4",
        help="merge into the dequantized NF4 weights the adapter was trained on (default) or the original ones",
    )
    m.set_defaults(func=_merge)

    g = sub.add_parser(
        "generate",
        help="complete prompts with a base model + a trained LoRA adapter",
        description="qtrain generate --adapter DIR [--prompt TEXT ...]; without --prompt/--prompts-file, "
        "prompts are read from stdin, one per line (echo hi | qtrain generate --adapter DIR)",
    )
    g.add_argument(
        "--adapter", required=True, metavar="DIR", help="adapter directory (PEFT format, e.g. runs/quickstart/adapter)"
    )
    g.add_argument(
        "--base",
        metavar="PATH_OR_ID",
        help="base model directory or Hub id (default: the adapter's base_model_name_or_path)",
    )
    g.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt (repeat for several)")
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
        "--dtype", choices=tuple(DTYPES), help="compute dtype (default: the one the adapter was trained with)"
    )
    g.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto", help="NF4 + LoRA kernels")
    g.add_argument(
        "--base-only", action="store_true", help="the base alone, without the adapter's weights (to compare)"
    )
    g.add_argument("--json", action="store_true", help="print one JSON line {prompt, completion} per prompt")
    g.set_defaults(func=_generate)
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args, extra = p.parse_known_args(argv)
    if extra and args.command == "train" and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra  # overrides after `--resume CHECKPOINT`
    elif extra:
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, ValueError, FloatingPointError) as e:
        print(f"qtrain {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
