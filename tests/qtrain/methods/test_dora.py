"""DoRA (Liu et al. 2024) as a LoRA option (`LoRASpec.use_dora`), on the NF4 base: the paper's and
PEFT's properties, parity with PEFT (bitsandbytes NF4 base and the dequantized base), the PEFT file
format both ways, and the merge.

Tolerances (all fp32 compute):
- our fast row norm ||W||^2 + 2s rowsum(B * WA^T) + s^2 rowsum(B * B AA^T) vs. the direct norm of
  dequant(W) + sBA: 1e-5 relative (fp32 rounding of the expansion; measured ~1e-7);
- logits ours vs. PEFT on the same NF4 weights: 1e-5 absolute on logits of |x| ~ 1 (matmul association
  and the order of the DoRA terms only; measured ~1e-6);
- merged checkpoint vs. the DoRA model: 1e-5 absolute (m/n folded into W in fp32 vs. applied to the
  output; measured ~1e-6).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from qtrain.adapter import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    load_adapter_weights,
    merge_adapter,
    read_adapter_config,
    save_adapter,
)
from qtrain.lora import LoRALinear, LoRASpec, lora_modules
from qtrain.methods.lora import mark_only_lora_trainable
from qtrain.model import load_model
from qtrain.nf4 import dequantize_nf4

peft_lib = pytest.importorskip("peft")

DORA = LoRASpec(rank=4, alpha=8, use_dora=True)
LOGITS_TOL = {"atol": 1e-5, "rtol": 0}
NORM_RTOL = 1e-5
# every weight row a multiple of 64 values: bitsandbytes 0.50.2's CPU dequantization is wrong otherwise
BNB_SHAPES = {"hidden_size": 64, "intermediate_size": 192, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2}


def ids(batch: int = 2, length: int = 11, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model, x=None) -> torch.Tensor:
    with torch.no_grad():
        return model(x if x is not None else ids()).logits


def perturb(model, seed: int = 1) -> None:
    """Non-trivial A, B and m (B ~ 0.3 N(0,1), m = m0 * (1 + 0.2 N(0,1))): every DoRA term matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_a.weight.add_(torch.randn(m.lora_a.weight.shape, generator=g) * 0.05)
            m.lora_b.weight.copy_(torch.randn(m.lora_b.weight.shape, generator=g) * 0.3)
            if m.use_dora:
                m.lora_magnitude.mul_(1 + 0.2 * torch.randn(m.lora_magnitude.shape, generator=g))


def ours(path, spec=DORA, quantize=True, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return load_model(str(path), spec, compute_dtype=dtype, quantize=quantize)


def direct_norm(m: LoRALinear) -> torch.Tensor:
    w = m.base_weight(torch.float32) + m.scale * m.lora_b.weight.float() @ m.lora_a.weight.float()
    return torch.linalg.vector_norm(w, dim=1)


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint):
    return tiny_checkpoint("llama", **BNB_SHAPES)


# ---- the method ------------------------------------------------------------------------------


@pytest.mark.parametrize("quantize", [True, False], ids=["nf4", "16bit"])
def test_magnitude_starts_at_the_row_norms_of_the_base(ckpt, quantize):
    model = ours(ckpt, quantize=quantize).model
    mods = lora_modules(model)
    assert len(mods) == 14 and all(m.use_dora for m in mods.values())
    for name, m in mods.items():
        w = dequantize_nf4(m.nf4_weight, torch.float32) if quantize else m.weight.float()
        assert m.lora_magnitude.dtype == torch.float32 and m.lora_magnitude.shape == (m.out_features,)
        torch.testing.assert_close(m.lora_magnitude, torch.linalg.vector_norm(w, dim=1), rtol=1e-6, atol=0, msg=name)
        assert torch.equal(m.dora_weight_norm(), m.lora_magnitude)  # B = 0: m / n is exactly 1


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: biased q/k/v
def test_identity_at_init(tiny_model, arch):
    plain = logits(tiny_model(arch, LoRASpec(rank=4, alpha=8)))
    dora = tiny_model(arch, DORA)
    torch.testing.assert_close(logits(dora), plain, **LOGITS_TOL)
    dora.train()  # the training-mode forward too
    with torch.no_grad():
        torch.testing.assert_close(dora(ids()).logits, plain, **LOGITS_TOL)


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj", "down_proj"]])
def test_trainable_count_is_lora_plus_out_features(tiny_model, peft, targets):
    lora = tiny_model(lora=LoRASpec(rank=4, alpha=8, target_modules=targets))
    dora = tiny_model(lora=LoRASpec(rank=4, alpha=8, target_modules=targets, use_dora=True))
    outs = sum(m.out_features for m in lora_modules(dora).values())
    assert peft.trainable_count(dora) == peft.trainable_count(lora) + outs
    trainable = {n for n, p in dora.named_parameters() if p.requires_grad}
    assert {n for n in trainable if n.endswith(".lora_magnitude")} == {
        f"{n}.lora_magnitude" for n in lora_modules(dora)
    }


