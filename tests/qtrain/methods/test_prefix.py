"""Prefix tuning (MLP reparameterisation, folded when saved) and P-tuning v2 (deep prompts): key/value
prefixes at every layer through hooks on the decoder and its attentions; PEFT's PREFIX_TUNING format."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from qtrain.lora import LoRASpec, is_lora_parameter
from qtrain.methods import mark_trainable
from qtrain.methods.io import load_method, save_method
from qtrain.methods.lora import LoRA as LoRAParameters
from qtrain.methods.prefix import PrefixCache, PrefixTuning, PTuningV2, prefix_dims
from qtrain.model import enable_checkpointing, load_model
from qtrain.train import loss_sum

BNB_SHAPES = {"hidden_size": 64, "intermediate_size": 192, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2}
# fp32 on both sides over the same dequantized NF4 weights, the prefixes enter attention as the same fp32
# tensors (measured against PEFT + bnb NF4: 0, bit-identical, llama and qwen2, both methods, with and
# without a padded mask). Packed vs unpacked, padded vs unpadded, eager vs sdpa and cached vs recomputed
# generation only reorder fp32 sums (measured <= 1.2e-6).
FP32_TOL = {"atol": 1e-5, "rtol": 0}
EFFECT_MIN = 0.05  # the prefixes move the tiny model's logits by ~0.5
K = 5
METHODS = [PTuningV2, PrefixTuning]
IDS = ["p_tuning_v2", "prefix_tuning"]



def ids(batch: int = 2, length: int = 11, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


def applied(model, cls=PrefixTuning, k: int = K, **kw):
    method = cls(num_virtual_tokens=k, **kw)
    torch.manual_seed(1)
    method.apply(model)
    mark_trainable(model, [method])
    return method


def logits(model, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(**kw).logits


def hidden(model, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model.get_decoder()(use_cache=False, **kw).last_hidden_state


def encoder(model):
    return model.get_decoder().prefix_encoder


# ---- the method ------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize(
    "method",
    [
        PTuningV2(num_virtual_tokens=K),
        PrefixTuning(num_virtual_tokens=K),
        PrefixTuning(num_virtual_tokens=3, encoder_hidden_size=48),
        PrefixTuning(num_virtual_tokens=K, prefix_projection=False),
    ],
    ids=["p_tuning_v2", "prefix_tuning", "prefix_tuning_h48", "prefix_tuning_no_mlp"],
)
def test_trainable_count_matches_the_formula(tiny_model, peft, arch, method):
    model = tiny_model(arch)
    peft.apply(model, [method])
    c = model.config
    t, L = c.num_key_value_heads * (c.hidden_size // c.num_attention_heads), c.num_hidden_layers  # GQA: t = 2·16
    assert prefix_dims(c) == {"token_dim": t, "num_attention_heads": c.num_key_value_heads, "num_layers": L}
    k, h = method.num_virtual_tokens, getattr(method, "encoder_hidden_size", None) or t
    if isinstance(method, PrefixTuning) and method.prefix_projection:  # embedding + Linear(t, h) + Linear(h, L·2t)
        formula = k * t + (t * h + h) + (h * L * 2 * t + L * 2 * t)
    else:
        formula = k * L * 2 * t
    assert peft.trainable_count(model) == method.expected_trainable(c) == formula


def test_parameters_and_the_prefix_layout(tiny_model):
    """PEFT's layout: P [k, L·2t] viewed [k, 2L, n_kv, d_h]; layer l's keys at 2l, values at 2l + 1."""
    model = tiny_model()
    method = applied(model, PrefixTuning)
    names = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    assert names == {
        "model.prefix_encoder.embedding.weight": (K, 32),
        "model.prefix_encoder.transform.0.weight": (32, 32),
        "model.prefix_encoder.transform.0.bias": (32,),
        "model.prefix_encoder.transform.2.weight": (128, 32),
        "model.prefix_encoder.transform.2.bias": (128,),
    }
    assert sum(torch.Size(s).numel() for s in names.values()) == 5440 == method.expected_trainable(model.config)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if method.owns(n))
    seen = {}
    for i, layer in enumerate(model.model.layers):  # registered after ours: sees the cache argument we pass on
        layer.self_attn.register_forward_pre_hook(lambda m, a, kw, i=i: seen.update({i: kw["cache"]}), with_kwargs=True)
    logits(model, input_ids=ids(), use_cache=False)
    p = method.to_peft(method.state_dict(model))["prompt_embeddings"].view(K, 4, 2, 16)  # [k, 2L, n_kv, d_h]
    for i in (0, 1):
        cache = seen[i]
        assert isinstance(cache, PrefixCache) and cache.cache is None and cache.key.shape == (2, 2, K, 16)
        torch.testing.assert_close(cache.key, p[:, 2 * i].transpose(0, 1).expand(2, 2, K, 16), rtol=0, atol=0)
        torch.testing.assert_close(cache.value, p[:, 2 * i + 1].transpose(0, 1).expand(2, 2, K, 16), rtol=0, atol=0)


@pytest.mark.parametrize("cls", METHODS, ids=IDS)
def test_changes_the_output_and_remove_restores_the_base(tiny_model, cls):
    """No identity at init (the prefixes are attended to from step 0); outputs keep their shape; the base
    is untouched (remove gives its logits back bit for bit)."""
    model = tiny_model()
    x = ids()
    before = logits(model, input_ids=x)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    method = applied(model, cls)
    after = logits(model, input_ids=x)
    assert after.shape == before.shape and (after - before).abs().max() > EFFECT_MIN
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if not method.owns(n))
    method.remove(model)
    assert not any(method.owns(n) for n, _ in model.named_parameters())
    assert torch.equal(logits(model, input_ids=x), before)
    method.apply(model)  # and can be applied again
    assert (logits(model, input_ids=x) - before).abs().max() > EFFECT_MIN


@pytest.mark.parametrize("cls", METHODS, ids=IDS)
def test_gradients_reach_only_the_prefix(tiny_model, peft, cls):
    peft.check_gradients_only_on_method(tiny_model(), [cls(num_virtual_tokens=K)])
    model = tiny_model()  # and through the training loss path (the decoder, then the chunked lm_head + CE)
    method = applied(model, cls)
    loss_sum(model, peft.batch()).backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) == method.owns(n), n


def test_bf16_compute(tiny_model):
    """bf16 activations: the fp32 prefix is cast to the keys' dtype; its gradients stay fp32."""
    model = tiny_model(dtype=torch.bfloat16)
    method = applied(model, PrefixTuning)
    loss = loss_sum(model, {"input_ids": ids(), "labels": ids()})
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if method.owns(n)]
    assert len(grads) == 5 and all(
        g.dtype == torch.float32 and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads
    )
    fp32 = tiny_model()
    applied(fp32, PrefixTuning)
    torch.testing.assert_close(loss.float(), loss_sum(fp32, {"input_ids": ids(), "labels": ids()}), rtol=2e-2, atol=0)


