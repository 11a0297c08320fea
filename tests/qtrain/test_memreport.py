"""qtrain.memreport: the memory report (JSON, two PNGs, Markdown, self-contained HTML)."""

from __future__ import annotations

import base64
import html
import json
import re

import pytest
import torch

from qtrain.estimate import Estimate, Item
from qtrain.memprof import CATEGORIES, Sample
from qtrain.memreport import fmt_bytes, ratio_text, summary_lines, timeline_figure, write_report
from qtrain.model import enable_checkpointing

GiB, MiB = 2**30, 2**20
PNG = b"\x89PNG\r\n\x1a\n"
FILES = ("memory.json", "memory_timeline.png", "memory_breakdown.png", "memory_report.md", "memory_report.html")
W, A, O = 2 * GiB, 64 * MiB, 128 * MiB


def sample(step, phase, label, t, transient=0, **parts) -> Sample:
    """A mark whose categories are `parts` (the rest 0) and whose interval peaked `transient` above them."""
    parts = {c: parts.get(c, 0) for c in CATEGORIES}
    current = sum(parts.values())
    return Sample(step, phase, label, t, current=current, peak=current + transient, parts=parts)


def two_steps() -> list[Sample]:
    out = []
    for step, opt in ((1, 0), (2, O)):  # Adam's state exists from the first update on
        static = {"weights": W, "adapters": A, "optimizer": opt}
        t = 10.0 * (step - 1)
        out += [
            sample(step, "forward", "embeddings", t, **static),
            sample(step, "forward", "layer 0", t + 1, activations=GiB // 2, **static),
            sample(step, "forward", "lm_head + loss", t + 2, activations=GiB, **static),
            # step 1 holds the known peak: 1.5 GiB activations + 0.5 GiB logits + 1 GiB freed again
            sample(step, "backward", "lm_head + loss backward", t + 3, transient=GiB if step == 1 else 0,
                   activations=3 * GiB // 2, other=GiB // 2, **static),
            sample(step, "backward", "backward layer 0", t + 4, 10 * MiB, activations=GiB // 2, gradients=A, **static),
            sample(step, "optimizer", "clip + step", t + 5, gradients=A, **static),
            sample(step, "optimizer", "step done", t + 6, 2 * MiB, weights=W, adapters=A, optimizer=O),
        ]  # fmt: skip
    return out


def an_estimate() -> Estimate:
    items = [
        Item("weights", "NF4 linears", W, "4-bit"),
        Item("adapters", "adapter parameters", A, "fp32"),
        Item("optimizer", "Adam moments", O, "adamw"),
        Item("activations", "saved layer activations", 3 * GiB // 2, "2 layers"),
        Item("other", "logits and their fp32 copy", 3 * GiB // 2, "full logits"),
    ]
    peak = sum(i.bytes for i in items)
    phases = {"loss forward": peak, "last layer's backward": 3 * GiB, "optimizer step": W + A + O + A}
    return Estimate(items=items, phase="loss forward", peak=peak, phases=phases)


def test_fmt_bytes():
    assert fmt_bytes(3 * GiB) == "3.00 GiB"
    assert fmt_bytes(512 * MiB) == "512.00 MiB"
    assert fmt_bytes(512 * MiB, "GiB") == "0.50 GiB"
    assert fmt_bytes(-GiB // 4, "GiB") == "-0.25 GiB"


def test_report_files_json_markdown_html(tmp_path):
    samples, est = two_steps(), an_estimate()
    info = {"title": "tiny memory", "model": "tiny-llama", "device": "cpu", "gradient checkpointing": True}
    page = write_report(tmp_path / "r", samples, est, info)
    out = tmp_path / "r"
    assert page == out / "memory_report.html"
    for name in FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for name in FILES[1:3]:
        assert (out / name).read_bytes()[:8] == PNG

    doc = json.loads((out / "memory.json").read_text())
    m = doc["measured"]
    peak = W + A + 3 * GiB // 2 + GiB // 2 + GiB
    assert m["peak_bytes"] == peak and m["peak_step"] == 1
    assert m["peak_label"] == "lm_head + loss → lm_head + loss backward"
    assert m["peak_phase"] == "forward"  # the interval belongs to the mark opening it
    at_peak = {
        "weights": W,
        "adapters": A,
        "gradients": 0,
        "optimizer": 0,
        "activations": 3 * GiB // 2,
        "other": GiB // 2,
    }
    assert m["by_category_at_peak"] == {**at_peak, "transient": GiB}
    assert sum(m["by_category_at_peak"].values()) == peak
    phases = {"forward": peak, "backward": W + A + O + GiB // 2 + A + 10 * MiB, "optimizer": W + A + O + 2 * MiB}
    assert m["phase_peaks_bytes"] == phases  # step 2; "backward layer 0 → clip + step" is backward
    assert doc["ratio_estimate_over_measured"] == pytest.approx(est.peak / peak)
    assert doc["estimate"]["peak_bytes"] == est.peak and doc["info"] == info
    assert len(doc["samples"]) == len(samples) and doc["samples"][3]["label"] == "lm_head + loss backward"

    md = (out / "memory_report.md").read_text()
    assert md.startswith("# tiny memory\n")
    assert "| model | tiny-llama |" in md and "| gradient checkpointing | yes |" in md
    assert fmt_bytes(peak, "GiB") in md and fmt_bytes(est.peak, "GiB") in md
    assert f"| {est.peak / peak:.2f} |" in md
    assert "| 1.02 | estimate / measured = 1.02: the estimate is 2% above the measurement (on the safe side) |" in md
    assert "| forward | 5.06 GiB | 5.19 GiB | loss forward 5.19 GiB | 1.02 |" in md  # within 10%: not flagged
    assert "⚠" not in md and "## Under-estimated phases" not in md
    assert "| weights | 2.00 GiB | 2.00 GiB | 0.00 GiB |" in md
    assert "| other | 1.50 GiB | 0.50 GiB | -1.00 GiB |" in md
    assert "| transient | 0.00 GiB | 1.00 GiB | +1.00 GiB |" in md
    assert "| activations | saved layer activations | 1.50 GiB | 2 layers |" in md
    assert "](memory_timeline.png)" in md and "](memory_breakdown.png)" in md

    text = page.read_text()
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(images) == 2 and all(base64.b64decode(i)[:8] == PNG for i in images)
    assert not re.search(r'(src|href)="(?!data:)', text)  # nothing to fetch: one file to mail
    assert "<table>" in text and fmt_bytes(peak, "GiB") in text and "<td>weights</td>" in text


@pytest.mark.parametrize(
    "ratio, text",
    [
        (0.94, "estimate / measured = 0.94: the estimate is 6% below the measurement"),
        (0.9449, "estimate / measured = 0.94: the estimate is 6% below the measurement"),  # as printed
        (1.12, "estimate / measured = 1.12: the estimate is 12% above the measurement (on the safe side)"),
        (1.001, "estimate / measured = 1.00: the estimate matches the measurement"),
    ],
)
def test_ratio_text_says_which_side(ratio, text):
    assert ratio_text(ratio) == text


def test_phases_measured_more_than_10_percent_above_the_estimate_are_flagged(tmp_path):
    samples, est = two_steps(), an_estimate()
    est.phases["last layer's backward"] = 2 * GiB  # measured backward peak: 2.76 GiB (step 2)
    est.phases["optimizer step"] = 2 * GiB + 180 * MiB  # measured 2.19 GiB: 7% above, within the tolerance
    page = write_report(tmp_path, samples, est, {"title": "flags"})
    backward = W + A + O + GiB // 2 + A + 10 * MiB
    doc = json.loads((tmp_path / "memory.json").read_text())
    compared = {c["phase"]: c for c in doc["phases_compared"]}
    assert [p for p, c in compared.items() if c["underestimated"]] == ["backward"]
    assert compared["backward"] == {
        "phase": "backward",
        "measured_bytes": backward,
        "where": "step 2, lm_head + loss backward → backward layer 0",
        "moment": "last layer's backward",
        "estimated_bytes": 2 * GiB,
        "ratio": pytest.approx(2 * GiB / backward),
        "underestimated": True,
    }
    flag = (
        "backward under-estimated: measured 2.76 GiB (step 2, lm_head + loss backward → backward layer 0), "
        "estimated 2.00 GiB (last layer's backward); estimate / measured = 0.72: the estimate is 28% below the measurement"
    )
    md = (tmp_path / "memory_report.md").read_text()
    assert "| backward | 2.76 GiB | 2.00 GiB | last layer's backward 2.00 GiB | 0.72 ⚠ under-estimated |" in md
    assert "| optimizer | 2.19 GiB | 2.18 GiB | optimizer step 2.18 GiB | 0.99 |" in md
    assert "## Under-estimated phases (measured more than 10% above the estimate)" in md and f"- {flag}\n" in md
    assert f"<li>{html.escape(flag)}</li>" in page.read_text()
    assert summary_lines(page) == [
        "peak: estimate / measured = 1.02: the estimate is 2% above the measurement (on the safe side)",
        flag,
    ]


def test_report_without_estimate(tmp_path):
    samples = two_steps()
    page = write_report(tmp_path, samples, None, {"device": "cpu"})
    doc = json.loads((tmp_path / "memory.json").read_text())
    assert doc["estimate"] is None and doc["ratio_estimate_over_measured"] is None
    assert all((tmp_path / name).is_file() for name in FILES) and page.is_file()
    md = (tmp_path / "memory_report.md").read_text()
    assert "| category | measured |" in md and "| transient | 1.00 GiB |" in md and "ratio" not in md
    assert doc["phases_compared"] == [] and summary_lines(page) == []


def test_small_runs_use_mib(tmp_path):
    small = [
        sample(1, "forward", "embeddings", 0.0, weights=3 * MiB),
        sample(1, "backward", "x", 1.0, MiB, weights=3 * MiB),
    ]
    write_report(tmp_path, small, None, {})
    assert "4.00 MiB" in (tmp_path / "memory_report.md").read_text()


def test_report_of_real_profiled_steps(tmp_path):
    from qtrain.estimate import Workload, estimate
    from qtrain.lora import LoRASpec
    from qtrain.memprof import MemoryProfiler
    from qtrain.model import load_model
    from qtrain.tiny import build_tiny_model
    from qtrain.train import train_step

    torch.manual_seed(0)
    path = build_tiny_model(
        tmp_path / "m", hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4, num_kv_heads=2
    )
    spec = LoRASpec(rank=4)
    loaded = load_model(str(path), spec, compute_dtype=torch.float32)
    model = loaded.model
    enable_checkpointing(model)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    ids = torch.randint(4, loaded.config.vocab_size, (2, 32))
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones(2, 32, dtype=torch.long)}
    prof = MemoryProfiler(model, optimizer, torch.device("cpu"))
    for n in (1, 2):
        with prof.step(n):
            train_step(model, [batch], optimizer, trainable, 1.0, "cpu", None, on_phase=prof.phase, loss_chunk=0)
    samples = prof.samples()
    prof.detach()
    w = Workload(
        batch_size=2, seq_len=32, dtype=torch.float32, backend="torch", device="cpu", optimizer="adamw", loss_chunk=0
    )
    est = estimate(loaded.config, spec, w)

    page = write_report(tmp_path / "r", samples, est, {"title": "tiny", "torch": torch.__version__})
    doc = json.loads((tmp_path / "r" / "memory.json").read_text())
    assert page.is_file() and {s["step"] for s in doc["samples"]} == {1, 2}
    assert doc["measured"]["peak_bytes"] == max(s.peak for s in samples) > 0
    assert doc["ratio_estimate_over_measured"] == pytest.approx(est.peak / max(s.peak for s in samples))
    assert len(doc["samples"]) == len(samples)
    peak_line = next(
        line for line in timeline_figure(samples, est, "t").axes[0].lines if line.get_label() == "peak in interval"
    )
    assert len(peak_line.get_xdata()) == len(samples)
