"""qtrain.train: a short real QLoRA run, gradient accumulation, the loss, the LR schedule, devices."""

from __future__ import annotations

import json
import math
import re
from itertools import islice
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from qtrain.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, TRAINING_INFO, load_adapter_weights, read_adapter_config
from qtrain.config import Config, ConfigError, load_config
from qtrain.data import IGNORE_INDEX, batches, synthetic_split, tokenize_row
from qtrain.lora import LoRASpec, lora_modules
from qtrain.model import load_model
from qtrain.optim import lr_lambda
from qtrain.tiny import char_tokenizer
from qtrain.train import causal_lm_loss_sum, pick_device, train

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
ASSET = REPO / "tests" / "assets" / "alpaca_tiny.jsonl"
# the quickstart recipe on a smaller model (hidden 64, 2 layers): ~1 s of training on 2 cores
SMALL = [
    "model.tiny.hidden_size=64",
    "model.tiny.intermediate_size=192",
    "model.tiny.num_layers=2",
    "train.batch_size=8",
    "train.warmup_steps=5",
    "train.log_every=10",
    "data.max_length=128",
]


def train_losses(out: Path) -> list[float]:
    """The per-step train losses of a run's metrics.jsonl (eval records skipped)."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [m["loss"] for m in records if "loss" in m]


def run(tmp: Path, *overrides: str) -> tuple[dict, Config]:
    cfg = load_config(QUICKSTART, [*SMALL, f"output_dir={tmp}", *overrides])
    return train(cfg), cfg


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quick_run")
    result, cfg = run(out, "train.max_steps=30", "data.num_train=200", "data.num_eval=20", "eval.max_new_tokens=4")
    return out, result, cfg


def test_short_run_learns(quick_run):
    out, result, _ = quick_run
    assert result["steps"] == 30
    # mean of the first 10 steps vs the last 10: measured 4.04 -> 3.06 (lr 3e-3, 30 steps)
    assert result["loss_last"] < 0.9 * result["loss_first"]
    # rank 16 on all 7 linears (q, k, v, o, gate, up, down) of 2 layers: 16 * (in + out) each
    shapes = [(64, 64), (64, 32), (64, 32), (64, 64), (64, 192), (64, 192), (192, 64)]
    assert result["trainable_params"] == 2 * sum(16 * (i + o) for i, o in shapes)
    assert 0.0 <= result["exact_match_before"] <= 1.0 and 0.0 <= result["exact_match_after"] <= 1.0
    assert json.loads((out / "result.json").read_text()) == result
    assert json.loads((out / "config.json").read_text())["train"]["max_steps"] == 30
    base_cfg = json.loads((out / "base" / "config.json").read_text())  # the tiny model was built there
    assert (base_cfg["hidden_size"], base_cfg["num_hidden_layers"]) == (64, 2)


def test_metrics_one_line_per_step(quick_run):
    out, result, cfg = quick_run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lines = [m for m in records if "loss" in m]
    assert [m["step"] for m in lines] == list(range(1, 31))
    # one eval record at the end (eval.every=0), with the loss and perplexity of the eval rows
    (final,) = [m for m in records if "eval_loss" in m]
    assert final["step"] == 30 and final["eval_ppl"] == pytest.approx(math.exp(final["eval_loss"]))
    assert all(math.isfinite(m["loss"]) and m["loss"] > 0 and m["tokens_per_s"] > 0 for m in lines)
    losses = [m["loss"] for m in lines]
    assert result["loss_first"] == pytest.approx(sum(losses[:10]) / 10)
    assert result["loss_last"] == pytest.approx(sum(losses[-10:]) / 10)
    f = lr_lambda(cfg.train.warmup_steps, cfg.train.max_steps, cfg.train.schedule)  # the lr logged after step k is the one step k+1 will use: lr * f(k)
    assert [m["lr"] for m in lines] == pytest.approx([cfg.train.lr * f(k) for k in range(1, 31)], rel=1e-9)


def test_run_adapter_loads(quick_run):
    out, result, _ = quick_run
    adapter = Path(result["adapter"])
    assert adapter == out / "adapter"
    assert sorted(p.name for p in adapter.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS, TRAINING_INFO]
    assert json.loads((adapter / TRAINING_INFO).read_text()) == {
        "base_dtype": "float32",
        "quantized": True,
        "data_format": "alpaca",
        "base_model_name_or_path": str(out / "base"),
    }
    spec = read_adapter_config(adapter)
    assert (spec.rank, spec.alpha) == (16, 32.0)
    loaded = load_model(str(out / "base"), spec, compute_dtype=torch.float32)
    load_adapter_weights(loaded.model, adapter)
    assert all(m.lora_b.weight.abs().max() > 0 for m in lora_modules(loaded.model).values())  # trained
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "base"), adapter)
    assert len([m for m in model.modules() if hasattr(m, "lora_A") and "default" in m.lora_A]) == 14


def test_init_from_starts_from_the_adapter(quick_run, tmp_path):
    out, result, _ = quick_run
    # lora.rank=2 is overridden by the adapter's own r=16; the tiny base is rebuilt identically (seeded)
    again, _ = run(
        tmp_path,
        "train.max_steps=1",
        "data.num_train=200",
        "data.num_eval=20",
        "eval.max_new_tokens=4",
        "lora.rank=2",
        f"lora.init_from={out / 'adapter'}",
    )
    assert again["trainable_params"] == result["trainable_params"]
    assert again["exact_match_before"] == result["exact_match_after"]  # the trained adapter, before any step
    first, resumed = train_losses(out)[0], train_losses(tmp_path)[0]
    assert resumed < first - 0.5  # same first batch; trained vs fresh adapter: measured 2.9 vs 5.0


def test_jsonl_data_and_unquantized_base(tmp_path):
    result, _ = run(
        tmp_path, "train.max_steps=3", f"data.train={ASSET}", "model.quantize=false", "eval.max_new_tokens=2"
    )
    assert result["steps"] == 3 and "exact_match_after" in result  # 2 of the 40 asset rows held out
    assert len(train_losses(tmp_path)) == 3


def test_fewer_rows_than_batch_size(tmp_path):
    with pytest.raises(ValueError, match=r"train\.batch_size=8"):
        run(tmp_path, "data.num_train=5", "eval.exact_match=false")


# ---- gradient accumulation -------------------------------------------------------------------


def capture_grads(monkeypatch) -> list[list[torch.Tensor]]:
    """Swap the recipe's AdamW for SGD that records the (accumulated) gradients at each step."""
    steps: list[list[torch.Tensor]] = []

    class Recording(torch.optim.SGD):
        def __init__(self, params):  # param groups carry lr and weight_decay
            super().__init__(params)

        def step(self, closure=None):
            steps.append([p.grad.detach().clone() for g in self.param_groups for p in g["params"]])
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "AdamW", Recording)
    return steps


