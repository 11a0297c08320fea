"""Bottleneck adapters (Houlsby, Pfeiffer, parallel): hooks on self_attn/mlp, children of each layer."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from qtrain.config import ConfigError, from_dict
from qtrain.lora import LoRASpec
from qtrain.methods import mark_trainable
from qtrain.methods.adapters import Houlsby, ParallelAdapter, Pfeiffer
from qtrain.methods.io import load_method, save_method
from qtrain.model import enable_checkpointing

METHODS = {
    "houlsby": lambda: Houlsby(bottleneck=8),
    "pfeiffer": lambda: Pfeiffer(bottleneck=8),
    "parallel_mlp": lambda: ParallelAdapter(bottleneck=8),
    "parallel_both": lambda: ParallelAdapter(bottleneck=8, where=["self_attn", "mlp"]),
}
ALL = pytest.mark.parametrize("which", list(METHODS))


def perturb(model, method, std: float = 0.05, seed: int = 1) -> None:
    """Non-zero W_up / b_up (a trained state): every adapter parameter then gets a gradient."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if method.owns(n) and ".up." in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@ALL
def test_trainable_count_matches_the_formula(tiny_model, peft, arch, which):
    model = tiny_model(arch)
    method = METHODS[which]()
    peft.apply(model, [method])
    c = model.config
    per_adapter = 2 * c.hidden_size * 8 + 8 + c.hidden_size
    per_layer = {"houlsby": 2, "pfeiffer": 1, "parallel_mlp": 1, "parallel_both": 2}[which]
    assert method.expected_trainable(c) == c.num_hidden_layers * per_layer * per_adapter
    assert peft.trainable_count(model) == method.expected_trainable(c)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@ALL
def test_identity_at_init(tiny_model, peft, arch, which):
    peft.check_identity_at_init(tiny_model(arch), [METHODS[which]()])


def test_module_layout(tiny_model, peft):
    model = tiny_model()
    before = {n for n, _ in model.named_parameters()}
    peft.apply(model, [Houlsby(bottleneck=8)])
    layer = model.model.layers[0]
    assert layer.adapter_attn.down.weight.shape == (8, 64) and layer.adapter_attn.up.weight.shape == (64, 8)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if ".adapter_" in n)
    assert before <= {n for n, _ in model.named_parameters()}  # existing names unchanged
    assert Pfeiffer().owns("model.layers.0.adapter_mlp.up.bias") and not Pfeiffer().owns(
        "model.layers.0.adapter_attn.up.bias"
    )
    assert not Houlsby().owns("model.layers.0.mlp.up_proj.lora_a.weight")


def test_serial_hooks_compute_y_plus_delta(tiny_model, peft):
    model = tiny_model()
    method = Houlsby(bottleneck=8)
    peft.apply(model, [method])
    perturb(model, method)
    layer = model.model.layers[1]
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        y = layer.mlp.forward(x)  # forward() bypasses the hooks
        torch.testing.assert_close(layer.mlp(x), y + layer.adapter_mlp(y))
        pos = torch.arange(5).expand(2, 5)
        kw = {"position_embeddings": model.model.rotary_emb(x, pos), "attention_mask": None}
        attn = layer.self_attn.forward(hidden_states=x, **kw)[0]
        torch.testing.assert_close(layer.self_attn(hidden_states=x, **kw)[0], attn + layer.adapter_attn(attn))


def test_parallel_hooks_read_the_sublayer_input(tiny_model, peft):
    model = tiny_model()
    method = ParallelAdapter(bottleneck=8, scale=4.0, where=["self_attn", "mlp"])
    peft.apply(model, [method])
    perturb(model, method)
    layer = model.model.layers[0]
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        torch.testing.assert_close(layer.mlp(x), layer.mlp.forward(x) + 4.0 * layer.adapter_mlp(x))
        pos = torch.arange(5).expand(2, 5)
        kw = {"position_embeddings": model.model.rotary_emb(x, pos), "attention_mask": None}
        want = layer.self_attn.forward(x, **kw)[0] + 4.0 * layer.adapter_attn(x)
        torch.testing.assert_close(layer.self_attn(hidden_states=x, **kw)[0], want)  # keyword input
        torch.testing.assert_close(layer.self_attn(x, **kw)[0], want)  # positional input


