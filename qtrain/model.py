"""Build a causal LM with an NF4 base, streaming the checkpoint tensor by tensor.

    1. the model skeleton on the meta device (no memory), from config.json;
    2. every nn.Linear but lm_head swapped for a rank-0 LoRALinear (the frozen NF4 linear);
    3. each checkpoint tensor read alone, moved to the device, and either quantized into its
       LoRALinear (16-bit checkpoints) or taken as is (bitsandbytes 4-bit checkpoints), or set
       as a frozen parameter in the compute dtype (embeddings, norms, lm_head).

The PEFT methods (LoRA among them: `qtrain.methods.lora`) are applied to the loaded base by their
`apply`. Peak host memory is about one tensor. The families of `qtrain.families.FAMILIES` load this
way; any other decoder-only causal LM whose projections are `nn.Linear` too, with a one-line warning
that it is untested (`check_loadable`); what cannot work is refused before a weight is read.
The mixture-of-experts families (Qwen3-MoE, Mixtral) load the same way once their 3-D experts
module is replaced by one NF4 linear per expert weight (`qtrain.moe.swap_experts`), which the per-expert checkpoint
tensors (or a fused 3-D one, split per expert) are quantized into as they are read.
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from accelerate import init_empty_weights
from torch import nn
from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from qtrain.checkpoint import SafetensorsCheckpoint, resolve_model_dir
from qtrain.families import FAMILIES
from qtrain.lora import LoRALinear, LoRASpec, swap_base_linears
from qtrain.moe import PROJECTION_OF, fused_expert_parts, module_key, swap_experts
from qtrain.nf4 import QUANT_STATE_KEY, from_bnb_state_dict

SUPPORTED = tuple(FAMILIES)  # tested families; others load through the generic path (check_loadable)
log = logging.getLogger("qtrain")
IGNORED_KEYS = ("rotary_emb.inv_freq",)  # buffers some old checkpoints carry


@dataclass
class LoadedModel:
    model: nn.Module
    config: PretrainedConfig
    model_dir: Path
    targets: list[str]  # names of the modules that carry adapters
    prequantized: bool


def build_skeleton(config: PretrainedConfig, dtype: torch.dtype) -> nn.Module:
    """The model with parameters on meta (free) and buffers (rotary tables) real, on CPU."""
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)


def read_config(model_dir: str | Path, supported: tuple[str, ...] | None = None) -> PretrainedConfig:
    """The folder's config.json through transformers, which never runs code from the folder:
    `auto_map` custom code is refused, as is a model_type outside `supported` (when given)."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{model_dir}: no config.json; a Hugging Face model folder needs config.json + *.safetensors"
        )
    raw = read_json_object(path)
    model_type = raw.get("model_type")
    if supported is not None and model_type not in supported:
        custom = " and needs custom code (auto_map), which qtrain never runs" if "auto_map" in raw else ""
        raise ValueError(
            f"{path}: model_type {model_type!r} is not supported{custom}; qtrain supports {', '.join(supported)}"
        )
    if model_type not in CONFIG_MAPPING:
        custom = "needs custom code (auto_map), which qtrain never runs" if "auto_map" in raw else "is unknown"
        raise ValueError(
            f"{path}: model_type {model_type!r} {custom} to transformers {transformers.__version__}; "
            "use a model type transformers implements"
        )
    try:
        return AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: transformers cannot read it ({one_line(e)})") from None


