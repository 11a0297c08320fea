"""qtrain.data: synthetic tasks, data formats (alpaca, chat, prompt_completion, text), reading files
(jsonl, json, csv, parquet, dataset folders) with row locators, labels, load_data and its eval
split, packing (and that packed examples do not see each other), and resumable batches."""

from __future__ import annotations

import copy
import json
import pickle
import random
from collections import Counter
from itertools import islice, pairwise
from pathlib import Path

import datasets
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import qtrain.train
from qtrain.config import DataConfig
from qtrain.data import (
    BAD_ROWS_LISTED,
    DEFAULT_CHAT_TEMPLATE,
    IGNORE_INDEX,
    Batches,
    Example,
    Rendered,
    Table,
    alpaca_prompt,
    batches,
    build_dataset,
    chat_messages,
    collate,
    collate_packed,
    describe_batches,
    detect_format,
    eval_batches,
    load_data,
    pack,
    read_jsonl,
    read_table,
    render,
    render_chat,
    split_table,
    synthetic_rows,
    synthetic_split,
    tokenize,
    tokenize_row,
    write_jsonl,
    write_skipped_rows,
)
from qtrain.lora import LoRASpec, lora_modules
from qtrain.model import load_model
from qtrain.tiny import char_tokenizer

ASSETS = Path(__file__).resolve().parents[1] / "assets"
ASSET = ASSETS / "alpaca_tiny.jsonl"
CHAT = ASSETS / "chat_tiny.jsonl"
SHAREGPT = ASSETS / "sharegpt_tiny.jsonl"  # the same conversations as CHAT, as {from, value} turns
PC_CSV = ASSETS / "prompt_completion_tiny.csv"
TASKS = {
    "Which letter comes next in the alphabet?": "next_letter",
    "Is this number even or odd?": "parity",
    "Write the word in capital letters.": "uppercase",
    "What is the largest digit?": "max_digit",
}


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """`datasets.load_dataset` caches into the test's temp dir (not ~/.cache), offline, quietly."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets_cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    datasets.disable_progress_bars()


def chars(tok, text: str) -> list[int]:
    """The char tokenizer's ids of `text`, one per character (no specials)."""
    return [tok.convert_tokens_to_ids(c) for c in text]


def labelled_runs(tok, ex: Example) -> list[str]:
    """The text of each maximal run of labelled tokens (labels must copy the ids where set)."""
    runs, current = [], []
    for token, label in zip(ex.input_ids, ex.labels):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    if current:
        runs.append(current)
    return [tok.decode(r) for r in runs]


def build(
    source, tok, fmt: str = "auto", max_length: int = 512, train_on_prompt: bool = False, bad_rows: str = "error"
):
    """As load_data does: unreadable rows wait in the table, to be reported with the rest."""
    table = source if isinstance(source, Table) else read_table(str(source), bad_rows="skip")
    return build_dataset(table, fmt, tok, max_length, train_on_prompt, bad_rows)


def table_of(rows: list[dict], source: str = "mem") -> Table:
    return Table(rows, [f"{source}:{i + 1}" for i in range(len(rows))], source)


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# ---- synthetic tasks -------------------------------------------------------------------------


def test_synthetic_rows_deterministic_per_seed():
    assert synthetic_rows(50, seed=7) == synthetic_rows(50, seed=7)
    assert synthetic_rows(50, seed=7) != synthetic_rows(50, seed=8)
    # a prefix of a longer draw: row i does not depend on n
    assert synthetic_rows(50, seed=7)[:20] == synthetic_rows(20, seed=7)


def test_synthetic_rows_cycle_through_the_tasks():
    rows = synthetic_rows(40, seed=0)
    assert [TASKS[r["instruction"]] for r in rows[:4]] == ["next_letter", "parity", "uppercase", "max_digit"]
    assert Counter(TASKS[r["instruction"]] for r in rows) == {t: 10 for t in TASKS.values()}


def expected_answer(row: dict) -> str:
    """Each task's answer, recomputed independently of qtrain.data."""
    task, x = TASKS[row["instruction"]], row["input"]
    if task == "next_letter":
        assert len(x) == 1 and x in "abcdefghijklmnopqrstuvwxy"  # never 'z': it has no next letter
        return "abcdefghijklmnopqrstuvwxyz"["abcdefghijklmnopqrstuvwxyz".index(x) + 1]
    if task == "parity":
        assert x.isdigit() and 10 <= int(x) < 10_000
        return ["even", "odd"][int(x) % 2]
    if task == "uppercase":
        assert x.isalpha() and x.islower() and 3 <= len(x) <= 5
        return "".join(chr(ord(c) - 32) for c in x)
    assert x.isdigit() and 3 <= len(x) <= 6
    return str(max(int(c) for c in x))


@pytest.mark.parametrize("seed", [0, 1, 1234])
def test_synthetic_answers_are_correct(seed):
    rows = synthetic_rows(400, seed)
    assert {set(r) == {"instruction", "input", "output"} for r in rows} == {True}
    for r in rows:
        assert r["output"] == expected_answer(r), r


@pytest.mark.parametrize("num_train, num_eval, seed", [(200, 20, 0), (50, 30, 3), (4000, 200, 1234)])
def test_synthetic_split_holds_out_eval(num_train, num_eval, seed):
    train, eval_rows = synthetic_split(num_train, num_eval, seed)
    assert len(train) == num_train and len(eval_rows) == num_eval
    seen = {(r["instruction"], r["input"]) for r in train}
    keys = [(r["instruction"], r["input"]) for r in eval_rows]
    assert not seen & set(keys)  # no eval question was trained on
    assert len(set(keys)) == len(keys)  # and none is asked twice
    assert train == synthetic_rows(num_train, seed)  # train rows are the plain seeded draw
    assert all(r["output"] == expected_answer(r) for r in eval_rows)
    assert synthetic_split(num_train, num_eval, seed) == (train, eval_rows)


# ---- format detection ------------------------------------------------------------------------

MSGS = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


@pytest.mark.parametrize(
    "row, fmt",
    [
        ({"messages": MSGS}, "chat"),
        ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}, "chat"),
        ({"messages": MSGS, "text": "x"}, "chat"),
        ({"instruction": "a", "output": "b"}, "alpaca"),
        ({"instruction": "a", "input": "", "output": "b", "text": "x"}, "alpaca"),
        ({"prompt": "a", "completion": "b"}, "prompt_completion"),
        ({"prompt": "a", "completion": "b", "text": "x"}, "prompt_completion"),
        ({"text": "hello", "meta": 3}, "text"),
    ],
)
def test_detect_format_from_columns(row, fmt):
    assert detect_format(row, "f.jsonl:1") == fmt


def test_detect_format_error_names_row_and_columns(tok, tmp_path):
    with pytest.raises(ValueError) as info:
        detect_format({"question": "q", "answer": "a"}, "f.jsonl:7")
    msg = str(info.value)
    assert msg.startswith("f.jsonl:7: ") and "['answer', 'question']" in msg and "data.format" in msg
    # through a file: the first row decides, and the message names it
    path = write_lines(tmp_path / "qa.jsonl", ["", json.dumps({"question": "q", "answer": "a"})])
    with pytest.raises(
        ValueError, match=r"qa\.jsonl:2: cannot tell the data format from the columns \['answer', 'question'\]"
    ):
        build(path, tok)
    # an instruction without output is not alpaca
    with pytest.raises(ValueError, match="cannot tell the data format"):
        build(table_of([{"instruction": "a", "response": "b"}]), tok)


