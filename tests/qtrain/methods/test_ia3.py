"""(IA)^3: fp32 vectors on the target linears (k, v: output; down_proj: input), and PEFT's IA3 format."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from qtrain.lora import LoRALinear, LoRASpec, is_lora_parameter, lora_modules
from qtrain.methods import mark_trainable
from qtrain.methods.ia3 import IA3
from qtrain.methods.lora import LoRA as LoRAParameters
from qtrain.model import enable_checkpointing, load_model

# hidden 64, intermediate 192 (every row length a multiple of 64): away from the bitsandbytes 0.50.2
# CPU dequantization bug for rows that are a multiple of 16 but not of 64 (TINY's 160 trips it).
BNB_SHAPES = {"intermediate_size": 192}
# fp32 on both sides, the same NF4-dequantized weights (bnb dequantizes to the same fp32 bits) and
# the same fp32 products x * l: as tests/qtrain/test_adapter.py's FP32_TOL (measured: 0, bit-identical).
FP32_TOL = {"atol": 1e-5, "rtol": 0}
EFFECT_MIN = 0.05  # perturbed vectors (1 + N(0, 0.3)) move the logits by ~0.2, far above FP32_TOL



def perturb(model, method: IA3, std: float = 0.3, seed: int = 1) -> None:
    """A trained state: l = 1 + N(0, std)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if method.owns(n):
                p.copy_(1 + std * torch.randn(p.shape, generator=g))


def ids(batch: int = 2, length: int = 11, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model, x=None) -> torch.Tensor:
    with torch.no_grad():
        return model(x if x is not None else ids()).logits


def ours(path, lora=None):
    torch.manual_seed(0)
    return load_model(str(path), lora, compute_dtype=torch.float32).model


def bnb_logits(model, x=None) -> torch.Tensor:
    # Inputs that require grad make bnb's Linear4bit run dequantize + F.linear (its no-grad CPU
    # inference kernel is a different, lower-precision one): as tests/qtrain/test_adapter.py.
    model.get_input_embeddings().weight.requires_grad_(True)
    with torch.enable_grad():
        return model(x if x is not None else ids()).logits.detach()


# ---- the method ------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize(
    "method",
    [IA3(), IA3(target_modules="all-linear", feedforward_modules=["down_proj", "o_proj"]), IA3(["q_proj"], [])],
    ids=["default", "all-linear", "q-only"],
)
def test_trainable_count_matches_the_formula(tiny_model, peft, arch, method):
    model = tiny_model(arch)
    peft.apply(model, [method])
    c = model.config
    head = c.hidden_size // c.num_attention_heads
    if method == IA3():  # the paper's count: per layer, l_k and l_v (KV heads' width) and l_ff
        assert method.expected_trainable(c) == c.num_hidden_layers * (
            2 * c.num_key_value_heads * head + c.intermediate_size
        )
    assert peft.trainable_count(model) == method.expected_trainable(c)


def test_vectors_and_hooks(tiny_model, peft):
    model = tiny_model()
    method = IA3()
    peft.apply(model, [method])
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    assert attn.k_proj.ia3_l.shape == (32,) and mlp.down_proj.ia3_l.shape == (160,)
    assert all(
        p.dtype == torch.float32 and torch.equal(p, torch.ones_like(p))
        for n, p in model.named_parameters()
        if method.owns(n)
    )
    assert not hasattr(attn.q_proj, "ia3_l") and not hasattr(mlp.up_proj, "ia3_l")
    perturb(model, method)
    x, h = torch.randn(2, 5, 64), torch.randn(2, 5, 160)
    with torch.no_grad():  # forward() bypasses the hooks
        torch.testing.assert_close(attn.k_proj(x), attn.k_proj.ia3_l * attn.k_proj.forward(x), rtol=0, atol=0)
        torch.testing.assert_close(attn.v_proj(x), attn.v_proj.ia3_l * attn.v_proj.forward(x), rtol=0, atol=0)
        torch.testing.assert_close(mlp.down_proj(h), mlp.down_proj.forward(mlp.down_proj.ia3_l * h), rtol=0, atol=0)
        torch.testing.assert_close(mlp.down_proj(x=h), mlp.down_proj(h), rtol=0, atol=0)  # keyword input too


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: k/v biases, scaled with the output
def test_identity_at_init(tiny_model, peft, arch):
    peft.check_identity_at_init(tiny_model(arch), [IA3(target_modules="all-linear")])


def test_identity_at_init_bf16(tiny_model, peft):
    model = tiny_model(dtype=torch.bfloat16)
    before = logits(model)
    peft.apply(model, [IA3()])
    assert torch.equal(logits(model), before)


def test_gradients_reach_only_the_vectors(tiny_model, peft):
    peft.check_gradients_only_on_method(tiny_model(), [IA3()])


def test_learns(tiny_model, peft):
    # Multiplicative vectors on the tiny random model barely move the "count" task (-7% in 30 steps at
    # lr 3e-1); a constant target is learnt (measured 4.95 -> 3.43).
    peft.check_learns(tiny_model(), [IA3()], lr=3e-1, drop=0.75, task="constant")


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model, peft):
    grads = []
    for checkpointing in (False, True):
        model = tiny_model()
        method = IA3()
        peft.apply(model, [method])
        perturb(model, method)
        if checkpointing:
            enable_checkpointing(model)
        calls: list[int] = []
        model.model.layers[0].self_attn.k_proj.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        model.train()
        peft.loss_of(model, peft.batch()).backward()
        assert len(calls) == (2 if checkpointing else 1)  # recomputed in backward: the IA3 hooks with it
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 6
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=0, atol=1e-6, msg=n)


