"""LoRA adapters in Hugging Face PEFT's on-disk format, and merging them into a 16-bit checkpoint.

    adapter_config.json         {"peft_type": "LORA", "r": .., "lora_alpha": .., "target_modules": [..], ...}
    adapter_model.safetensors   base_model.model.<module>.lora_A.weight [r, in]
                                base_model.model.<module>.lora_B.weight [out, r]
                                base_model.model.<module>.lora_magnitude_vector [out]   (DoRA, "use_dora": true)

`peft.PeftModel.from_pretrained(base, dir)` loads what we save, and we load what PEFT saves. The
method that trains, saves and loads them is `qtrain.methods.lora.LoRA` (through `qtrain.methods.io`,
as every method); this module holds the format: config, key names, checks, and the merge.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PretrainedConfig

from qtrain.checkpoint import CORRUPT_ADAPTER, SafetensorsCheckpoint, require_finite, resolve_model_dir
from qtrain.lora import EXPERTS, LoRALinear, LoRASpec, PeftLoRASpec, lora_modules
from qtrain.model import (
    IGNORED_KEYS,
    bnb_groups,
    bnb_prefixes,
    build_skeleton,
    read_config,
    read_json_object,
    release_host_memory,
)
from qtrain.moe import is_expert, module_key, swap_experts
from qtrain.nf4 import dequantize_nf4, from_bnb_state_dict, quantize_nf4

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TRAINING_INFO = "qtrain.json"  # how the base was held in training (dtype, NF4 or not); PEFT ignores it
PEFT_PREFIX = "base_model.model."
_KEY_SUFFIX = {"lora_a": "lora_A", "lora_b": "lora_B"}
# PEFT saves DoRA's magnitude as `<module>.lora_magnitude_vector` (no ".weight": its pre-0.12 format,
# which it keeps); in the model it is `lora_magnitude_vector.<adapter>.weight`. We read either.
DORA_KEY = "lora_magnitude_vector"
_KINDS = {"lora_A": "lora_a", "lora_B": "lora_b", DORA_KEY: "lora_magnitude"}


# ---- save / load ----


def peft_config(spec: LoRASpec, targets: list[str], base_model: str) -> dict:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "use_rslora": spec.use_rslora,
        "target_modules": sorted({EXPERTS if is_expert(t) else t.rpartition(".")[2] for t in targets}),
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "use_dora": spec.use_dora,
        "inference_mode": True,
    } | _selection_options(spec)


def _selection_options(spec: LoRASpec) -> dict:
    """The module-selection options beyond target_modules that PEFT must know to pick the same modules."""
    options = {} if spec.exclude_modules == ["lm_head"] else {"exclude_modules": spec.exclude_modules}
    layers = getattr(spec, "layers_to_transform", None)  # a PeftLoRASpec's (an adapter's it was read from)
    if layers:
        options |= {"layers_to_transform": layers, "layers_pattern": getattr(spec, "layers_pattern", None)}
    return options


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT-named copies of every LoRA weight and DoRA magnitude (contiguous, on CPU)."""
    out = {}
    for name, m in lora_modules(model).items():
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_a.weight.detach().cpu().contiguous()
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_b.weight.detach().cpu().contiguous()
        if m.use_dora:
            out[f"{PEFT_PREFIX}{name}.{DORA_KEY}"] = m.lora_magnitude.detach().cpu().contiguous()
    return out


_MODEL_KINDS = {"lora_a": "lora_a.weight", "lora_b": "lora_b.weight", "lora_magnitude": "lora_magnitude"}


def peft_key(param_name: str) -> str:
    """PEFT's key of a LoRA parameter: '<m>.lora_a.weight' → 'base_model.model.<m>.lora_A.weight',
    '<m>.lora_magnitude' → 'base_model.model.<m>.lora_magnitude_vector'."""
    module, _, kind = param_name.removesuffix(".weight").rpartition(".")
    return f"{PEFT_PREFIX}{module}." + (DORA_KEY if kind == "lora_magnitude" else f"{_KEY_SUFFIX[kind]}.weight")


