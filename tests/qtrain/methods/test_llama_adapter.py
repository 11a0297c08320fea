"""LLaMA-Adapter: gated adaption prompts in the top layers' self_attn (forward hooks), PEFT's
ADAPTION_PROMPT format and math."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from qtrain.lora import LoRASpec, lora_modules
from qtrain.methods import mark_trainable
from qtrain.methods.io import load_method, save_method
from qtrain.methods.llama_adapter import LlamaAdapter
from qtrain.methods.lora import LoRA as LoRAParameters
from qtrain.model import enable_checkpointing, load_model
from qtrain.train import loss_sum

# 3 layers (so that adapter_layers=2 leaves the bottom one alone); intermediate 192: away from the
# bitsandbytes 0.50.2 CPU dequantization bug for rows a multiple of 16 but not of 64 (see test_ia3).
SHAPES = {"hidden_size": 64, "intermediate_size": 192, "num_layers": 3, "num_heads": 4, "num_kv_heads": 2}
# fp32 on both sides, the same NF4-dequantized weights, the same operations: measured max |diff| of
# the logits vs PEFT 1.2e-7 (llama, mistral, and loading what PEFT saves), 1.5e-7 (qwen2).
FP32_TOL = {"atol": 1e-5, "rtol": 0}
EFFECT_MIN = 0.05  # gates 0.7 and N(0, 1) prompts move the logits by ~0.14, far above FP32_TOL
TERM_MIN = 5e-3  # one layer's adapter term (weights of std 0.02, gate 0.7): measured max |term| ~0.02
K, L = 5, 2
ARCHS = ["llama", "mistral", "qwen2"]



def ids(batch: int = 2, length: int = 11, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


def model_of(tiny_checkpoint, arch: str = "llama", lora=None, dtype=torch.float32):
    torch.manual_seed(0)
    return load_model(str(tiny_checkpoint(arch, **SHAPES)), lora, compute_dtype=dtype).model


def applied(model, gate: float | None = None, k: int = K, layers: int = L) -> LlamaAdapter:
    """The method applied and marked trainable; `gate`: every gate set to it (a trained state)."""
    method = LlamaAdapter(adapter_len=k, adapter_layers=layers)
    torch.manual_seed(1)
    method.apply(model)
    mark_trainable(model, [method])
    if gate is not None:
        set_gates(model, gate)
    return method


def set_gates(model, value: float) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("llama_adapter.gate"):
                p.fill_(value)


def logits(model, x=None, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(x if x is not None else ids(), **kw).logits


def hidden(model, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model.get_decoder()(use_cache=False, **kw).last_hidden_state


def peft_term(attn, prompt, gate, hidden_states, position_embeddings) -> torch.Tensor:
    """PEFT's AdaptedAttention.forward (peft 0.21.2, tuners/adaption_prompt/layer.py) after the wrapped
    attention, transcribed line by line: the adapter's addition to the attention output."""
    llama_compute_query_states = pytest.importorskip("peft.tuners.adaption_prompt.utils").llama_compute_query_states

    prompt = prompt.unsqueeze(0)  # PEFT's [1, K, D]
    bsz, q_len, _ = hidden_states.shape
    factor = attn.k_proj.in_features // attn.k_proj.out_features
    key, value = attn.k_proj(prompt), attn.v_proj(prompt)
    num_heads = attn.config.num_attention_heads
    adapter_k = key.view(1, K, num_heads // factor, attn.head_dim).repeat(bsz, 1, 1, 1).transpose(1, 2)
    adapter_v = value.view(1, K, num_heads // factor, attn.head_dim).repeat(bsz, 1, 1, 1).transpose(1, 2)
    adapter_k = torch.repeat_interleave(adapter_k, repeats=factor, dim=1)
    adapter_v = torch.repeat_interleave(adapter_v, repeats=factor, dim=1)
    query = llama_compute_query_states(model=attn, hidden_states=hidden_states, position_embeddings=position_embeddings)
    previous_dtype = query.dtype
    scores = torch.matmul(query, adapter_k.transpose(2, 3).to(previous_dtype)) / math.sqrt(attn.head_dim)
    scores = gate * torch.softmax(scores, dim=-1, dtype=torch.float32).to(previous_dtype)
    out = torch.matmul(scores, adapter_v).transpose(1, 2).reshape(bsz, q_len, -1)
    return attn.o_proj(out)


def attention_io(model, layer: int) -> dict:
    """Hooks capturing one layer's self_attn inputs and its output before the method's hook (register
    before `apply`); `io["final"]` is filled by `final_output` hooks registered after it."""
    io: dict = {}
    attn = model.model.layers[layer].self_attn

    def before(module, args, kwargs, output):
        io.update(h=kwargs["hidden_states"], pe=kwargs["position_embeddings"], base=output[0])

    attn.register_forward_hook(before, with_kwargs=True)
    return io


def final_output(model, layer: int, io: dict) -> None:
    model.model.layers[layer].self_attn.register_forward_hook(lambda m, a, out: io.update(final=out[0]))


# ---- the method ------------------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "k", "layers"), [("llama", K, L), ("mistral", 1, 3), ("qwen2", 10, 1)])
def test_trainable_count_matches_the_formula(tiny_checkpoint, arch, k, layers):
    model = model_of(tiny_checkpoint, arch)
    method = applied(model, k=k, layers=layers)
    c = model.config
    assert method.expected_trainable(c) == layers * (k * c.hidden_size + 1)  # the paper's: L (K D + 1)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == method.expected_trainable(c)


def test_parameters_names_and_init(tiny_checkpoint):
    model = model_of(tiny_checkpoint)
    before = dict(model.named_parameters())
    method = applied(model)
    params = dict(model.named_parameters())
    assert set(before) <= set(params) and all(params[n] is p for n, p in before.items())  # nothing moved
    new = sorted(set(params) - set(before))
    assert new == [f"model.layers.{i}.llama_adapter.{p}" for i in (1, 2) for p in ("gate", "prompt")]  # the top L
    assert all(method.owns(n) for n in new) and not any(method.owns(n) for n in before)
    assert not method.owns("model.layers.1.self_attn.prompt") and not method.owns("model.layers.1.llama_adapter.x")
    layer = model.model.layers[2].llama_adapter
    assert layer.prompt.shape == (K, 64) and layer.prompt.dtype == torch.float32
    assert layer.gate.shape == (1,) and layer.gate.dtype == torch.float32 and layer.gate.item() == 0  # zero-init
    prompts = torch.cat([model.model.layers[i].llama_adapter.prompt.detach() for i in (1, 2)])
    assert abs(prompts.mean()) < 0.3 and 0.7 < prompts.std() < 1.3  # N(0, 1), as PEFT's normal_()


@pytest.mark.parametrize("arch", ARCHS)
def test_identity_at_init(tiny_checkpoint, peft, arch):
    peft.check_identity_at_init(model_of(tiny_checkpoint, arch), [LlamaAdapter(adapter_len=K, adapter_layers=3)])


def test_identity_at_init_bf16_is_exact(tiny_checkpoint):
    model = model_of(tiny_checkpoint, dtype=torch.bfloat16)
    before = logits(model)
    applied(model)
    assert torch.equal(logits(model), before)


@pytest.mark.parametrize("arch", ARCHS)
def test_the_hook_adds_pefts_term(tiny_checkpoint, arch):
    """Per layer, output = attention + PEFT's adapter term (PEFT's own query function, its GQA repeat)."""
    model = model_of(tiny_checkpoint, arch)
    io = attention_io(model, 2)
    applied(model, gate=0.7)
    final_output(model, 2, io)
    x = ids()
    logits(model, x)
    adapter = model.model.layers[2].llama_adapter
    with torch.no_grad():
        want = peft_term(model.model.layers[2].self_attn, adapter.prompt, adapter.gate, io["h"], io["pe"])
    assert want.abs().max() > TERM_MIN
    torch.testing.assert_close(io["final"] - io["base"], want, rtol=0, atol=1e-6)


def test_gradients_reach_only_the_method_gate_first(tiny_checkpoint, peft):
    model = model_of(tiny_checkpoint)
    method = applied(model)
    loss_sum(model, peft.batch()).backward()
    for n, p in model.named_parameters():
        if n.endswith(".gate"):  # zero-init: the gate gets a gradient at step 0 ...
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        elif method.owns(n):  # ... the prompt a zero one (its term is gate * (...))
            assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p)), n
        else:
            assert p.grad is None and not p.requires_grad, n
    model.zero_grad(set_to_none=True)
    set_gates(model, 0.3)  # once the gate moved, the prompts learn too
    loss_sum(model, peft.batch()).backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) == method.owns(n), n