def test_save_load_round_trip_through_peft_keys(tiny_model, peft):
    trained = tiny_model()
    method = IA3()
    peft.check_learns(trained, [method], steps=5, lr=3e-2, drop=1.0)
    saved = method.to_peft(method.state_dict(trained))
    assert saved["base_model.model.model.layers.0.self_attn.k_proj.ia3_l"].shape == (32, 1)
    assert saved["base_model.model.model.layers.0.mlp.down_proj.ia3_l"].shape == (1, 160)
    fresh = tiny_model()
    method = IA3()
    peft.apply(fresh, [method])
    method.load_state_dict(fresh, method.from_peft(saved))
    assert torch.equal(logits(fresh), logits(trained))


def test_composes_with_lora(tiny_model, peft):
    model = tiny_model("llama", lora=LoRASpec(rank=4))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in lora_modules(model).values():  # non-zero B: A gets a gradient too
            m.lora_b.weight.copy_(torch.randn(m.lora_b.weight.shape, generator=g) * 0.1)
    before = logits(model)
    method = IA3()
    method.apply(model)
    assert torch.equal(logits(model), before)  # identity on top of LoRA
    names = mark_trainable(model, [method, LoRAParameters()])
    assert {n for n in names if method.owns(n)} and {n for n in names if is_lora_parameter(n)}
    perturb(model, method)
    model.train()
    peft.loss_of(model, peft.batch()).backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) == (n in names), n
    # the vector scales the whole layer, LoRA included: l ⊙ (W x + s B A x), W (l ⊙ h) + s B A (l ⊙ h)
    k, down = model.model.layers[0].self_attn.k_proj, model.model.layers[0].mlp.down_proj
    assert isinstance(k, LoRALinear) and k.rank == 4
    x, h = torch.randn(3, 64), torch.randn(3, 160)
    with torch.no_grad():
        torch.testing.assert_close(k(x), k.ia3_l * k.forward(x), rtol=0, atol=0)
        torch.testing.assert_close(down(h), down.forward(down.ia3_l * h), rtol=0, atol=0)


def test_remove_restores_the_base(tiny_model):
    model = tiny_model()
    before = logits(model)
    method = IA3()
    method.apply(model)
    perturb(model, method)
    assert not torch.equal(logits(model), before)
    method.remove(model)
    assert not any("ia3" in n for n, _ in model.named_parameters())
    assert torch.equal(logits(model), before)
    method.apply(model)  # and can be applied again
    assert torch.equal(logits(model), before)


def test_errors(tiny_model):
    with pytest.raises(ValueError, match="subset of target_modules"):
        IA3(target_modules=["k_proj", "v_proj"], feedforward_modules=["down_proj"])
    with pytest.raises(ValueError, match="matched no linear layer"):
        IA3(target_modules=["nope"], feedforward_modules=[]).apply(tiny_model())
    model = tiny_model()
    IA3().apply(model)
    with pytest.raises(ValueError, match="applied twice"):
        IA3().apply(model)
    wrong = {"base_model.model.model.layers.0.mlp.down_proj.ia3_l": torch.ones(160, 1)}  # not feedforward in the file
    with pytest.raises(ValueError, match=r"shape \[160, 1\], expected \[1, in_features\]"):
        IA3().from_peft(wrong)
    with pytest.raises(ValueError, match="not an \\(IA\\)\\^3 vector"):
        IA3().from_peft({"base_model.model.model.layers.0.mlp.up_proj.ia3_l": torch.ones(1, 64)})


# ---- parity with transformers + bitsandbytes NF4 + PEFT ---------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_peft_loads_our_vectors(tiny_checkpoint, bnb_nf4, tmp_path, arch):
    path = tiny_checkpoint(arch, **BNB_SHAPES)
    model = ours(path)
    method = IA3()
    method.apply(model)
    perturb(model, method)
    save_file(
        method.to_peft(method.state_dict(model)), tmp_path / "adapter_model.safetensors", metadata={"format": "pt"}
    )
    (tmp_path / "adapter_config.json").write_text(json.dumps(method.peft_config(str(path)), indent=2))
    peft = pytest.importorskip("peft")
    ref = peft.PeftModel.from_pretrained(bnb_nf4(path), tmp_path).eval()
    assert sum(1 for n, _ in ref.named_parameters() if n.endswith("ia3_l.default")) == 3 * ref.config.num_hidden_layers
    want = bnb_logits(ref)
    torch.testing.assert_close(logits(model), want, **FP32_TOL)
    with ref.disable_adapter():
        assert (want - bnb_logits(ref)).abs().max() > EFFECT_MIN  # the vectors are really applied


def test_we_load_what_peft_saves(tiny_checkpoint, bnb_nf4, tmp_path):
    peft = pytest.importorskip("peft")
    path = tiny_checkpoint("llama", **BNB_SHAPES)
    config = peft.IA3Config(
        task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]
    )
    ref = peft.get_peft_model(bnb_nf4(path), config)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "ia3_l" in n:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    ref.save_pretrained(tmp_path)
    ref.eval()
    want = bnb_logits(ref)

    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    method = IA3(target_modules=saved["target_modules"], feedforward_modules=saved["feedforward_modules"])
    ours_cfg = method.peft_config(str(path))
    assert ours_cfg == IA3().peft_config(str(path))
    saved = saved | {k: sorted(saved[k]) for k in ("target_modules", "feedforward_modules")}  # PEFT writes sets
    assert {k: saved[k] for k in ours_cfg} == ours_cfg
    model = ours(path)
    method.apply(model)
    method.load_state_dict(model, method.from_peft(load_file(tmp_path / "adapter_model.safetensors")))
    got = logits(model)
    torch.testing.assert_close(got, want, **FP32_TOL)
    assert (got - logits(ours(path))).abs().max() > EFFECT_MIN
