"""Shared checks for the PEFT methods (tests/qtrain/methods/test_<method>.py): a tiny NF4 model,
a learnable task, and the properties every method must have."""

from __future__ import annotations

import pytest
import torch

from qtrain.methods import PeftMethod, mark_trainable
from qtrain.model import load_model

TINY = {"hidden_size": 64, "intermediate_size": 160, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2}


@pytest.fixture
def tiny_model(tiny_checkpoint):
    """Factory: `tiny_model(arch="llama", lora=None)` -> a fresh NF4 model (fp32 compute) of a tiny checkpoint."""

    def make(arch: str = "llama", lora=None, dtype=torch.float32):
        path = tiny_checkpoint(arch, **TINY)
        torch.manual_seed(0)
        return load_model(str(path), lora, compute_dtype=dtype).model

    return make


def batch(vocab: int = 100, rows: int = 4, length: int = 24, seed: int = 0, task: str = "count") -> dict:
    """A fixed task. "count": each row counts up by one modulo the vocabulary; "constant": one token
    everywhere (learnable even by input-independent parameters such as biases)."""
    g = torch.Generator().manual_seed(seed)
    if task == "constant":
        ids = torch.full((rows, length), 42)
    else:
        start = torch.randint(4, vocab, (rows, 1), generator=g)
        ids = 4 + (start + torch.arange(length)) % (vocab - 4)  # [rows, length]
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def loss_of(model, b: dict) -> torch.Tensor:
    return model(**b).loss


def apply(model, methods: list[PeftMethod]) -> list[str]:
    for m in methods:
        m.apply(model)
    return mark_trainable(model, methods)


def check_identity_at_init(model, methods: list[PeftMethod]) -> None:
    """The method leaves the model's output unchanged before training."""
    b = batch()
    with torch.no_grad():
        before = model(input_ids=b["input_ids"]).logits
    apply(model, methods)
    with torch.no_grad():
        after = model(input_ids=b["input_ids"]).logits
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)


def check_gradients_only_on_method(model, methods: list[PeftMethod]) -> None:
    names = set(apply(model, methods))
    assert names, "the method added no trainable parameter"
    loss_of(model, batch()).backward()
    for n, p in model.named_parameters():
        if n in names:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{n}: no gradient"
        else:
            assert p.grad is None and not p.requires_grad, f"{n}: frozen parameter got a gradient"


def check_learns(
    model, methods: list[PeftMethod], steps: int = 30, lr: float = 1e-2, drop: float = 0.7, task: str = "count"
) -> tuple[float, float]:
    """A few AdamW steps on a fixed task; the loss must fall below `drop` x its start."""
    apply(model, methods)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    b = batch(task=task)
    first = loss_of(model, b).item()
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_of(model, b)
        loss.backward()
        opt.step()
    last = loss_of(model, b).item()
    assert last < drop * first, (first, last)
    return first, last


def trainable_count(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.fixture
def peft():
    """The checks above, for the test modules (importlib mode: conftest is not importable)."""
    import types

    return types.SimpleNamespace(
        apply=apply,
        batch=batch,
        loss_of=loss_of,
        check_identity_at_init=check_identity_at_init,
        check_gradients_only_on_method=check_gradients_only_on_method,
        check_learns=check_learns,
        trainable_count=trainable_count,
    )
