"""Training data: read rows (synthetic, local files, Hub datasets), render them by format,
tokenize with response-only labels, and cut them into resumable micro-batches (padded,
length-grouped or packed).

Formats (detected from the columns, or set with `data.format`):

    alpaca             {"instruction", "input" (optional), "output"}
    chat               {"messages": [{"role", "content"}, ...]}  (or sharegpt {"conversations": [{"from", "value"}]})
                       rendered with the tokenizer's chat template (DEFAULT_CHAT_TEMPLATE when it has none)
    prompt_completion  {"prompt", "completion"}
    text               {"text"}                                   (every token is trained on)

A rendered row is a list of text segments, each marked trained-on or not. Labels are IGNORE_INDEX
on the untrained segments (the prompt, user turns) unless `train_on_prompt`.
"""

from __future__ import annotations

import csv
import json
import random
import string
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from jinja2 import TemplateError

from qtrain.rundir import atomic_write_text

IGNORE_INDEX = -100
FORMATS = ("alpaca", "chat", "prompt_completion", "text")
FORMAT_COLUMNS = {
    "alpaca": {"instruction", "input", "output"},
    "chat": {"messages", "conversations"},
    "prompt_completion": {"prompt", "completion"},
    "text": {"text"},
}
FILE_KINDS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}

# Used when a tokenizer has no chat template: role headers, and EOS closing each assistant turn
# so the model learns to stop. The blank line between turns is an expression: transformers renders
# templates with trim_blocks, which would eat a newline written right after a block tag.
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}### {{ m['role'] | capitalize }}:\n{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}### Assistant:\n{% endif %}"
)
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


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


# ---- reading rows: every row keeps a locator ("file:line" or "source row N") for its errors ----

BAD_ROWS_LISTED = 20  # malformed rows listed in the error (the count covers all of them)


class BadRow(str):
    """A malformed row: the string "locator: reason", with `where` and `reason` kept apart."""

    where: str
    reason: str

    def __new__(cls, where: str, reason: str) -> BadRow:
        row = super().__new__(cls, f"{where}: {reason}")
        row.where, row.reason = where, reason
        return row

    def __getnewargs__(self) -> tuple[str, str]:  # copy and pickle rebuild it from both parts
        return self.where, self.reason


@dataclass
class Table:
    rows: list[dict]
    where: list[str]  # one locator per row
    source: str
    skipped: list[BadRow] = field(default_factory=list)  # rows that could not be read (unparseable...)


def read_jsonl(path: str | Path, bad_rows: str = "error") -> Table:
    """Rows of a .jsonl file, parsed line by line so a broken line is named exactly."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: data file not found")
    table = Table([], [], str(path))
    with open(path, encoding="utf-8-sig") as f:  # -sig: a byte order mark is not part of line 1
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                table.skipped.append(BadRow(where, f"not valid JSON ({e.msg})"))
                continue
            if not isinstance(row, dict):
                table.skipped.append(BadRow(where, f"expected a JSON object, got {type(row).__name__}"))
                continue
            table.rows.append(row)
            table.where.append(where)
    return _checked(table, bad_rows)


def read_csv(path: str | Path, bad_rows: str = "error") -> Table:
    """Rows of a .csv file with a header line: every cell is text, an empty cell is missing (None).
    Read with the csv module, so a row's locator is the line it starts on (quoted cells may span lines)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: data file not found")
    table = Table([], [], str(path))
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        try:
            header = next(reader, [])
            start = reader.line_num + 1
            for cells in reader:
                where, start = f"{path}:{start}", reader.line_num + 1
                if not cells:  # a blank line
                    continue
                if len(cells) != len(header):
                    n = len(cells)
                    table.skipped.append(BadRow(where, f"{n} cell{'s' * (n != 1)}, the header has {len(header)}"))
                    continue
                table.rows.append({name: cell if cell else None for name, cell in zip(header, cells)})
                table.where.append(where)
        except csv.Error as e:
            raise ValueError(f"{path}:{reader.line_num}: could not be read as CSV: {e}") from None
    return _checked(table, bad_rows)