def test_gradients_reach_a_b_and_m_only(tiny_model, peft):
    model = tiny_model(lora=DORA)
    perturb(model)  # B != 0, or A gets no gradient (as in LoRA)
    peft.loss_of(model, peft.batch()).backward()
    trainable = 0
    for n, p in model.named_parameters():
        if n.endswith((".lora_a.weight", ".lora_b.weight", ".lora_magnitude")):
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, n
            trainable += 1
        else:
            assert not p.requires_grad and p.grad is None, n
    assert trainable == 3 * len(lora_modules(model))


def test_learns_and_fast_norm_stays_exact(tiny_model, peft):
    model = tiny_model(lora=DORA)
    mark_only_lora_trainable(model)
    params = [p for p in model.parameters() if p.requires_grad]
    m0 = {n: m.lora_magnitude.detach().clone() for n, m in lora_modules(model).items()}
    opt = torch.optim.AdamW(params, lr=2e-2)
    # "constant": reachable in 20 steps at rank 4 (the frozen lm_head after RMSNorm floors it near 0.65x)
    b = peft.batch(task="constant")
    first = peft.loss_of(model, b).item()
    for _ in range(20):
        opt.zero_grad()
        peft.loss_of(model, b).backward()
        opt.step()
    last = peft.loss_of(model, b).item()
    assert last < 0.7 * first, (first, last)
    for n, m in lora_modules(model).items():
        assert not torch.equal(m.lora_magnitude, m0[n]), f"{n}: m did not train"
        want = direct_norm(m)
        assert (m.lora_b.weight.abs().max() * m.scale) > 1e-3  # the adapter moved away from 0
        torch.testing.assert_close(m.dora_weight_norm(), want, rtol=NORM_RTOL, atol=0, msg=n)


@pytest.mark.parametrize("quantize", [True, False], ids=["nf4", "16bit"])
def test_fast_norm_equals_direct_norm(ckpt, quantize):
    model = ours(ckpt, quantize=quantize).model
    perturb(model)
    for n, m in lora_modules(model).items():
        torch.testing.assert_close(m.dora_weight_norm(), direct_norm(m), rtol=NORM_RTOL, atol=0, msg=n)


def test_forward_is_the_dora_weight(ckpt):
    # y = m * (W + sBA) / ||W + sBA|| x + bias, written out (eval: no dropout), and merged_weight agrees
    torch.manual_seed(0)
    layer = LoRALinear(128, 64, rank=4, alpha=8, bias=True, use_dora=True, dropout=0.1)
    layer.set_base_weight(torch.randn(64, 128))
    layer.set_bias(torch.randn(64))
    with torch.no_grad():
        layer.lora_b.weight.normal_()
        layer.lora_magnitude.mul_(1.5)
    layer.eval()
    x = torch.randn(5, 128)
    w = layer.base_weight(torch.float32) + layer.scale * layer.lora_b.weight @ layer.lora_a.weight
    w = (layer.lora_magnitude / w.norm(dim=1))[:, None] * w
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ w.T + layer.bias, atol=1e-5, rtol=1e-5)  # |y| ~ 10
        torch.testing.assert_close(layer.merged_weight(), w, atol=1e-6, rtol=0)


def test_dropout_forward_follows_peft(ckpt):
    # training with dropout: y = W x + b + (m/n - 1) W h + (m/n) s B A h, h = dropout(x) (PEFT's formula)
    torch.manual_seed(0)
    layer = LoRALinear(128, 64, rank=4, alpha=8, bias=True, dropout=0.5, use_dora=True)
    layer.set_base_weight(torch.randn(64, 128))
    layer.set_bias(torch.randn(64))
    with torch.no_grad():
        layer.lora_b.weight.normal_()
        layer.lora_magnitude.mul_(1.5)
    layer.train()
    x = torch.randn(5, 128)
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)
    h = torch.nn.functional.dropout(x, 0.5, training=True)
    w = layer.base_weight(torch.float32)
    g = layer.lora_magnitude / direct_norm(layer)
    want = (
        x @ w.T
        + layer.bias
        + (g - 1) * (h @ w.T)
        + g * layer.scale * (h @ layer.lora_a.weight.T @ layer.lora_b.weight.T)
    )
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)  # |y| ~ 10


