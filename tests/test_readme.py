"""The README is true: every command it shows runs, and every output it shows is what the command prints.

- ```console blocks: each `$ command` is run as written (in a scratch folder holding the repo's
  configs) and its output compared with the lines under it. A `~` before a number or word marks it as
  depending on the machine (time, speed, memory, the course of training on this CPU's math library):
  any value matches there. A line `...` stands for any number of lines. Runs of spaces match any
  run of spaces (rich's tables size their columns to their contents).
- ```bash blocks: each `qtrain train|memory profile` command runs at tiny settings (a small model,
  a few steps; the command's own keys stay), the others as written; each must exit 0 and write only
  under its own output_dir (no command writes into another command's run).

Blocks run in README order in one scratch folder, so `qtrain generate --adapter runs/quickstart/adapter`
uses the adapter the quickstart block trained. The quickstart runs in full (its output is shown):
~2 minutes on 2 cores.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
TINY = [  # appended to `qtrain train` / `qtrain memory profile` of ```bash blocks: seconds, not minutes
    "model.tiny.hidden_size=32",
    "model.tiny.intermediate_size=64",
    "model.tiny.num_layers=1",
    "train.max_steps=3",
    "train.batch_size=2",
    "data.num_train=16",
    "data.num_eval=4",
    "eval.every=0",
    "eval.max_new_tokens=2",
]
ADALORA = ["adalora.tinit=1", "adalora.tfinal=1"]  # a budget schedule that fits 3 steps
# installs, viewers, GPU benchmarks and tuning
SKIP = ("pip ", "tensorboard ", "python benchmarks/", "bash ", "torchrun ", "accelerate ", "qtrain kernels ")


def blocks(kind: str) -> list[tuple[int, list[str]]]:
    """(line number, lines) of every fenced block of `kind` in the README."""
    out, lines = [], README.read_text().splitlines()
    start = None
    for i, line in enumerate(lines):
        if start is None and line.strip() == f"```{kind}":
            start = i
        elif start is not None and line.strip() == "```":
            out.append((start + 1, lines[start + 1 : i]))
            start = None
    return out


def console_steps() -> list[tuple[str, str, list[str]]]:
    """(where, command, expected output lines) of the ```console blocks."""
    steps = []
    for lineno, lines in blocks("console"):
        for i, line in enumerate(lines):
            if line.startswith("$ "):
                expected = []
                for rest in lines[i + 1 :]:
                    if rest.startswith("$ "):
                        break
                    expected.append(rest)
                steps.append((f"README.md:{lineno + i + 1}", line[2:], expected))
    return steps


def bash_commands() -> list[tuple[str, str]]:
    """(where, command) of every line of the ```bash blocks but comments (a trailing `  # ...` cut)."""
    cmds = []
    for lineno, lines in blocks("bash"):
        for i, line in enumerate(lines):
            text = "" if line.lstrip().startswith("#") else line.split("   # ")[0].strip()
            if text:
                cmds.append((f"README.md:{lineno + i + 1}", text))
    return cmds


def pattern(expected: str) -> re.Pattern:
    """A README output line as a regex: `~value` matches any token, runs of spaces any spaces."""
    parts = re.split(r"(~[^\s│|]*[^\s│|,;:)]|\s+|[━─]+)", expected.rstrip())
    regex = ""
    for part in parts:
        if part.startswith("~"):
            regex += r"[^\s│|]+?"
        elif part and part.isspace():
            regex += r"\s+"
        elif part and set(part) <= set("━─"):
            regex += "[━─]+"  # a table's rules are as wide as its columns
        else:
            regex += re.escape(part)
    return re.compile(regex)


def matches(expected: list[str], got: list[str]) -> str | None:
    """None when `got` is `expected` (with `...` elisions); else the first expected line not found."""
    expected = [e for e in expected if e.strip()]
    got = [g.rstrip() for g in got if g.strip()]
    j = 0
    skipping = False
    for e in expected:
        if e.strip() == "...":
            skipping = True
            continue
        pat = pattern(e)
        while j < len(got) and not pat.fullmatch(got[j]):
            if not skipping:
                return f"expected {e!r}, got {got[j]!r}"
            j += 1
        if j == len(got):
            return f"expected {e!r}, not printed"
        j += 1
        skipping = False
    if j < len(got) and not skipping:
        return f"printed more than shown: {got[j]!r}"
    return None


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """A folder to run README commands in, as a user's clone: configs/ and tests/assets/ beside runs/."""
    root = tmp_path_factory.mktemp("readme")
    shutil.copytree(REPO / "configs", root / "configs")
    shutil.copytree(REPO / "tests" / "assets", root / "tests" / "assets")
    return root


