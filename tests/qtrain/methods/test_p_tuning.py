"""P-tuning: virtual tokens from a trainable prompt encoder (bi-LSTM + MLP, or MLP), placed before
the input or after anchors of the template; PEFT's format (the folded encoder output)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from qtrain.lora import LoRASpec, is_lora_parameter
from qtrain.methods import mark_trainable
from qtrain.methods.io import load_method, save_method
from qtrain.methods.lora import LoRA as LoRAParameters
from qtrain.methods.p_tuning import PTuning
from qtrain.model import enable_checkpointing, load_model
from qtrain.tiny import char_tokenizer
from qtrain.train import loss_sum

BNB_SHAPES = {"hidden_size": 64, "intermediate_size": 192, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2}
FP32_TOL = {"atol": 1e-5, "rtol": 0}  # fp32 on CPU: reordered sums only
K = 5
ANCHOR = "## R:"  # char tokenizer: one token per character
TOK = char_tokenizer()



def ids(batch: int = 2, length: int = 11, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


def text_ids(text: str) -> torch.Tensor:
    return torch.tensor([TOK(text, add_special_tokens=False)["input_ids"]])  # [1, S]


def applied(model, k: int = K, **kw) -> PTuning:
    method = PTuning(num_virtual_tokens=k, **kw)
    torch.manual_seed(1)
    method.apply(model)
    mark_trainable(model, [method])
    return method


def anchored(model, **kw) -> PTuning:
    return applied(model, anchors=[ANCHOR], split=[2, K - 2], encoder_hidden_size=24, **kw)


def virtual(model) -> torch.Tensor:
    with torch.no_grad():
        return model.model.prompt_encoder()  # [K, D]


def hidden(model, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model.get_decoder()(use_cache=False, **kw).last_hidden_state


def layer0_inputs(model) -> dict:
    seen = {}
    model.model.layers[0].register_forward_pre_hook(
        lambda m, a, kw: seen.update(h=a[0] if a else kw["hidden_states"], pos=kw.get("position_ids")), with_kwargs=True
    )
    return seen


@pytest.mark.parametrize(
    "kw",
    [
        {"encoder": "lstm"},  # the paper: 2 bidirectional layers, h = D
        {"encoder": "lstm", "encoder_hidden_size": 24, "encoder_num_layers": 3, "encoder_dropout": 0.1},
        {"encoder": "mlp", "encoder_hidden_size": 40},
    ],
)
def test_trainable_count_is_the_formula(tiny_model, peft, kw):
    model = tiny_model()
    method = applied(model, k=3, **kw)
    d, k, h = 64, 3, kw.get("encoder_hidden_size", 64)
    if kw["encoder"] == "mlp":
        want = k * d + (d * h + h) + (h * h + h) + (h * d + d)
    else:
        layers = kw.get("encoder_num_layers", 2)
        lstm = 2 * (4 * h * d + 4 * h * h + 8 * h) + (layers - 1) * 2 * (4 * h * 2 * h + 4 * h * h + 8 * h)
        want = k * d + lstm + (2 * h * 2 * h + 2 * h) + (2 * h * d + d)
    assert peft.trainable_count(model) == want == method.expected_trainable(model.config)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(n.startswith("model.prompt_encoder.") for n in names)
    assert "model.prompt_encoder.embedding.weight" in names
    assert all(p.dtype == torch.float32 for p in model.model.prompt_encoder.parameters())


@pytest.mark.parametrize("encoder", ["lstm", "mlp"])
def test_same_init_as_peft(tiny_model, encoder):
    """Same layers in PEFT's order, PyTorch's default init: the same seed gives PEFT's encoder."""
    peft = pytest.importorskip("peft")
    from peft.tuners.p_tuning import PromptEncoder

    config = peft.PromptEncoderConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=K, token_dim=64, num_transformer_submodules=1, num_attention_heads=4,
        num_layers=2, encoder_reparameterization_type=encoder.upper(), encoder_hidden_size=24,
    )
    torch.manual_seed(1)
    theirs = PromptEncoder(config).state_dict()
    model = tiny_model()
    applied(model, encoder=encoder, encoder_hidden_size=24)
    ours = model.model.prompt_encoder.state_dict()
    assert list(ours) == list(theirs)
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


