"""qtrain.adapter: PEFT-format save/load (against peft itself) and the streaming merge."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from qtrain.adapter import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    load_adapter_weights,
    merge_adapter,
    read_adapter_config,
    save_adapter,
)
from qtrain.lora import LoRALinear, LoRASpec, PeftLoRASpec, lora_modules
from qtrain.model import load_model

peft = pytest.importorskip("peft")

# hidden 64, intermediate 192: every weight row is a multiple of 64 values, away from the
# bitsandbytes 0.50.2 CPU dequantization bug for rows that are a multiple of 16 but not of 64.
SHAPES = {"intermediate_size": 192}
PROJS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# fp32 everywhere, same NF4-dequantized weights, same module order: the only possible difference is
# matmul association/rounding (in practice the logits are bit-identical), so 1e-5 on logits of ~1.
FP32_TOL = {"atol": 1e-5, "rtol": 0}
# A LoRA delta here moves logits by ~0.5 (lora_b ~ N(0, 0.5)), far above every tolerance used below.
ADAPTER_EFFECT_MIN = 0.05


def ids(batch: int = 2, length: int = 11, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


def ours(path: Path, spec: LoRASpec, dtype: torch.dtype = torch.float32, seed: int = 0):
    """Our NF4 + LoRA model with a non-zero adapter (lora_b random, seeded)."""
    torch.manual_seed(seed)  # lora_a init
    loaded = load_model(str(path), spec, compute_dtype=dtype)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in lora_modules(loaded.model).values():
            m.lora_b.weight.copy_(torch.randn(m.lora_b.weight.shape, generator=g) * 0.5)
    return loaded




def logits(model, x=None) -> torch.Tensor:
    with torch.no_grad():
        return model(x if x is not None else ids()).logits


def tmp_dirs_left(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint):
    return tiny_checkpoint("llama", **SHAPES)


@pytest.fixture(scope="module")
def bnb_saved(ckpt, bnb_nf4, tmp_path_factory):
    """transformers + bitsandbytes NF4 (double quant, fp32 compute) of `ckpt`, saved with save_pretrained."""
    model = bnb_nf4(ckpt)
    out = tmp_path_factory.mktemp("bnb_saved")
    model.save_pretrained(out)
    return out


# ---- save ------------------------------------------------------------------------------------


def test_save_adapter_writes_peft_files(ckpt, tmp_path):
    spec = LoRASpec(rank=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    loaded = ours(ckpt, spec)
    out = save_adapter(loaded.model, spec, loaded.targets, str(ckpt), tmp_path / "adapter")
    assert out == tmp_path / "adapter"
    assert sorted(os.listdir(out)) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    cfg = json.loads((out / ADAPTER_CONFIG).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert (cfg["r"], cfg["lora_alpha"], cfg["use_rslora"], cfg["use_dora"]) == (4, 8, False, False)
    assert cfg["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    assert cfg["base_model_name_or_path"] == str(ckpt)
    tensors = load_file(out / ADAPTER_WEIGHTS)
    want = {
        f"base_model.model.model.layers.{i}.{part}.{proj}.lora_{ab}.weight"
        for i in range(2)
        for part, proj in (("self_attn", "q_proj"), ("self_attn", "v_proj"), ("mlp", "down_proj"))
        for ab in "AB"
    }
    assert set(tensors) == want
    for name, m in lora_modules(loaded.model).items():
        a = tensors[f"base_model.model.{name}.lora_A.weight"]
        b = tensors[f"base_model.model.{name}.lora_B.weight"]
        assert a.shape == (4, m.in_features) and b.shape == (m.out_features, 4)
        assert a.dtype == b.dtype == torch.float32
        assert torch.equal(a, m.lora_a.weight) and torch.equal(b, m.lora_b.weight)
    back = read_adapter_config(out)
    assert (back.rank, back.alpha, back.use_rslora, back.dropout) == (4, 8.0, False, 0.0)
    assert sorted(back.target_modules) == sorted(spec.target_modules)


def test_save_adapter_is_atomic_and_replaces(ckpt, tmp_path):
    spec = LoRASpec(rank=2, alpha=4, target_modules=["q_proj"])
    first = ours(ckpt, spec, seed=0)
    second = ours(ckpt, spec, seed=5)
    out = tmp_path / "runs" / "adapter"  # parent created on demand
    save_adapter(first.model, spec, first.targets, "base", out)
    (out / "stale.txt").write_text("from an older save")
    save_adapter(second.model, spec, second.targets, "base", out)
    assert sorted(os.listdir(out)) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]  # replaced, not merged into
    saved = load_file(out / ADAPTER_WEIGHTS)
    m = lora_modules(second.model)["model.layers.0.self_attn.q_proj"]
    assert torch.equal(saved["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"], m.lora_b.weight)
    assert os.listdir(out.parent) == ["adapter"]  # no .adapter.tmp* / .adapter.old left behind


# ---- PEFT loads what we save -----------------------------------------------------------------

SPECS = {
    "all-linear": LoRASpec(rank=4, alpha=8),
    "qv-rslora": LoRASpec(rank=4, alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj"]),
}


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_peft_loads_our_adapter_fp32(ckpt, tmp_path, spec, nf4_hf_base):
    loaded = ours(ckpt, spec)
    adapter = save_adapter(loaded.model, spec, loaded.targets, str(ckpt), tmp_path / "adapter")
    base = nf4_hf_base(ckpt)
    without = logits(base)
    model = peft.PeftModel.from_pretrained(base, adapter).eval()
    assert sorted(n for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A) == sorted(
        f"base_model.model.{t}" for t in loaded.targets
    )
    got, want = logits(loaded.model), logits(model)
    torch.testing.assert_close(got, want, **FP32_TOL)
    assert (want - without).abs().max() > ADAPTER_EFFECT_MIN  # the adapter is really applied


def test_peft_loads_our_adapter_bf16(ckpt, tmp_path, nf4_hf_base):
    spec = SPECS["all-linear"]
    loaded = ours(ckpt, spec, dtype=torch.bfloat16)
    adapter = save_adapter(loaded.model, spec, loaded.targets, str(ckpt), tmp_path / "adapter")
    model = peft.PeftModel.from_pretrained(nf4_hf_base(ckpt, torch.bfloat16), adapter).eval()
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}  # as ours
    got, want = logits(loaded.model).float(), logits(model).float()
    # Same bf16 base bits and fp32 adapters; PEFT adds the fp32 LoRA output to the bf16 base output
    # and rounds once, we round the LoRA output to bf16 first and then the sum: ~1 bf16 ulp per
    # linear (2^-8 relative), compounding over 2 layers to a measured 0.0044 on logits of |x| < 1.
    torch.testing.assert_close(got, want, atol=2e-2, rtol=0)
    # and both stay close to the fp32 computation on the same (bf16-quantized) base
    ref = peft.PeftModel.from_pretrained(nf4_hf_base(ckpt, torch.bfloat16).float(), adapter).eval()
    ref_logits = logits(ref)
    torch.testing.assert_close(got, ref_logits, atol=5e-2, rtol=0)
    assert (got - logits(nf4_hf_base(ckpt, torch.bfloat16)).float()).abs().max() > 5 * 2e-2


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: biased q/k/v (bnb Linear4bit with bias)
def test_real_qlora_stack_loads_our_adapter(tiny_checkpoint, tmp_path, arch, bnb_exact):
    # transformers + bitsandbytes NF4 + PEFT, the stack QLoRA users run, on the same checkpoint.
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    path = tiny_checkpoint(arch, **SHAPES)
    spec = SPECS["all-linear"]
    loaded = ours(path, spec)
    adapter = save_adapter(loaded.model, spec, loaded.targets, str(path), tmp_path / "adapter")
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    base = bnb_exact(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=config, device_map="cpu"))
    model = peft.PeftModel.from_pretrained(base, adapter).eval()
    # Inputs that require grad make bnb's Linear4bit run dequantize + F.linear (its no-grad CPU
    # inference kernel is a different, lower-precision one, and it repacks the weight in place).
    model.get_input_embeddings().weight.requires_grad_(True)
    with torch.enable_grad():
        want = model(ids()).logits.detach()
    got = logits(loaded.model)
    torch.testing.assert_close(got, want, **FP32_TOL)  # bnb dequantizes to the same fp32 bits
    # the training-mode loss (what a fine-tune would see) agrees too
    model.train()
    loaded.model.train()
    with torch.enable_grad():
        want_loss = model(ids(seed=3), labels=ids(seed=3)).loss
    got_loss = loaded.model(ids(seed=3), labels=ids(seed=3)).loss
    torch.testing.assert_close(got_loss, want_loss, atol=1e-5, rtol=0)


# ---- we load what PEFT saves -----------------------------------------------------------------


def peft_adapter(nf4_hf_base, path: Path, out: Path, use_rslora: bool, seed: int = 0):
    """A PEFT LoRA (r=4, alpha=16, q/v) on the NF4-dequantized base, lora_B randomized, saved."""
    base = nf4_hf_base(path)
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_rslora=use_rslora)
    model = peft.get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    model.save_pretrained(out)
    return model.eval()


@pytest.fixture(scope="module")
def peft_saved(ckpt, nf4_hf_base, tmp_path_factory):
    out = tmp_path_factory.mktemp("peft_adapter")
    model = peft_adapter(nf4_hf_base, ckpt, out, use_rslora=False)
    return out, model


@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
def test_peft_adapter_loads_into_qtrain(ckpt, tmp_path, use_rslora, nf4_hf_base):
    model = peft_adapter(nf4_hf_base, ckpt, tmp_path / "adapter", use_rslora)
    spec = read_adapter_config(tmp_path / "adapter")
    assert (spec.rank, spec.alpha, spec.use_rslora, spec.dropout) == (4, 16.0, use_rslora, 0.0)
    assert sorted(spec.target_modules) == ["q_proj", "v_proj"]
    loaded = load_model(str(ckpt), spec, compute_dtype=torch.float32)
    load_adapter_weights(loaded.model, tmp_path / "adapter")
    mods = lora_modules(loaded.model)
    assert len(mods) == 4
    assert {m.scale for m in mods.values()} == {16 / 2 if use_rslora else 16 / 4}
    got, want = logits(loaded.model), logits(model)
    torch.testing.assert_close(got, want, **FP32_TOL)
    assert (want - logits(nf4_hf_base(ckpt))).abs().max() > ADAPTER_EFFECT_MIN


PEFT_TARGETING = {  # LoraConfig options that pick modules: PEFT's own semantics, which ours must reproduce
    "layers_to_transform-list": {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [0]},
    "layers_to_transform-int": {"target_modules": ["q_proj", "down_proj"], "layers_to_transform": 1},
    "layers_pattern": {"target_modules": ["q_proj"], "layers_to_transform": [1], "layers_pattern": "layers"},
    "exclude_modules-list": {"target_modules": "all-linear", "exclude_modules": ["k_proj", "layers.0.mlp.up_proj"]},
    "exclude_modules-regex": {"target_modules": ["q_proj", "o_proj"], "exclude_modules": r".*\.1\.self_attn\.o_proj"},
    "target_modules-regex": {"target_modules": r".*layers\.1\.(self_attn\.(q|k)_proj|mlp\.gate_proj)"},
    "full-name-and-layers": {"target_modules": ["model.layers.1.mlp.up_proj", "v_proj"], "layers_to_transform": [0]},
}


def modules_with_lora(model) -> list[str]:
    """The base-model names of a PeftModel's LoRA layers."""
    return sorted(n.removeprefix("base_model.model.") for n, m in model.named_modules() if hasattr(m, "lora_A") and n)


