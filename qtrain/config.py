"""The typed training config: one schema for the YAML file and the command line.

    qtrain train configs/quickstart.yaml train.max_steps=50 lora.rank=8

Every key is a dataclass field below. Unknown keys, wrong types and bad values fail before anything
is loaded, with the dotted key, what was given and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from qtrain.lora import LoRASpec


class ConfigError(ValueError):
    pass


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # config name → dtype


@dataclass
class TinyModelConfig:
    """A random model built locally from a config (quickstart, tests): no download."""

    arch: Literal["llama", "mistral", "qwen2"] = "llama"
    hidden_size: int = 128
    intermediate_size: int = 352
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    initializer_range: float = 0.02  # std of the random weights
    seed: int = 0


@dataclass
class ModelConfig:
    name_or_path: str | None = None  # local HF checkpoint dir or Hub id
    tiny: TinyModelConfig | None = None  # build a tiny random model instead (into output_dir/base)
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"  # compute dtype of the frozen base
    quantize: bool = True  # NF4 base (QLoRA); false keeps the base in `dtype` (plain LoRA)
    backend: Literal["auto", "torch", "triton"] = "auto"


@dataclass
class LoRAConfig(LoRASpec):
    """rank, alpha, dropout, use_rslora, target_modules, exclude_modules: see qtrain.lora.LoRASpec."""

    init_from: str | None = None  # a PEFT LoRA adapter dir to start from; its r/alpha/targets replace the above


@dataclass
class DataConfig:
    train: str = "synthetic"  # "synthetic" (built-in tasks) or a .jsonl file of alpaca rows
    eval: str | None = None  # a .jsonl file; with "synthetic", held-out synthetic rows
    num_train: int = 2000  # synthetic rows
    num_eval: int = 100
    seed: int = 1234
    max_length: int = 512  # tokens; longer rows are truncated
    train_on_prompt: bool = False  # default: loss on response tokens only


@dataclass
class TrainConfig:
    max_steps: int = 100  # optimizer steps
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float = 1.0  # 0 disables clipping
    gradient_checkpointing: bool = True
    seed: int = 42
    log_every: int = 10


@dataclass
class EvalConfig:
    exact_match: bool = True  # greedy-generate the eval rows before and after training
    max_new_tokens: int = 16
    batch_size: int = 32


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "runs/qtrain"
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def validate(self) -> None:
        if (self.model.name_or_path is None) == (self.model.tiny is None):
            raise ConfigError("model: set exactly one of model.name_or_path and model.tiny")
        positive = {
            "lora.rank": self.lora.rank,
            "train.max_steps": self.train.max_steps,
            "train.batch_size": self.train.batch_size,
            "train.grad_accum": self.train.grad_accum,
            "data.max_length": self.data.max_length,
            "train.log_every": self.train.log_every,
        }
        for key, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{key}: must be > 0, got {value}")
        if not 0.0 <= self.lora.dropout < 1.0:
            raise ConfigError(f"lora.dropout: must be in [0, 1), got {self.lora.dropout}")
        for key, value in {"train.lr": self.train.lr, "eval.batch_size": self.eval.batch_size, "eval.max_new_tokens": self.eval.max_new_tokens}.items():
            if not value > 0:  # also catches nan
                raise ConfigError(f"{key}: must be > 0, got {value}")
        for key, value in {"train.weight_decay": self.train.weight_decay, "train.max_grad_norm": self.train.max_grad_norm, "train.warmup_steps": self.train.warmup_steps}.items():
            if not value >= 0:
                raise ConfigError(f"{key}: must be >= 0, got {value}")
        if isinstance(self.lora.target_modules, str) and self.lora.target_modules != "all-linear":
            raise ConfigError(
                f"lora.target_modules: {self.lora.target_modules!r}; use 'all-linear' or a list such as [q_proj, v_proj]"
            )
        if self.data.train != "synthetic" and not Path(self.data.train).suffix == ".jsonl":
            raise ConfigError(f"data.train: {self.data.train!r}; use 'synthetic' or a .jsonl file")


# ---- dict <-> dataclass, with errors that name the key ----


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass `cls` from a plain dict, checking every key and type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else ""
            raise ConfigError(f"{dotted}: unknown key{hint} (allowed: {', '.join(fields)})")
        kwargs[key] = _convert(hints[key], value, dotted)
    return cls(**kwargs)


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {', '.join(map(str, args))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, {} if value is None else value, key + ".")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads 2e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{key}: unsupported field type {tp}")


def _name(tp: Any) -> str:
    return " | ".join(getattr(a, "__name__", str(a)) for a in typing.get_args(tp))


def to_dict(cfg: Any) -> Any:
    return dataclasses.asdict(cfg)


def apply_override(data: dict, override: str) -> None:
    """Apply `a.b.c=value` (value parsed as YAML: 3, 1e-4, true, [q_proj, v_proj], null)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected key=value, e.g. train.max_steps=50")
    dotted, raw = override.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {override!r}: value is not valid YAML ({e})") from None
    *parents, last = dotted.strip().split(".")
    node = data
    for i, part in enumerate(parents):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {'.'.join(parents[: i + 1])} is not a section")
        node = child
    node[last] = value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"{path}: config file not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, lora:, ...)")
    for override in overrides:
        apply_override(data, override)
    cfg = from_dict(Config, data)
    cfg.validate()
    return cfg