def read_table(source: str, split: str = "train", subset: str | None = None, bad_rows: str = "error") -> Table:
    """Rows of a local .jsonl/.json/.csv/.parquet file, a local dataset folder, or a Hub dataset id.
    Dataset scripts are never run (datasets >= 4 refuses them; the error says so)."""
    path = Path(source)
    if path.suffix == ".jsonl":
        return read_jsonl(path, bad_rows)
    if path.suffix == ".csv":
        return read_csv(path, bad_rows)
    if path.is_file() and path.suffix not in FILE_KINDS:
        raise ValueError(f"{path}: unsupported data file type {path.suffix!r}; use {', '.join(FILE_KINDS)}")
    import datasets  # heavy: imported when data files are used

    if path.suffix in FILE_KINDS:
        if not path.exists():
            raise FileNotFoundError(f"{path}: data file not found")
        load = {"path": FILE_KINDS[path.suffix], "data_files": str(path), "split": "train"}
        if path.suffix == ".json":
            load["encoding"] = "utf-8-sig"  # a byte order mark is not part of the first row
        label = str(path)
    else:
        load = {"path": source, "name": subset, "split": split}
        label = f"{source} ({split})"
    try:
        ds = datasets.load_dataset(**load)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"{label}: could not be read as a dataset: {e}") from None
    except Exception as e:  # noqa: BLE001 - datasets wraps parser errors (pyarrow, json...) in many types
        raise ValueError(f"{label}: could not be read as a dataset ({type(e).__name__}: {e})") from None
    rows = ds.to_list()
    return Table(rows, [f"{label} row {i + 1}" for i in range(len(rows))], label)


