"""The family registry (qtrain.families) against what runs: per family, `qtrain train` -> `generate` ->
`merge` -> PEFT loads the adapter with equal logits; the fused ops the estimator counts are the
ones the swap applies; the loader's generic path and refusals; the README table is the registry.
(The 20-step loss parity per family is tests/qtrain/test_parity.py, parametrized by the registry.)"""

from __future__ import annotations

import json
import logging
import typing
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from qtrain.cli import main
from qtrain.config import TinyModelConfig
from qtrain.estimate import fused_groups
from qtrain.families import FAMILIES, fused_support, markdown_table
from qtrain.fused import FusedOps, apply_fused_ops
from qtrain.generate import load_for_inference
from qtrain.model import load_base, load_model
from qtrain.tiny import ARCHITECTURES, build_tiny_model, tiny_config

peft = pytest.importorskip("peft")

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
SHAPES = {"hidden_size": 64, "intermediate_size": 192, "num_layers": 2}  # multiples of 64 (bnb's CPU dequantize)
TINY = [f"model.tiny.{k}={v}" for k, v in SHAPES.items()] + [
    "train.max_steps=3", "train.batch_size=4", "data.num_train=16", "eval.exact_match=false", "lora.rank=4",
]  # fmt: skip
TESTED = {test: [t for t, f in FAMILIES.items() if test in f.tested] for test in ("train", "peft", "fused")}


