"""benchmarks/cpu.py and benchmarks/busy.py on tiny settings: both stacks train the same model on the
same batches (equal losses), every number of the table is filled in, the result files are written."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cpu():
    module = load("cpu")
    yield module
    sys.modules.pop("benchmark_cpu", None)


def test_settings_parse_and_bad_ones_are_named(cpu):
    assert cpu.parse_setting("4x256:bf16") == (4, 256, "bf16")
    for bad in ("4x256", "4*256:fp32", "4x256:fp16"):
        with pytest.raises(argparse.ArgumentTypeError, match="BATCHxSEQ:DTYPE"):
            cpu.parse_setting(bad)
    assert cpu.parse_args([]).settings == [(4, 256, "fp32"), (4, 256, "bf16"), (1, 2048, "fp32"), (1, 2048, "bf16"), (2, 128, "fp32"), (1, 64, "fp32")]


def test_side_by_side_run_writes_the_table(cpu, tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        assert cpu.main(["--model", "tiny", "--settings", "2x16:fp32", "1x24:bf16", "--rounds", "2", "--warmup", "1", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    (json_path,) = tmp_path.glob("cpu-*.json")
    result = json.loads(json_path.read_text())
    assert result["meta"]["threads"] == 1 and result["meta"]["dirty"] in (True, False) and "-dirty" not in json_path.name
    fp32, bf16 = result["rows"]
    for row in (fp32, bf16):
        for stack in ("baseline", "qtrain"):
            r = row[stack]
            assert len(r["all_step_seconds"]) == 2 and len(r["losses"]) == 3  # warmup + 2 rounds
            assert r["tokens_per_s"] > 0 and r["step_memory_bytes"] > 0
        assert row["speed_ratio"] == pytest.approx(row["qtrain"]["tokens_per_s"] / row["baseline"]["tokens_per_s"])
    # the same weights, LoRA init and batches: the two stacks compute the same training
    assert fp32["max_loss_diff"] < 1e-4 and bf16["max_loss_diff"] < 5e-2
    md = json_path.with_suffix(".md").read_text()
    assert "| 2x16:fp32 |" in md and "| 1x24:bf16 |" in md and "speed (qtrain / baseline)" in md
    assert "speed" in capsys.readouterr().out


def test_busy_runs_the_quickstart_idle_and_beside_a_busy_process(tmp_path):
    busy = load("busy")
    tiny = ["model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", "model.tiny.num_layers=1", "train.max_steps=2",
            "train.batch_size=2", "data.num_train=8", "data.num_eval=4", "eval.every=0", "eval.samples=[]"]  # fmt: skip
    assert busy.main(["--policies", "one-thread", "--overrides", *tiny, "--out", str(tmp_path)]) == 0
    (json_path,) = tmp_path.glob("busy-*.json")
    row = json.loads(json_path.read_text())["policies"]["one-thread"]
    assert row["idle"]["wall_seconds"] > 0 and row["busy"]["wall_seconds"] > 0 and row["busy"]["exact_match_after"] is not None
    assert "| one-thread |" in json_path.with_suffix(".md").read_text()