def test_data_format_forces_a_format(tok, tmp_path):
    rows = [{"prompt": "P", "completion": "C", "text": "Some text."}] * 3
    path = tmp_path / "both.jsonl"
    write_jsonl(rows, path)
    auto = build(path, tok)
    assert auto.format == "prompt_completion" and labelled_runs(tok, auto.examples[0]) == ["C</s>"]
    forced = build(path, tok, fmt="text")
    assert forced.format == "text"
    assert forced.examples[0].input_ids == chars(tok, "Some text.") + [tok.eos_token_id]
    # through load_data and DataConfig.format
    train, _ = load_data(DataConfig(train=str(path), format="text", eval_fraction=0), tok)
    assert train.format == "text" and train.examples == forced.examples
    # forcing a format the rows do not have: the first row is named, with the missing field
    with pytest.raises(ValueError, match=r"both\.jsonl:1: missing or non-string 'instruction'"):
        build(path, tok, fmt="alpaca")
    with pytest.raises(ValueError, match=r"both\.jsonl:1: .*'messages'"):
        build(path, tok, fmt="chat")


# ---- alpaca, prompt_completion and text labels -----------------------------------------------


def test_char_tokenizer_is_one_token_per_char(tok):
    text = "### Response:\nab"
    assert tok(text)["input_ids"] == chars(tok, text)  # and no BOS added


ROW = {"instruction": "Name the capital of the country.", "input": "Japan", "output": "Tokyo"}
ROW_NO_INPUT = {"instruction": "How many legs does a spider have?", "output": "Eight."}


@pytest.mark.parametrize("row", [ROW, ROW_NO_INPUT], ids=["input", "no-input"])
def test_tokenize_row_labels_only_the_response(tok, row):
    prompt = alpaca_prompt(row)
    ex = tokenize_row(tok, row, max_length=512)
    n_prompt = len(prompt)  # one token per character
    assert ex.input_ids == chars(tok, prompt + row["output"]) + [tok.eos_token_id]
    assert len(ex.labels) == len(ex.input_ids)
    assert ex.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt  # exactly the prompt is masked
    assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:]  # response and EOS are labelled
    assert ex.labels[-1] == tok.eos_token_id
    assert IGNORE_INDEX not in ex.labels[n_prompt:]
    assert tok.decode(ex.input_ids[n_prompt:], skip_special_tokens=True) == row["output"]
    # the generic path gives the same
    assert tokenize(tok, render(row, "alpaca", tok), 512) == ex
    rendered = render(row, "alpaca", tok)
    assert rendered.prompt == prompt and rendered.answer == row["output"] and not rendered.chat


def test_tokenize_row_train_on_prompt(tok):
    ex = tokenize_row(tok, ROW, max_length=512, train_on_prompt=True)
    # every token but the first (which no token predicts)
    assert ex.labels == [IGNORE_INDEX] + ex.input_ids[1:]


@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_tokenize_row_truncation(tok, train_on_prompt):
    full = tokenize_row(tok, ROW, max_length=512, train_on_prompt=train_on_prompt)
    n_prompt = len(alpaca_prompt(ROW))
    for max_length in (n_prompt + 2, n_prompt, 10):  # cuts into the response, at its start, into the prompt
        ex = tokenize_row(tok, ROW, max_length=max_length, train_on_prompt=train_on_prompt)
        assert len(ex.input_ids) == len(ex.labels) == max_length
        assert ex.input_ids == full.input_ids[:max_length] and ex.labels == full.labels[:max_length]
    assert tokenize_row(tok, ROW, max_length=n_prompt + 2).labels[-2:] == chars(tok, "To")


def test_prompt_completion_labels_only_the_completion(tok):
    row = {"prompt": "Q: 2+2?\nA:", "completion": " 4"}
    rendered = render(row, "prompt_completion", tok)
    assert rendered.prompt == row["prompt"] and rendered.answer == " 4" and not rendered.chat
    ex = tokenize(tok, rendered, 512)
    n = len(row["prompt"])
    assert ex.input_ids == chars(tok, row["prompt"] + row["completion"]) + [tok.eos_token_id]
    assert ex.labels == [IGNORE_INDEX] * n + chars(tok, " 4") + [tok.eos_token_id]
    assert labelled_runs(tok, ex) == [" 4</s>"]
    on_prompt = tokenize(tok, rendered, 512, train_on_prompt=True)
    assert on_prompt.labels == [IGNORE_INDEX] + on_prompt.input_ids[1:]
    cut = tokenize(tok, rendered, n + 1)
    assert cut.input_ids == ex.input_ids[: n + 1] and cut.labels == ex.labels[: n + 1]


def test_text_trains_on_everything(tok):
    rendered = render({"text": "Hello, world.\nBye."}, "text", tok)
    assert rendered.prompt is None and rendered.answer is None
    ex = tokenize(tok, rendered, 512)
    assert ex.input_ids == chars(tok, "Hello, world.\nBye.") + [tok.eos_token_id]
    assert ex.labels == [IGNORE_INDEX] + ex.input_ids[1:]  # all but the first token, EOS included
    cut = tokenize(tok, rendered, 5)
    assert cut.input_ids == chars(tok, "Hello") and cut.labels == [IGNORE_INDEX] + chars(tok, "ello")


def test_tokenize_asset_rows(tok):
    # every asset row (with or without input, with non-ASCII characters) tokenizes with labels
    for row in read_jsonl(ASSET).rows:
        ex = tokenize_row(tok, row, max_length=512)
        assert len(ex.input_ids) == len(ex.labels) == len(alpaca_prompt(row)) + len(row["output"]) + 1
        assert sum(label != IGNORE_INDEX for label in ex.labels) == len(row["output"]) + 1


def test_rows_whose_prompt_fills_max_length_are_dropped_and_counted(tok):
    long = {"prompt": "x" * 30, "completion": "y"}
    short = {"prompt": "p", "completion": "c"}
    ds = build(table_of([short, long, short]), tok, max_length=20)
    assert ds.too_long == 1 and len(ds.examples) == len(ds.rendered) == 2
    assert all(len(e.input_ids) <= 20 for e in ds.examples)
    with pytest.raises(ValueError, match=r"every row was dropped; the prompts fill data\.max_length=20"):
        build(table_of([long, long]), tok, max_length=20)


# ---- chat ------------------------------------------------------------------------------------

MULTI = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Ciao"},
]


def test_chat_trains_exactly_on_assistant_turns(tok):
    rendered = render_chat(MULTI, tok)
    assert rendered.chat
    ex = tokenize(tok, rendered, 512)
    full = tok.apply_chat_template(MULTI, tokenize=False)
    assert tok.decode(ex.input_ids) == full  # the template's text, nothing added (no BOS, no extra EOS)
    assert ex.input_ids == tok(full, add_special_tokens=False)["input_ids"]
    # both assistant turns (with the EOS the template closes them with), nothing else
    assert labelled_runs(tok, ex) == ["Hello</s>\n", "Ciao</s>\n"]
    unlabelled = tok.decode([t for t, label in zip(ex.input_ids, ex.labels) if label == IGNORE_INDEX])
    assert unlabelled == "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n<|user|>\nBye\n<|assistant|>\n"
    assert sum(label == tok.eos_token_id for label in ex.labels) == 2
    # the prompt for generation is everything before the last answer
    assert rendered.answer == "Ciao"
    assert rendered.prompt == tok.apply_chat_template(MULTI[:-1], tokenize=False, add_generation_prompt=True)
    assert full.startswith(rendered.prompt + "Ciao")


def test_chat_train_on_prompt_labels_all_but_the_first_token(tok):
    ex = tokenize(tok, render_chat(MULTI, tok), 512, train_on_prompt=True)
    assert ex.labels == [IGNORE_INDEX] + ex.input_ids[1:]


