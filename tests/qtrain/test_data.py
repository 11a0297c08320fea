"""qtrain.data: synthetic tasks, alpaca jsonl files, response-only labels, padding, batches."""

from __future__ import annotations

import json
from collections import Counter
from itertools import islice
from pathlib import Path

import pytest
import torch

from qtrain.data import (
    IGNORE_INDEX,
    Example,
    alpaca_prompt,
    batches,
    collate,
    load_rows,
    read_jsonl,
    synthetic_rows,
    synthetic_split,
    tokenize_row,
    write_jsonl,
)
from qtrain.tiny import char_tokenizer

ASSET = Path(__file__).resolve().parents[1] / "assets" / "alpaca_tiny.jsonl"
TASKS = {
    "Which letter comes next in the alphabet?": "next_letter",
    "Is this number even or odd?": "parity",
    "Write the word in capital letters.": "uppercase",
    "What is the largest digit?": "max_digit",
}


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


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


# ---- jsonl files -----------------------------------------------------------------------------


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


GOOD = json.dumps({"instruction": "Say hi.", "output": "hi"})


def test_read_jsonl_roundtrip_and_blank_lines(tmp_path):
    rows = [{"instruction": "a", "input": "b", "output": "c"}, {"instruction": "d", "output": "é\n"}]
    write_jsonl(rows, tmp_path / "r.jsonl")
    assert read_jsonl(tmp_path / "r.jsonl") == rows
    write_lines(tmp_path / "blank.jsonl", ["", GOOD, "   ", GOOD, ""])
    assert len(read_jsonl(tmp_path / "blank.jsonl")) == 2


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
def test_read_jsonl_bad_row_names_file_and_line(tmp_path, bad, needle):
    # line 3 is the bad one (a blank line 2 still counts)
    path = write_lines(tmp_path / "d.jsonl", [GOOD, "", bad, GOOD])
    with pytest.raises(ValueError) as info:
        read_jsonl(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}:3: ") and needle in msg


def test_read_jsonl_empty_file(tmp_path):
    path = write_lines(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(ValueError, match="no rows") as info:
        read_jsonl(path)
    assert str(path) in str(info.value)


def test_read_jsonl_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_jsonl(tmp_path / "nope.jsonl")


# ---- the asset file --------------------------------------------------------------------------


def test_asset_file_is_valid_alpaca():
    rows = read_jsonl(ASSET)
    assert len(rows) == 40
    with_input = [r for r in rows if r.get("input")]
    assert 10 < len(with_input) < 40  # both kinds of row
    assert any("input" not in r for r in rows) and any(r.get("input") == "" for r in rows)
    assert "### Input:" in alpaca_prompt(with_input[0])
    assert all("### Input:" not in alpaca_prompt(r) for r in rows if not r.get("input"))


def test_load_rows_jsonl_holds_out_5_percent():
    rows = read_jsonl(ASSET)
    train, eval_rows = load_rows(str(ASSET), None, num_train=10, num_eval=100, seed=0)
    # num_train is for synthetic data only: every file row is used
    assert len(eval_rows) == 2 == len(rows) // 20  # 5% of 40, capped by num_eval
    assert len(train) == 38
    assert sorted(map(json.dumps, train + eval_rows)) == sorted(map(json.dumps, rows))  # a partition
    train, eval_rows = load_rows(str(ASSET), None, num_train=10, num_eval=1, seed=0)
    assert len(eval_rows) == 1 and len(train) == 39  # num_eval caps the 5%
    train, eval_rows = load_rows(str(ASSET), None, num_train=10, num_eval=0, seed=0)
    assert eval_rows == [] and train == rows


def test_load_rows_jsonl_eval_is_the_last_5_percent():
    rows = read_jsonl(ASSET)
    train, eval_rows = load_rows(str(ASSET), None, num_train=10, num_eval=100, seed=0)
    assert eval_rows == rows[-2:] and train == rows[:-2]


def test_load_rows_with_eval_file(tmp_path):
    eval_path = tmp_path / "eval.jsonl"
    write_jsonl([{"instruction": "q", "output": "a"}], eval_path)
    train, eval_rows = load_rows(str(ASSET), str(eval_path), num_train=10, num_eval=5, seed=0)
    assert train == read_jsonl(ASSET) and eval_rows == [{"instruction": "q", "output": "a"}]
    # synthetic train with an eval file
    train, eval_rows = load_rows("synthetic", str(eval_path), num_train=12, num_eval=5, seed=0)
    assert train == synthetic_rows(12, 0) and eval_rows == [{"instruction": "q", "output": "a"}]


def test_load_rows_synthetic():
    assert load_rows("synthetic", None, 30, 6, 5) == synthetic_split(30, 6, 5)


# ---- tokenization ----------------------------------------------------------------------------


def test_char_tokenizer_is_one_token_per_char(tok):
    text = "### Response:\nab"
    assert tok(text)["input_ids"] == [tok.convert_tokens_to_ids(c) for c in text]  # and no BOS added


ROW = {"instruction": "Name the capital of the country.", "input": "Japan", "output": "Tokyo"}
ROW_NO_INPUT = {"instruction": "How many legs does a spider have?", "output": "Eight."}


@pytest.mark.parametrize("row", [ROW, ROW_NO_INPUT], ids=["input", "no-input"])
def test_tokenize_row_labels_only_the_response(tok, row):
    prompt = alpaca_prompt(row)
    ex = tokenize_row(tok, row, max_length=512)
    n_prompt = len(prompt)  # one token per character
    assert ex.input_ids == [tok.convert_tokens_to_ids(c) for c in prompt + row["output"]] + [tok.eos_token_id]
    assert len(ex.labels) == len(ex.input_ids)
    assert ex.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt  # exactly the prompt is masked
    assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:]  # response and EOS are labelled
    assert ex.labels[-1] == tok.eos_token_id
    assert IGNORE_INDEX not in ex.labels[n_prompt:]
    assert tok.decode(ex.input_ids[n_prompt:], skip_special_tokens=True) == row["output"]