def test_inputs_are_extended_and_outputs_keep_their_length(tiny_model):
    model = tiny_model()
    applied(model, encoder_hidden_size=24)
    seen = layer0_inputs(model)
    x = ids()
    mask = torch.ones_like(x)
    mask[0, :3] = 0  # left padding
    h = hidden(model, input_ids=x, attention_mask=mask)
    assert h.shape == (2, 11, 64) and seen["h"].shape == (2, 11 + K, 64)
    v, e = virtual(model), model.model.embed_tokens(x)
    torch.testing.assert_close(seen["h"][1], torch.cat([v, e[1]]))
    torch.testing.assert_close(seen["h"][0], torch.cat([e[0, :3], v, e[0, 3:]]))  # after the left padding
    torch.testing.assert_close(hidden(model, input_ids=x[:1, 3:])[0], h[0, 3:], **FP32_TOL)  # = the unpadded row
    # masked pads change nothing (the virtual tokens stay visible)
    x2 = x.clone()
    x2[0, :3] = 7
    torch.testing.assert_close(hidden(model, input_ids=x2, attention_mask=mask)[0, 3:], h[0, 3:], **FP32_TOL)
    hidden(model, input_ids=x, attention_mask=torch.ones_like(x), position_ids=torch.arange(11).expand(2, 11))
    assert torch.equal(seen["pos"][1], torch.arange(11 + K))
    assert (hidden(tiny_model(), input_ids=x) - h).abs().max() > 1e-3  # no identity at init (the paper has none)


def test_anchors_place_the_segments(tiny_model):
    """split [2, 3]: 2 virtual tokens before the input, 3 right after "## R:" (wherever it is in the row)."""
    model = tiny_model()
    method = anchored(model)
    seen = layer0_inputs(model)
    rows = [text_ids("ab## R:cdefghi"), text_ids("## R:xyz## R:w")]  # anchor mid-row / at the start (first one used)
    x = torch.cat(rows)  # [2, 14]
    h = hidden(model, input_ids=x, attention_mask=torch.ones_like(x))
    assert h.shape == (2, 14, 64) and seen["h"].shape == (2, 14 + K, 64)
    v, e = virtual(model), model.model.embed_tokens(x)
    for row, end in ((0, 7), (1, 5)):  # the anchor's last token is at end - 1
        got = seen["h"][row]
        want = torch.cat([v[:2], e[row, :end], v[2:], e[row, end:]])
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert torch.equal(seen["pos"][0], torch.arange(14 + K))
    # the outputs are the real tokens': those of the expanded sequence run as plain embeddings
    plain = torch.cat([v[:2], e[0, :7], v[2:], e[0, 7:]]).unsqueeze(0)
    method.remove(model)
    ref = hidden(model, inputs_embeds=plain)[0]
    torch.testing.assert_close(h[0], torch.cat([ref[2:9], ref[12:]]), **FP32_TOL)


def test_anchors_with_left_padding_and_packing(tiny_model):
    model = tiny_model()
    anchored(model)
    a, b = text_ids("q## R:ab"), text_ids("xy## R:z")
    alone = [hidden(model, input_ids=r) for r in (a, b)]
    # left padded: the pads are masked, the anchor is found after them
    x = torch.cat([torch.cat([torch.zeros(1, 2, dtype=torch.long), a[:, :6]], 1), b[:, :8]])
    mask = torch.ones_like(x)
    mask[0, :2] = 0
    got = hidden(model, input_ids=x, attention_mask=mask)
    torch.testing.assert_close(got[0, 2:], hidden(model, input_ids=a[:, :6])[0], **FP32_TOL)
    torch.testing.assert_close(got[1], alone[1][0], **FP32_TOL)
    # packed: each example gets both segments, as unpacked
    packed = torch.cat([torch.cat([a, b], 1), torch.cat([b, a], 1)])
    pos = torch.cat([torch.arange(8), torch.arange(8)]).expand(2, 16)
    h = hidden(model, input_ids=packed, position_ids=pos)
    for row, pair in ((0, (0, 1)), (1, (1, 0))):
        torch.testing.assert_close(h[row, :8], alone[pair[0]][0], **FP32_TOL)
        torch.testing.assert_close(h[row, 8:], alone[pair[1]][0], **FP32_TOL)