@ALL
def test_gradients_reach_only_the_adapters(tiny_model, peft, which):
    model = tiny_model()
    method = METHODS[which]()
    names = set(peft.apply(model, [method]))
    assert names == {n for n, _ in model.named_parameters() if method.owns(n)}
    perturb(model, method)  # at init W_up = 0, so W_down's gradient is 0 (as LoRA's A)
    peft.loss_of(model, peft.batch()).backward()
    for n, p in model.named_parameters():
        if n in names:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{n}: no gradient"
        else:
            assert p.grad is None and not p.requires_grad, f"{n}: frozen parameter got a gradient"


def test_only_w_up_learns_on_the_first_step(tiny_model, peft):
    model = tiny_model()
    method = Pfeiffer(bottleneck=8)
    peft.apply(model, [method])
    peft.loss_of(model, peft.batch()).backward()
    layer = model.model.layers[0].adapter_mlp
    assert layer.up.weight.grad.abs().sum() > 0 and layer.up.bias.grad.abs().sum() > 0
    assert layer.down.weight.grad.abs().sum() == 0


# The tiny random model's sublayer outputs are small, so serial adapters (which read them) start
# slowly; on this task LoRA r=4 on all linears reaches 0.80 x its first loss in 30 steps, these
# reach 0.79-0.89 in 50 (bottleneck 16).
LEARN = {"steps": 50, "lr": 3e-2, "drop": 0.92}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("make", [Houlsby, Pfeiffer, ParallelAdapter])
def test_learns(tiny_model, peft, arch, make):
    peft.check_learns(tiny_model(arch), [make(bottleneck=16)], **LEARN)


@ALL
def test_save_load_round_trip(tiny_model, peft, which):
    trained = tiny_model()
    peft.check_learns(trained, [METHODS[which]()], steps=5, lr=1e-2, drop=1.0)
    tensors = METHODS[which]().state_dict(trained)
    assert tensors and all(".adapter_" in n and t.dtype == torch.float32 for n, t in tensors.items())
    fresh = tiny_model()
    method = METHODS[which]()
    peft.apply(fresh, [method])
    method.load_state_dict(fresh, tensors)
    b = peft.batch()
    with torch.no_grad():
        torch.testing.assert_close(
            fresh(input_ids=b["input_ids"]).logits, trained(input_ids=b["input_ids"]).logits, rtol=0, atol=0
        )


def test_save_method_and_load_method(tiny_model, peft, tmp_path):
    trained = tiny_model()
    method = ParallelAdapter(bottleneck=8, where=["self_attn", "mlp"])
    peft.apply(trained, [method])
    perturb(trained, method)
    target = save_method(trained, method, tmp_path, "tiny")
    assert sorted(p.name for p in target.iterdir()) == ["method.json", "method.safetensors"]
    assert json.loads((target / "method.json").read_text()) == method.config_dict()
    fresh = tiny_model()
    again = ParallelAdapter(**{k: v for k, v in method.config_dict().items() if k != "method"})
    peft.apply(fresh, [again])
    load_method(fresh, again, tmp_path)
    ids = peft.batch()["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, trained(input_ids=ids).logits, rtol=0, atol=0)


@ALL
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_model, peft, which):
    model = tiny_model()
    method = METHODS[which]()
    peft.apply(model, [method])
    perturb(model, method)
    model.train()
    calls = []
    # a pre-hook: the recompute stops once the last saved tensor is back, inside the adapter's forward
    model.model.layers[0].adapter_mlp.register_forward_pre_hook(lambda *a: calls.append(1))
    b = peft.batch()
    loss = peft.loss_of(model, b)
    loss.backward()
    plain = grads(model)
    assert len(calls) == 1
    model.zero_grad(set_to_none=True)
    enable_checkpointing(model)
    assert model.model.layers[0].gradient_checkpointing
    calls.clear()
    loss_ckpt = peft.loss_of(model, b)
    loss_ckpt.backward()
    assert len(calls) == 2  # the forward, and its recompute in backward: the hooks run inside the checkpoint
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=0)
    checkpointed = grads(model)
    assert checkpointed.keys() == plain.keys() and plain
    for n in plain:
        torch.testing.assert_close(checkpointed[n], plain[n], rtol=1e-6, atol=1e-8, msg=n)