def write_jsonl(rows: list[dict], path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def _checked(table: Table, bad_rows: str) -> Table:
    """`table`, or (bad_rows=error) the error listing its unreadable rows."""
    if bad_rows != "skip" and table.skipped:
        raise bad_rows_error([(table.source, table.skipped)])
    return table


def _line(where: str) -> int:
    """The line or row number a locator ends with ("f.jsonl:7", "f.json row 7"), for file order."""
    digits = where[len(where.rstrip("0123456789")) :]
    return int(digits) if digits else 0


def bad_rows_error(files: list[tuple[str, list[BadRow]]]) -> ValueError:
    """One error for the malformed rows of each file, in file order: a first line that stands alone
    ("f.jsonl: 3 malformed rows (first at f.jsonl:2: ...); fix them or set data.bad_rows=skip"),
    then up to BAD_ROWS_LISTED rows per file."""
    lines = []
    for source, bad in files:
        if not bad:
            continue
        bad = sorted(bad, key=lambda b: _line(b.where))
        n = len(bad)
        lines.append(
            f"{source}: {n} malformed row{'s' * (n != 1)} (first at {bad[0]}); fix them or set data.bad_rows=skip"
        )
        lines += [f"  {b}" for b in bad[:BAD_ROWS_LISTED]]
        if n > BAD_ROWS_LISTED:
            lines.append(f"  ... and {n - BAD_ROWS_LISTED} more")
    return ValueError("\n".join(lines))


def write_skipped_rows(data: list[Dataset | None], path: str | Path) -> int:
    """Write the rows skipped with data.bad_rows=skip, one {"where", "reason"} per line, to `path`
    (atomically: a temp file renamed over it). Returns how many; writes nothing when there are none."""
    skipped = [bad for ds in data if ds is not None for bad in ds.skipped]
    if not skipped:
        return 0
    atomic_write_text(Path(path), "".join(json.dumps({"where": b.where, "reason": b.reason}) + "\n" for b in skipped))
    return len(skipped)


# ---- formats: a row → segments of text, each trained on or not ----


def _format_of(row: dict) -> str | None:
    keys = set(row)
    if "messages" in keys or "conversations" in keys:
        return "chat"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if "text" in keys:
        return "text"
    return None


def _no_format(row: dict) -> str:
    return (
        f"cannot tell the data format from the columns {sorted(row)}; expected messages (chat), "
        "instruction + output (alpaca), prompt + completion, or text; or set data.format"
    )


def detect_format(row: dict, where: str) -> str:
    fmt = _format_of(row)
    if fmt is None:
        raise ValueError(f"{where}: {_no_format(row)}")
    return fmt


def _detect(table: Table) -> str | None:
    """The format of the first row that has one (None: no row has one)."""
    return next((fmt for fmt in map(_format_of, table.rows) if fmt is not None), None)


@dataclass
class Rendered:
    segments: list[tuple[str, bool]]  # (text, trained on) in order
    prompt: str | None  # the text before the final answer (for generation), None for raw text
    answer: str | None  # the final answer (exact match)
    chat: bool = False  # the chat template wrote the special tokens (BOS...) itself


def alpaca_prompt(row: dict) -> str:
    text = f"### Instruction:\n{row['instruction']}\n\n"
    if row.get("input"):
        text += f"### Input:\n{row['input']}\n\n"
    return text + "### Response:\n"


def render(row: dict, fmt: str, tokenizer) -> Rendered:
    """Segments of one row; raises ValueError (without the locator) when the row is malformed."""
    if fmt == "alpaca":
        _need_strings(row, ("instruction", "output"), "alpaca rows need instruction and output")
        if row.get("input") is not None and not isinstance(row["input"], str):
            raise ValueError("'input' must be a string")
        prompt = alpaca_prompt(row)
        return Rendered([(prompt, False), (row["output"], True)], prompt, row["output"])
    if fmt == "prompt_completion":
        _need_strings(row, ("prompt", "completion"), "prompt_completion rows need prompt and completion")
        return Rendered([(row["prompt"], False), (row["completion"], True)], row["prompt"], row["completion"])
    if fmt == "text":
        _need_strings(row, ("text",), "text rows need a text column")
        return Rendered([(row["text"], True)], None, None)
    return render_chat(chat_messages(row), tokenizer)


def _need_strings(row: dict, keys: tuple[str, ...], why: str) -> None:
    for key in keys:
        if not isinstance(row.get(key), str):
            raise ValueError(f"missing or non-string {key!r} ({why})")


def chat_messages(row: dict) -> list[dict]:
    """`messages` ({role, content}) or sharegpt `conversations` ({from, value}) as role/content dicts."""
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty list of {role, content}")
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}] must be {{role: str, content: str}}, got {m!r}")
            out.append({"role": m["role"], "content": m["content"]})
        return out
    turns = row.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise ValueError("chat rows need a non-empty 'messages' (or 'conversations') list")
    out = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or t.get("from") not in SHAREGPT_ROLES or not isinstance(t.get("value"), str):
            raise ValueError(f"conversations[{i}] must be {{from: human|gpt|system, value: str}}, got {t!r}")
        out.append({"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]})
    return out


# Keyword arguments every chat template is rendered with. Training rows hold no reasoning, so a
# template with a thinking switch (Qwen3's enable_thinking) renders its non-thinking form: its empty
# think block is then part of the generation prompt, as it is of the context training saw.
CHAT_TEMPLATE_KWARGS = {"enable_thinking": False}
NOT_PREFIX = "the chat template does not render this conversation prefix by prefix"
NOT_LOCATED = f"{NOT_PREFIX}, nor each assistant turn's content as written"


def render_chat(messages: list[dict], tokenizer) -> Rendered:
    """Every assistant turn is trained on; the rest is context.

    Segments come from rendering growing prefixes of the conversation, so what is trained is what
    the template adds after each generation prompt. Some templates render a turn differently once
    later turns follow (Qwen3 writes an empty think block only in answers after the last user turn,
    Phi-3.5 closes the conversation with EOS, Mistral v0.3 moves the system prompt into the last
    user turn); for those the whole conversation is rendered once and each assistant turn located
    in it (`_located_segments`). Either way the prompt (for generation) is the last assistant
    turn's generation prompt and the answer its content."""
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("a chat row needs at least one assistant message")
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    prompt = _apply_template(tokenizer, messages[:last], add_generation_prompt=True)
    segments = _prefix_segments(messages, tokenizer)
    if segments is None:
        segments = _located_segments(messages, tokenizer)
    return Rendered([s for s in segments if s[0]], prompt, messages[last]["content"], chat=True)


def _prefix_segments(messages: list[dict], tokenizer) -> list[tuple[str, bool]] | None:
    """(text, trained) from growing prefixes: an assistant turn trains what the template adds after
    its generation prompt. None when a rendering does not start with the one before it."""
    segments, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _apply_template(tokenizer, messages[:i], add_generation_prompt=True)
        upto = _apply_template(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (before.startswith(done) and upto.startswith(before)):
            return None
        segments += [(before[len(done) :], False), (upto[len(before) :], True)]
        done = upto
    full = _apply_template(tokenizer, messages, add_generation_prompt=False)
    if len(full) > len(done) and full.startswith(done):
        segments.append((full[len(done) :], False))  # turns after the last assistant one
    return segments


def _placeholder(k: int) -> str:
    return f"\x00answer {k}\x00"  # text no template trims, splits or rewrites


def _located_segments(messages: list[dict], tokenizer) -> list[tuple[str, bool]]:
    """(text, trained) from one rendering of the whole conversation: each assistant turn trains its
    content (as the template writes it: as is, or trimmed) and its end-of-turn text, nothing else.

    Where each answer sits comes from rendering the conversation with a placeholder for each answer.
    Its end-of-turn text is what the template writes after it when the conversation stops there, cut
    to what it also writes when the conversation goes on (`<|im_end|>` and its newline, `<|end|>`,
    `</s>`). Whitespace between a turn's header and its content is trained when the generation
    prompt does not end with it (Mistral's space after `[/INST]`): the model has to write it."""
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    masked = list(messages)
    for k, i in enumerate(turns):
        masked[i] = {**messages[i], "content": _placeholder(k)}
    pieces = _split_on_placeholders(_apply_template(tokenizer, masked, add_generation_prompt=False), len(turns))
    full = _apply_template(tokenizer, messages, add_generation_prompt=False)
    segments, pos, context_from = [], 0, 0
    for k, i in enumerate(turns):
        pos = _expect(full, pos, pieces[k])
        content = _written_content(full, pos, messages[i]["content"], pieces[k + 1])
        alone = _apply_template(tokenizer, masked[: i + 1], add_generation_prompt=False)
        end = _end_of_turn(tokenizer, alone.split(_placeholder(k), 1)[1], pieces[k + 1])
        if not end:
            raise ValueError(f"{NOT_PREFIX}, and writes no end-of-turn text after an assistant turn")
        lead = _unprompted_whitespace(full[:pos], _apply_template(tokenizer, messages[:i], add_generation_prompt=True))
        stop = pos + len(content) + len(end)
        segments += [(full[context_from : pos - len(lead)], False), (full[pos - len(lead) : stop], True)]
        pos, context_from = pos + len(content), stop
    if _expect(full, pos, pieces[-1]) != len(full):
        raise ValueError(NOT_LOCATED)
    segments.append((full[context_from:], False))
    return segments


def _split_on_placeholders(text: str, n: int) -> list[str]:
    """The n + 1 texts around placeholders 0..n-1, which must each occur once, in order."""
    pieces, rest = [], text
    for k in range(n):
        if rest.count(_placeholder(k)) != 1:
            raise ValueError(NOT_LOCATED)
        head, rest = rest.split(_placeholder(k))
        pieces.append(head)
    return [*pieces, rest]


def _expect(full: str, pos: int, text: str) -> int:
    """The position after `text`, which must stand at `pos` in `full`."""
    if not full.startswith(text, pos):
        raise ValueError(NOT_LOCATED)
    return pos + len(text)


def _written_content(full: str, pos: int, content: str, after: str) -> str:
    """The content as the template wrote it at `pos` (as is or trimmed), followed by `after`."""
    for written in dict.fromkeys((content, content.strip())):
        if full.startswith(written, pos) and full.startswith(after, pos + len(written)):
            return written
    raise ValueError(NOT_LOCATED)


def _end_of_turn(tokenizer, last: str, going_on: str) -> str:
    """The longest text both `last` and `going_on` start with, in whole tokens of both: after an
    answer Phi-3.5 writes `<|end|>\\n<|endoftext|>` when the conversation stops, `<|end|>\\n<|user|>`
    when it goes on; the end of the turn is `<|end|>\\n`, not `<|end|>\\n<|`."""
    n = 0
    while n < min(len(last), len(going_on)) and last[n] == going_on[n]:
        n += 1

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    whole = ids(last), ids(going_on)
    while n:
        head = ids(last[:n])
        if all(t[: len(head)] == head for t in whole):
            break
        n -= 1
    return last[:n]


def _unprompted_whitespace(before: str, prompt: str) -> str:
    """The end of the whitespace that closes `before` which the generation prompt does not write."""
    space = before[len(before.rstrip()) :]
    n = max(n for n in range(len(space) + 1) if prompt.endswith(space[:n]))
    return space[n:]


def _apply_template(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    if not messages:
        return ""
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, **CHAT_TEMPLATE_KWARGS
        )
    except (TemplateError, TypeError, KeyError) as e:  # e.g. a template's "roles must alternate"
        why = f"the chat template rejected this conversation: {e}"
        if messages[0]["role"] == "system" and len(messages) > 1 and _renders(tokenizer, messages[1:]):
            why += " (the template has no system role: drop the system message or put it in the first user turn)"
        raise ValueError(why) from None


def _renders(tokenizer, messages: list[dict]) -> bool:
    """Whether the chat template accepts `messages`."""
    try:
        tokenizer.apply_chat_template(messages, tokenize=False, **CHAT_TEMPLATE_KWARGS)
    except (TemplateError, TypeError, KeyError):
        return False
    return True


def ensure_chat_template(tokenizer) -> None:
    if getattr(tokenizer, "chat_template", None) is None:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE


# ---- tokenization ----


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


def tokenize(tokenizer, rendered: Rendered, max_length: int, train_on_prompt: bool = False) -> Example:
    """Segments → ids; labels copy the ids of trained segments, IGNORE_INDEX elsewhere.

    Non-chat rows get the tokenizer's own specials (e.g. BOS) on the first segment and EOS at the
    end; chat templates write theirs as text. The first label is always IGNORE_INDEX (no token
    predicts it), which keeps packed rows from learning across row boundaries.
    """
    input_ids, labels = [], []
    for i, (text, trained) in enumerate(rendered.segments):
        ids = tokenizer(text, add_special_tokens=(i == 0 and not rendered.chat))["input_ids"]
        input_ids += ids
        labels += ids if (trained or train_on_prompt) else [IGNORE_INDEX] * len(ids)
    if not rendered.chat and tokenizer.eos_token_id is not None:
        input_ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    if labels:
        labels[0] = IGNORE_INDEX
    return Example(input_ids[:max_length], labels[:max_length])


def tokenize_row(tokenizer, row: dict, max_length: int, train_on_prompt: bool = False) -> Example:
    """An alpaca row → Example (prompt + response + EOS)."""
    return tokenize(tokenizer, render(row, "alpaca", tokenizer), max_length, train_on_prompt)


# ---- the data of a run ----


@dataclass
class Dataset:
    examples: list[Example]
    rendered: list[Rendered]
    format: str
    source: str
    skipped: list[BadRow] = field(default_factory=list)  # malformed rows dropped (data.bad_rows=skip)
    too_long: int = 0  # rows dropped because the prompt alone fills data.max_length


def build_dataset(table: Table, fmt: str, tokenizer, max_length: int, train_on_prompt: bool, bad_rows: str) -> Dataset:
    """Render and tokenize every row of `table`. Malformed rows (the table's unreadable ones too)
    are skipped and listed in `.skipped`, or (bad_rows=error) raise one error listing them all."""
    ds = _build(table, fmt, tokenizer, max_length, train_on_prompt)
    if bad_rows != "skip" and ds.skipped:
        raise bad_rows_error([(table.source, ds.skipped)])
    _check_kept(ds, table, max_length)
    return ds


def _build(table: Table, fmt: str, tokenizer, max_length: int, train_on_prompt: bool) -> Dataset:
    """Every row of `table` rendered and tokenized, or its reason in `.skipped` (in file order)."""
    row_fmt = _detect(table) if fmt == "auto" else fmt
    if row_fmt == "chat":
        ensure_chat_template(tokenizer)
    ds = Dataset([], [], row_fmt or fmt, table.source, list(table.skipped))
    for row, where in zip(table.rows, table.where):
        try:
            if fmt == "auto" and not set(row) & FORMAT_COLUMNS.get(row_fmt, set()):  # not even a broken row_fmt one
                raise ValueError(_no_format(row))
            rendered = render(row, row_fmt, tokenizer)
            example = tokenize(tokenizer, rendered, max_length, train_on_prompt)
        except ValueError as e:
            ds.skipped.append(BadRow(where, str(e)))
            continue
        if all(label == IGNORE_INDEX for label in example.labels):  # nothing left to learn after truncation
            ds.too_long += 1
            continue
        ds.examples.append(example)
        ds.rendered.append(rendered)
    ds.skipped.sort(key=lambda bad: _line(bad.where))
    return ds


def _check_kept(ds: Dataset, table: Table, max_length: int) -> None:
    """A dataset of no examples is an error that says why."""
    if ds.examples:
        return
    if not table.rows:
        why = f"; every row was malformed, first: {table.skipped[0]}" if table.skipped else ""
        raise ValueError(f"{table.source}: no rows{why}")
    why = f"first: {ds.skipped[0]}" if ds.skipped else f"the prompts fill data.max_length={max_length}"
    raise ValueError(f"{table.source}: every row was dropped; {why}")


def load_data(cfg, tokenizer) -> tuple[Dataset, Dataset | None]:
    """Train and eval data of a run (`cfg`: a DataConfig). Eval: data.eval, or a seeded
    `eval_fraction` of the train rows, or held-out synthetic rows. With data.bad_rows=error, one
    error lists the malformed rows of the train and eval files."""
    synthetic = None
    if cfg.train == "synthetic":
        train_rows, eval_rows = synthetic_split(cfg.num_train, cfg.num_eval, cfg.seed)
        synthetic = (
            Table(train_rows, [f"synthetic row {i + 1}" for i in range(len(train_rows))], "synthetic"),
            Table(eval_rows, [f"synthetic eval row {i + 1}" for i in range(len(eval_rows))], "synthetic eval"),
        )
    train, held_out = read_tables(cfg, synthetic)
    args = (tokenizer, cfg.max_length, cfg.train_on_prompt)
    train_ds = _build(train, cfg.format, *args)
    has_eval = held_out is not None and (held_out.rows or held_out.skipped)
    eval_ds = _build(held_out, train_ds.format, *args) if has_eval else None
    check_datasets(cfg, train, held_out, train_ds, eval_ds)
    return train_ds, eval_ds


def read_tables(cfg, synthetic: tuple[Table, Table] | None = None) -> tuple[Table, Table | None]:
    """The train and held-out rows (`cfg`: a DataConfig): data.train split by eval_fraction, or the
    `synthetic` (train, eval) tables; data.eval, when set, is the held-out set. Unreadable rows are
    kept in .skipped and reported by `check_datasets`, with the files' other bad rows."""
    if synthetic is not None:
        train, held_out = synthetic
    else:
        train = read_table(cfg.train, cfg.train_split, cfg.subset, bad_rows="skip")
        # eval_fraction only when there is no data.eval: with one, every train row is trained on
        train, held_out = split_table(train, 0.0 if cfg.eval else cfg.eval_fraction, cfg.seed)
    if cfg.eval:
        held_out = read_table(cfg.eval, cfg.eval_split, cfg.subset, bad_rows="skip")
    return train, held_out


def check_datasets(cfg, train: Table, held_out: Table | None, train_ds: Dataset, eval_ds: Dataset | None) -> None:
    """With data.bad_rows=error, one error listing the malformed rows of the train and eval files;
    an error when every row of a file was dropped."""
    if cfg.bad_rows != "skip":
        _raise_bad_rows(train_ds, eval_ds, eval_file=bool(cfg.eval))
    _check_kept(train_ds, train, cfg.max_length)
    if eval_ds is not None:
        _check_kept(eval_ds, held_out, cfg.max_length)


def _raise_bad_rows(train: Dataset, held_out: Dataset | None, eval_file: bool) -> None:
    """One error for the malformed rows of the train file (held-out rows included) and the eval file."""
    if held_out is None:
        files = [(train.source, train.skipped)]
    elif eval_file:
        files = [(train.source, train.skipped), (held_out.source, held_out.skipped)]
    else:
        files = [(train.source, train.skipped + held_out.skipped)]
    if any(bad for _, bad in files):
        raise bad_rows_error(files)


def split_table(table: Table, fraction: float, seed: int) -> tuple[Table, Table | None]:
    """Hold out round(fraction * n) rows chosen by a seeded shuffle; both keep file order."""
    n_eval = round(fraction * len(table.rows)) if len(table.rows) > 1 else 0
    if n_eval == 0:
        return table, None
    order = list(range(len(table.rows)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])

    def pick(keep: bool, source: str) -> Table:
        idx = [i for i in range(len(table.rows)) if (i in held) == keep]
        return Table([table.rows[i] for i in idx], [table.where[i] for i in idx], source)

    train = pick(False, table.source)
    train.skipped = table.skipped
    return train, pick(True, f"{table.source} (held out)")


# ---- batches ----


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids, labels, attention_mask [B, S]; num_tokens []."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask, "num_tokens": mask.sum()}


def collate_packed(rows: list[list[Example]], pad_id: int, length: int) -> dict[str, torch.Tensor]:
    """Each row: several examples back to back, padded to `length`. position_ids restart at 0 for
    every example, which is how the model tells the examples apart: with no attention_mask,
    transformers builds a block-diagonal causal mask from the resets. The padding continues the last
    example's positions: it joins that example's block, where it is never a label and, coming last,
    is seen by no real token; it is not an example of its own (the prompt methods, which insert
    virtual tokens before every example, skip it).
    input_ids, labels, position_ids [B, length]; num_tokens []."""
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), length), dtype=torch.long)
    n_tokens = 0
    for i, row in enumerate(rows):
        start, n = 0, 0
        for e in row:
            n = len(e.input_ids)
            input_ids[i, start : start + n] = torch.tensor(e.input_ids)
            labels[i, start : start + n] = torch.tensor(e.labels)
            position_ids[i, start : start + n] = torch.arange(n)
            start += n
        position_ids[i, start:] = torch.arange(n, n + length - start)  # padding: the last example's block
        n_tokens += start
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "num_tokens": torch.tensor(n_tokens)}


