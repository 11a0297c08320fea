"""Instruction data: built-in synthetic tasks, alpaca jsonl files, tokenization with response-only
labels, and padded batches.

An alpaca row is {"instruction": str, "input": str (optional), "output": str}. It renders as

    ### Instruction:\n{instruction}\n\n[### Input:\n{input}\n\n]### Response:\n{output}</s>

and by default only the response tokens (and the end-of-sequence token) carry a loss.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

IGNORE_INDEX = -100


# ---- synthetic tasks: short, deterministic answers with a measurable exact-match score ----


def _next_letter(rng: random.Random) -> dict:
    c = rng.choice(string.ascii_lowercase[:-1])
    return {"instruction": "Which letter comes next in the alphabet?", "input": c, "output": chr(ord(c) + 1)}


def _parity(rng: random.Random) -> dict:
    n = rng.randrange(10, 10_000)
    return {"instruction": "Is this number even or odd?", "input": str(n), "output": "even" if n % 2 == 0 else "odd"}


def _uppercase(rng: random.Random) -> dict:
    word = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 5)))
    return {"instruction": "Write the word in capital letters.", "input": word, "output": word.upper()}


def _max_digit(rng: random.Random) -> dict:
    digits = "".join(rng.choices(string.digits, k=rng.randint(3, 6)))
    return {"instruction": "What is the largest digit?", "input": digits, "output": max(digits)}


SYNTHETIC_TASKS = (_next_letter, _parity, _uppercase, _max_digit)


def synthetic_rows(n: int, seed: int) -> list[dict]:
    """`n` rows cycling through the tasks, from a seeded RNG (same seed, same rows)."""
    rng = random.Random(seed)
    return [SYNTHETIC_TASKS[i % len(SYNTHETIC_TASKS)](rng) for i in range(n)]


def synthetic_split(num_train: int, num_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Train and eval rows with no eval row (instruction, input) also present in train."""
    rows = synthetic_rows(num_train + 4 * num_eval, seed)
    train = rows[:num_train]
    seen = {(r["instruction"], r["input"]) for r in train}
    held_out = [r for r in rows[num_train:] if (r["instruction"], r["input"]) not in seen]
    unique = list({(r["instruction"], r["input"]): r for r in held_out}.values())
    return train, unique[:num_eval]


# ---- files ----


def read_jsonl(path: str | Path) -> list[dict]:
    """Alpaca rows from a .jsonl file; a bad row raises naming the file and line."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: data file not found")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            check_alpaca_row(row, f"{path}:{lineno}")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def check_alpaca_row(row: object, where: str) -> None:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for key in ("instruction", "output"):
        if not isinstance(row.get(key), str):
            raise ValueError(f"{where}: missing or non-string {key!r} (alpaca rows need instruction and output)")
    if not isinstance(row.get("input", ""), str):
        raise ValueError(f"{where}: 'input' must be a string")


def write_jsonl(rows: list[dict], path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


# ---- rendering and tokenization ----


def alpaca_prompt(row: dict) -> str:
    text = f"### Instruction:\n{row['instruction']}\n\n"
    if row.get("input"):
        text += f"### Input:\n{row['input']}\n\n"
    return text + "### Response:\n"


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


def tokenize_row(tokenizer, row: dict, max_length: int, train_on_prompt: bool = False) -> Example:
    """Prompt + response + EOS; labels are IGNORE_INDEX on the prompt unless `train_on_prompt`."""
    prompt_ids = tokenizer(alpaca_prompt(row))["input_ids"]
    response_ids = tokenizer(row["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    input_ids = (prompt_ids + response_ids)[:max_length]
    labels = (prompt_ids if train_on_prompt else [IGNORE_INDEX] * len(prompt_ids)) + response_ids
    return Example(input_ids, labels[:max_length])


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids, labels, attention_mask, all [B, S]."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def batches(examples: list[Example], batch_size: int, pad_id: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled batches: a new permutation per epoch from (seed, epoch)."""
    epoch = 0
    while True:
        order = list(range(len(examples)))
        random.Random(seed + epoch).shuffle(order)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield collate([examples[i] for i in order[start : start + batch_size]], pad_id)
        epoch += 1


def load_rows(source: str, eval_source: str | None, num_train: int, num_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Train/eval rows: synthetic tasks, or jsonl files (eval: a file, or the last 5% of train)."""
    if source == "synthetic":
        train, held_out = synthetic_split(num_train, num_eval, seed)
        return train, read_jsonl(eval_source) if eval_source else held_out
    train = read_jsonl(source)
    if eval_source:
        return train, read_jsonl(eval_source)
    n_eval = min(num_eval, len(train) // 20)
    return train[: len(train) - n_eval], train[len(train) - n_eval :]