@pytest.mark.parametrize("which", ["houlsby", "parallel_both"])
def test_composes_with_lora(tiny_model, peft, which):
    model = tiny_model("llama", lora=LoRASpec(rank=4))
    lora_names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert lora_names and all("lora_" in n for n in lora_names)
    before = set(dict(model.named_parameters()))
    method = METHODS[which]()
    method.apply(model)
    assert before <= set(dict(model.named_parameters()))  # LoRA's names stay valid
    mark_trainable(model, [method])
    for n, p in model.named_parameters():
        p.requires_grad = p.requires_grad or n in lora_names
    perturb(model, method)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_b.weight"):
                p.normal_(0, 0.02)  # B = 0 at init: give A a gradient
    loss = peft.loss_of(model, peft.batch())
    assert torch.isfinite(loss)
    loss.backward()
    for n, p in model.named_parameters():
        if n in lora_names or method.owns(n):
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{n}: no gradient"
        else:
            assert p.grad is None, n
    assert not any(method.owns(n) for n in lora_names)


@ALL
def test_bf16_compute_under_autocast(tiny_model, peft, which):
    model = tiny_model(dtype=torch.bfloat16)
    method = METHODS[which]()
    peft.apply(model, [method])
    perturb(model, method)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if method.owns(n))
    b = peft.batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**b)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for n, p in model.named_parameters():
        if method.owns(n):
            assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), n


def test_bf16_identity_at_init_is_exact(tiny_model, peft):
    model = tiny_model(dtype=torch.bfloat16)
    ids = peft.batch()["input_ids"]
    with torch.no_grad():
        before = model(input_ids=ids).logits
        peft.apply(model, [Houlsby(bottleneck=8)])
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)


def test_deepcopy_hooks_follow_the_copy(tiny_model, peft):
    model = tiny_model()
    method = Pfeiffer(bottleneck=8)
    peft.apply(model, [method])
    clone = copy.deepcopy(model)
    perturb(clone, method)
    ids = peft.batch()["input_ids"]
    with torch.no_grad():
        assert not torch.equal(clone(input_ids=ids).logits, model(input_ids=ids).logits)


def test_applied_twice_is_an_error(tiny_model):
    model = tiny_model()
    Pfeiffer().apply(model)
    with pytest.raises(ValueError, match="already has an adapter_mlp"):
        Houlsby().apply(model)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: Houlsby(bottleneck=0), "houlsby.bottleneck"),
        (lambda: Pfeiffer(activation="tanh"), "pfeiffer.activation"),
        (lambda: ParallelAdapter(where=["ffn"]), "parallel_adapter.where"),
        (lambda: ParallelAdapter(where=[]), "parallel_adapter.where"),
        (lambda: ParallelAdapter(where=["mlp", "mlp"]), "parallel_adapter.where"),
        (lambda: ParallelAdapter(scale=float("nan")), "parallel_adapter.scale"),
    ],
)
def test_bad_settings_are_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_config_section_is_checked():
    m = from_dict(
        ParallelAdapter, {"bottleneck": 4, "where": ["self_attn", "mlp"], "activation": "silu"}, "parallel_adapter."
    )
    assert m == ParallelAdapter(bottleneck=4, where=["self_attn", "mlp"], activation="silu")
    with pytest.raises(ConfigError, match=r"parallel_adapter.where\[0\]"):
        from_dict(ParallelAdapter, {"where": ["ffn"]}, "parallel_adapter.")
    with pytest.raises(ConfigError, match="houlsby.activation"):
        from_dict(Houlsby, {"activation": "tanh"}, "houlsby.")


def test_config_dict_round_trips():
    m = ParallelAdapter(bottleneck=16, activation="gelu", scale=2.0, where=["self_attn", "mlp"])
    data = m.config_dict()
    assert data == {
        "method": "parallel_adapter",
        "bottleneck": 16,
        "activation": "gelu",
        "scale": 2.0,
        "where": ["self_attn", "mlp"],
    }
    data.pop("method")
    assert ParallelAdapter(**data) == m
