"""Virtual tokens in the input sequence: the machinery prompt tuning and P-tuning share.

A method that feeds k trainable vectors V [k, D] to the model as extra input tokens (prompt tuning:
V = P; P-tuning: V = the prompt encoder's output) attaches a `VirtualTokens` to the decoder
(`model.get_decoder()`): a forward pre-hook (with kwargs) and a forward hook on that instance.

Placement (`Placement`): segments of the k vectors, in order. Segment 0 (split[0] vectors) goes
before the input (before every packed example); segment i > 0 goes right after the first
occurrence of anchors[i-1] (a token-id sequence) that follows anchor i-2, in every row (every
packed example). The default is one segment of k before the input (PEFT's prompt learning).
"Before the input" is before a row's first attended token: left padding stays in front of the
virtual tokens, so a left-padded row gives the outputs of the same row unpadded (RoPE sees the same
relative positions); PEFT prepends before the padding instead (the same for unpadded and
right-padded rows, which is what training and the parity tests use).

* pre-hook, no cache or an empty one (training, a full forward, generation's prefill): input_ids
  become inputs_embeds with the virtual vectors (cast to the embeddings' dtype) inserted; a 2D
  attention_mask gets ones at the virtual columns; given position_ids are renumbered so that each
  row (packed example) counts its virtual and real tokens consecutively from its first position
  (the virtual tokens before the input take the first real token's position onwards).
* pre-hook, a non-empty cache (generation's decode steps): nothing is inserted (the virtual tokens
  are in the cache). A 2D attention_mask that covers the real tokens only (`generate` builds it so)
  gets ones at the prefill's virtual columns (remembered per cache object); given position_ids
  are shifted by the number of virtual tokens (callers count real tokens only).
* forward hook: `last_hidden_state` keeps the real tokens' columns only, so callers (lm_head, the
  chunked loss of `qtrain.train.loss_sum`, `labels`) see [B, S, D] for S input tokens: virtual
  tokens are never in the labels. (`hidden_states` of output_hidden_states keep them.)

Packing (position_ids restarting per packed example, no attention_mask, no cache: transformers then
makes attention block-diagonal from the restarts): each packed example gets its own virtual tokens,
exactly as it would unpacked; rows are right-padded to the longest expanded row with zero
embeddings whose positions restart at 0 (a block of their own, dropped by the forward hook).
With both position_ids and an attention_mask, each row is one example.

Gradient checkpointing recomputes decoder layers only; the hooks (and a prompt encoder) run once
per decoder forward, outside the checkpoints.
"""

from __future__ import annotations

import bisect
import inspect
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from qtrain.methods.hooks import ModuleHooks

ATTR = "_virtual_tokens"  # the decoder's VirtualTokens
CACHE_NAMES = ("cache", "past_key_values")  # transformers >= 5.24 / older


@dataclass
class Placement:
    """Where the k virtual tokens go: split[0] before the input, split[i] after anchors[i-1]."""

    method: str  # for error messages: "p_tuning"
    split: list[int]
    anchors: list[list[int]] = field(default_factory=list)  # token ids
    texts: list[str] = field(default_factory=list)  # the anchors as written (errors)

    @property
    def k(self) -> int:
        return sum(self.split)


@dataclass
class Layout:
    """Where the virtual tokens of one forward go: B rows of S real tokens -> `width` columns."""

    real_cols: torch.Tensor  # [B, S] each real token's column in the expanded row
    v_rows: torch.Tensor  # [N] each inserted virtual token's row,
    v_cols: torch.Tensor  # [N] its column,
    v_ids: torch.Tensor  # [N] which of the k vectors it is
    lengths: torch.Tensor  # [B] expanded length of each row
    width: int  # max(lengths)
    positions: torch.Tensor | None = None  # [B, width] expanded position_ids (when given)

    @property
    def added(self) -> int:
        """Virtual tokens per row (rows of one example each all get the same number)."""
        return self.width - self.real_cols.shape[1]