def run(command: str, cwd: Path) -> subprocess.CompletedProcess:
    """`command` in a shell in `cwd`; stdout and stderr as one stream, in the order printed (stdout)."""
    env = os.environ | {"COLUMNS": "200", "TERM": "dumb", "NO_COLOR": "1", "PYTHONUNBUFFERED": "1"}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")  # the `qtrain` script
    return subprocess.run(command, shell=True, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=1800, check=False)  # fmt: skip


QUICKSTART = "qtrain train configs/quickstart.yaml"


@pytest.fixture(scope="module")
def quickstart(scratch) -> subprocess.CompletedProcess:
    """The README's main job, run once in full: the later commands use its adapter."""
    proc = run(QUICKSTART, scratch)
    assert proc.returncode == 0, proc.stdout[-3000:]
    return proc


def test_readme_console_outputs_are_what_the_commands_print(scratch, quickstart):
    steps = console_steps()
    assert len(steps) >= 5 and steps[0][1] == QUICKSTART  # the quickstart, profile, an error, estimate, generate
    for where, command, expected in steps:
        proc = quickstart if command == QUICKSTART else run(command, scratch)
        printed = proc.stdout.splitlines()
        problem = matches(expected, printed)
        assert problem is None, f"{where}: `{command}`: {problem}\n--- printed:\n" + "\n".join(printed)


def test_readme_bash_commands_run_and_keep_to_their_own_output_dir(scratch, quickstart):
    """Every qtrain command of the README's ```bash blocks runs (training at tiny settings) and writes
    only into its own output_dir: no example overwrites another's run."""
    ran = 0
    for where, command in bash_commands():
        argv = shlex.split(command)
        if command.startswith(SKIP) or any(a.startswith("configs/") and a != "configs/quickstart.yaml" for a in argv):
            continue  # installs, viewers, GPU benchmarks; the 7-8B configs need a GPU and a download
        if "qtrain" not in argv:
            assert run(command, scratch).returncode == 0, f"{where}: `{command}` failed"
            continue
        ran += 1
        sub = argv[argv.index("qtrain") + 1 :][:2]
        if sub[0] == "train" or sub == ["memory", "profile"]:
            method = next((a.split("=", 1)[1] for a in argv if a.startswith("method=")), "")
            command = f"{command} {' '.join(TINY + (ADALORA if 'adalora' in method else []))}"
        before = {p: p.stat().st_mtime_ns for p in scratch.rglob("*") if p.is_file()}
        proc = run(command, scratch)
        assert proc.returncode == 0, f"{where}: `{command}` exited {proc.returncode}\n{proc.stdout[-3000:]}"
        written = {p for p in scratch.rglob("*") if p.is_file() and before.get(p) != p.stat().st_mtime_ns}
        outs = [a.split("=", 1)[1] for a in argv if a.startswith("output_dir=")] + [
            argv[i + 1] for i, a in enumerate(argv) if a in ("--out", "--output-dir")
        ]
        if sub[0] == "train" and not outs:
            outs = ["runs/quickstart"]  # the quickstart config's own output_dir
        if sub == ["memory", "profile"]:
            outs = outs or ["runs/quickstart/memory-profile"]
        allowed = [scratch / o for o in outs]
        stray = [p for p in written if not any(p.is_relative_to(a) for a in allowed)]
        if "qtrain generate" not in command:
            assert not stray, f"{where}: `{command}` wrote outside {outs}: {sorted(map(str, stray))[:5]}"
        else:
            assert not written, f"{where}: `{command}` wrote {sorted(map(str, written))[:5]}"
    assert ran >= 10


def test_the_output_check_itself_fails_on_a_difference():
    """The comparison above can fail: only `~` values, `...` lines and spacing are free."""
    shown = ["model x loaded in ~0.1s", "...", "eval step 600: loss ~1.1489, perplexity ~3.15", "┏━━┳━┓"]
    assert matches(shown, ["model x loaded in 2.5s", "step 1", "step 2", "eval step 600: loss 1.2, perplexity 3.3", "┏━━━━━┳━┓"]) is None
    assert matches(shown, ["model x loaded in 2.5s", "eval step 600: loss 1.2, perplexity 3.3"]).startswith("expected '┏")
    assert "expected 'model x" in matches(shown, ["model y loaded in 2.5s"])
    assert "printed more" in matches(["a"], ["a", "b"])
    assert matches(["step 20/600 (3%)"], ["step 20/600 (4%)"]) is not None  # unmarked numbers must be equal
