"""Gemma-2 and Gemma-3 text models end to end, on tiny random checkpoints built from their own config
classes (`qtrain.tiny`: tied, sqrt(D)-scaled embeddings, (1 + w) RMSNorms, GeGLU, local layers with a
16-token window, Gemma-2's soft-capping, Gemma-3's q/k norms).

What qtrain must keep right for them: the loader (bit-identical logits to transformers), the final logit
soft cap in qtrain's own loss (it runs lm_head itself), the stock modules (no Llama-style fused swap, and
an estimate that counts none), and `qtrain train` -> `qtrain generate` -> `qtrain merge` -> PEFT loading
the adapter with equal logits and equal greedy completions. The 20-step loss parity with transformers +
bitsandbytes + PEFT is tests/qtrain/test_parity.py's, parametrized by the registry (`qtrain.families`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from qtrain.cli import main
from qtrain.config import load_config
from qtrain.data import Example, alpaca_prompt
from qtrain.estimate import fused_groups, workload_for
from qtrain.evaluate import generate
from qtrain.families import fused_support
from qtrain.fused import FusedOps, apply_fused_ops
from qtrain.generate import load_for_inference
from qtrain.model import load_base
from qtrain.tiny import tiny_config
from qtrain.train import eval_loss, loss_sum

peft = pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

ARCHS = ["gemma2", "gemma3_text"]
SHAPE = {"hidden_size": 64, "intermediate_size": 192, "num_layers": 2}
REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
FP32_TOL = {"rtol": 1e-4, "atol": 1e-4}
PROMPTS = ["Which letter comes next in the alphabet?", "Is this number even or odd?"]


def tiny_train(arch: str, out: Path) -> list[str]:
    """The quickstart on a tiny `arch` for a few steps (the adapter must move away from B = 0)."""
    return [
        str(QUICKSTART),
        f"model.tiny.arch={arch}",
        *(f"model.tiny.{k}={v}" for k, v in SHAPE.items()),
        "train.max_steps=6",
        "train.batch_size=4",
        "train.lr=1e-2",
        "data.num_train=32",
        "data.num_eval=8",
        "eval.exact_match=false",
        f"output_dir={out}",
    ]


def ids_batch(vocab: int = 100, rows: int = 2, length: int = 48) -> dict:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(4, vocab, (rows, length), generator=g)
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def hf_logits(model, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()


# ---- loading and the loss ----


@pytest.mark.parametrize("arch", ARCHS)
def test_loads_bit_identical_to_transformers(tiny_checkpoint, arch):
    path = tiny_checkpoint(arch, **SHAPE)
    ours = load_base(str(path), torch.float32, quantize=False).model.eval()
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert ours.lm_head.weight is ours.get_input_embeddings().weight  # tied, one tensor
    assert float(ours.get_input_embeddings().embed_scale) == SHAPE["hidden_size"] ** 0.5  # scaled embeddings kept
    layer_types = ours.config.layer_types
    assert "sliding_attention" in layer_types and "full_attention" in layer_types
    if arch == "gemma2":  # sdpa cannot soft-cap attention scores: transformers runs Gemma-2 eagerly
        assert ours.config._attn_implementation == "eager"
    batch = ids_batch()
    assert torch.equal(hf_logits(ours, batch), hf_logits(ref, batch))


@pytest.fixture(scope="module")
def capped(tmp_path_factory):
    """A Gemma-2 whose logits go well past its final soft cap (large weights, cap 2)."""
    from qtrain.tiny import build_tiny_model

    path = tmp_path_factory.mktemp("capped")
    return build_tiny_model(path, "gemma2", initializer_range=0.2, final_logit_softcapping=2.0, **SHAPE)


@pytest.mark.parametrize("chunk", [None, 16, 0], ids=lambda c: f"chunk{c}")
def test_loss_applies_the_final_logit_soft_cap(capped, chunk):
    ours = load_base(str(capped), torch.float32, quantize=False).model
    ref = AutoModelForCausalLM.from_pretrained(capped, dtype=torch.float32)
    batch = ids_batch()
    targets = int((batch["labels"][:, 1:] != -100).sum())
    with torch.no_grad():
        raw = ours.lm_head(ours.get_decoder()(input_ids=batch["input_ids"]).last_hidden_state)
        expected = ref(**batch).loss.item()
        got = loss_sum(ours, batch, chunk=chunk).item() / targets
    assert raw.abs().max() > 4 * ours.config.final_logit_softcapping  # the cap binds: the test can fail
    uncapped = torch.nn.functional.cross_entropy(raw[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten()).item()
    assert abs(uncapped - expected) > 0.5
    assert got == pytest.approx(expected, abs=1e-5)


def test_eval_loss_matches_transformers(capped):
    ours = load_base(str(capped), torch.float32, quantize=False).model
    ref = AutoModelForCausalLM.from_pretrained(capped, dtype=torch.float32)
    batch = ids_batch(rows=1)
    example = Example(batch["input_ids"][0].tolist(), batch["labels"][0].tolist())
    with torch.no_grad():
        expected = ref(**batch).loss.item()
    assert eval_loss(ours, [example], 1, 0, "cpu") == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_rows_are_separate_rows(tiny_checkpoint, arch):
    """Packed batches (position_ids restarting per row, no mask): transformers' Gemma masks, local
    window included, keep the rows apart, so the loss is the rows' losses summed."""
    path = tiny_checkpoint(arch, initializer_range=0.2, **SHAPE)
    model = load_base(str(path), torch.float32, quantize=False).model
    rows = [ids_batch(rows=1, length=40)["input_ids"], ids_batch(rows=1, length=30)["input_ids"] + 1]
    ids = torch.cat(rows, 1)
    labels = ids.clone()
    labels[0, 40] = -100  # the second row's first token is not predicted from the first row
    positions = torch.cat([torch.arange(40), torch.arange(30)])[None]
    with torch.no_grad():
        packed = loss_sum(model, {"input_ids": ids, "labels": labels, "position_ids": positions}).item()
        separate = sum(loss_sum(model, {"input_ids": r, "labels": r.clone(), "attention_mask": torch.ones_like(r)}).item() for r in rows)
    assert packed == pytest.approx(separate, rel=1e-5)