def test_chat_turns_after_the_last_answer_are_context(tok):
    messages = MULTI[1:3] + [{"role": "user", "content": "Thanks"}]
    rendered = render_chat(messages, tok)
    ex = tokenize(tok, rendered, 512)
    assert tok.decode(ex.input_ids) == tok.apply_chat_template(messages, tokenize=False)
    assert labelled_runs(tok, ex) == ["Hello</s>\n"]
    assert rendered.answer == "Hello" and rendered.prompt == "<|user|>\nHi\n<|assistant|>\n"


def test_chat_truncation(tok):
    full = tokenize(tok, render_chat(MULTI, tok), 512)
    n = len("<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\nHel")
    ex = tokenize(tok, render_chat(MULTI, tok), n)
    assert ex.input_ids == full.input_ids[:n] and ex.labels == full.labels[:n]
    assert labelled_runs(tok, ex) == ["Hel"]


def test_sharegpt_conversations_equal_messages(tok):
    chat, sharegpt = build(CHAT, tok), build(SHAREGPT, tok)
    assert chat.format == sharegpt.format == "chat"
    assert len(chat.examples) == 6
    assert sharegpt.examples == chat.examples and sharegpt.rendered == chat.rendered
    for row_m, row_s in zip(read_jsonl(CHAT).rows, read_jsonl(SHAREGPT).rows):
        assert chat_messages(row_s) == chat_messages(row_m) == row_m["messages"]
    # two-turn rows have both answers labelled
    assert labelled_runs(tok, chat.examples[1]) == ["Hello.</s>\n", "4</s>\n"]
    assert [r.answer for r in chat.rendered] == ["Paris", "4", "tac", "Green.", "r", "odd"]


def test_tokenizer_without_chat_template_gets_the_default(tok):
    bare = char_tokenizer()
    bare.chat_template = None
    ds = build(CHAT, bare)
    assert bare.chat_template == DEFAULT_CHAT_TEMPLATE
    ex = ds.examples[0]
    assert (
        tok.decode(ex.input_ids)
        == "### System:\nAnswer in one word.\n\n### User:\nCapital of France?\n\n### Assistant:\nParis</s>\n\n"
    )
    assert labelled_runs(tok, ex) == ["Paris</s>\n\n"]
    assert labelled_runs(tok, ds.examples[1]) == ["Hello.</s>\n\n", "4</s>\n\n"]
    assert ds.rendered[0].prompt.endswith("### Assistant:\n")
    # a tokenizer with a template keeps it
    build(CHAT, tok)
    assert tok.chat_template != DEFAULT_CHAT_TEMPLATE


def test_chat_template_problems_are_row_errors(tok):
    rows = [{"messages": MSGS}, {"messages": [{"role": "system", "content": "s"}] + MSGS}]
    strict = char_tokenizer()
    strict.chat_template = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('conversations must start with a user turn') }}{% endif %}"
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    with pytest.raises(
        ValueError, match="mem:2: the chat template rejected this conversation: conversations must start"
    ):
        build(table_of(rows), strict)
    assert len(build(table_of(rows), strict, bad_rows="skip").skipped) == 1
    counting = char_tokenizer()  # renders the number of messages first: not prefix by prefix
    counting.chat_template = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match="mem:1: the chat template does not render this conversation prefix by prefix"):
        build(table_of(rows), counting)


# ---- reading files ---------------------------------------------------------------------------

PC_ROWS = [{"prompt": f"Question {i}, with a comma?", "completion": f"Answer {i}"} for i in range(5)]
CHAT_ROWS = [json.loads(line) for line in CHAT.read_text().splitlines()]


def write_as(kind: str, rows: list[dict], tmp_path: Path) -> Path:
    """`rows` written as a .jsonl/.json/.csv/.parquet file or a dataset folder (Hub layout)."""
    if kind == "jsonl":
        path = tmp_path / "d.jsonl"
        write_jsonl(rows, path)
    elif kind == "json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif kind == "csv":
        path = tmp_path / "d.csv"
        pd.DataFrame(rows).to_csv(path, index=False)
    elif kind == "parquet":
        path = tmp_path / "d.parquet"
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    else:
        path = tmp_path / "ds"
        (path / "data").mkdir(parents=True)
        datasets.Dataset.from_list(rows).to_parquet(str(path / "data" / "train-00000-of-00001.parquet"))
    return path


KINDS = ["jsonl", "json", "csv", "parquet", "dir"]


@pytest.mark.parametrize("kind", KINDS)
def test_read_table_every_kind_gives_the_same_rows(kind, tmp_path):
    path = write_as(kind, PC_ROWS, tmp_path)
    table = read_table(str(path))
    assert table.rows == PC_ROWS
    if kind == "jsonl":
        assert table.where == [f"{path}:{i}" for i in range(1, 6)]
    elif kind == "csv":  # line 1 is the header
        assert table.where == [f"{path}:{i}" for i in range(2, 7)]
    elif kind == "dir":  # the Hub-id path: a split of a dataset
        assert table.source == f"{path} (train)" and table.where == [f"{path} (train) row {i}" for i in range(1, 6)]
    else:
        assert table.where == [f"{path} row {i}" for i in range(1, 6)]


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "dir"])
def test_read_table_nested_chat_rows(kind, tok, tmp_path):
    path = write_as(kind, CHAT_ROWS, tmp_path)
    assert read_table(str(path)).rows == CHAT_ROWS
    assert build(path, tok).examples == build(CHAT, tok).examples


def test_csv_cells_are_strings(tok, tmp_path):
    # a column of digits is still text (not int64), empty cells are missing
    path = write_lines(tmp_path / "num.csv", ["prompt,completion", "2+3=,5", "1+1=,2", "0+7=,7"])
    assert read_table(str(path)).rows == [
        {"prompt": "2+3=", "completion": "5"},
        {"prompt": "1+1=", "completion": "2"},
        {"prompt": "0+7=", "completion": "7"},
    ]
    assert labelled_runs(tok, build(path, tok).examples[0]) == ["5</s>"]


def test_asset_csv(tok):
    ds = build(PC_CSV, tok)
    assert ds.format == "prompt_completion" and len(ds.examples) == 8
    assert ds.rendered[1].prompt == "Add: 2, 3" and ds.rendered[1].answer == "5"
    assert ds.rendered[2].prompt == 'Quote: say "hi"' and ds.rendered[2].answer == '"hi"'


def test_read_jsonl_roundtrip_and_blank_lines(tmp_path):
    rows = [{"instruction": "a", "input": "b", "output": "c"}, {"instruction": "d", "output": "é\n"}]
    write_jsonl(rows, tmp_path / "r.jsonl")
    assert read_jsonl(tmp_path / "r.jsonl").rows == rows
    good = json.dumps({"instruction": "Say hi.", "output": "hi"})
    table = read_jsonl(write_lines(tmp_path / "blank.jsonl", ["", good, "   ", good, ""]))
    assert len(table.rows) == 2 and table.where == [f"{tmp_path / 'blank.jsonl'}:2", f"{tmp_path / 'blank.jsonl'}:4"]


@pytest.mark.parametrize("name", ["nope.jsonl", "nope.json", "nope.csv", "nope.parquet"])
def test_missing_file(tmp_path, name):
    with pytest.raises(FileNotFoundError, match=name):
        read_table(str(tmp_path / name))
    with pytest.raises(FileNotFoundError, match=name):
        load_data(DataConfig(train=str(tmp_path / name)), char_tokenizer())


def test_unsupported_or_unreadable_files(tmp_path):
    txt = write_lines(tmp_path / "d.txt", ["hello"])
    with pytest.raises(ValueError, match=r"d\.txt: unsupported data file type '\.txt'"):
        read_table(str(txt))
    broken = write_lines(tmp_path / "broken.json", ['[{"text": "a"}, {"text": '])
    with pytest.raises(ValueError, match=r"broken\.json: could not be read as a dataset"):
        read_table(str(broken))


