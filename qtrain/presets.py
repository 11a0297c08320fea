"""The architectures of common 7-8B models (and Llama-3.1-70B, for FSDP), from their config.json, so that memory estimates and the
GPU memory benchmark need neither a download nor a Hub login (Llama repositories are gated).

`resolve_config("meta-llama/Llama-3.1-8B-Instruct")` gives the preset when the name is a known Hub
id or preset name; a local checkpoint directory or config.json is read; any other Hub id is fetched
by transformers (config.json only).
"""

from __future__ import annotations

from pathlib import Path

from transformers import (
    AutoConfig,
    Gemma2Config,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Phi3Config,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
)

_LLAMA = dict(hidden_act="silu", rms_norm_eps=1e-5, tie_word_embeddings=False, num_hidden_layers=32, hidden_size=4096)

# name → (config class, config.json fields that matter for memory and shapes)
PRESETS: dict[str, tuple[type, dict]] = {
    "llama-2-7b": (LlamaConfig, dict(_LLAMA, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                                      vocab_size=32000, max_position_embeddings=4096, rope_theta=10000.0)),
    "llama-3.1-8b": (LlamaConfig, dict(_LLAMA, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                                        vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
                                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})),
    # 70B: 80 layers of 8192, what FSDP across two 24 GB cards is for (qtrain.fsdp)
    "llama-3.1-70b": (LlamaConfig, dict(_LLAMA, num_hidden_layers=80, hidden_size=8192, intermediate_size=28672,
                                         num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
                                         max_position_embeddings=131072, rope_theta=500000.0,
                                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})),
    "mistral-7b": (MistralConfig, dict(_LLAMA, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                                        vocab_size=32768, max_position_embeddings=32768, rope_theta=1e6, sliding_window=None)),
    "qwen2.5-7b": (Qwen2Config, dict(hidden_act="silu", rms_norm_eps=1e-6, tie_word_embeddings=False, num_hidden_layers=28,
                                      hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
                                      vocab_size=152064, max_position_embeddings=32768, rope_theta=1e6)),
    "gemma-2-9b": (Gemma2Config, dict(hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, tie_word_embeddings=True,
                                       num_hidden_layers=42, hidden_size=3584, intermediate_size=14336, num_attention_heads=16,
                                       num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256, vocab_size=256000,
                                       max_position_embeddings=8192, rope_theta=10000.0, sliding_window=4096,
                                       final_logit_softcapping=30.0, attn_logit_softcapping=50.0)),
    "qwen3-8b": (Qwen3Config, dict(hidden_act="silu", rms_norm_eps=1e-6, tie_word_embeddings=False, num_hidden_layers=36,
                                    hidden_size=4096, intermediate_size=12288, num_attention_heads=32, num_key_value_heads=8,
                                    head_dim=128, vocab_size=151936, max_position_embeddings=40960, rope_theta=1e6)),
    # Phi-4-mini: fused qkv_proj/gate_up_proj, tied 200k vocabulary, rotary on 3/4 of each head (its long-context
    # rope scaling changes no shape or byte, so it is left out)
    "phi-4-mini": (Phi3Config, dict(hidden_act="silu", rms_norm_eps=1e-5, tie_word_embeddings=True, num_hidden_layers=32,
                                     hidden_size=3072, intermediate_size=8192, num_attention_heads=24, num_key_value_heads=8,
                                     vocab_size=200064, max_position_embeddings=131072, rope_theta=10000.0,
                                     partial_rotary_factor=0.75, pad_token_id=199999, bos_token_id=199999,
                                     eos_token_id=199999)),
    # mixture-of-experts: every expert held in NF4 (qtrain.moe)
    "qwen3-30b-a3b": (Qwen3MoeConfig, dict(hidden_act="silu", rms_norm_eps=1e-6, tie_word_embeddings=False, num_hidden_layers=48,
                                           hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                                           num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                                           num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=151936,
                                           max_position_embeddings=40960, rope_theta=1e6)),
    "mixtral-8x7b": (MixtralConfig, dict(_LLAMA, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                                          num_local_experts=8, num_experts_per_tok=2, vocab_size=32000,
                                          max_position_embeddings=32768, rope_theta=1e6, sliding_window=None)),
}  # fmt: skip

# Hub ids with these architectures (base and instruct models share them).
HUB_IDS = {
    "meta-llama/Llama-2-7b-hf": "llama-2-7b",
    "meta-llama/Llama-2-7b-chat-hf": "llama-2-7b",
    "meta-llama/Llama-3.1-8B": "llama-3.1-8b",
    "meta-llama/Llama-3.1-8B-Instruct": "llama-3.1-8b",
    "meta-llama/Meta-Llama-3.1-8B": "llama-3.1-8b",
    "meta-llama/Meta-Llama-3.1-8B-Instruct": "llama-3.1-8b",
    "meta-llama/Llama-3.1-70B": "llama-3.1-70b",
    "meta-llama/Llama-3.1-70B-Instruct": "llama-3.1-70b",
    "meta-llama/Meta-Llama-3.1-70B-Instruct": "llama-3.1-70b",
    "mistralai/Mistral-7B-v0.3": "mistral-7b",
    "mistralai/Mistral-7B-Instruct-v0.3": "mistral-7b",
    "Qwen/Qwen2.5-7B": "qwen2.5-7b",
    "Qwen/Qwen2.5-7B-Instruct": "qwen2.5-7b",
    "google/gemma-2-9b": "gemma-2-9b",
    "google/gemma-2-9b-it": "gemma-2-9b",
    "Qwen/Qwen3-8B": "qwen3-8b",
    "Qwen/Qwen3-8B-Base": "qwen3-8b",
    "microsoft/Phi-4-mini-instruct": "phi-4-mini",
    "microsoft/Phi-4-mini-reasoning": "phi-4-mini",
    "Qwen/Qwen3-30B-A3B": "qwen3-30b-a3b",
    "Qwen/Qwen3-30B-A3B-Base": "qwen3-30b-a3b",
    "Qwen/Qwen3-30B-A3B-Instruct-2507": "qwen3-30b-a3b",
    "mistralai/Mixtral-8x7B-v0.1": "mixtral-8x7b",
    "mistralai/Mixtral-8x7B-Instruct-v0.1": "mixtral-8x7b",
}


def preset_config(name: str) -> PretrainedConfig:
    cls, fields = PRESETS[name]
    return cls(**fields)


def resolve_config(name_or_path: str) -> PretrainedConfig:
    """A preset (by name or known Hub id), a local checkpoint dir / config.json, or a Hub id's config."""
    key = HUB_IDS.get(name_or_path, name_or_path.lower())
    if key in PRESETS:
        return preset_config(key)
    path = Path(name_or_path)
    if path.is_file() and path.name == "config.json":
        path = path.parent
    if path.is_dir():
        from qtrain.model import read_config

        return read_config(path)
    try:
        return AutoConfig.from_pretrained(name_or_path, trust_remote_code=False)
    except (OSError, ValueError) as e:
        from qtrain.model import one_line

        if path.is_file():
            raise ValueError(f"{path}: not a config transformers reads without running code ({one_line(e)})") from None
        known = ", ".join(PRESETS)
        raise ValueError(f"{name_or_path}: not a local checkpoint and its config.json could not be fetched ({one_line(e)}); known architectures: {known}") from None