def test_dtype_cast_keeps_dora_state_fp32():
    layer = LoRALinear(128, 64, rank=4, use_dora=True)
    layer.set_base_weight(torch.randn(64, 128, dtype=torch.bfloat16))
    layer.to(torch.bfloat16)
    assert layer.dora_weight_sqnorm.dtype == torch.float32
    assert "dora_weight_sqnorm" not in layer.state_dict()  # derived from the base: not saved


def test_meta_device_model_has_magnitudes():
    from qtrain.estimate import Workload, meta_model
    from qtrain.tiny import tiny_config

    model = meta_model(tiny_config("llama", **BNB_SHAPES), DORA, Workload())
    mods = lora_modules(model)
    assert mods and all(m.lora_magnitude.device.type == "meta" for m in mods.values())


def test_built_on_meta_gets_its_magnitude_with_the_weight():
    # the estimator and qtrain.synthetic build adapters on meta; the base weight set later brings m
    with torch.device("meta"):
        layer = LoRALinear(128, 64, rank=4, use_dora=True)
    w = torch.randn(64, 128)
    layer.set_base_weight(w)
    assert layer.lora_magnitude.device.type == "cpu" and layer.lora_magnitude.requires_grad
    torch.testing.assert_close(layer.lora_magnitude, torch.linalg.vector_norm(layer.base_weight(torch.float32), dim=1))


def test_random_model_with_dora():
    from qtrain.synthetic import random_model
    from qtrain.tiny import tiny_config

    model = random_model(tiny_config("llama", **BNB_SHAPES), DORA, torch.float32, "cpu")
    for n, m in lora_modules(model).items():
        assert m.lora_magnitude.requires_grad, n
        torch.testing.assert_close(m.lora_magnitude, torch.linalg.vector_norm(m.base_weight(torch.float32), dim=1))


@pytest.mark.parametrize("backend", ["triton"])
def test_triton_backend_matches_torch(backend):
    # the NF4 products of the forward and of the norm (A W^T) through the Triton kernels (interpreted on CPU)
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    outs = []
    for be in ("torch", backend):
        torch.manual_seed(1)
        layer = LoRALinear(128, 64, rank=4, alpha=8, use_dora=True, backend=be).to(device)
        layer.set_base_weight(w.to(device))
        with torch.no_grad():
            layer.lora_b.weight.normal_()
        x = torch.randn(6, 128, device=device, requires_grad=True)
        y = layer(x)
        y.square().sum().backward()
        outs.append(
            [
                layer.dora_weight_norm(),
                y,
                x.grad,
                layer.lora_a.weight.grad,
                layer.lora_b.weight.grad,
                layer.lora_magnitude.grad,
            ]
        )
    for ref, got in zip(*outs):  # fp32 both; summation order only (measured <= 4e-7 of the largest entry)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5 * ref.abs().max().item())


# ---- the PEFT format -------------------------------------------------------------------------


def test_save_load_round_trip_is_exact(ckpt, tmp_path):
    src = ours(ckpt, seed=3)
    perturb(src.model)
    out = save_adapter(src.model, DORA, src.targets, str(ckpt), tmp_path / "a")
    cfg = json.loads((out / ADAPTER_CONFIG).read_text())
    assert cfg["use_dora"] is True and cfg["peft_type"] == "LORA"
    tensors = load_file(out / ADAPTER_WEIGHTS)
    for name, m in lora_modules(src.model).items():
        assert torch.equal(tensors[f"base_model.model.{name}.lora_magnitude_vector"], m.lora_magnitude)  # PEFT's key
    assert len(tensors) == 3 * len(src.targets)
    spec = read_adapter_config(out)
    assert spec.use_dora and (spec.rank, spec.alpha) == (4, 8.0)
    dst = load_model(str(ckpt), spec, compute_dtype=torch.float32)
    load_adapter_weights(dst.model, out)
    assert torch.equal(logits(dst.model), logits(src.model))


