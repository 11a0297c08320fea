"""`qtrain generate`: load a base model + a trained adapter (LoRA, DoRA, or any other method qtrain
trains: see qtrain.methods.io) and complete prompts with it.

The base is held the way it was in training (NF4 or not, and the dtype it was quantized from, both
recorded in the adapter's qtrain.json), so the model generating is the one that was trained.
Prompts are rendered with the training data's format (alpaca, a chat template, or as is).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from qtrain.adapter import ADAPTER_CONFIG, TRAINING_INFO, read_training_info
from qtrain.builder import build_model, kernels_from_info
from qtrain.config import DTYPES, Config, ModelConfig
from qtrain.data import FORMATS, PROMPT_FORMATS, format_prompt
from qtrain.device import pick_device
from qtrain.methods import PeftMethod
from qtrain.methods.io import read_methods

TEMPLATES = ("auto", "alpaca", "chat", "none")  # `none`: the prompt as is


@dataclass
class Prompt:
    """One prompt; `input` is alpaca's optional input (--input, a .jsonl prompts file, or after a tab)."""

    text: str
    input: str = ""

    @classmethod
    def from_line(cls, line: str) -> Prompt:
        """A line of stdin or a plain prompts file: "PROMPT", or "PROMPT<tab>INPUT"."""
        text, _, extra = line.rstrip("\n").partition("\t")
        return cls(text, extra)


# ---- loading ----


def _dtype_from_info(info: dict, path: Path) -> torch.dtype | None:
    name = info.get("base_dtype")
    if name is None:
        return None
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"{path}: base_dtype {name!r} is not a floating-point torch dtype")
    return dtype


def resolve_base(adapter_dir: str | Path, base: str | None) -> tuple[Path, str]:
    """(the base checkpoint directory, the name it was given by): `base`, else the adapter's
    base_model_name_or_path (a relative one that is not there from here is also looked for beside the
    adapter: `_beside_the_adapter`). Errors name where the name came from."""
    from qtrain.checkpoint import resolve_model_dir

    cfg_path = Path(adapter_dir) / ADAPTER_CONFIG
    if not cfg_path.exists() and (Path(adapter_dir) / TRAINING_INFO).exists():  # no LoRA: qtrain.json names the base
        cfg_path = Path(adapter_dir) / TRAINING_INFO
    source = "--base"
    if base is None:
        base = json.loads(cfg_path.read_text()).get("base_model_name_or_path")
        if not base:
            raise ValueError(f"{cfg_path}: records no base_model_name_or_path; pass --base PATH_OR_ID")
        source = f"base_model_name_or_path in {cfg_path}"
    if source != "--base":
        base = _beside_the_adapter(base, Path(adapter_dir))
    try:
        return resolve_model_dir(base), base
    except (OSError, ValueError) as e:  # not a directory; the Hub's errors (offline, unknown or invalid id)
        hint = "; pass --base PATH_OR_ID" if source != "--base" else ""
        raise FileNotFoundError(f"base model {base!r} ({source}) could not be found or downloaded: {e}{hint}") from None


def _beside_the_adapter(base: str, adapter_dir: Path) -> str:
    """A recorded relative base path that is not there from the working directory, resolved against
    the adapter directory's ancestors instead: adapters saved before base paths were recorded
    absolute name `runs/quickstart/base` relative to where training ran, and sit at
    `runs/quickstart/adapter` (or deeper, in a checkpoint). Anything else is returned as is."""
    path = Path(base).expanduser()
    if path.is_absolute() or path.exists():
        return base
    for folder in Path(os.path.abspath(adapter_dir)).parents:
        candidate = folder / path
        if (candidate / "config.json").is_file():
            return str(candidate)
    return base