def ids(batch: int = 2, length: int = 11, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model, x: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(ids() if x is None else x).logits.float()


# ---- the registry is what the rest of qtrain and the README say ----


def test_registry_is_the_tiny_archs_and_the_config_choices():
    assert list(ARCHITECTURES) == list(FAMILIES)
    assert typing.get_args(typing.get_type_hints(TinyModelConfig)["arch"]) == tuple(FAMILIES)
    for model_type in FAMILIES:  # each family's tiny model is built from its own config class
        assert tiny_config(model_type).model_type == model_type


def test_readme_table_is_the_registry():
    readme = (REPO / "README.md").read_text()
    assert markdown_table() in readme, "README's 'Supported models' table: paste qtrain.families.markdown_table()"


# ---- per family: train -> generate -> merge -> PEFT ----


@pytest.mark.parametrize("arch", TESTED["train"])
def test_train_generate_merge_and_peft_loads_the_adapter(arch, tmp_path, capsys, bnb_exact, nf4_experts_into):
    out = tmp_path / "run"
    assert main(["train", str(QUICKSTART), *TINY, f"model.tiny.arch={arch}", f"output_dir={out}"]) == 0
    adapter, base = out / "adapter", out / "base"
    targets = json.loads((adapter / "adapter_config.json").read_text())["target_modules"]
    assert sorted(targets) == sorted(FAMILIES[arch].targets)  # all-linear = the names PEFT uses
    capsys.readouterr()
    assert main(["generate", "--adapter", str(adapter), "--prompt", "hi", "--max-new-tokens", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["completion"]

    ours, _, _ = load_for_inference(adapter, device="cpu")
    assert (logits(ours) - logits(load_base(str(base), torch.float32).model)).abs().max() > 1e-4  # trained
    assert main(["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "m"), "--dtype", "fp32"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    torch.testing.assert_close(logits(merged), logits(ours), atol=1e-4, rtol=0)  # NF4 base + adapter, merged

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)  # fmt: skip
    hf = bnb_exact(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, quantization_config=bnb, device_map="cpu"))
    nf4_experts_into(ours, hf)  # MoE: bitsandbytes leaves the experts unquantized; ours are NF4
    ref = peft.PeftModel.from_pretrained(hf, adapter).eval()
    ref.get_input_embeddings().weight.requires_grad_(True)  # bnb's dequantize + F.linear path (conftest)
    with torch.enable_grad():
        want = ref(ids()).logits.detach()
    torch.testing.assert_close(logits(ours), want, atol=1e-4, rtol=0)


# ---- fused ops: the estimator counts what the swap applies ----


def swapped_groups(model) -> set[str]:
    """The estimator's group names for the fused modules now in `model`."""
    from qtrain.fused import FusedRMSNorm

    found = set()
    for m in model.modules():
        found |= {g for g in ("qkv", "gate_up", "swiglu") if getattr(m, f"fuse_{g}", False)}
        if isinstance(m, FusedRMSNorm):
            found.add("rms_norm")
    return found


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("arch", list(FAMILIES))
def test_estimated_fused_groups_are_the_swapped_ones(arch, packing, tiny_checkpoint):
    model = load_base(str(tiny_checkpoint(arch, **SHAPES)), torch.float32).model
    ops = FusedOps(enabled="on", varlen=packing)
    swapped = apply_fused_ops(model, ops)
    expected = set(fused_groups(ops, "cpu", "torch", (), model.config))
    assert swapped_groups(model) | ({"varlen"} if swapped.varlen else set()) == expected
    assert bool(expected) == (arch in TESTED["fused"]) == bool(fused_support(model.config))


def test_fused_support_drops_swiglu_for_another_activation():
    assert "swiglu" in fused_support(tiny_config("llama"))
    gelu = tiny_config("llama")
    gelu.hidden_act = "gelu"
    assert "swiglu" not in fused_support(gelu) and "rms_norm" in fused_support(gelu)


# ---- the generic path and what is refused before loading ----


def test_an_unregistered_decoder_loads_with_one_warning(tmp_path, caplog):
    from transformers import StableLmConfig

    path = build_tiny_model(tmp_path / "m", arch="llama", **SHAPES)
    config = StableLmConfig(vocab_size=100, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    with caplog.at_level(logging.WARNING, logger="qtrain"):
        loaded = load_model(str(path), compute_dtype=torch.float32)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "'stablelm'" in warnings[0] and "untested" in warnings[0]
    assert "\n" not in warnings[0] and loaded.model(ids()).logits.shape == (2, 11, 100)


def test_a_non_linear_projection_is_refused_before_loading(tmp_path, monkeypatch):
    from transformers import GPT2Config

    path = build_tiny_model(tmp_path / "m", arch="llama", **SHAPES)
    AutoModelForCausalLM.from_config(GPT2Config(vocab_size=100, n_embd=64, n_layer=2, n_head=4)).save_pretrained(path)
    read = []
    monkeypatch.setattr("qtrain.checkpoint.SafetensorsCheckpoint.finite", lambda self, key: read.append(key))
    with pytest.raises(ValueError, match=r"'gpt2': transformer\.h\.0\.attn\.c_attn is a Conv1D .*not nn\.Linear"):
        load_model(str(path))
    assert read == []  # refused from the meta skeleton, no weight read


def test_a_model_type_transformers_lacks_is_refused(tmp_path):
    path = build_tiny_model(tmp_path / "m", arch="llama", **SHAPES)
    config = json.loads((path / "config.json").read_text()) | {"model_type": "no-such-lm"}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model_type 'no-such-lm' is unknown to transformers"):
        load_model(str(path))


def test_an_encoder_decoder_is_refused(tmp_path):
    from transformers import T5Config

    path = build_tiny_model(tmp_path / "m", arch="llama", **SHAPES)
    (path / "config.json").write_text(T5Config(vocab_size=100, d_model=64).to_json_string())
    with pytest.raises(ValueError, match=r"'t5' is not a decoder-only causal LM"):
        load_model(str(path))


@pytest.mark.parametrize("arch", [a for a in TESTED["fused"] if FAMILIES[a].fused_ops != FAMILIES["llama"].fused_ops])
def test_partly_fused_family_equals_stock(arch, tiny_checkpoint):
    """A family with some fused ops (Qwen3: RMSNorm, gate/up, SwiGLU; stock attention): same loss
    and LoRA gradients as the stock modules (Triton kernels through the interpreter)."""
    from qtrain.lora import LoRASpec

    path = str(tiny_checkpoint(arch, **SHAPES))
    spec = LoRASpec(rank=4, alpha=8, target_modules="all-linear")
    x = ids(seed=5)

    def loss_and_grads(fused: bool):
        torch.manual_seed(0)
        model = load_model(path, spec, compute_dtype=torch.float32).model
        for m in model.modules():  # a nonzero B: the adapters take part in the comparison
            if hasattr(m, "lora_b") and m.lora_b is not None:
                torch.nn.init.normal_(m.lora_b.weight, std=0.02)
        swapped = apply_fused_ops(model, FusedOps(enabled="on")) if fused else []
        loss = model(x, labels=x).loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, swapped

    want, want_grads, _ = loss_and_grads(False)
    got, got_grads, swapped = loss_and_grads(True)
    assert {n.rpartition(".")[2] for n in swapped} == {"input_layernorm", "post_attention_layernorm", "mlp", "norm"}
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert got_grads.keys() == want_grads.keys()
    for n in want_grads:
        torch.testing.assert_close(got_grads[n], want_grads[n], atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_workload_for_reads_the_family_from_the_run_config(arch):
    from qtrain.config import load_config
    from qtrain.estimate import workload_for

    cfg = load_config(str(QUICKSTART), [f"model.tiny.arch={arch}"])
    support = set(fused_support(tiny_config(arch)))
    assert set(workload_for(cfg, "cuda", "triton").fused) == {"qkv", "gate_up", "rms_norm", "swiglu", "varlen"} & support
    assert workload_for(cfg, "cuda", "triton", config=tiny_config("llama")).fused == workload_for(
        load_config(str(QUICKSTART), []), "cuda", "triton"
    ).fused  # an explicit model config wins