def check_causal_lm(config: PretrainedConfig, model_dir: Path) -> None:
    """Refuse a model transformers has no decoder-only causal LM class for (T5, BERT...)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"{model_dir}: model_type {config.model_type!r} is not a decoder-only causal LM; "
            "qtrain fine-tunes those only"
        )


def check_loadable(skeleton: nn.Module, config: PretrainedConfig, model_dir: Path) -> None:
    """Refuse, before any weight is read, a model whose meta skeleton has a weight-carrying module
    that is not `nn.Linear` or `nn.Embedding` (its projection would stay
    unquantized and untrainable: GPT-2's Conv1D, the 3-D experts of a MoE family not
    registered; the registered ones are swapped by `qtrain.moe.swap_experts`). A family outside
    `FAMILIES` that passes loads with one warning line: it is untested."""
    model_type = config.model_type
    if model_type in FAMILIES:
        return
    for name, module in skeleton.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)) or name == "":
            continue
        weights = [p for p in module.parameters(recurse=False) if p.dim() >= 2]
        if weights:
            raise ValueError(
                f"{model_dir}: model_type {model_type!r}: {name} is a {type(module).__name__} with a "
                f"{weights[0].dim()}-D weight, not nn.Linear; qtrain quantizes and adapts nn.Linear projections only "
                f"(supported families: {', '.join(FAMILIES)})"
            )
    log.warning(
        "model_type %r is not one of qtrain's tested families (%s): loading it through the generic path, untested",
        model_type, ", ".join(FAMILIES),
    )  # fmt: skip


def read_json_object(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def one_line(e: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (transformers' span several), cut to `limit` characters."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def bnb_prefixes(keys: list[str]) -> set[str]:
    """Weight names stored in bitsandbytes 4-bit form ('....q_proj.weight')."""
    suffix = "." + QUANT_STATE_KEY
    fp4 = [k for k in keys if k.endswith(".quant_state.bitsandbytes__fp4")]
    if fp4:
        raise ValueError(f"{fp4[0]}: FP4 bitsandbytes checkpoints are not supported, only NF4")
    return {k[: -len(suffix)] for k in keys if k.endswith(suffix)}


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Put `value` as the (frozen) parameter or buffer `name` of the model instance."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._buffers:
        module._buffers[attr] = value
    else:
        setattr(module, attr, nn.Parameter(value, requires_grad=False))


def load_model(
    name_or_path: str,
    lora: LoRASpec | None = None,
    compute_dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    quantize: bool = True,
    backend: str = "auto",
    adapter_dtype: torch.dtype = torch.float32,
) -> LoadedModel:
    """Load a checkpoint directory (or Hub id) into an NF4 model on `device`: the frozen base
    (`load_base`), then, as a convenience, LoRA per `lora` through the method's own `apply`.

    `lora=None` loads the frozen quantized base only. `quantize=False` keeps the base in
    `compute_dtype` (LoRA without Q), which is useful for references and small models.
    """
    from qtrain.methods import mark_trainable
    from qtrain.methods.lora import LoRA

    loaded = load_base(name_or_path, compute_dtype, device, quantize, backend)
    methods = [LoRA.from_spec(lora)] if lora is not None and lora.rank else []
    for method in methods:
        method.apply(loaded.model, adapter_dtype=adapter_dtype)
        loaded.targets = method.targets
    mark_trainable(loaded.model, methods)
    return loaded


def load_base(
    name_or_path: str,
    compute_dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    quantize: bool = True,
    backend: str = "auto",
) -> LoadedModel:
    """The frozen base of a checkpoint directory (or Hub id) on `device`: every linear but lm_head
    an NF4 (or, `quantize=False`, `compute_dtype`) LoRALinear of rank 0, nothing trainable yet."""
    model_dir = resolve_model_dir(name_or_path)
    config = read_config(model_dir)
    ckpt = SafetensorsCheckpoint(model_dir)
    bnb = bnb_prefixes(ckpt.keys())
    if bnb and not quantize:
        raise ValueError(f"{model_dir}: a bitsandbytes 4-bit checkpoint cannot be loaded with quantize=False")
    if hasattr(config, "quantization_config"):  # we quantize ourselves; transformers must not
        delattr(config, "quantization_config")

    check_causal_lm(config, model_dir)
    model = build_skeleton(config, compute_dtype)
    check_loadable(model, config, model_dir)
    swap_base_linears(model, quantize_base=quantize, backend=backend)
    swap_experts(model, quantize_base=quantize, backend=backend)  # MoE: one NF4 LoRALinear per expert weight
    linears = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}

    groups = bnb_groups(ckpt.keys(), bnb)  # {"...q_proj.weight": [its 5-7 keys]}
    bnb_key_to_group = {k: p for p, keys in groups.items() for k in keys}
    bnb_parts: dict[str, dict[str, torch.Tensor]] = {p: {} for p in bnb}
    loaded_biases: set[str] = set()
    for key in ckpt.keys():
        if key.endswith(IGNORED_KEYS):
            continue
        if key in bnb_key_to_group:  # collect a 4-bit weight's parts, then hand them over at once
            prefix = bnb_key_to_group[key]
            bnb_parts[prefix][key] = ckpt.finite(key).to(device)
            if len(bnb_parts[prefix]) == len(groups[prefix]):
                linears[prefix.rpartition(".")[0]].set_nf4_weight(from_bnb_state_dict(bnb_parts.pop(prefix), prefix))
            continue
        name = module_key(key)  # Mixtral's per-expert names -> the module's
        if _load_fused_experts(linears, ckpt, key, name, device, compute_dtype):
            continue
        module_name, _, attr = name.rpartition(".")
        if module_name in linears:
            if attr not in ("weight", "bias") or (attr == "bias" and linears[module_name].bias is None):
                raise ValueError(f"{model_dir}: unexpected tensor {key!r} for a linear layer; does config.json match?")
            value = ckpt.finite(key).to(device=device, dtype=compute_dtype)
            try:
                if attr == "weight":
                    linears[module_name].set_base_weight(value)
                else:
                    linears[module_name].set_bias(value)
            except ValueError as e:
                raise ValueError(f"{model_dir}: checkpoint tensor {key!r}: {e}; does config.json match?") from None
            if attr == "bias":
                loaded_biases.add(module_name)
            del value
            release_host_memory()
            continue
        expected = _existing_tensor(model, name)
        if expected is None:
            raise ValueError(
                f"{model_dir}: checkpoint tensor {key!r} has no place in {type(model).__name__}; "
                "is config.json the one of these weights?"
            )
        entry = ckpt.entries[key]
        if tuple(entry.shape) != tuple(expected.shape):
            raise ValueError(
                f"{model_dir}: checkpoint tensor {key!r} has shape {list(entry.shape)}, the model built from "
                f"config.json expects {list(expected.shape)}"
            )
        value = ckpt.finite(key).to(device)
        _set_tensor(model, name, value.to(compute_dtype) if value.is_floating_point() else value)

    no_bias = [f"{n}.bias" for n, m in linears.items() if m.bias is not None and n not in loaded_biases]
    if no_bias:
        raise ValueError(f"{model_dir}: checkpoint lacks {no_bias[0]}" + (f" and {len(no_bias) - 1} more biases" if len(no_bias) > 1 else ""))
    _tie_or_check(model, config, model_dir)
    model.to(device)  # buffers such as rotary tables
    for p in model.parameters():
        p.requires_grad = False
    return LoadedModel(model, config, model_dir, [], prequantized=bool(bnb))


def _load_fused_experts(
    linears: dict[str, LoRALinear], ckpt: SafetensorsCheckpoint, key: str, name: str, device, dtype: torch.dtype
) -> bool:
    """Quantize a fused 3-D expert tensor (one layer's experts, transformers 5's own layout) into the
    per-expert linears, expert by expert; False when `name` is no such tensor."""
    prefix, _, attr = name.rpartition(".")
    if attr not in ("gate_up_proj", "down_proj") or f"{prefix}.0.{PROJECTION_OF[attr]}" not in linears:
        return False
    for part, weight in fused_expert_parts(name, ckpt.finite(key)):
        linears[part.removesuffix(".weight")].set_base_weight(weight.to(device=device, dtype=dtype))
    release_host_memory()
    return True


def bnb_groups(keys: list[str], prefixes: set[str]) -> dict[str, list[str]]:
    """{weight name: its keys (packed weight + absmax/quant_map/nested_*/quant_state)}."""
    return {p: [k for k in keys if k == p or k.startswith(p + ".")] for p in prefixes}


def _existing_tensor(model: nn.Module, name: str) -> torch.Tensor | None:
    """The (meta) parameter or buffer `name` of the skeleton, or None."""
    module_name, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return None
    return module._parameters.get(attr, module._buffers.get(attr))


def release_host_memory() -> None:
    """Hand freed heap memory back to the OS (glibc). Without it, the per-tensor read buffers,
    interleaved with small long-lived NF4 buffers, fragment the heap and RSS climbs towards the
    checkpoint size although only the NF4 model is in use."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None



