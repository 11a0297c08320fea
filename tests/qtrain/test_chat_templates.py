"""Chat rows rendered with the real chat templates of the families qtrain supports: what is trained
(each answer and the text that closes its turn, nothing else), the system prompt each family's
template allows, and the generation prompt against the training text.

The templates are the models' own (tests/fixtures/chat_templates, sources in its README), on a
character tokenizer with each family's special tokens added: no download."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from qtrain.data import (
    CHAT_TEMPLATE_KWARGS,
    IGNORE_INDEX,
    Table,
    _prefix_segments,
    build_dataset,
    render_chat,
    tokenize,
)
from qtrain.generate import format_prompt
from qtrain.tiny import char_tokenizer

TEMPLATES = Path(__file__).resolve().parents[1] / "fixtures" / "chat_templates"


@dataclass(frozen=True)
class Family:
    bos: str | None
    eos: str
    specials: tuple[str, ...]
    end: str  # what closes an answer the conversation goes on after
    last_end: str  # what closes the conversation's last answer
    lead: str = ""  # whitespace between header and answer that the model writes (not in the generation prompt)
    system: str = "rendered"  # rendered | folded (into the first user turn) | refused | dropped (see test)


FAMILIES = {
    "llama31": Family(
        "<|begin_of_text|>", "<|eot_id|>", ("<|start_header_id|>", "<|end_header_id|>"), "<|eot_id|>", "<|eot_id|>"
    ),
    "llama32": Family(
        "<|begin_of_text|>", "<|eot_id|>", ("<|start_header_id|>", "<|end_header_id|>"), "<|eot_id|>", "<|eot_id|>"
    ),
    "mistral": Family("<s>", "</s>", ("[INST]", "[/INST]"), "</s>", "</s>", lead=" ", system="dropped"),
    "qwen2": Family(None, "<|im_end|>", ("<|im_start|>", "<|endoftext|>"), "<|im_end|>\n", "<|im_end|>\n"),
    "qwen3": Family(None, "<|im_end|>", ("<|im_start|>", "<think>", "</think>"), "<|im_end|>\n", "<|im_end|>\n"),
    "phi4": Family(
        "<|endoftext|>",
        "<|endoftext|>",
        ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
        "<|end|>",
        "<|end|><|endoftext|>",
    ),
    "phi35": Family(
        "<s>",
        "<|endoftext|>",
        ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
        "<|end|>\n",
        "<|end|>\n<|endoftext|>",
    ),
    "gemma2": Family(
        "<bos>", "<eos>", ("<start_of_turn>", "<end_of_turn>"), "<end_of_turn>\n", "<end_of_turn>\n", system="refused"
    ),
    "gemma3": Family(
        "<bos>", "<eos>", ("<start_of_turn>", "<end_of_turn>"), "<end_of_turn>\n", "<end_of_turn>\n", system="folded"
    ),
    "olmo2": Family(
        "<|endoftext|>", "<|endoftext|>", ("<|system|>", "<|user|>", "<|assistant|>"), "<|endoftext|>", "<|endoftext|>"
    ),
}

SYSTEM = {"role": "system", "content": "Answer in one word."}
Q1, A1 = {"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}
Q2, A2 = {"role": "user", "content": "And of Italy?"}, {"role": "assistant", "content": "Rome."}
CONVERSATIONS = {"single": [Q1, A1], "multi": [Q1, A1, Q2, A2]}


def family_tokenizer(name: str):
    fam = FAMILIES[name]
    tok = char_tokenizer()
    specials = {"eos_token": fam.eos, "additional_special_tokens": list(fam.specials)}
    if fam.bos:
        specials["bos_token"] = fam.bos
    tok.add_special_tokens(specials)
    tok.chat_template = (TEMPLATES / f"{name}.jinja").read_text()
    return tok


def runs(tok, ids: list[int], labels: list[int], trained: bool) -> list[str]:
    """The decoded text of each maximal run of trained (or untrained) tokens."""
    out, current = [], []
    for token, label in zip(ids, labels):
        if (label != IGNORE_INDEX) == trained:
            assert not trained or label == token
            current.append(token)
        elif current:
            out.append(tok.decode(current))
            current = []
    return out + ([tok.decode(current)] if current else [])


def rendered_text(tok, messages: list[dict]) -> str:
    return tok.apply_chat_template(messages, tokenize=False, **CHAT_TEMPLATE_KWARGS)


def test_every_family_has_its_template():
    assert sorted(p.stem for p in TEMPLATES.glob("*.jinja")) == sorted(FAMILIES)


@pytest.mark.parametrize("with_system", [False, True], ids=["no-system", "system"])
@pytest.mark.parametrize("turns", sorted(CONVERSATIONS))
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_only_answers_and_their_end_of_turn_are_trained(name, turns, with_system):
    fam, tok = FAMILIES[name], family_tokenizer(name)
    messages = ([SYSTEM] if with_system else []) + CONVERSATIONS[turns]
    if with_system and fam.system == "refused":  # Gemma-2: the row is an error that says why
        with pytest.raises(ValueError, match="the template has no system role"):
            render_chat(messages, tok)
        return
    rendered = render_chat(messages, tok)
    ex = tokenize(tok, rendered, 4096)
    assert tok.decode(ex.input_ids) == rendered_text(tok, messages)  # the template's text, nothing added
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    ends = [fam.end] * (len(answers) - 1) + [fam.last_end]
    assert runs(tok, ex.input_ids, ex.labels, trained=True) == [fam.lead + a + e for a, e in zip(answers, ends)]
    context = "".join(runs(tok, ex.input_ids, ex.labels, trained=False))
    assert all(m["content"] in context for m in messages if m["role"] == "user")
    if with_system:  # where the family's template puts the system prompt, it is context
        assert (SYSTEM["content"] in context) == (fam.system != "dropped")
    assert rendered.answer == answers[-1]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_generation_prompt_is_the_training_text_before_the_answer(name):
    """`qtrain generate` renders a prompt as training rendered the text before an answer: for
    Qwen3 that includes the empty think block of its non-thinking form."""
    tok = family_tokenizer(name)
    ex = tokenize(tok, render_chat([Q1, A1], tok), 4096)
    before_answer = runs(tok, ex.input_ids, ex.labels, trained=False)[0]
    text, add_special_tokens = format_prompt(Q1["content"], "chat", tok)
    assert text == before_answer and not add_special_tokens
    if name == "qwen3":
        assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


@pytest.mark.parametrize("name", ["qwen3", "gemma2", "gemma3", "phi35", "phi4", "llama31"])
def test_multi_turn_prompt_is_the_training_text_before_the_last_answer(name):
    tok = family_tokenizer(name)
    rendered = render_chat([Q1, A1, Q2, A2], tok)
    full = rendered_text(tok, [Q1, A1, Q2, A2])
    assert full.startswith(rendered.prompt + A2["content"])
    assert rendered.answer == A2["content"]


@pytest.mark.parametrize(
    "name, messages, prefix_by_prefix",
    [
        ("qwen3", [Q1, A1], True),
        ("qwen3", [Q1, A1, Q2, A2], False),  # the think block only after the last user turn
        ("phi35", [Q1, A1, Q2, A2], False),  # EOS closes the conversation
        ("phi4", [Q1, A1, Q2, A2], False),
        ("llama31", [SYSTEM, Q1, A1, Q2, A2], True),
        ("mistral", [Q1, A1, Q2, A2], True),
        ("mistral", [SYSTEM, Q1, A1, Q2, A2], False),  # the system prompt moves to the last user turn
        ("gemma3", [SYSTEM, Q1, A1, Q2, A2], True),
        ("olmo2", [Q1, A1, Q2, A2], True),
    ],
)
def test_which_templates_render_prefix_by_prefix(name, messages, prefix_by_prefix):
    """The conversations the prefix algorithm cannot render are the ones located in one rendering
    (the test above checks what both train)."""
    assert (_prefix_segments(messages, family_tokenizer(name)) is not None) == prefix_by_prefix


def test_mistral_drops_the_system_prompt_of_a_conversation_that_ends_with_an_answer():
    """Mistral v0.3's template writes the system prompt into the last user turn only when that turn
    is the last message: never in a training row, always in a generation prompt."""
    tok = family_tokenizer("mistral")
    rendered = render_chat([SYSTEM, Q1, A1], tok)
    assert SYSTEM["content"] not in "".join(text for text, _ in rendered.segments)
    assert rendered.prompt == f"<s>[INST] {SYSTEM['content']}\n\n{Q1['content']}[/INST]"


def test_gemma3_folds_the_system_prompt_into_the_first_user_turn():
    tok = family_tokenizer("gemma3")
    text = rendered_text(tok, [SYSTEM, Q1, A1])
    assert text.startswith(f"<bos><start_of_turn>user\n{SYSTEM['content']}\n\n{Q1['content']}<end_of_turn>\n")


def test_a_template_without_system_role_names_the_row():
    tok = family_tokenizer("gemma2")
    rows = [{"messages": [Q1, A1]}, {"messages": [SYSTEM, Q1, A1]}]
    table = Table(rows, ["chat.jsonl:1", "chat.jsonl:2"], "chat.jsonl")
    with pytest.raises(ValueError) as e:
        build_dataset(table, "chat", tok, 512, train_on_prompt=False, bad_rows="error")
    row_line = next(line for line in str(e.value).splitlines() if line.startswith("  chat.jsonl:2"))
    assert row_line == (
        "  chat.jsonl:2: the chat template rejected this conversation: System role not supported"
        " (the template has no system role: drop the system message or put it in the first user turn)"
    )
    kept = build_dataset(table, "chat", tok, 512, train_on_prompt=False, bad_rows="skip")
    assert len(kept.examples) == 1 and len(kept.skipped) == 1


def test_qwen3_reasoning_in_an_answer_is_a_row_error():
    """Rows hold answers, not reasoning: a `<think>` trace in an answer the template rewrites is
    refused (the row is named), not trained half-located."""
    tok = family_tokenizer("qwen3")
    with pytest.raises(ValueError, match="nor each assistant turn's content as written"):
        render_chat([Q1, {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nParis."}, Q2, A2], tok)


@pytest.mark.parametrize(
    "name, system, want",
    [
        ("gemma2", [], ["Paris.<end_of_turn>\n", "Rome.<end_of_turn>\n"]),  # prefix by prefix
        ("mistral", [SYSTEM], [" Paris.</s>", " Rome.</s>"]),  # located in one rendering
    ],
)
def test_an_answer_the_template_trims_is_trained_as_written(name, system, want):
    tok = family_tokenizer(name)
    messages = [*system, Q1, {"role": "assistant", "content": "  Paris.\n"}, Q2, A2]
    ex = tokenize(tok, render_chat(messages, tok), 4096)
    assert tok.decode(ex.input_ids) == rendered_text(tok, messages)
    assert runs(tok, ex.input_ids, ex.labels, trained=True) == want
