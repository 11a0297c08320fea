"""`qtrain memory estimate|profile`, `qtrain train --profile-memory`, and the memory check before
training on a GPU."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import qtrain.kernels.backend as policy
import torch
from rich.console import Console

from qtrain.cli import main
from qtrain.config import load_config
from qtrain.estimate import GiB

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
TINY = ["model.tiny.hidden_size=64", "model.tiny.intermediate_size=192", "model.tiny.num_layers=2", "train.batch_size=4", "data.num_train=16"]


def test_estimate_from_a_model_id_needs_no_network_or_gpu(capsys):
    assert main(["memory", "estimate", "--model", "meta-llama/Llama-3.1-8B-Instruct", "--seq", "2048", "--batch", "1"]) == 0
    out = capsys.readouterr().out
    for text in ("NF4 linears", "checkpointed layer inputs", "peak allocated", "GPU total", "longest seq_len that fits", "24 GiB"):
        assert text in out, text


def test_estimate_json_from_a_config_with_flags(capsys):
    argv = ["memory", "estimate", str(REPO / "configs" / "llama-3.1-8b.yaml"), "lora.rank=8", "--seq", "4096", "--offload", "--json"]
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"] == "meta-llama/Llama-3.1-8B-Instruct"
    w = data["workload"]
    assert (w["seq_len"], w["batch_size"], w["offload_activations"], w["optimizer"]) == (4096, 2, True, "paged_adamw_32bit")
    assert data["host_bytes"] == 32 * 2 * 4096 * 4096 * 2  # 32 layer inputs [2, 4096, 4096] bf16 in CPU RAM
    assert set(data["max_seq_len"]) == {"8GiB", "12GiB", "16GiB", "24GiB"}
    assert data["peak_bytes"] < data["device_total_bytes"]


@pytest.mark.parametrize("config", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_fits_the_card_it_is_written_for(config, capsys):
    """The GPU configs say in their name (or 24 GB by default) what they fit; the estimate (per rank
    for a multi-GPU config: the flags its header's estimate command gives) agrees."""
    assert main(["memory", "estimate", str(config), *estimate_flags(config), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    if config.name.startswith("quickstart"):
        assert data["model"] == "tiny llama"
        return
    card = 8 if config.name.endswith("8gb.yaml") else 16 if config.name.endswith("16gb.yaml") else 24
    assert data["device_total_bytes"] < card * GiB, (config.name, data["device_total_bytes"] / GiB)


def estimate_flags(config: Path) -> list[str]:
    """The flags of the `qtrain memory estimate CONFIG ...` command a config's header quotes
    (`--nproc 2 --strategy fsdp` for a multi-GPU config; none for the others)."""
    found = re.search(r"ESTIMATED by `qtrain memory estimate [^`\s]+([^`]*)`", header(config))
    return shlex.split(found.group(1)) if found else []


def header(config: Path) -> str:
    """A config's leading comment, as one line (comment marks and line breaks undone)."""
    lines = []
    for line in config.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return " ".join(" ".join(lines).split())


@pytest.mark.parametrize("config", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_config_headers_quote_the_estimate(config, capsys):
    """Every number a GPU config's header gives for memory is a row of `qtrain memory estimate CONFIG`,
    in GiB with two decimals, under the row's own name."""
    text = header(config)
    if "Memory, ESTIMATED" not in text:
        assert config.name.startswith("quickstart")  # the CPU configs quote no GPU memory
        return
    assert main(["memory", "estimate", str(config), *estimate_flags(config), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    items = [i for i in data["items"] if i["bytes"] >= 0.005 * GiB]  # rows that print as 0.00 are left out
    weights = sum(i["bytes"] for i in data["items"] if i["category"] == "weights")
    quoted = [f"{i['name']} {i['bytes'] / GiB:.2f}" for i in items] + [
        f"weights {weights / GiB:.2f} = NF4 linears",
        f"peak allocated {data['peak_bytes'] / GiB:.2f} GiB ({data['phase']})",
        f"GPU total {data['device_total_bytes'] / GiB:.2f} GiB",
    ]
    if data["paged_bytes"]:
        quoted.append(f"paged optimizer state {data['paged_bytes'] / GiB:.2f}")
    if data["host_bytes"]:
        quoted.append(f"offloaded activations {data['host_bytes'] / GiB:.2f}")
    missing = [q for q in quoted if q not in text]
    assert not missing, (config.name, missing)


def test_readme_config_table_gives_each_configs_estimate(capsys):
    """The README's table of ready configs has a row for every GPU config, whose last column is the
    estimator's GPU total for it (per rank for a multi-GPU config), in GiB with one decimal."""
    rows = {}
    for line in (REPO / "README.md").read_text().splitlines():
        m = re.match(r"\| `configs/([\w.-]+\.yaml)` \|.*\| ([\d.]+) GiB \|$", line)
        if m:
            rows[m.group(1)] = m.group(2)
    configs = sorted(p for p in (REPO / "configs").glob("*.yaml") if "Memory, ESTIMATED" in header(p))
    assert sorted(rows) == [p.name for p in configs]
    for config in configs:  # per rank for a multi-GPU config: the flags its header quotes
        assert main(["memory", "estimate", str(config), *estimate_flags(config), "--json"]) == 0
        total = json.loads(capsys.readouterr().out)["device_total_bytes"] / GiB
        assert rows[config.name] == f"{total:.1f}", config.name


def test_estimate_without_model_is_a_usage_error(capsys):
    assert main(["memory", "estimate", "--seq", "128"]) == 2
    assert "model" in capsys.readouterr().err


def test_profile_writes_the_report(tmp_path, capsys):
    assert main(["memory", "profile", str(QUICKSTART), "--steps", "2", *TINY, f"output_dir={tmp_path}"]) == 0
    report = tmp_path / "memory-profile"
    assert [p.name for p in tmp_path.iterdir()] == ["memory-profile"]  # the report alone: no run files
    assert {p.name for p in report.iterdir()} == {"memory.json", "memory_report.html", "memory_report.md", "memory_timeline.png", "memory_breakdown.png"}
    data = json.loads((report / "memory.json").read_text())
    steps = {s["step"] for s in data["samples"]}
    assert steps == {1, 2}
    assert data["measured"]["peak_bytes"] == max(s["peak"] for s in data["samples"])
    assert 0.85 < data["ratio_estimate_over_measured"] < 1.15  # tiny model, padded batches, fp32 on CPU
    phases = {s["phase"] for s in data["samples"]}
    assert phases == {"forward", "backward", "optimizer"}
    out = capsys.readouterr().out
    assert "memory report:" in out
    assert f"memory peak: estimate / measured = {round(data['ratio_estimate_over_measured'], 2):.2f}: the estimate is" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="the torch profiler runs on CPU only")
def test_profile_on_cpu_keeps_the_torch_profilers_noise_off_the_console(tmp_path):
    argv = ["memory", "profile", str(QUICKSTART), "--steps", "2", *TINY, "--output-dir", str(tmp_path / "run")]
    env = {k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"}
    proc = subprocess.run(
        [sys.executable, "-m", "qtrain.cli", *argv], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, proc.stderr
    console = proc.stdout + proc.stderr
    for noise in ("USDT:", "profiler_start", "profiler_stop", "CPUAllocator.cpp", "Memory block of unknown size"):
        assert noise not in console, noise
    assert "memory report:" in proc.stdout and (tmp_path / "run" / "memory_report.html").is_file()


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `folder`: its bytes and modification time."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


def test_profile_after_a_run_leaves_the_run_untouched(tmp_path, capsys):
    """The README's order: `qtrain train CONFIG`, then `qtrain memory profile CONFIG`: the run's adapter,
    checkpoints, metrics, TensorBoard events, plot, config and result stay as the run wrote them."""
    run = tmp_path / "run"
    assert main(["train", str(QUICKSTART), *TINY, "train.max_steps=3", "eval.exact_match=false", f"output_dir={run}"]) == 0
    before = snapshot(run)
    assert {"adapter/adapter_model.safetensors", "metrics.jsonl", "result.json", "config.json", "loss.png"} <= set(before)
    assert any(name.startswith("tensorboard/") for name in before) and any(name.startswith("checkpoints/") for name in before)
    assert main(["memory", "profile", str(QUICKSTART), "--steps", "2", *TINY, f"output_dir={run}"]) == 0
    after = snapshot(run)
    assert {k: v for k, v in after.items() if not k.startswith("memory-profile/")} == before
    assert {k for k in after if k.startswith("memory-profile/")} == {f"memory-profile/{n}" for n in ("memory.json", "memory_report.html", "memory_report.md", "memory_timeline.png", "memory_breakdown.png")}
    assert f"memory report: {run / 'memory-profile' / 'memory_report.html'}" in capsys.readouterr().out


def test_profile_output_dir_flag(tmp_path):
    assert main(["memory", "profile", str(QUICKSTART), "--steps", "1", *TINY, f"output_dir={tmp_path / 'run'}", "--output-dir", str(tmp_path / "report")]) == 0
    assert not (tmp_path / "run").exists() and (tmp_path / "report" / "memory_report.html").exists()


def test_train_profile_memory_measures_only_the_first_steps(tmp_path):
    from qtrain.train import train

    cfg = load_config(QUICKSTART, [*TINY, "train.max_steps=4", "eval.exact_match=false", f"output_dir={tmp_path}"])
    result = train(cfg, Console(quiet=True), profile_memory=2)
    assert result["steps"] == 4 and Path(result["memory_report"]).exists()
    data = json.loads((tmp_path / "memory" / "memory.json").read_text())
    assert {s["step"] for s in data["samples"]} == {1, 2}


def test_train_profile_memory_flag(tmp_path):
    assert main(["train", str(QUICKSTART), *TINY, "train.max_steps=1", "eval.exact_match=false", f"output_dir={tmp_path}", "--profile-memory", "1"]) == 0
    assert (tmp_path / "memory" / "memory_report.html").exists()


def test_gpu_check_warns_with_settings_that_fit(monkeypatch, tmp_path):
    """On a GPU with too little free memory, training warns before loading and lists what fits."""
    from qtrain import train as recipe

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(7.9 * GiB), 8 * GiB))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    monkeypatch.setattr(policy, "self_check", lambda op, device: True)  # the kernels passed on this GPU
    cfg = load_config(REPO / "configs" / "llama-3.1-8b.yaml")
    console = Console(record=True, width=200)
    recipe.check_memory(cfg, "meta-llama/Llama-3.1-8B-Instruct", torch.device("cuda"), console)
    text = console.export_text()
    assert "this run needs about" in text and "7.9 GiB of 8.0 GiB is free" in text
    assert "train.batch_size=1 train.grad_accum=16 (same effective batch)" in text
    assert "(fits)" in text


def test_gpu_check_is_quiet_when_it_fits(monkeypatch):
    from qtrain import train as recipe

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (23 * GiB, 24 * GiB))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    monkeypatch.setattr(policy, "self_check", lambda op, device: True)  # the kernels passed on this GPU
    cfg = load_config(REPO / "configs" / "llama-3.1-8b.yaml")
    console = Console(record=True, width=200)
    recipe.check_memory(cfg, "meta-llama/Llama-3.1-8B-Instruct", torch.device("cuda"), console)
    assert "estimated" in console.export_text() and "needs about" not in console.export_text()


def test_gpu_check_under_fsdp_is_per_rank(monkeypatch, capsys):
    """The 70B config on one of two 24 GB cards: too much whole, it fits as one rank of two under FSDP."""
    from qtrain import train as recipe

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(23.6 * GiB), 24 * GiB))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    monkeypatch.setattr(policy, "self_check", lambda op, device: True)
    cfg = load_config(REPO / "configs" / "llama-3.1-70b-2x24gb.yaml")
    texts = []
    for ranks, strategy in ((1, "single"), (2, "fsdp")):
        console = Console(record=True, width=200)
        recipe.check_memory(cfg, "meta-llama/Llama-3.1-70B-Instruct", torch.device("cuda"), console, ranks, strategy)
        texts.append(console.export_text())
    capsys.readouterr()  # the consoles' echo
    assert main(["memory", "estimate", str(REPO / "configs" / "llama-3.1-70b-2x24gb.yaml"), "--json"]) == 0  # per rank of 2, fsdp
    per_rank = json.loads(capsys.readouterr().out)["device_total_bytes"]
    assert "this run needs about" in texts[0]
    assert f"estimated {per_rank / GiB:.1f} GiB of the 23.6 GiB free" in texts[1], texts[1]


@pytest.mark.parametrize("nproc", [2, 4])
def test_readme_quotes_the_70b_per_rank_estimates(nproc, capsys):
    """The README's FSDP table: the 70B config's per-rank GPU total and NF4 share on 2 and 4 cards."""
    config = REPO / "configs" / "llama-3.1-70b-2x24gb.yaml"
    assert main(["memory", "estimate", str(config), "--nproc", str(nproc), "--strategy", "fsdp", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    nf4 = next(i["bytes"] for i in data["items"] if i["name"] == "NF4 linears")
    row = next(line for line in (REPO / "README.md").read_text().splitlines() if line.startswith("| `configs/llama-3.1-70b-2x24gb.yaml`:"))
    assert f"{data['device_total_bytes'] / GiB:.2f} GiB" in row and f"{nf4 / GiB:.2f}" in row


def test_a_multi_gpu_config_is_estimated_per_rank_of_its_strategy(capsys):
    """The config's distributed.strategy is the default --strategy, on 2 ranks unless --nproc says."""
    config = str(REPO / "configs" / "llama-3.1-70b-2x24gb.yaml")
    runs = [[], ["--nproc", "2", "--strategy", "fsdp"], ["--nproc", "4"], ["--nproc", "4", "--strategy", "fsdp"], ["--nproc", "1"]]
    totals = []
    for flags in runs:
        assert main(["memory", "estimate", config, *flags, "--json"]) == 0
        totals.append(json.loads(capsys.readouterr().out)["device_total_bytes"])
    assert totals[0] == totals[1] and totals[2] == totals[3] and totals[2] < totals[0] < totals[4]


def test_nproc_needs_a_strategy(capsys):
    assert main(["memory", "estimate", "--model", "llama-3.1-70b", "--nproc", "2"]) == 2
    assert "--strategy" in capsys.readouterr().err
