"""Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning"):
k trainable "virtual token" embeddings P [k, D] are prepended to the input embeddings; the whole
model (embedding matrix included) stays frozen:

    h = Decoder([P; E(x)])          the outputs at the k virtual positions are dropped

Model changes (instance only): the decoder (`model.get_decoder()`) gets a fp32 parameter
`prompt_embeddings` [k, D] (model name `model.prompt_embeddings` for llama/qwen2) and the virtual
token hooks of `qtrain.methods.virtual_tokens` (shared with P-tuning), with P before the input:

* training / a full forward / generation's prefill: inputs_embeds = cat(P cast to the embeddings'
  dtype, embed(input_ids)); a 2D attention_mask gets k ones at P's columns; given position_ids are
  shifted by k and the virtual tokens take 0..k-1. With left padding P goes after the pads, right
  before the first attended token (PEFT: before the pads), so a left-padded row gives the outputs
  of the unpadded row.
* generation's decode steps (a non-empty cache, passed as `cache=` by transformers >= 5.24 or
  `past_key_values=` before): nothing is prepended (the k virtual positions are in the cache); a
  2D attention_mask covering the real tokens only gets ones at P's columns; position_ids shift by k.
* `last_hidden_state` loses the virtual positions, so callers (lm_head, the chunked loss of
  `qtrain.train.loss_sum`, `labels`) see [B, S, D] for S input tokens: virtual tokens are never in
  the labels. (`hidden_states` of output_hidden_states keep them.)

Packing (position_ids restarting at 0 per packed example, no attention_mask; transformers makes
attention block-diagonal from the restarts): P is inserted before EVERY packed example, so each one
sees its own prompt exactly as it would unpacked ([P; x_i] with positions 0..k-1, k..k+len-1);
rows are right-padded to the longest expanded row with zero embeddings (their own block, dropped).
With both position_ids and an attention_mask, P is prepended once per row (shift by k).

Generation: `model.generate` (and `qtrain.evaluate.generate`) works unchanged: the prefill
prepends, decode steps extend the mask; greedy decoding with the cache gives the tokens of
recomputing the full sequence each step. Gradient checkpointing recomputes decoder layers only,
the hooks run once per decoder forward.

Init (`init`): "random" is PEFT's RANDOM (nn.Embedding's default, N(0, 1)); "sample_vocab" is
PEFT's SAMPLE_VOCAB and the paper's "sampled vocab" (rows of the embedding matrix at uniformly
drawn token ids); "text" is PEFT's TEXT: the embeddings of `init_text`'s token ids (tokenized with
special tokens, as PEFT does), repeated / cut to k. The tokenizer is `tokenizer_path`, or else the
model's `name_or_path` (the checkpoint directory `load_model` loaded).

Composition: nothing else in the model changes, so LoRA (load_model with a LoRASpec) and the other
methods compose: mark_trainable(model, [prompt_tuning, lora, ...]) trains both.

Trainable parameters: k · hidden_size.

Saving (PEFT's format): adapter_config.json with peft_type PROMPT_TUNING (num_virtual_tokens,
token_dim, num_transformer_submodules 1, num_attention_heads, num_layers, prompt_tuning_init,
task_type CAUSAL_LM) and one tensor `prompt_embeddings` [k, D], as PEFT's save_pretrained writes;
PeftModel.from_pretrained(base, dir) loads it (its logits cover the k virtual positions too).

Prompt ensembling (paper §7): `ensemble_logits(model, prompts, batch)` runs N prompts in one batch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

import torch
from torch import nn

from qtrain.methods.base import PeftMethod
from qtrain.methods.virtual_tokens import Placement, VirtualTokens, load_tokenizer, peft_dims

if TYPE_CHECKING:
    from transformers import PretrainedConfig

PARAM = "prompt_embeddings"
PEFT_KEY = "prompt_embeddings"
PEFT_INIT = {"random": "RANDOM", "sample_vocab": "SAMPLE_VOCAB", "text": "TEXT"}


def _prompt(decoder: nn.Module) -> torch.Tensor:
    return decoder.prompt_embeddings  # [k, D]


@dataclass
class PromptTuning(PeftMethod):
    name: ClassVar[str] = "prompt_tuning"
    input_side: ClassVar[bool] = True
    peft_type: ClassVar[str | None] = "PROMPT_TUNING"
    num_virtual_tokens: int = 20
    # "random": N(0, 1) (PEFT's RANDOM); "sample_vocab": embedding rows of random token ids; "text": init_text's
    init: Literal["random", "sample_vocab", "text"] = "random"
    init_text: str | None = None
    # tokenizer for init "text"; None: the model's name_or_path
    tokenizer_path: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens < 1:
            raise ValueError(f"prompt_tuning.num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens!r}")
        if self.init not in PEFT_INIT:
            raise ValueError(f"prompt_tuning.init must be one of {sorted(PEFT_INIT)}, got {self.init!r}")
        if self.init == "text" and not self.init_text:
            raise ValueError("prompt_tuning.init 'text' needs init_text")

    def _init_values(self, model: nn.Module, embed: nn.Embedding) -> torch.Tensor:
        k, weight = self.num_virtual_tokens, embed.weight
        if self.init == "random":
            return torch.randn(k, weight.shape[1], device=weight.device, dtype=torch.float32)
        if self.init == "sample_vocab":
            ids = torch.randint(0, weight.shape[0], (k,)).to(weight.device)
        else:
            tokenizer = load_tokenizer(model, self.tokenizer_path, "prompt_tuning.init 'text'")
            tokens = tokenizer(self.init_text)["input_ids"]
            if not tokens:
                raise ValueError(f"prompt_tuning.init_text {self.init_text!r} has no tokens")
            tokens = (tokens * -(-k // len(tokens)))[:k]  # repeated / cut to k, as PEFT
            ids = torch.tensor(tokens, device=weight.device)
        with torch.no_grad():
            return embed(ids).detach().float().clone()

    def apply(self, model: nn.Module) -> None:
        decoder = model.get_decoder()
        if PARAM in decoder._parameters:
            raise ValueError("prompt_tuning: the decoder already has prompt_embeddings (applied twice?)")
        values = self._init_values(model, decoder.embed_tokens)
        VirtualTokens(_prompt, Placement("prompt_tuning", [self.num_virtual_tokens])).attach(decoder)
        decoder.register_parameter(PARAM, nn.Parameter(values))
        self._param_name = next(n for n, p in model.named_parameters() if p is decoder.prompt_embeddings)
        self._dims = peft_dims(model.config)

    def remove(self, model: nn.Module) -> None:
        """Undo `apply` (the model is the base again)."""
        decoder = model.get_decoder()
        VirtualTokens.detach_from(decoder)
        decoder._parameters.pop(PARAM, None)

    def owns(self, param_name: str) -> bool:
        return param_name.rpartition(".")[2] == PARAM

    def virtual_tokens(self) -> int:
        return self.num_virtual_tokens

    def expected_trainable(self, config: PretrainedConfig) -> int:
        return self.num_virtual_tokens * config.get_text_config().hidden_size

    # ---- PEFT's format ----

    def peft_config(self, base_model: str) -> dict:
        dims = getattr(self, "_dims", None) or peft_dims(base_model)
        text = self.init == "text"
        return {
            "peft_type": "PROMPT_TUNING",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "num_virtual_tokens": self.num_virtual_tokens,
            **dims,
            "num_transformer_submodules": 1,
            "prompt_tuning_init": PEFT_INIT[self.init],
            "prompt_tuning_init_text": self.init_text if text else None,
            "tokenizer_name_or_path": (self.tokenizer_path or base_model) if text else None,
            "tokenizer_kwargs": None,
            "inference_mode": True,
        }

    def to_peft(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{`model.prompt_embeddings`: [k, D]} -> {`prompt_embeddings`: [k, D]} (PEFT's key)."""
        if len(tensors) != 1 or not self.owns(next(iter(tensors))):
            raise ValueError(f"prompt_tuning: expected one prompt_embeddings tensor, got {sorted(tensors)}")
        return {PEFT_KEY: next(iter(tensors.values())).detach().contiguous()}

    def from_peft(self, tensors: dict[str, torch.Tensor], source: str = "adapter") -> dict[str, torch.Tensor]:
        if set(tensors) != {PEFT_KEY}:
            raise ValueError(f"{source}: expected the single key {PEFT_KEY!r}, got {sorted(tensors)}")
        t = tensors[PEFT_KEY]
        if t.dim() != 2 or t.shape[0] != self.num_virtual_tokens:
            raise ValueError(f"{source}: prompt_embeddings has shape {list(t.shape)}, expected [{self.num_virtual_tokens}, D]")
        return {getattr(self, "_param_name", "model." + PARAM): t}


