"""benchmarks/e2e.py on CPU: both stacks (transformers + bitsandbytes + PEFT, and qtrain) build and
train a tiny Llama through the benchmark's own code, from the same weights and LoRA init (same
losses), the in-memory baseline is what `from_pretrained(..., quantization_config=bnb)` loads, the
max-context search (with its time limit), the worker-process plumbing, the result files (JSON,
Markdown with the ratio columns, PNG) and a clean exit without CUDA. GPU numbers are None here."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qtrain.tiny import tiny_config

pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "e2e.py"
G = 2**30


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a loaded 2-core machine two threads
    spin-wait on each other: measured 20-70x slower steps (21 ms vs 0.25-1.4 s a step here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def e2e():
    spec = importlib.util.spec_from_file_location("benchmark_e2e", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def tiny(layers: int = 1):
    # multiples of 64: bitsandbytes 0.50.2's CPU dequantize is wrong for rows of 16k but not 64k values
    return tiny_config("llama", hidden_size=64, intermediate_size=128, num_layers=layers, vocab_size=128)


@pytest.fixture
def fake_cap(e2e, monkeypatch):
    """No real cap (CPU); every run longer than 64 tokens raises CUDA out of memory."""
    real = e2e.measure

    def measure(stack, batch, seq, steps, offload, warmup=1):
        if seq > 64:
            raise torch.OutOfMemoryError("CUDA out of memory (fake)")
        return real(stack, batch, seq, steps, offload, warmup)

    monkeypatch.setattr(e2e, "measure", measure)
    monkeypatch.setattr(e2e, "memory_cap", lambda device, cap: contextlib.nullcontext(None))


def test_main_without_cuda_exits_0(e2e, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert e2e.main(["--quick", "--out", str(tmp_path)]) == 0
    assert "needs a CUDA GPU" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())


def test_args(e2e):
    args = e2e.parse_args([])
    assert args.models == ["llama-3.1-8b", "llama-2-7b"] and args.sweep_models == ["llama-3.1-8b"]
    assert args.stacks == ["baseline", "qtrain", "liger"] and args.settings == ["seq", "max@cap", "max@cap+offload"]
    assert (args.seq, args.batch, args.steps, args.cap_gib, args.search_step) == (2048, 1, 4, 24.0, 1024)
    quick = e2e.parse_args(["--quick"])
    assert quick.models == ["llama-3.1-8b"] and quick.stacks == ["baseline", "qtrain"] and quick.steps == 3
    assert quick.settings == ["seq", "max@cap+offload"] and quick.search_step == 4096
    assert e2e.parse_args(["--stacks", "qtrain", "baseline"]).stacks == ["baseline", "qtrain"]  # baseline first
    for bad in (["--models", "gpt-17"], ["--steps", "1"], ["--search-step", "4096", "--max-seq", "1024"]):
        with pytest.raises(SystemExit):
            e2e.parse_args(bad)


def write_source_checkpoint(e2e, config, path: Path, dtype=torch.float32) -> Path:
    """A HF checkpoint whose every tensor is the benchmark's source tensor: what a 16 GB file would hold."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(e2e.source_tensor(name, p.shape, dtype, torch.device("cpu"), e2e.SEED))
    model.save_pretrained(path)
    return path


def test_in_memory_baseline_is_from_pretrained_and_qtrain_has_the_same_codes(e2e, tmp_path, bnb_exact):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qtrain.lora import LoRALinear, LoRASpec
    from qtrain.synthetic import random_model

    config, cpu = tiny(2), torch.device("cpu")
    path = write_source_checkpoint(e2e, config, tmp_path / "ckpt")
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)  # fmt: skip
    loaded = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.float32,
                                                  device_map="cpu", attn_implementation="sdpa")  # fmt: skip
    built = e2e.bnb_base_model(config, cpu, torch.float32)
    assert not built.training and not loaded.training  # from_pretrained's models start in eval mode
    bnb_exact(built), bnb_exact(loaded)  # the same kernel on every CPU (AVX512-BF16 ones switch in eval mode)
    ours = random_model(config, LoRASpec(rank=4), torch.float32, cpu, seed=e2e.SEED)
    assert built.is_loaded_in_4bit and loaded.is_loaded_in_4bit
    assert built.config._attn_implementation == loaded.config._attn_implementation == "sdpa"
    mods = dict(loaded.named_modules())
    quantized = {n: m for n, m in built.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(quantized) == 7 * 2 and "lm_head" not in quantized  # q k v o gate up down per layer; lm_head 16-bit
    for name, m in quantized.items():
        ref = mods[name]
        assert type(ref) is bnb.nn.Linear4bit and ref.compute_dtype == m.compute_dtype == torch.float32
        assert torch.equal(m.weight.data, ref.weight.data), name  # the same 4-bit codes
        a, b = m.weight.quant_state.as_dict(packed=False), ref.weight.quant_state.as_dict(packed=False)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k], (name, k)
        theirs = ours.get_submodule(name)
        assert isinstance(theirs, LoRALinear)  # qtrain quantized the same tensor to the same bytes
        assert torch.equal(theirs.nf4_packed.view(-1), m.weight.data.view(-1)), name
    state, ref_state = dict(built.named_parameters()), dict(loaded.named_parameters())
    assert state.keys() == ref_state.keys()
    for name, p in state.items():
        if name.rpartition(".")[0] not in quantized:
            assert torch.equal(p, ref_state[name]), name
            assert torch.equal(p, dict(ours.named_parameters())[name]), name
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(built(ids).logits, loaded(ids).logits, rtol=0, atol=0)
        torch.testing.assert_close(built(ids).logits, ours(ids).logits, rtol=1e-5, atol=1e-5)


