"""Tiny random models and a character tokenizer, built locally: no download, ever.

The quickstart and the tests use these: a Llama/Mistral/Qwen2 config of a few layers, random
weights saved with `save_pretrained` (sharded safetensors), and a character-level tokenizer
(printable ASCII + newline) saved beside it, so the directory loads like any Hub checkpoint.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, PreTrainedTokenizerFast, Qwen2Config

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = [chr(i) for i in range(32, 127)] + ["\n"]
ARCHITECTURES = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}

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
    tie_word_embeddings: bool = False,
    initializer_range: float = 0.02,
):
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch {arch!r} is not one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[arch](
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        initializer_range=initializer_range,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


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
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with _no_progress_bars():  # a tiny model: no "Writing model shards" bar on the console
        model.save_pretrained(path, max_shard_size=max_shard_size)
    char_tokenizer().save_pretrained(path)
    return path


@contextlib.contextmanager
def _no_progress_bars():
    """transformers' progress bars off for the block, then as they were."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()