def test_packed_batch(tiny_model):
    """Position ids restarting per packed example, no mask: each example sees its own prompt, as unpacked;
    rows of different expanded lengths are right-padded."""
    model = tiny_model()
    applied(model, encoder="mlp", encoder_hidden_size=24)
    a, b, c = ids(1, 5, 1), ids(1, 4, 2), ids(1, 9, 3)
    packed = torch.cat([torch.cat([a, b], 1), c], 0)  # row 0: two examples (2K virtual), row 1: one (K)
    pos = torch.stack([torch.cat([torch.arange(5), torch.arange(4)]), torch.arange(9)])
    h = hidden(model, input_ids=packed, position_ids=pos)
    assert h.shape == (2, 9, 64)
    for got, x in ((h[0, :5], a), (h[0, 5:], b), (h[1], c)):
        torch.testing.assert_close(got, hidden(model, input_ids=x)[0], **FP32_TOL)


def test_gradients_only_on_the_encoder(tiny_model, peft):
    model = tiny_model()
    applied(model, encoder_hidden_size=24)
    loss_sum(model, peft.batch()).backward()
    for n, p in model.named_parameters():
        if n.startswith("model.prompt_encoder."):
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None and not p.requires_grad, n


@pytest.mark.parametrize("encoder", ["lstm", "mlp"])
def test_bf16_autocast_training_step(tiny_model, peft, encoder):
    """Under bf16 autocast (qtrain's GPU default; CPU autocast here) the encoder runs in fp32 with
    autocast off: oneDNN has no bf16 LSTM on CPU, and k rows cost nothing. The gradient reaches it in fp32."""
    model = tiny_model(dtype=torch.bfloat16)
    applied(model, encoder=encoder, encoder_hidden_size=24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_sum(model, peft.batch())
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if n.startswith("model.prompt_encoder.")]
    assert grads and all(g is not None and g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize(("encoder", "chunk"), [("lstm", None), ("mlp", 0)])  # chunked lm_head + CE / full logits
def test_learns_through_loss_sum(tiny_model, peft, encoder, chunk):
    # "constant": virtual tokens are input-independent (a frozen random model cannot be prompted to count);
    # the best any final hidden state reaches on it is 296 (the random lm_head's limit), virtual tokens
    # plateau at ~385 (prompt tuning too) from 470 (lstm) / 448 (mlp): 10 steps get there
    model = tiny_model()
    applied(model, encoder=encoder, encoder_hidden_size=32)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    b = peft.batch(task="constant")
    first = loss_sum(model, b, chunk=chunk).item()
    for _ in range(10):
        opt.zero_grad()
        loss_sum(model, b, chunk=chunk).backward()
        opt.step()
    last = loss_sum(model, b, chunk=chunk).item()
    assert last < 0.88 * first, (first, last)
    n = (b["labels"][:, 1:] != -100).sum()  # the plain HF path (labels of the real tokens only) agrees
    torch.testing.assert_close(model(**b).loss * n, loss_sum(model, b, chunk=0), rtol=1e-5, atol=1e-4)


def test_gradient_checkpointing_gives_the_same_loss_and_gradient(tiny_model, peft):
    results = []
    for checkpointing in (False, True):
        model = tiny_model()
        applied(model, encoder_hidden_size=24)
        if checkpointing:
            enable_checkpointing(model)
        model.train()
        loss = loss_sum(model, peft.batch())
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=1e-6)
    for n, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][n], g, rtol=0, atol=1e-6)


