"""P-tuning (Liu et al. 2021, "GPT Understands, Too"): a template of k continuous "pseudo tokens"
around the input, whose embeddings h_0..h_{k-1} are not free parameters but the output of a small
trainable prompt encoder over k trainable input embeddings e_0..e_{k-1}. The paper's encoder is a
bidirectional LSTM followed by a 2-layer ReLU MLP:

    h_i = MLP([LSTM→(e_0:i) ; LSTM←(e_i:k)])        the model (embedding matrix included) stays frozen
    T = {[h_0..h_{k0-1}], x_1..x_a, [h_{k0}..], x_{a+1}.., y}   (segments of the template, with anchors)

and the pseudo tokens' outputs are not predicted (only the real tokens are in the loss).

qtrain's implementation, as Hugging Face PEFT's `PromptEncoder` (peft/tuners/p_tuning):

* encoder "lstm" (the paper): `embedding` [k, D] -> `lstm_head` (nn.LSTM, D -> h, encoder_num_layers
  layers, bidirectional, dropout encoder_dropout between layers) -> `mlp_head` (Linear(2h, 2h), ReLU,
  Linear(2h, D)); encoder "mlp" (PEFT's default): `embedding` -> `mlp_head` (Linear(D, h), ReLU,
  Linear(h, h), ReLU, Linear(h, D)). h = encoder_hidden_size (None: D). Init: PyTorch's defaults in
  PEFT's order (embedding N(0, 1), LSTM U(±1/√h), Linear Kaiming-uniform), so the same seed gives
  PEFT's initial encoder.
* the encoder is a child `prompt_encoder` of the decoder (`model.get_decoder()`), fp32, model names
  `model.prompt_encoder.embedding.weight`, `model.prompt_encoder.lstm_head.weight_ih_l0`, ...,
  `model.prompt_encoder.mlp_head.0.weight` (llama/qwen2); it runs once per decoder forward (outside
  gradient checkpointing) and its output [k, D] is inserted as virtual tokens by the hooks of
  `qtrain.methods.virtual_tokens` (shared with prompt tuning: the attention mask is extended,
  position_ids renumbered, the virtual positions dropped from last_hidden_state so labels align
  with the real tokens; packing, padding and generation with the cache work as for prompt tuning).

Placement: by default all k virtual tokens go before the input (as PEFT; with left padding right
before the first attended token, see `qtrain.methods.virtual_tokens`). The paper's template:
`anchors` (texts of the rendered prompt, e.g. "### Response:") and `split` (virtual tokens per
segment, len(anchors) + 1 entries summing to k): segment 0 goes before the input, segment i right
after the first occurrence of anchors[i-1] (after anchor i-2's), in every row and in every packed
example. Anchors are found as token-id sequences of input_ids: each is tokenized on its own without
special tokens by `tokenizer_path` (None: the model's name_or_path), so an anchor must tokenize the
same alone as inside the prompt (with BPE tokenizers include the leading space or newline that
precedes it). A row without an anchor raises an error naming the anchor and the row. Decode steps
of generation insert nothing (the virtual tokens are in the cache).

Trainable parameters (all of them, as PEFT counts them): k·D for the input embeddings, plus
"mlp": (D·h + h) + (h·h + h) + (h·D + D);
"lstm": Σ_layers 2 · (4h·in_l + 4h·h + 8h) (in_0 = D, in_l = 2h) + (2h·2h + 2h) + (2h·D + D).
No identity at init: the virtual tokens change the output from the start (as in the paper).

Saving (PEFT's format, `folds`): adapter_config.json with peft_type P_TUNING
(encoder_reparameterization_type LSTM / MLP, encoder_hidden_size, encoder_num_layers,
encoder_dropout, num_virtual_tokens, token_dim, ...) and one tensor `prompt_embeddings` [k, D]: the
encoder's output (eval mode), what PEFT's save_pretrained writes and what PeftModel.from_pretrained
prepends. `from_peft` returns it under `...prompt_encoder.embedding.weight`, and `load_state_dict`
then folds the model: the encoder's heads are dropped and the fixed embeddings used (PEFT's
inference mode); qtrain.methods.io also keeps the raw encoder in method.safetensors, which
`load_method(..., resume=True)` restores to continue training. With anchors PEFT's format cannot
express the placement, so the method is saved in qtrain's format (method.json + the raw encoder).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Literal

import torch
from torch import nn

from qtrain.methods.base import PeftMethod
from qtrain.methods.virtual_tokens import Placement, VirtualTokens, load_tokenizer, peft_dims

if TYPE_CHECKING:
    from transformers import PretrainedConfig

MODULE = "prompt_encoder"
EMBEDDING = "embedding.weight"
PEFT_KEY = "prompt_embeddings"
PEFT_ENCODER = {"lstm": "LSTM", "mlp": "MLP"}


class PromptEncoder(nn.Module):
    """PEFT's PromptEncoder: `embedding` [k, D] -> (`lstm_head` ->) `mlp_head` -> [k, D]. Folded
    (encoder None, PEFT's inference mode): `embedding` is the output."""

    def __init__(self, k: int, d: int, encoder: str | None, hidden: int, layers: int, dropout: float) -> None:
        super().__init__()
        self.embedding = nn.Embedding(k, d)
        self.lstm_head: nn.LSTM | None = None
        self.mlp_head: nn.Sequential | None = None
        if encoder == "lstm":
            self.lstm_head = nn.LSTM(d, hidden, layers, dropout=dropout, bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, d))
        elif encoder == "mlp":
            self.mlp_head = nn.Sequential(
                nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, d)
            )

    def forward(self) -> torch.Tensor:
        """[k, D] in fp32, autocast off: k rows cost nothing, and oneDNN has no bf16 LSTM under CPU autocast."""
        h = self.embedding.weight  # [k, D] (= embedding(arange(k)), as PEFT)
        with torch.autocast(h.device.type, enabled=False):
            if self.lstm_head is not None:
                h = self.lstm_head(h.unsqueeze(0))[0].squeeze(0)  # [k, 2h]
            return self.mlp_head(h) if self.mlp_head is not None else h  # [k, D]

    def fold(self, prompt: torch.Tensor) -> None:
        """Use the fixed virtual tokens `prompt` [k, D] from now on (the heads are dropped)."""
        old = self.embedding.weight
        self.embedding = nn.Embedding(*prompt.shape, device=old.device, dtype=torch.float32)
        with torch.no_grad():
            self.embedding.weight.copy_(prompt)
        self.embedding.weight.requires_grad_(old.requires_grad)
        self.lstm_head = self.mlp_head = None


