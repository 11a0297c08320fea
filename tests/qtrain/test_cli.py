"""qtrain.cli: `qtrain train` and `qtrain merge`, in process and through the installed console script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qtrain.cli import main

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
TINY = [  # the quickstart on a small model, 2 steps, no generation: ~1 s
    "model.tiny.hidden_size=64",
    "model.tiny.intermediate_size=192",
    "model.tiny.num_layers=2",
    "train.max_steps=2",
    "train.batch_size=4",
    "data.num_train=16",
    "eval.exact_match=false",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli_run") / "run"
    rc = main(["train", str(QUICKSTART), *TINY, f"output_dir={out}"])
    return rc, out


def test_train_returns_0_and_writes_adapter(trained):
    rc, out = trained
    assert rc == 0
    assert sorted(p.name for p in (out / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "qtrain.json"]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "loss" in m] == [1, 2]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["train"]["max_steps"] == 2 and cfg["model"]["tiny"]["hidden_size"] == 64  # overrides applied
    assert json.loads((out / "result.json").read_text())["steps"] == 2


def test_bad_override_returns_2_and_names_the_key(tmp_path, capsys):
    rc = main(["train", str(QUICKSTART), "train.max_step=5", f"output_dir={tmp_path / 'run'}"])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("qtrain train: error: train.max_step: unknown key")
    assert "did you mean train.max_steps?" in err
    assert not (tmp_path / "run").exists()  # failed before anything was built or loaded


@pytest.mark.parametrize(
    "override, key",
    [("train.schedule=step", "train.schedule"), ("lora.rank=0", "lora.rank"), ("train.lr=x", "train.lr")],
)
def test_bad_values_return_2(tmp_path, capsys, override, key):
    assert main(["train", str(QUICKSTART), override, f"output_dir={tmp_path}"]) == 2
    assert f"error: {key}:" in capsys.readouterr().err


def test_missing_config_file_returns_2(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    assert main(["train", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error shown without a CUDA GPU")
def test_cuda_without_gpu_is_a_clean_error(tmp_path, capsys):
    assert main(["train", str(QUICKSTART), *TINY, "device=cuda", f"output_dir={tmp_path}"]) == 2
    assert "device=cuda" in capsys.readouterr().err


def test_merge_writes_a_checkpoint(trained, tmp_path, capsys):
    _, out = trained
    merged = tmp_path / "merged"
    rc = main(
        [
            "merge",
            "--base",
            str(out / "base"),
            "--adapter",
            str(out / "adapter"),
            "--out",
            str(merged),
            "--dtype",
            "fp32",
        ]
    )
    assert rc == 0
    assert f"merged checkpoint written to {merged}" in capsys.readouterr().out
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(merged))
    assert json.loads((merged / "config.json").read_text())["torch_dtype"] == "float32"
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(merged)
    assert model.dtype == torch.float32 and model.config.hidden_size == 64


def test_merge_original_bf16(trained, tmp_path):
    _, out = trained
    merged = tmp_path / "merged"
    args = ["merge", "--base", str(out / "base"), "--adapter", str(out / "adapter"), "--out", str(merged)]
    assert main([*args, "--base-weights", "original"]) == 0
    assert json.loads((merged / "config.json").read_text())["torch_dtype"] == "bfloat16"  # the default


def test_merge_missing_adapter_returns_2(trained, tmp_path, capsys):
    _, out = trained
    rc = main(["merge", "--base", str(out / "base"), "--adapter", str(tmp_path / "none"), "--out", str(tmp_path / "m")])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("qtrain merge: error:") and str(tmp_path / "none") in err
    assert not (tmp_path / "m").exists()


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative path: bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_merge_into_the_run_folder_is_refused_and_deletes_nothing(trained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained[1], run)  # a copy: the module's run stays whole whatever merge does
    before = snapshot(run)
    args = ["merge", "--base", str(run / "base"), "--adapter", str(run / "adapter"), "--out", str(run)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"qtrain merge: error: {run}: ") and err.count("\n") == 1
    assert "--force" in err and "another" in err
    assert snapshot(run) == before and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_merge_force_keeps_every_file_merge_does_not_write(trained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained[1], run)
    before = snapshot(run)
    args = ["merge", "--base", str(run / "base"), "--adapter", str(run / "adapter"), "--out", str(run), "--force"]
    assert main(args) == 0
    after = snapshot(run)
    replaced = {"config.json"}  # the run's config.json: merge writes one
    assert {k: v for k, v in before.items() if k not in replaced} == {k: after[k] for k in before if k not in replaced}
    assert {"model.safetensors", "tokenizer.json", ".qtrain-merge"} <= set(after)
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(run).config.hidden_size == 64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_merge_out_that_is_a_file(trained, tmp_path, capsys):
    _, out = trained
    target = tmp_path / "merged"
    target.write_text("mine")
    args = ["merge", "--base", str(out / "base"), "--adapter", str(out / "adapter"), "--out", str(target)]
    assert main(args) == 2 and main([*args, "--force"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"qtrain merge: error: {target}: ") and "file" in err and err.count("\n") == 2
    assert target.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


@pytest.mark.parametrize("argv", [[], ["train"], ["merge", "--base", "x"], ["frobnicate"]])
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "usage: qtrain" in capsys.readouterr().err


def test_train_without_config_asks_for_one(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: qtrain train CONFIG")
    assert err.splitlines()[-1] == "qtrain train: error: give a config file, e.g. qtrain train configs/quickstart.yaml"


def help_text(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as info:
        main([*argv, "--help"])
    assert info.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse's line breaks undone


def test_merge_help_says_what_merges_and_what_base_weights_means(capsys):
    text = help_text(["merge"], capsys)
    assert "standalone 16-bit checkpoint" in text and "AutoModelForCausalLM.from_pretrained loads" in text
    assert "Only LoRA and DoRA adapters merge" in text and "qtrain generate --adapter DIR" in text
    assert "nf4 (default): merge into the base as training saw it" in text
    assert "original: merge into the checkpoint's own 16-bit weights" in text


def test_generate_help_names_every_method_not_only_lora(capsys):
    text = help_text(["generate"], capsys)
    assert "LoRA adapter" not in text
    assert "LoRA, DoRA and every other method" in text and "the other methods in their subfolders" in text
    main_help = help_text([], capsys)
    assert "a trained adapter (any method qtrain trains)" in main_help


def test_dtype_names_are_the_configs():
    from qtrain.cli import DTYPE_NAMES
    from qtrain.config import DTYPES

    assert DTYPE_NAMES == tuple(DTYPES)


HELP_AND_USAGE_ERRORS = [
    ["--help"],
    ["train", "--help"],
    ["memory", "estimate", "--help"],
    ["memory", "profile", "--help"],
    ["merge", "--help"],
    ["generate", "--help"],
    ["kernels", "tune", "--help"],
    ["kernels", "tune", "--shapes", "4096x4096"],
    [],
    ["frobnicate"],
    ["train"],
    ["merge", "--base", "x"],
]


def test_help_and_usage_errors_import_neither_torch_nor_transformers():
    """`qtrain --help` answers at once: the heavy modules load only inside the subcommands."""
    code = (
        "import json, sys\n"
        "from qtrain.cli import main\n"
        f"for argv in {HELP_AND_USAGE_ERRORS!r}:\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as e:\n"
        "        assert e.code in (0, 2), (argv, e.code)\n"
        "heavy = ('torch', 'transformers', 'qtrain.config', 'rich')\n"
        "print(json.dumps(sorted(m for m in heavy if m in sys.modules)))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1]) == []


def test_console_script(tmp_path):
    exe = shutil.which("qtrain")
    assert exe, "the `qtrain` console script is not on PATH; install with pip install -e ."
    proc = subprocess.run([exe, "--help"], check=False, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "train" in proc.stdout and "merge" in proc.stdout and "usage: qtrain" in proc.stdout
    # an error's exit status comes through the script too
    proc = subprocess.run(
        [exe, "train", "nope.yaml"], check=False, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "nope.yaml" in proc.stderr


@pytest.mark.parametrize("resume_first", [False, True], ids=["resume_last", "resume_before_overrides"])
def test_resume_flag_continues_the_run(tmp_path, resume_first):
    out = tmp_path / "run"
    assert main(["train", str(QUICKSTART), *TINY, f"output_dir={out}"]) == 0  # 2 steps, checkpoint at the end
    more = [*TINY, "train.max_steps=4", f"output_dir={out}"]
    argv = ["train", str(QUICKSTART), "--resume", *more] if resume_first else ["train", str(QUICKSTART), *more, "--resume"]
    assert main(argv) == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "loss" in m] == [1, 2, 3, 4]


def test_resume_without_checkpoint_returns_2(tmp_path, capsys):
    assert main(["train", str(QUICKSTART), *TINY, f"output_dir={tmp_path}", "--resume"]) == 2
    assert "checkpoint.resume=auto: no checkpoint in" in capsys.readouterr().err


# ---- qtrain kernels tune -------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer without a CUDA GPU")
def test_kernels_tune_without_cuda_exits_1_with_one_line(capsys):
    assert main(["kernels", "tune", "--shapes", "4096,4096"]) == 1
    out = capsys.readouterr()
    assert out.out == "" and out.err.count("\n") == 1
    assert out.err.startswith("qtrain kernels tune: needs a CUDA GPU")


@pytest.mark.parametrize("bad", ["4096x4096", "4096", "0,64", "a,b"])
def test_kernels_tune_bad_shapes_are_usage_errors(bad, capsys):
    with pytest.raises(SystemExit) as info:
        main(["kernels", "tune", "--shapes", bad])
    assert info.value.code == 2
    assert "expected N,K" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, expected",
    [
        ([], {(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336), (6144, 4096), (28672, 4096)}),
        (["--model", "qwen2.5-7b"], {(3584, 3584), (512, 3584), (18944, 3584), (3584, 18944), (4608, 3584), (37888, 3584)}),
        (["--shapes", "80,192", "33,64"], {(80, 192), (33, 64)}),
    ],
    ids=["llama-3.1-8b", "qwen2.5-7b", "shapes"],
)
def test_kernels_tune_measures_the_model_shapes_and_prints_a_table(monkeypatch, capsys, tmp_path, argv, expected):
    # no GPU here: CUDA is pretended and the measurement replaced; what is checked is the wiring
    from qtrain.kernels import nf4_dispatch

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    seen = {}

    def fake_tune(device, shapes, rank, rep_ms):
        seen.update(shapes=set(shapes), rank=rank, rep_ms=rep_ms)
        return {s: {"crossover": 256, "gemv_max_m": 16} for s in shapes}

    monkeypatch.setattr(nf4_dispatch, "tune", fake_tune)
    monkeypatch.setattr(nf4_dispatch, "cache_path", lambda device: tmp_path / "cache.json")
    assert main(["kernels", "tune", *argv, "--rank", "8", "--ms-budget", "25"]) == 0
    assert seen == {"shapes": expected, "rank": 8, "rep_ms": 25.0}
    out = capsys.readouterr().out
    assert out.startswith("Fake GPU: NF4+LoRA paths by rows M (rank 8, bf16)")
    assert "M<=16" in out and "17-255" in out and "M>=256" in out and str(tmp_path / "cache.json") in out