def test_empty_file(tok, tmp_path):
    path = write_lines(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(ValueError, match="no rows") as info:
        build(path, tok)
    assert str(path) in str(info.value)


# ---- malformed rows: the error names the file and the line / row -----------------------------

GOOD = json.dumps({"instruction": "Say hi.", "output": "hi"})


@pytest.mark.parametrize(
    "bad, needle",
    [
        ('{"instruction": "x", "output": ', "not valid JSON"),
        (json.dumps({"instruction": "x"}), "'output'"),
        (json.dumps({"output": "x"}), "'instruction'"),
        (json.dumps({"instruction": "x", "output": 3}), "'output'"),
        (json.dumps({"instruction": "x", "input": 5, "output": "y"}), "'input'"),
        (json.dumps(["instruction", "output"]), "expected a JSON object, got list"),
        ('"just a string"', "expected a JSON object, got str"),
    ],
)
def test_bad_jsonl_row_names_file_and_line(tok, tmp_path, bad, needle):
    # line 3 is the bad one (a blank line 2 still counts)
    path = write_lines(tmp_path / "bad.jsonl", [GOOD, "", bad, GOOD])
    with pytest.raises(ValueError) as info:
        build(path, tok)
    first, *listed = str(info.value).splitlines()
    assert first.startswith(f"{path}: 1 malformed row (first at {path}:3: ") and needle in first
    assert first.endswith("; fix them or set data.bad_rows=skip") and len(listed) == 1
    ds = build(path, tok, bad_rows="skip")
    assert len(ds.examples) == 2 and len(ds.skipped) == 1
    assert ds.skipped[0].startswith(f"{path}:3: ") and needle in ds.skipped[0]


def chat_row(*contents_and_roles) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in contents_and_roles]}


OK_CHAT = chat_row(("user", "hi"), ("assistant", "hello"))