def bnb_peft(bnb_nf4, path, adapter):
    base = bnb_nf4(path)
    model = peft_lib.PeftModel.from_pretrained(base, adapter).eval()
    # inputs that require grad make bnb's Linear4bit dequantize + F.linear (not its lower-precision CPU kernel)
    model.get_input_embeddings().weight.requires_grad_(True)
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_peft_on_bnb_nf4_loads_our_dora_adapter(tiny_checkpoint, tmp_path, arch, bnb_nf4):
    path = tiny_checkpoint(arch, **BNB_SHAPES)
    loaded = ours(path)
    perturb(loaded.model)
    adapter = save_adapter(loaded.model, DORA, loaded.targets, str(path), tmp_path / "adapter")
    ref = bnb_peft(bnb_nf4, path, adapter)
    dora_layers = [
        m for m in ref.modules() if hasattr(m, "lora_magnitude_vector") and "default" in m.lora_magnitude_vector
    ]
    assert len(dora_layers) == len(loaded.targets)
    with torch.enable_grad():
        want = ref(ids()).logits.detach()
    got = logits(loaded.model)
    torch.testing.assert_close(got, want, **LOGITS_TOL)
    plain = ours(path, LoRASpec(rank=4, alpha=8))
    with torch.no_grad():
        for n, m in lora_modules(plain.model).items():
            src = lora_modules(loaded.model)[n]
            m.lora_a.weight.copy_(src.lora_a.weight)
            m.lora_b.weight.copy_(src.lora_b.weight)
    assert (want - logits(plain.model)).abs().max() > 0.05  # the magnitudes really act




def test_peft_loads_our_dora_adapter_bf16(ckpt, tmp_path, nf4_hf_base):
    loaded = ours(ckpt, dtype=torch.bfloat16)
    perturb(loaded.model)
    adapter = save_adapter(loaded.model, DORA, loaded.targets, str(ckpt), tmp_path / "adapter", torch.bfloat16)
    ref = peft_lib.PeftModel.from_pretrained(nf4_hf_base(ckpt, torch.bfloat16), adapter).eval()
    got, want = logits(loaded.model).float(), logits(ref).float()
    # same bf16 base bits, fp32 adapters and norms; PEFT rounds the base output (with bias) to bf16 and
    # adds the fp32 DoRA terms, we round W x + s B A x to bf16 then scale by m/n in fp32: ~1 bf16 ulp
    # per linear, measured 0.0045 on logits of |x| < 0.6 (the LoRA bf16 test allows 2e-2 for the same)
    torch.testing.assert_close(got, want, atol=2e-2, rtol=0)