def test_learns(tiny_checkpoint, peft):
    # The adapter term of the tiny random model is small (attention weights of std 0.02) and the gate
    # starts at 0: the "count" task barely moves in 30 steps (4.61 -> 4.52 at lr 1e-1); a constant
    # target is learnt (measured 4.67 -> 3.58 in 10 steps at lr 3e-1, 3.51 in 30 at 1e-1).
    method = LlamaAdapter(adapter_len=K, adapter_layers=3)
    peft.check_learns(model_of(tiny_checkpoint), [method], steps=12, lr=3e-1, drop=0.8, task="constant")


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_checkpoint, peft):
    results = []
    for checkpointing in (False, True):
        model = model_of(tiny_checkpoint)
        applied(model, gate=0.5)
        if checkpointing:
            enable_checkpointing(model)
        calls: list[int] = []
        model.model.layers[2].llama_adapter.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        model.train()
        loss = loss_sum(model, peft.batch())
        loss.backward()
        assert len(calls) == (2 if checkpointing else 1)  # the adapter is recomputed with its layer
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (loss0, g0), (loss1, g1) = results
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=1e-6)
    assert g0.keys() == g1.keys() and len(g0) == 2 * L
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=0, atol=1e-6, msg=n)


def test_save_load_round_trip_in_pefts_format(tiny_checkpoint, tmp_path):
    trained = model_of(tiny_checkpoint)
    method = applied(trained)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # a trained state: every prompt and gate moved
        for n, p in trained.named_parameters():
            if method.owns(n):
                p.add_(0.5 * torch.randn(p.shape, generator=g))
    target = save_method(trained, method, tmp_path, "base")
    saved = load_file(target / "adapter_model.safetensors")
    assert {k: list(v.shape) for k, v in saved.items()} == {
        f"base_model.model.model.layers.{i}.self_attn.adaption_{p}": ([1, K, 64] if p == "prompt" else [1])
        for i in (1, 2)
        for p in ("prompt", "gate")
    }
    assert json.loads((target / "adapter_config.json").read_text())["peft_type"] == "ADAPTION_PROMPT"
    fresh = model_of(tiny_checkpoint)
    method2 = LlamaAdapter(adapter_len=K, adapter_layers=L)
    method2.apply(fresh)
    load_method(fresh, method2, tmp_path)
    assert torch.equal(logits(fresh), logits(trained))
    method2.remove(fresh)  # and remove gives the base back
    assert not any("llama_adapter" in n for n, _ in fresh.named_parameters())
    assert torch.equal(logits(fresh), logits(model_of(tiny_checkpoint)))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_padded_batch(tiny_checkpoint, arch):
    """Padding changes nothing for the real tokens: right padding, and left padding with position ids."""
    model = model_of(tiny_checkpoint, arch)
    applied(model, gate=0.7)
    a, b = ids(1, 9, 1), ids(1, 6, 2)
    want_a, want_b = hidden(model, input_ids=a)[0], hidden(model, input_ids=b)[0]
    right = torch.cat([a, torch.cat([b, torch.zeros(1, 3, dtype=b.dtype)], 1)])
    mask = torch.ones_like(right)
    mask[1, 6:] = 0
    h = hidden(model, input_ids=right, attention_mask=mask)
    torch.testing.assert_close(h[0], want_a, rtol=0, atol=1e-5)
    torch.testing.assert_close(h[1, :6], want_b, rtol=0, atol=1e-5)
    left = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=b.dtype), b], 1)])
    mask = torch.ones_like(left)
    mask[1, :3] = 0
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    h = hidden(model, input_ids=left, attention_mask=mask, position_ids=pos)
    torch.testing.assert_close(h[1, 3:], want_b, rtol=0, atol=1e-5)
    # the adapter term depends on absolute positions: left padding without position_ids shifts them
    shifted = hidden(model, input_ids=left, attention_mask=mask)
    assert (shifted[1, 3:] - want_b).abs().max() > 1e-3


