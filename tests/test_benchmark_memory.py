"""benchmarks/memory.py on CPU: its code path end to end on a tiny model (the GPU numbers are None
there), the max-length search, the result files, and a clean exit without CUDA."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from qtrain.tiny import tiny_config

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "memory.py"


@pytest.fixture(scope="module")
def bench_mod():
    spec = importlib.util.spec_from_file_location("benchmark_memory", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def tiny_bench(bench_mod):
    config = tiny_config("llama", hidden_size=32, intermediate_size=64, num_layers=1)
    return bench_mod.build_bench("tiny-llama", config, "cpu", dtype=torch.float32, optimizer_name="adamw")


def test_main_without_cuda_exits_0(bench_mod, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench_mod.main(["--quick", "--out", str(tmp_path)]) == 0
    assert "needs a CUDA GPU" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())


def test_args(bench_mod):
    args = bench_mod.parse_args([])
    assert args.models == ["llama-2-7b", "llama-3.1-8b"] and args.steps == 3 and args.seq == 2048 and args.cap_gib == 24
    assert args.settings == bench_mod.SETTINGS
    quick = bench_mod.parse_args(["--quick"])
    assert quick.models == ["llama-3.1-8b"] and quick.steps == 2
    with pytest.raises(SystemExit):
        bench_mod.parse_args(["--models", "gpt-17"])


def test_loss_path_matches_train_step(bench_mod):
    import inspect

    from qtrain.train import train_step

    chunk, kwargs = bench_mod.loss_path()
    if "loss_chunk" in inspect.signature(train_step).parameters:
        assert kwargs == {"loss_chunk": bench_mod.LOSS_CHUNK} and chunk == bench_mod.LOSS_CHUNK
    else:
        assert (chunk, kwargs) == (0, {})


@pytest.mark.parametrize("setting", ["seq", "seq+offload"])
def test_run_setting_on_cpu(bench_mod, tiny_bench, setting):
    b = tiny_bench
    assert b.backend == "torch" and b.device.type == "cpu"
    assert all(".lora_" in n for n, p in b.model.named_parameters() if p.requires_grad)
    row = bench_mod.run_setting(b, setting, 64, 2, offload=setting.endswith("+offload"))
    assert row["error"] is None, row["error"]
    assert row["model"] == "tiny-llama" and row["seq"] == 64 and row["measured_steps"] == 1
    assert len(row["losses"]) == 2 and all(torch.isfinite(torch.tensor(row["losses"])))
    assert row["tokens_per_s"] > 0 and row["estimate_peak"] > 0 and row["estimate_device_total"] > row["estimate_peak"]
    # CUDA-only numbers are None on CPU, and so is everything derived from them
    for key in ("peak_allocated", "peak_reserved", "outside_allocator", "device_used", "ratio_peak", "ratio_device",
                "fits_cap", "fits_8gb"):  # fmt: skip
        assert row[key] is None, key
    assert bench_mod.format_row(row).startswith("| tiny-llama | " + setting + " | 64 | - |")
    assert all(p.grad is None for p in b.trainable)  # freed after the run
    json.dumps(row)


def test_out_of_memory_is_recorded_not_raised(bench_mod, tiny_bench, monkeypatch):
    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore text")

    monkeypatch.setattr(bench_mod, "measure", oom)
    row = bench_mod.run_setting(tiny_bench, "seq", 64, 2, offload=False)
    assert row["error"] == "out of memory: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert "ratio_peak" not in row and "out of memory" in bench_mod.format_row(row)

    def cublas(*a, **k):
        raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")

    monkeypatch.setattr(bench_mod, "measure", cublas)
    assert "CUBLAS_STATUS_ALLOC_FAILED" in bench_mod.run_setting(tiny_bench, "seq", 64, 2, offload=False)["error"]

    def other(*a, **k):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(bench_mod, "measure", other)
    with pytest.raises(RuntimeError, match="illegal memory access"):  # not an OOM: raised, not recorded
        bench_mod.run_setting(tiny_bench, "seq", 64, 2, offload=False)


@pytest.mark.parametrize(
    "largest, start, limit, expected",
    [(5120, 3000, 131072, 5120), (5120, 9000, 131072, 5120), (1024, 1024, 131072, 1024), (0, 4096, 131072, 0),
     (200000, 4096, 16384, 16384), (70000, 65536, 131072, 69632), (3072, 0, 131072, 3072)],
)  # fmt: skip
def test_search_max_seq(bench_mod, largest, start, limit, expected):
    calls = []

    def fits(n):
        calls.append(n)
        return n <= largest

    found, tries = bench_mod.search_max_seq(fits, start, 1024, limit)
    assert found == expected
    assert [n for n, _ in tries] == calls and len(set(calls)) == len(calls)  # each length tried once
    assert all(n % 1024 == 0 and 0 < n <= limit for n in calls)
    assert len(calls) <= 2 * (limit // 1024).bit_length()


@pytest.fixture
def fake_cap(bench_mod, monkeypatch):
    """No real cap; every run above 64 tokens raises CUDA out of memory."""
    import contextlib

    real = bench_mod.measure

    def measure(bench, seq, steps, offload, warmup=1):
        if seq > 64:
            raise torch.OutOfMemoryError("CUDA out of memory (fake)")
        return real(bench, seq, steps, offload, warmup)

    monkeypatch.setattr(bench_mod, "measure", measure)
    monkeypatch.setattr(bench_mod, "memory_cap", lambda device, cap: contextlib.nullcontext(None))


def test_max_seq_under_cap_plumbing(bench_mod, tiny_bench, fake_cap):
    """The search on CPU with a fake cap: real runs up to 1024 tokens, out of memory above."""
    summary, row = bench_mod.max_seq_under_cap(tiny_bench, False, 24.0, limit=256, step=64)
    assert summary["predicted"] == 256  # the tiny model fits anything up to the limit
    assert summary["found"] == 64 and not summary["found_is_limit"]
    assert summary["tries"] == [(256, False), (128, False), (64, True)]
    assert row["seq"] == 64 and row["setting"] == "max@cap" and row["error"] is None
    assert "| tiny-llama | no | 24 | 256 | 64 |" in bench_mod.format_search(summary)


def test_write_results(bench_mod, tmp_path):
    G = 2**30
    row = {"model": "llama-3.1-8b", "setting": "seq", "seq": 2048, "peak_allocated": 7 * G, "estimate_peak": 7.5 * G,
           "ratio_peak": 7.5 / 7, "device_used": 7.6 * G, "estimate_device_total": 8.2 * G, "ratio_device": 8.2 / 7.6,
           "tokens_per_s": 3000.0, "fits_cap": True, "fits_8gb": True, "error": None, "allocator_limit": None}  # fmt: skip
    failed = {"model": "llama-2-7b", "setting": "build", "seq": None, "error": "RuntimeError: boom"}
    search = {"model": "llama-3.1-8b", "offload": True, "cap_gib": 24.0, "predicted": 40960, "found": 131072,
              "found_is_limit": True, "predicted_over_found": 40960 / 131072, "tries": [(40960, True), (131072, True)]}  # fmt: skip
    meta = {"gpu": "NVIDIA H100 80GB HBM3", "capability": "9.0", "gpu_memory_gib": 79.1, "commit": "abc1234", "dirty": True,
            "date": "2026-01-02T03:04:05+00:00", "torch": "2.13.0", "triton": "3.9.0", "bitsandbytes": "0.50.2",
            "transformers": "5.0", "optimizer": "paged_adamw_32bit", "loss": bench_mod.describe_loss(None),
            "cap_gib": 24.0, "steps": 3}  # fmt: skip
    result = {
        "meta": meta,
        "rows": [row, failed],
        "max_seq": [search],
        "target_8gb": bench_mod.target_8gb([row, failed]),
    }
    json_path, md_path = bench_mod.write_results(result, tmp_path)
    assert json_path.name == "memory-nvidia-h100-80gb-hbm3-2026-01-02-abc1234.json"  # dirty or not: the commit
    assert md_path.name == json_path.name.replace(".json", ".md")
    assert json.loads(json_path.read_text())["rows"][0]["seq"] == 2048
    assert json.loads(json_path.read_text())["meta"]["dirty"] is True
    md = md_path.read_text()
    assert "commit abc1234 (with uncommitted changes), 2026-01-02" in md
    clean = bench_mod.merge_results({**result, "models": {}}, {**result, "models": {}, "meta": {**meta, "dirty": False}})
    assert clean["meta"]["dirty"] is True  # merged with rows measured on uncommitted code
    assert "| llama-3.1-8b | seq | 2048 | 7.00 | 7.50 | 1.07 | 7.60 | 8.20 | 1.08 | 3000 | yes | yes |  |" in md
    assert "| llama-2-7b | build | - |" in md and "RuntimeError: boom" in md
    assert "| llama-3.1-8b | yes | 24 | 40960 | ≥ 131072 | 0.31 |" in md
    assert "- seq: peak 7.00 GiB, GPU used 7.60 GiB (estimated 8.20 GiB): fits in 8 GiB" in md


def test_run_and_write_end_to_end_on_cpu(bench_mod, fake_cap, monkeypatch, tmp_path, capsys):
    """The driver: two settings and the max-length search (fake cap, fake OOM above 64 tokens)
    on a tiny model on CPU, then the result files."""
    monkeypatch.setattr(bench_mod, "SEARCH_STEP", 64)
    args = bench_mod.parse_args(["--seq", "32", "--steps", "2", "--settings", "seq", "seq+offload", "max@cap",
                                 "--max-seq", "128", "--out", str(tmp_path)])  # fmt: skip
    args.models = ["tiny-llama", "broken"]
    configs = {"tiny-llama": tiny_config("llama", hidden_size=32, intermediate_size=64, num_layers=1), "broken": None}
    save = bench_mod.Saver(tmp_path)
    result = bench_mod.run(args, torch.device("cpu"), configs, torch.float32, "adamw", save=save)
    rows = result["rows"]
    assert [(r["model"], r["setting"], r["seq"]) for r in rows] == [
        ("tiny-llama", "seq", 32), ("tiny-llama", "seq+offload", 32), ("tiny-llama", "max@cap", 64), ("broken", "build", None)
    ]  # fmt: skip
    assert all(r["error"] is None for r in rows[:3]) and rows[3]["error"].startswith("ValueError")
    assert result["max_seq"][0]["found"] == 64 and result["max_seq"][0]["predicted"] == 128
    assert result["meta"]["gpu"] == "cpu" and result["meta"]["optimizer"] == "adamw"
    assert result["models"]["tiny-llama"]["backend"] == "torch"
    json_path, md_path = save.paths
    assert json_path.name.startswith("memory-cpu-") and md_path.read_text().startswith("# QLoRA training memory on cpu")
    state = bench_mod.git_state()
    assert json_path.name.endswith(f"-{state['commit']}.json") and "-dirty" not in json_path.name
    assert (result["meta"]["commit"], result["meta"]["dirty"]) == (state["commit"], state["dirty"])
    assert json.loads(json_path.read_text())["rows"] == json.loads(json.dumps(rows))
    assert "| tiny-llama | seq+offload | 32 |" in capsys.readouterr().out

    # a second invocation (another length) merges into the same files; the same setting is replaced
    args2 = bench_mod.parse_args(["--seq", "16", "--steps", "1", "--settings", "seq", "--out", str(tmp_path)])
    args2.models = ["tiny-llama"]
    save2 = bench_mod.Saver(tmp_path)
    bench_mod.run(args2, torch.device("cpu"), configs, torch.float32, "adamw", save=save2)
    assert save2.paths == save.paths
    merged = json.loads(json_path.read_text())
    assert [(r["model"], r["setting"], r["seq"]) for r in merged["rows"]] == [
        ("tiny-llama", "seq", 32), ("tiny-llama", "seq+offload", 32), ("tiny-llama", "max@cap", 64), ("broken", "build", None),
        ("tiny-llama", "seq", 16),
    ]  # fmt: skip
    assert len(merged["max_seq"]) == 1 and len(merged["meta"]["invocations"]) == 2
    assert "| tiny-llama | seq | 16 |" in md_path.read_text()
