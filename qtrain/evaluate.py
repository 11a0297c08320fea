"""Greedy-generation exact match: the score printed before and after training."""

from __future__ import annotations

import torch
from torch import nn

from qtrain.data import alpaca_prompt


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 32) -> list[str]:
    """Greedy completions of `prompts` (left-padded batches), decoded without special tokens."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    outputs = []
    try:
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True).to(device)
            out = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )  # [B, S + new]
            new = out[:, batch["input_ids"].shape[1] :]
            outputs += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs


def exact_match(model: nn.Module, tokenizer, rows: list[dict], max_new_tokens: int, batch_size: int = 32) -> float:
    """Fraction of rows whose greedy answer equals `output` (surrounding whitespace ignored)."""
    if not rows:
        return float("nan")
    answers = generate(model, tokenizer, [alpaca_prompt(r) for r in rows], max_new_tokens, batch_size)
    return sum(a.strip() == r["output"].strip() for a, r in zip(answers, rows)) / len(rows)
