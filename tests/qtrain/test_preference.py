"""qtrain.preference and qtrain.preference_data: chunked log-probs, the reference switch, the data
rows and their errors, the config's refusals, and the recipe's preference runs (reward metrics,
bit-exact resume). Parity with TRL is tests/qtrain/test_preference_parity.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qtrain.config import ConfigError, PreferenceConfig, load_config
from qtrain.preference import adapter_switched_off, token_logps
from qtrain.preference_data import PreferenceBatches, collate_pairs, load_preference_data, pair_example
from qtrain.train import Interrupted, train

REPO = Path(__file__).resolve().parents[2]
QUICKSTART_DPO = REPO / "configs" / "quickstart-dpo.yaml"
COMMON = [  # a tiny model, dropout on (the RNG state matters on resume), a few steps
    "model.tiny.hidden_size=64",
    "model.tiny.intermediate_size=192",
    "model.tiny.num_layers=2",
    "train.batch_size=4",
    "train.warmup_steps=2",
    "train.max_steps=6",
    "lora.dropout=0.1",
    "data.num_train=16",
    "data.num_eval=8",
    "data.max_length=96",
    "eval.every=0",
    "checkpoint.every=0",
    "log.tensorboard=false",
    "log.plot=false",
    "train.threads=1",
]


# ---- log-probs without the full logits ----


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_token_logps_match_log_softmax_and_its_gradient(softcap):
    torch.manual_seed(0)
    hidden = torch.randn(2, 9, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (2, 9))
    labels[0, :3] = labels[1, 7:] = -100  # a prompt and padding
    ours = token_logps(hidden.float(), weight.float(), labels, chunk=4, softcap=softcap)  # 3 chunks of 4 labelled rows
    logits = hidden @ weight.T
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    full = logits.log_softmax(-1).gather(2, labels.clamp(min=0)[..., None]).squeeze(2) * (labels != -100)
    torch.testing.assert_close(ours.double(), full, atol=1e-5, rtol=1e-5)
    g = torch.randn(2, 9, dtype=torch.float64)
    grads = torch.autograd.grad((ours.double() * g).sum(), (hidden, weight))
    expected = torch.autograd.grad((full * g).sum(), (hidden, weight))
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


# ---- the reference: adapter switched off ----


def test_reference_is_the_base_and_the_adapter_comes_back(tiny_checkpoint):
    from qtrain.lora import LoRASpec
    from qtrain.methods import IA3
    from qtrain.methods.lora import LoRA
    from qtrain.model import load_model

    path = tiny_checkpoint("llama", hidden_size=64, intermediate_size=192, num_layers=2)
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    base = load_model(str(path), LoRASpec(rank=0), compute_dtype=torch.float32).model
    adapted = load_model(str(path), LoRASpec(rank=4, dropout=0.1), compute_dtype=torch.float32).model.eval()  # no dropout: comparable outputs
    with torch.no_grad():
        for n, p in adapted.named_parameters():
            if ".lora_b." in n:
                p.normal_()
        want, before = base(ids).logits, adapted(ids).logits
        with adapter_switched_off(adapted, [LoRA()]):
            off = adapted(ids).logits
        after = adapted(ids).logits
    torch.testing.assert_close(off, want, atol=1e-5, rtol=1e-5)
    assert (before - want).abs().max() > 1e-2  # the adapter does change the output
    torch.testing.assert_close(after, before)
    with pytest.raises(ValueError, match="method ia3 cannot be switched off"):
        with adapter_switched_off(adapted, [IA3()]):
            pass


# ---- data ----


def _write(path: Path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_pairs_share_the_prompt_and_bad_rows_are_named(tiny_checkpoint, tmp_path):
    from transformers import AutoTokenizer

    from qtrain.config import DataConfig

    tok = AutoTokenizer.from_pretrained(tiny_checkpoint("llama", hidden_size=64, intermediate_size=192, num_layers=2))
    good = {"prompt": "Is 12 even?", "chosen": " yes", "rejected": " no, it is odd"}
    rows = [good, {"prompt": "x", "chosen": "y"}, "{not json", good]
    cfg = DataConfig(train=_write(tmp_path / "pairs.jsonl", rows), eval_fraction=0.0)
    with pytest.raises(ValueError, match=r"pairs.jsonl: 2 malformed rows \(first at .*pairs.jsonl:2: missing 'rejected'"):
        load_preference_data(cfg, tok, "dpo")
    cfg.bad_rows = "skip"
    train_ds, _ = load_preference_data(cfg, tok, "dpo")
    assert len(train_ds.examples) == 2 and len(train_ds.skipped) == 2
    batch = collate_pairs(train_ds.examples, tok.pad_token_id)
    p = len(train_ds.examples[0].prompt_ids)
    assert int(batch["pairs"]) == 2 and batch["input_ids"].shape[0] == 4  # chosen rows, then rejected rows
    assert torch.equal(batch["input_ids"][0, :p], batch["input_ids"][2, :p])  # one prompt tokenisation
    assert (batch["labels"][:, :p] == -100).all() and (batch["labels"][0, p:] != -100).sum() == len(train_ds.examples[0].chosen_ids)
    assert train_ds.examples[0].chosen_ids[-1] == tok.eos_token_id


def test_chat_pairs_render_with_the_template(tiny_checkpoint):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_checkpoint("llama", hidden_size=64, intermediate_size=192, num_layers=2))
    row = {"prompt": [{"role": "user", "content": "Is 12 even?"}], "chosen": [{"role": "assistant", "content": "yes"}], "rejected": "no"}
    example, rendered = pair_example(tok, row, 128)
    head = tok.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
    assert example.prompt_ids == tok(head, add_special_tokens=False)["input_ids"]
    assert "yes" in tok.decode(example.chosen_ids) and "no" in tok.decode(example.rejected_ids)
    assert rendered.answer == "yes"
    with pytest.raises(ValueError, match="'chosen' must be a string"):
        pair_example(tok, row | {"chosen": 3}, 128)


def test_config_refuses_packing_and_methods_without_an_off_switch():
    assert "data.packing: objective=dpo" in _error(["objective=dpo", "data.packing=true"])
    assert "method: ia3 cannot be switched off" in _error(["objective=dpo", "method=ia3"])
    assert "preference.label_smoothing" in _error(["objective=dpo", "preference.label_smoothing=0.5"])
    assert "preference.reference_free: only for objective=dpo" in _error(["objective=kto", "preference.reference_free=true"])
    load_config(QUICKSTART_DPO, ["objective=orpo", "method=ia3"])  # no reference: any method
    with pytest.raises(ValueError, match="data.packing"):
        PreferenceBatches([], 2, 0, 0, "pack")


def _error(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(QUICKSTART_DPO, overrides)
    return str(info.value)


# ---- the recipe ----


def config(out: Path, *overrides: str):
    return load_config(QUICKSTART_DPO, [*COMMON, f"output_dir={out}", *overrides])


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("objective", ["dpo", "orpo", "simpo", "kto"])
def test_each_objective_trains_and_logs_its_rewards(tmp_path, objective, capsys):
    result = train(config(tmp_path / objective, f"objective={objective}", "train.max_steps=3", "log.progress_seconds=0.001"))
    steps = [r for r in records(tmp_path / objective) if "loss" in r and "eval_loss" not in r]
    assert len(steps) == 3 and all({"rewards_chosen", "rewards_rejected", "rewards_margins", "rewards_accuracy"} <= set(r) for r in steps)
    assert all(r["loss"] == r["loss"] for r in steps)  # finite
    assert "eval_rewards_accuracy" in result
    assert "reward acc" in capsys.readouterr().out  # the progress line


def test_dpo_stop_and_resume_equals_straight_run(tmp_path):
    straight = train(config(tmp_path / "straight"))
    out = tmp_path / "resumed"
    with pytest.raises(Interrupted):
        train(config(out), should_stop=lambda step: step == 3)
    resumed = train(config(out, "checkpoint.resume=auto"))

    def steps(d):
        return [(r["step"], r["loss"], r["rewards_margins"]) for r in records(d) if "rewards_margins" in r and "eval_loss" not in r]

    assert steps(tmp_path / "straight") == steps(out)
    a, b = load_file(Path(straight["adapter"]) / "adapter_model.safetensors"), load_file(Path(resumed["adapter"]) / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- memory: the estimate against a measured preference step ----

ESTIMATE_SETTINGS = [  # (objective, workload changes)
    ("dpo", {}),
    ("dpo", {"dtype": torch.float32}),
    ("orpo", {"gradient_checkpointing": False}),
    ("dpo", {"vocab": 8192}),
]


@pytest.mark.parametrize(("objective", "changes"), ESTIMATE_SETTINGS, ids=lambda x: str(x))
def test_estimate_within_10_percent_of_a_measured_preference_step(tiny_checkpoint, objective, changes):
    from dataclasses import replace

    from qtrain.estimate import Workload, estimate
    from qtrain.lora import LoRASpec
    from qtrain.memprof import MemoryProfiler, peak_sample
    from qtrain.methods.lora import LoRA
    from qtrain.model import enable_checkpointing, load_model
    from qtrain.presets import resolve_config
    from qtrain.train import preference_step

    torch.set_num_threads(1)
    changes = dict(changes)
    vocab = changes.pop("vocab", 1024)
    path = tiny_checkpoint("llama", hidden_size=192, intermediate_size=512, num_layers=3, num_heads=6, num_kv_heads=2, vocab_size=vocab)
    w = replace(Workload(batch_size=2, seq_len=128, dtype=torch.bfloat16, backend="torch", optimizer="adamw", device="cpu", objective=objective), **changes)
    spec = LoRASpec(rank=8)
    model = load_model(str(path), spec, compute_dtype=w.dtype, backend="torch").model
    if w.gradient_checkpointing:
        enable_checkpointing(model)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, vocab, (2 * w.batch_size, w.seq_len), generator=g)  # B pairs: 2B rows
    labels = ids.clone()
    labels[:, : w.seq_len // 2] = -100  # the prompt half
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids), "pairs": torch.tensor(w.batch_size)}
    autocast = torch.autocast("cpu", dtype=w.dtype) if w.dtype != torch.float32 else None
    args = (model, [batch], optimizer, trainable, 1.0, "cpu", objective, PreferenceConfig(), autocast)
    preference_step(*args, methods=[LoRA()])  # creates the optimizer state
    profiler = MemoryProfiler(model, optimizer, torch.device("cpu"))
    with profiler.step(2):
        preference_step(*args, on_phase=profiler.phase, methods=[LoRA()])
    samples = profiler.samples()
    profiler.detach()
    est = estimate(resolve_config(str(path)), spec, w)
    peak = peak_sample(samples)
    print(f"{objective} {changes}: estimate / measured = {est.peak / peak.peak:.3f}")
    assert abs(est.peak / peak.peak - 1) < 0.10, (est.peak, peak.peak, est.phases)


def test_precomputed_reference_is_cached_and_gives_the_same_run(tmp_path):
    on_the_fly = train(config(tmp_path / "fly", "lora.dropout=0.0"))
    out = tmp_path / "pre"
    with pytest.raises(Interrupted):
        train(config(out, "lora.dropout=0.0", "preference.precompute_reference=true"), should_stop=lambda step: step == 3)
    cache = out / "reference_logps.safetensors"
    ref = load_file(cache)["ref_logps"]
    assert ref.shape == (16, 2) and (ref < 0).all()  # log-probs of (chosen, rejected), one row per train pair
    written = cache.stat().st_mtime_ns
    pre = train(config(out, "lora.dropout=0.0", "preference.precompute_reference=true", "checkpoint.resume=auto"))
    assert cache.stat().st_mtime_ns == written  # the resumed run read it back
    fly = [r["loss"] for r in records(tmp_path / "fly") if "rewards_margins" in r and "eval_loss" not in r]
    got = [r["loss"] for r in records(out) if "rewards_margins" in r and "eval_loss" not in r]
    assert got == pytest.approx(fly, abs=1e-5)  # the same reference, batched differently
    assert pre["eval_rewards_accuracy"] == pytest.approx(on_the_fly["eval_rewards_accuracy"])


def test_the_adapter_records_how_generate_renders_prompts(tmp_path):
    result = train(config(tmp_path / "run", "train.max_steps=1"))
    info = json.loads((Path(result["adapter"]) / "qtrain.json").read_text())
    assert info["data_format"] == "alpaca"  # the synthetic pairs' prompts are alpaca prompts
