"""The typed training config: one schema for the YAML file and the command line.

    qtrain train configs/quickstart.yaml train.max_steps=50 lora.rank=8

Every key is a dataclass field below. Unknown keys, wrong types and bad values fail before anything
is loaded, with the dotted key, what was given and what is allowed.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from qtrain.fused.ops import FusedOps
from qtrain.methods import METHODS, PeftMethod
from qtrain.methods.lora import LoRA


class ConfigError(ValueError):
    pass


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # config name → dtype


@dataclass
class TinyModelConfig:
    """A random model built locally from a config (quickstart, tests): no download."""

    arch: Literal["llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "gemma2", "gemma3_text", "qwen3_moe", "mixtral"] = "llama"  # qtrain.families.FAMILIES
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


LoRAConfig = LoRA  # the `lora:` section is the method's dataclass, as every method's section


@dataclass
class DataConfig:
    train: str = "synthetic"  # "synthetic" (built-in tasks), a .jsonl/.json/.csv/.parquet file, or a Hub dataset id
    eval: str | None = None  # same choices; unset: `eval_fraction` of the train rows are held out
    format: Literal["auto", "alpaca", "chat", "prompt_completion", "text"] = "auto"  # auto: from the columns
    subset: str | None = None  # Hub dataset config name
    train_split: str = "train"  # Hub split read for data.train
    eval_split: str = "validation"  # Hub split read for data.eval
    eval_fraction: float = 0.05  # of the train rows, held out for eval when data.eval is unset (0: none)
    num_train: int = 2000  # synthetic rows
    num_eval: int = 100  # synthetic eval rows
    seed: int = 1234  # shuffling, eval split, synthetic rows
    max_length: int = 512  # tokens; longer rows are truncated
    train_on_prompt: bool = False  # default: loss on response (assistant) tokens only
    packing: bool = False  # concatenate rows into max_length sequences (position ids restart per row)
    group_by_length: bool = False  # batch rows of similar length together (less padding)
    bad_rows: Literal["error", "skip"] = "error"  # malformed rows stop the run, listed with file + line, or are skipped and counted


OBJECTIVES = ("sft", "dpo", "orpo", "simpo", "kto")  # qtrain.preference
REFERENCE_OBJECTIVES = ("dpo", "kto")  # the objectives that compare against the reference policy (adapter off)


@dataclass
class PreferenceConfig:
    """The `preference:` config section: the objectives' hyper-parameters (`objective:` picks one)."""

    beta: float = 0.1  # DPO/KTO: the KL penalty's inverse temperature; ORPO: lambda; SimPO: beta (paper: 2.0)
    loss_type: Literal["sigmoid", "hinge", "ipo", "robust"] = "sigmoid"  # DPO's variant
    label_smoothing: float = 0.0  # DPO sigmoid (cDPO) and robust: the probability that a pair's labels are flipped
    simpo_gamma: float = 0.5  # SimPO's target reward margin gamma (TRL's simpo_gamma)
    desirable_weight: float = 1.0  # KTO: weight of the desirable (label true) examples' losses
    undesirable_weight: float = 1.0  # KTO: weight of the undesirable examples' losses
    reference_free: bool = False  # DPO: pi_ref = uniform (log-ratios are the policy's log-probs)
    precompute_reference: bool = False  # DPO: pi_ref's log-probs of every pair in one pass before training, cached in output_dir/reference_logps.safetensors

    def check(self, objective: str) -> None:
        """ValueError naming the key of a setting that is out of range for `objective`."""
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"preference.beta: must be > 0 and finite, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"preference.label_smoothing: must be in [0, 0.5), got {self.label_smoothing}")
        for key in ("desirable_weight", "undesirable_weight"):
            if not getattr(self, key) > 0:
                raise ValueError(f"preference.{key}: must be > 0, got {getattr(self, key)}")
        if self.precompute_reference and (objective != "dpo" or self.reference_free):
            raise ValueError("preference.precompute_reference: only for objective=dpo with a reference (KTO's KL pairs change with every batch)")
        if self.reference_free and objective != "dpo":
            raise ValueError(f"preference.reference_free: only for objective=dpo (objective is {objective}; orpo and simpo need no reference)")