def test_grad_accum_matches_one_big_batch(tmp_path, monkeypatch):
    common = ["train.max_steps=1", "train.max_grad_norm=0", "eval.exact_match=false", "data.num_train=64"]
    # the two micro-batches must have different numbers of target tokens, or a per-micro-batch mean
    # would give the same gradient as the correct per-step normalisation
    tok = char_tokenizer()
    rows, _ = synthetic_split(64, 100, 1234)
    examples = [tokenize_row(tok, r, 128) for r in rows]
    micro = list(islice(batches(examples, 4, tok.pad_token_id, 1234), 2))
    counts = [int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro]
    assert counts[0] != counts[1]

    grads = capture_grads(monkeypatch)
    run(tmp_path / "big", *common, "train.batch_size=8", "train.grad_accum=1")
    run(tmp_path / "accum", *common, "train.batch_size=4", "train.grad_accum=2")
    assert len(grads) == 2 and len(grads[0]) == len(grads[1]) == 14 * 2
    for big, acc in zip(*grads):
        # same 8 rows, same fp32 model; padding to 4-row vs 8-row widths and the summation order
        # change rounding only: gradients agree to ~1e-7 relative
        torch.testing.assert_close(acc, big, rtol=1e-4, atol=1e-7)
    assert any(g.abs().max() > 1e-4 for g in grads[0])  # non-trivial gradients
    (big_loss,), (acc_loss,) = train_losses(tmp_path / "big"), train_losses(tmp_path / "accum")
    assert acc_loss == pytest.approx(big_loss, rel=1e-5)  # the logged step loss is the full-batch mean