def test_tokenize_row_train_on_prompt(tok):
    ex = tokenize_row(tok, ROW, max_length=512, train_on_prompt=True)
    assert ex.labels == ex.input_ids and IGNORE_INDEX not in ex.labels


@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_tokenize_row_truncation(tok, train_on_prompt):
    full = tokenize_row(tok, ROW, max_length=512, train_on_prompt=train_on_prompt)
    n_prompt = len(alpaca_prompt(ROW))
    for max_length in (n_prompt + 2, n_prompt, 10):  # cuts into the response, at its start, into the prompt
        ex = tokenize_row(tok, ROW, max_length=max_length, train_on_prompt=train_on_prompt)
        assert len(ex.input_ids) == len(ex.labels) == max_length
        assert ex.input_ids == full.input_ids[:max_length] and ex.labels == full.labels[:max_length]
    assert tokenize_row(tok, ROW, max_length=n_prompt + 2).labels[-2:] == [tok.convert_tokens_to_ids(c) for c in "To"]


def test_tokenize_asset_rows(tok):
    # every asset row (with or without input, with non-ASCII characters) tokenizes with labels
    for row in read_jsonl(ASSET):
        ex = tokenize_row(tok, row, max_length=512)
        assert len(ex.input_ids) == len(ex.labels) == len(alpaca_prompt(row)) + len(row["output"]) + 1
        assert sum(label != IGNORE_INDEX for label in ex.labels) == len(row["output"]) + 1


# ---- collate and batches ---------------------------------------------------------------------


def test_collate_right_pads(tok):
    a = Example([5, 6, 7], [IGNORE_INDEX, 6, 7])
    b = Example([8], [8])
    c = Example([9, 10, 11, 12, 13], [IGNORE_INDEX] * 3 + [12, 13])
    out = collate([a, b, c], pad_id=0)
    assert set(out) == {"input_ids", "labels", "attention_mask"}
    assert all(t.dtype == torch.long and t.shape == (3, 5) for t in out.values())
    assert out["input_ids"].tolist() == [[5, 6, 7, 0, 0], [8, 0, 0, 0, 0], [9, 10, 11, 12, 13]]
    assert out["labels"].tolist() == [
        [IGNORE_INDEX, 6, 7, IGNORE_INDEX, IGNORE_INDEX],
        [8] + [IGNORE_INDEX] * 4,
        [IGNORE_INDEX] * 3 + [12, 13],
    ]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1] * 5]
    assert collate([b], pad_id=99)["input_ids"].tolist() == [[8]]


def numbered(n: int) -> list[Example]:
    """Examples whose first token is their index (+10), of varied lengths."""
    return [Example([i + 10] * (1 + i % 3), [i + 10] * (1 + i % 3)) for i in range(n)]


def ids_of(batch: dict) -> list[int]:
    return [row[0] - 10 for row in batch["input_ids"].tolist()]


def test_batches_reproducible_per_seed():
    ex = numbered(20)
    first = [ids_of(b) for b in islice(batches(ex, 4, 0, seed=3), 15)]
    assert first == [ids_of(b) for b in islice(batches(ex, 4, 0, seed=3), 15)]
    assert first != [ids_of(b) for b in islice(batches(ex, 4, 0, seed=4), 15)]
    assert first[:5] != first[5:10]  # a new order each epoch


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


def test_batches_are_padded_with_labels_masked():
    ex = numbered(6)
    batch = next(batches(ex, 6, pad_id=0, seed=0))
    lengths = batch["attention_mask"].sum(1)
    assert sorted(lengths.tolist()) == sorted(len(e.input_ids) for e in ex)
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert (batch["input_ids"][batch["attention_mask"] == 0] == 0).all()
