"""LLaMA-Adapter (Zhang et al. 2023, "LLaMA-Adapter: Efficient Fine-tuning of Language Models with
Zero-init Attention"): in each of the top L decoder layers, K learned adaption-prompt tokens
P_l [K, D] that every real token also attends to, through a separate softmax scaled by a learned
gate g_l that starts at zero (zero-init attention), so the model is unchanged at step 0:

    Q = RoPE(W_q x)                    the layer's own (rotated) queries of the real tokens [B, H, S, hd]
    K_p = W_k P_l,  V_p = W_v P_l      the layer's frozen projections of the prompt [K, kv·hd]
    S_p = softmax(Q K_p^T / sqrt(hd))  over the K prompt tokens, in fp32          [B, H, S, K]
    attn(x) = attn_base(x) + W_o ((g_l · S_p) V_p)

W frozen; P_l and g_l trained. The prompt keys carry no position (no RoPE) and no causal structure:
every real token sees all K prompt tokens, so padding, packing and the KV cache need nothing
special (the prompt's K_p, V_p are recomputed from P_l at each forward; K·D products, tiny).
Unlike the base attention (RoPE: relative positions only), the term depends on each token's
ABSOLUTE position (its query is rotated, the prompt keys are not): a left-padded row needs
position_ids counted from its mask, as `model.generate` makes them; qtrain's training batches are
right-padded, or packed with position_ids restarting at 0 per example (each example as unpacked).

As Hugging Face PEFT implements it (peft/tuners/adaption_prompt, `AdaptedAttention`, peft_type
ADAPTION_PROMPT), which this follows operation by operation:
  * P ~ N(0, 1) (the official repo's nn.Embedding init), g = 0 of shape [1], one pair per layer in
    the top `adapter_layers` layers (layers[-L:]); both fp32 here (PEFT: fp32 on a 4-bit base).
  * The query is recomputed from the attention's input: q_proj(hidden_states), rotated with the
    layer's position_embeddings (PEFT's `llama_compute_query_states`). That is one more q_proj
    product per adapted layer (its [B, S, H·hd] output is kept for backward), and with LoRA dropout
    on q_proj the recomputation draws its own dropout mask, as in PEFT. Recomputing (rather than
    catching q_proj's output with a hook) sees whatever another method's hooks do to q_proj.
  * GQA: K_p, V_p are split into the num_key_value_heads heads and each repeated
    num_key_value_groups times (repeat_interleave on the head axis, as transformers' repeat_kv).
    PEFT derives the group count as k_proj.in_features // k_proj.out_features, which equals it when
    hidden_size = num_heads · head_dim (every model it supports); we read the attention's own
    num_key_value_groups and head_dim.
  * scores / sqrt(head_dim), softmax with dtype=fp32, cast to the query's dtype, times the fp32
    gate (type promotion makes the product fp32), @ V_p, heads merged, then o_proj, added to the
    attention output (element 0 of self_attn's (attn_output, attn_weights)).
  One deliberate difference: PEFT calls o_proj on the adapter term separately, so a BIASED o_proj
  (llama with attention_bias=True; none of the default llama/mistral/qwen2 configs) would add its
  bias twice and the model would not be unchanged at init. We subtract the bias once more: the
  term is W_o a (+ LoRA), as in the paper (there the output projection is applied once, to the
  gated attention over [prompt; tokens] as a whole).

Architectures: llama and mistral (PEFT supports both) and qwen2 (PEFT refuses it, "Unsupported
model type for adaption prompt", but its attention is llama's plus q/k/v biases, which the
projections apply to the prompt too). Others (e.g. qwen3's q_norm/k_norm) are refused, since the
query would not be the attention's.

Model changes (instance only): each adapted decoder layer gets a child `llama_adapter`
(AdaptionPrompt: `prompt` [K, D] and `gate` [1], fp32), model names
`model.layers.<i>.llama_adapter.prompt` / `.gate`, and a forward hook (with kwargs) on its
`self_attn` that adds the term to the output. No existing parameter moves (PEFT instead wraps
self_attn, renaming it). The hook runs inside the decoder layer's forward, so gradient
checkpointing recomputes it with the layer; it reads hidden_states / position_embeddings from
the attention's call and never touches the cache (`cache` or `past_key_values`).

Gradients: with g = 0 the prompt gets a zero gradient at step 0 (the term is g · (...)); the gate
gets one, and the prompt learns once g is non-zero, the point of the zero-init.

Precision: the prompt is cast to the hidden states' dtype before k_proj/v_proj (as bitsandbytes
casts a fp32 input to its compute dtype), the softmax is fp32, (g · S_p) V_p is fp32 and cast back
to the hidden dtype before o_proj. With g = 0 the term is exactly zero: identity in any dtype.

Composition: K_p, V_p and the output go through the layer's own k_proj/v_proj/o_proj modules,
i.e. the LoRALinear with its LoRA update (and any hook another method put on them): with LoRA on
k/v/o the prompt's keys/values are (W + s B A) P, and LoRA's A, B get gradients through the
adapter path too, as they would through PEFT's LoRA-wrapped projections.

Trainable parameters: adapter_layers · (adapter_len · hidden_size + 1).

Saving (PEFT's format): adapter_config.json with peft_type ADAPTION_PROMPT, adapter_len,
adapter_layers, target_modules "self_attn"; tensors `base_model.model.model.layers.<i>.self_attn.
adaption_prompt` [1, K, D] and `...self_attn.adaption_gate` [1], as PEFT's save_pretrained writes;
`PeftModel.from_pretrained(base, dir)` loads it (llama, mistral).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from qtrain.methods.base import PeftMethod, decoder_layers

if TYPE_CHECKING:
    from transformers import PretrainedConfig

CHILD = "llama_adapter"  # the child module on each adapted decoder layer
PARAMS = ("prompt", "gate")
PEFT_PREFIX = "base_model.model."
PEFT_NAMES = {"prompt": "self_attn.adaption_prompt", "gate": "self_attn.adaption_gate"}
ARCHITECTURES = ("llama", "mistral", "qwen2")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] on the last axis (RoPE, as transformers' llama)."""
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def rotated_query(attn: nn.Module, hidden: torch.Tensor, position_embeddings) -> torch.Tensor:
    """The attention's RoPE-rotated queries [B, H, S, hd] of `hidden` [B, S, D]."""
    b, s, _ = hidden.shape
    q = attn.q_proj(hidden).view(b, s, -1, attn.head_dim).transpose(1, 2)  # [B, H, S, hd]
    cos, sin = position_embeddings  # [B, S, hd]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin


def prompt_heads(proj: nn.Module, prompt: torch.Tensor, head_dim: int, groups: int) -> torch.Tensor:
    """proj(P) split into heads, KV heads repeated for GQA: [K, D] -> [H, K, hd]."""
    k = prompt.shape[0]
    out = proj(prompt).view(k, -1, head_dim).transpose(0, 1)  # [kv, K, hd]
    return torch.repeat_interleave(out, repeats=groups, dim=0)  # [H, K, hd]


class AdaptionPrompt(nn.Module):
    """One layer's adaption prompt P [K, D] (N(0, 1)) and gate g [1] (zero), fp32."""

    def __init__(self, adapter_len: int, hidden: int, device: torch.device | str | None = None):
        super().__init__()
        self.prompt = nn.Parameter(torch.randn(adapter_len, hidden, device=device, dtype=torch.float32))
        self.gate = nn.Parameter(torch.zeros(1, device=device, dtype=torch.float32))

    def forward(self, attn: nn.Module, hidden: torch.Tensor, position_embeddings) -> torch.Tensor:
        """The adapter term W_o((g · softmax(Q K_p^T / sqrt(hd))) V_p) [B, S, D] for the attention
        module `attn` and its input `hidden` [B, S, D]."""
        b, s, _ = hidden.shape
        hd, groups = attn.head_dim, attn.num_key_value_groups
        prompt = self.prompt.to(hidden.dtype)
        keys = prompt_heads(attn.k_proj, prompt, hd, groups)  # [H, K, hd]
        values = prompt_heads(attn.v_proj, prompt, hd, groups)  # [H, K, hd]
        q = rotated_query(attn, hidden, position_embeddings)  # [B, H, S, hd]
        scores = torch.matmul(q, keys.transpose(1, 2).to(q.dtype)) / math.sqrt(hd)  # [B, H, S, K]
        weights = self.gate * torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)  # [B, H, S, K]
        out = torch.matmul(weights, values.to(weights.dtype))  # [B, H, S, hd]
        out = out.transpose(1, 2).reshape(b, s, -1).to(hidden.dtype)  # [B, S, H·hd]
        term = attn.o_proj(out)  # [B, S, D]
        bias = getattr(attn.o_proj, "bias", None)
        return term - bias.to(term.dtype) if bias is not None else term

    def extra_repr(self) -> str:
        return f"adapter_len={self.prompt.shape[0]}, hidden={self.prompt.shape[1]}"


class AdaptionHook:
    """Forward hook (with_kwargs) of a layer's self_attn: output[0] + the adapter term. A class, so
    that deepcopy/pickle of the model carry the hook to the copy's AdaptionPrompt."""

    def __init__(self, adapter: AdaptionPrompt):
        self.adapter = adapter

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        position_embeddings = args[1] if len(args) > 1 else kwargs.get("position_embeddings")
        if position_embeddings is None:
            raise ValueError("llama_adapter: the attention was called without position_embeddings (cos, sin)")
        y = output[0] if isinstance(output, tuple) else output  # [B, S, D]
        y = y + self.adapter(module, hidden, position_embeddings).to(y.dtype)
        return (y, *output[1:]) if isinstance(output, tuple) else y