@pytest.mark.parametrize("options", PEFT_TARGETING.values(), ids=PEFT_TARGETING.keys())
def test_peft_module_selection_loads_into_qtrain(ckpt, tmp_path, nf4_hf_base, options):
    base = nf4_hf_base(ckpt)
    torch.manual_seed(0)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, **options))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    model.save_pretrained(tmp_path / "adapter")
    peft_targets = modules_with_lora(model)
    spec = read_adapter_config(tmp_path / "adapter")
    loaded = load_model(str(ckpt), spec, compute_dtype=torch.float32)
    assert sorted(lora_modules(loaded.model)) == peft_targets and 0 < len(peft_targets) < 14
    load_adapter_weights(loaded.model, tmp_path / "adapter")
    torch.testing.assert_close(logits(loaded.model), logits(model.eval()), **FP32_TOL)
    merged = merge_adapter(str(ckpt), tmp_path / "adapter", tmp_path / "merged", dtype=torch.float32)
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(merged).eval()), logits(model), **FP32_TOL)


def test_peft_loads_our_adapter_with_layers_and_excludes(ckpt, tmp_path, nf4_hf_base):
    spec = PeftLoRASpec(rank=4, alpha=8, target_modules=["q_proj", "v_proj"], layers_to_transform=[1],
                        exclude_modules=["lm_head", "model.layers.1.self_attn.v_proj"])  # fmt: skip
    loaded = ours(ckpt, spec)
    assert loaded.targets == ["model.layers.1.self_attn.q_proj"]
    adapter = save_adapter(loaded.model, spec, loaded.targets, str(ckpt), tmp_path / "adapter")
    model = peft.PeftModel.from_pretrained(nf4_hf_base(ckpt), adapter).eval()
    assert modules_with_lora(model) == loaded.targets
    torch.testing.assert_close(logits(model), logits(loaded.model), **FP32_TOL)