def test_causal_lm_loss_sum_against_transformers(tiny_checkpoint):
    loaded = load_model(str(tiny_checkpoint("llama")), LoRASpec(rank=2), compute_dtype=torch.float32)
    x = torch.randint(4, 100, (3, 12), generator=torch.Generator().manual_seed(0))
    labels = x.clone()
    labels[:, :5] = IGNORE_INDEX  # a prompt
    labels[2, 9:] = IGNORE_INDEX  # padding
    with torch.no_grad():
        out = loaded.model(x, labels=labels)
    n_targets = int((labels[:, 1:] != IGNORE_INDEX).sum())
    assert n_targets == 7 + 7 + 4
    got = causal_lm_loss_sum(out.logits, labels)
    # transformers' loss is the mean over the same shifted targets
    torch.testing.assert_close(got / n_targets, out.loss, rtol=1e-6, atol=0)
    manual = sum(
        F.cross_entropy(out.logits[b, t - 1], labels[b, t], reduction="sum")
        for b in range(3)
        for t in range(1, 12)
        if labels[b, t] != IGNORE_INDEX
    )
    torch.testing.assert_close(got, manual, rtol=1e-6, atol=0)


def test_causal_lm_loss_sum_upcasts_bf16_logits():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g).bfloat16()
    labels = torch.randint(0, 7, (2, 5), generator=g)
    got = causal_lm_loss_sum(logits, labels)
    assert got.dtype == torch.float32
    want = F.cross_entropy(logits.float()[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1), reduction="sum")
    torch.testing.assert_close(got, want)


# ---- devices ---------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without a CUDA GPU")
def test_cuda_without_gpu_raises():
    with pytest.raises(ValueError, match="device=cuda but no CUDA GPU"):
        pick_device("cuda")
    assert pick_device("auto") == torch.device("cpu")


def test_threads_key_is_checked():
    assert load_config(QUICKSTART, ["train.threads=2"]).train.threads == 2
    assert load_config(QUICKSTART).train.threads is None
    with pytest.raises(ConfigError, match=r"train.threads: must be >= 0, got -1"):
        load_config(QUICKSTART, ["train.threads=-1"])


def test_cpu_device():
    assert pick_device("cpu") == torch.device("cpu")