# ---- fused modules: Gemma keeps transformers' own, and the estimate counts none ----


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_swap_keeps_gemmas_stock_modules(tiny_checkpoint, arch):
    path = tiny_checkpoint(arch, **SHAPE)
    model = load_base(str(path), torch.float32, quantize=False).model
    before = {n: type(m) for n, m in model.named_modules()}
    swapped = apply_fused_ops(model, FusedOps(enabled="on"))
    assert list(swapped) == [] and f"{arch!r} keeps the stock modules" in swapped.skipped["model"]
    assert {n: type(m) for n, m in model.named_modules()} == before


@pytest.mark.parametrize("arch", ARCHS)
def test_estimate_counts_no_fused_ops_for_gemma(arch):
    assert fused_support(tiny_config(arch)) == ()
    assert fused_groups(FusedOps(), "cuda", "triton", (), tiny_config(arch)) == ()
    assert fused_groups(FusedOps(), "cuda", "triton", (), tiny_config("llama")) != ()  # the same call counts Llama's
    cfg = load_config(QUICKSTART, [f"model.tiny.arch={arch}", "data.packing=true"])
    w = workload_for(cfg, "cuda")
    assert w.fused == () and w.attention_mask  # no varlen path: packed rows carry a mask


# ---- train -> generate -> merge -> PEFT ----


@pytest.fixture(scope="module", params=ARCHS)
def trained(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param) / "run"
    assert main(["train", *tiny_train(request.param, out)]) == 0
    return out


def test_train_generate_merge_and_peft(trained, tmp_path, capsys, bnb_exact):
    adapter, base = trained / "adapter", trained / "base"
    model, tokenizer, _ = load_for_inference(adapter, device="cpu", dtype="fp32")
    base_only = load_for_inference(adapter, device="cpu", dtype="fp32", base_only=True)[0]
    batch = ids_batch()
    ours = hf_logits(model, batch)
    assert (ours - hf_logits(base_only, batch)).abs().max() > 1e-3  # training moved the adapter

    # PEFT loads our adapter onto transformers + bitsandbytes: the same logits, the same greedy text
    from transformers import BitsAndBytesConfig

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    hf = bnb_exact(AutoModelForCausalLM.from_pretrained(base, quantization_config=bnb, dtype=torch.float32, device_map="cpu"))
    ref = peft.PeftModel.from_pretrained(hf, adapter).eval()
    torch.testing.assert_close(hf_logits(ref, batch), ours, **FP32_TOL)
    expected = generate(ref, AutoTokenizer.from_pretrained(base), [alpaca_prompt({"instruction": p, "input": ""}) for p in PROMPTS], 8)
    capsys.readouterr()
    argv = ["generate", "--adapter", str(adapter), "--device", "cpu", "--dtype", "fp32", "--max-new-tokens", "8", "--json"]
    assert main([*argv, *[a for p in PROMPTS for a in ("--prompt", p)]]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["completion"] for r in rows] == expected
    assert any(expected)  # something was generated

    # merged checkpoint (NF4 base + adapter, fp32): transformers alone computes what qtrain trained
    merged = tmp_path / "merged"
    assert main(["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(merged), "--dtype", "fp32"]) == 0
    merged_model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    assert merged_model.lm_head.weight is merged_model.get_input_embeddings().weight  # still tied
    torch.testing.assert_close(hf_logits(merged_model, batch), ours, **FP32_TOL)
