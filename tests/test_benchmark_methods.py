"""benchmarks/methods.py on CPU: every run of its table builds (config, count, estimate) on a tiny
model, one run measures a real step, and the result files are written."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from qtrain.tiny import tiny_config

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "methods.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmark_methods", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_every_run_counts_its_formula(bench, tmp_path):
    """Each row's trainable count (a meta model built as training builds it) equals the methods' formulas."""
    config = tiny_config("llama", hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2)
    fusion = [bench.write_pfeiffer(tmp_path / f"f{i}", config, i) for i in range(2)]
    for label, names, overrides in bench.RUNS:
        _, spec, methods = bench.run_config(names, [*overrides, "llama_adapter.adapter_layers=2"], fusion)
        n = bench.count_trainable(config, spec, methods)
        formulas = sum(m.expected_trainable(config) for m in methods)
        if spec.rank:
            assert n > formulas, label  # LoRA's own parameters on top
        else:
            assert n == formulas > 0, label


def test_measure_and_write(bench, tmp_path):
    config = tiny_config("llama", hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2)
    _, spec, methods = bench.run_config(["lora", "prompt_tuning"], ["prompt_tuning.num_virtual_tokens=4"], [])
    w = bench.workload(32, torch.device("cpu"), methods)
    peak, seconds = bench.measure_peak(config, spec, methods, w, torch.device("cpu"))
    from qtrain.estimate import estimate

    est = estimate(config, spec, w)
    assert abs(est.peak / peak - 1) < 0.25 and seconds > 0  # a sanity bound: tests/qtrain/test_estimate.py holds 10%
    row = {"method": "LoRA + prompt tuning", "trainable_params": 1, "measured_peak": peak, "frozen_weights": 1,
           "estimated_peak": est.peak, "estimate_over_measured": est.peak / peak, "estimated_peak_full": est.peak}  # fmt: skip
    meta = {"device": "cpu (CPU-accounted)", "commit": "abc", "dirty": True, "date": "2026-11-30T00:00:00+00:00", "torch": "x",
            "model": "tiny", "measured_model": "tiny", "seq": 32, "full_seq": 32, "dtype": "float32"}  # fmt: skip
    bench.write_results({"meta": meta, "rows": [row]}, tmp_path)
    md = (tmp_path / "methods-cpu-2026-11-30-abc.md").read_text()
    assert "| LoRA + prompt tuning |" in md and "above the frozen weights" in md
    assert "commit abc (with uncommitted changes), 2026-11-30" in md
    assert json.loads((tmp_path / "methods-cpu-2026-11-30-abc.json").read_text())["meta"]["dirty"] is True
    assert json.loads((tmp_path / "methods-cpu-2026-11-30-abc.json").read_text())["rows"][0]["measured_peak"] == peak