@pytest.mark.parametrize(
    "kind, rows, where, needle",
    [
        (
            "jsonl",
            [OK_CHAT, OK_CHAT, chat_row(("user", "hi"), ("user", "again"))],
            "bad.jsonl:3",
            "at least one assistant message",
        ),
        ("jsonl", [OK_CHAT, {"messages": [{"role": "user", "content": 5}]}], "bad.jsonl:2", "messages[0]"),
        ("jsonl", [OK_CHAT, {"messages": []}], "bad.jsonl:2", "non-empty"),
        ("jsonl", [OK_CHAT, {"conversations": [{"from": "robot", "value": "x"}]}], "bad.jsonl:2", "conversations[0]"),
        (
            "csv",
            [{"prompt": "a", "completion": "b"}] * 2 + [{"prompt": "c", "completion": None}],
            "data.csv:4",
            "'completion'",
        ),
        (
            "parquet",
            [OK_CHAT, chat_row(("system", "s"), ("user", "hi"))],
            "x.parquet row 2",
            "at least one assistant message",
        ),
        ("parquet", [{"text": "a"}, {"text": "b"}, {"text": None}], "x.parquet row 3", "'text'"),
        (
            "json",
            [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": None}],
            "bad.json row 2",
            "'output'",
        ),
    ],
)
def test_bad_rows_name_file_and_row(tok, tmp_path, kind, rows, where, needle):
    name = where.split(":")[0].split(" ")[0]
    path = tmp_path / name
    if kind == "jsonl":
        write_jsonl(rows, path)
    elif kind == "json":
        path.write_text(json.dumps(rows))
    elif kind == "csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    with pytest.raises(ValueError) as info:
        build(path, tok)
    first = str(info.value).splitlines()[0]
    assert first.startswith(f"{path}: 1 malformed row (first at {tmp_path / where}: ") and needle in first, first
    ds = build(path, tok, bad_rows="skip")
    assert len(ds.examples) == len(rows) - 1 and len(ds.skipped) == 1
    assert ds.skipped[0].startswith(f"{tmp_path / where}: ")


def test_bad_rows_skip_counts_every_skipped_row(tok, tmp_path):
    path = write_lines(tmp_path / "mixed.jsonl", [GOOD, "{oops", json.dumps({"instruction": "x"}), GOOD, "[1]", GOOD])
    ds = build(path, tok, bad_rows="skip")
    assert len(ds.examples) == 3
    assert sorted(s.split(": ")[0] for s in ds.skipped) == [f"{path}:{i}" for i in (2, 3, 5)]
    # load_data keeps them (train rows), with a holdout too
    train, _ = load_data(DataConfig(train=str(path), bad_rows="skip", eval_fraction=0), tok)
    assert len(train.skipped) == 3 and len(train.examples) == 3


def test_all_rows_bad_is_a_clear_error(tok, tmp_path):
    path = write_lines(tmp_path / "junk.jsonl", ["{", "nope", "[1, 2]"])
    with pytest.raises(ValueError, match=r"junk\.jsonl:1: not valid JSON"):
        build(path, tok)
    with pytest.raises(
        ValueError, match=r"junk\.jsonl: no rows; every row was malformed, first: .*junk\.jsonl:1: not valid JSON"
    ):
        build(path, tok, bad_rows="skip")
    csv_path = write_lines(tmp_path / "junk.csv", ["prompt,completion", "a,", "b,"])
    with pytest.raises(
        ValueError, match=r"junk\.csv: every row was dropped; first: .*junk\.csv:2: missing or non-string 'completion'"
    ):
        build(csv_path, tok, bad_rows="skip")


def test_skip_leaves_good_files_alone(tok):
    assert build(CHAT, tok, bad_rows="skip").skipped == []


def error_lines(excinfo) -> tuple[str, list[str]]:
    """The first line of a bad-rows error, and the rows it lists (indented lines)."""
    first, *rest = str(excinfo.value).splitlines()
    return first, [line.strip() for line in rest]


def test_error_lists_every_malformed_row_of_a_file(tok, tmp_path):
    # every kind of bad row the loader detects, in one file: all of them in one error, in file order
    lines = [
        GOOD,
        "{oops",  # 2: not JSON
        json.dumps({"instruction": "x"}),  # 3: no output
        GOOD,
        "[1]",  # 5: not an object
        json.dumps({"instruction": "x", "input": 5, "output": "y"}),  # 6: input not a string
        json.dumps({"question": "q"}),  # 7: no format at all
        GOOD,
    ]
    path = write_lines(tmp_path / "many.jsonl", lines)
    with pytest.raises(ValueError) as info:
        build(path, tok)
    first, listed = error_lines(info)
    assert first == (
        f"{path}: 5 malformed rows (first at {path}:2: not valid JSON (Expecting property name enclosed in double "
        "quotes)); fix them or set data.bad_rows=skip"
    )
    assert [line.split(": ")[0] for line in listed] == [f"{path}:{i}" for i in (2, 3, 5, 6, 7)]
    for line, needle in zip(listed, ["not valid JSON", "'output'", "got list", "'input'", "cannot tell the data format"]):
        assert needle in line, line
    # the same rows through load_data (rows held out for eval are reported with the rest of the file)
    for fraction in (0.0, 0.5):
        with pytest.raises(ValueError) as info:
            load_data(DataConfig(train=str(path), eval_fraction=fraction, seed=1), tok)
        assert error_lines(info) == (first, listed)
    # and with data.bad_rows=skip, the same rows are skipped
    ds = build(path, tok, bad_rows="skip")
    assert len(ds.examples) == 3 and ds.skipped == listed


def test_error_lists_the_first_rows_and_counts_the_rest(tok, tmp_path):
    n = BAD_ROWS_LISTED + 5
    path = write_lines(tmp_path / "bad.jsonl", [GOOD] + ["{"] * n)
    with pytest.raises(ValueError) as info:
        build(path, tok)
    first, listed = error_lines(info)
    assert first.startswith(f"{path}: {n} malformed rows (first at {path}:2: not valid JSON")
    assert listed[:-1] == [f"{path}:{i}: not valid JSON (Expecting property name enclosed in double quotes)" for i in range(2, 22)]
    assert listed[-1] == "... and 5 more"


@pytest.mark.parametrize("kind", ["json", "csv", "parquet"])
def test_error_lists_every_malformed_row_of_other_kinds(tok, tmp_path, kind):
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": None}] * 3
    path = write_as(kind, rows, tmp_path)
    with pytest.raises(ValueError) as info:
        build(path, tok)
    first, listed = error_lines(info)
    where = [f"{path}:{i}" for i in (3, 5, 7)] if kind == "csv" else [f"{path} row {i}" for i in (2, 4, 6)]
    assert first.startswith(f"{path}: 3 malformed rows (first at {where[0]}: missing or non-string 'completion'")
    assert listed == [f"{w}: missing or non-string 'completion' (prompt_completion rows need prompt and completion)" for w in where]


def test_load_data_error_names_the_train_and_the_eval_file(tok, tmp_path):
    train = write_lines(tmp_path / "train.jsonl", [GOOD, "{", GOOD])
    eval_path = write_lines(tmp_path / "eval.jsonl", [json.dumps({"instruction": "x"}), GOOD, "[]"])
    with pytest.raises(ValueError) as info:
        load_data(DataConfig(train=str(train), eval=str(eval_path)), tok)
    first, rest = error_lines(info)
    assert first.startswith(f"{train}: 1 malformed row (first at {train}:2: not valid JSON")
    assert rest[0].startswith(f"{train}:2: not valid JSON")
    assert rest[1].startswith(f"{eval_path}: 2 malformed rows (first at {eval_path}:1: missing or non-string 'output'")
    assert [r.split(": ")[0] for r in rest[2:]] == [f"{eval_path}:1", f"{eval_path}:3"]
    # skipped, they are kept per file
    train_ds, eval_ds = load_data(DataConfig(train=str(train), eval=str(eval_path), bad_rows="skip"), tok)
    assert [b.where for b in train_ds.skipped] == [f"{train}:2"]
    assert [b.where for b in eval_ds.skipped] == [f"{eval_path}:1", f"{eval_path}:3"]


def test_csv_rows_are_named_by_the_line_they_start_on(tok, tmp_path):
    # a quoted cell spans lines 3-4; line 5 has a cell too many, line 7 one too few
    path = write_lines(
        tmp_path / "lines.csv",
        ["prompt,completion", "a,b", '"two', 'lines",c', "d,e,f", "", "g", "h,"],
    )
    with pytest.raises(ValueError) as info:
        build(path, tok)
    first, listed = error_lines(info)
    assert first.startswith(f"{path}: 3 malformed rows (first at {path}:5: 3 cells, the header has 2)")
    assert listed == [
        f"{path}:5: 3 cells, the header has 2",
        f"{path}:7: 1 cell, the header has 2",
        f"{path}:8: missing or non-string 'completion' (prompt_completion rows need prompt and completion)",
    ]
    with pytest.raises(ValueError) as info:  # read alone: the rows that cannot be read
        read_table(str(path))
    assert error_lines(info) == (f"{path}: 2 malformed rows (first at {listed[0]}); fix them or set data.bad_rows=skip", listed[:2])
    table = read_table(str(path), bad_rows="skip")
    assert table.where == [f"{path}:2", f"{path}:3", f"{path}:8"]
    assert table.rows[1] == {"prompt": "two\nlines", "completion": "c"}


def test_write_skipped_rows_records_every_skipped_row(tok, tmp_path):
    train = write_lines(tmp_path / "train.jsonl", [GOOD, "{", GOOD, "[1]", GOOD])
    eval_path = write_lines(tmp_path / "eval.jsonl", [GOOD, json.dumps({"instruction": "x"})])
    data = load_data(DataConfig(train=str(train), eval=str(eval_path), bad_rows="skip"), tok)
    out = tmp_path / "run" / "skipped_rows.jsonl"
    out.parent.mkdir()
    out.write_text("from an earlier start\n")
    assert write_skipped_rows(list(data), out) == 3
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records == [
        {"where": f"{train}:2", "reason": "not valid JSON (Expecting property name enclosed in double quotes)"},
        {"where": f"{train}:4", "reason": "expected a JSON object, got list"},
        {"where": f"{eval_path}:2", "reason": "missing or non-string 'output' (alpaca rows need instruction and output)"},
    ]
    assert sorted(p.name for p in out.parent.iterdir()) == ["skipped_rows.jsonl"]  # no temp file left
    # nothing skipped: nothing written; no eval data: None is fine
    clean = load_data(DataConfig(train=str(ASSET), eval_fraction=0, bad_rows="skip"), tok)
    assert write_skipped_rows(list(clean), tmp_path / "none.jsonl") == 0 and not (tmp_path / "none.jsonl").exists()


def test_write_skipped_rows_is_atomic(tok, tmp_path, monkeypatch):
    ds = build(write_lines(tmp_path / "t.jsonl", [GOOD, "{"]), tok, bad_rows="skip")
    out = tmp_path / "skipped_rows.jsonl"
    out.write_text("old\n")

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr("qtrain.rundir.os.replace", fail)  # the atomic write's rename
    with pytest.raises(OSError, match="disk full"):
        write_skipped_rows([ds], out)
    assert out.read_text() == "old\n"  # a failed write leaves the old record whole
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # and no temp file


def test_skipped_rows_survive_copy_and_pickle(tok, tmp_path):
    ds = build(write_lines(tmp_path / "t.jsonl", [GOOD, "{"]), tok, bad_rows="skip")
    for again in (copy.deepcopy(ds.skipped), pickle.loads(pickle.dumps(ds.skipped))):
        assert again == ds.skipped and [(b.where, b.reason) for b in again] == [(b.where, b.reason) for b in ds.skipped]


BOM = b"\xef\xbb\xbf"


@pytest.mark.parametrize("kind", ["jsonl", "json", "json-lines", "csv"])
def test_a_byte_order_mark_is_not_part_of_row_one(tok, tmp_path, kind):
    if kind == "json-lines":  # a .json file of JSON lines
        path = tmp_path / "d.json"
        write_jsonl(PC_ROWS, path)
    else:
        path = write_as(kind, PC_ROWS, tmp_path)
    path.write_bytes(BOM + path.read_bytes())
    table = read_table(str(path))
    assert table.rows == PC_ROWS
    assert build(path, tok).format == "prompt_completion"


def test_dataset_scripts_are_not_run(tmp_path):
    folder = tmp_path / "scripted"
    (folder / "data").mkdir(parents=True)
    datasets.Dataset.from_list(PC_ROWS).to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    marker = tmp_path / "script_ran"
    (folder / "scripted.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    try:
        table = read_table(str(folder))
    except ValueError as e:  # datasets >= 4 refuses the folder: one line naming it and the script
        assert str(e).startswith(f"{folder} (train): ") and "scripted.py" in str(e) and "\n" not in str(e)
    else:  # or reads the data files only
        assert table.rows == PC_ROWS
    assert not marker.exists()


# ---- load_data and the eval split ------------------------------------------------------------


def test_asset_file_is_valid_alpaca():
    rows = read_jsonl(ASSET).rows
    assert len(rows) == 40
    with_input = [r for r in rows if r.get("input")]
    assert 10 < len(with_input) < 40  # both kinds of row
    assert any("input" not in r for r in rows) and any(r.get("input") == "" for r in rows)
    assert "### Input:" in alpaca_prompt(with_input[0])
    assert all("### Input:" not in alpaca_prompt(r) for r in rows if not r.get("input"))


def test_load_data_synthetic(tok):
    cfg = DataConfig(num_train=30, num_eval=6, seed=5)
    train, eval_ds = load_data(cfg, tok)
    train_rows, eval_rows = synthetic_split(30, 6, 5)
    assert train.format == eval_ds.format == "alpaca" and train.source == "synthetic"
    assert train.examples == [tokenize_row(tok, r, cfg.max_length) for r in train_rows]
    assert [r.answer for r in eval_ds.rendered] == [r["output"] for r in eval_rows]
    assert [r.prompt for r in eval_ds.rendered] == [alpaca_prompt(r) for r in eval_rows]


def key(r: Rendered) -> tuple:
    return (r.prompt, r.answer)


def test_split_table_is_seeded_disjoint_and_keeps_order():
    table = read_jsonl(ASSET)
    train, held = split_table(table, 0.1, seed=3)
    assert len(held.rows) == 4 and len(train.rows) == 36
    assert not set(train.where) & set(held.where)  # disjoint
    assert sorted(train.where + held.where) == sorted(table.where)  # a partition
    for part in (train, held):  # file order kept, each row with its own locator
        idx = [table.where.index(w) for w in part.where]
        assert idx == sorted(idx) and part.rows == [table.rows[i] for i in idx]
    again = split_table(table, 0.1, seed=3)
    assert again[0].where == train.where and again[1].where == held.where  # deterministic
    assert split_table(table, 0.1, seed=4)[1].where != held.where  # and the seed matters
    assert split_table(table, 0.0, seed=3) == (table, None)
    assert split_table(table, 0.01, seed=3) == (table, None)  # rounds to no row
    assert split_table(Table(table.rows[:1], table.where[:1], "one"), 0.5, seed=3)[1] is None


def test_load_data_holds_out_eval_fraction(tok):
    all_rows = read_jsonl(ASSET).rows
    cfg = DataConfig(train=str(ASSET), eval_fraction=0.05, seed=0)
    train, eval_ds = load_data(cfg, tok)
    assert len(eval_ds.examples) == 2 and len(train.examples) == 38  # 5% of 40
    want = Counter((alpaca_prompt(r), r["output"]) for r in all_rows)
    assert Counter(map(key, train.rendered)) + Counter(map(key, eval_ds.rendered)) == want  # a partition
    again_train, again_eval = load_data(cfg, tok)
    assert again_train.examples == train.examples and again_eval.examples == eval_ds.examples
    other = load_data(DataConfig(train=str(ASSET), eval_fraction=0.25, seed=1), tok)
    assert len(other[1].examples) == 10 and len(other[0].examples) == 30


def test_load_data_eval_fraction_zero_means_no_eval(tok):
    train, eval_ds = load_data(DataConfig(train=str(ASSET), eval_fraction=0.0), tok)
    assert eval_ds is None and len(train.examples) == 40


def test_load_data_with_eval_file(tok, tmp_path):
    eval_path = tmp_path / "eval.jsonl"
    write_jsonl([{"instruction": "q", "output": "a"}], eval_path)
    # an eval file replaces the holdout: every train row is trained on
    train, eval_ds = load_data(DataConfig(train=str(ASSET), eval=str(eval_path), eval_fraction=0.25), tok)
    assert len(train.examples) == 40
    assert [key(r) for r in eval_ds.rendered] == [(alpaca_prompt({"instruction": "q"}), "a")]
    assert eval_ds.source == str(eval_path)
    # synthetic train with an eval file
    train, eval_ds = load_data(DataConfig(num_train=12, eval=str(eval_path)), tok)
    assert train.examples == [tokenize_row(tok, r, 512) for r in synthetic_rows(12, 1234)]
    assert [r.answer for r in eval_ds.rendered] == ["a"]


def test_load_data_eval_uses_the_train_format(tok, tmp_path):
    train_path, eval_path = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    write_jsonl([{"text": "some text"}] * 4, train_path)
    # alone, the eval rows would read as prompt_completion; with this train data they are text
    write_jsonl([{"prompt": "P", "completion": "C", "text": "eval text"}], eval_path)
    train, eval_ds = load_data(DataConfig(train=str(train_path), eval=str(eval_path)), tok)
    assert train.format == eval_ds.format == "text"
    assert eval_ds.examples[0].input_ids == chars(tok, "eval text") + [tok.eos_token_id]
    # eval rows that do not fit the train format are named
    with pytest.raises(ValueError, match=r"chat_tiny\.jsonl:1: missing or non-string 'text'"):
        load_data(DataConfig(train=str(train_path), eval=str(CHAT)), tok)


def test_load_data_from_a_dataset_folder(tok, tmp_path):
    folder = write_as("dir", CHAT_ROWS, tmp_path)
    train, eval_ds = load_data(DataConfig(train=str(folder), eval_fraction=0), tok)
    assert train.format == "chat" and train.examples == build(CHAT, tok).examples and eval_ds is None


# ---- collate ---------------------------------------------------------------------------------


def test_collate_right_pads():
    a = Example([5, 6, 7], [IGNORE_INDEX, 6, 7])
    b = Example([8], [IGNORE_INDEX])
    c = Example([9, 10, 11, 12, 13], [IGNORE_INDEX] * 3 + [12, 13])
    out = collate([a, b, c], pad_id=0)
    assert set(out) == {"input_ids", "labels", "attention_mask", "num_tokens"}
    assert all(out[k].dtype == torch.long and out[k].shape == (3, 5) for k in ("input_ids", "labels", "attention_mask"))
    assert out["input_ids"].tolist() == [[5, 6, 7, 0, 0], [8, 0, 0, 0, 0], [9, 10, 11, 12, 13]]
    assert out["labels"].tolist() == [
        [IGNORE_INDEX, 6, 7, IGNORE_INDEX, IGNORE_INDEX],
        [IGNORE_INDEX] * 5,
        [IGNORE_INDEX] * 3 + [12, 13],
    ]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1] * 5]
    assert out["num_tokens"].item() == 9
    assert collate([b], pad_id=99)["input_ids"].tolist() == [[8]]