def with_config_changed(adapter_dir: Path, out: Path, change: dict) -> Path:
    """A copy of the adapter at `out` whose adapter_config.json has `change` applied."""
    adapter = rewrite_weights(adapter_dir, out, lambda t: None)
    cfg = json.loads((adapter / ADAPTER_CONFIG).read_text()) | change
    (adapter / ADAPTER_CONFIG).write_text(json.dumps(cfg))
    return adapter


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"layers_to_transform": "0"}, "layers_to_transform='0'"),
        ({"layers_to_transform": [0], "layers_pattern": 3}, "layers_pattern=3"),
        ({"exclude_modules": 5}, "exclude_modules=5"),
        ({"target_modules": None}, "target_modules=None"),
        ({"target_modules": "(unclosed"}, "target_modules='(unclosed'"),
    ],
)
def test_bad_module_selection_names_the_option(peft_saved, tmp_path, change, needle):
    adapter = with_config_changed(peft_saved[0], tmp_path / "bad", change)
    with pytest.raises(ValueError) as info:
        read_adapter_config(adapter)
    assert str(info.value).startswith(f"{adapter / ADAPTER_CONFIG}: {needle}") and "\n" not in str(info.value)


def rewrite_weights(src: Path, dst: Path, edit) -> Path:
    """Copy adapter `src` to `dst` with `edit(tensors)` applied to its weights."""
    dst.mkdir()
    (dst / ADAPTER_CONFIG).write_text((src / ADAPTER_CONFIG).read_text())
    tensors = load_file(src / ADAPTER_WEIGHTS)
    edit(tensors)
    save_file(tensors, dst / ADAPTER_WEIGHTS)
    return dst