@dataclass
class TrainConfig:
    max_steps: int = 100  # optimizer steps
    batch_size: int = 8  # micro-batch (rows, or packed sequences)
    grad_accum: int = 1  # micro-batches per optimizer step
    optimizer: Literal["auto", "adamw", "paged_adamw_32bit", "paged_adamw_8bit"] = "auto"  # auto: paged 32-bit on CUDA, adamw on CPU
    lr: float = 2e-4
    lora_plus_ratio: float = 1.0  # LoRA+: lr of the B matrices = lr * ratio (paper: 16); 1 = plain LoRA
    weight_decay: float = 0.0
    warmup_steps: int = 10
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float = 1.0  # 0 disables clipping
    gradient_checkpointing: bool = True
    offload_activations: bool = False  # keep checkpointed activations in pinned CPU RAM
    loss_chunk_tokens: int | None = None  # lm_head + cross-entropy over chunks of this many tokens; null: automatic (256, more at long sequences); 0: full logits
    autocast: bool = True  # with a bf16/fp16 model.dtype: matmuls under torch.autocast (fp16 adds loss scaling)
    seed: int = 42
    deterministic: bool = False  # deterministic kernels (slower on GPU)
    threads: int | None = None  # torch CPU threads; null: adaptive (every core, one fewer per core's worth of other work: qtrain.threads); 0: torch's default
    log_every: int = 10  # steps between console/TensorBoard flushes


@dataclass
class SamplePrompt:
    """A prompt generated at each eval, with the input of an alpaca row (appended below the prompt in
    other formats): `{prompt: "Which letter comes next in the alphabet?", input: "k"}`."""

    prompt: str
    input: str = ""


@dataclass
class EvalConfig:
    every: int = 0  # eval loss / perplexity every N steps (0: only at the end)
    exact_match: bool = True  # greedy-generate the eval rows before and after training
    max_rows: int = 200  # eval rows used for loss and exact match
    max_new_tokens: int = 16
    batch_size: int = 32
    samples: list[str | SamplePrompt] = field(default_factory=list)  # fixed prompts generated at each eval, printed and logged


@dataclass
class CheckpointConfig:
    every: int = 0  # save every N steps (0: only at the end); Ctrl-C also saves
    keep_last: int = 2  # older checkpoints are deleted
    resume: str | None = None  # "auto" (latest in output_dir/checkpoints) or a checkpoint dir; CLI: --resume


@dataclass
class LogConfig:
    tensorboard: bool = True  # event files in output_dir/tensorboard
    wandb: bool = False  # Weights & Biases (pip install wandb)
    wandb_project: str = "qtrain"
    plot: bool = True  # loss curve PNG in output_dir at the end
    progress_seconds: float = 30.0  # without a terminal (log file, nohup, CI): a progress line at least this often (and every train.log_every steps)


