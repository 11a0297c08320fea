"""Prompt tuning: k fp32 virtual token embeddings prepended by hooks on the decoder, PEFT's format."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from qtrain.lora import LoRASpec, is_lora_parameter
from qtrain.methods import mark_trainable
from qtrain.methods.lora import LoRA as LoRAParameters
from qtrain.methods.prompt_tuning import PromptTuning, ensemble_logits, per_row_prompts
from qtrain.model import enable_checkpointing, load_model
from qtrain.train import loss_sum

BNB_SHAPES = {"hidden_size": 64, "intermediate_size": 192, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2}
FP32_TOL = {"atol": 1e-5, "rtol": 0}
K = 5



def ids(batch: int = 2, length: int = 11, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


def applied(model, k: int = K, **kw) -> PromptTuning:
    method = PromptTuning(num_virtual_tokens=k, **kw)
    torch.manual_seed(1)
    method.apply(model)
    mark_trainable(model, [method])
    return method


def hidden(model, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model.get_decoder()(use_cache=False, **kw).last_hidden_state


def test_trainable_count_and_parameter(tiny_model, peft):
    model = tiny_model()
    method = applied(model)
    assert peft.trainable_count(model) == K * 64 == method.expected_trainable(model.config)
    (name,) = [n for n, p in model.named_parameters() if p.requires_grad]
    assert name == "model.prompt_embeddings" and model.model.prompt_embeddings.dtype == torch.float32


def test_inputs_are_extended_and_outputs_keep_their_length(tiny_model):
    model = tiny_model()
    applied(model)
    seen = {}
    model.model.layers[0].register_forward_pre_hook(
        lambda m, a, kw: seen.update(h=a[0] if a else kw["hidden_states"], pos=kw.get("position_ids")), with_kwargs=True
    )
    x = ids()
    mask = torch.ones_like(x)
    mask[0, :3] = 0  # left padding
    h = hidden(model, input_ids=x, attention_mask=mask)
    assert h.shape == (2, 11, 64) and seen["h"].shape == (2, 11 + K, 64)
    p, e = model.model.prompt_embeddings, model.model.embed_tokens(x)
    torch.testing.assert_close(seen["h"][1], torch.cat([p, e[1]]))
    torch.testing.assert_close(seen["h"][0], torch.cat([e[0, :3], p, e[0, 3:]]))  # after the left padding
    assert torch.equal(seen["pos"][0], torch.arange(11 + K))
    # so the left-padded row gives the unpadded row's outputs (RoPE: the same relative positions)
    torch.testing.assert_close(hidden(model, input_ids=x[:1, 3:])[0], h[0, 3:], rtol=0, atol=1e-5)
    # the mask covers the prompt: masked pads change nothing, the prompt (unmasked) changes the output
    x2 = x.clone()
    x2[0, :3] = 7
    torch.testing.assert_close(hidden(model, input_ids=x2, attention_mask=mask)[0, 3:], h[0, 3:], rtol=0, atol=1e-5)
    # explicit position_ids are shifted by k, the virtual tokens take 0..k-1
    pos = torch.arange(11).expand(2, 11)
    hidden(model, input_ids=x, attention_mask=torch.ones_like(x), position_ids=pos)
    assert torch.equal(seen["pos"][1], torch.arange(11 + K))
    # the prompts change the output (no identity expected)
    bare = tiny_model()
    assert (hidden(bare, input_ids=x) - hidden(model, input_ids=x)).abs().max() > 1e-3


def test_gradients_only_on_the_prompt(tiny_model, peft):
    model = tiny_model()
    applied(model)
    loss_sum(model, peft.batch()).backward()
    for n, p in model.named_parameters():
        if n == "model.prompt_embeddings":
            assert p.grad is not None and p.grad.abs().sum() > 0
        else:
            assert p.grad is None and not p.requires_grad, n


@pytest.mark.parametrize("chunk", [None, 0])  # chunked lm_head + CE, and the full logits
def test_learns_through_loss_sum(tiny_model, peft, chunk):
    # "constant": a prompt is input-independent, and a frozen random 2-layer model cannot be prompted
    # to count (that task plateaus at 420 of 424 even after 100 steps at lr 0.1); the best any final
    # hidden state could reach on "constant" is 296 of 466 (the random lm_head's limit); 15 steps: ~387
    model = tiny_model()
    applied(model, init="sample_vocab")
    opt = torch.optim.AdamW([model.model.prompt_embeddings], lr=3e-2)
    b = peft.batch(task="constant")
    first = loss_sum(model, b, chunk=chunk).item()
    for _ in range(15):
        opt.zero_grad()
        loss_sum(model, b, chunk=chunk).backward()
        opt.step()
    last = loss_sum(model, b, chunk=chunk).item()
    assert last < 0.85 * first, (first, last)
    # the plain HF path (labels of the real tokens only) agrees with ours
    n = (b["labels"][:, 1:] != -100).sum()
    torch.testing.assert_close(model(**b).loss * n, loss_sum(model, b, chunk=0), rtol=1e-5, atol=1e-4)


def test_sample_vocab_and_text_init(tiny_model, tiny_checkpoint):
    model = tiny_model()
    applied(model, init="sample_vocab")
    rows = model.model.prompt_embeddings.detach()
    emb = model.model.embed_tokens.weight.detach().float()
    assert all((emb == r).all(-1).any() for r in rows)
    path = tiny_checkpoint("llama", hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4, num_kv_heads=2)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    text = "classify this"
    want = tok(text)["input_ids"]
    model = tiny_model()
    applied(model, k=2 * len(want) + 1, init="text", init_text=text, tokenizer_path=str(path))
    full = (want * 3)[: 2 * len(want) + 1]
    torch.testing.assert_close(model.model.prompt_embeddings.detach(), emb[full])
    model = tiny_model()  # resolved from the model's name_or_path
    applied(model, k=1, init="text", init_text=text)
    torch.testing.assert_close(model.model.prompt_embeddings.detach(), emb[want[:1]])


def test_gradient_checkpointing_gives_the_same_loss_and_gradient(tiny_model, peft):
    results = []
    for checkpointing in (False, True):
        model = tiny_model()
        applied(model)
        if checkpointing:
            enable_checkpointing(model)
        model.train()
        loss = loss_sum(model, peft.batch())
        loss.backward()
        results.append((loss.detach(), model.model.prompt_embeddings.grad.clone()))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=1e-6)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=0, atol=1e-6)


def test_save_load_round_trip(tiny_model, tmp_path):
    from qtrain.methods.io import load_method, save_method

    trained = tiny_model()
    method = applied(trained)
    x = ids()
    want = trained(x).logits.detach()
    target = save_method(trained, method, tmp_path, "base")
    assert set(load_file(target / "adapter_model.safetensors")) == {"prompt_embeddings"}
    fresh = tiny_model()
    method2 = PromptTuning(num_virtual_tokens=K)
    method2.apply(fresh)
    load_method(fresh, method2, tmp_path)
    assert torch.equal(fresh(x).logits.detach(), want)
    method2.remove(fresh)
    torch.testing.assert_close(fresh(x).logits, tiny_model()(x).logits, rtol=0, atol=0)


def test_generation_with_cache_equals_recompute(tiny_model):
    model = tiny_model()
    applied(model)
    with torch.no_grad():
        model.model.prompt_embeddings.mul_(0.5)
    model.eval()
    x = ids(length=6)
    mask = torch.ones_like(x)
    mask[1, :2] = 0  # left padded, as qtrain.evaluate.generate
    out = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 12)
    seq, m = x, mask
    with torch.no_grad():
        for _ in range(6):  # recompute the whole sequence each step
            nxt = model(input_ids=seq, attention_mask=m, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq, m = torch.cat([seq, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
    assert torch.equal(out, seq)


def test_packed_batch(tiny_model):
    """Position ids restarting per packed example, no mask: each example sees its own prompt, as unpacked."""
    model = tiny_model()
    applied(model)
    a, b, c = ids(1, 5, 1), ids(1, 4, 2), ids(1, 9, 3)
    packed = torch.cat([torch.cat([a, b], 1), c], 0)  # row 0: two examples, row 1: one
    pos = torch.stack([torch.cat([torch.arange(5), torch.arange(4)]), torch.arange(9)])
    h = hidden(model, input_ids=packed, position_ids=pos)
    assert h.shape == (2, 9, 64)
    for got, x in ((h[0, :5], a), (h[0, 5:], b), (h[1], c)):
        torch.testing.assert_close(got, hidden(model, input_ids=x)[0], rtol=0, atol=1e-5)


def test_composes_with_lora(tiny_model):
    model = tiny_model("llama", lora=LoRASpec(rank=4))
    method = PromptTuning(num_virtual_tokens=K)
    method.apply(model)
    names = mark_trainable(model, [method, LoRAParameters()])
    assert "model.prompt_embeddings" in names and any(is_lora_parameter(n) for n in names)
    batch = {"input_ids": ids(), "labels": ids()}
    loss_sum(model, batch).backward()
    assert model.model.prompt_embeddings.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_b" in n)


def test_ensemble(tiny_model):
    model = tiny_model()
    applied(model)
    prompts = [torch.randn(K, 64, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    batch = {"input_ids": ids(), "attention_mask": torch.ones(2, 11, dtype=torch.long)}
    mean, votes = ensemble_logits(model, prompts, batch)
    singles = []
    for p in prompts:
        with torch.no_grad(), per_row_prompts(model, p.expand(2, K, 64)):
            singles.append(torch.log_softmax(model(**batch).logits, -1))
    torch.testing.assert_close(mean, torch.stack(singles).mean(0), rtol=0, atol=1e-5)
    preds = torch.stack([s.argmax(-1) for s in singles])
    majority = (preds == votes).sum(0) >= 2
    undecided = (preds[0] != preds[1]) & (preds[1] != preds[2]) & (preds[0] != preds[2])
    assert (majority | undecided).all()
    assert votes.shape == (2, 11)


def test_errors(tiny_model):
    with pytest.raises(ValueError, match="positive integer"):
        PromptTuning(num_virtual_tokens=0)
    with pytest.raises(ValueError, match="needs init_text"):
        PromptTuning(init="text")
    model = tiny_model()
    PromptTuning(num_virtual_tokens=2).apply(model)
    with pytest.raises(ValueError, match="applied twice"):
        PromptTuning(num_virtual_tokens=2).apply(model)
    with pytest.raises(ValueError, match="expected \\[3, D\\]"):
        PromptTuning(num_virtual_tokens=3).from_peft({"prompt_embeddings": torch.zeros(2, 64)})


# ---- parity with transformers + bitsandbytes NF4 + PEFT ---------------------------------------


def bnb_logits(model, x) -> torch.Tensor:
    model.get_input_embeddings().weight.requires_grad_(True)  # bnb's dequantize + F.linear path
    with torch.enable_grad():
        return model(input_ids=x, attention_mask=torch.ones_like(x)).logits.detach()


def test_peft_loads_our_prompt(tiny_checkpoint, bnb_nf4, tmp_path):
    peft = pytest.importorskip("peft")
    path = tiny_checkpoint("llama", **BNB_SHAPES)
    torch.manual_seed(0)
    model = load_model(str(path), None, compute_dtype=torch.float32).model
    method = applied(model, init="sample_vocab")
    with torch.no_grad():
        model.model.prompt_embeddings.add_(0.3 * torch.randn(K, 64))
    save_file(method.to_peft(method.state_dict(model)), tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps(method.peft_config(str(path)), indent=2))
    ref = peft.PeftModel.from_pretrained(bnb_nf4(path), tmp_path).eval()
    x = ids()
    want = bnb_logits(ref, x)
    assert want.shape[1] == K + 11
    with torch.no_grad():
        got = model(input_ids=x, attention_mask=torch.ones_like(x)).logits
    torch.testing.assert_close(got, want[:, K:], **FP32_TOL)


def test_we_load_what_peft_saves(tiny_checkpoint, bnb_nf4, tmp_path):
    peft = pytest.importorskip("peft")
    path = tiny_checkpoint("llama", **BNB_SHAPES)
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=K, prompt_tuning_init="SAMPLE_VOCAB")
    ref = peft.get_peft_model(bnb_nf4(path), config)
    ref.save_pretrained(tmp_path)
    ref.eval()
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    method = PromptTuning(num_virtual_tokens=K, init="sample_vocab")
    torch.manual_seed(0)
    model = load_model(str(path), None, compute_dtype=torch.float32).model
    method.apply(model)
    ours = method.peft_config(str(path))
    for key in ("peft_type", "task_type", "num_virtual_tokens", "token_dim", "num_transformer_submodules",
                "num_attention_heads", "num_layers", "prompt_tuning_init"):
        assert saved[key] == ours[key], key
    method.load_state_dict(model, method.from_peft(load_file(tmp_path / "adapter_model.safetensors")))
    x = ids()
    with torch.no_grad():
        got = model(input_ids=x, attention_mask=torch.ones_like(x)).logits
    torch.testing.assert_close(got, bnb_logits(ref, x)[:, K:], **FP32_TOL)