def test_packed_batch(tiny_checkpoint):
    """Position ids restarting per packed example, no mask: each example as unpacked (every real token
    attends to all prompt tokens; the prompt carries no position, so nothing is special)."""
    model = model_of(tiny_checkpoint)
    applied(model, gate=0.7)
    a, b, c = ids(1, 5, 1), ids(1, 4, 2), ids(1, 9, 3)
    packed = torch.cat([torch.cat([a, b], 1), c])  # row 0: two examples, row 1: one
    pos = torch.stack([torch.cat([torch.arange(5), torch.arange(4)]), torch.arange(9)])
    h = hidden(model, input_ids=packed, position_ids=pos)
    for got, x in ((h[0, :5], a), (h[0, 5:], b), (h[1], c)):
        torch.testing.assert_close(got, hidden(model, input_ids=x)[0], rtol=0, atol=1e-5)
    labels = packed.clone()
    plain = loss_sum(model, {"input_ids": packed, "labels": labels, "position_ids": pos}, chunk=0)
    assert torch.isfinite(plain) and plain > 0


def test_generation_with_cache_equals_recompute(tiny_checkpoint):
    """Decode steps (one new token, the rest in the cache) get the same adapter term as a full
    forward: the prompt keys are recomputed from P, the new token's query has its RoPE position."""
    model = model_of(tiny_checkpoint)
    applied(model, gate=0.7)
    model.eval()
    x = ids(length=6)
    mask = torch.ones_like(x)
    mask[1, :2] = 0  # left padded, as qtrain.evaluate.generate
    out = model.generate(
        input_ids=x,
        attention_mask=mask,
        max_new_tokens=5,
        do_sample=False,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    seq, m, steps = x, mask, []
    with torch.no_grad():
        for _ in range(5):  # recompute the whole sequence each step, positions from the mask as generate's
            pos = (m.cumsum(-1) - 1).clamp_min(0)
            steps.append(model(input_ids=seq, attention_mask=m, position_ids=pos, use_cache=False).logits[:, -1])
            nxt = steps[-1].argmax(-1, keepdim=True)
            seq, m = torch.cat([seq, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
    assert torch.equal(out.sequences, seq)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(steps), rtol=0, atol=1e-5)
    set_gates(model, 0.0)
    pos = (m.cumsum(-1) - 1).clamp_min(0)
    base = logits(model, seq, attention_mask=m, position_ids=pos)[:, -6:-1]  # the same positions without the adapter
    assert (base - torch.stack(steps, 1)).abs().max() > EFFECT_MIN


def test_composes_with_lora(tiny_checkpoint):
    """The prompt goes through the LoRA-adapted k/v/o projections (as PEFT's would through LoRA-wrapped
    ones), and LoRA's A, B and the adapter all train."""
    model = model_of(tiny_checkpoint, lora=LoRASpec(rank=4))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in lora_modules(model).values():  # non-zero B: the LoRA updates are really there
            m.lora_b.weight.copy_(torch.randn(m.lora_b.weight.shape, generator=g) * 0.1)
    before = logits(model)
    io = attention_io(model, 1)
    method = LlamaAdapter(adapter_len=K, adapter_layers=L)
    torch.manual_seed(1)
    method.apply(model)
    final_output(model, 1, io)
    assert torch.equal(logits(model), before)  # identity on top of LoRA
    names = mark_trainable(model, [method, LoRAParameters()])
    set_gates(model, 0.5)
    model.train()
    loss_sum(model, {"input_ids": ids(), "labels": ids()}).backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) == (n in names), n
    model.eval()
    logits(model)
    attn, adapter = model.model.layers[1].self_attn, model.model.layers[1].llama_adapter
    assert attn.k_proj.rank == 4 and attn.o_proj.rank == 4
    with torch.no_grad():
        want = peft_term(attn, adapter.prompt, adapter.gate, io["h"], io["pe"])
        no_lora = torch.nn.functional.linear(adapter.prompt, attn.k_proj.base_weight(torch.float32))
    torch.testing.assert_close(io["final"] - io["base"], want, rtol=0, atol=1e-6)
    assert (attn.k_proj(adapter.prompt) - no_lora).abs().max() > 1e-3  # k_proj(P) includes LoRA's update


def test_biased_o_proj_counts_its_bias_once(tiny_checkpoint):
    """llama with attention_bias=True: o_proj(attn + a) = o_proj(attn) + W_o a, identity at init (PEFT
    would add o_proj's bias a second time)."""
    model = model_of(tiny_checkpoint)
    for layer in model.model.layers:
        layer.self_attn.o_proj.set_bias(torch.randn(64, generator=torch.Generator().manual_seed(4)))
    before = logits(model)
    io = attention_io(model, 2)
    applied(model)
    final_output(model, 2, io)
    assert torch.equal(logits(model), before)
    set_gates(model, 0.7)
    logits(model)
    attn, adapter = model.model.layers[2].self_attn, model.model.layers[2].llama_adapter
    with torch.no_grad():
        want = peft_term(attn, adapter.prompt, adapter.gate, io["h"], io["pe"]) - attn.o_proj.bias
    torch.testing.assert_close(io["final"] - io["base"], want, rtol=0, atol=1e-5)


def test_bf16_under_autocast(tiny_checkpoint, peft):
    model = model_of(tiny_checkpoint, dtype=torch.bfloat16)
    method = applied(model, gate=0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = peft.loss_of(model, peft.batch())
    assert torch.isfinite(loss)
    loss.backward()
    for n, p in model.named_parameters():
        if method.owns(n):
            assert p.grad is not None and p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0, n


def test_deepcopy_hooks_follow_the_copy(tiny_checkpoint):
    model = model_of(tiny_checkpoint)
    applied(model)
    clone = copy.deepcopy(model)
    set_gates(clone, 0.7)
    assert not torch.equal(logits(clone), logits(model))


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"adapter_len": 0}, "llama_adapter.adapter_len"),
        ({"adapter_layers": 0}, "llama_adapter.adapter_layers"),
        ({"adapter_len": True}, "llama_adapter.adapter_len"),
        ({"adapter_layers": 2.0}, "llama_adapter.adapter_layers"),
    ],
)
def test_bad_settings_are_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        LlamaAdapter(**kw)