def test_both_stacks_start_from_the_same_lora(e2e):
    """PEFT's lora_A/lora_B get qtrain's init (seeded Kaiming-uniform A, B = 0), module by module."""
    cpu = torch.device("cpu")
    base = e2e.build_stack("baseline", "tiny", tiny(2), cpu, torch.float32, "adamw", "auto")
    ours = e2e.build_stack("qtrain", "tiny", tiny(2), cpu, torch.float32, "adamw", "auto")
    theirs = {n.removeprefix("base_model.model."): p for n, p in base.model.named_parameters() if p.requires_grad}
    mine = {n: p for n, p in ours.model.named_parameters() if p.requires_grad}
    assert len(theirs) == len(mine) == 2 * 7 * 2
    for name, p in mine.items():  # model.layers.0.self_attn.q_proj.lora_a.weight
        module, kind, _ = name.rsplit(".", 2)
        q = theirs[f"{module}.{kind.replace('_a', '_A').replace('_b', '_B')}.default.weight"]
        assert q.dtype == p.dtype == torch.float32 and torch.equal(q, p), name
        assert (p.abs().max() > 0) == (kind == "lora_a"), name


def test_liger_stack_builds(e2e):
    """The third column: Liger-Kernel's patches on the bitsandbytes model, under PEFT (its Triton
    kernels do not run under the interpreter: the steps are the GPU's)."""
    pytest.importorskip("liger_kernel")
    stack = e2e.build_stack("liger", "tiny", tiny(), torch.device("cpu"), torch.float32, "adamw", "auto")
    mlp = stack.model.get_base_model().model.layers[0].mlp
    assert stack.name == "liger" and stack.info["loss"] == "Liger fused linear cross-entropy"
    assert mlp.forward.__func__.__module__.startswith("liger_kernel.")  # SwiGLU bound on the instance


def test_flops_and_peaks(e2e):
    from qtrain.presets import preset_config

    f = e2e.flops_per_token(preset_config("llama-3.1-8b"), 2048)
    per_layer = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336  # q o, k v, gate up down
    assert f["base_params"] == 32 * per_layer + 128256 * 4096 == 7_504_658_432  # 8.03B minus the embeddings
    assert f["lora_params"] == 41_943_040  # PEFT's count for r=16 on all linears of Llama-3-8B
    assert f["attention"] == 12 * 32 * 4096 * 2048
    assert f["per_token"] == 6 * (f["base_params"] + f["lora_params"]) + f["attention"]
    names = {"NVIDIA H100 80GB HBM3": 989.4, "NVIDIA H100 PCIe": 756.0, "NVIDIA H200": 989.4,
             "NVIDIA A100-SXM4-80GB": 312.0, "NVIDIA GeForce RTX 4090": 165.2, "NVIDIA GeForce RTX 3090": 71.0,
             "Tesla T4": None, "cpu": None}  # fmt: skip
    assert {n: e2e.peak_tflops(n) for n in names} == names
    assert e2e.peak_tflops("Tesla T4", override=65.0) == 65.0


@pytest.mark.parametrize(
    "largest, start, limit, expected",
    [(5120, 3000, 131072, 5120), (5120, 9000, 131072, 5120), (1024, 1024, 131072, 1024), (0, 4096, 131072, 0),
     (200000, 4096, 16384, 16384), (70000, 65536, 131072, 69632), (3072, 0, 131072, 3072)],
)  # fmt: skip
def test_search_max_seq(e2e, largest, start, limit, expected):
    calls = []

    def fits(n):
        calls.append(n)
        return n <= largest

    r = e2e.search_max_seq(fits, start, 1024, limit)
    assert r["found"] == expected and r["complete"]
    assert [n for n, _ in r["tries"]] == calls and len(set(calls)) == len(calls)  # each length tried once
    assert all(n % 1024 == 0 and 0 < n <= limit for n in calls)
    assert r["fails_at"] is None if expected == limit else r["fails_at"] == expected + 1024


