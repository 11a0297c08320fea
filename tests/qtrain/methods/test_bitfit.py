"""BitFit: biases only; zero biases added where the architecture has none."""

from __future__ import annotations

import pytest
import torch

from qtrain.methods import BitFit


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj", "down_proj"]])
def test_trainable_count_matches_the_formula(tiny_model, peft, arch, targets):
    model = tiny_model(arch)
    method = BitFit(target_modules=targets)
    peft.apply(model, [method])
    assert peft.trainable_count(model) == method.expected_trainable(model.config)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_identity_at_init(tiny_model, peft, arch):
    peft.check_identity_at_init(tiny_model(arch), [BitFit()])


def test_qwen2_biases_start_from_the_checkpoint(tiny_model, peft):
    model = tiny_model("qwen2")
    before = model.model.layers[0].self_attn.q_proj.bias.detach().clone()
    peft.apply(model, [BitFit()])
    after = model.model.layers[0].self_attn.q_proj.bias
    assert after.dtype == torch.float32 and after.requires_grad and torch.equal(after, before.float())


def test_gradients_reach_only_biases(tiny_model, peft):
    peft.check_gradients_only_on_method(tiny_model(), [BitFit()])


def test_learns(tiny_model, peft):
    peft.check_learns(tiny_model(), [BitFit()], lr=3e-2, task="constant")  # biases cannot depend on the input


def test_save_load_round_trip(tiny_model, peft):
    trained = tiny_model()
    peft.check_learns(trained, [BitFit()], steps=5, lr=3e-2, drop=1.0)
    tensors = BitFit().state_dict(trained)
    fresh = tiny_model()
    method = BitFit()
    peft.apply(fresh, [method])
    method.load_state_dict(fresh, tensors)
    b = peft.batch()
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=b["input_ids"]).logits, trained(input_ids=b["input_ids"]).logits, rtol=0, atol=0)


def test_no_target_is_an_error(tiny_model):
    with pytest.raises(ValueError, match="matched no linear layer"):
        BitFit(target_modules=["nope"]).apply(tiny_model())