def test_peft_saved_dora_adapter_loads_into_qtrain(ckpt, tmp_path, nf4_hf_base):
    torch.manual_seed(0)
    cfg = peft_lib.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True)
    model = peft_lib.get_peft_model(nf4_hf_base(ckpt), cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
    model.save_pretrained(tmp_path / "adapter")
    model.eval()
    spec = read_adapter_config(tmp_path / "adapter")
    assert spec.use_dora and sorted(spec.target_modules) == ["down_proj", "q_proj", "v_proj"]
    loaded = load_model(str(ckpt), spec, compute_dtype=torch.float32)
    load_adapter_weights(loaded.model, tmp_path / "adapter")
    torch.testing.assert_close(logits(loaded.model), logits(model), **LOGITS_TOL)
    # the training-mode forward with dropout 0 too, and a loss of the same value
    loaded.model.train()
    model.train()
    x = ids(seed=3)
    torch.testing.assert_close(loaded.model(x, labels=x).loss, model(x, labels=x).loss, atol=1e-5, rtol=0)


def test_peft_dropout_training_forward_matches(ckpt, tmp_path, nf4_hf_base):
    # dropout 0.1 in training: same seed, same mask draws (one F.dropout per adapted linear, same order)
    spec = LoRASpec(rank=4, alpha=8, dropout=0.1, use_dora=True, target_modules=["q_proj", "v_proj"])
    loaded = ours(ckpt, spec)
    perturb(loaded.model)
    adapter = save_adapter(loaded.model, spec, loaded.targets, str(ckpt), tmp_path / "adapter")
    ref = peft_lib.PeftModel.from_pretrained(nf4_hf_base(ckpt), adapter)
    ref.train()
    loaded.model.train()
    x = ids()
    with torch.no_grad():
        torch.manual_seed(11)
        want = ref(x).logits
        torch.manual_seed(11)
        got = loaded.model(x).logits
        torch.manual_seed(12)
        other = loaded.model(x).logits
    torch.testing.assert_close(got, want, **LOGITS_TOL)
    assert (other - got).abs().max() > 1e-3  # dropout really acts


def test_adapter_dora_mismatches_name_the_file(ckpt, tmp_path):
    plain_spec = LoRASpec(rank=2, alpha=4, target_modules=["q_proj"])
    plain = ours(ckpt, plain_spec)
    adapter = save_adapter(plain.model, plain_spec, plain.targets, str(ckpt), tmp_path / "plain")
    # use_dora in the config, no magnitudes in the weights
    cfg = json.loads((adapter / ADAPTER_CONFIG).read_text()) | {"use_dora": True}
    (adapter / ADAPTER_CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="use_dora") as info:
        read_adapter_config(adapter)
    assert str(adapter / ADAPTER_CONFIG) in str(info.value)
    # a DoRA adapter whose magnitude is missing, or of the wrong size
    dora_spec = LoRASpec(rank=2, alpha=4, target_modules=["q_proj"], use_dora=True)
    dora = ours(ckpt, dora_spec)
    good = save_adapter(dora.model, dora_spec, dora.targets, str(ckpt), tmp_path / "dora")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    for edit, needle in [
        (lambda t: t.pop(key), "no weights for model.layers.0.self_attn.q_proj.lora_magnitude"),
        (lambda t: t.__setitem__(key, torch.ones(32)), "has shape [32], the model expects [64]"),
    ]:
        tensors = load_file(good / ADAPTER_WEIGHTS)
        edit(tensors)
        save_file(tensors, good / ADAPTER_WEIGHTS)
        model = load_model(str(ckpt), dora_spec, compute_dtype=torch.float32).model
        with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("]", r"\]")):
            load_adapter_weights(model, good)
        save_adapter(dora.model, dora_spec, dora.targets, str(ckpt), good)
    # magnitudes with PEFT's in-model name (adapter name and ".weight") load too
    tensors = load_file(good / ADAPTER_WEIGHTS)
    tensors[key + ".default.weight"] = tensors.pop(key) * 2
    save_file(tensors, good / ADAPTER_WEIGHTS)
    model = load_model(str(ckpt), dora_spec, compute_dtype=torch.float32).model
    load_adapter_weights(model, good)
    q = lora_modules(model)["model.layers.0.self_attn.q_proj"]
    assert torch.equal(q.lora_magnitude, 2 * lora_modules(dora.model)["model.layers.0.self_attn.q_proj"].lora_magnitude)


# ---- merge -----------------------------------------------------------------------------------


def test_merge_unquantized_equals_dora_model_and_peft(ckpt, tmp_path):
    loaded = ours(ckpt, quantize=False)
    perturb(loaded.model)
    adapter = save_adapter(
        loaded.model, DORA, loaded.targets, str(ckpt), tmp_path / "adapter", base_dtype=torch.float32, quantized=False
    )
    out = merge_adapter(str(ckpt), adapter, tmp_path / "merged", dtype=torch.float32)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    want = logits(loaded.model)
    torch.testing.assert_close(logits(merged), want, **LOGITS_TOL)
    base = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    ref = peft_lib.PeftModel.from_pretrained(base, adapter).merge_and_unload().eval()
    ours_sd, ref_sd = merged.state_dict(), ref.state_dict()
    assert set(ours_sd) == set(ref_sd)
    for key in ref_sd:  # m/||W+sBA|| * (W + sBA) in fp32 on both sides
        torch.testing.assert_close(ours_sd[key], ref_sd[key], atol=1e-6, rtol=1e-6, msg=key)
    plain = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    assert (logits(merged) - logits(plain)).abs().max() > 0.05


def test_merge_nf4_equals_dora_model(ckpt, tmp_path):
    loaded = ours(ckpt)
    perturb(loaded.model)
    adapter = save_adapter(
        loaded.model, DORA, loaded.targets, str(ckpt), tmp_path / "adapter", base_dtype=torch.float32
    )
    out = merge_adapter(str(ckpt), adapter, tmp_path / "merged", dtype=torch.float32)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    torch.testing.assert_close(logits(merged), logits(loaded.model), **LOGITS_TOL)
    q = lora_modules(loaded.model)["model.layers.0.self_attn.q_proj"]
    torch.testing.assert_close(merged.model.layers[0].self_attn.q_proj.weight, q.merged_weight(), atol=1e-6, rtol=0)