def test_eval_batches_in_order_once_with_the_partial_batch():
    ex = [Example([i + 10] * (1 + i % 3), [i + 10] * (1 + i % 3)) for i in range(7)]
    got = list(eval_batches(ex, 3, pad_id=0))
    assert [b["input_ids"].shape[0] for b in got] == [3, 3, 1]
    assert [row[0] - 10 for b in got for row in b["input_ids"].tolist()] == list(range(7))


# ---- packing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_pack_respects_max_length_and_keeps_order(seed):
    rng = random.Random(seed)
    max_length = 64
    lengths = [rng.randint(1, max_length) for _ in range(200)] + [max_length]
    order = list(range(len(lengths)))
    rng.shuffle(order)
    bins = pack(order, lengths, max_length)
    assert [i for b in bins for i in b] == order  # every id once, in order
    assert all(b and sum(lengths[i] for i in b) <= max_length for b in bins)
    for b, nxt in pairwise(bins):  # greedy: a bin closes only when the next example does not fit
        assert sum(lengths[i] for i in b) + lengths[nxt[0]] > max_length
    assert len(bins) < len(order)  # it did pack
    assert pack([], lengths, max_length) == []
    assert pack([0, 1, 2], [4, 4, 4], 4) == [[0], [1], [2]]
    assert pack([0, 1, 2], [1, 2, 1], 4) == [[0, 1, 2]]