def test_adapter_name_in_keys_parses(ckpt, peft_saved, tmp_path):
    src, model = peft_saved

    def add_default(t):
        for k in list(t):
            t[k.replace(".weight", ".default.weight")] = t.pop(k)

    adapter = rewrite_weights(src, tmp_path / "named", add_default)
    assert all(
        ".lora_A.default.weight" in k or ".lora_B.default.weight" in k for k in load_file(adapter / ADAPTER_WEIGHTS)
    )
    loaded = load_model(str(ckpt), read_adapter_config(adapter), compute_dtype=torch.float32)
    load_adapter_weights(loaded.model, adapter)
    torch.testing.assert_close(logits(loaded.model), logits(model), **FP32_TOL)


QKEY = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
    "edit, needle",
    [
        (
            lambda t: t.__setitem__(f"{QKEY}.lora_A.weight", torch.zeros(4, 32)),
            "has shape [4, 32], the model expects [4, 64]",
        ),
        (lambda t: t.__setitem__(f"{QKEY}.lora_B.weight", torch.zeros(64, 8)), "has shape [64, 8]"),
        (
            lambda t: t.__setitem__("base_model.model.model.layers.0.mlp.up_proj.lora_A.weight", torch.zeros(4, 64)),
            "'model.layers.0.mlp.up_proj', which has no LoRA adapter",
        ),
        (lambda t: t.pop(f"{QKEY}.lora_B.weight"), "no weights for model.layers.0.self_attn.q_proj.lora_b"),
        (
            lambda t: t.__setitem__("model.layers.0.self_attn.q_proj.lora_A.weight", torch.zeros(4, 64)),
            "not a PEFT LoRA weight name",
        ),
        (
            lambda t: t.__setitem__(f"{QKEY}.lora_magnitude_vector.weight", torch.zeros(64)),
            "not a lora_A/lora_B weight",
        ),
    ],
    ids=["shape-a", "shape-b", "module-missing", "weight-missing", "no-prefix", "not-lora"],
)
def test_bad_adapter_weights_name_the_file(ckpt, peft_saved, tmp_path, edit, needle):
    adapter = rewrite_weights(peft_saved[0], tmp_path / "bad", edit)
    loaded = load_model(str(ckpt), read_adapter_config(adapter), compute_dtype=torch.float32)
    with pytest.raises(ValueError) as info:
        load_adapter_weights(loaded.model, adapter)
    msg = str(info.value)
    assert msg.startswith(str(adapter / ADAPTER_WEIGHTS)) and needle in msg


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"peft_type": "IA3"}, "peft_type 'IA3'"),
        ({"use_dora": True}, "use_dora"),
        ({"bias": "all"}, "bias"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out"),
    ],
)
def test_unsupported_adapter_config_names_the_file(peft_saved, tmp_path, change, needle):
    adapter = with_config_changed(peft_saved[0], tmp_path / "bad", change)
    with pytest.raises(ValueError) as info:
        read_adapter_config(adapter)
    assert str(adapter / ADAPTER_CONFIG) in str(info.value) and needle in str(info.value)