@pytest.mark.parametrize("cls", METHODS, ids=IDS)
def test_learns(tiny_model, peft, cls):
    # The prefix reaches the logits through attention only (the tiny random model's small o_proj/lm_head):
    # the "count" task hardly moves (-6% in 20 steps); a constant target is learnt (measured 4.83 -> 3.34
    # for P-tuning v2, 4.87 -> 3.25 for prefix tuning).
    peft.check_learns(tiny_model(), [cls(num_virtual_tokens=K)], steps=20, lr=0.3, drop=0.75, task="constant")


def test_positions_follow_the_prefix(tiny_model):
    """Real tokens take positions k.. (PEFT's cache of length k); given position_ids are shifted by k."""
    model = tiny_model()
    applied(model)
    seen = []
    model.model.layers[0].register_forward_pre_hook(lambda m, a, kw: seen.append(kw["position_ids"]), with_kwargs=True)
    x = ids()
    hidden(model, input_ids=x)
    assert torch.equal(seen[-1], torch.arange(K, K + 11)[None])
    pos = torch.arange(11).expand(2, 11) + torch.tensor([[0], [3]])
    hidden(model, input_ids=x, position_ids=pos)
    assert torch.equal(seen[-1], pos + K)
    hidden(model, inputs_embeds=model.model.embed_tokens(x))
    assert torch.equal(seen[-1], torch.arange(K, K + 11)[None])