def test_errors(tiny_checkpoint):
    model = model_of(tiny_checkpoint)
    with pytest.raises(ValueError, match=r"llama_adapter.adapter_layers=30 is more than the model's 3 decoder layers"):
        LlamaAdapter().apply(model)
    with pytest.raises(ValueError, match=r"llama_adapter.adapter_layers to at most 3"):
        LlamaAdapter(adapter_layers=4).expected_trainable(model.config)
    applied(model)
    with pytest.raises(ValueError, match="applied twice"):
        LlamaAdapter(adapter_len=K, adapter_layers=1).apply(model)
    other = model_of(tiny_checkpoint)
    other.config.model_type = "qwen3"  # attention with q_norm: the recomputed query would be wrong
    with pytest.raises(ValueError, match="model type 'qwen3' is not supported"):
        LlamaAdapter(adapter_layers=1).apply(other)
    method = LlamaAdapter(adapter_len=K, adapter_layers=L)
    key = "base_model.model.model.layers.2.self_attn.adaption_prompt"
    with pytest.raises(ValueError, match=r"shape \[1, 4, 64\], expected \[1, 5, hidden_size\]"):
        method.from_peft({key: torch.zeros(1, 4, 64)})
    with pytest.raises(ValueError, match=r"expected \[1\]"):
        method.from_peft({key.replace("prompt", "gate"): torch.zeros(2)})
    with pytest.raises(ValueError, match="not an adaption prompt or gate"):
        method.from_peft({"base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="not a LLaMA-Adapter parameter"):
        method.to_peft({"model.layers.0.self_attn.q_proj.lora_a.weight": torch.zeros(1)})
    wrong_layers = {
        f"base_model.model.model.layers.0.self_attn.adaption_{p}": t
        for p, t in (("prompt", torch.zeros(1, K, 64)), ("gate", torch.zeros(1)))
    }
    with pytest.raises(ValueError, match="is not a llama_adapter parameter of this model"):
        method.load_state_dict(model, method.from_peft(wrong_layers))


# ---- parity with transformers + bitsandbytes NF4 + PEFT ---------------------------------------


@pytest.mark.parametrize("arch", ["llama", "mistral"])  # the model types PEFT's ADAPTION_PROMPT supports
def test_peft_loads_ours(tiny_checkpoint, bnb_nf4, tmp_path, arch):
    peft = pytest.importorskip("peft")
    path = tiny_checkpoint(arch, **SHAPES)
    model = model_of(tiny_checkpoint, arch)
    method = applied(model, gate=0.7)
    target = save_method(model, method, tmp_path, str(path))
    ref = peft.PeftModel.from_pretrained(bnb_nf4(path), target).eval()
    assert sum(1 for n, _ in ref.named_parameters() if "adaption_" in n) == 2 * L
    ref.get_input_embeddings().weight.requires_grad_(True)  # bnb's dequantize + F.linear path (see test_ia3)
    with torch.enable_grad():
        want = ref(ids()).logits.detach()
    got = logits(model)
    torch.testing.assert_close(got, want, **FP32_TOL)
    assert (got - logits(model_of(tiny_checkpoint, arch))).abs().max() > EFFECT_MIN  # the adapter is on


def test_we_load_what_peft_saves(tiny_checkpoint, bnb_nf4, tmp_path):
    peft = pytest.importorskip("peft")
    path = tiny_checkpoint("llama", **SHAPES)
    config = peft.AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=K, adapter_layers=L)
    ref = peft.get_peft_model(bnb_nf4(path), config)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if n.endswith("adaption_gate"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
    ref.save_pretrained(tmp_path)
    ref.eval()
    ref.get_input_embeddings().weight.requires_grad_(True)
    with torch.enable_grad():
        want = ref(ids()).logits.detach()
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    method = LlamaAdapter(adapter_len=saved["adapter_len"], adapter_layers=saved["adapter_layers"])
    ours_cfg = method.peft_config(str(path))
    assert {k: saved[k] for k in ours_cfg} == ours_cfg
    model = model_of(tiny_checkpoint)
    method.apply(model)
    method.load_state_dict(model, method.from_peft(load_file(tmp_path / "adapter_model.safetensors")))
    got = logits(model)
    torch.testing.assert_close(got, want, **FP32_TOL)
    assert (got - logits(model_of(tiny_checkpoint))).abs().max() > EFFECT_MIN


def test_qwen2_matches_pefts_adapted_attention(tiny_checkpoint, bnb_nf4):
    """PEFT refuses qwen2 ("Unsupported model type"); its AdaptedAttention module itself (llama's math)
    wrapped around the bnb qwen2 attentions gives our logits."""
    pytest.importorskip("peft")
    from peft.tuners.adaption_prompt.layer import AdaptedAttention

    path = tiny_checkpoint("qwen2", **SHAPES)
    model = model_of(tiny_checkpoint, "qwen2")
    method = applied(model, gate=0.7)
    tensors = method.to_peft(method.state_dict(model))
    ref = bnb_nf4(path)
    for layer in ref.model.layers[-L:]:
        layer.self_attn = AdaptedAttention("llama", K, layer.self_attn)
    missing, unexpected = ref.load_state_dict(
        {k.removeprefix("base_model.model."): v for k, v in tensors.items()}, strict=False
    )
    assert not unexpected and not [k for k in missing if "adaption" in k]
    ref.eval().get_input_embeddings().weight.requires_grad_(True)
    with torch.enable_grad():
        want = ref(ids()).logits.detach()
    got = logits(model)
    torch.testing.assert_close(got, want, **FP32_TOL)
    assert (got - logits(model_of(tiny_checkpoint, "qwen2"))).abs().max() > EFFECT_MIN