@dataclass
class LlamaAdapter(PeftMethod):
    name: ClassVar[str] = "llama_adapter"
    hooks_attention: ClassVar[bool] = True
    peft_type: ClassVar[str | None] = "ADAPTION_PROMPT"
    adapter_len: int = 10  # K, prompt tokens per layer (the paper's 10)
    adapter_layers: int = 30  # L, the top layers that get a prompt (the paper's 30 of LLaMA-7B's 32)

    def __post_init__(self) -> None:
        for key in ("adapter_len", "adapter_layers"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"llama_adapter.{key}: must be an integer >= 1, got {value!r}")

    def _check_layers(self, num_layers: int) -> None:
        if self.adapter_layers > num_layers:
            raise ValueError(
                f"llama_adapter.adapter_layers={self.adapter_layers} is more than the model's {num_layers} "
                f"decoder layers; set llama_adapter.adapter_layers to at most {num_layers}"
            )

    def _targets(self, model: nn.Module) -> list[nn.Module]:
        """The top adapter_layers decoder layers, checked."""
        model_type = model.config.get_text_config().model_type
        if model_type not in ARCHITECTURES:
            raise ValueError(
                f"llama_adapter: model type {model_type!r} is not supported; supported: {', '.join(ARCHITECTURES)}"
            )
        layers = list(decoder_layers(model))
        self._check_layers(len(layers))
        targets = layers[-self.adapter_layers :]
        for layer in targets:
            attn = getattr(layer, "self_attn", None)
            if attn is None or not all(hasattr(attn, p) for p in (*PROJECTIONS, "head_dim", "num_key_value_groups")):
                raise ValueError(
                    f"llama_adapter: decoder layer {layer.__class__.__name__} has no llama-style self_attn"
                )
            if hasattr(layer, CHILD):
                raise ValueError(f"llama_adapter: a decoder layer already has a {CHILD} (applied twice?)")
        return targets

    def apply(self, model: nn.Module) -> None:
        hidden = model.config.get_text_config().hidden_size
        for layer in self._targets(model):
            device = next(layer.parameters()).device
            layer.add_module(CHILD, AdaptionPrompt(self.adapter_len, hidden, device))
            self.hooks.forward(layer.self_attn, AdaptionHook(getattr(layer, CHILD)), with_kwargs=True)

    def remove(self, model: nn.Module) -> None:
        """Undo `apply`: drop the prompts, gates and hooks (the model is the base again)."""
        self.hooks.remove(model)
        for layer in decoder_layers(model):
            layer._modules.pop(CHILD, None)

    def owns(self, param_name: str) -> bool:
        module, _, attr = param_name.rpartition(".")
        return attr in PARAMS and module.rpartition(".")[2] == CHILD

    def saved_bytes_per_token(self, s, e: int) -> int:
        """The recomputed RoPE'd query; the fp32 softmax over the prompt and its cast for @ V."""
        return e * s.H * s.d + (4 + e) * s.H * self.adapter_len

    def expected_trainable(self, config: PretrainedConfig) -> int:
        c = config.get_text_config()
        self._check_layers(c.num_hidden_layers)
        return self.adapter_layers * (self.adapter_len * c.hidden_size + 1)

    # ---- PEFT's format ----

    def peft_config(self, base_model: str) -> dict:
        return {
            "peft_type": "ADAPTION_PROMPT",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "adapter_len": self.adapter_len,
            "adapter_layers": self.adapter_layers,
            "target_modules": "self_attn",
            "revision": None,
            "inference_mode": True,
        }

    def to_peft(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{`<layer>.llama_adapter.prompt` [K, D], `.gate` [1]} ->
        {`base_model.model.<layer>.self_attn.adaption_prompt` [1, K, D], `...adaption_gate` [1]}."""
        out = {}
        for name, t in tensors.items():
            if not self.owns(name):
                raise ValueError(f"llama_adapter: {name!r} is not a LLaMA-Adapter parameter")
            layer, _, attr = name.rpartition(".")
            key = f"{PEFT_PREFIX}{layer.rpartition('.')[0]}.{PEFT_NAMES[attr]}"
            out[key] = (t.unsqueeze(0) if attr == "prompt" else t).detach().contiguous()
        return out

    def from_peft(self, tensors: dict[str, torch.Tensor], source: str = "adapter") -> dict[str, torch.Tensor]:
        """PEFT's keys and shapes -> ours (see `to_peft`)."""
        out = {}
        for key, t in tensors.items():
            name = key.removeprefix(PEFT_PREFIX)
            attr = next((a for a, suffix in PEFT_NAMES.items() if name.endswith("." + suffix)), None)
            if name == key or attr is None:
                raise ValueError(f"{source}: {key!r} is not an adaption prompt or gate (ADAPTION_PROMPT on self_attn)")
            want = (1, self.adapter_len, None) if attr == "prompt" else (1,)
            if t.dim() != len(want) or any(w is not None and w != n for w, n in zip(want, t.shape)):
                shape = f"[1, {self.adapter_len}, hidden_size]" if attr == "prompt" else "[1]"
                raise ValueError(
                    f"{source}: {key!r} has shape {list(t.shape)}, expected {shape} "
                    f"(llama_adapter.adapter_len={self.adapter_len})"
                )
            layer = name.removesuffix("." + PEFT_NAMES[attr])
            out[f"{layer}.{CHILD}.{attr}"] = t.squeeze(0) if attr == "prompt" else t
        return out