@pytest.mark.parametrize("cls", METHODS, ids=IDS)
def test_packed_batch_equals_unpacked(tiny_model, cls):
    """position_ids restarting per packed example, no mask: every example sees the prefix, as unpacked."""
    model = tiny_model()
    applied(model, cls)
    a, b, c = ids(1, 5, 1), ids(1, 4, 2), ids(1, 9, 3)
    packed = torch.cat([torch.cat([a, b], 1), c], 0)  # row 0: two examples, row 1: one
    pos = torch.stack([torch.cat([torch.arange(5), torch.arange(4)]), torch.arange(9)])
    h = hidden(model, input_ids=packed, position_ids=pos)
    for got, x in ((h[0, :5], a), (h[0, 5:], b), (h[1], c)):
        torch.testing.assert_close(got, hidden(model, input_ids=x)[0], **FP32_TOL)
    assert (h[0, 5:] - hidden(model, input_ids=packed[:1])[0, 5:]).abs().max() > EFFECT_MIN  # really separated


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_padded_mask(tiny_model, attn):
    """A padded 2D mask hides the pads from the real tokens, never the prefix; eager (additive float
    mask) and sdpa (bool mask, or none on the causal fast path) agree."""
    model = tiny_model()
    applied(model)
    model.set_attn_implementation(attn)
    x = ids(2, 8)
    rows = {}
    for side in ("left", "right"):
        padded = torch.full((2, 11), 0)
        mask = torch.zeros(2, 11, dtype=torch.long)
        cols = slice(3, 11) if side == "left" else slice(0, 8)
        padded[:, cols], mask[:, cols] = x, 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # the real tokens' positions as unpadded
        rows[side] = hidden(model, input_ids=padded, attention_mask=mask, position_ids=pos)[:, cols]
    want = hidden(model, input_ids=x)
    torch.testing.assert_close(rows["left"], want, **FP32_TOL)
    torch.testing.assert_close(rows["right"], want, **FP32_TOL)
    model.set_attn_implementation("sdpa" if attn == "eager" else "eager")
    torch.testing.assert_close(hidden(model, input_ids=x), want, **FP32_TOL)


@pytest.mark.parametrize("cls", METHODS, ids=IDS)
def test_generation_with_cache_equals_recompute(tiny_model, cls):
    model = tiny_model()
    applied(model, cls)
    with torch.no_grad():
        encoder(model).embedding.weight.mul_(0.5)
    model.eval()
    x, mask = ids(length=6), torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0  # left padded, as qtrain.evaluate.generate
    out = model.generate(
        input_ids=x,
        attention_mask=mask,
        max_new_tokens=6,
        do_sample=False,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    assert out.sequences.shape == (2, 12)
    seq, m = x, mask
    for step in range(6):  # recompute the whole sequence each step, positions as generate makes them
        pos = (m.cumsum(-1) - 1).clamp(min=0)
        last = logits(model, input_ids=seq, attention_mask=m, position_ids=pos, use_cache=False)[:, -1]
        torch.testing.assert_close(out.logits[step], last, **FP32_TOL)
        nxt = last.argmax(-1, keepdim=True)
        seq, m = torch.cat([seq, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
    assert torch.equal(out.sequences, seq)


@pytest.mark.parametrize("cls", METHODS, ids=IDS)
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_model, peft, cls):
    results = []
    for checkpointing in (False, True):
        model = tiny_model()
        method = applied(model, cls)
        if checkpointing:
            enable_checkpointing(model)
        calls: list[int] = []
        model.model.layers[0].self_attn.register_forward_pre_hook(lambda *_, c=calls: c.append(1))
        model.train()
        loss = loss_sum(model, peft.batch())
        loss.backward()
        assert len(calls) == (2 if checkpointing else 1)  # recomputed in backward, our prefix hook with it
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if method.owns(n)}))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=1e-6)
    assert results[0][1].keys() == results[1][1].keys()
    for n, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][n], g, rtol=0, atol=1e-6, msg=n)


def trained(model, method, steps: int = 3) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    for _ in range(steps):
        opt.zero_grad()
        loss_sum(model, {"input_ids": ids(), "labels": ids()}).backward()
        opt.step()