def model_key(key: str, path: Path) -> str:
    """The model's parameter name of a PEFT LoRA key (the inverse of `peft_key`, PEFT's variants too)."""
    name, which = _parse_key(key, path)
    return f"{name}.{_MODEL_KINDS[which]}"


def save_adapter(
    model: nn.Module,
    spec: LoRASpec,
    targets: list[str],
    base_model: str,
    out_dir: str | Path,
    base_dtype: torch.dtype | None = None,
    quantized: bool = True,
    extra_info: dict | None = None,
    methods: list | None = None,
) -> Path:
    """`qtrain.methods.io.save_methods` for a model whose LoRA is described by `spec` and the names of
    its adapted modules `targets` (`spec.rank == 0`: no LoRA), beside the other `methods`."""
    from qtrain.methods.io import save_methods
    from qtrain.methods.lora import LoRA

    lora = [LoRA.from_spec(spec)] if spec.rank else []
    for method in lora:
        method._targets = list(targets)
    return save_methods(model, [*lora, *(methods or [])], base_model, out_dir, base_dtype, quantized, extra_info)


def base_model_reference(name_or_path: str) -> str:
    """How an adapter records its base: a local directory by its absolute path, so that the adapter
    loads from any working directory; anything else (a Hub id) as given."""
    path = Path(name_or_path).expanduser()
    return os.path.abspath(path) if path.is_dir() else name_or_path


def replace_dir(src: Path, dst: Path) -> None:
    """Move directory `src` to `dst`, replacing an existing `dst` with only a rename-sized gap."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def read_training_info(adapter_dir: str | Path) -> dict:
    """The adapter's qtrain.json ({base_dtype, quantized, data_format}), or {} for adapters trained elsewhere."""
    path = Path(adapter_dir) / TRAINING_INFO
    if not path.exists():
        return {}
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(info, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(info).__name__}")
    return info


