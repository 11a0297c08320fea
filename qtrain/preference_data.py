"""Preference data: `{prompt, chosen, rejected}` rows (DPO, ORPO, SimPO) and `{prompt, completion,
label}` rows (KTO), read with the same file/line errors and `data.bad_rows` handling as SFT rows
(`qtrain.data`).

Plain text: the prompt as written (with the tokenizer's specials, e.g. BOS), each response after it
plus EOS. Chat: `prompt` a list of {role, content} messages and each response a string or a list
holding one assistant message; the conversation is rendered with the model's chat template and the
response is what the template adds after the prompt's generation prompt. Either way the shared
prompt is tokenised once and each response separately, so both rows of a pair share the prompt's
ids exactly.

A batch of B pairs is 2B rows, the B chosen sequences first, then the B rejected ones, each
prompt + response right-padded, labels on the response tokens only. Packing is refused for
preference data (`qtrain.config`): sequence log-probs are per row, and a packed row would need
per-segment sums that no objective here is defined on.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from qtrain.data import (
    IGNORE_INDEX,
    BadRow,
    Batches,
    Dataset,
    Rendered,
    Table,
    _apply_template,
    _line,
    alpaca_prompt,
    check_datasets,
    ensure_chat_template,
    read_tables,
    synthetic_split,
)

PAIR_COLUMNS = ("prompt", "chosen", "rejected")
KTO_COLUMNS = ("prompt", "completion", "label")


@dataclass
class PairExample:
    prompt_ids: list[int]
    chosen_ids: list[int]  # response tokens (EOS included), after the prompt
    rejected_ids: list[int]

    @property
    def input_ids(self) -> list[int]:
        """The longer of the pair's two sequences: what `Batches` sizes a row by."""
        return self.prompt_ids + max(self.chosen_ids, self.rejected_ids, key=len)


@dataclass
class KTOExample:
    prompt_ids: list[int]
    completion_ids: list[int]
    desirable: bool

    @property
    def input_ids(self) -> list[int]:
        return self.prompt_ids + self.completion_ids


# ---- rows → examples ----


def _response_text(response, where: str) -> str:
    """A response as text: a string, or a list holding one assistant message."""
    if isinstance(response, str):
        return response
    turn = response[0] if isinstance(response, list) and len(response) == 1 else None
    if isinstance(turn, dict) and turn.get("role") == "assistant" and isinstance(turn.get("content"), str):
        return turn["content"]
    raise ValueError(f"{where!r} must be a string or [{{role: assistant, content: str}}], got {response!r}")


def _messages(prompt) -> list[dict] | None:
    """The prompt's messages when it is a chat prompt, None when it is text."""
    if isinstance(prompt, str):
        return None
    def is_message(m) -> bool:
        return isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)

    if not isinstance(prompt, list) or not prompt or not all(is_message(m) for m in prompt):
        raise ValueError(f"'prompt' must be a string or a non-empty list of {{role, content}} messages, got {prompt!r}")
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def render_prompt_response(tokenizer, prompt, responses: list[str]) -> tuple[list[int], list[list[int]], bool]:
    """(prompt ids, each response's ids, chat?): the prompt tokenised once. Chat prompts: each
    response is what the template renders after the generation prompt (ending with its end of turn)."""
    messages = _messages(prompt)
    if messages is None:
        prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        return prompt_ids, [tokenizer(r, add_special_tokens=False)["input_ids"] + eos for r in responses], False
    ensure_chat_template(tokenizer)
    head = _apply_template(tokenizer, messages, add_generation_prompt=True)
    out = []
    for r in responses:
        full = _apply_template(tokenizer, [*messages, {"role": "assistant", "content": r}], add_generation_prompt=False)
        if not full.startswith(head):
            raise ValueError("the chat template does not render the prompt as a prefix of prompt + response")
        out.append(tokenizer(full[len(head) :], add_special_tokens=False)["input_ids"])
    return tokenizer(head, add_special_tokens=False)["input_ids"], out, True


