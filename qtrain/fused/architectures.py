"""The model families with fused modules: per `model_type`, the stock attention / MLP / RMSNorm classes
and the fused attention class replacing its attention.

Adding a Llama-like family: a `Fused<Family>Attention(FusedAttention, <its attention class>)` with its
`rotary` and `eager` functions, `new_cache_api` (`takes_cache_argument`), `forward` (`forward_for`) and, when it has a
sliding window, `window_kwargs`; then one `ARCHITECTURES` line. Other model types are left alone
by `apply_fused_ops` (the reason recorded).
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers.models.llama import modeling_llama as llama
from transformers.models.mistral import modeling_mistral as mistral
from transformers.models.qwen2 import modeling_qwen2 as qwen2
from transformers.models.qwen3 import modeling_qwen3 as qwen3

from qtrain.fused.attention import FusedAttention, forward_for, takes_cache_argument


class FusedLlamaAttention(FusedAttention, llama.LlamaAttention):
    rotary = staticmethod(llama.apply_rotary_pos_emb)
    eager = staticmethod(llama.eager_attention_forward)
    new_cache_api = takes_cache_argument(llama.LlamaAttention)
    forward = forward_for(llama.LlamaAttention)


class FusedMistralAttention(FusedAttention, mistral.MistralAttention):
    rotary = staticmethod(mistral.apply_rotary_pos_emb)
    eager = staticmethod(mistral.eager_attention_forward)
    new_cache_api = takes_cache_argument(mistral.MistralAttention)
    forward = forward_for(mistral.MistralAttention)

    def window_kwargs(self) -> dict:
        return {"sliding_window": getattr(self.config, "sliding_window", None)}


class FusedQwen2Attention(FusedAttention, qwen2.Qwen2Attention):
    rotary = staticmethod(qwen2.apply_rotary_pos_emb)
    eager = staticmethod(qwen2.eager_attention_forward)
    new_cache_api = takes_cache_argument(qwen2.Qwen2Attention)
    forward = forward_for(qwen2.Qwen2Attention)

    def window_kwargs(self) -> dict:
        return {"sliding_window": getattr(self, "sliding_window", None)}


@dataclass(frozen=True)
class Architecture:
    """The stock module classes of one model type and the fused attention class replacing its attention
    (None: the attention stays stock; `qtrain.families.fused_support` then allows no attention op)."""

    attention: type
    mlp: type
    norm: type
    fused_attention: type | None = None


ARCHITECTURES = {
    "llama": Architecture(llama.LlamaAttention, llama.LlamaMLP, llama.LlamaRMSNorm, FusedLlamaAttention),
    "mistral": Architecture(
        mistral.MistralAttention, mistral.MistralMLP, mistral.MistralRMSNorm, FusedMistralAttention
    ),
    "qwen2": Architecture(qwen2.Qwen2Attention, qwen2.Qwen2MLP, qwen2.Qwen2RMSNorm, FusedQwen2Attention),
    # Qwen3: Llama's RMSNorm and SwiGLU MLP; its attention (q/k RMSNorm before RoPE) stays stock
    "qwen3": Architecture(qwen3.Qwen3Attention, qwen3.Qwen3MLP, qwen3.Qwen3RMSNorm),
}