def test_collate_packed_restarts_position_ids_per_example():
    a = Example([11, 12, 13], [IGNORE_INDEX, 12, 13])
    b = Example([21, 22], [IGNORE_INDEX, 22])
    c = Example([31, 32, 33, 34], [IGNORE_INDEX, IGNORE_INDEX, 33, 34])
    out = collate_packed([[a, b], [c]], pad_id=0, length=8)
    assert set(out) == {"input_ids", "labels", "position_ids", "num_tokens"}  # no attention_mask
    assert all(out[k].shape == (2, 8) and out[k].dtype == torch.long for k in ("input_ids", "labels", "position_ids"))
    assert out["input_ids"].tolist() == [[11, 12, 13, 21, 22, 0, 0, 0], [31, 32, 33, 34, 0, 0, 0, 0]]
    # the padding continues the last example's positions (its block; no example of its own)
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 6, 7]]
    I = IGNORE_INDEX
    assert out["labels"].tolist() == [[I, 12, 13, I, 22, I, I, I], [I, I, 33, 34, I, I, I, I]]
    assert out["num_tokens"].item() == 9
    # each example starts a new position run exactly where it starts, and its first label is ignored:
    # the last token of one example is never trained to predict the first of the next
    full = collate_packed([[a, b, b]], pad_id=0, length=7)
    assert full["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1]]
    assert full["labels"][0, [0, 3, 5]].tolist() == [I, I, I]


def packed_examples(tok) -> list[list[Example]]:
    """Two packed rows of real, varied examples: 3 (chat, alpaca, text) and 2 (csv, chat)."""
    chat = build(CHAT, tok).examples
    pc = build(PC_CSV, tok).examples
    alpaca = [tokenize_row(tok, ROW, 512)]
    text = [tokenize(tok, render({"text": "Packed rows must not see each other."}, "text", tok), 512)]
    return [[chat[3], alpaca[0], text[0]], [pc[2], chat[1]]]


@pytest.fixture(scope="module")
def loss_sum_fn():
    return getattr(qtrain.train, "causal_lm_loss_sum", None) or (
        lambda logits, labels: F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
    )


def hf_model(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def qtrain_model(path):
    """The training model: NF4 base + LoRA with a non-zero adapter."""
    torch.manual_seed(0)
    model = load_model(
        str(path), LoRASpec(rank=4, alpha=8), compute_dtype=torch.float32, device=torch.device("cpu")
    ).model
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_b.weight.normal_(0, 0.5)
    return model.eval()


@pytest.mark.parametrize(
    "arch, loader",
    [("llama", hf_model), ("mistral", hf_model), ("qwen2", hf_model), ("llama", qtrain_model)],
    ids=["llama", "mistral", "qwen2", "llama-nf4-lora"],
)
def test_packed_examples_do_not_see_each_other(tiny_checkpoint, tok, loss_sum_fn, arch, loader):
    model = loader(tiny_checkpoint(arch))
    rows = packed_examples(tok)
    length = max(sum(len(e.input_ids) for e in row) for row in rows) + 7  # both rows end in padding
    batch = collate_packed(rows, tok.pad_token_id, length)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        alone_loss = torch.zeros(())
        for b, row in enumerate(rows):
            start = 0
            for e in row:
                n = len(e.input_ids)
                alone = model(input_ids=torch.tensor([e.input_ids]), use_cache=False).logits
                torch.testing.assert_close(packed[b, start : start + n], alone[0], atol=1e-5, rtol=1e-5)
                alone_loss += loss_sum_fn(alone, torch.tensor([e.labels]))
                start += n
        # the summed loss of the packed batch is the sum over the examples run alone
        packed_loss = loss_sum_fn(packed, batch["labels"])
        torch.testing.assert_close(packed_loss, alone_loss, atol=1e-4, rtol=1e-5)
        n_targets = sum(sum(label != IGNORE_INDEX for label in e.labels[1:]) for row in rows for e in row)
        assert n_targets == (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        # and so is the training step's own forward (decoder, no cache, position_ids, no mask)
        if hasattr(qtrain.train, "loss_sum"):
            torch.testing.assert_close(qtrain.train.loss_sum(model, batch), alone_loss, atol=1e-4, rtol=1e-5)

        # the check can fail: an all-ones attention_mask switches off the boundary detection, and
        # the second example then attends to the first
        mask = torch.ones_like(batch["input_ids"])
        leaky = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=mask, use_cache=False
        ).logits
        n0, n1 = len(rows[0][0].input_ids), len(rows[0][1].input_ids)
        torch.testing.assert_close(
            leaky[0, :n0], packed[0, :n0], atol=1e-5, rtol=1e-5
        )  # causal: the first is unaffected
        assert (leaky[0, n0 : n0 + n1] - packed[0, n0 : n0 + n1]).abs().max() > 1e-3
        assert (loss_sum_fn(leaky, batch["labels"]) - alone_loss).abs() > 1e-3


# ---- Batches ---------------------------------------------------------------------------------


def numbered(n: int) -> list[Example]:
    """Examples whose first token is their index (+10), of varied lengths."""
    return [Example([i + 10] * (1 + i % 3), [i + 10] * (1 + i % 3)) for i in range(n)]


def varied(n: int, seed: int = 0, max_len: int = 40) -> list[Example]:
    """First token: index + 10; lengths 1..max_len at random."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = rng.randint(1, max_len)
        out.append(Example([i + 10] + [5] * (k - 1), [IGNORE_INDEX] + [5] * (k - 1)))
    return out


def ids_of(batch: dict) -> list[int]:
    return [row[0] - 10 for row in batch["input_ids"].tolist()]


def packed_ids_of(batch: dict) -> list[list[int]]:
    """Example ids of each packed row: the tokens where a position run starts (padding is id 0)."""
    starts = (batch["position_ids"] == 0) & (batch["input_ids"] != 0)
    return [[t - 10 for t in row[s].tolist()] for row, s in zip(batch["input_ids"], starts)]


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_batches_reproducible_per_seed():
    ex = numbered(20)
    first = [ids_of(b) for b in islice(batches(ex, 4, 0, seed=3), 15)]
    assert first == [ids_of(b) for b in islice(batches(ex, 4, 0, seed=3), 15)]
    assert first != [ids_of(b) for b in islice(batches(ex, 4, 0, seed=4), 15)]
    assert first[:5] != first[5:10]  # a new order each epoch


@pytest.mark.parametrize("mode", ["pad", "group", "pack"])
def test_batches_reproducible_per_seed_every_mode(mode):
    ex = varied(120)
    run = lambda seed: list(islice(Batches(ex, 4, 0, seed, mode, max_length=64), 40))
    a, b, c = run(1), run(1), run(2)
    assert all(same(x, y) for x, y in zip(a, b))
    assert not all(same(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("n, batch_size", [(20, 4), (12, 12), (9, 1)])
def test_batches_cover_every_example_once_per_epoch(n, batch_size):
    ex = numbered(n)
    per_epoch = n // batch_size
    got = [ids_of(b) for b in islice(batches(ex, batch_size, 0, seed=0), 3 * per_epoch)]
    assert all(len(b) == batch_size for b in got)
    for epoch in range(3):
        flat = [i for b in got[epoch * per_epoch : (epoch + 1) * per_epoch] for i in b]
        assert sorted(flat) == list(range(n)), epoch


def test_batches_drop_the_partial_last_batch():
    ex = numbered(10)
    got = [ids_of(b) for b in islice(batches(ex, 4, 0, seed=0), 4)]  # 2 full batches per epoch
    assert all(len(b) == 4 for b in got)
    for epoch in (got[:2], got[2:]):
        flat = [i for b in epoch for i in b]
        assert len(set(flat)) == 8  # distinct within an epoch; 2 rows sit out, different ones each epoch


@pytest.mark.parametrize(
    "mode, text",
    [
        ("pad", "250 batches of 16 rows per epoch (shuffled, each batch padded to its longest row)"),
        ("group", "250 batches of 16 rows per epoch (rows of similar length together, each batch padded to its longest row)"),
        ("pack", "250 batches of 16 sequences per epoch (rows packed back to back into sequences of data.max_length=512 tokens)"),
    ],
)
def test_describe_batches_says_what_a_batch_holds(mode, text):
    assert describe_batches(mode, 250, 16, max_length=512) == text


def test_describe_batches_counts_a_real_plan():
    stream = Batches(varied(120), 4, 0, seed=0, mode="pack", max_length=64)
    n = len(stream.plan())
    assert describe_batches("pack", n, 4, 64).startswith(f"{n} batches of 4 sequences per epoch")
    assert describe_batches("pad", 1, 4) == "1 batch of 4 rows per epoch (shuffled, each batch padded to its longest row)"
    with pytest.raises(ValueError, match="mode 'packed': use pad, group or pack"):
        describe_batches("packed", 3, 4)


def test_batches_are_padded_with_labels_masked():
    ex = numbered(6)
    batch = next(batches(ex, 6, pad_id=0, seed=0))
    lengths = batch["attention_mask"].sum(1)
    assert sorted(lengths.tolist()) == sorted(len(e.input_ids) for e in ex)
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert (batch["input_ids"][batch["attention_mask"] == 0] == 0).all()


def padding(batch: dict) -> int:
    return batch["input_ids"].numel() - int(batch["num_tokens"])


def test_group_by_length_pads_less_and_covers_at_most_once():
    ex = varied(203, seed=1)
    per_epoch = 203 // 4
    pad = Batches(ex, 4, 0, seed=0, mode="pad")
    group = Batches(ex, 4, 0, seed=0, mode="group")
    pad_batches = list(islice(pad, per_epoch))
    group_batches = list(islice(group, 2 * per_epoch))
    assert len(group.plan(0)) == per_epoch
    assert sum(map(padding, group_batches[:per_epoch])) * 5 < sum(map(padding, pad_batches))
    for epoch in (group_batches[:per_epoch], group_batches[per_epoch:]):
        flat = [i for b in epoch for i in ids_of(b)]
        assert len(flat) == len(set(flat)) == 4 * per_epoch  # at most once each; 3 sit out
        assert all(b["input_ids"].shape[0] == 4 for b in epoch)
    # the batches of an epoch come in a shuffled order, not longest first
    widths = [b["input_ids"].shape[1] for b in group_batches[:per_epoch]]
    assert widths != sorted(widths, reverse=True)


def test_pack_mode_batches():
    ex = varied(150, seed=2)
    max_length = 64
    stream = Batches(ex, 3, 0, seed=0, mode="pack", max_length=max_length)
    per_epoch = len(stream.plan(0))
    assert per_epoch > 1
    first_epoch = list(islice(stream, per_epoch))
    seen = []
    for batch in first_epoch:
        assert "attention_mask" not in batch
        assert all(batch[k].shape == (3, max_length) for k in ("input_ids", "labels", "position_ids"))
        for row in packed_ids_of(batch):
            assert sum(len(ex[i].input_ids) for i in row) <= max_length
            seen += row
        assert int(batch["num_tokens"]) == sum(len(ex[i].input_ids) for row in packed_ids_of(batch) for i in row)
        assert int(batch["num_tokens"]) == int((batch["input_ids"] != 0).sum())
    assert len(seen) == len(set(seen))  # each example at most once per epoch
    # what sits out is a partial batch: fewer than 3 sequences' worth of tokens
    left_out = set(range(150)) - set(seen)
    assert sum(len(ex[i].input_ids) for i in left_out) <= 2 * max_length


def test_pack_mode_survives_an_epoch_too_short_for_a_batch():
    # lengths 3, 3, 2, 2 in 5 tokens: 2 or 3 sequences depending on the order, so with 3 sequences
    # per batch some epochs have no batch at all; the stream goes on with the next epoch that has one
    ex = [Example([i + 10] + [5] * (n - 1), [IGNORE_INDEX] + [5] * (n - 1)) for i, n in enumerate((3, 3, 2, 2))]
    checked = 0
    for seed in range(30):
        try:
            stream = Batches(ex, 3, 0, seed, mode="pack", max_length=5)
        except ValueError:  # epoch 0 itself is short
            continue
        if all(len(stream.plan(e)) for e in range(1, 4)):
            continue
        got = list(islice(stream, 8))
        assert all(b["input_ids"].shape == (3, 5) for b in got)
        assert sorted(i for b in got[:1] for row in packed_ids_of(b) for i in row) == [0, 1, 2, 3]
        state = stream.state_dict()
        assert len(stream.plan(state["epoch"])) == 1 and state["index"] == 1  # it stands in an epoch with a batch
        fresh = Batches(ex, 3, 0, seed, mode="pack", max_length=5)
        fresh.load_state_dict(state)
        assert same(next(fresh), next(stream))
        checked += 1
    assert checked  # some seed does give short epochs


@pytest.mark.parametrize("mode", ["pad", "group", "pack"])
def test_batches_resume_exactly_from_state_dict(mode):
    ex = varied(50, seed=3)
    make = lambda: Batches(ex, 4, 0, seed=7, mode=mode, max_length=64)
    per_epoch = len(make().plan(0))
    for k in sorted({0, 3, per_epoch - 1, per_epoch, per_epoch + 2, 2 * per_epoch + 1}):
        original = make()
        for _ in range(k):
            next(original)
        state = json.loads(json.dumps(original.state_dict()))  # plain data: goes into a checkpoint
        fresh = make()
        fresh.load_state_dict(state)
        want = list(islice(original, per_epoch + 2))  # across the next epoch boundary
        got = list(islice(fresh, per_epoch + 2))
        assert all(same(w, g) for w, g in zip(want, got)), (mode, k)
        assert fresh.state_dict() == original.state_dict()


def test_batches_num_tokens_counts_real_tokens():
    ex = varied(16, seed=4)
    for batch in islice(Batches(ex, 4, 0, seed=0), 8):
        lengths = [len(ex[i].input_ids) for i in ids_of(batch)]
        assert int(batch["num_tokens"]) == sum(lengths) == int(batch["attention_mask"].sum())


def test_too_few_rows_names_the_batch_size():
    with pytest.raises(ValueError, match=r"too few rows for one batch of train\.batch_size=4"):
        Batches(numbered(3), 4, 0, seed=0)
    with pytest.raises(ValueError, match=r"train\.batch_size=4"):
        Batches(numbered(3), 4, 0, seed=0, mode="group")
    # 3 short examples pack into one sequence: not enough for 2 sequences per batch
    with pytest.raises(ValueError, match=r"too few packed sequences for one batch of train\.batch_size=2"):
        Batches(numbered(3), 2, 0, seed=0, mode="pack", max_length=64)
    with pytest.raises(ValueError, match="mode 'stream'"):
        Batches(numbered(8), 2, 0, seed=0, mode="stream")
    assert len(Batches(numbered(4), 4, 0, seed=0).plan(0)) == 1  # exactly one batch is enough


def test_skip_mode_detects_the_format_past_a_bad_first_row(tok):
    table = table_of([{"question": "?"}, {"instruction": "Say a", "output": "a"}, {"instruction": "Say b", "output": "b"}])
    ds = build(table, tok, bad_rows="skip")
    assert ds.format == "alpaca" and len(ds.examples) == 2
    assert len(ds.skipped) == 1 and ds.skipped[0].startswith("mem:1: ")
    with pytest.raises(ValueError, match=r"mem:1: cannot tell the data format"):
        build(table, tok)