def pair_example(tokenizer, row: dict, max_length: int) -> tuple[PairExample, Rendered]:
    """A `{prompt, chosen, rejected}` row → its example (each sequence cut at max_length) and the
    rendered prompt/chosen answer (generation and exact match at eval)."""
    missing = [k for k in PAIR_COLUMNS if k not in row]
    if missing:
        raise ValueError(f"missing {missing[0]!r} (preference rows need prompt, chosen and rejected)")
    chosen, rejected = _response_text(row["chosen"], "chosen"), _response_text(row["rejected"], "rejected")
    prompt_ids, (c, r), chat = render_prompt_response(tokenizer, row["prompt"], [chosen, rejected])
    keep = max(max_length - len(prompt_ids), 0)
    prompt_text = tokenizer.decode(prompt_ids, skip_special_tokens=False) if chat else row["prompt"]
    rendered = Rendered([(prompt_text, False), (chosen, True)], prompt_text, chosen, chat)
    return PairExample(prompt_ids[:max_length], c[:keep], r[:keep]), rendered


def kto_example(tokenizer, row: dict, max_length: int) -> tuple[KTOExample, Rendered]:
    """A `{prompt, completion, label}` row (label: true for a desirable completion) → its example."""
    missing = [k for k in KTO_COLUMNS if k not in row]
    if missing:
        raise ValueError(f"missing {missing[0]!r} (KTO rows need prompt, completion and label)")
    if not isinstance(row["label"], bool):
        raise ValueError(f"'label' must be true or false, got {row['label']!r}")
    completion = _response_text(row["completion"], "completion")
    prompt_ids, (c,), chat = render_prompt_response(tokenizer, row["prompt"], [completion])
    keep = max(max_length - len(prompt_ids), 0)
    prompt_text = tokenizer.decode(prompt_ids, skip_special_tokens=False) if chat else row["prompt"]
    answer = completion if row["label"] else None  # exact match scores desirable completions only
    rendered = Rendered([(prompt_text, False), (completion, True)], prompt_text, answer, chat)
    return KTOExample(prompt_ids[:max_length], c[:keep], row["label"]), rendered


def build_preference(table: Table, objective: str, tokenizer, max_length: int) -> Dataset:
    """Every row of `table` as a pair (KTO: an example), or its reason in `.skipped`; rows whose
    prompt fills max_length are counted in `.too_long`."""
    make = kto_example if objective == "kto" else pair_example
    ds = Dataset([], [], "prompt_completion", table.source, list(table.skipped))
    for row, where in zip(table.rows, table.where):
        try:
            example, rendered = make(tokenizer, row, max_length)
        except ValueError as e:
            ds.skipped.append(BadRow(where, str(e)))
            continue
        responses = [example.completion_ids] if objective == "kto" else [example.chosen_ids, example.rejected_ids]
        if not all(responses):  # the prompt filled max_length: nothing to compare
            ds.too_long += 1
            continue
        ds.examples.append(example)
        ds.rendered.append(rendered)
    ds.skipped.sort(key=lambda bad: _line(bad.where))
    if any(r.chat for r in ds.rendered):  # how `qtrain generate` renders a prompt for this adapter (qtrain.json)
        ds.format = "chat"
    return ds


# ---- the synthetic preference task: the right answer of the synthetic tasks over a wrong one ----


def wrong_answer(row: dict, rng: random.Random) -> str:
    """A wrong answer to a synthetic row (`qtrain.data.SYNTHETIC_TASKS`), of the same kind."""
    out, task = row["output"], row["instruction"]
    if out in ("even", "odd"):
        return "odd" if out == "even" else "even"
    if "capital" in task:
        return row["input"]  # the word left in small letters
    pool = row["input"] if "digit" in task else "abcdefghijklmnopqrstuvwxyz"
    wrong = [ch for ch in dict.fromkeys(pool) if ch != out] or [c for c in "0123456789" if c != out]
    return rng.choice(wrong)


def synthetic_pairs(num_train: int, num_eval: int, seed: int, objective: str) -> tuple[Table, Table]:
    """Train and eval tables of synthetic preference rows: prompt = the alpaca prompt, chosen = the
    right answer, rejected = a wrong one (KTO: each row once right, desirable, or wrong)."""
    rng = random.Random(seed)
    tables = []
    for name, rows in zip(("synthetic", "synthetic eval"), synthetic_split(num_train, num_eval, seed)):
        out = []
        for i, r in enumerate(rows):
            prompt, wrong = alpaca_prompt(r), wrong_answer(r, rng)
            if objective == "kto":
                good = i % 2 == 0
                out.append({"prompt": prompt, "completion": r["output"] if good else wrong, "label": good})
            else:
                out.append({"prompt": prompt, "chosen": r["output"], "rejected": wrong})
        tables.append(Table(out, [f"{name} row {i + 1}" for i in range(len(out))], name))
    return tables[0], tables[1]


