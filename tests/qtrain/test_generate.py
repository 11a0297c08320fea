"""qtrain.generate and `qtrain generate`: a base + a trained adapter completing prompts."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qtrain.adapter import load_adapter_weights, read_adapter_config, save_adapter
from qtrain.cli import main
from qtrain.data import DEFAULT_CHAT_TEMPLATE, alpaca_prompt, render_chat
from qtrain.evaluate import generate
from qtrain.generate import format_prompt, load_for_inference, read_prompts_file
from qtrain.lora import LoRASpec, lora_modules
from qtrain.model import load_model
from qtrain.tiny import build_tiny_model, char_tokenizer

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
TINY_TRAIN = [  # the quickstart on a small model, 2 steps, no generation
    "model.tiny.hidden_size=64",
    "model.tiny.intermediate_size=192",
    "model.tiny.num_layers=2",
    "train.max_steps=2",
    "train.batch_size=4",
    "data.num_train=16",
    "eval.exact_match=false",
]
PROMPTS = ["What letter comes after c?", "Is 7 even or odd?", "hi"]
N = ["--max-new-tokens", "12"]


def make_adapter(base: Path, out: Path, data_format: str | None = "alpaca", scale: float = 0.5, **info) -> Path:
    """An NF4 + LoRA adapter on `base` whose lora_B weights are random (not the zero init)."""
    spec = LoRASpec(rank=4, alpha=8)
    loaded = load_model(str(base), spec, compute_dtype=torch.float32, quantize=True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in lora_modules(loaded.model).values():
            m.lora_b.weight.copy_(torch.randn(m.lora_b.weight.shape, generator=g) * scale)
    extra = ({"data_format": data_format} if data_format else {}) | info
    return save_adapter(loaded.model, spec, loaded.targets, str(base), out, torch.float32, True, extra_info=extra)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gen") / "base"
    return build_tiny_model(path, hidden_size=64, intermediate_size=192, num_layers=2, initializer_range=0.1)


@pytest.fixture(scope="module")
def adapter(base) -> Path:
    return make_adapter(base, base.parent / "adapter")


@pytest.fixture(scope="module")
def hand_loaded(base, adapter):
    """The model + tokenizer, loaded by hand the way training held them (NF4 from fp32)."""
    from transformers import AutoTokenizer

    loaded = load_model(str(base), read_adapter_config(adapter), compute_dtype=torch.float32, quantize=True)
    load_adapter_weights(loaded.model, adapter)
    return loaded.model, AutoTokenizer.from_pretrained(base)


def run_json(capsys, *argv) -> list[dict]:
    assert main(["generate", *argv, "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    return [json.loads(line) for line in lines]


# ---- format_prompt ----


def test_format_prompt_alpaca():
    text, specials = format_prompt("Say hi", "alpaca", char_tokenizer())
    assert (
        text == alpaca_prompt({"instruction": "Say hi", "input": ""}) == "### Instruction:\nSay hi\n\n### Response:\n"
    )
    assert specials is True
    text, _ = format_prompt("Add", "alpaca", char_tokenizer(), input="1 2")
    assert text == alpaca_prompt({"instruction": "Add", "input": "1 2"})


def test_format_prompt_chat_with_the_tokenizers_template():
    tok = char_tokenizer()  # has a chat template of its own
    text, specials = format_prompt("Say hi", "chat", tok)
    assert text == "<|user|>\nSay hi\n<|assistant|>\n"
    assert specials is False  # the template holds its special tokens
    trained = render_chat([{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}], tok)
    assert text == trained.prompt


def test_format_prompt_chat_without_a_template_uses_the_default():
    tok = char_tokenizer()
    tok.chat_template = None
    text, specials = format_prompt("Say hi", "chat", tok)
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE
    assert text.startswith("### User:\nSay hi\n") and text.endswith("### Assistant:\n") and specials is False
    # the prompt training saw for the same user turn
    trained = render_chat([{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}], tok)
    assert text == trained.prompt


@pytest.mark.parametrize("fmt", ["prompt_completion", "text", "none"])
def test_format_prompt_as_is(fmt):
    assert format_prompt("Once upon a", fmt, char_tokenizer()) == ("Once upon a", True)


def test_format_prompt_unknown():
    with pytest.raises(ValueError, match="sharegpt"):
        format_prompt("x", "sharegpt", char_tokenizer())


# ---- loading ----


def test_load_for_inference_follows_qtrain_json(adapter, base):
    model, tok, info = load_for_inference(adapter, device="cpu")
    assert info["base"] == str(base) and info["quantized"] is True and info["dtype"] == "float32"
    assert info["data_format"] == "alpaca" and not model.training and tok.pad_token_id is not None
    assert any(getattr(m, "_nf4_meta", None) for m in model.modules())  # NF4 base, as trained
    b = next(iter(lora_modules(model).values())).lora_b.weight
    assert b.abs().sum() > 0  # the adapter's weights, not the zero init
    _, _, info = load_for_inference(adapter, device="cpu", dtype="bf16")
    assert info["dtype"] == "bfloat16"


# ---- the command ----


def test_input_goes_with_the_prompt_before_it(adapter, hand_loaded, capsys):
    """`--prompt P --input I` renders the alpaca row (P, I), as training rendered its rows."""
    model, tok = hand_loaded
    rows = [("Which letter comes next in the alphabet?", "k"), ("hi", ""), ("Is this number even or odd?", "42")]
    expected = generate(model, tok, [alpaca_prompt({"instruction": p, "input": i}) for p, i in rows], 12)
    argv = ["--adapter", str(adapter), *N, "--prompt", rows[0][0], "--input", "k", "--prompt", "hi", "--prompt", rows[2][0], "--input", "42"]
    got = run_json(capsys, *argv)
    assert [g["completion"] for g in got] == expected
    assert got[0]["prompt"] == "Which letter comes next in the alphabet?\n\nk"


def test_a_tab_separates_the_input_on_stdin_and_in_plain_prompts_files(adapter, tmp_path):
    from qtrain.generate import Prompt

    assert Prompt.from_line("Is this number even or odd?\t42\n") == Prompt("Is this number even or odd?", "42")
    assert Prompt.from_line("no input\n") == Prompt("no input", "")
    (tmp_path / "p.txt").write_text("Which letter comes next in the alphabet?\tk\nhi\n")
    assert read_prompts_file(tmp_path / "p.txt") == [Prompt("Which letter comes next in the alphabet?", "k"), Prompt("hi", "")]
    proc = subprocess.run(
        [sys.executable, "-m", "qtrain.cli", "generate", "--adapter", str(adapter), *N, "--json"],
        input="Which letter comes next in the alphabet?\tk\n", cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["prompt"] == "Which letter comes next in the alphabet?\n\nk"


@pytest.mark.parametrize("argv", [["--input", "k"], ["--prompt", "a", "--input", "k", "--input", "j"]], ids=["no_prompt", "twice"])
def test_input_without_its_prompt_is_a_usage_error(adapter, argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(["generate", "--adapter", str(adapter), *argv])
    assert info.value.code == 2 and "--input TEXT belongs to the --prompt before it" in capsys.readouterr().err


def test_greedy_equals_evaluate_generate(adapter, hand_loaded, capsys):
    model, tok = hand_loaded
    expected = generate(model, tok, [alpaca_prompt({"instruction": p, "input": ""}) for p in PROMPTS], 12)
    argv = ["--adapter", str(adapter), *N, "--device", "cpu"]
    rows = run_json(capsys, *argv, *[a for p in PROMPTS for a in ("--prompt", p)])
    assert [r["prompt"] for r in rows] == PROMPTS
    assert [r["completion"] for r in rows] == expected
    assert any(expected)  # something was generated


def test_chat_template_equals_evaluate_generate(adapter, hand_loaded, capsys):
    model, tok = hand_loaded
    expected = generate(model, tok, [format_prompt(p, "chat", tok)[0] for p in PROMPTS], 12, add_special_tokens=False)
    rows = run_json(
        capsys, "--adapter", str(adapter), *N, "--template", "chat", *[a for p in PROMPTS for a in ("--prompt", p)]
    )
    assert [r["completion"] for r in rows] == expected


def test_template_auto_is_the_recorded_format(base, tmp_path, capsys):
    chat = make_adapter(base, tmp_path / "chat_adapter", data_format="chat")
    args = ["--adapter", str(chat), *N, "--prompt", "hi", "--prompt", "Is 7 even or odd?"]
    auto = run_json(capsys, *args)
    assert auto == run_json(capsys, *args, "--template", "chat")
    assert auto != run_json(capsys, *args, "--template", "alpaca")
    assert "template chat" in (main(["generate", *args]), capsys.readouterr().err)[1]


def test_template_defaults_to_alpaca_without_qtrain_json(base, adapter, tmp_path, capsys):
    bare = tmp_path / "peft_adapter"
    shutil.copytree(adapter, bare)
    (bare / "qtrain.json").unlink()  # an adapter trained elsewhere: NF4, alpaca assumed
    args = ["--prompt", "hi", *N, "--device", "cpu"]
    assert run_json(capsys, "--adapter", str(bare), *args) == run_json(capsys, "--adapter", str(adapter), *args)


def test_base_only_differs_from_the_adapter(adapter, capsys):
    args = ["--adapter", str(adapter), *N, *[a for p in PROMPTS for a in ("--prompt", p)]]
    with_adapter = [r["completion"] for r in run_json(capsys, *args)]
    base_only = [r["completion"] for r in run_json(capsys, *args, "--base-only")]
    assert with_adapter != base_only


def test_pretty_output_one_completion_per_prompt(adapter, capsys):
    assert main(["generate", "--adapter", str(adapter), *N, "--prompt", "a [b] c", "--prompt", "two"]) == 0
    out = capsys.readouterr().out
    assert out.count("▶ prompt") == 2 and out.count("◀ completion") == 2
    assert "a [b] c" in out  # printed as text, not rich markup


def test_prompts_file_lines_and_jsonl(adapter, tmp_path, capsys):
    txt = tmp_path / "prompts.txt"
    txt.write_text("first prompt\n\nsecond prompt\n")
    assert [r["prompt"] for r in run_json(capsys, "--adapter", str(adapter), *N, "--prompts-file", str(txt))] == [
        "first prompt",
        "second prompt",
    ]
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('{"prompt": "p one"}\n{"instruction": "Add", "input": "1 2"}\n')
    assert read_prompts_file(jsonl)[1].input == "1 2"
    rows = run_json(capsys, "--adapter", str(adapter), *N, "--prompts-file", str(jsonl), "--prompt", "cli")
    assert [r["prompt"] for r in rows] == ["cli", "p one", "Add\n\n1 2"]


def test_prompts_from_stdin(adapter, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("from stdin\n\nsecond\n"))
    assert [r["prompt"] for r in run_json(capsys, "--adapter", str(adapter), *N)] == ["from stdin", "second"]


def test_sampling_is_reproducible_with_a_seed(adapter, capsys):
    args = ["--adapter", str(adapter), *N, "--temperature", "1.5", *[a for p in PROMPTS for a in ("--prompt", p)]]
    first = run_json(capsys, *args, "--seed", "3")
    assert first == run_json(capsys, *args, "--seed", "3")
    assert first != run_json(capsys, *args, "--seed", "4")


def test_after_a_training_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(QUICKSTART), *TINY_TRAIN, f"output_dir={out}"]) == 0
    capsys.readouterr()
    assert (
        main(
            [
                "generate",
                "--adapter",
                str(out / "adapter"),
                *N,
                "--prompt",
                "What letter comes after c?",
                "--prompt",
                "hi",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.count("◀ completion") == 2


def test_a_run_with_a_relative_output_dir_generates_from_any_folder(tmp_path, monkeypatch, capsys):
    """The adapter records its local base by absolute path: `qtrain generate --adapter /abs/...` works
    from another working directory."""
    (tmp_path / "work").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    assert main(["train", str(QUICKSTART), *TINY_TRAIN, "output_dir=runs/quick"]) == 0
    adapter = tmp_path / "work" / "runs" / "quick" / "adapter"
    for name in ("adapter_config.json", "qtrain.json"):
        assert json.loads((adapter / name).read_text())["base_model_name_or_path"] == str(adapter.parent / "base")
    monkeypatch.chdir(tmp_path / "elsewhere")
    capsys.readouterr()
    assert main(["generate", "--adapter", str(adapter), "--prompt", "hi", *N, "--json"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1


def test_hub_ids_are_recorded_as_given(tmp_path, monkeypatch):
    from qtrain.adapter import base_model_reference

    monkeypatch.chdir(tmp_path)
    assert base_model_reference("meta-llama/Llama-3.1-8B") == "meta-llama/Llama-3.1-8B"
    (tmp_path / "org" / "model").mkdir(parents=True)  # a local folder of that shape: a directory, made absolute
    assert base_model_reference("org/model") == str(tmp_path / "org" / "model")


def with_recorded_base(adapter: Path, out: Path, base: str) -> Path:
    """A copy of `adapter` that names its base `base`, as adapters saved before absolute paths did."""
    shutil.copytree(adapter, out)
    for name in ("adapter_config.json", "qtrain.json"):
        cfg = json.loads((out / name).read_text())
        cfg["base_model_name_or_path"] = base
        (out / name).write_text(json.dumps(cfg))
    return out


def test_an_older_adapter_with_a_relative_base_loads_from_another_folder(base, adapter, tmp_path, monkeypatch, capsys):
    from qtrain.generate import resolve_base

    run = tmp_path / "runs" / "quick"
    shutil.copytree(base, run / "base")
    old = with_recorded_base(adapter, run / "adapter", "runs/quick/base")  # relative to tmp_path, where it trained
    in_checkpoint = with_recorded_base(adapter, run / "checkpoints" / "step-2" / "adapter", "runs/quick/base")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert resolve_base(old, None) == (run / "base", str(run / "base"))
    assert resolve_base(in_checkpoint, None) == (run / "base", str(run / "base"))
    assert main(["generate", "--adapter", str(old), "--prompt", "hi", *N, "--json"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1


def test_a_relative_base_found_nowhere_keeps_its_error(adapter, tmp_path, monkeypatch, capsys):
    lost = with_recorded_base(adapter, tmp_path / "runs" / "lost" / "adapter", "runs/lost/base")
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "--adapter", str(lost), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "base model 'runs/lost/base' (base_model_name_or_path in" in err and err.rstrip().endswith("pass --base PATH_OR_ID")


# ---- errors: exit status 2, naming the path ----


def test_missing_adapter_dir(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert main(["generate", "--adapter", str(missing), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qtrain generate: error:") and str(missing) in err


def test_adapter_without_base(adapter, tmp_path, capsys):
    orphan = tmp_path / "orphan"
    shutil.copytree(adapter, orphan)
    cfg = json.loads((orphan / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = None
    (orphan / "adapter_config.json").write_text(json.dumps(cfg))
    assert main(["generate", "--adapter", str(orphan), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert str(orphan / "adapter_config.json") in err and "--base" in err


def test_adapter_whose_base_is_gone(base, tmp_path, capsys):
    gone = tmp_path / "gone_base"
    shutil.copytree(base, gone)
    adapter = make_adapter(gone, tmp_path / "adapter")
    shutil.rmtree(gone)
    assert main(["generate", "--adapter", str(adapter), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert str(gone) in err and "adapter_config.json" in err and "--base" in err
    # --base points it at a copy
    assert main(["generate", "--adapter", str(adapter), "--base", str(base), "--prompt", "hi", *N]) == 0


def test_missing_base_given(adapter, tmp_path, capsys):
    assert main(["generate", "--adapter", str(adapter), "--base", str(tmp_path / "nobase"), "--prompt", "hi"]) == 2
    assert str(tmp_path / "nobase") in capsys.readouterr().err


def test_missing_tokenizer_is_named_before_the_weights_load(adapter, base, tmp_path, monkeypatch, capsys):
    import qtrain.model

    bare = tmp_path / "bare"
    shutil.copytree(base, bare)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bare / name).unlink()
    monkeypatch.setattr(qtrain.model, "load_model", lambda *a, **k: pytest.fail("weights loaded before the tokenizer"))
    assert main(["generate", "--adapter", str(adapter), "--base", str(bare), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"qtrain generate: error: {bare}: no tokenizer") and "tokenizer.json" in err
    assert err.count("\n") == 1


def test_adapter_with_nan_is_refused_by_name(adapter, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(adapter, bad)
    tensors = load_file(bad / "adapter_model.safetensors")
    key = min(tensors)
    tensors[key] = tensors[key].clone().fill_(float("inf"))
    save_file(tensors, bad / "adapter_model.safetensors")
    assert main(["generate", "--adapter", str(bad), "--prompt", "hi", *N]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"qtrain generate: error: {bad / 'adapter_model.safetensors'}: tensor {key} holds NaN/inf")
    assert err.count("\n") == 1


def test_no_prompts(adapter, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n  \n"))
    assert main(["generate", "--adapter", str(adapter)]) == 2
    assert "no prompts" in capsys.readouterr().err


@pytest.mark.parametrize(
    "content, why",
    [
        ('{"prompt": "ok"}\nnot json\n', "not valid JSON"),
        ('{"prompt": "ok"}\n{"text": "x"}\n', '"prompt" or "instruction"'),
    ],
)
def test_bad_prompts_file_line(adapter, tmp_path, capsys, content, why):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    assert main(["generate", "--adapter", str(adapter), "--prompts-file", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2" in err and why in err


def test_missing_prompts_file(adapter, tmp_path, capsys):
    assert main(["generate", "--adapter", str(adapter), "--prompts-file", str(tmp_path / "p.txt")]) == 2
    assert str(tmp_path / "p.txt") in capsys.readouterr().err


@pytest.mark.parametrize("flag", [["--max-new-tokens", "0"], ["--temperature", "-1"], ["--batch-size", "0"]])
def test_bad_options(adapter, capsys, flag):
    assert main(["generate", "--adapter", str(adapter), "--prompt", "hi", *flag]) == 2
    assert flag[0].lstrip("-").replace("-", "_") in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error shown without a CUDA GPU")
def test_cuda_without_gpu(adapter, capsys):
    assert main(["generate", "--adapter", str(adapter), "--prompt", "hi", "--device", "cuda"]) == 2
    assert "cuda" in capsys.readouterr().err


def test_console_script_reads_a_pipe(adapter, tmp_path):
    exe = shutil.which("qtrain")
    assert exe, "the `qtrain` console script is not on PATH; install with pip install -e ."
    proc = subprocess.run(
        [exe, "generate", "--adapter", str(adapter), *N, "--json"],
        input="hi\nthere\n",
        check=False,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(line)["prompt"] for line in proc.stdout.splitlines()] == ["hi", "there"]