def load_for_inference(
    adapter_dir: str | Path,
    base: str | None = None,
    device: str = "auto",
    dtype: str | None = None,
    backend: str = "auto",
    base_only: bool = False,
) -> tuple[nn.Module, object, dict]:
    """(model in eval mode, tokenizer, info) for an adapter directory.

    `base` defaults to the adapter's base_model_name_or_path; NF4 or not and the dtype come from
    the adapter's qtrain.json (defaults without one: NF4, bf16 on CUDA, fp32 on CPU), `dtype`
    ("bf16"/"fp16"/"fp32") overrides the dtype. `base_only` loads the same base without the
    adapter's weights, to compare with. `info`: adapter, base, model_dir, device, dtype,
    quantized, data_format (None when not recorded), base_only.
    """
    from qtrain.model import load_tokenizer

    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise FileNotFoundError(f"{adapter_dir}: no such adapter directory")
    info = read_training_info(adapter_dir)
    methods = read_methods(info, adapter_dir)  # LoRA (root adapter_config.json, named when missing), then the others
    model_dir, base_name = resolve_base(adapter_dir, base)
    torch_device = pick_device(device)
    if dtype is not None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        compute_dtype = DTYPES[dtype]
    else:
        compute_dtype = _dtype_from_info(info, adapter_dir / TRAINING_INFO)
        if compute_dtype is None:
            compute_dtype = torch.bfloat16 if torch_device.type == "cuda" else torch.float32
    quantized = bool(info.get("quantized", True))
    data_format = info.get("data_format")
    if data_format is not None and data_format not in PROMPT_FORMATS:
        raise ValueError(
            f"{adapter_dir / TRAINING_INFO}: data_format {data_format!r} is not one of {', '.join(FORMATS)}"
        )

    tokenizer = load_tokenizer(model_dir)  # a missing or broken tokenizer is found before the weights load
    if base_only:  # the same base (NF4 or not, dtype, kernels), no method
        methods = []
    cfg = run_config(info, adapter_dir, str(model_dir), methods, quantized, backend)
    built = build_model(cfg, str(model_dir), torch_device, methods, adapter_dir, compute_dtype)
    loaded, model = built.loaded, built.model
    model.eval()
    return (
        model,
        tokenizer,
        {
            "adapter": str(adapter_dir),
            "base": base_name,
            "model_dir": str(loaded.model_dir),
            "device": str(torch_device),
            "dtype": str(compute_dtype).removeprefix("torch."),
            "quantized": quantized,
            "data_format": data_format,
            "base_only": base_only,
        },
    )


def run_config(info: dict, adapter_dir: Path, model_dir: str, methods: list[PeftMethod], quantized: bool, backend: str) -> Config:
    """The training config's equivalent for `build_model`, from the adapter: its methods (given to
    `build_model` as objects, with the adapter's weights), NF4 or not, the NF4 backend asked for, and
    the kernels settings the run trained with (qtrain.json's `kernels`; the defaults for adapters that
    record none). The compute dtype is passed to `build_model` beside it: an adapter may record any
    floating-point dtype."""
    return Config(
        model=ModelConfig(name_or_path=model_dir, quantize=quantized, backend=backend),
        method=[m.name for m in methods],
        kernels=kernels_from_info(info, adapter_dir / TRAINING_INFO),
    )


# ---- prompts ----


def resolve_template(template: str, info: dict) -> str:
    """--template auto → the adapter's recorded data format (alpaca when none is recorded)."""
    if template not in TEMPLATES:
        raise ValueError(f"template {template!r}; choose one of {', '.join(TEMPLATES)}")
    return (info.get("data_format") or "alpaca") if template == "auto" else template


def read_prompts_file(path: str | Path) -> list[Prompt]:
    """One prompt per non-empty line ("PROMPT" or "PROMPT<tab>INPUT"); or, for .jsonl, one JSON object
    per line with a "prompt" or "instruction" string (and an optional alpaca "input")."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such prompts file")
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix != ".jsonl":
        return [Prompt.from_line(line) for line in lines if line.strip()]
    prompts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f'{path}:{n}: expected a JSON object with a "prompt" or "instruction" string')
        text = row.get("prompt", row.get("instruction"))
        if not isinstance(text, str):
            raise ValueError(f'{path}:{n}: needs a "prompt" or "instruction" string, has keys {sorted(row)}')
        extra = row.get("input") or ""
        if not isinstance(extra, str):
            raise ValueError(f'{path}:{n}: "input" must be a string')
        prompts.append(Prompt(text, extra))
    return prompts


def check_options(max_new_tokens: int, temperature: float, batch_size: int) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}; must be at least 1")
    if not temperature >= 0:  # also refuses nan
        raise ValueError(f"temperature={temperature}; must be >= 0 (0 is greedy)")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; must be at least 1")


def complete(
    model: nn.Module,
    tokenizer,
    prompts: list[Prompt],
    data_format: str,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    batch_size: int = 8,
) -> Iterator[tuple[Prompt, str]]:
    """(prompt, completion) pairs, generated lazily batch by batch (the arguments are checked at
    once), each prompt rendered with `data_format`."""
    check_options(max_new_tokens, temperature, batch_size)
    if data_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt format {data_format!r}; choose one of {', '.join(PROMPT_FORMATS)}")
    return _complete(model, tokenizer, prompts, data_format, max_new_tokens, temperature, batch_size)


def _complete(
    model, tokenizer, prompts, data_format, max_new_tokens, temperature, batch_size
) -> Iterator[tuple[Prompt, str]]:
    from qtrain.evaluate import generate

    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        rendered = [format_prompt(p.text, data_format, tokenizer, p.input) for p in chunk]
        texts, specials = [t for t, _ in rendered], rendered[0][1]  # one format: the same for all
        answers = generate(
            model, tokenizer, texts, max_new_tokens, len(texts), add_special_tokens=specials, temperature=temperature
        )
        yield from zip(chunk, answers)