def load_preference_data(cfg, tokenizer, objective: str) -> tuple[Dataset, Dataset | None]:
    """Train and eval preference data of a run (`cfg`: a DataConfig), as `qtrain.data.load_data`."""
    synthetic = synthetic_pairs(cfg.num_train, cfg.num_eval, cfg.seed, objective) if cfg.train == "synthetic" else None
    train, held_out = read_tables(cfg, synthetic)
    train_ds = build_preference(train, objective, tokenizer, cfg.max_length)
    if cfg.train == "synthetic":  # the prompts are alpaca prompts
        train_ds.format = "alpaca"
    has_eval = held_out is not None and (held_out.rows or held_out.skipped)
    eval_ds = build_preference(held_out, objective, tokenizer, cfg.max_length) if has_eval else None
    check_datasets(cfg, train, held_out, train_ds, eval_ds)
    return train_ds, eval_ds


# ---- batches ----


def _pad(seqs: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """(prompt ids, response ids) per row → input_ids, labels (response only), attention_mask [R, S]."""
    width = max(len(p) + len(r) for p, r in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (p, r) in enumerate(seqs):
        n = len(p) + len(r)
        input_ids[i, :n] = torch.tensor(p + r)
        labels[i, len(p) : n] = torch.tensor(r)
        mask[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask, "num_tokens": mask.sum()}


def collate_pairs(pairs: list[PairExample], pad_id: int) -> dict[str, torch.Tensor]:
    """B pairs → 2B rows [chosen_1..chosen_B, rejected_1..rejected_B]; `pairs` = B."""
    seqs = [(e.prompt_ids, e.chosen_ids) for e in pairs] + [(e.prompt_ids, e.rejected_ids) for e in pairs]
    return _pad(seqs, pad_id) | {"pairs": torch.tensor(len(pairs))}


def collate_kto(examples: list[KTOExample], pad_id: int) -> dict[str, torch.Tensor]:
    """B examples → their rows, `desirable` [B] bool, and the `kl_*` rows: prompt i with completion
    i-1 (cycled within the batch, as TRL does), the mismatched pairs KTO's KL estimate z0 is taken on."""
    batch = _pad([(e.prompt_ids, e.completion_ids) for e in examples], pad_id)
    shifted = examples[-1:] + examples[:-1]
    kl = _pad([(e.prompt_ids, s.completion_ids) for e, s in zip(examples, shifted)], pad_id)
    return batch | {f"kl_{k}": v for k, v in kl.items()} | {"desirable": torch.tensor([e.desirable for e in examples])}


class PreferenceBatches(Batches):
    """`Batches` (the same plan, shuffling and resumable position) of pairs or KTO examples."""

    def __init__(self, examples: list, batch_size: int, pad_id: int, seed: int, mode: str = "pad"):
        if mode == "pack":
            raise ValueError(
                "data.packing: preference data is not packed (each row's log-prob is summed on its own); set data.packing=false"
            )
        if examples and isinstance(examples[0], KTOExample) and batch_size < 2:
            raise ValueError(
                "train.batch_size: KTO needs at least 2 examples a batch "
                "(its KL estimate pairs each prompt with another row's completion)"
            )
        super().__init__(examples, batch_size, pad_id, seed, mode)

    def __next__(self) -> dict[str, torch.Tensor]:
        while self.index >= len(self.plan()):
            self.epoch, self.index = self.epoch + 1, 0
        ids = [s[0] for s in self.plan()[self.index]]
        self.index += 1
        return collate([self.examples[i] for i in ids], self.pad_id) | {"index": torch.tensor(ids)}


def collate(rows: list, pad_id: int) -> dict[str, torch.Tensor]:
    """Pairs or KTO examples, by their type."""
    return collate_kto(rows, pad_id) if isinstance(rows[0], KTOExample) else collate_pairs(rows, pad_id)


def eval_preference_batches(examples: list, batch_size: int, pad_id: int):
    """The eval examples in order, once (a KTO batch of one has no mismatched pair: KL is then 0)."""
    for start in range(0, len(examples), batch_size):
        yield collate(examples[start : start + batch_size], pad_id)
