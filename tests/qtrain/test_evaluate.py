"""qtrain.evaluate: greedy generation (left-padded batches) and exact match."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoTokenizer

import qtrain.evaluate
from qtrain.data import Rendered, alpaca_prompt, render, render_chat, synthetic_rows
from qtrain.evaluate import exact_match, generate
from qtrain.lora import LoRASpec, lora_modules
from qtrain.model import load_model


@pytest.fixture(scope="module")
def model_and_tok(tiny_checkpoint):
    path = tiny_checkpoint("llama")
    torch.manual_seed(0)
    model = load_model(str(path), LoRASpec(rank=4, alpha=8, dropout=0.5), compute_dtype=torch.float32).model
    with torch.no_grad():  # a non-trivial adapter, so dropout (train mode) would change outputs
        for m in lora_modules(model).values():
            m.lora_b.weight.normal_(0, 0.5)
    tok = AutoTokenizer.from_pretrained(path)
    return model, tok


ROWS = synthetic_rows(12, seed=5)
PROMPTS = [alpaca_prompt(r) for r in ROWS]  # four instructions of different lengths: padding matters


def test_generate_returns_one_string_per_prompt(model_and_tok):
    model, tok = model_and_tok
    out = generate(model, tok, PROMPTS, max_new_tokens=5)
    assert isinstance(out, list) and len(out) == len(PROMPTS)
    assert all(isinstance(s, str) for s in out)
    assert all("<pad>" not in s and "</s>" not in s and "<s>" not in s for s in out)  # specials skipped
    assert any(s for s in out)


def test_generate_respects_max_new_tokens(model_and_tok):
    model, tok = model_and_tok
    long = generate(model, tok, PROMPTS, max_new_tokens=8)
    for k in (1, 3):
        short = generate(model, tok, PROMPTS, max_new_tokens=k)
        for s, full in zip(short, long):
            assert len(s) <= k  # char tokenizer: at most one character per new token
            assert full.startswith(s)  # greedy: the shorter completion is a prefix of the longer one
    assert sum(map(len, long)) > sum(map(len, generate(model, tok, PROMPTS, max_new_tokens=3)))


def test_generate_batched_equals_one_by_one(model_and_tok):
    # left padding + attention mask: a prompt's completion does not depend on its batch mates
    model, tok = model_and_tok
    one = generate(model, tok, PROMPTS, max_new_tokens=6, batch_size=1)
    assert generate(model, tok, PROMPTS, max_new_tokens=6, batch_size=32) == one
    assert generate(model, tok, PROMPTS, max_new_tokens=6, batch_size=5) == one


@pytest.mark.parametrize("training", [True, False])
def test_generate_restores_padding_side_and_mode(model_and_tok, training):
    model, tok = model_and_tok
    tok.padding_side = "right"
    model.train(training)
    try:
        generate(model, tok, PROMPTS[:2], max_new_tokens=2)
        assert tok.padding_side == "right"
        assert model.training is training
        assert all(m.training is training for m in model.modules())
        # also when generation fails half-way (batch_size=0 raises inside the loop)
        with pytest.raises(ValueError):
            generate(model, tok, PROMPTS[:2], max_new_tokens=2, batch_size=0)
        assert tok.padding_side == "right" and model.training is training
    finally:
        model.eval()


def test_generate_runs_in_eval_mode(model_and_tok):
    # lora dropout 0.5: if generate sampled with dropout on, repeated calls would disagree
    model, tok = model_and_tok
    model.eval()
    want = generate(model, tok, PROMPTS, max_new_tokens=6)
    model.train()
    try:
        torch.manual_seed(1)
        assert generate(model, tok, PROMPTS, max_new_tokens=6) == want
        torch.manual_seed(2)
        assert generate(model, tok, PROMPTS, max_new_tokens=6) == want
    finally:
        model.eval()


def test_exact_match_scores_own_answers(model_and_tok):
    model, tok = model_and_tok
    answers = generate(model, tok, PROMPTS, max_new_tokens=4, batch_size=4)
    own = [dict(r, output=a) for r, a in zip(ROWS, answers)]
    assert exact_match(model, tok, own, max_new_tokens=4, batch_size=4) == 1.0
    padded = [dict(r, output=f"  {a}\n") for r, a in zip(ROWS, answers)]  # surrounding whitespace ignored
    assert exact_match(model, tok, padded, max_new_tokens=4, batch_size=7) == 1.0
    wrong = [dict(r, output=a + "#") for r, a in zip(ROWS, answers)]
    assert exact_match(model, tok, wrong, max_new_tokens=4) == 0.0
    half = own[:6] + wrong[6:]
    assert exact_match(model, tok, half, max_new_tokens=4) == pytest.approx(0.5)


def test_exact_match_compares_the_whole_answer(model_and_tok):
    # the answer must equal the output, not merely start with it
    model, tok = model_and_tok
    answers = generate(model, tok, PROMPTS, max_new_tokens=4)
    longer = [(r, a) for r, a in zip(ROWS, answers) if len(a.strip()) >= 2]
    assert longer
    prefixes = [dict(r, output=a.strip()[:-1]) for r, a in longer]
    assert exact_match(model, tok, prefixes, max_new_tokens=4) == 0.0


def test_exact_match_no_rows_is_nan(model_and_tok):
    model, tok = model_and_tok
    assert math.isnan(exact_match(model, tok, [], max_new_tokens=4))


# ---- Rendered rows (chat, prompt_completion, text): prompt and answer come from the rendering ----

CHATS = [[{"role": "user", "content": f"{r['instruction']} {r['input']}"}] for r in ROWS]


def chat_rows(tok, answers: list[str], history: bool = False) -> list[Rendered]:
    """One Rendered chat row per question, its (last) assistant turn being `answers[i]`."""
    rows = []
    for messages, answer in zip(CHATS, answers):
        if history:  # an earlier exchange: the answer scored is the last assistant turn
            messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}] + messages
        rows.append(render_chat(messages + [{"role": "assistant", "content": answer}], tok))
    return rows


@pytest.mark.parametrize("history", [False, True], ids=["one-turn", "multi-turn"])
def test_exact_match_on_rendered_chat_rows(model_and_tok, history):
    model, tok = model_and_tok
    assert tok.chat_template  # the tiny checkpoint's tokenizer has one
    prompts = [r.prompt for r in chat_rows(tok, ["?"] * len(CHATS), history)]
    assert all(p.endswith("<|assistant|>\n") for p in prompts)
    assert all(("Hello</s>" in p) == history for p in prompts)  # earlier turns are in the prompt
    answers = generate(model, tok, prompts, max_new_tokens=4, add_special_tokens=False)
    own = chat_rows(tok, answers, history)
    assert [r.prompt for r in own] == prompts and all(r.chat for r in own)
    assert exact_match(model, tok, own, max_new_tokens=4, batch_size=5) == 1.0
    wrong = chat_rows(tok, [a + "#" for a in answers], history)
    assert exact_match(model, tok, wrong, max_new_tokens=4) == 0.0
    assert exact_match(model, tok, own[:6] + wrong[6:], max_new_tokens=4) == pytest.approx(0.5)


def test_exact_match_rendered_rows_prompting(model_and_tok, monkeypatch):
    # chat prompts already hold the template's special tokens: no second BOS; other rows get them
    model, tok = model_and_tok
    calls = []

    def fake_generate(
        model, tokenizer, prompts, max_new_tokens, batch_size=32, add_special_tokens=True, temperature=0.0
    ):
        calls.append((list(prompts), add_special_tokens))
        return ["Paris"] * len(prompts)

    monkeypatch.setattr(qtrain.evaluate, "generate", fake_generate)
    chat = render_chat(
        [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris"}], tok
    )
    assert exact_match(model, tok, [chat], max_new_tokens=4) == 1.0
    assert calls[-1] == (["<|user|>\nCapital of France?\n<|assistant|>\n"], False)
    pc = render({"prompt": "Capital of Italy? ", "completion": "Rome"}, "prompt_completion", tok)
    assert exact_match(model, tok, [pc], max_new_tokens=4) == 0.0
    assert calls[-1] == (["Capital of Italy? "], True)
    assert exact_match(model, tok, [dict(ROWS[0], output="Paris")], max_new_tokens=4) == 1.0
    assert calls[-1] == ([alpaca_prompt(ROWS[0])], True)
    # text rows have no answer: left out, and with nothing left the score is NaN
    text = render({"text": "free text"}, "text", tok)
    n_calls = len(calls)
    assert math.isnan(exact_match(model, tok, [text, text], max_new_tokens=4))
    assert len(calls) == n_calls
    assert exact_match(model, tok, [text, pc, text], max_new_tokens=4) == 0.0
    assert calls[-1][0] == ["Capital of Italy? "]