def test_missing_adapter_files(ckpt, tmp_path):
    with pytest.raises(FileNotFoundError, match=ADAPTER_CONFIG):
        read_adapter_config(tmp_path)
    loaded = load_model(str(ckpt), LoRASpec(rank=2, target_modules=["q_proj"]), compute_dtype=torch.float32)
    with pytest.raises(FileNotFoundError, match=ADAPTER_WEIGHTS):
        load_adapter_weights(loaded.model, tmp_path)


def test_roundtrip_through_qtrain(ckpt, tmp_path):
    spec = SPECS["qv-rslora"]
    src = ours(ckpt, spec, seed=3)
    save_adapter(src.model, spec, src.targets, str(ckpt), tmp_path / "a")
    dst = load_model(str(ckpt), read_adapter_config(tmp_path / "a"), compute_dtype=torch.float32)
    load_adapter_weights(dst.model, tmp_path / "a")
    assert torch.equal(logits(dst.model), logits(src.model))


# ---- merge -----------------------------------------------------------------------------------


def test_merge_nf4_sharded_equals_qlora_model(ckpt, tmp_path):
    spec = SPECS["all-linear"]
    loaded = ours(ckpt, spec)
    adapter = save_adapter(loaded.model, spec, loaded.targets, str(ckpt), tmp_path / "adapter")
    out = merge_adapter(str(ckpt), adapter, tmp_path / "merged", dtype=torch.float32, max_shard_bytes=100_000)
    assert out == tmp_path / "merged"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((out / s).exists() for s in shards)
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    assert set(index["weight_map"]) == set(load_file(ckpt / "model.safetensors"))
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for s in shards for t in load_file(out / s).values()
    )
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    # W_nf4 + s*B@A merged in fp32 vs. computed as two matmuls: rounding only (measured 6e-7)
    torch.testing.assert_close(logits(merged), logits(loaded.model), **FP32_TOL)
    assert tmp_dirs_left(tmp_path) == []