def test_nan_loss_stops_before_the_update(tiny_checkpoint):
    # a NaN loss must raise before optimizer.step, leaving the adapter at its last good values
    from qtrain.train import train_step

    loaded = load_model(str(tiny_checkpoint("llama")), LoRASpec(rank=2, alpha=4), compute_dtype=torch.float32)
    trainable = [p for p in loaded.model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    with torch.no_grad():  # poison the forward: NaN activations → NaN loss
        loaded.model.model.norm.weight.fill_(float("nan"))
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    batch = {
        "input_ids": torch.randint(0, 100, (2, 8)),
        "attention_mask": torch.ones(2, 8, dtype=torch.long),
        "labels": torch.randint(0, 100, (2, 8)),
    }
    with pytest.raises(FloatingPointError, match="loss is nan"):
        train_step(loaded.model, [batch], opt, trainable, 1.0, "cpu")
    assert all(torch.equal(a, b) for a, b in zip(before, trainable))


# ---- precision, determinism ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_autocast_runs_keep_fp32_adapters(tmp_path, dtype):
    # bf16/fp16 base and autocast on CPU; fp16 adds loss scaling (GradScaler), saved in checkpoints
    result, _ = run(
        tmp_path, "train.max_steps=4", "data.num_train=32", f"model.dtype={dtype}", "eval.exact_match=false",
        "log.tensorboard=false", "log.plot=false",
    )
    assert all(math.isfinite(x) for x in train_losses(tmp_path))
    tensors = load_file(tmp_path / "adapter" / ADAPTER_WEIGHTS)
    assert {t.dtype for t in tensors.values()} == {torch.float32}  # master weights stay fp32
    state = torch.load(Path(result["checkpoint"]) / "trainer_state.pt", weights_only=False)
    assert (state["scaler"] is not None) == (dtype == "fp16")


def test_same_seed_same_run_other_seed_other_run(tmp_path):
    common = ["train.max_steps=3", "data.num_train=32", "eval.exact_match=false", "lora.dropout=0.1", "log.plot=false"]
    run(tmp_path / "a", *common, "train.deterministic=true")
    run(tmp_path / "b", *common, "train.deterministic=true")
    run(tmp_path / "c", *common, "train.deterministic=true", "train.seed=7")
    assert train_losses(tmp_path / "a") == train_losses(tmp_path / "b")
    assert train_losses(tmp_path / "a") != train_losses(tmp_path / "c")


# ---- eval during training, logs, summary -----------------------------------------------------


def test_eval_every_n_steps_with_samples_tensorboard_and_plot(tmp_path):
    result, _ = run(
        tmp_path, "train.max_steps=4", "data.num_train=32", "data.num_eval=6", "eval.every=2",
        "eval.max_new_tokens=3", 'eval.samples=["Is this number even or odd?", {prompt: "Which letter comes next?", input: k}]',
    )
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert evals[-1]["eval_loss"] == pytest.approx(result["eval_loss"])
    assert all(r["peak_mem_gib"] > 0 and r["tokens_per_s"] > 0 for r in records if "loss" in r)
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [2, 2, 4, 4]
    assert samples[0]["text"].startswith("Is this number even or odd? → ")
    assert samples[1]["text"].startswith("Which letter comes next? | k → ")
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summary_table_is_printed(tmp_path, capsys):
    run(tmp_path, "train.max_steps=2", "data.num_train=16", "eval.exact_match=false", "log.plot=false")
    out = capsys.readouterr().out
    assert "run summary" in out and "loss_last" in out and "peak_mem_bytes" in out


# ---- CUDA out of memory ----------------------------------------------------------------------


def test_oom_reports_what_ran_and_what_to_try(tmp_path, monkeypatch):
    import qtrain.train as recipe

    real, calls = recipe.loss_sum, {"n": 0}

    def oom_at_step_2(model, batch, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, batch, *args, **kwargs)

    monkeypatch.setattr(recipe, "loss_sum", oom_at_step_2)
    with pytest.raises(recipe.OutOfMemory) as info:
        run(tmp_path, "train.max_steps=4", "data.num_train=32", "eval.exact_match=false", "data.max_length=512")
    msg = str(info.value)
    assert msg.startswith("CUDA out of memory at step 2: micro-batch 8 x ")
    assert "train.batch_size=4 train.grad_accum=2 (same effective batch)" in msg
    assert "train.offload_activations=true" in msg and "train.optimizer=paged_adamw_8bit" in msg
    assert "lora.rank=8" in msg
    assert re.search(r"\(est\. \d+\.\d GiB\)", msg)  # each with the estimated memory it needs


def test_oom_advice_for_a_lean_setup():
    from qtrain.tiny import tiny_config
    from qtrain.train import oom_advice

    cfg = load_config(QUICKSTART, ["train.batch_size=1", "train.offload_activations=true", "train.optimizer=paged_adamw_8bit", "lora.rank=8"])
    msg = oom_advice(cfg, 7, (1, 2048), torch.device("cpu"), tiny_config())
    assert "step 7: micro-batch 1 x 2048 tokens" in msg and "data.max_length=1024" in msg
    assert "batch_size=0" not in msg and "offload_activations" not in msg.split("Try")[1]


@pytest.mark.parametrize(
    "data, fmt",
    [("chat_tiny.jsonl", "chat"), ("sharegpt_tiny.jsonl", "chat"), ("prompt_completion_tiny.csv", "prompt_completion")],
)
def test_train_on_other_formats_with_packing(tmp_path, data, fmt):
    result, _ = run(
        tmp_path, "train.max_steps=2", "train.batch_size=1", f"data.train={REPO / 'tests' / 'assets' / data}",
        "data.packing=true", "data.max_length=256", "data.eval_fraction=0.3", "eval.max_new_tokens=2", "log.plot=false",
    )
    assert result["steps"] == 2 and math.isfinite(result["eval_loss"])
    assert 0.0 <= result["exact_match_after"] <= 1.0  # chat and completion rows have reference answers
    assert json.loads((tmp_path / "adapter" / TRAINING_INFO).read_text())["data_format"] == fmt


def test_skipped_rows_are_recorded_in_the_run(tmp_path):
    data = tmp_path / "rows.jsonl"
    good = ASSET.read_text().splitlines()
    data.write_text("\n".join([good[0], "{not json", good[1], '{"instruction": "x"}', *good[2:]]) + "\n")
    run(tmp_path / "run", f"data.train={data}", "data.bad_rows=skip", "train.max_steps=1", "eval.exact_match=false")
    records = [json.loads(line) for line in (tmp_path / "run" / "skipped_rows.jsonl").read_text().splitlines()]
    assert [r["where"] for r in records] == [f"{data}:2", f"{data}:4"]
    assert "not valid JSON" in records[0]["reason"] and "output" in records[1]["reason"]