def read_adapter_config(adapter_dir: str | Path) -> PeftLoRASpec:
    """The LoRASpec of a PEFT LoRA (or DoRA: `use_dora`) adapter directory."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found; an adapter directory holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    cfg = read_json_object(path)
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type {cfg.get('peft_type')!r}; only LORA adapters load here")
    unsupported = {
        "bias": cfg.get("bias", "none") != "none",
        "modules_to_save": bool(cfg.get("modules_to_save")),
        "rank_pattern": bool(cfg.get("rank_pattern")),
        "alpha_pattern": bool(cfg.get("alpha_pattern")),
        "fan_in_fan_out": bool(cfg.get("fan_in_fan_out")),
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ValueError(f"{path}: {', '.join(bad)} not supported for LoRA adapters yet")
    spec = PeftLoRASpec(
        rank=int(cfg["r"]),
        alpha=float(cfg["lora_alpha"]),
        dropout=float(cfg.get("lora_dropout", 0.0)),
        use_rslora=bool(cfg.get("use_rslora", False)),
        use_dora=bool(cfg.get("use_dora", False)),
        **module_selection(cfg, path),
    )
    weights = Path(adapter_dir) / ADAPTER_WEIGHTS
    if spec.use_dora and weights.exists():
        with safe_open(weights, framework="pt") as f:  # names only, no tensor is read
            has_magnitudes = any(_is_dora_key(k) for k in f.keys())
        if not has_magnitudes:
            raise ValueError(f"{path}: use_dora is true, but {weights} holds no DoRA {DORA_KEY} tensors")
    return spec


def module_selection(cfg: dict, path: Path) -> dict:
    """LoRASpec's target_modules, exclude_modules, layers_to_transform and layers_pattern from a PEFT
    adapter_config.json, with PEFT's meaning (see qtrain.lora.is_target): a string is a full-match
    regex ('all-linear' aside), a list holds module names; an int layer or a string pattern is a list of one."""
    targets, excludes = cfg.get("target_modules"), cfg.get("exclude_modules")
    layers, patterns = cfg.get("layers_to_transform"), cfg.get("layers_pattern")

    def bad(key: str, value: object, want: str) -> ValueError:
        return ValueError(f"{path}: {key}={value!r} is not supported by qtrain; it reads {want}")

    if not (_is_names(targets) or (isinstance(targets, str) and _is_regex(targets))):
        raise bad("target_modules", targets, "a list of module names, 'all-linear' or a regex (not target_parameters)")
    if not (excludes is None or _is_names(excludes) or (isinstance(excludes, str) and _is_regex(excludes))):
        raise bad("exclude_modules", excludes, "a list of module names or a regex")
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if not (layers is None or (isinstance(layers, list) and all(type(i) is int for i in layers))):
        raise bad("layers_to_transform", layers, "a layer number or a list of them")
    patterns = [patterns] if isinstance(patterns, str) else patterns
    if not (patterns is None or _is_names(patterns)):
        raise bad("layers_pattern", cfg.get("layers_pattern"), "a name such as 'layers' or a list of them")
    return {
        "target_modules": targets,
        "exclude_modules": ["lm_head"] if excludes is None else excludes,
        "layers_to_transform": layers,
        "layers_pattern": patterns,
    }


def _is_names(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _is_regex(pattern: str) -> bool:
    try:
        re.compile(pattern)
    except re.error:
        return False
    return True


def load_adapter_weights(model: nn.Module, adapter_dir: str | Path) -> None:
    """Copy a PEFT LoRA adapter's weights (and DoRA magnitudes) into the model's LoRALinear modules (shapes checked)."""
    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found")
    load_lora_tensors(model, read_adapter_file(path), path)


def load_lora_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Copy PEFT-named LoRA tensors (read from `path`) into the model's adapters: every adapter gets
    its A, B (and DoRA magnitude), every tensor has a place, with its shape."""
    from qtrain.fsdp import sharded_like  # lazy: torch.distributed only when loading

    modules = lora_modules(model)
    seen = set()
    for key, value in tensors.items():
        name, which = _parse_key(key, path)
        if name not in modules:
            raise ValueError(f"{path}: {key!r} targets {name!r}, which has no LoRA adapter in this model")
        if which == "lora_magnitude" and not modules[name].use_dora:
            raise ValueError(
                f"{path}: {key!r} is a DoRA magnitude, not a lora_A/lora_B weight, and this model's LoRA has no DoRA"
                f" (use_dora is false in {ADAPTER_CONFIG}?)"
            )
        param = modules[name].lora_magnitude if which == "lora_magnitude" else getattr(modules[name], which).weight
        if param.shape != value.shape:
            raise ValueError(f"{path}: {key!r} has shape {list(value.shape)}, the model expects {list(param.shape)}")
        with torch.no_grad():
            param.copy_(sharded_like(value, param))  # sharded (FSDP): this rank's rows
        seen.add((name, which))
    wanted = [(n, w) for n, m in modules.items() for w in (*_KEY_SUFFIX, *(("lora_magnitude",) if m.use_dora else ()))]
    missing = [f"{n}.{w}" for n, w in wanted if (n, w) not in seen]
    if missing:
        raise ValueError(f"{path}: no weights for {', '.join(missing[:4])}" + (" ..." if len(missing) > 4 else ""))


def read_adapter_file(path: Path) -> dict[str, torch.Tensor]:
    """An adapter's safetensors weights (never unpickled), each refused by name when it holds NaN or inf."""
    return {k: require_finite(v, path, k, CORRUPT_ADAPTER) for k, v in load_file(path).items()}


def _is_dora_key(key: str) -> bool:
    return DORA_KEY in key.split(".")[-3:]


