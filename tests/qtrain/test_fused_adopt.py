"""qtrain.fused.adopt: what the fused modules rely on when they take over a stock module's state.

`adopt(module, fused_cls)` makes a `fused_cls` instance without `__init__` and gives it the stock
instance's `__dict__` entries. These tests pin each property the swap depends on, on stock
transformers modules (plain nn.Linear projections: no checkpoint, no NF4): the same parameter,
buffer, child and hook objects, unchanged names and state-dict keys, hook handles that still
remove, and the stock computation still reachable (through the MRO for the attention classes, and
through the adopted attributes for the norm and the MLP).
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama import modeling_llama as llama

from qtrain.fused import FusedAttention, FusedLlamaAttention, FusedMLP, FusedOps, FusedRMSNorm
from qtrain.fused.adopt import adopt

CONFIG = dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
              num_hidden_layers=1, vocab_size=64, attn_implementation="sdpa")  # fmt: skip
ON = FusedOps(enabled="on")


def stock_modules() -> dict[str, torch.nn.Module]:
    """A stock Llama attention, MLP and RMSNorm (random weights, fp32), with a non-unit norm weight."""
    torch.manual_seed(0)
    config = LlamaConfig(**CONFIG)
    norm = llama.LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    norm.register_buffer("scratch", torch.arange(3.0))  # a buffer, persistent: in the state dict
    return {
        "attention": llama.LlamaAttention(config, layer_idx=0),
        "mlp": llama.LlamaMLP(config),
        "norm": norm,
    }


FUSED = {"attention": FusedLlamaAttention, "mlp": FusedMLP, "norm": FusedRMSNorm}


@pytest.mark.parametrize("kind", list(FUSED))
def test_adopted_module_holds_the_same_objects_under_the_same_names(kind):
    stock = stock_modules()[kind]
    params, buffers = dict(stock.named_parameters()), dict(stock.named_buffers())
    children = dict(stock.named_children())
    keys = list(stock.state_dict())
    new = adopt(stock, FUSED[kind])
    assert type(new) is FUSED[kind] and new is not stock
    assert list(dict(new.named_parameters())) == list(params)
    assert all(p is params[n] for n, p in new.named_parameters())  # the same Parameter objects
    assert dict(new.named_buffers()).keys() == buffers.keys()
    assert all(b is buffers[n] for n, b in new.named_buffers())
    assert dict(new.named_children()).keys() == children.keys()
    assert all(c is children[n] for n, c in new.named_children())
    assert list(new.state_dict()) == keys
    for name in ("_parameters", "_buffers", "_modules", "_forward_hooks", "_forward_pre_hooks"):
        assert getattr(new, name) is getattr(stock, name), name  # the dicts themselves, not copies
    assert new.training == stock.training


@pytest.mark.parametrize("kind", list(FUSED))
def test_state_dict_round_trips_between_stock_and_adopted(kind):
    stock = stock_modules()[kind]
    fresh = copy.deepcopy(stock)
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    new = adopt(stock, FUSED[kind])
    fresh.load_state_dict(new.state_dict(), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), new.state_dict().values()))
    back = adopt(copy.deepcopy(fresh), FUSED[kind])
    back.load_state_dict(stock_modules()[kind].state_dict(), strict=True)  # and the other way


def test_hooks_registered_before_run_after_and_their_handles_still_remove():
    stock = stock_modules()["norm"]
    seen = []
    pre = stock.register_forward_pre_hook(lambda m, args: seen.append(("pre", type(m).__name__)))
    post = stock.register_forward_hook(lambda m, args, out: seen.append(("post", type(m).__name__)))
    new = adopt(stock, FusedRMSNorm)
    new(torch.randn(2, 32))
    assert seen == [("pre", "FusedRMSNorm"), ("post", "FusedRMSNorm")]
    pre.remove()
    post.remove()  # handles taken on the stock module
    assert not new._forward_hooks and not new._forward_pre_hooks
    seen.clear()
    new(torch.randn(2, 32))
    assert seen == []


def test_attention_keeps_the_stock_class_and_its_forward():
    """The fused attention class subclasses the stock one: isinstance holds, the stock forward is
    reachable through the MRO and computes on the adopted state what the stock module computed, and
    the fused forward (plain nn.Linear projections: every fusion falls back) gives the same."""
    stock = stock_modules()["attention"]
    x = torch.randn(2, 5, 32)
    rotary = llama.LlamaRotaryEmbedding(LlamaConfig(**CONFIG))
    cos_sin = rotary(x, torch.arange(5).expand(2, -1))
    want, _ = stock(x, position_embeddings=cos_sin, attention_mask=None)
    new, skipped = FusedLlamaAttention.from_stock(stock, ON)
    assert isinstance(new, llama.LlamaAttention) and isinstance(new, FusedAttention)
    assert "qkv" in skipped  # nn.Linear projections: not fusable
    through_mro, _ = llama.LlamaAttention.forward(new, x, position_embeddings=cos_sin, attention_mask=None)
    fused_forward, _ = new(x, position_embeddings=cos_sin, attention_mask=None)
    assert torch.equal(through_mro, want)
    torch.testing.assert_close(fused_forward, want, rtol=1e-6, atol=1e-6)
    assert new.layer_idx == 0 and new.config is stock.config and new.head_dim == stock.head_dim


@pytest.mark.parametrize("kind", ["mlp", "norm"])
def test_norm_and_mlp_compute_the_stock_function_from_the_adopted_attributes(kind):
    """FusedRMSNorm and FusedMLP are not stock subclasses: their forwards read the adopted weight,
    variance_epsilon, act_fn and projections."""
    stock = stock_modules()[kind]
    x = torch.randn(2, 5, 32)
    want = stock(x)
    new = FusedRMSNorm.from_stock(stock) if kind == "norm" else FusedMLP.from_stock(stock, ON)[0]
    torch.testing.assert_close(new(x), want, rtol=1e-5, atol=1e-6)
