"""`qtrain` command line: train, merge."""

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
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, ValueError, FloatingPointError) as e:
        print(f"qtrain {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