def _parse_key(key: str, path: Path) -> tuple[str, str]:
    """'base_model.model.<name>.lora_A[.default].weight' → (<name>, 'lora_a'); DoRA's
    '<name>.lora_magnitude_vector[.default][.weight]' → (<name>, 'lora_magnitude')."""
    if not key.startswith(PEFT_PREFIX) or not (key.endswith(".weight") or _is_dora_key(key)):
        raise ValueError(f"{path}: {key!r} is not a PEFT LoRA weight name")
    parts = key[len(PEFT_PREFIX) :].split(".")
    if parts[-1] == "weight":
        parts = parts[:-1]
    if parts[-1] not in _KINDS:  # PEFT may keep the adapter name: lora_A.default
        parts = parts[:-1]
    if len(parts) < 2 or parts[-1] not in _KINDS:
        raise ValueError(f"{path}: {key!r} is not a lora_A/lora_B weight (nor a DoRA {DORA_KEY})")
    return ".".join(parts[:-1]), _KINDS[parts[-1]]


# ---- merge ----


def merge_adapter(
    base: str,
    adapter_dir: str | Path,
    out_dir: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    base_weights: str = "nf4",
    max_shard_bytes: int = 2 << 30,
    force: bool = False,
) -> Path:
    """Write `base + scale * B @ A` as a 16-bit HF checkpoint, one tensor at a time (DoRA adapters:
    `m * (base + scale * B @ A) / ||base + scale * B @ A||_row`, the norm over each output row, as PEFT merges).

    `base_weights="nf4"` (default) merges into the dequantized NF4 weights, the base the adapter
    was trained against: every linear layer but lm_head goes through NF4, as it did in training,
    quantized from the dtype recorded in the adapter's qtrain.json (else from `dtype`).
    `"original"` merges into the checkpoint's own 16-bit weights.

    `out_dir` is built beside itself in a temp folder, then moved in. An existing `out_dir` must be
    empty or a previous merge (it holds MERGE_MARKER), unless `force`; either way only the files a
    merge writes (`is_merge_output`) are replaced there, every other file stays.
    """
    if base_weights not in ("nf4", "original"):
        raise ValueError(f"base_weights={base_weights!r}; choose 'nf4' or 'original'")
    out_dir = Path(out_dir)
    check_merge_out(out_dir, force)
    kept = unmergeable(read_training_info(adapter_dir))
    if kept:
        raise ValueError(f"{adapter_dir}: merging supports LoRA (and DoRA) adapters; this one also holds {', '.join(kept)}")
    model_dir = resolve_model_dir(base)
    config = read_config(model_dir)
    ckpt = SafetensorsCheckpoint(model_dir)
    spec = read_adapter_config(adapter_dir)
    adapter = _read_adapter_tensors(Path(adapter_dir))
    info = read_training_info(adapter_dir)
    quant_dtype = getattr(torch, info.get("base_dtype", str(dtype).removeprefix("torch.")))
    if not info.get("quantized", True):
        base_weights = "original"  # trained on an unquantized base: there is no NF4 base to rebuild
    bnb = bnb_groups(ckpt.keys(), bnb_prefixes(ckpt.keys()))  # {4-bit weight: its keys}
    if bnb and base_weights == "original":
        raise ValueError(f"{model_dir}: a 4-bit checkpoint has no original weights; use base_weights='nf4'")
    linear_weights = _linear_weight_names(config) if base_weights == "nf4" else set()
    merge = _Merge(Path(adapter_dir), adapter, spec, model_dir, ckpt, bnb, linear_weights, quant_dtype, dtype)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp", dir=out_dir.parent))
    try:
        merge.write(_ShardWriter(tmp, max_shard_bytes))
        _write_config(model_dir, tmp, dtype)
        marker = {"base": str(Path(os.path.abspath(model_dir))), "adapter": os.path.abspath(adapter_dir)}
        marker |= {"dtype": str(dtype).removeprefix("torch."), "base_weights": base_weights}
        (tmp / MERGE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # ours: made above
        raise
    install_merge(tmp, out_dir)
    return out_dir


def unmergeable(info: dict) -> list[str]:
    """The methods an adapter's qtrain.json records that `merge_adapter` cannot fold into the base
    (a method's `mergeable`; one this qtrain does not know cannot be merged either)."""
    from qtrain.methods import METHODS

    names = [m.get("method") for m in info.get("methods", [])]
    return [n for n in names if not getattr(METHODS.get(n), "mergeable", False)]


MERGE_MARKER = ".qtrain-merge"  # JSON {base, adapter, dtype, base_weights}: this folder is a merge's output
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_MERGE_FILES = ("model.safetensors", "model.safetensors.index.json", "config.json", MERGE_MARKER)


def is_merge_output(name: str) -> bool:
    """Whether a merge writes a file of this name: its weights (one file or shards + index),
    config.json, the marker, and what it copies from the base (`_is_tokenizer_file`)."""
    return name in _MERGE_FILES or bool(_SHARD.fullmatch(name)) or _is_tokenizer_file(name)


def _is_tokenizer_file(name: str) -> bool:
    """Files copied from the base beside the weights: tokenizer, generation config, chat template."""
    prefixes = ("tokenizer", "special_tokens", "generation_config", "chat_template")
    return name.startswith(prefixes) or Path(name).suffix in (".model", ".tiktoken")


def check_merge_out(out_dir: Path, force: bool) -> None:
    """Refuse an `--out` that is a file, or a non-empty folder that is not a previous merge (unless `force`)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir}: is a file, not a folder; give --out a folder for the merged checkpoint")
    if not out_dir.is_dir() or force or (out_dir / MERGE_MARKER).is_file() or not any(out_dir.iterdir()):
        return
    raise ValueError(
        f"{out_dir}: folder is not empty and is not a previous merge (no {MERGE_MARKER}); merge into another "
        "folder, or pass --force to replace only the files a merge writes there (model*.safetensors, "
        "config.json, tokenizer files), keeping the rest"
    )


def install_merge(tmp: Path, out_dir: Path) -> None:
    """Move a finished merge from `tmp` to `out_dir`: a rename when `out_dir` does not exist; else the
    files a merge writes are removed from it (stale shards too) and the new ones moved in, the marker
    first (a folder left half-way is still recognised as a merge); nothing else there is touched."""
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    for old in out_dir.iterdir():
        if old.is_file() and not old.is_symlink() and is_merge_output(old.name) and old.name != MERGE_MARKER:
            old.unlink()
    os.replace(tmp / MERGE_MARKER, out_dir / MERGE_MARKER)
    for new in tmp.iterdir():
        os.replace(new, out_dir / new.name)
    tmp.rmdir()


def _read_adapter_tensors(adapter_dir: Path) -> dict[tuple[str, str], torch.Tensor]:
    """{(module name, lora_a | lora_b | lora_magnitude): fp32 tensor} of an adapter's weights file."""
    return {_parse_key(k, adapter_dir): v.float() for k, v in read_adapter_file(adapter_dir / ADAPTER_WEIGHTS).items()}


@dataclass
class _Merge:
    """One merge's inputs; `write` streams the base through it into a _ShardWriter."""

    adapter_dir: Path
    adapter: dict[tuple[str, str], torch.Tensor]
    spec: LoRASpec
    model_dir: Path
    ckpt: SafetensorsCheckpoint
    bnb: dict[str, list[str]]
    linear_weights: set[str]  # re-quantized through NF4 before merging (empty: the original weights)
    quant_dtype: torch.dtype
    dtype: torch.dtype

    def write(self, writer: _ShardWriter) -> None:
        bnb_side_keys = {k for prefix, keys in self.bnb.items() for k in keys if k != prefix}
        used = set()
        for key in self.ckpt.keys():
            if key.endswith(IGNORED_KEYS) or key in bnb_side_keys:
                continue  # bnb side tensors are read with their weight
            w = self.base_weight(key)
            name, _, attr = module_key(key).rpartition(".")  # Mixtral's expert keys under the module's name
            if (name, "lora_a") in self.adapter and attr == "weight":
                w = self.merged(name, key, w)
                used.add(name)
            writer.add(key, w.to(self.dtype) if w.is_floating_point() else w)
        unused = {n for n, _ in self.adapter} - used
        if unused:
            raise ValueError(f"{self.adapter_dir}: adapter modules not found in {self.model_dir}: {sorted(unused)[:4]}")
        writer.close()

    def base_weight(self, key: str) -> torch.Tensor:
        """The base's tensor as training saw it (NF4-dequantized linear weights)."""
        if key in self.bnb:
            parts = {k: self.ckpt.finite(k) for k in self.bnb[key]}
            return dequantize_nf4(from_bnb_state_dict(parts, key), torch.float32)
        w = self.ckpt.finite(key)
        if module_key(key) in self.linear_weights:
            w = dequantize_nf4(quantize_nf4(w.to(self.quant_dtype)), torch.float32)
        return w

    def merged(self, name: str, key: str, w: torch.Tensor) -> torch.Tensor:
        """W + s B A (DoRA: scaled to the magnitude per row), shapes checked against the base's."""
        a, b = self.adapter[(name, "lora_a")], self.adapter.get((name, "lora_b"))
        if b is None:
            raise ValueError(f"{self.adapter_dir}: {name!r} has a lora_A but no lora_B weight")
        if b.shape[1] != a.shape[0] or (b.shape[0], a.shape[1]) != tuple(w.shape):
            raise ValueError(
                f"{self.adapter_dir}: tensor {name}: lora_B {list(b.shape)} @ lora_A {list(a.shape)} does not fit "
                f"the base's {key} {list(w.shape)} in {self.model_dir}; was this adapter trained on this base?"
            )
        w = w.float() + self.spec.scale() * b @ a
        if self.spec.use_dora:
            m = self.adapter.get((name, "lora_magnitude"))
            if m is None:
                raise ValueError(f"{self.adapter_dir}: use_dora, but no {DORA_KEY} for {name!r}")
            if tuple(m.shape) != (w.shape[0],):
                raise ValueError(
                    f"{self.adapter_dir}: tensor {name}.{DORA_KEY} {list(m.shape)} does not fit the base's {key} "
                    f"{list(w.shape)} in {self.model_dir}; was this adapter trained on this base?"
                )
            w = (m / torch.linalg.vector_norm(w, dim=1))[:, None] * w
        return w


def _linear_weight_names(config: PretrainedConfig) -> set[str]:
    """Module names of the weights that QLoRA holds in NF4: every nn.Linear but lm_head, and each MoE
    expert's projections (`qtrain.moe`)."""
    skeleton = build_skeleton(config, torch.float32)  # on meta: free
    with torch.device("meta"):
        swap_experts(skeleton)
    out = skeleton.get_output_embeddings()
    linear = (nn.Linear, LoRALinear)
    return {f"{n}.weight" for n, m in skeleton.named_modules() if isinstance(m, linear) and m is not out}


class _ShardWriter:
    """Accumulate tensors up to `max_bytes`, then write a shard; index at the end (HF layout)."""

    def __init__(self, directory: Path, max_bytes: int):
        self.directory, self.max_bytes = directory, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[dict[str, torch.Tensor] | list[str]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        index = len(self.shards) + 1
        save_file(self.pending, self.directory / f"shard-{index:05d}.safetensors", metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0
        release_host_memory()  # the shard's freed tensors back to the OS, or RSS climbs shard by shard

    def close(self) -> None:
        if self.pending or not self.shards:
            self._flush()
        n = len(self.shards)
        if n == 1:
            os.replace(self.directory / "shard-00001.safetensors", self.directory / "model.safetensors")
            return
        weight_map = {}
        for i, names in enumerate(self.shards, 1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(self.directory / f"shard-{i:05d}.safetensors", self.directory / final)
            weight_map |= {name: final for name in names}
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _write_config(model_dir: Path, out_dir: Path, dtype: torch.dtype) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    config.pop("quantization_config", None)
    config["dtype"] = config["torch_dtype"] = str(dtype).removeprefix("torch.")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for f in model_dir.iterdir():
        if f.is_file() and _is_tokenizer_file(f.name):
            shutil.copy2(f, out_dir / f.name)