def test_prefix_tuning_saves_folded_and_resumes_the_mlp(tiny_model, tmp_path):
    model = tiny_model()
    method = applied(model, PrefixTuning)
    trained(model, method)
    x = ids()
    want = logits(model, input_ids=x)
    state = method.state_dict(model)
    target = save_method(model, method, tmp_path, "base")
    folded = load_file(target / "adapter_model.safetensors")
    assert set(folded) == {"prompt_embeddings"} and folded["prompt_embeddings"].shape == (K, 128)
    assert json.loads((target / "adapter_config.json").read_text())["prefix_projection"] is True
    # resume: the MLP (training state) comes back exactly, and trains on
    fresh = tiny_model()
    again = applied(fresh, PrefixTuning)
    load_method(fresh, again, tmp_path, resume=True)
    got = again.state_dict(fresh)
    assert got.keys() == state.keys() and all(torch.equal(got[n], state[n]) for n in state)
    assert torch.equal(logits(fresh, input_ids=x), want)
    # inference: the folded prefix, the MLP gone, the same outputs bit for bit
    fresh = tiny_model()
    again = applied(fresh, PrefixTuning)
    load_method(fresh, again, tmp_path)
    assert [n for n, _ in fresh.named_parameters() if again.owns(n)] == ["model.prefix_encoder.embedding.weight"]
    assert encoder(fresh).transform is None
    assert torch.equal(logits(fresh, input_ids=x), want)
    assert torch.equal(again.to_peft(again.state_dict(fresh))["prompt_embeddings"], folded["prompt_embeddings"])


def test_p_tuning_v2_round_trip(tiny_model, tmp_path):
    model = tiny_model()
    method = applied(model, PTuningV2)
    trained(model, method)
    x = ids()
    target = save_method(model, method, tmp_path, "base")
    assert sorted(p.name for p in target.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((target / "adapter_config.json").read_text())["prefix_projection"] is False
    fresh = tiny_model()
    again = applied(fresh, PTuningV2)
    load_method(fresh, again, tmp_path)
    assert torch.equal(logits(fresh, input_ids=x), logits(model, input_ids=x))


def test_composes_with_lora(tiny_model):
    model = tiny_model("llama", lora=LoRASpec(rank=4))
    method = PrefixTuning(num_virtual_tokens=K)
    method.apply(model)
    names = mark_trainable(model, [method, LoRAParameters()])
    assert {n for n in names if method.owns(n)} and {n for n in names if is_lora_parameter(n)}
    assert "model.layers.0.self_attn.q_proj.lora_a.weight" in dict(model.named_parameters())  # names unmoved
    loss_sum(model, {"input_ids": ids(), "labels": ids()}).backward()
    for n, p in model.named_parameters():
        if method.owns(n) or "lora_b" in n:  # lora_a: zero gradient while B = 0
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        elif not is_lora_parameter(n):
            assert p.grad is None, n


def test_errors(tiny_model):
    with pytest.raises(ValueError, match="prefix_tuning.num_virtual_tokens must be a positive integer"):
        PrefixTuning(num_virtual_tokens=0)
    with pytest.raises(ValueError, match="p_tuning_v2.num_virtual_tokens"):
        PTuningV2(num_virtual_tokens=True)
    with pytest.raises(ValueError, match="encoder_hidden_size must be a positive integer"):
        PrefixTuning(encoder_hidden_size=0)
    with pytest.raises(ValueError, match="needs prefix_projection: true"):
        PrefixTuning(encoder_hidden_size=64, prefix_projection=False)
    model = tiny_model()
    applied(model, PTuningV2)
    with pytest.raises(ValueError, match="applied twice"):
        PrefixTuning().apply(model)
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="supports attn_implementation sdpa or eager, not 'flash_attention_2'"):
        model(ids())
    with pytest.raises(ValueError, match="not 'flash_attention_2'"):
        PrefixTuning().apply(_with_attention(tiny_model(), "flash_attention_2"))
    method = applied(tiny_model(), PrefixTuning)
    with pytest.raises(ValueError, match=r"expected the single key 'prompt_embeddings'"):
        method.from_peft({"prompt_embeddings": torch.zeros(K, 128), "x": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"shape \[5, 64\], expected \[5, 128\]"):
        method.from_peft({"prompt_embeddings": torch.zeros(K, 64)})
    with pytest.raises(ValueError, match=r"shape \[4, 128\], expected \[5, 128\]"):
        method.from_peft({"prompt_embeddings": torch.zeros(4, 128)})
    with pytest.raises(ValueError, match="expected the prefix_encoder tensors"):
        method.to_peft({"model.layers.0.mlp.up_proj.weight": torch.zeros(1)})


def _with_attention(model, impl: str):
    model.config._attn_implementation = impl
    return model


# ---- parity with transformers + bitsandbytes NF4 + PEFT ---------------------------------------


def bnb_logits(model, **kw) -> torch.Tensor:
    model.get_input_embeddings().weight.requires_grad_(True)  # bnb's dequantize + F.linear path
    with torch.enable_grad():
        return model(**kw).logits.detach()


def ours(path):
    torch.manual_seed(0)
    return load_model(str(path), None, compute_dtype=torch.float32).model


def padded_input():
    x, mask = ids(), torch.ones(2, 11, dtype=torch.long)
    mask[1, :3] = 0
    return x, mask


@pytest.mark.parametrize(
    ("cls", "arch", "options"),
    [
        (PTuningV2, "llama", {}),
        (PrefixTuning, "llama", {}),
        (PrefixTuning, "qwen2", {"k": 3, "encoder_hidden_size": 48}),
    ],
    ids=[*IDS, "prefix_tuning-qwen2-k3-h48"],
)
def test_peft_loads_our_save(tiny_checkpoint, bnb_nf4, tmp_path, cls, arch, options):
    peft = pytest.importorskip("peft")
    path = tiny_checkpoint(arch, **BNB_SHAPES)
    model = ours(path)
    method = applied(model, cls, **options)
    trained(model, method, steps=2)
    save_method(model, method, tmp_path, str(path))
    ref = peft.PeftModel.from_pretrained(bnb_nf4(path), tmp_path / method.name).eval()
    config = ref.peft_config["default"]
    assert config.prefix_projection == (cls is PrefixTuning) and config.num_virtual_tokens == options.get("k", K)
    x, mask = padded_input()
    for kw in ({"input_ids": x}, {"input_ids": x, "attention_mask": mask}):
        want = bnb_logits(ref, **kw)
        torch.testing.assert_close(logits(model, **kw), want, **FP32_TOL)
    with ref.disable_adapter():
        assert (want - bnb_logits(ref, **kw)).abs().max() > EFFECT_MIN  # the prefix is really applied


@pytest.mark.parametrize("projection", [True, False], ids=["prefix_tuning", "p_tuning_v2"])
def test_we_load_what_peft_saves(tiny_checkpoint, bnb_nf4, tmp_path, projection):
    peft = pytest.importorskip("peft")
    path = tiny_checkpoint("llama", **BNB_SHAPES)
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=K, prefix_projection=projection)
    torch.manual_seed(2)
    ref = peft.get_peft_model(bnb_nf4(path), config)
    ref.save_pretrained(tmp_path)
    ref.eval()
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    cls = PrefixTuning if projection else PTuningV2
    model = ours(path)
    method = applied(model, cls)
    mine = method.peft_config(str(path))
    assert {key: saved[key] for key in mine if key != "inference_mode"} == {
        k: v for k, v in mine.items() if k != "inference_mode"
    }
    method.load_state_dict(model, method.from_peft(load_file(tmp_path / "adapter_model.safetensors")))
    x, mask = padded_input()
    torch.testing.assert_close(
        logits(model, input_ids=x, attention_mask=mask), bnb_logits(ref, input_ids=x, attention_mask=mask), **FP32_TOL
    )


