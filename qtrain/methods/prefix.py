"""Prefix tuning and P-tuning v2: trainable key/value prefixes at every attention layer.

Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation"):
k virtual tokens whose activations are free parameters at every layer. In a decoder-only
transformer this is a key/value prefix per layer l, P_k^l and P_v^l [k, n_kv · d_h]; every real
token attends to the prefix and (causally) to the real tokens:

    attn^l(x) = softmax(Q [P_k^l; K]ᵀ / √d_h + M) [P_v^l; V]        M: 0 on the k prefix columns

The prefix is trained through a reparameterisation, P = MLP(P') (the paper: more stable than
training P directly), here PEFT's PrefixEncoder with prefix_projection=True:

    P' = Embedding [k, t]  ->  Linear(t, h)  ->  tanh  ->  Linear(h, L · 2 · t)  =  P [k, L · 2 · t]

t = n_kv · d_h ("token_dim"; PEFT's width for grouped-query attention), h = encoder_hidden_size
(default t), L the number of layers. After training only P is needed: the MLP is folded away.

P-tuning v2 (Liu et al. 2022, "P-Tuning v2: Prompt Tuning Can Be Comparable to Fine-tuning
Universally Across Scales and Tasks"): the same deep prompts at every layer, without the
reparameterisation: P [k, L · 2 · t] is the parameter (PEFT: PREFIX_TUNING, prefix_projection=False).

Layout (PEFT's): P viewed as [k, 2L, n_kv, d_h]; layer l's keys are index 2l, its values 2l + 1.
Prefix keys are used as they are (no RoPE; PEFT passes them as a KV cache), and real tokens take
positions k, k+1, ... (PEFT's cache of length k shifts them; given position_ids are shifted by k).

Model changes (instance only):

* the decoder (`model.get_decoder()`) gets a child `prefix_encoder` (PrefixEncoder, fp32) holding
  `embedding.weight` [k, t] and `transform.0` / `transform.2` (the MLP), or `embedding.weight`
  [k, L · 2 · t] (P-tuning v2, or a folded prefix): model names `model.prefix_encoder.*`;
* a forward pre-hook (with kwargs) on the decoder: position_ids + k (created from the cache's
  length when not given);
* a forward pre-hook (with kwargs) on every layer's `self_attn`: its layer's prefix (computed from
  the parameters there, so that gradient checkpointing recomputes it with the layer) goes into a
  stateless `PrefixCache` standing in for the attention's cache argument (None in training, the
  real cache in generation): its `update` returns [prefix; keys], [prefix; values], after updating
  the real cache with the real tokens only (the real cache never holds the prefix). The 4D mask
  gets k always-visible columns in front (bool for sdpa, 0 for eager's additive mask); when
  transformers passed no mask (sdpa's causal fast path) an explicit causal mask is built, as
  sdpa's is_causal would be wrong once keys outnumber queries.

Attention: sdpa (qtrain's default) and eager; others (flash_attention_2, flex) raise.

Packing (position_ids restarting per packed example, no attention_mask): transformers builds the
block-diagonal mask from the (shifted) position_ids; every query also sees the k prefix columns,
so each packed example sees the prefix exactly as it would unpacked. A padded 2D attention_mask
masks padding among the real keys; the prefix stays visible (as PEFT's mask of k ones).
Generation (`model.generate`, with a DynamicCache) works unchanged; greedy decoding with the
cache equals recomputing the full sequence.

Trainable parameters: prefix tuning k·t + (t·h + h) + (h·L·2t + L·2t); P-tuning v2 k·L·2t.
No identity at init: the prefixes change the output from the start (as in both papers).

Saving (PEFT's format): adapter_config.json with peft_type PREFIX_TUNING (num_virtual_tokens,
token_dim t, num_attention_heads n_kv, num_layers, encoder_hidden_size, prefix_projection) and one
tensor `prompt_embeddings` [k, L · 2t]: P itself (P-tuning v2) or the MLP's output (prefix tuning,
`folds`; what PEFT's save_pretrained writes). `from_peft` returns it under
`...prefix_encoder.embedding.weight`, and prefix tuning's `load_state_dict` then folds the model:
the MLP is dropped and the fixed prefix used (qtrain.methods.io also keeps the MLP in
method.safetensors: `load_method(..., resume=True)` restores it to continue training). `to_peft`
folds layer by layer with the forward's own function (`mlp_prefix`), so the folded model gives the
training model's outputs bit for bit when both run on the same device (to fp32 rounding otherwise).
PeftModel.from_pretrained(base, dir) loads the saved prefix and gives our logits (tested on a
bitsandbytes NF4 base: bit-identical). (PEFT 0.21.2's own `generate` mishandles prefix tuning's
cache under transformers 5.24; its forward is right, and our generation matches its greedy decoding.)
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from qtrain.methods.base import PeftMethod, decoder_layers

if TYPE_CHECKING:
    from transformers import PretrainedConfig

MODULE = "prefix_encoder"
EMBEDDING = "embedding.weight"
MLP = tuple(f"transform.{i}.{p}" for i in (0, 2) for p in ("weight", "bias"))  # W1, b1, W2, b2
PEFT_KEY = "prompt_embeddings"
ATTENTION = ("sdpa", "eager")


def prefix_dims(config: PretrainedConfig) -> dict[str, int]:
    """PEFT's prefix dimensions (`_prepare_prompt_learning_config`, GQA aware): token_dim t = n_kv · d_h,
    num_attention_heads = n_kv, num_layers = L."""
    c = config.get_text_config()
    head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    return {"token_dim": kv * head, "num_attention_heads": kv, "num_layers": c.num_hidden_layers}


def mlp_prefix(e: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, layer: int):
    """Layer `layer`'s columns of MLP(P') = W2 tanh(W1 P' + b1) + b2: [k, 2t] (keys, then values)."""
    rows = slice(2 * e.shape[1] * layer, 2 * e.shape[1] * (layer + 1))
    return F.linear(torch.tanh(F.linear(e, w1, b1)), w2[rows], b2[rows])  # [k, 2t]


class PrefixEncoder(nn.Module):
    """P [k, L · 2t] (`embedding` only) or P = MLP(P') (`embedding` [k, t] and `transform`), fp32."""

    def __init__(self, k: int, dims: dict[str, int], hidden: int | None, device: torch.device) -> None:
        super().__init__()
        self.num_virtual_tokens, self.token_dim = k, dims["token_dim"]
        self.num_heads, self.num_layers = dims["num_attention_heads"], dims["num_layers"]
        t, width = self.token_dim, self.num_layers * 2 * self.token_dim
        kw = {"device": device, "dtype": torch.float32}
        self.embedding = nn.Embedding(k, t if hidden else width, **kw)  # N(0, 1), as PEFT
        self.transform = None
        if hidden:
            self.transform = nn.Sequential(nn.Linear(t, hidden, **kw), nn.Tanh(), nn.Linear(hidden, width, **kw))

    def layer_prefix(self, layer: int) -> torch.Tensor:
        """[k, 2t]: layer `layer`'s keys (first t columns) and values."""
        e = self.embedding.weight
        if self.transform is None:
            return e[:, 2 * self.token_dim * layer : 2 * self.token_dim * (layer + 1)]
        first, last = self.transform[0], self.transform[2]
        return mlp_prefix(e, first.weight, first.bias, last.weight, last.bias, layer)

    def fold(self, prefix: torch.Tensor) -> None:
        """Use the fixed prefix P [k, L · 2t] from now on (the MLP is dropped)."""
        old = self.embedding.weight
        self.embedding = nn.Embedding(*prefix.shape, device=old.device, dtype=torch.float32)
        with torch.no_grad():
            self.embedding.weight.copy_(prefix)
        self.embedding.weight.requires_grad_(old.requires_grad)
        self.transform = None


class PrefixCache:
    """Stands in for an attention's cache argument: `update` returns the prefix followed by the keys
    and values (the real cache, when there is one, is updated with the real tokens only)."""

    def __init__(self, cache, key: torch.Tensor, value: torch.Tensor) -> None:
        self.cache, self.key, self.value = cache, key, value  # key, value: [B, n_kv, k, d_h] fp32

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.cache is not None:
            key_states, value_states = self.cache.update(key_states, value_states, *args, **kwargs)
        key = torch.cat([self.key.to(key_states), key_states], dim=2)  # [B, n_kv, k + T, d_h]
        return key, torch.cat([self.value.to(value_states), value_states], dim=2)

    def __getattr__(self, name: str):
        cache = self.__dict__.get("cache")
        if cache is None:
            raise AttributeError(name)
        return getattr(cache, name)


def _check_attention(module: nn.Module) -> None:
    impl = getattr(module.config, "_attn_implementation", None)
    if impl not in ATTENTION:
        raise ValueError(
            f"prefix tuning supports attn_implementation {' or '.join(ATTENTION)}, not {impl!r} "
            "(load the model with attn_implementation='sdpa')"
        )


def _mask_with_prefix(mask, module: nn.Module, k: int, hidden: torch.Tensor, cache, layer: int) -> torch.Tensor | None:
    """The attention's 4D mask [B, 1, S, T] with k visible columns in front: [B, 1, S, k + T]."""
    s = hidden.shape[1]
    if mask is None:
        if s == 1 or module.config._attn_implementation != "sdpa" or not getattr(module, "is_causal", True):
            return None  # no mask: every key is visible, the prefix too
        p = cache.get_seq_length(layer) if cache is not None else 0  # real tokens already cached
        causal = torch.ones(s, p + s, dtype=torch.bool, device=hidden.device).tril(diagonal=p)
        return F.pad(causal, (k, 0), value=True)[None, None]  # [1, 1, S, k + T]
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        raise ValueError(
            f"prefix tuning: expected a 4D attention mask in the attention layer, got {type(mask).__name__}"
        )
    visible = True if mask.dtype == torch.bool else 0.0
    return torch.cat([mask.new_full((*mask.shape[:-1], k), visible), mask], dim=-1)


def prepend_prefix(module: nn.Module, args: tuple, kwargs: dict, *, encoder: PrefixEncoder, layer: int, cache_kw: str):
    """Forward pre-hook (with_kwargs) of layer `layer`'s self_attn: see the module docstring."""
    _check_attention(module)
    if len(args) > 1:
        raise ValueError("prefix tuning: the attention's mask and cache must be passed by keyword")
    hidden = args[0] if args else kwargs["hidden_states"]  # [B, S, D]
    b = hidden.shape[0]
    k, n, t = encoder.num_virtual_tokens, encoder.num_heads, encoder.token_dim
    kv = encoder.layer_prefix(layer).view(k, 2, n, t // n).permute(1, 2, 0, 3)  # [2, n_kv, k, d_h]
    key, value = (x.unsqueeze(0).expand(b, -1, -1, -1) for x in kv)  # [B, n_kv, k, d_h]
    cache = kwargs.get(cache_kw)
    kwargs = dict(kwargs)
    kwargs["attention_mask"] = _mask_with_prefix(kwargs.get("attention_mask"), module, k, hidden, cache, layer)
    kwargs[cache_kw] = PrefixCache(cache, key, value)
    return args, kwargs


def shift_positions(module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook (with_kwargs) of the decoder: position_ids + k (real tokens follow the prefix)."""
    kwargs = dict(kwargs)
    if len(args) > 3:
        raise ValueError("prefix tuning: pass the decoder's cache and inputs_embeds by keyword")
    kwargs.update(zip(("input_ids", "attention_mask", "position_ids"), args))
    k = getattr(module, MODULE).num_virtual_tokens
    pos = kwargs.get("position_ids")
    if pos is None and kwargs.get("cache_position") is not None:  # transformers < 5.20 passes it in generation
        pos = kwargs["cache_position"].unsqueeze(0)
    if pos is None:
        x = kwargs["input_ids"] if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
        cache = kwargs.get("cache")
        cache = kwargs.get("past_key_values") if cache is None else cache
        past = cache.get_seq_length() if cache is not None else 0
        pos = torch.arange(past, past + x.shape[1], device=x.device).unsqueeze(0)  # [1, S]
    kwargs["position_ids"] = pos + k
    return (), kwargs


def _cache_keyword(attn: nn.Module) -> str:
    params = inspect.signature(attn.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise ValueError(f"prefix tuning: {type(attn).__name__}.forward takes no cache argument")


@dataclass
class _Prefix(PeftMethod):
    hooks_attention: ClassVar[bool] = True
    """What prefix tuning and P-tuning v2 share: the encoder, the hooks, PEFT's format."""

    peft_type: ClassVar[str | None] = "PREFIX_TUNING"
    num_virtual_tokens: int = 20

    def __post_init__(self) -> None:
        k = self.num_virtual_tokens
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"{self.name}.num_virtual_tokens must be a positive integer, got {k!r}")

    def _hidden(self, token_dim: int) -> int | None:
        """The MLP's hidden size; None: no reparameterisation."""
        return None

    def apply(self, model: nn.Module) -> None:
        decoder = model.get_decoder()
        if MODULE in decoder._modules:
            raise ValueError(f"{self.name}: the decoder already has a {MODULE} (prefix tuning applied twice?)")
        _check_attention(decoder.layers[0].self_attn)
        dims = prefix_dims(model.config)
        device = decoder.embed_tokens.weight.device
        encoder = PrefixEncoder(self.num_virtual_tokens, dims, self._hidden(dims["token_dim"]), device)
        decoder.add_module(MODULE, encoder)
        self.hooks.forward_pre(decoder, shift_positions, with_kwargs=True)
        for i, layer in enumerate(decoder_layers(model)):
            hook = functools.partial(prepend_prefix, encoder=encoder, layer=i, cache_kw=_cache_keyword(layer.self_attn))
            self.hooks.forward_pre(layer.self_attn, hook, with_kwargs=True)
        self._embedding = next(n for n, p in model.named_parameters() if p is encoder.embedding.weight)
        self._dims = dims

    def remove(self, model: nn.Module) -> None:
        """Undo `apply` (the model is the base again)."""
        self.hooks.remove(model)
        model.get_decoder()._modules.pop(MODULE, None)

    def owns(self, param_name: str) -> bool:
        return f".{MODULE}." in f".{param_name}"

    def prefix_keys(self) -> int:
        return self.num_virtual_tokens

    def expected_trainable(self, config: PretrainedConfig) -> int:
        d = prefix_dims(config)
        return self.num_virtual_tokens * d["num_layers"] * 2 * d["token_dim"]

    # ---- PEFT's format ----

    def _peft_dims(self, base_model: str) -> dict[str, int]:
        dims = getattr(self, "_dims", None)
        if dims is None:
            from transformers import AutoConfig

            dims = prefix_dims(AutoConfig.from_pretrained(base_model, trust_remote_code=False))
        return dims

    def peft_config(self, base_model: str) -> dict:
        dims = self._peft_dims(base_model)
        hidden = self._hidden(dims["token_dim"])
        return {
            "peft_type": "PREFIX_TUNING",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "num_virtual_tokens": self.num_virtual_tokens,
            **dims,
            "num_transformer_submodules": 1,
            "encoder_hidden_size": hidden or dims["token_dim"],
            "prefix_projection": hidden is not None,
            "inference_mode": True,
        }

    def to_peft(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Our tensors -> {`prompt_embeddings`: P [k, L · 2t]} (the MLP's output when there is one)."""
        by_suffix = {n.partition(f"{MODULE}.")[2]: t for n, t in tensors.items() if self.owns(n)}
        if len(by_suffix) != len(tensors) or set(by_suffix) not in ({EMBEDDING}, {EMBEDDING, *MLP}):
            raise ValueError(f"{self.name}: expected the {MODULE} tensors, got {sorted(tensors)}")
        e = by_suffix[EMBEDDING].detach().float()
        if len(by_suffix) == 1:
            return {PEFT_KEY: e.contiguous()}
        w1, b1, w2, b2 = (by_suffix[name].detach().float() for name in MLP)
        with torch.no_grad():
            layers = [mlp_prefix(e, w1, b1, w2, b2, i) for i in range(w2.shape[0] // (2 * e.shape[1]))]
        return {PEFT_KEY: torch.cat(layers, dim=1).contiguous()}  # [k, L · 2t]

    def from_peft(self, tensors: dict[str, torch.Tensor], source: str = "adapter") -> dict[str, torch.Tensor]:
        """PEFT's {`prompt_embeddings`: [k, L · 2t]} -> {`<decoder>.prefix_encoder.embedding.weight`: P}."""
        if set(tensors) != {PEFT_KEY}:
            raise ValueError(f"{source}: expected the single key {PEFT_KEY!r}, got {sorted(tensors)}")
        p = tensors[PEFT_KEY]
        dims = getattr(self, "_dims", None)
        width = dims["num_layers"] * 2 * dims["token_dim"] if dims else None
        if p.dim() != 2 or p.shape[0] != self.num_virtual_tokens or (width and p.shape[1] != width):
            want = f"[{self.num_virtual_tokens}, {width or 'L·2·token_dim'}]"
            raise ValueError(
                f"{source}: {PEFT_KEY} has shape {list(p.shape)}, expected {want} (num_virtual_tokens, layers, KV width)"
            )
        return {getattr(self, "_embedding", f"model.{MODULE}.{EMBEDDING}"): p}


@dataclass
class PTuningV2(_Prefix):
    """P-tuning v2: the deep prompts P [k, L · 2t] are the parameter (PEFT: prefix_projection false)."""

    name: ClassVar[str] = "p_tuning_v2"


@dataclass
class PrefixTuning(_Prefix):
    """Prefix tuning: P = MLP(P') while training (prefix_projection), folded to P when saved."""

    name: ClassVar[str] = "prefix_tuning"
    folds: ClassVar[bool] = True
    # the reparameterisation MLP's hidden size; None: token_dim (n_kv · head_dim), as PEFT
    encoder_hidden_size: int | None = None
    # train P through the MLP (the paper); false: P directly (as p_tuning_v2)
    prefix_projection: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        h = self.encoder_hidden_size
        if h is not None and (not isinstance(h, int) or isinstance(h, bool) or h < 1):
            raise ValueError(f"prefix_tuning.encoder_hidden_size must be a positive integer or null, got {h!r}")
        if h is not None and not self.prefix_projection:
            raise ValueError("prefix_tuning.encoder_hidden_size is the MLP's size: it needs prefix_projection: true")

    def _hidden(self, token_dim: int) -> int | None:
        return (self.encoder_hidden_size or token_dim) if self.prefix_projection else None

    def expected_trainable(self, config: PretrainedConfig) -> int:
        d = prefix_dims(config)
        t, width, h = d["token_dim"], d["num_layers"] * 2 * d["token_dim"], self._hidden(d["token_dim"])
        if h is None:
            return self.num_virtual_tokens * width
        return self.num_virtual_tokens * t + (t * h + h) + (h * width + width)

    def load_state_dict(self, model: nn.Module, tensors: dict[str, torch.Tensor], source: str = "adapter") -> None:
        """The MLP's tensors (training state), or a folded P (from `from_peft`): the model then uses P."""
        encoder = getattr(model.get_decoder(), MODULE)
        p = tensors.get(self._embedding) if len(tensors) == 1 else None
        width = encoder.num_layers * 2 * encoder.token_dim
        if encoder.transform is not None and p is not None and tuple(p.shape) == (encoder.num_virtual_tokens, width):
            encoder.fold(p)
            return
        super().load_state_dict(model, tensors, source)
