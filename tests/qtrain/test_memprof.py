"""qtrain.memprof and memory.SavedTensors: exact accounting of what a training step holds."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from qtrain.lora import LoRASpec
from qtrain.memory import OffloadActivations, SavedTensors
from qtrain.memprof import CATEGORIES, MemoryProfiler, cpu_peak_bytes, profiler_noise_filtered
from qtrain.model import enable_checkpointing, load_model
from qtrain.train import train_step

B, S = 2, 32


def test_saved_tensors_counts_distinct_storages_until_the_backward_frees_them():
    w = torch.nn.Parameter(torch.randn(16, 16))
    x = torch.randn(8, 16)
    saved = SavedTensors()
    with saved:
        h = x @ w  # saves x (the parameter w is not counted)
        y = (h * h).sum()  # saves h twice: one storage
    assert saved.bytes == x.numel() * 4 + h.numel() * 4
    y.backward()
    assert saved.bytes == 0


def test_offload_keep_counts_what_stays_on_the_device():
    x = torch.randn(8, 16, requires_grad=True)
    kept = SavedTensors()
    offload = OffloadActivations(devices=("cuda",), keep=kept)  # on CPU nothing moves: all is kept
    with offload:
        y = (x.exp() * 2).sum()
    assert kept.bytes == x.numel() * 4 and offload.count == 0  # exp saves its output
    y.backward()
    assert kept.bytes == 0 and torch.allclose(x.grad, 2 * x.exp())


def test_profiler_marks_phases_layers_and_accounts_every_category(tiny_checkpoint):
    path = tiny_checkpoint("llama", num_layers=3)
    model = load_model(str(path), LoRASpec(rank=4), compute_dtype=torch.float32).model
    enable_checkpointing(model)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable)
    ids = torch.randint(4, 100, (B, S))
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    profiler = MemoryProfiler(model, optimizer, torch.device("cpu"))
    for step in (1, 2):
        with profiler.step(step):
            train_step(model, [batch], optimizer, trainable, 1.0, "cpu", on_phase=profiler.phase)
    samples = profiler.samples()
    profiler.detach()
    step2 = [s for s in samples if s.step == 2]
    labels = [s.label for s in step2]
    assert labels[:5] == ["embeddings", "layer 0", "layer 1", "layer 2", "final norm"]
    assert labels.index("lm_head + loss") < labels.index("backward layer 2") < labels.index("backward layer 0")
    assert labels[-2:] == ["clip + step", "step done"]
    assert {s.phase for s in step2} == {"forward", "backward", "optimizer"}
    hidden = model.config.hidden_size
    by_label = {s.label: s for s in step2}
    # at the end of the decoder forward: 3 checkpointed layer inputs [B, S, D] fp32, plus the final
    # norm's input (the last layer's output) and its rsqrt
    acts = by_label["lm_head + loss"].parts["activations"]
    assert 3 * B * S * hidden * 4 <= acts <= 5 * B * S * hidden * 4
    assert by_label["step done"].parts["activations"] == 0
    adapters = sum(p.numel() * 4 for p in trainable)
    assert by_label["clip + step"].parts["gradients"] == adapters  # all gradients before the update
    assert by_label["embeddings"].parts["gradients"] == 0  # zero_grad(set_to_none) at the end of step 1
    assert by_label["embeddings"].parts["optimizer"] == 2 * adapters + 4 * len(trainable)  # two moments + step
    for s in samples:
        assert set(s.parts) == set(CATEGORIES) and s.peak >= s.current >= 0
        assert s.parts["other"] > -1024  # accounting never claims more than is allocated
    assert max(s.peak for s in step2) > by_label["lm_head + loss"].current  # the backward's recompute
    # the hooks are gone: another forward adds no marks
    model(input_ids=ids)
    assert len(profiler.samples()) == len(samples)


def test_cpu_peak_bytes_counts_what_fn_holds_at_once():
    kept = torch.ones(1 << 16)  # allocated before: not counted

    def fn():
        a = torch.empty(1 << 20, dtype=torch.uint8)  # 1 MiB
        b = torch.empty(3 << 20, dtype=torch.uint8)  # 3 MiB: 4 MiB at once
        del a, b
        c = torch.empty(2 << 20, dtype=torch.uint8)  # 2 MiB, after both were freed
        return c.numel()

    peak, result = cpu_peak_bytes(fn)
    assert result == 2 << 20 and peak == 4 << 20
    assert kept.sum() == 1 << 16


USDT = b"USDT:2026-12-02 16:12:02 4095:4095 SyncActivityProfilerHandler.cpp:52] profiler_start\n"
UNKNOWN_BLOCK = (
    b"[W1202 16:12:02.413988311 CPUAllocator.cpp:245] Memory block of unknown size was allocated before the "
    b"profiling started, profiler results will not include the deallocation event\n"
)


def test_profiler_noise_is_dropped_and_every_other_line_written_back(capfd, monkeypatch):
    monkeypatch.delenv("KINETO_LOG_LEVEL", raising=False)
    with pytest.raises(RuntimeError, match="boom"), profiler_noise_filtered():
        os.write(2, USDT + b"a real error from C++\n" + UNKNOWN_BLOCK + USDT.replace(b"start", b"stop"))
        print("a Python warning", file=sys.stderr)
        raise RuntimeError("boom")  # stderr is given back on the way out
    err = capfd.readouterr().err
    assert sorted(err.splitlines()) == ["a Python warning", "a real error from C++"]
    os.write(2, USDT)
    assert capfd.readouterr().err == USDT.decode()  # restored: outside the block nothing is filtered


def test_profiler_noise_stays_when_kinetos_log_is_asked_for(capfd, monkeypatch):
    monkeypatch.setenv("KINETO_LOG_LEVEL", "0")
    with profiler_noise_filtered():
        os.write(2, USDT)
    assert capfd.readouterr().err == USDT.decode()