def _encoded(decoder: nn.Module) -> torch.Tensor:
    return getattr(decoder, MODULE)()  # [k, D]


@dataclass
class PTuning(PeftMethod):
    name: ClassVar[str] = "p_tuning"
    input_side: ClassVar[bool] = True
    folds: ClassVar[bool] = True
    num_virtual_tokens: int = 20
    # "mlp": 3-layer MLP (PEFT's default; 3·D·h trainable); "lstm": bi-LSTM + 2-layer MLP (the paper; PEFT's
    # LSTM; ~16·D·h + 12·h² with h = D: 772M for Llama-3.1-8B, against the MLP's 50M)
    encoder: Literal["lstm", "mlp"] = "mlp"
    # the encoder's hidden size h; None: the model's hidden size
    encoder_hidden_size: int | None = None
    # LSTM layers ("mlp" has exactly 3 linears, as PEFT, and needs the default 2 here)
    encoder_num_layers: int = 2
    # dropout between the LSTM layers (PEFT's; "mlp" has none)
    encoder_dropout: float = 0.0
    # texts in the rendered prompt after which segments 1.. of the virtual tokens go ([]: all before the input)
    anchors: list[str] = field(default_factory=list)
    # virtual tokens per segment: segment 0 before the input, segment i after anchors[i-1]; sums to k
    split: list[int] = field(default_factory=list)
    # tokenizer for the anchors; None: the model's name_or_path
    tokenizer_path: str | None = None

    def __post_init__(self) -> None:
        k, h = self.num_virtual_tokens, self.encoder_hidden_size
        if not _positive_int(k):
            raise ValueError(f"p_tuning.num_virtual_tokens must be a positive integer, got {k!r}")
        if self.encoder not in PEFT_ENCODER:
            raise ValueError(f"p_tuning.encoder must be one of {sorted(PEFT_ENCODER)}, got {self.encoder!r}")
        if h is not None and not _positive_int(h):
            raise ValueError(f"p_tuning.encoder_hidden_size must be a positive integer or null, got {h!r}")
        if not _positive_int(self.encoder_num_layers):
            raise ValueError(f"p_tuning.encoder_num_layers must be a positive integer, got {self.encoder_num_layers!r}")
        if self.encoder == "mlp" and self.encoder_num_layers != 2:
            raise ValueError("p_tuning.encoder_num_layers applies to encoder 'lstm' only (PEFT's 'mlp' encoder has "
                             f"exactly 3 linear layers): leave it at 2, got {self.encoder_num_layers}")
        if not isinstance(self.encoder_dropout, (int, float)) or not 0 <= self.encoder_dropout < 1:
            raise ValueError(f"p_tuning.encoder_dropout must be in [0, 1), got {self.encoder_dropout!r}")
        if self.encoder == "mlp" and self.encoder_dropout:
            raise ValueError("p_tuning.encoder_dropout applies to encoder 'lstm' only (PEFT's 'mlp' has no dropout)")
        self._check_placement()

    @property
    def peft_type(self) -> str | None:
        """P_TUNING, or None with anchors: PEFT would put every virtual token first, so qtrain's format."""
        return None if self.anchors else "P_TUNING"

    def _check_placement(self) -> None:
        k, split, anchors = self.num_virtual_tokens, self.split, self.anchors
        if not all(isinstance(a, str) and a for a in anchors):
            raise ValueError(f"p_tuning.anchors must be non-empty strings, got {anchors!r}")
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in split):
            raise ValueError(f"p_tuning.split must be non-negative integers, got {split!r}")
        if anchors and len(split) != len(anchors) + 1:
            raise ValueError(f"p_tuning.split needs len(anchors) + 1 = {len(anchors) + 1} entries (segment 0 before "
                             f"the input, segment i after anchors[i-1]), got {split!r}")
        if not anchors and split not in ([], [k]):
            raise ValueError(f"p_tuning.split {split!r} without anchors: give the anchors, or leave split empty")
        if split and sum(split) != k:
            raise ValueError(f"p_tuning.split {split!r} sums to {sum(split)}, not num_virtual_tokens = {k}")

    def _hidden(self, d: int) -> int:
        return self.encoder_hidden_size or d

    def _new_encoder(self, d: int, encoder: str | None) -> PromptEncoder:
        dropout = self.encoder_dropout if self.encoder_num_layers > 1 else 0.0  # nn.LSTM: only between layers
        return PromptEncoder(self.num_virtual_tokens, d, encoder, self._hidden(d), self.encoder_num_layers, dropout)

    def _placement(self, model: nn.Module) -> Placement:
        if not self.anchors:
            return Placement("p_tuning", [self.num_virtual_tokens])
        tokenizer = load_tokenizer(model, self.tokenizer_path, "p_tuning.anchors")
        ids = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in self.anchors]
        for a, t in zip(self.anchors, ids):
            if not t:
                raise ValueError(f"p_tuning.anchors: {a!r} has no tokens")
        return Placement("p_tuning", list(self.split), ids, list(self.anchors))

    def apply(self, model: nn.Module) -> None:
        decoder = model.get_decoder()
        if MODULE in decoder._modules:
            raise ValueError("p_tuning: the decoder already has a prompt_encoder (applied twice?)")
        weight = decoder.get_input_embeddings().weight
        placement = self._placement(model)
        encoder = self._new_encoder(weight.shape[1], self.encoder).to(weight.device)  # built on CPU: PEFT's init
        VirtualTokens(_encoded, placement).attach(decoder)
        decoder.add_module(MODULE, encoder)
        self._embedding = next(n for n, p in model.named_parameters() if p is encoder.embedding.weight)
        self._dims = peft_dims(model.config)

    def remove(self, model: nn.Module) -> None:
        """Undo `apply` (the model is the base again)."""
        decoder = model.get_decoder()
        VirtualTokens.detach_from(decoder)
        decoder._modules.pop(MODULE, None)

    def owns(self, param_name: str) -> bool:
        return MODULE in param_name.split(".")

    def virtual_tokens(self) -> int:
        return self.num_virtual_tokens

    def expected_trainable(self, config: PretrainedConfig) -> int:
        d = config.get_text_config().hidden_size
        h, k = self._hidden(d), self.num_virtual_tokens
        if self.encoder == "mlp":
            return k * d + (d * h + h) + (h * h + h) + (h * d + d)
        lstm = sum(2 * (4 * h * (d if i == 0 else 2 * h) + 4 * h * h + 8 * h) for i in range(self.encoder_num_layers))
        return k * d + lstm + (2 * h * 2 * h + 2 * h) + (2 * h * d + d)

    def load_state_dict(self, model: nn.Module, tensors: dict[str, torch.Tensor], source: str = "adapter") -> None:
        """The encoder's tensors (training state), or the folded virtual tokens [k, D] (from `from_peft`):
        the model then uses them as they are."""
        encoder = getattr(model.get_decoder(), MODULE)
        prompt = tensors.get(self._embedding) if len(tensors) == 1 else None
        if prompt is not None and encoder.mlp_head is not None:
            want = tuple(encoder.embedding.weight.shape)
            if tuple(prompt.shape) != want:
                raise ValueError(f"{source}: {self._embedding!r} has shape {list(prompt.shape)}, expected {list(want)}")
            encoder.fold(prompt)
            return
        super().load_state_dict(model, tensors, source)

    # ---- PEFT's format ----

    def peft_config(self, base_model: str) -> dict:
        dims = getattr(self, "_dims", None) or peft_dims(base_model)
        return {
            "peft_type": "P_TUNING",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "num_virtual_tokens": self.num_virtual_tokens,
            **dims,
            "num_transformer_submodules": 1,
            "encoder_reparameterization_type": PEFT_ENCODER[self.encoder],
            "encoder_hidden_size": self._hidden(dims["token_dim"]),
            "encoder_num_layers": self.encoder_num_layers,
            "encoder_dropout": self.encoder_dropout,
            "inference_mode": True,
        }

    def to_peft(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Our tensors -> {`prompt_embeddings`: [k, D]}: the encoder's output (eval mode), or the folded tokens."""
        by_suffix = {n.partition(f"{MODULE}.")[2]: t for n, t in tensors.items() if self.owns(n)}
        if len(by_suffix) != len(tensors) or EMBEDDING not in by_suffix:
            raise ValueError(f"p_tuning: expected the {MODULE} tensors, got {sorted(tensors)}")
        e = by_suffix[EMBEDDING].detach().float()
        if len(by_suffix) == 1:
            return {PEFT_KEY: e.contiguous()}
        with torch.random.fork_rng(devices=[]):  # building it draws an init: leave the caller's RNG as it was
            encoder = self._new_encoder(e.shape[1], self.encoder).to(e.device).eval()
        encoder.load_state_dict(by_suffix)
        with torch.no_grad():
            return {PEFT_KEY: encoder().contiguous()}

    def from_peft(self, tensors: dict[str, torch.Tensor], source: str = "adapter") -> dict[str, torch.Tensor]:
        """PEFT's {`prompt_embeddings`: [k, D]} -> {`<decoder>.prompt_encoder.embedding.weight`: [k, D]} (folded)."""
        if set(tensors) != {PEFT_KEY}:
            raise ValueError(f"{source}: expected the single key {PEFT_KEY!r}, got {sorted(tensors)}")
        p = tensors[PEFT_KEY]
        dims = getattr(self, "_dims", None)
        d = dims["token_dim"] if dims else None
        if p.dim() != 2 or p.shape[0] != self.num_virtual_tokens or (d and p.shape[1] != d):
            want = f"[{self.num_virtual_tokens}, {d or 'D'}]"
            raise ValueError(f"{source}: {PEFT_KEY} has shape {list(p.shape)}, expected {want}")
        return {getattr(self, "_embedding", f"model.{MODULE}.{EMBEDDING}"): p}


def _positive_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1