@pytest.mark.parametrize("anchors", [False, True])
def test_generation_with_cache_equals_recompute(tiny_model, anchors):
    model = tiny_model()
    if anchors:  # row 0: the anchor ends the prompt (its segment is last in the cache); row 1: mid-prompt, padded
        anchored(model)
        x = torch.cat([text_ids("ab## R:"), torch.cat([torch.zeros(1, 1, dtype=torch.long), text_ids("## R:c")], 1)])
    else:
        applied(model, encoder_hidden_size=24)
        x = ids(length=7)
    model.eval()
    mask = torch.ones_like(x)
    mask[1, :1] = 0  # left padded, as qtrain.evaluate.generate
    out = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 13)
    seq, m = x, mask
    with torch.no_grad():
        for _ in range(6):  # recompute the whole sequence each step
            nxt = model(input_ids=seq, attention_mask=m, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq, m = torch.cat([seq, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
    # generate stops a row at EOS (the tiny model's id 2) and pads it (0); recomputing does not stop
    done = (seq[:, 7:] == model.generation_config.eos_token_id).int().cumsum(-1).roll(1, -1)
    done[:, 0] = 0
    assert torch.equal(out[:, 7:], seq[:, 7:].masked_fill(done.bool(), 0)) and torch.equal(out[:, :7], seq[:, :7])


@pytest.mark.parametrize("name", ["cache", "past_key_values"])  # transformers >= 5.24 / older callers
def test_decode_step_under_either_cache_name(tiny_model, name):
    from transformers import DynamicCache

    model = tiny_model()
    anchored(model)
    x = text_ids("ab## R:cd")
    cache = DynamicCache(config=model.config)
    with torch.no_grad():  # the decoder itself: its hooks see the name as passed
        model.model(input_ids=x[:, :-1], attention_mask=torch.ones_like(x[:, :-1]), **{name: cache})
        step = model.model(input_ids=x[:, -1:], attention_mask=torch.ones_like(x), **{name: cache}).last_hidden_state
        step = model.lm_head(step)[0, -1]
        full = model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).logits[0, -1]
    assert cache.get_seq_length() == x.shape[1] + K
    torch.testing.assert_close(step, full, **FP32_TOL)


def test_decode_step_on_a_cache_of_unknown_prefill(tiny_model):
    """Default placement: the virtual columns are found again from a left-padded mask; anchors: an error."""
    from transformers import DynamicCache

    from qtrain.methods.virtual_tokens import VirtualTokens

    model = tiny_model()
    applied(model, encoder_hidden_size=24)
    x = ids(length=7)
    mask = torch.ones_like(x)
    mask[1, :2] = 0
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=x[:, :-1], attention_mask=mask[:, :-1], cache=cache)
        VirtualTokens.of(model.model)._layouts.clear()  # as if another forward had filled the cache
        step = model(input_ids=x[:, -1:], attention_mask=mask, cache=cache).logits[:, -1]
        full = model(input_ids=x, attention_mask=mask, use_cache=False).logits[:, -1]
    torch.testing.assert_close(step, full, **FP32_TOL)
    model = tiny_model()
    anchored(model)
    x = text_ids("ab## R:cd")
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=x[:, :-1], cache=cache)
        VirtualTokens.of(model.model)._layouts.clear()
        with pytest.raises(ValueError, match="anchor placement needs the prefill's layout"):
            model(input_ids=x[:, -1:], cache=cache)


def test_save_load_round_trip_and_resume(tiny_model, tmp_path):
    trained = tiny_model()
    method = applied(trained, encoder="lstm", encoder_hidden_size=24)
    with torch.no_grad():
        for p in trained.model.prompt_encoder.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = ids()
    with torch.no_grad():  # (with autograd on, CPU's LSTM kernels differ in the last bits)
        want = trained(x).logits
    target = save_method(trained, method, tmp_path, "base")
    folded = load_file(target / "adapter_model.safetensors")
    assert set(folded) == {"prompt_embeddings"} and torch.equal(folded["prompt_embeddings"], virtual(trained))
    assert set(load_file(target / "method.safetensors")) == set(method.state_dict(trained))  # the raw encoder
    resumed = tiny_model()
    method2 = PTuning(num_virtual_tokens=K, encoder="lstm", encoder_hidden_size=24)
    method2.apply(resumed)
    load_method(resumed, method2, tmp_path, resume=True)
    assert resumed.model.prompt_encoder.lstm_head is not None
    with torch.no_grad():
        assert torch.equal(resumed(x).logits, want)
    inference = tiny_model()
    method3 = PTuning(num_virtual_tokens=K, encoder="lstm", encoder_hidden_size=24)
    method3.apply(inference)
    load_method(inference, method3, tmp_path)  # PEFT's format: folded
    enc = inference.model.prompt_encoder
    assert enc.lstm_head is None and enc.mlp_head is None
    assert list(method3.state_dict(inference)) == ["model.prompt_encoder.embedding.weight"]
    with torch.no_grad():
        assert torch.equal(inference(x).logits, want)
    method3.remove(inference)
    torch.testing.assert_close(inference(x).logits, tiny_model()(x).logits, rtol=0, atol=0)