def pack(order: list[int], lengths: list[int], max_length: int) -> list[list[int]]:
    """Greedy, in order: example ids → bins whose lengths sum to at most max_length."""
    bins, current, used = [], [], 0
    for i in order:
        if current and used + lengths[i] > max_length:
            bins.append(current)
            current, used = [], 0
        current.append(i)
        used += lengths[i]
    if current:
        bins.append(current)
    return bins


def group_by_length(order: list[int], lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Batches of similar length: sort windows of 50 batches by length, cut, shuffle the batches."""
    window = 50 * batch_size
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: -lengths[i])
        batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    batches = [b for b in batches if len(b) == batch_size]
    rng.shuffle(batches)
    return batches


class Batches:
    """An endless, resumable stream of micro-batches. Epoch e's plan comes from (seed, e) alone, so
    the position (epoch, index) is the whole state: `state_dict` / `load_state_dict` resume exactly.

    mode: "pad" (shuffled, padded to the longest row), "group" (similar lengths together) or
    "pack" (rows concatenated into max_length sequences). A partial last batch is dropped.

    Distributed (`world` ranks): the plan is of global batches of `batch_size * world` sequences,
    planned as one process would plan them, and rank r collates its slice r of each: every row is
    seen once per epoch across the ranks, length grouping and packing work on the global batch, and
    the (epoch, index) position is the same on every rank.
    """

    def __init__(
        self, examples: list[Example], batch_size: int, pad_id: int, seed: int, mode: str = "pad", max_length: int = 0, rank: int = 0, world: int = 1
    ):
        if mode not in ("pad", "group", "pack"):
            raise ValueError(f"mode {mode!r}: use pad, group or pack")
        self.rank_batch, self.rank, self.world = batch_size, rank, world
        batch_size *= world  # the global batch
        self.examples, self.batch_size, self.pad_id, self.seed, self.mode = examples, batch_size, pad_id, seed, mode
        self.max_length = max_length
        self.lengths = [len(e.input_ids) for e in examples]
        self.epoch, self.index = 0, 0
        self._plan_epoch, self._plan = -1, []
        if not self.plan():
            what = "packed sequences" if mode == "pack" else "rows"
            raise ValueError(f"data.train: too few {what} for one batch of train.batch_size={batch_size}")

    def plan(self, epoch: int | None = None) -> list[list[list[int]]]:
        """Batches of `epoch`: each a list of sequences, each a list of example ids."""
        epoch = self.epoch if epoch is None else epoch
        if epoch != self._plan_epoch:
            rng = random.Random(self.seed + epoch)
            order = list(range(len(self.examples)))
            rng.shuffle(order)
            if self.mode == "pack":
                seqs = pack(order, self.lengths, self.max_length)
            elif self.mode == "group":
                seqs = [[i] for batch in group_by_length(order, self.lengths, self.batch_size, rng) for i in batch]
            else:
                seqs = [[i] for i in order]
            b = self.batch_size
            self._plan = [seqs[j : j + b] for j in range(0, len(seqs) - b + 1, b)]
            self._plan_epoch = epoch
        return self._plan

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        while self.index >= len(self.plan()):  # (packed, an epoch can fall short of one batch: skip it)
            self.epoch, self.index = self.epoch + 1, 0
        seqs = self.plan()[self.index][self.rank * self.rank_batch : (self.rank + 1) * self.rank_batch]  # this rank's slice
        self.index += 1
        if self.mode == "pack":
            return collate_packed([[self.examples[i] for i in s] for s in seqs], self.pad_id, self.max_length)
        return collate([self.examples[s[0]] for s in seqs], self.pad_id)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


def describe_batches(mode: str, n_batches: int, batch_size: int, max_length: int = 0) -> str:
    """What an epoch of `Batches` is, for the console: "250 batches of 16 rows per epoch (each padded
    to its longest row)". `max_length`: data.max_length, named for packed batches."""
    what = {
        "pad": ("rows", "shuffled, each batch padded to its longest row"),
        "group": ("rows", "rows of similar length together, each batch padded to its longest row"),
        "pack": ("sequences", f"rows packed back to back into sequences of data.max_length={max_length} tokens"),
    }
    if mode not in what:
        raise ValueError(f"mode {mode!r}: use pad, group or pack")
    unit, how = what[mode]
    return f"{n_batches} batch{'' if n_batches == 1 else 'es'} of {batch_size} {unit} per epoch ({how})"