@dataclass
class DistributedConfig:
    """Under torchrun / accelerate launch (more than one process); one process ignores it."""

    strategy: Literal["auto", "ddp", "fsdp"] = "auto"  # ddp: a model per GPU; fsdp: the NF4 base sharded; auto: ddp when the estimate fits one card
    timeout_s: float = 600.0  # longest wait in a collective: a rank that died stops the others after this at most


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    method: list[str] | str = "lora"  # PEFT method, or a list to compose (e.g. [lora, bitfit]); its settings are the section of that name
    # one section per registered method (qtrain.methods.METHODS), named after it: cfg.lora, cfg.ia3, ...
    method_sections: dict[str, PeftMethod] = field(default_factory=lambda: default_sections())
    data: DataConfig = field(default_factory=DataConfig)
    objective: Literal["sft", "dpo", "orpo", "simpo", "kto"] = "sft"  # sft: next-token loss; the others: preference tuning (qtrain.preference)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)  # the preference objectives' settings
    kernels: FusedOps = field(default_factory=FusedOps)  # fused Triton ops (auto: on CUDA); see qtrain.fused
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    output_dir: str = "runs/qtrain"
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def __getattr__(self, name: str) -> PeftMethod:
        """A method's section by its name (`cfg.lora`), as if it were a field."""
        sections = self.__dict__.get("method_sections", {})
        if name in sections:
            return sections[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def methods(self) -> list[str]:
        """The `method` key as a list of names."""
        return [self.method] if isinstance(self.method, str) else list(self.method)

    def method_objects(self) -> list[PeftMethod]:
        """New method objects of this run, in `method` order, from their sections (what training adds
        to a method, its hooks, AdaLoRA's EMAs, LoRA's targets, lives on these, never on the config);
        a method that starts from a saved adapter (`lora.init_from`) as that adapter recorded it."""
        return [_fresh(self.method_sections[name]) for name in self.methods()]

    def validate(self) -> None:
        """Checks across keys; runs before anything loads."""
        names = self.methods()
        known = list(METHODS)
        for name in names:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f"; did you mean {close[0]}?" if close else ""
                raise ConfigError(f"method: unknown method {name!r}{hint} (known: {', '.join(known)})")
        if not names or len(set(names)) != len(names):
            raise ConfigError(f"method: {self.method!r}; give one method or a list without repeats")
        for name in names:
            try:
                self.method_sections[name].check_run(self.train.max_steps)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        for name, section in self.method_sections.items():
            if name not in names:
                try:
                    section.check_unused()
                except ValueError as e:
                    raise ConfigError(str(e)) from None
        if (self.model.name_or_path is None) == (self.model.tiny is None):
            raise ConfigError("model: set exactly one of model.name_or_path and model.tiny")
        t, d, e, c = self.train, self.data, self.eval, self.checkpoint
        _check(
            "> 0",
            lambda v: v > 0,  # `not v > 0` also catches nan
            {
                "lora.rank": self.lora.rank,
                "train.max_steps": t.max_steps,
                "train.batch_size": t.batch_size,
                "train.grad_accum": t.grad_accum,
                "data.num_train": d.num_train,
                "train.log_every": t.log_every,
                "data.max_length": d.max_length,
                "eval.batch_size": e.batch_size,
                "eval.max_new_tokens": e.max_new_tokens,
                "eval.max_rows": e.max_rows,
                "checkpoint.keep_last": c.keep_last,
            },
        )
        _check(
            ">= 0",
            lambda v: v >= 0,
            {
                "train.weight_decay": t.weight_decay,
                "train.max_grad_norm": t.max_grad_norm,
                "train.warmup_steps": t.warmup_steps,
                "train.loss_chunk_tokens": 0 if t.loss_chunk_tokens is None else t.loss_chunk_tokens,
                "data.num_eval": d.num_eval,
                "eval.every": e.every,
                "checkpoint.every": c.every,
                "train.threads": 0 if t.threads is None else t.threads,
            },
        )
        _check(
            "> 0 and finite",
            lambda v: math.isfinite(v) and v > 0,
            {"train.lr": t.lr, "train.lora_plus_ratio": t.lora_plus_ratio, "log.progress_seconds": self.log.progress_seconds, "distributed.timeout_s": self.distributed.timeout_s},
        )
        if not 0.0 <= self.lora.dropout < 1.0:
            raise ConfigError(f"lora.dropout: must be in [0, 1), got {self.lora.dropout}")
        if not 0.0 <= d.eval_fraction < 1.0:
            raise ConfigError(f"data.eval_fraction: must be in [0, 1), got {d.eval_fraction}")
        if isinstance(self.lora.target_modules, str) and self.lora.target_modules != "all-linear":
            raise ConfigError(
                f"lora.target_modules: {self.lora.target_modules!r}; use 'all-linear' or a list such as [q_proj, v_proj]"
            )
        if e.every and d.train != "synthetic" and d.eval is None and d.eval_fraction == 0:
            raise ConfigError("eval.every: there are no eval rows; set data.eval or data.eval_fraction > 0 (or eval.every=0)")
        if c.resume == "":
            raise ConfigError("checkpoint.resume: empty; use auto, a checkpoint directory, or leave it unset")
        if d.packing and d.group_by_length:
            raise ConfigError("data.packing and data.group_by_length: choose one (packed sequences all have max_length)")
        if d.train == "synthetic" and d.format not in ("auto", "alpaca"):
            raise ConfigError(f"data.format: {d.format!r}, but data.train=synthetic holds alpaca rows; use auto or alpaca")
        if t.optimizer.startswith("paged") and self.device == "cpu":
            raise ConfigError(f"train.optimizer: {t.optimizer} needs a CUDA GPU; with device=cpu use adamw (or auto)")
        self._validate_objective()
        if t.offload_activations and not t.gradient_checkpointing:
            raise ConfigError(
                "train.offload_activations needs train.gradient_checkpointing=true (it offloads the checkpointed activations)"
            )


    def _validate_objective(self) -> None:
        """Preference objectives: their section's ranges, no packing, and for DPO/KTO methods that
        can be switched off (the reference is the model with its adapter off)."""
        if self.objective == "sft":
            return
        try:
            self.preference.check(self.objective)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.data.packing:
            raise ConfigError(f"data.packing: objective={self.objective} scores each row on its own and is not packed; set data.packing=false")
        if self.data.format not in ("auto",):
            raise ConfigError(f"data.format: {self.data.format!r}; preference rows are read by their columns (prompt, chosen, rejected / completion, label): leave it auto")
        if self.objective in REFERENCE_OBJECTIVES and not self.preference.reference_free:
            for name in self.methods():
                if type(self.method_sections[name]).switched_off is PeftMethod.switched_off:
                    raise ConfigError(
                        f"method: {name} cannot be switched off to give objective={self.objective} its reference model; "
                        "use method=lora, objective=orpo or simpo (no reference), or preference.reference_free=true (dpo)"
                    )


def default_sections() -> dict[str, PeftMethod]:
    """Every registered method's section with its defaults, in registration order."""
    return {name: cls() for name, cls in METHODS.items()}


def _fresh(section: PeftMethod) -> PeftMethod:
    """A new method object of a config section (a copy, or the adapter's own when it starts from one)."""
    start = section.init_dir()
    if start:
        return type(section).from_saved(dataclasses.asdict(section), Path(start))
    return dataclasses.replace(section)


def _check(rule: str, ok, values: dict) -> None:
    for key, value in values.items():
        if not ok(value):
            raise ConfigError(f"{key}: must be {rule}, got {value}")


# ---- dict <-> dataclass, with errors that name the key ----


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass `cls` from a plain dict, checking every key and type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__} {data!r}")
    keys = _keys(cls)
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in keys:
            close = difflib.get_close_matches(str(key), keys, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else ""
            raise ConfigError(f"{dotted}: unknown key{hint} (allowed: {', '.join(keys)})")
        kwargs[key] = _convert(keys[key], value, dotted)
    missing = [f for f in dataclasses.fields(cls) if f.name in keys and f.name not in kwargs and _required(f)]
    if missing:
        raise ConfigError(f"{prefix}{missing[0].name}: missing; it has no default (keys: {', '.join(keys)})")
    return _make(cls, kwargs)


def _keys(cls: type) -> dict[str, Any]:
    """The keys of section `cls` and their types: its fields; for Config, a section per registered
    method (named after it, typed by its dataclass) in place of `method_sections`, after `method`."""
    hints = typing.get_type_hints(cls)
    keys = {}
    for f in dataclasses.fields(cls):
        if cls is Config and f.name == "method_sections":
            keys |= {name: method_cls for name, method_cls in METHODS.items()}
        else:
            keys[f.name] = hints[f.name]
    return keys


def _make(cls: type, kwargs: dict) -> Any:
    if cls is not Config:
        return cls(**kwargs)
    sections = default_sections()
    for name in list(kwargs):
        if name in sections:
            sections[name] = kwargs.pop(name)
    return Config(**kwargs, method_sections=sections)


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        sections = [a for a in args if dataclasses.is_dataclass(a)]
        if isinstance(value, dict) and len(sections) == 1:  # a mapping is meant for the section: its own errors
            return _convert(sections[0], value, key)
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
    """`int | None` -> "int | NoneType"; Literal members by value: "auto | on | off | bool"; a section
    by its keys: "str | {prompt, input}"."""

    def one(a: Any) -> str:
        if typing.get_origin(a) is Literal:
            return " | ".join(map(str, typing.get_args(a)))
        if dataclasses.is_dataclass(a):
            return "{" + ", ".join(f.name for f in dataclasses.fields(a)) + "}"
        return getattr(a, "__name__", str(a))

    return " | ".join(one(a) for a in typing.get_args(tp))


def to_dict(cfg: Any) -> Any:
    """A section as plain data; the Config with each method's section under its name, in place of
    `method_sections` (the layout of the YAML file)."""
    if not isinstance(cfg, Config):
        return dataclasses.asdict(cfg)
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name == "method_sections":
            out |= {name: dataclasses.asdict(section) for name, section in value.items()}
        else:
            out[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else copy.deepcopy(value)
    return out


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


class DuplicateKeyError(ValueError):
    """A key given twice in one YAML mapping: "key train.lr is given twice (lines 3 and 7)"."""


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one)."""

    def construct_document(self, node: yaml.Node) -> Any:
        self._check_keys(node, "", set())
        return super().construct_document(node)

    def _check_keys(self, node: yaml.Node, path: str, seen_nodes: set[int]) -> None:
        if id(node) in seen_nodes:  # an alias of a node already checked (or a recursive one)
            return
        seen_nodes.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._check_keys(item, f"{path}[{i}]", seen_nodes)
        if not isinstance(node, yaml.MappingNode):
            return
        lines: dict = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: its keys may be overridden
                continue
            key = self.construct_object(key_node, deep=True) if isinstance(key_node, yaml.ScalarNode) else id(key_node)
            dotted = f"{path}.{key}" if path else str(key)
            line = key_node.start_mark.line + 1
            if key in lines:
                raise DuplicateKeyError(f"key {dotted} is given twice (lines {lines[key]} and {line}); keep one")
            lines[key] = line
            self._check_keys(value_node, dotted, seen_nodes)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"{path}: config file not found")
        try:
            data = yaml.load(path.read_text(), Loader=UniqueKeyLoader) or {}
        except DuplicateKeyError as e:
            raise ConfigError(f"{path}: {e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, lora:, ...)")
    for override in overrides:
        apply_override(data, override)
    cfg = from_dict(Config, data)
    cfg.validate()
    return cfg