def test_anchored_saves_in_qtrains_format(tiny_model, tmp_path):
    """PEFT would put every virtual token first: with anchors the method is saved in qtrain's format."""
    trained = tiny_model()
    method = anchored(trained)
    assert method.peft_type is None and PTuning().peft_type == "P_TUNING"
    x = text_ids("ab## R:cdef")
    want = trained(x).logits.detach()
    target = save_method(trained, method, tmp_path, "base")
    assert sorted(p.name for p in target.iterdir()) == ["method.json", "method.safetensors"]
    fresh = tiny_model()
    method2 = PTuning(**{k: v for k, v in json.loads((target / "method.json").read_text()).items() if k != "method"})
    method2.apply(fresh)
    load_method(fresh, method2, tmp_path)
    assert torch.equal(fresh(x).logits.detach(), want)


def test_composes_with_lora(tiny_model):
    model = tiny_model("llama", lora=LoRASpec(rank=4))
    method = PTuning(num_virtual_tokens=K, encoder_hidden_size=24)
    method.apply(model)
    names = mark_trainable(model, [method, LoRAParameters()])
    assert "model.prompt_encoder.embedding.weight" in names and any(is_lora_parameter(n) for n in names)
    loss_sum(model, {"input_ids": ids(), "labels": ids()}).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.model.prompt_encoder.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_b" in n)


def test_errors(tiny_model):
    for kw, match in [
        ({"num_virtual_tokens": 0}, "p_tuning.num_virtual_tokens must be a positive integer"),
        ({"encoder": "gru"}, "p_tuning.encoder must be one of"),
        ({"encoder_hidden_size": 0}, "p_tuning.encoder_hidden_size"),
        ({"encoder": "mlp", "encoder_num_layers": 3}, "applies to encoder 'lstm' only"),
        ({"encoder": "mlp", "encoder_dropout": 0.1}, "applies to encoder 'lstm' only"),
        ({"encoder_dropout": 1.0}, "p_tuning.encoder_dropout must be in"),
        ({"anchors": ["A:"]}, "p_tuning.split needs len\\(anchors\\) \\+ 1 = 2 entries"),
        ({"anchors": ["A:"], "split": [1, 2]}, "sums to 3, not num_virtual_tokens = 5"),
        ({"split": [2, 3]}, "without anchors"),
        ({"anchors": [""], "split": [2, 3]}, "non-empty strings"),
    ]:
        with pytest.raises(ValueError, match=match):
            PTuning(num_virtual_tokens=kw.pop("num_virtual_tokens", K), **kw)
    model = tiny_model()
    anchored(model)
    with pytest.raises(ValueError, match="applied twice"):
        PTuning(num_virtual_tokens=2).apply(model)
    x = torch.cat([text_ids("ab## R:c"), text_ids("ab## Rxc")])
    missing = r"p_tuning.anchors\[0\] '## R:' \(token ids \[7, 7, 4, 54, 30\]\) is not in row 1"
    with pytest.raises(ValueError, match=missing):
        hidden(model, input_ids=x)
    with pytest.raises(ValueError, match="need input_ids"):
        hidden(model, inputs_embeds=model.model.embed_tokens(x[:1]))
    method = PTuning(num_virtual_tokens=K, encoder_hidden_size=24)
    with pytest.raises(ValueError, match=r"expected \[5, D\]"):
        method.from_peft({"prompt_embeddings": torch.zeros(3, 64)})
    fresh = tiny_model()
    method.apply(fresh)
    with pytest.raises(ValueError, match=r"has shape \[5, 32\], expected \[5, 64\]"):
        method.load_state_dict(fresh, {"model.prompt_encoder.embedding.weight": torch.zeros(5, 32)})


