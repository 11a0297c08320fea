"""`qtrain export`: base + adapter -> a merged Hugging Face checkpoint, or GGUF files + an Ollama Modelfile.

    --format hf     OUT/ is the merged checkpoint (sharded safetensors + index, config, tokenizer,
                    chat template, generation config): transformers, vLLM, TGI load it.
    --format gguf   OUT/<name>-<TYPE>.gguf per --gguf-type and OUT/Modelfile: llama.cpp, Ollama
                    (`ollama create NAME -f OUT/Modelfile`), LM Studio load them.

Both stream (`qtrain.adapter.merge_adapter`, `qtrain.gguf_export.write_gguf`): host RAM stays about one
tensor plus one shard. OUT is built in a temporary folder beside it and renamed into place; an
existing OUT must be an empty folder (nothing of a user's is ever replaced). Without --adapter the
base itself is converted.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

CHECK_TEXT = "The quick brown fox jumps over the lazy dog."


@dataclass
class ExportResult:
    out: Path
    files: list[Path]
    logit_diff: float | None  # max |merged - (base + adapter)| over the check tokens; None: not measured


def check_out(out: Path) -> None:
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise ValueError(f"{out}: exists and is not an empty folder; export into a new or empty folder")


def export(
    base: str,
    adapter: str | None,
    out: str | Path,
    fmt: str = "hf",
    gguf_types: tuple[str, ...] = ("q8_0",),
    dtype: torch.dtype = torch.bfloat16,
    base_weights: str = "nf4",
    check_tokens: int = 8,
    max_shard_bytes: int = 2 << 30,
) -> ExportResult:
    """Export base + adapter to `out` (see the module docstring); `check_tokens` > 0: measure the
    merged model's logits against base + adapter as qtrain computes them on that many tokens."""
    from qtrain.adapter import merge_adapter
    from qtrain.checkpoint import resolve_model_dir

    if fmt not in ("hf", "gguf"):
        raise ValueError(f"--format {fmt!r}; choose hf or gguf")
    out = Path(out)
    check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp", dir=out.parent))
    try:
        if adapter is not None:
            merged = merge_adapter(base, adapter, tmp / "hf", dtype=dtype, base_weights=base_weights, max_shard_bytes=max_shard_bytes)
        else:
            merged = resolve_model_dir(base)
        diff = logit_difference(base, adapter, merged, check_tokens) if adapter is not None and check_tokens else None
        if fmt == "hf":
            result = tmp / "hf" if adapter is not None else _copy_checkpoint(merged, tmp / "hf")
        else:
            result = tmp / "gguf"
            result.mkdir()
            _write_ggufs(merged, result, gguf_types, _model_name(adapter or base))
        result.chmod(0o777 & ~_umask())  # mkdtemp's folders are private (0700); the export is a normal folder
        os.replace(result, out)  # onto a missing or empty folder: one rename
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # ours: made above
    return ExportResult(out, sorted(p for p in out.iterdir()), diff)


def _model_name(folder: str) -> str:
    """The GGUF's name: the folder's, or the run's for qtrain's runs/NAME/adapter."""
    path = Path(folder).resolve()
    return path.parent.name if path.name == "adapter" else path.name


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_ggufs(merged: Path, folder: Path, types: tuple[str, ...], name: str) -> None:
    from qtrain.gguf_export import chat_template, modelfile, write_gguf

    files = [f"{name}-{t.upper()}.gguf" for t in types]
    for t, f in zip(types, files):
        write_gguf(merged, folder / f, t, name)
    tcfg_path = merged / "tokenizer_config.json"
    tcfg = json.loads(tcfg_path.read_text()) if tcfg_path.exists() else {}
    tokens = {k: _token_text(tcfg.get(k)) for k in ("bos_token", "eos_token")}
    (folder / "Modelfile").write_text(modelfile(files[0], chat_template(merged), tokens))


def _token_text(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _copy_checkpoint(src: Path, dst: Path) -> Path:
    from qtrain.adapter import _is_tokenizer_file

    dst.mkdir()
    for f in src.iterdir():
        if f.is_file() and (f.suffix == ".safetensors" or f.name in ("config.json", "model.safetensors.index.json") or _is_tokenizer_file(f.name)):
            shutil.copy2(f, dst / f.name)
    return dst


def logit_difference(base: str, adapter: str, merged: Path, n_tokens: int) -> float:
    """max |logits(merged) - logits(base + adapter)| on CPU, on the first `n_tokens` of CHECK_TEXT:
    base + adapter as qtrain trained it (NF4 base in the training dtype, when it was trained so),
    the merged model in fp32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qtrain.adapter import load_adapter_weights, read_adapter_config, read_training_info
    from qtrain.model import load_model
    from qtrain.tiny import no_progress_bars

    ids = AutoTokenizer.from_pretrained(merged)(CHECK_TEXT, return_tensors="pt")["input_ids"][:, :n_tokens]
    spec = read_adapter_config(adapter)
    info = read_training_info(adapter)  # the base as it was held in training
    dtype = getattr(torch, info.get("base_dtype", "float32"))
    loaded = load_model(base, spec, compute_dtype=dtype, quantize=info.get("quantized", True))
    load_adapter_weights(loaded.model, adapter)
    with torch.no_grad():
        want = loaded.model.eval()(ids).logits.float()
        del loaded
        with no_progress_bars():
            got = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()(ids).logits.float()
    return float((got - want).abs().max())