def batches(examples: list[Example], batch_size: int, pad_id: int, seed: int) -> Batches:
    """Endless shuffled, padded batches (a new permutation per epoch from seed + epoch)."""
    return Batches(examples, batch_size, pad_id, seed)


def eval_batches(examples: list[Example], batch_size: int, pad_id: int) -> Iterator[dict[str, torch.Tensor]]:
    """The eval examples in order, padded, once."""
    for start in range(0, len(examples), batch_size):
        yield collate(examples[start : start + batch_size], pad_id)


PROMPT_FORMATS = (*FORMATS, "none")  # what format_prompt renders


def format_prompt(prompt: str, data_format: str, tokenizer, input: str = "") -> tuple[str, bool]:
    """(text to complete, add_special_tokens) for a user prompt, rendered as in training.

    alpaca: the alpaca instruction block (`input` as its input); chat: the tokenizer's chat template
    (a default one when it has none) for one user turn plus the assistant header, which already
    holds its special tokens; prompt_completion, text, none: the prompt as is."""
    if data_format == "alpaca":
        return alpaca_prompt({"instruction": prompt, "input": input}), True
    if input:
        prompt = f"{prompt}\n\n{input}"
    if data_format == "chat":
        ensure_chat_template(tokenizer)
        messages = [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **CHAT_TEMPLATE_KWARGS
        )
        return text, False
    if data_format in ("prompt_completion", "text", "none"):
        return prompt, True
    raise ValueError(f"prompt format {data_format!r}; choose one of {', '.join(PROMPT_FORMATS)}")