def test_search_stops_at_the_deadline_with_a_bracket(e2e):
    now = [0.0]

    def fits(n):
        now[0] += 10.0  # every try takes 10 s
        return n <= 70000

    r = e2e.search_max_seq(fits, 65536, 1024, 131072, deadline=25.0, clock=lambda: now[0])
    assert r["tries"] == [(65536, True), (131072, False), (98304, False)]  # the third started at t=20 < 25
    assert (r["found"], r["fails_at"], r["complete"]) == (65536, 98304, False)
    late = e2e.search_max_seq(fits, 4096, 1024, 131072, deadline=-1.0, clock=lambda: now[0])
    assert late["tries"] == [(4096, True)] and not late["complete"]  # the first try always runs


def test_run_in_process_on_cpu(e2e, fake_cap, tmp_path, capsys):
    """The driver on a tiny model: baseline and qtrain, two fixed-length settings and the search
    (fake OOM above 64 tokens), the comparisons and the result files; a second invocation merges."""
    args = e2e.parse_args(["--seq", "32", "--steps", "2", "--settings", "seq", "seq+offload", "max@cap",
                           "--max-seq", "128", "--search-step", "32", "--baseline-start", "128",
                           "--stacks", "baseline", "qtrain", "liger", "--out", str(tmp_path)])  # fmt: skip
    args.models = args.sweep_models = ["tiny"]
    save = e2e.Saver(tmp_path)
    result = e2e.run(args, torch.device("cpu"), {"tiny": tiny()}, torch.float32, "adamw", save=save)
    rows = result["rows"]
    assert [(r["stack"], r["setting"], r["seq"]) for r in rows] == [
        ("baseline", "seq", 32), ("baseline", "seq+offload", 32), ("baseline", "max@cap", 64),
        ("qtrain", "seq", 32), ("qtrain", "seq+offload", 32), ("qtrain", "max@cap", 64),
    ]  # fmt: skip
    assert all(r["error"] is None and r["tokens_per_s"] > 0 and r["peak_allocated"] is None for r in rows)
    assert rows[1]["offloaded_bytes_per_step"] == 0  # CPU tensors stay where they are (CUDA-only hook)
    assert any("liger" in n for n in result["meta"]["notes"])  # not installed, or not in one process
    base, ours = result["stacks"]["tiny/baseline"], result["stacks"]["tiny/qtrain"]
    assert base["attn_implementation"] == ours["attn_implementation"] == "sdpa"
    # r=16 on q (64->64) k v (64->32) o (64->64) gate up (64->128) down (128->64): 16 x 1024
    assert base["trainable_params"] == ours["trainable_params"] == 16 * 1024
    assert e2e.flops_per_token(tiny(), 32)["lora_params"] == 16 * 1024
    # same weights, same LoRA init, same batches, same optimizer: the same losses at every step
    for r, b in zip(rows[3:5], rows[:2]):
        assert max(abs(x - y) for x, y in zip(r["losses"], b["losses"])) < 1e-4, (r["losses"], b["losses"])
    comp = {(c["stack"], c["setting"]): c for c in result["comparisons"]}
    assert comp[("qtrain", "seq")]["speedup"] > 0 and comp[("qtrain", "seq")]["memory_ratio"] is None
    assert comp[("qtrain", "seq")]["loss_diff"] < 1e-4
    searches = {s["stack"]: s for s in result["max_seq"]}
    assert searches["baseline"]["start"] == 128 and searches["qtrain"]["start"] == 128  # estimator: anything fits
    assert all((s["found"], s["fails_at"], s["complete"]) == (64, 96, True) for s in searches.values())
    json_path, md_path, png_path = save.paths
    assert json_path.name.startswith("e2e-cpu-") and json_path.suffix == ".json"
    assert json.loads(json_path.read_text())["rows"] == json.loads(json.dumps(rows))
    md = md_path.read_text()
    assert "| tok/s vs baseline | peak vs baseline | max Δloss vs baseline |" in md
    assert "| tiny | qtrain | seq | 32 |" in md and "| tiny | baseline | no | 64 | 96 | yes |" in md
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## tiny: qtrain" in capsys.readouterr().out

    args2 = e2e.parse_args(
        ["--seq", "16", "--steps", "2", "--settings", "seq", "--stacks", "qtrain", "--out", str(tmp_path)]
    )
    args2.models = args2.sweep_models = ["tiny"]
    save2 = e2e.Saver(tmp_path)
    e2e.run(args2, torch.device("cpu"), {"tiny": tiny()}, torch.float32, "adamw", save=save2)
    assert save2.paths == save.paths
    merged = json.loads(json_path.read_text())
    assert len(merged["rows"]) == 7 and merged["rows"][-1]["seq"] == 16 and len(merged["meta"]["invocations"]) == 2