def test_merge_nf4_partial_targets_equals_qlora_model(ckpt, tmp_path):
    spec = LoRASpec(rank=4, alpha=8, target_modules=["q_proj", "v_proj"])
    loaded = ours(ckpt, spec)
    adapter = save_adapter(loaded.model, spec, loaded.targets, str(ckpt), tmp_path / "adapter")
    out = merge_adapter(str(ckpt), adapter, tmp_path / "merged", dtype=torch.float32)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    torch.testing.assert_close(logits(merged), logits(loaded.model), **FP32_TOL)


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_merge_original_equals_peft_merge_and_unload(ckpt, tmp_path, spec):
    loaded = ours(ckpt, spec)
    adapter = save_adapter(loaded.model, spec, loaded.targets, str(ckpt), tmp_path / "adapter")
    out = merge_adapter(str(ckpt), adapter, tmp_path / "merged", dtype=torch.float32, base_weights="original")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    ref = peft.PeftModel.from_pretrained(base, adapter).merge_and_unload().eval()
    ours_sd, ref_sd = merged.state_dict(), ref.state_dict()
    assert set(ours_sd) == set(ref_sd)
    for key in ref_sd:  # W + s*(B@A) in fp32 both; only association order may differ
        torch.testing.assert_close(ours_sd[key], ref_sd[key], atol=1e-6, rtol=0, msg=key)
    torch.testing.assert_close(logits(merged), logits(ref), **FP32_TOL)
    original = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    assert (logits(merged) - logits(original)).abs().max() > ADAPTER_EFFECT_MIN