def test_greedy_generation_equals_peft(tiny_checkpoint, bnb_nf4, tmp_path):
    """Our `generate` (with the cache) gives PEFT's greedy tokens. PEFT's own generate is broken for
    prefix tuning with transformers 5.24 + peft 0.21.2 (from the second step generate passes the cache
    as `cache=` beside PEFT's fresh prefix under `past_key_values=`; transformers takes `cache`, and PEFT,
    looking for `past_key_values`, neither trims input_ids nor stops re-injecting; use_cache=False too),
    so PEFT's side decodes greedily with its forward over the whole sequence."""
    peft = pytest.importorskip("peft")
    path = tiny_checkpoint("llama", **BNB_SHAPES)
    model = ours(path)
    method = applied(model, PrefixTuning)
    trained(model, method, steps=2)
    save_method(model, method, tmp_path, str(path))
    ref = peft.PeftModel.from_pretrained(bnb_nf4(path), tmp_path / method.name).eval()
    x, mask = padded_input()
    model.eval()
    out = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    seq, m = x, mask
    for _ in range(5):
        pos = (m.cumsum(-1) - 1).clamp(min=0)  # as generate makes them (PEFT shifts them by k, as we do)
        nxt = bnb_logits(ref, input_ids=seq, attention_mask=m, position_ids=pos)[:, -1].argmax(-1, keepdim=True)
        seq, m = torch.cat([seq, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
    assert torch.equal(out, seq)