def example_starts(b: int, s: int, device: torch.device, pos: torch.Tensor | None = None,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """[B, S] bool: an example begins here. Packed (`pos`, position_ids [B, S]): where the positions
    restart; else one example per row, from its first attended token (after left padding)."""
    if pos is not None:
        starts = torch.diff(pos, dim=-1, prepend=pos[:, :1]) != 1  # as transformers' find_packed_sequence_indices
        starts[:, 0] = True
        return starts
    first = mask.ne(0).int().argmax(-1) if mask is not None else torch.zeros(b, dtype=torch.long, device=device)
    starts = torch.zeros(b, s, dtype=torch.bool, device=device)
    starts[torch.arange(b, device=device), first] = True
    return starts


def _anchor_hits(ids: torch.Tensor, anchor: list[int]) -> list[list[int]]:
    """For every row, the sorted start columns of `anchor` in ids [B, S]."""
    b, s = ids.shape
    rows: list[list[int]] = [[] for _ in range(b)]
    n = len(anchor)
    if n > s:
        return rows
    windows = ids.unfold(1, n, 1)  # [B, S-n+1, n]
    hits = (windows == torch.tensor(anchor, device=ids.device)).all(-1)  # [B, S-n+1]
    for r, c in hits.nonzero().tolist():
        rows[r].append(c)
    return rows


def _missing(p: Placement, a: int, row: int, example: int, packed: bool) -> ValueError:
    where = f"row {row}" + (f" (packed example {example})" if packed else "")
    after = f" after anchors[{a - 1}] {p.texts[a - 1]!r}" if a else ""
    return ValueError(
        f"{p.method}.anchors[{a}] {p.texts[a]!r} (token ids {p.anchors[a]}) is not in {where}{after}; every row needs "
        "each anchor, in order, with the token ids the anchor has on its own (tokenized without special tokens)"
    )


def _anchor_ends(p: Placement, ids: torch.Tensor, starts: torch.Tensor) -> list[tuple[int, int, int]]:
    """(row, column of the anchor's last token, segment) for every anchor of every (packed) example."""
    hits = [_anchor_hits(ids, anchor) for anchor in p.anchors]
    b, s = ids.shape
    bounds: list[list[int]] = [[] for _ in range(b)]  # per row: the examples' first columns, then S
    for r, c in starts.nonzero().tolist():
        bounds[r].append(c)
    for r in bounds:
        r.append(s)
    packed = any(len(x) > 2 for x in bounds)
    out = []
    for row in range(b):
        for example, (begin, end) in enumerate(zip(bounds[row][:-1], bounds[row][1:])):
            cursor = begin
            for a, anchor in enumerate(p.anchors):
                found = hits[a][row]
                i = bisect.bisect_left(found, cursor)
                if i == len(found) or found[i] + len(anchor) > end:
                    raise _missing(p, a, row, example, packed)
                cursor = found[i] + len(anchor)
                out.append((row, cursor - 1, a + 1))
    return out


def make_layout(p: Placement, ids: torch.Tensor | None, starts: torch.Tensor, pos: torch.Tensor | None = None
                ) -> Layout:
    """The expanded layout of rows [B, S] whose examples begin at `starts` [B, S]; with `pos`
    (position_ids [B, S]) also the expanded position_ids."""
    b, s = starts.shape
    device = starts.device
    rows, toks = starts.nonzero(as_tuple=True)  # segment 0: before each example's first token
    segs, after = torch.zeros_like(rows), torch.zeros_like(rows, dtype=torch.bool)
    if p.anchors:
        if ids is None:
            raise ValueError(f"{p.method}.anchors need input_ids (got inputs_embeds only) to find the anchors")
        ends = torch.tensor(_anchor_ends(p, ids, starts), dtype=torch.long, device=device).reshape(-1, 3)
        rows, toks = torch.cat([rows, ends[:, 0]]), torch.cat([toks, ends[:, 1]])
        segs = torch.cat([segs, ends[:, 2]])
        after = torch.cat([after, torch.ones(len(ends), dtype=torch.bool, device=device)])
    split = torch.tensor(p.split, device=device)
    n = split[segs]  # [I] vectors per insertion (a run of consecutive virtual tokens)
    before_n = torch.zeros(b, s, dtype=torch.long, device=device).index_put((rows, toks), n * ~after, accumulate=True)
    after_n = torch.zeros(b, s, dtype=torch.long, device=device).index_put((rows, toks), n * after, accumulate=True)
    attached = before_n + after_n  # [B, S] virtual tokens right before / after each token
    earlier = attached.cumsum(-1) - attached  # [B, S] virtual tokens attached to earlier tokens
    real_cols = torch.arange(s, device=device) + earlier + before_n  # [B, S]
    first = torch.where(after, real_cols[rows, toks] + 1, toks + earlier[rows, toks])  # [I] column of each run
    q = torch.arange(int(n.sum()), device=device) - (n.cumsum(0) - n).repeat_interleave(n)  # [N] index in its run
    v_rows, v_toks = rows.repeat_interleave(n), toks.repeat_interleave(n)  # [N] and the real token it is next to
    v_cols = first.repeat_interleave(n) + q
    v_ids = (split.cumsum(0) - split)[segs].repeat_interleave(n) + q  # segment's first vector + q
    lengths = s + attached.sum(-1)
    layout = Layout(real_cols, v_rows, v_cols, v_ids, lengths, int(lengths.max()))
    if pos is not None:
        start = torch.cummax(torch.where(starts, torch.arange(s, device=device), 0), dim=-1).values  # [B, S]
        real_pos = pos + earlier - earlier.gather(1, start) + before_n  # counted on within the example
        cols = torch.arange(layout.width, device=device).expand(b, layout.width)
        out = (cols - lengths.unsqueeze(1)).clone()  # padding: 0, 1, ... (a block of its own)
        out[torch.arange(b, device=device).unsqueeze(1), real_cols] = real_pos
        out[v_rows, v_cols] = real_pos[v_rows, v_toks] + v_cols - real_cols[v_rows, v_toks]
        layout.positions = out
    return layout


def insert(layout: Layout, embeds: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """[B, S, D] real embeddings + [B, k, D] virtual vectors -> [B, width, D] (zeros past a row's end)."""
    b, s, d = embeds.shape
    rows = torch.arange(b, device=embeds.device).unsqueeze(1).expand(b, s)
    out = embeds.new_zeros(b, layout.width, d)
    out = out.index_put((rows.reshape(-1), layout.real_cols.reshape(-1)), embeds.reshape(b * s, d))
    return out.index_put((layout.v_rows, layout.v_cols), vectors[layout.v_rows, layout.v_ids])


def insert_mask(layout: Layout, mask: torch.Tensor) -> torch.Tensor:
    """2D attention mask [B, S] -> [B, width]: the virtual columns are attended."""
    return mask.new_ones(mask.shape[0], layout.width).scatter(1, layout.real_cols, mask)


def load_tokenizer(model: nn.Module, path: str | None, what: str):
    """The tokenizer at `path`, or else at the model's name_or_path (the directory load_model read)."""
    from transformers import AutoTokenizer

    path = path or getattr(model, "name_or_path", None) or model.config._name_or_path
    if not path:
        raise ValueError(f"{what}: no tokenizer_path and the model has no name_or_path")
    return AutoTokenizer.from_pretrained(path, trust_remote_code=False)


def peft_dims(config) -> dict[str, int]:
    """The model sizes PEFT's prompt-learning configs record, from a config or a checkpoint path."""
    if isinstance(config, str):
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(config, trust_remote_code=False)
    c = config.get_text_config()
    return {"token_dim": c.hidden_size, "num_attention_heads": c.num_attention_heads, "num_layers": c.num_hidden_layers}


def _cache_of(kwargs: dict):
    return next((kwargs[n] for n in CACHE_NAMES if kwargs.get(n) is not None), None)


class VirtualTokens:
    """The hooks that put virtual tokens into a decoder's input (see the module docstring).

    `source(decoder)` gives the k vectors [k, D] (any dtype; cast to the embeddings'); `override`
    ([B, k, D], prompt ensembling) replaces them row by row while set."""

    def __init__(self, source: Callable[[nn.Module], torch.Tensor], placement: Placement) -> None:
        self.source, self.placement = source, placement
        self.override: torch.Tensor | None = None
        self._pending: Layout | None = None  # pre-hook -> forward hook
        self._layouts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # cache -> its prefill's Layout
        self._hooks = ModuleHooks()
        self._arg_names: list[str] = []

    @staticmethod
    def of(decoder: nn.Module) -> VirtualTokens | None:
        return decoder.__dict__.get(ATTR)

    def attach(self, decoder: nn.Module) -> None:
        if VirtualTokens.of(decoder) is not None:
            raise ValueError(f"{self.placement.method}: the decoder already takes virtual tokens (applied twice, or "
                             "with another prompt method: prompt_tuning and p_tuning do not combine)")
        self._arg_names = list(inspect.signature(decoder.forward).parameters)
        self._hooks.forward_pre(decoder, self.pre_hook, with_kwargs=True)
        self._hooks.forward(decoder, self.post_hook, with_kwargs=True)
        decoder.__dict__[ATTR] = self

    def detach(self, decoder: nn.Module) -> None:
        self._hooks.remove(decoder)
        decoder.__dict__.pop(ATTR, None)

    @staticmethod
    def detach_from(decoder: nn.Module) -> None:
        """Remove the decoder's virtual-token hooks, if it has any (a prompt method's `remove`)."""
        hooks = VirtualTokens.of(decoder)
        if hooks is not None:
            hooks.detach(decoder)

    def vectors(self, decoder: nn.Module, batch: int, dtype: torch.dtype) -> torch.Tensor:
        """[B, k, D] in `dtype`: the source's vectors for every row, or the per-row override."""
        if self.override is not None:
            if self.override.shape[0] != batch:
                n = self.override.shape[0]
                raise ValueError(f"{self.placement.method}: {n} per-row prompts for a batch of {batch}")
            return self.override.to(dtype)
        v = self.source(decoder)
        return v.to(dtype).unsqueeze(0).expand(batch, *v.shape)

    def pre_hook(self, decoder: nn.Module, args: tuple, kwargs: dict):
        kwargs = {**dict(zip(self._arg_names, args)), **kwargs}  # positional input_ids, mask, ... by name
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise ValueError(f"{self.placement.method}: only 2D attention masks are supported")
        cache = _cache_of(kwargs)
        cached = cache.get_seq_length() if cache is not None else 0
        if cached:
            return (), self._decode_step(kwargs, cache, cached)
        ids, embeds, pos = kwargs.get("input_ids"), kwargs.get("inputs_embeds"), kwargs.get("position_ids")
        if embeds is None:
            embeds = decoder.get_input_embeddings()(ids)  # [B, S, D]
        b, s = embeds.shape[:2]
        packed = pos is not None and mask is None and cache is None
        pos = pos.expand(b, s) if pos is not None else None
        starts = example_starts(b, s, embeds.device, pos if packed else None, mask)
        layout = make_layout(self.placement, ids, starts, pos)
        kwargs["input_ids"] = None
        kwargs["inputs_embeds"] = insert(layout, embeds, self.vectors(decoder, b, embeds.dtype))  # [B, width, D]
        if mask is not None:
            kwargs["attention_mask"] = insert_mask(layout, mask)
        if pos is not None:
            kwargs["position_ids"] = layout.positions
        self._pending = layout
        return (), kwargs

    def _decode_step(self, kwargs: dict, cache, cached: int) -> dict:
        """The virtual tokens are in the cache: extend a real-tokens-only mask, shift position_ids."""
        layout = self._layouts.get(cache)
        if layout is None and self.placement.anchors:
            raise ValueError(f"{self.placement.method}: a decode step on a cache whose prefill this model did not run "
                             "(anchor placement needs the prefill's layout)")
        added = layout.added if layout is not None else self.placement.k
        mask, pos = kwargs.get("attention_mask"), kwargs.get("position_ids")
        b = mask.shape[0] if mask is not None else 0
        if mask is not None and mask.shape[1] == cached + _new_tokens(kwargs) - added:
            if layout is None:  # the default placement, found again from the mask
                starts = example_starts(b, mask.shape[1], mask.device, mask=mask)
                kwargs["attention_mask"] = insert_mask(make_layout(self.placement, None, starts), mask)
            else:
                s0 = layout.real_cols.shape[1]
                prefill = insert_mask(layout, mask[:, :s0])  # [B, width]
                kwargs["attention_mask"] = torch.cat([prefill, mask[:, s0:]], dim=1)
        if pos is not None:
            kwargs["position_ids"] = pos + added
        return kwargs

    def post_hook(self, decoder: nn.Module, args: tuple, kwargs: dict, output):
        layout, self._pending = self._pending, None
        if layout is None:
            return output
        fields = getattr(output, "__dataclass_fields__", {})  # `cache` (>= 5.24; `past_key_values` warns) or older
        cache = getattr(output, next((n for n in CACHE_NAMES if n in fields), CACHE_NAMES[1]), None)
        if cache is not None:
            self._layouts[cache] = layout
        h = output.last_hidden_state  # [B, width, D]
        index = layout.real_cols.unsqueeze(-1).expand(*layout.real_cols.shape, h.shape[-1])  # [B, S, D]
        output.last_hidden_state = torch.gather(h, 1, index)
        return output


def _new_tokens(kwargs: dict) -> int:
    x = kwargs.get("input_ids")
    return x.shape[1] if x is not None else kwargs["inputs_embeds"].shape[1]