# ---- parity with transformers + bitsandbytes NF4 + PEFT ---------------------------------------


def bnb_logits(model, x) -> torch.Tensor:
    model.get_input_embeddings().weight.requires_grad_(True)  # bnb's dequantize + F.linear path
    with torch.enable_grad():
        return model(input_ids=x, attention_mask=torch.ones_like(x)).logits.detach()


def our_logits(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x, attention_mask=torch.ones_like(x)).logits


@pytest.mark.parametrize("encoder", ["lstm", "mlp"])
def test_peft_loads_our_prompt(tiny_checkpoint, bnb_nf4, tmp_path, encoder):
    peft = pytest.importorskip("peft")
    path = tiny_checkpoint("llama", **BNB_SHAPES)
    torch.manual_seed(0)
    model = load_model(str(path), None, compute_dtype=torch.float32).model
    method = applied(model, encoder=encoder, encoder_hidden_size=24)
    save_file(method.to_peft(method.state_dict(model)), tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps(method.peft_config(str(path)), indent=2))
    ref = peft.PeftModel.from_pretrained(bnb_nf4(path), tmp_path).eval()
    assert ref.peft_config["default"].encoder_reparameterization_type == encoder.upper()
    x = ids()
    want = bnb_logits(ref, x)
    assert want.shape[1] == K + 11
    torch.testing.assert_close(our_logits(model, x), want[:, K:], **FP32_TOL)


def test_we_load_what_peft_saves(tiny_checkpoint, bnb_nf4, tmp_path):
    peft = pytest.importorskip("peft")
    path = tiny_checkpoint("llama", **BNB_SHAPES)
    config = peft.PromptEncoderConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=K, encoder_reparameterization_type="LSTM", encoder_hidden_size=24
    )
    torch.manual_seed(3)
    ref = peft.get_peft_model(bnb_nf4(path), config)
    method = PTuning(num_virtual_tokens=K, encoder="lstm", encoder_hidden_size=24)
    assert ref.get_nb_trainable_parameters()[0] == method.expected_trainable(ref.config)  # PEFT counts the same
    ref.save_pretrained(tmp_path)
    ref.eval()
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    torch.manual_seed(0)
    model = load_model(str(path), None, compute_dtype=torch.float32).model
    method.apply(model)
    ours = method.peft_config(str(path))
    for key in ("peft_type", "task_type", "num_virtual_tokens", "token_dim", "num_transformer_submodules",
                "num_attention_heads", "num_layers", "encoder_reparameterization_type", "encoder_hidden_size",
                "encoder_num_layers", "encoder_dropout"):
        assert saved[key] == ours[key], key
    x = ids()
    want = bnb_logits(ref, x)[:, K:]  # PEFT's training-mode model: its encoder runs
    # PEFT's encoder loads into ours by name (same layout), gives the same prompt and logits
    theirs = {f"model.prompt_encoder.{n}": t for n, t in ref.prompt_encoder["default"].state_dict().items()}
    method.load_state_dict(model, theirs)
    torch.testing.assert_close(our_logits(model, x), want, **FP32_TOL)
    folded = load_file(tmp_path / "adapter_model.safetensors")
    ours = method.to_peft(method.state_dict(model))["prompt_embeddings"]
    torch.testing.assert_close(ours, folded["prompt_embeddings"], rtol=0, atol=1e-6)
    # and the folded prompt PEFT saved
    method.load_state_dict(model, method.from_peft(folded))
    assert model.model.prompt_encoder.lstm_head is None
    torch.testing.assert_close(our_logits(model, x), want, **FP32_TOL)