def test_merge_copies_tokenizer_and_config(ckpt, tmp_path):
    spec = LoRASpec(rank=2, alpha=4, target_modules=["q_proj"])
    loaded = ours(ckpt, spec)
    adapter = save_adapter(loaded.model, spec, loaded.targets, str(ckpt), tmp_path / "adapter")
    out = merge_adapter(str(ckpt), adapter, tmp_path / "merged")  # default: bf16, nf4 base
    names = set(os.listdir(out))
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    } <= names
    assert "model.safetensors.index.json" not in names and ADAPTER_WEIGHTS not in names
    config, src_config = json.loads((out / "config.json").read_text()), json.loads((ckpt / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["torch_dtype"] == config["dtype"] == "bfloat16"
    assert {k: v for k, v in config.items() if k not in ("dtype", "torch_dtype")} == {
        k: v for k, v in src_config.items() if k not in ("dtype", "torch_dtype")
    }
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    text = "### Response:\nTokyo"
    assert (
        AutoTokenizer.from_pretrained(out)(text)["input_ids"] == AutoTokenizer.from_pretrained(ckpt)(text)["input_ids"]
    )
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.dtype == torch.bfloat16 and getattr(merged.config, "quantization_config", None) is None


def test_merge_prequantized_bnb_checkpoint(bnb_saved, tmp_path):
    assert "quantization_config" in json.loads((bnb_saved / "config.json").read_text())
    spec = SPECS["all-linear"]
    loaded = ours(bnb_saved, spec)
    assert loaded.prequantized
    adapter = save_adapter(loaded.model, spec, loaded.targets, str(bnb_saved), tmp_path / "adapter")
    out = merge_adapter(str(bnb_saved), adapter, tmp_path / "merged", dtype=torch.float32)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    tensors = load_file(out / "model.safetensors")
    assert not any("quant" in k or k.endswith(("absmax", "quant_map")) for k in tensors)
    assert tensors["model.layers.0.mlp.down_proj.weight"].shape == (64, 192)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    torch.testing.assert_close(logits(merged), logits(loaded.model), **FP32_TOL)  # rounding only (measured 1e-6)


def test_merge_prequantized_refuses_original(bnb_saved, tmp_path):
    spec = LoRASpec(rank=2, target_modules=["q_proj"])
    loaded = ours(bnb_saved, spec)
    adapter = save_adapter(loaded.model, spec, loaded.targets, str(bnb_saved), tmp_path / "adapter")
    with pytest.raises(ValueError, match="no original weights") as info:
        merge_adapter(str(bnb_saved), adapter, tmp_path / "merged", base_weights="original")
    assert str(bnb_saved) in str(info.value)
    assert not (tmp_path / "merged").exists() and tmp_dirs_left(tmp_path) == []


def test_merge_errors(ckpt, tiny_checkpoint, tmp_path):
    spec = LoRASpec(rank=2, alpha=4, target_modules=["q_proj"])
    loaded = ours(ckpt, spec)
    adapter = save_adapter(loaded.model, spec, loaded.targets, str(ckpt), tmp_path / "adapter")
    with pytest.raises(ValueError, match="base_weights='bf16'"):
        merge_adapter(str(ckpt), adapter, tmp_path / "merged", base_weights="bf16")
    # an adapter for a deeper model: layer 1 exists, layer 5 does not
    extra = rewrite_weights(
        adapter,
        tmp_path / "deeper",
        lambda t: t.update({k.replace("layers.1.", "layers.5."): v.clone() for k, v in t.items() if "layers.1." in k}),
    )
    with pytest.raises(ValueError, match=r"model\.layers\.5\.self_attn\.q_proj") as info:
        merge_adapter(str(ckpt), extra, tmp_path / "merged")
    assert str(extra) in str(info.value)
    assert not (tmp_path / "merged").exists() and tmp_dirs_left(tmp_path) == []
    with pytest.raises(FileNotFoundError):
        merge_adapter(str(tmp_path / "no-such-model"), adapter, tmp_path / "merged")


@pytest.fixture(scope="module")
def q_adapter(ckpt, tmp_path_factory):
    spec = LoRASpec(rank=2, alpha=4, target_modules=["q_proj"])
    loaded = ours(ckpt, spec)
    return save_adapter(loaded.model, spec, loaded.targets, str(ckpt), tmp_path_factory.mktemp("q") / "adapter")


def user_folder(path: Path) -> Path:
    """A folder of someone's files: a run's metrics, notes, a subfolder, a config.json of their own."""
    (path / "checkpoints" / "step-1").mkdir(parents=True)
    (path / "checkpoints" / "step-1" / "adapter_model.safetensors").write_bytes(b"precious")
    (path / "metrics.jsonl").write_text('{"step": 1}\n')
    (path / "notes.txt").write_text("mine")
    (path / "config.json").write_text('{"train": {}}')
    return path


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_merge_refuses_a_folder_with_other_files(ckpt, q_adapter, tmp_path):
    out = user_folder(tmp_path / "out")
    before = files(out)
    with pytest.raises(ValueError, match=re.escape(str(out)) + r": .*not empty.*another .*--force") as e:
        merge_adapter(str(ckpt), q_adapter, out)
    assert "\n" not in str(e.value)
    assert files(out) == before and tmp_dirs_left(tmp_path) == []


def test_merge_force_replaces_only_what_merge_writes(ckpt, q_adapter, tmp_path):
    out = user_folder(tmp_path / "out")
    (out / "model-00001-of-00002.safetensors").write_bytes(b"an old shard")  # a name merge writes: replaced
    before = files(out)
    merge_adapter(str(ckpt), q_adapter, out, dtype=torch.float32, force=True)
    after = files(out)
    kept = {k for k in before if k not in ("config.json", "model-00001-of-00002.safetensors")}
    assert {k: after[k] for k in kept} == {k: before[k] for k in kept}
    assert json.loads(after["config.json"])["model_type"] == "llama"
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert json.loads(after[".qtrain-merge"])["adapter"] == str(Path(q_adapter).resolve())
    AutoModelForCausalLM.from_pretrained(out)
    assert tmp_dirs_left(tmp_path) == []


def test_merge_over_a_previous_merge_needs_no_force(ckpt, q_adapter, tmp_path):
    out = tmp_path / "merged"
    merge_adapter(str(ckpt), q_adapter, out, dtype=torch.float32, max_shard_bytes=100_000)
    assert len(list(out.glob("model-*.safetensors"))) > 2
    (out / "README.md").write_text("my model card")
    merge_adapter(str(ckpt), q_adapter, out, dtype=torch.float32)  # one shard now: the old ones go
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert not (out / "model.safetensors.index.json").exists()
    assert (out / "README.md").read_text() == "my model card"
    AutoModelForCausalLM.from_pretrained(out)
    assert tmp_dirs_left(tmp_path) == []


def test_merge_into_an_empty_folder(ckpt, q_adapter, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    merge_adapter(str(ckpt), q_adapter, out)
    assert (out / "model.safetensors").exists() and tmp_dirs_left(tmp_path) == []


def test_merge_onto_a_base_of_another_shape(ckpt, q_adapter, tiny_checkpoint, tmp_path):
    other = tiny_checkpoint("llama", hidden_size=128, intermediate_size=192)
    with pytest.raises(ValueError) as e:
        merge_adapter(str(other), q_adapter, tmp_path / "merged")
    message = str(e.value)
    assert "model.layers.0.self_attn.q_proj" in message and "was this adapter trained on this base?" in message
    assert "[128, 128]" in message and "\n" not in message
    assert not (tmp_path / "merged").exists() and tmp_dirs_left(tmp_path) == []


def with_nan(adapter: Path, out: Path, key_part: str = "layers.1.self_attn.q_proj.lora_B") -> tuple[Path, str]:
    """A copy of `adapter` with one NaN in its first tensor whose name holds `key_part`."""
    found = []

    def poison(t):
        key = min(k for k in t if key_part in k)
        t[key] = t[key].clone().index_fill_(0, torch.tensor([0]), float("nan"))
        found.append(key)

    return rewrite_weights(adapter, out, poison), found[0]


def test_non_finite_adapter_is_refused_by_name(ckpt, q_adapter, tmp_path):
    bad, key = with_nan(q_adapter, tmp_path / "bad")
    loaded = load_model(str(ckpt), read_adapter_config(bad), compute_dtype=torch.float32)
    with pytest.raises(ValueError, match=re.escape(f"{bad / ADAPTER_WEIGHTS}: tensor {key} holds NaN/inf values")) as e:
        load_adapter_weights(loaded.model, bad)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=re.escape(f"{bad / ADAPTER_WEIGHTS}: tensor {key} holds NaN/inf values")):
        merge_adapter(str(ckpt), bad, tmp_path / "merged")
    assert not (tmp_path / "merged").exists() and tmp_dirs_left(tmp_path) == []


def test_merge_refuses_a_custom_code_base_without_prompt(ckpt, tmp_path, monkeypatch, capsys):
    import shutil

    from qtrain.cli import main

    asked = []
    monkeypatch.setattr("builtins.input", lambda *a: asked.append(a) or "y")
    spec = LoRASpec(rank=2, alpha=4, target_modules=["q_proj"])
    loaded = ours(ckpt, spec)
    adapter = save_adapter(loaded.model, spec, loaded.targets, str(ckpt), tmp_path / "adapter")
    base = tmp_path / "base"
    shutil.copytree(ckpt, base)
    config = json.loads((base / "config.json").read_text())
    config |= {"model_type": "evilnet", "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}}
    (base / "config.json").write_text(json.dumps(config))
    (base / "configuration_evil.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').close()\n")
    assert main(["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qtrain merge: error:") and err.count("\n") == 1
    assert str(base / "config.json") in err and "custom code" in err
    assert asked == [] and not (tmp_path / "ran").exists() and not (tmp_path / "merged").exists()
    assert tmp_dirs_left(tmp_path) == []


def test_merge_rebuilds_the_base_in_the_training_dtype(ckpt, tmp_path):
    # trained on a bf16 base quantized to NF4, merged to fp32: the merged weights must be the NF4
    # base quantized from bf16 (recorded in qtrain.json), not from the fp32 output dtype.
    spec = LoRASpec(rank=2, alpha=4, target_modules=["q_proj"])
    loaded = ours(ckpt, spec, dtype=torch.bfloat16)
    adapter = save_adapter(loaded.model, spec, loaded.targets, str(ckpt), tmp_path / "adapter", torch.bfloat16)
    out = merge_adapter(str(ckpt), adapter, tmp_path / "merged", dtype=torch.float32)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    trained_base = loaded.model.model.layers[0].mlp.down_proj.base_weight(torch.float32)  # no adapter here
    assert torch.equal(merged.model.layers[0].mlp.down_proj.weight, trained_base)
    # without the record, the base is requantized from fp32: a different NF4 base
    (adapter / "qtrain.json").unlink()
    out = merge_adapter(str(ckpt), adapter, tmp_path / "merged32", dtype=torch.float32)
    merged32 = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert not torch.equal(merged32.model.layers[0].mlp.down_proj.weight, trained_base)