def tie_embeddings(model: nn.Module, config: PretrainedConfig) -> None:
    """lm_head's weight IS the input embedding's when the config ties them (Gemma, small Llama-3.2 and
    Qwen2.5): one tensor, counted once. A skeleton built on meta is not tied by transformers."""
    out = model.get_output_embeddings()
    if out is not None and getattr(config.get_text_config(), "tie_word_embeddings", False):
        out.weight = model.get_input_embeddings().weight


def _tie_or_check(model: nn.Module, config: PretrainedConfig, model_dir: Path) -> None:
    """Tie lm_head to the embeddings when the config says so, then refuse leftover meta tensors."""
    out = model.get_output_embeddings()
    if out is not None and out.weight.device.type == "meta":
        tie_embeddings(model, config)
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    missing += [n for n, m in model.named_modules() if isinstance(m, LoRALinear) and m.quantize_base and not m.has_nf4]
    missing += [n for n, m in model.named_modules() if isinstance(m, LoRALinear) and not m.quantize_base and m.weight is None]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(f"{model_dir}: checkpoint lacks weights for {shown}")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
_VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")  # one of them holds the tokens


def check_tokenizer(name_or_path: str | Path):
    """The tokenizer of a model folder (or Hub id), loaded before any weight is: a folder without
    one, or one that does not load, is a one-line error naming the folder and the files expected."""
    return load_tokenizer(resolve_model_dir(str(name_or_path)))


def load_tokenizer(model_dir: str | Path):
    """The checkpoint's tokenizer (never running code from the folder), padding with EOS when it
    defines no pad token (batched training and generation need one)."""
    model_dir = Path(model_dir)
    alternatives = " / ".join(TOKENIZER_FILES[1:3])
    expected = f"a tokenizer needs {TOKENIZER_FILES[0]} (or {alternatives} with {TOKENIZER_FILES[3]})"
    if not any((model_dir / f).is_file() for f in _VOCABULARY_FILES) and not list(model_dir.glob("*.tiktoken")):
        raise FileNotFoundError(f"{model_dir}: no tokenizer files; {expected}: copy them from the base model")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    except (OSError, ValueError, ImportError, AttributeError, KeyError, TypeError) as e:
        why = f"the tokenizer does not load ({one_line(e)})"
        raise ValueError(f"{model_dir}: {why}; {expected} that transformers reads") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def enable_checkpointing(model: nn.Module) -> None:
    """Non-reentrant gradient checkpointing of every decoder layer (transformers >= 5.2x calls it
    `activation_checkpointing_enable`; earlier versions, e.g. 5.17, `gradient_checkpointing_enable`)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
