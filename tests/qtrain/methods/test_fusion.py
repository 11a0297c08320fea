"""AdapterFusion: frozen stage-1 Pfeiffer adapters (saved adapter dirs) fused per layer by a learned attention."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qtrain.methods import mark_trainable
from qtrain.methods.adapters import Pfeiffer
from qtrain.methods.fusion import AdapterFusion
from qtrain.methods.io import load_method, save_method

_STAGE1: dict[str, list[str]] = {}  # built once per test session (read-only afterwards)


@pytest.fixture
def stage1(tiny_model, peft, tmp_path_factory):
    """Two stage-1 Pfeiffer adapter dirs, trained a few steps on different tasks (non-zero W_up)."""
    if "dirs" not in _STAGE1:
        root = tmp_path_factory.mktemp("stage1")
        for i, (task, m) in enumerate([("count", 8), ("constant", 4)]):
            model = tiny_model()
            torch.manual_seed(i)
            peft.check_learns(model, [Pfeiffer(bottleneck=m)], steps=4, lr=2e-2, drop=1.0, task=task)
            save_method(model, Pfeiffer(bottleneck=m), root / f"task{i}", "tiny")
        _STAGE1["dirs"] = [str(root / "task0"), str(root / "task1")]
    return list(_STAGE1["dirs"])


def fused(tiny_model, peft, dirs, **kw):
    model = tiny_model()
    method = AdapterFusion(adapters=dirs, **kw)
    names = peft.apply(model, [method])
    return model, method, names


def stage1_model(tiny_model, path):
    """The base model with one stage-1 adapter loaded the Pfeiffer way."""
    model = tiny_model()
    data = json.loads((Path(path) / "pfeiffer" / "method.json").read_text())
    data.pop("method")
    method = Pfeiffer(**data)
    method.apply(model)
    load_method(model, method, Path(path))
    return model


def test_trainable_count_matches_the_formula(tiny_model, peft, stage1):
    model, method, names = fused(tiny_model, peft, stage1)
    c = model.config
    d = c.hidden_size
    assert method.expected_trainable(c) == c.num_hidden_layers * (3 * d * d + 2 * d)
    assert peft.trainable_count(model) == method.expected_trainable(c)
    assert all(".adapter_fusion." in n for n in names)
    layer = model.model.layers[0]
    assert len(layer.fusion_adapters) == 2 and layer.fusion_adapters[1].down.weight.shape == (4, d)
    assert layer.adapter_fusion.value.bias is None
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if method.owns(n))
    assert not method.owns("model.layers.0.fusion_adapters.0.up.weight")


def test_stage1_adapters_are_loaded_and_frozen(tiny_model, peft, stage1):
    model, _, _ = fused(tiny_model, peft, stage1)
    for k, path in enumerate(stage1):
        ref = stage1_model(tiny_model, path)
        for i, layer in enumerate(model.model.layers):
            want = ref.model.layers[i].adapter_mlp.state_dict()
            got = layer.fusion_adapters[k].state_dict()
            assert want.keys() == got.keys()
            for n in want:
                assert torch.equal(got[n], want[n]), (k, i, n)
                assert want[n].abs().sum() > 0 or n.startswith("down.bias")


def test_gradients_only_on_fusion_and_stage1_unchanged(tiny_model, peft, stage1):
    model, method, names = fused(tiny_model, peft, stage1)
    assert set(names) == {n for n, _ in model.named_parameters() if method.owns(n)}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if ".fusion_adapters." in n}
    assert frozen and not any(p.requires_grad for n, p in model.named_parameters() if n in frozen)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = peft.loss_of(model, peft.batch())
    loss.backward()
    for n, p in model.named_parameters():
        if n in names and n.endswith("key.bias"):
            # q·b_K is the same for every adapter: the softmax ignores it (gradient 0 up to rounding)
            w = dict(model.named_parameters())[n.replace("bias", "weight")].grad
            assert p.grad is not None and p.grad.abs().max() <= 1e-5 * w.abs().max(), n
        elif n in names:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{n}: no gradient"
        else:
            assert p.grad is None and not p.requires_grad, f"{n}: frozen parameter got a gradient"
    opt.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_one_adapter_at_init_is_that_adapter(tiny_model, peft, stage1):
    """One adapter: s = 1, so the output is h + W_V Δ; W_V = I (+1e-6 off the diagonal) at init."""
    ids = peft.batch()["input_ids"]
    ref = stage1_model(tiny_model, stage1[0])
    model, _, _ = fused(tiny_model, peft, stage1[:1])
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=0, atol=1e-5)
        for layer in model.model.layers:
            layer.adapter_fusion.value.weight.copy_(torch.eye(64))  # exactly the identity
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=0, atol=0)


def test_value_identity_and_equal_weights_give_the_mean(tiny_model, peft, stage1):
    """W_V = I and equal scores (W_Q = 0, b_Q = 0): out = h + (Δ_1 + Δ_2)/2, the mean of the adapted outputs."""
    model, _, _ = fused(tiny_model, peft, stage1)
    layer = model.model.layers[1]
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        fusion = layer.adapter_fusion
        fusion.value.weight.copy_(torch.eye(64))
        fusion.query.weight.zero_()
        h = layer.mlp.forward(x)  # forward() bypasses the hook
        a = [h + adapter(h) for adapter in layer.fusion_adapters]  # each adapter's full output
        deltas = torch.stack([adapter(h) for adapter in layer.fusion_adapters], dim=-2)
        assert torch.equal(fusion.weights(h, deltas), torch.full((2, 5, 2), 0.5))
        torch.testing.assert_close(layer.mlp(x), (a[0] + a[1]) / 2, rtol=1e-6, atol=1e-7)
        # the default init is close to that mean: scores (W_Q h)·(W_K Δ) are small
        fresh, _, _ = fused(tiny_model, peft, stage1)
        s = fresh.model.layers[1].adapter_fusion.weights(h, deltas)
        assert (s - 0.5).abs().max() < 1e-3


def test_attention_formula(tiny_model, peft, stage1):
    model, _, _ = fused(tiny_model, peft, stage1, temperature=2.0)
    layer = model.model.layers[0]
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in layer.adapter_fusion.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        x = torch.randn(2, 5, 64, generator=g)
        h = layer.mlp.forward(x)
        f = layer.adapter_fusion
        d = [ad(h) for ad in layer.fusion_adapters]
        q = h @ f.query.weight.T + f.query.bias
        scores = torch.stack([(q * (dn @ f.key.weight.T + f.key.bias)).sum(-1) for dn in d], -1) / 2.0
        s = scores.softmax(-1)
        want = h + sum(s[..., n : n + 1] * (d[n] @ f.value.weight.T) for n in range(2))
        torch.testing.assert_close(layer.mlp(x), want, rtol=1e-5, atol=1e-6)


def test_learns(tiny_model, peft, stage1):
    """On the "constant" task the fusion of (count, constant) adapters falls to 0.85 x its start
    (40 steps) and below the stage-1 "constant" adapter alone; on "count", which neither tiny
    stage-1 adapter learnt much (4.62 -> 4.52), it only reaches 0.97."""
    model = tiny_model()
    _, last = peft.check_learns(model, [AdapterFusion(adapters=stage1)], steps=40, lr=1e-2, drop=0.9, task="constant")
    with torch.no_grad():
        alone = peft.loss_of(stage1_model(tiny_model, stage1[1]), peft.batch(task="constant")).item()
    assert last < alone, (last, alone)


def test_save_load_round_trip(tiny_model, peft, stage1, tmp_path, monkeypatch):
    trained = tiny_model()
    method = AdapterFusion(adapters=stage1)
    peft.check_learns(trained, [method], steps=5, lr=1e-2, drop=1.0)
    target = save_method(trained, method, tmp_path / "fusion", "tiny")
    assert sorted(p.name for p in target.iterdir()) == ["method.json", "method.safetensors"]
    config = json.loads((target / "method.json").read_text())
    assert config == {  # tmp_path is absolute
        "method": "adapter_fusion", "adapters": stage1, "temperature": 1.0, "regularization_weight": 0.01,
        "attention_dim": None, "value": True,
    }  # fmt: skip
    from safetensors.torch import load_file

    saved = load_file(target / "method.safetensors")
    assert saved.keys() == method.state_dict(trained).keys()
    assert all(".adapter_fusion." in n for n in saved)  # the stage-1 adapters are referenced, not copied
    monkeypatch.chdir(tmp_path)  # the recorded paths do not depend on the working directory
    config.pop("method")
    again = AdapterFusion(**config)
    fresh = tiny_model()
    peft.apply(fresh, [again])
    load_method(fresh, again, tmp_path / "fusion")
    ids = peft.batch()["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, trained(input_ids=ids).logits, rtol=0, atol=0)


def test_relative_paths_are_saved_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert AdapterFusion(adapters=["a", "b"]).config_dict()["adapters"] == [str(tmp_path / "a"), str(tmp_path / "b")]


def test_missing_stage1_adapter_is_a_clear_error(tiny_model, stage1, tmp_path):
    gone = str(tmp_path / "no_such_adapter")
    with pytest.raises(FileNotFoundError, match=r"adapter_fusion\.adapters\[1\].*no_such_adapter"):
        AdapterFusion(adapters=[stage1[0], gone]).apply(tiny_model())
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"adapters\[0\].*pfeiffer/method.json.*holds no Pfeiffer"):
        AdapterFusion(adapters=[str(empty)]).apply(tiny_model())


def test_a_stage1_adapter_of_another_model_is_an_error(tiny_model, stage1, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad" / "pfeiffer"
    bad.mkdir(parents=True)
    src = Path(stage1[0]) / "pfeiffer"
    (bad / "method.json").write_text((src / "method.json").read_text())
    tensors = {n: t for n, t in load_file(src / "method.safetensors").items() if ".layers.1." not in n}
    save_file(tensors, bad / "method.safetensors")
    with pytest.raises(ValueError, match=r"bad/pfeiffer/method.safetensors: no value for 'model.layers.1"):
        AdapterFusion(adapters=[str(tmp_path / "bad")]).apply(tiny_model())


def test_regularization(tiny_model, peft, stage1):
    model, method, _ = fused(tiny_model, peft, stage1)
    d, L = 64, model.config.num_hidden_layers
    # W_V = I + 1e-6 off the diagonal: 0.01 · L · (d² - d) · 1e-12
    torch.testing.assert_close(
        method.regularization(model), torch.tensor(0.01 * L * (d * d - d) * 1e-12), rtol=1e-3, atol=0
    )
    with torch.no_grad():
        model.model.layers[0].adapter_fusion.value.weight.zero_()
    assert method.regularization(model).item() == pytest.approx(0.01 * d, rel=1e-4)
    method.regularization_weight = 0.5
    assert method.regularization(model).item() == pytest.approx(0.5 * d, rel=1e-4)
    method.regularization_weight = 0.0
    assert method.regularization(model) is None
    with pytest.raises(ValueError, match="regularization_weight: must be a finite number >= 0"):
        AdapterFusion(adapters=stage1, regularization_weight=-1.0)


def test_applied_twice_and_empty_are_errors(tiny_model, stage1):
    model = tiny_model()
    AdapterFusion(adapters=stage1).apply(model)
    with pytest.raises(ValueError, match="already has a"):
        AdapterFusion(adapters=stage1).apply(model)
    with pytest.raises(ValueError, match="adapter_fusion.adapters: give"):
        AdapterFusion().apply(tiny_model())
    mark_trainable(model, [AdapterFusion(adapters=stage1)])


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"temperature": 0.0}, "adapter_fusion.temperature"),
        ({"temperature": float("nan")}, "adapter_fusion.temperature"),
        ({"adapters": ["a", "a"]}, "adapter_fusion.adapters"),
        ({"adapters": [""]}, "adapter_fusion.adapters"),
    ],
)
def test_bad_settings_are_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        AdapterFusion(**kw)


def test_bf16_compute_under_autocast(tiny_model, peft, stage1):
    model = tiny_model(dtype=torch.bfloat16)
    method = AdapterFusion(adapters=stage1)
    peft.apply(model, [method])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**peft.batch())
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for n, p in model.named_parameters():
        if method.owns(n):
            assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), n


def test_attention_dim_and_no_value(tiny_model, peft, stage1):
    """The options that make fusion affordable at d = 4096: query/key a x d, and W_V = I (no parameters,
    no regulariser). Count = L·2·(a·d + a); one adapter gives exactly its own output (s = 1, W_V = I)."""
    model, method, names = fused(tiny_model, peft, stage1[:1], attention_dim=8, value=False)
    d, L = 64, model.config.num_hidden_layers
    assert peft.trainable_count(model) == L * 2 * (8 * d + 8) == method.expected_trainable(model.config)
    assert all(".value." not in n for n in names) and method.regularization(model) is None
    assert model.model.layers[0].adapter_fusion.query.weight.shape == (8, d)
    x = peft.batch()["input_ids"]
    with torch.no_grad():
        got = model(input_ids=x).logits
    torch.testing.assert_close(got, stage1_model(tiny_model, stage1[0])(input_ids=x).logits, rtol=0, atol=1e-5)
    peft.loss_of(model, peft.batch()).backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n in names)
    with pytest.raises(ValueError, match="attention_dim: a positive integer or null"):
        AdapterFusion(adapters=stage1, attention_dim=0)
