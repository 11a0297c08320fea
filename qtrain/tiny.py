"""Tiny random models and a character tokenizer, built locally: no download, ever.

The quickstart and the tests use these: a config of a few layers from a supported family's own
transformers config class (`qtrain.families`), random
weights saved with `save_pretrained` (sharded safetensors), and a character-level tokenizer
(printable ASCII + newline) saved beside it, so the directory loads like any Hub checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from qtrain.families import FAMILIES

TINY_SPEC = "qtrain-tiny.json"  # what a tiny base was built from; written last: its presence means complete
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = [chr(i) for i in range(32, 127)] + ["\n"]
ARCHITECTURES = {model_type: family.config_class for model_type, family in FAMILIES.items()}  # config class names
SLIDING_WINDOW = 16  # tiny Gemma's local layers see 16 tokens: shorter than the test rows, so the window matters

TINY_EXPERTS, TINY_TOP_K = 4, 2  # mixture-of-experts: 4 experts, 2 per token


def moe_kwargs(arch: str, intermediate_size: int) -> dict:
    """A tiny MoE config's expert settings (every layer sparse, each expert `intermediate_size` wide);
    {} for a dense family."""
    if arch == "qwen3_moe":
        return {"num_experts": TINY_EXPERTS, "num_experts_per_tok": TINY_TOP_K, "moe_intermediate_size": intermediate_size,
                "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True}
    if arch == "mixtral":
        return {"num_local_experts": TINY_EXPERTS, "num_experts_per_tok": TINY_TOP_K}
    return {}


# A minimal chat template (role headers, one turn per block) so chat data works with it too.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{% if m['role'] == 'assistant' %}"
    "{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character: 4 specials + 95 printable ASCII + newline = 100 tokens."""
    vocab = {token: i for i, token in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("(.|\n)"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
    )


def tiny_config(
    arch: str = "llama",
    hidden_size: int = 64,
    intermediate_size: int = 160,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int = len(SPECIALS) + len(CHARS),
    max_position_embeddings: int = 512,
    tie_word_embeddings: bool | None = None,
    initializer_range: float = 0.02,
    **family_settings,
):
    """A tiny config of family `arch` from its own config class (`qtrain.families`; head_dim = hidden_size /
    num_heads, whatever the family's default). `tie_word_embeddings=None`: the family's habit (Gemma
    ties, the others do not); `family_settings` override `family_defaults` (e.g. a Gemma-2
    `final_logit_softcapping`)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch {arch!r} is not one of {sorted(ARCHITECTURES)}")
    family = {**family_defaults(arch, hidden_size // num_heads, num_layers), **family_settings}
    habit = family.pop("tie_word_embeddings", False)
    tie_word_embeddings = habit if tie_word_embeddings is None else tie_word_embeddings
    config_class = getattr(transformers, ARCHITECTURES[arch])
    return config_class(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        initializer_range=initializer_range,
        head_dim=hidden_size // num_heads,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        **family,
        **moe_kwargs(arch, intermediate_size),
    )


def family_defaults(arch: str, head_dim: int, num_layers: int) -> dict:
    """What a tiny model of `arch` needs beyond the common sizes. Gemma: tied embeddings,
    1/sqrt(head_dim) attention scaling as the real checkpoints have (`tiny_config` sets a head_dim
    that fits the tiny width; the config default is 256), and local (sliding-window) layers
    alternating with global ones, starting local, so that a 2-layer model has one of each; Gemma-2 keeps its config's soft-capping (30 on
    the logits, 50 on attention scores); Gemma-3 has none, q/k norms instead (in its modules)."""
    if arch not in ("gemma2", "gemma3_text"):
        return {}
    layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]
    return {
        "tie_word_embeddings": True,
        "query_pre_attn_scalar": head_dim,
        "sliding_window": SLIDING_WINDOW,
        "layer_types": layer_types,
    }


def build_tiny_model(
    path: str | Path,
    arch: str = "llama",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | int = "5GB",
    **config_kwargs,
) -> Path:
    """Write a random tiny model + the char tokenizer to `path` (a HF checkpoint directory)."""
    path = Path(path)
    config = tiny_config(arch, **config_kwargs)
    with torch.random.fork_rng(devices=[]):  # the caller's RNG stream is left as it was
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    with no_progress_bars():  # a tiny model: no "Writing model shards" bar on the console
        model.save_pretrained(path, max_shard_size=max_shard_size)
    char_tokenizer().save_pretrained(path)
    return path


def ensure_tiny_model(path: str | Path, **spec) -> Path:
    """The tiny base at `path`, built from `spec` (build_tiny_model's arguments) unless already there.

    Built in a temp folder beside `path` and renamed into place with `qtrain-tiny.json` (the spec)
    inside, so a kill mid-build leaves no half base. A base built from another spec is refused: its
    weights are not the ones this config asks for."""
    path = Path(path)
    if path.exists():
        check_tiny_model(path, spec)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp*"):  # left by a kill mid-build: ours by name
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp", dir=path.parent))
    try:
        build_tiny_model(tmp, **spec)
        (tmp / TINY_SPEC).write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def check_tiny_model(path: Path, spec: dict) -> None:
    """ValueError unless `path` is a complete tiny base built from `spec`."""
    try:
        built = json.loads((path / TINY_SPEC).read_text())
    except (OSError, ValueError):
        raise ValueError(
            f"{path}: not a complete tiny base ({TINY_SPEC} missing or unreadable: an interrupted build by an "
            "older qtrain, or another model); move the folder away and run again to rebuild it"
        ) from None
    changed = [f"model.tiny.{k}: {built.get(k)!r} there, {v!r} now" for k, v in sorted(spec.items()) if built.get(k) != v]
    if changed:
        raise ValueError(
            f"{path} was built from another model.tiny ({'; '.join(changed)}); use another output_dir "
            "for this model, or the model.tiny settings it was built from"
        )


@contextlib.contextmanager
def no_progress_bars():
    """transformers' progress bars off for the block, then as they were."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()