def test_worker_processes(e2e, monkeypatch, tmp_path):
    """isolate=True: each (model, stack) through its command line and result file (here the worker
    runs in this process on the tiny model); a worker that times out leaves its partial results."""
    calls = []

    def spawn(argv, timeout):
        calls.append(argv)
        args = e2e.parse_args(argv[2:])
        e2e.worker_main(args, {"llama-2-7b": tiny()}, torch.device("cpu"), torch.float32, "adamw")
        if args.worker == "qtrain":
            raise subprocess.TimeoutExpired(argv, timeout)
        return 0

    monkeypatch.setattr(e2e, "spawn", spawn)
    args = e2e.parse_args(["--models", "llama-2-7b", "--stacks", "baseline", "qtrain", "--settings", "seq",
                           "--seq", "16", "--steps", "2", "--worker-timeout", "5", "--out", str(tmp_path)])  # fmt: skip
    result = e2e.run(args, torch.device("cpu"), None, torch.float32, "adamw", isolate=True)
    assert [a[a.index("--worker") + 1] for a in calls] == ["baseline", "qtrain"]
    assert calls[0][:2] == [sys.executable, str(SCRIPT)] and "--worker-out" in calls[0]
    assert [(r["stack"], r["setting"], r["error"]) for r in result["rows"]] == [
        ("baseline", "seq", None), ("qtrain", "seq", None),
        ("qtrain", "worker", "worker stopped after --worker-timeout 5 s"),
    ]  # fmt: skip
    assert result["meta"]["gpu"] == "cpu" and result["stacks"]["llama-2-7b/qtrain"]["loss_backend"] == "torch"


def test_markdown_ratios_and_targets(e2e, tmp_path):
    meta = {"gpu": "NVIDIA H100 80GB HBM3", "capability": "9.0", "gpu_memory_gib": 79.1, "commit": "abc1234",
            "date": "2026-01-02T03:04:05+00:00", "torch": "2.11", "triton": "3.6", "transformers": "5.17",
            "peft": "0.17", "bitsandbytes": "0.50.2", "liger_kernel": None, "dtype": "bfloat16",
            "optimizer": "paged_adamw_32bit", "lr": 2e-4, "batch": 1, "steps": 4, "cap_gib": 24.0,
            "peak_tflops": 989.4, "notes": ["liger: skipped"], "args": {}}  # fmt: skip
    row = {"model": "llama-3.1-8b", "setting": "seq", "seq": 2048, "error": None, "device_used": 9 * G}
    rows = [
        row | {"stack": "baseline", "tokens_per_s": 1000.0, "peak_allocated": 16 * G, "mfu": 0.20, "losses": [12.0, 11.9]},
        row | {"stack": "qtrain", "tokens_per_s": 2500.0, "peak_allocated": 6 * G, "mfu": 0.50, "losses": [12.0, 11.95]},
        {"model": "llama-2-7b", "stack": "qtrain", "setting": "build", "seq": None, "error": "RuntimeError: boom"},
    ]  # fmt: skip
    search = {"model": "llama-3.1-8b", "stack": "qtrain", "offload": True, "cap_gib": 24.0, "start": 90112,
              "step": 1024, "limit": 131072, "found": 88064, "fails_at": 90112, "complete": False, "seconds": 61.0,
              "tries": [(90112, False), (45056, True), (88064, True)]}  # fmt: skip
    result = {"meta": meta, "stacks": {}, "rows": rows, "max_seq": [search]}
    e2e.finish(result)
    json_path, md_path, png_path = e2e.write_results(result, tmp_path)
    assert json_path.name == "e2e-nvidia-h100-80gb-hbm3-2026-01-02-abc1234.json"
    md = md_path.read_text()
    assert "| llama-3.1-8b | qtrain | seq | 2048 | 2500 | 50.0% | 6.00 | 9.00 | 2.50x | 0.38x | 0.05 |  |" in md
    assert "| llama-3.1-8b | baseline | seq | 2048 | 1000 | 20.0% | 16.00 | 9.00 | 1.00x | 1.00x | 0 |  |" in md
    assert "| llama-2-7b | qtrain | build | - |" in md and "RuntimeError: boom" in md
    assert "| llama-3.1-8b | qtrain | yes | 88064 | 90112 | no (out of time) | 61 |" in md
    assert "- llama-3.1-8b: tokens/s >= 2x baseline at seq 2048: 2.5 (met)" in md
    assert "- llama-3.1-8b: peak memory <= 0.5x baseline at seq 2048: 0.375 (met)" in md
    assert "- llama-3.1-8b: trains >= 80000 tokens under 24 GiB (best of offload on/off): 88064 (met)" in md
    assert "- liger: skipped" in md
    assert png_path.stat().st_size > 10_000
