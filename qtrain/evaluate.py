"""Generation, exact match and eval loss: the scores printed before, during and after training."""

from __future__ import annotations

import torch
from torch import nn

from qtrain.data import Rendered, render


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int = 32,
    add_special_tokens: bool = True,
    temperature: float = 0.0,
) -> list[str]:
    """Completions of `prompts` (left-padded batches), decoded without special tokens: greedy, or
    sampled when temperature > 0. `add_special_tokens=False` for prompts that already hold them
    (rendered by a chat template)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    outputs = []
    try:
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(
                prompts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=add_special_tokens
            ).to(device)
            sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
            out = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                **sampling,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )  # [B, S + new]
            new = out[:, batch["input_ids"].shape[1] :]
            outputs += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs


def exact_match(model: nn.Module, tokenizer, rows: list[dict | Rendered], max_new_tokens: int, batch_size: int = 32) -> float:
    """Fraction of rows whose greedy answer equals the reference (surrounding whitespace ignored).
    Rows: alpaca dicts, or Rendered rows with a prompt and an answer (all chat, or none)."""
    rows = [render(r, "alpaca", tokenizer) if isinstance(r, dict) else r for r in rows]
    rows = [r for r in rows if r.answer is not None]
    if not rows:
        return float("nan")
    prompts = [r.prompt for r in rows]
    answers = generate(model, tokenizer, prompts, max_new_tokens, batch_size, add_special_tokens=not rows[0].chat)
    return sum(a.strip() == r.answer.strip() for a, r in zip(answers, rows)) / len(rows)