@contextlib.contextmanager
def per_row_prompts(model: nn.Module, prompts: torch.Tensor):
    """Within the block, row i of the batch uses prompts[i] ([B, k, D]) instead of the trained P."""
    hooks = VirtualTokens.of(model.get_decoder())
    if hooks is None:
        raise ValueError("per_row_prompts: the model has no prompt (apply PromptTuning first)")
    hooks.override = prompts
    try:
        yield
    finally:
        hooks.override = None


def ensemble_logits(model: nn.Module, prompts: list[torch.Tensor], batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt ensembling (Lester et al. §7): N prompts ([k, D] each, the same k) of a prompt-tuned
    model on one batch, run as ONE batch of N·B rows (copy n uses prompt n). Returns the mean over
    the prompts of the log-probabilities [B, S, V] and the majority vote of their greedy
    predictions [B, S] (ties: the smallest token id)."""
    n = len(prompts)
    ids = batch["input_ids"]
    b = ids.shape[0]
    rows = torch.stack([p.detach() for p in prompts]).repeat_interleave(b, dim=0)  # [N·B, k, D]
    inputs = {"input_ids": ids.repeat(n, 1)}
    if batch.get("attention_mask") is not None:
        inputs["attention_mask"] = batch["attention_mask"].repeat(n, 1)
    with torch.no_grad(), per_row_prompts(model, rows):
        logits = model(**inputs).logits.float()  # [N·B, S, V]
    logp = torch.log_softmax(logits, dim=-1).reshape(n, b, *logits.shape[1:])
    counts = torch.nn.functional.one_hot(logp.argmax(-1), logp.shape[-1]).sum(0)  # [B, S, V]
    votes = counts.argmax(-1)  # [B, S]; argmax returns the first (smallest id) of tied counts
    return logp.mean(0), votes
