"""AdaLoRA: SVD-form updates P Λ Q on the target linears (hooks), PEFT's RankAllocator and format."""

from __future__ import annotations

import io
import json

import pytest
import torch
from safetensors.torch import load_file

from qtrain.config import ConfigError, from_dict
from qtrain.lora import LoRASpec, is_lora_parameter, lora_modules
from qtrain.methods import mark_trainable
from qtrain.methods.adalora import AdaLoRA
from qtrain.methods.io import load_method, save_method
from qtrain.methods.lora import LoRA as LoRAParameters
from qtrain.model import enable_checkpointing, load_model
from qtrain.train import loss_sum

# Rows that are multiples of 64: away from the bitsandbytes 0.50.2 CPU dequantization bug (see test_ia3.py).
BNB_SHAPES = {"intermediate_size": 192}
# fp32 on both sides, the same NF4-dequantized weights and the same adapter products (as test_ia3.py).
FP32_TOL = {"atol": 1e-5, "rtol": 0}
EFFECT_MIN = 0.05  # perturbed triplets (A, B ~ N(0, 0.1), λ ~ N(0, 1)) move the logits by ~0.3
TARGETS = ("q_proj", "v_proj")
PARAMS = ("adalora_a", "adalora_e", "adalora_b")
PEFT_OF = {"adalora_a": "lora_A", "adalora_e": "lora_E", "adalora_b": "lora_B"}



def ids(batch: int = 2, length: int = 11, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model, x=None, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(x if x is not None else ids(), **kw).logits


def ours(path, lora=None):
    torch.manual_seed(0)
    return load_model(str(path), lora, compute_dtype=torch.float32).model


def applied(model, **kw) -> AdaLoRA:
    method = AdaLoRA(**kw)
    method.apply(model)
    mark_trainable(model, [method])
    return method


def perturb(model, method: AdaLoRA, seed: int = 1) -> None:
    """A trained state: A, B ~ N(0, 0.1), λ ~ N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in method.adapted(model).values():
            for name, std in (("adalora_a", 0.1), ("adalora_e", 1.0), ("adalora_b", 0.1)):
                p = getattr(m, name)
                p.copy_(std * torch.randn(p.shape, generator=g))


def bnb_logits(model, x=None) -> torch.Tensor:
    # Inputs that require grad make bnb's Linear4bit dequantize + F.linear (as test_ia3.py).
    model.get_input_embeddings().weight.requires_grad_(True)
    with torch.enable_grad():
        return model(x if x is not None else ids()).logits.detach()


def peft_params(peft_model) -> dict[str, torch.nn.Parameter]:
    """PEFT's AdaLoRA parameters by OUR names (`<module>.adalora_a|e|b`)."""
    out = {}
    for n, p in peft_model.base_model.model.named_parameters():
        for ours_name, peft_name in PEFT_OF.items():
            suffix = f".{peft_name}.default"
            if n.endswith(suffix):
                out[n.removesuffix(suffix) + "." + ours_name] = p
    return out


def synthetic_step(params: list[dict[str, torch.Tensor]], g: torch.Generator) -> None:
    """An 'optimizer update' and gradients, identical for every dict of parameters (same names)."""
    with torch.no_grad():
        for name in sorted(params[0]):
            delta = 0.05 * torch.randn(params[0][name].shape, generator=g)
            grad = torch.randn(params[0][name].shape, generator=g)
            for ps in params:
                ps[name].add_(delta)
                ps[name].grad = grad.clone()


def drive(model, method: AdaLoRA, steps: int, total: int, seed: int = 5) -> None:
    g = torch.Generator().manual_seed(seed)
    params = {n: p for n, p in model.named_parameters() if method.owns(n)}
    for step in range(1, steps + 1):
        synthetic_step([params], g)
        method.after_step(model, step, total)


def train(model, method: AdaLoRA, steps: range, total: int, opt, b: dict) -> list[float]:
    """The training loop's order: loss (+ regularization), backward, optimizer.step, after_step, zero_grad."""
    n = (b["labels"][:, 1:] != -100).sum()
    losses = []
    for step in steps:
        loss = loss_sum(model, b) / n
        reg = method.regularization(model)
        (loss + reg if reg is not None else loss).backward()
        opt.step()
        method.after_step(model, step, total)
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def peft_adalora(model, **kw):
    peft = pytest.importorskip("peft")
    config = peft.AdaLoraConfig(task_type="CAUSAL_LM", target_modules=list(TARGETS), **kw)
    return peft.get_peft_model(model, config)


# ---- the method ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "kw"),
    [
        ("llama", {}),
        ("qwen2", {}),
        ("llama", {"target_modules": "all-linear", "init_r": 4, "target_r": 2}),
        ("qwen2", {"target_modules": ["down_proj"]}),
    ],
)
def test_trainable_count_matches_the_formula(tiny_model, peft, arch, kw):
    model = tiny_model(arch)
    method = applied(model, **kw)
    c = model.config
    head = c.hidden_size // c.num_attention_heads
    if not kw:  # per layer: 12 (in + out + 1) for q_proj (d -> heads) and v_proj (d -> kv heads)
        d, hq, hkv = c.hidden_size, c.num_attention_heads * head, c.num_key_value_heads * head
        assert method.expected_trainable(c) == c.num_hidden_layers * 12 * (2 * d + hq + hkv + 2)
    assert peft.trainable_count(model) == method.expected_trainable(c)


def test_parameters_init_and_hook(tiny_model):
    model = tiny_model()
    torch.manual_seed(3)
    method = applied(model, init_r=12)
    q = model.model.layers[1].self_attn.q_proj
    assert (q.adalora_a.shape, q.adalora_e.shape, q.adalora_b.shape) == ((12, 64), (12, 1), (64, 12))
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if method.owns(n))
    assert torch.equal(q.adalora_e, torch.zeros(12, 1)) and torch.equal(q.adalora_ranknum, torch.tensor([12.0]))
    a = torch.cat([m.adalora_a.flatten() for m in method.adapted(model).values()])  # PEFT's N(0, 0.02)
    assert abs(a.std().item() - 0.02) < 2e-3 and abs(a.mean().item()) < 2e-3
    assert "adalora_ranknum" not in dict(model.named_parameters()) and not hasattr(
        model.model.layers[0].mlp.up_proj, "adalora_a"
    )
    perturb(model, method)
    x = torch.randn(3, 5, 64)
    with torch.no_grad():  # forward() bypasses the hook
        want = q.forward(x) + (x @ (q.adalora_a * q.adalora_e).T @ q.adalora_b.T) * 8.0 / (12 + 1e-5)
        torch.testing.assert_close(q(x), want, rtol=0, atol=1e-6)
        torch.testing.assert_close(q(x=x), q(x), rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: q/k/v biases
def test_identity_at_init(tiny_model, peft, arch):
    peft.check_identity_at_init(tiny_model(arch), [AdaLoRA(target_modules="all-linear")])


def test_identity_at_init_bf16_is_exact(tiny_model):
    model = tiny_model(dtype=torch.bfloat16)
    before = logits(model)
    applied(model)
    assert torch.equal(logits(model), before)


def test_gradients_reach_only_the_triplets(tiny_model, peft):
    model = tiny_model()
    method = applied(model)
    perturb(model, method)  # λ = 0 at init gives A and B no gradient on the first step (as LoRA's B = 0)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(names) == 3 * 2 * 2
    model.train()
    loss = peft.loss_of(model, peft.batch()) + method.regularization(model)
    loss.backward()
    for n, p in model.named_parameters():
        if n in names:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None and not p.requires_grad, n


def test_first_step_only_lambda_has_a_gradient(tiny_model, peft):
    model = tiny_model()
    method = applied(model, orth_reg_weight=0.0)
    peft.loss_of(model, peft.batch()).backward()
    for n, p in model.named_parameters():
        if method.owns(n):
            assert (p.grad.abs().sum() > 0) == n.endswith("adalora_e"), n


def test_learns_and_allocates_the_budget(tiny_model, peft):
    # through loss_sum (the training loop's decoder path) + the regulariser, pruning 4 -> 2 per target;
    # the constant task (measured 4.95 -> 3.45 in 15 steps; the "count" task moves ~10% in 20)
    model = tiny_model()
    method = applied(model, init_r=4, target_r=2, tinit=3, tfinal=5, deltaT=2)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    losses = train(model, method, range(1, 16), 15, opt, peft.batch(task="constant"))
    assert losses[-1] < 0.8 * losses[0], losses
    n = len(method.adapted(model))
    assert n == 4 and method.budget == 2 * n and sum(map(sum, method.rank_pattern.values())) == 2 * n
    for name, m in method.adapted(model).items():  # the pruned λ stay zero through the final phase
        kept = torch.tensor(method.rank_pattern[name])
        assert torch.equal(m.adalora_e[~kept], torch.zeros((~kept).sum(), 1))
    assert (method.trainer_state()["exp_avg_ipt"]) == {}  # dropped after the final allocation, as PEFT


@pytest.mark.parametrize(
    "schedule",
    [
        {"tinit": 2, "tfinal": 2, "deltaT": 1, "total_step": 10},
        {"tinit": 1, "tfinal": 3, "deltaT": 3, "total_step": 12},
    ],
)
def test_after_step_reproduces_peft_rank_allocator(tiny_checkpoint, tiny_model, schedule):
    from transformers import AutoModelForCausalLM

    path = tiny_checkpoint()
    total = schedule["total_step"]
    model = tiny_model()
    config = {"init_r": 6, "target_r": 2, "beta1": 0.8, "beta2": 0.7, **schedule}
    ours_kw = {**config, "total_step": None} if schedule["deltaT"] == 1 else config  # T from the run, or set
    method = applied(model, **ours_kw)
    ref = peft_adalora(AutoModelForCausalLM.from_pretrained(path), **config)
    allocator = ref.base_model.rankallocator
    mine = {n: p for n, p in model.named_parameters() if method.owns(n)}
    theirs = peft_params(ref)
    assert mine.keys() == theirs.keys() and len(mine) == 12
    with torch.no_grad():
        for n, p in mine.items():
            theirs[n].copy_(p)
    g = torch.Generator().manual_seed(7)
    pruned = []
    for step in range(1, total + 1):
        synthetic_step([mine, theirs], g)
        method.after_step(model, step, total)
        ref.base_model.update_and_allocate(step)
        assert method.budget == allocator.budget_schedule(step)[0], step
        for n, p in mine.items():
            assert torch.equal(p, theirs[n]), (step, n)  # the same λ masked
        pattern = ref.peft_config["default"].rank_pattern
        if pattern is not None:
            assert {k.removesuffix(".lora_E.default"): v for k, v in pattern.items()} == method.rank_pattern, step
        emas = method.trainer_state()
        for n in mine:  # the same EMAs, bit for bit (empty after the final allocation on both sides)
            key = n.rsplit(".", 1)[0] + "." + PEFT_OF[n.rsplit(".", 1)[1]] + ".default"
            for ours_key, peft_dict in (("exp_avg_ipt", allocator.exp_avg_ipt), ("exp_avg_unc", allocator.exp_avg_unc)):
                assert (n in emas[ours_key]) == (key in peft_dict), (step, n)
                if key in peft_dict:
                    assert torch.equal(emas[ours_key][n], peft_dict[key]), (step, n, ours_key)
        pruned.append(sum(int((m.adalora_e == 0).sum()) for m in method.adapted(model).values()))
    final = total - schedule["tfinal"]
    assert method.budget == 2 * 4 and sum(map(sum, method.rank_pattern.values())) == 2 * 4
    assert pruned[schedule["tinit"] - 1] == 0 and pruned[final - 1] == pruned[-1] == 6 * 4 - 2 * 4


def test_regularization_equals_peft(tiny_checkpoint, tiny_model):
    from transformers import AutoModelForCausalLM

    model = tiny_model()
    method = applied(model, orth_reg_weight=0.3)
    perturb(model, method)
    ref = peft_adalora(AutoModelForCausalLM.from_pretrained(tiny_checkpoint()), orth_reg_weight=0.3, total_step=10)
    theirs = peft_params(ref)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if method.owns(n):
                theirs[n].copy_(p)
    x = ids()
    with_reg = ref(input_ids=x, labels=x).loss
    ref.peft_config["default"].orth_reg_weight = 0.0
    without = ref(input_ids=x, labels=x).loss
    reg = method.regularization(model)
    assert reg.item() > 0.1  # N(0, 0.1) rows are far from orthonormal (measured 0.54)
    torch.testing.assert_close(reg, (with_reg - without).detach(), rtol=0, atol=1e-5)
    reg.backward()  # A and B only
    assert all((p.grad is not None) != n.endswith("adalora_e") for n, p in model.named_parameters() if method.owns(n))
    assert AdaLoRA(orth_reg_weight=0.0).regularization(model) is None


def test_save_load_round_trip(tiny_model, tmp_path):
    trained = tiny_model()
    method = applied(trained, init_r=6, target_r=2, tinit=1, tfinal=2, total_step=8)
    perturb(trained, method)
    drive(trained, method, steps=5, total=8)  # past the final allocation (step 6): pruned
    kept = {n: sum(v) for n, v in method.rank_pattern.items()}
    assert sum(kept.values()) == 8
    target = save_method(trained, method, tmp_path, "tiny")
    assert sorted(p.name for p in target.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "method.safetensors",
    ]
    saved = load_file(target / "adapter_model.safetensors")
    for name, k in kept.items():
        assert saved[f"base_model.model.{name}.lora_A"].shape == (k, 64)
        assert saved[f"base_model.model.{name}.lora_E"].shape == (k, 1)
        assert saved[f"base_model.model.{name}.lora_B"].shape[1] == k
    cfg = json.loads((target / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] == {f"{n}.lora_E": v for n, v in method.rank_pattern.items()} and cfg["total_step"] == 8
    want = logits(trained)
    for resume in (False, True):  # PEFT's pruned tensors (zero padded) or the init_r training state
        fresh = tiny_model()
        again = AdaLoRA(**{k: v for k, v in method.config_dict().items() if k != "method"})
        again.apply(fresh)
        load_method(fresh, again, tmp_path, resume=resume)
        got = logits(fresh)
        if resume:
            assert torch.equal(got, want)
        else:  # the kept triplets packed first: the same sum in another order
            torch.testing.assert_close(got, want, **FP32_TOL)
            assert again.rank_pattern == {n: [True] * k + [False] * (6 - k) for n, k in kept.items()}
            assert again.to_peft(again.state_dict(fresh)).keys() == saved.keys()


def test_from_peft_with_the_rank_pattern_restores_positions(tiny_model):
    model = tiny_model()
    method = applied(model, init_r=6, target_r=2, tinit=1, tfinal=1, total_step=6)
    perturb(model, method)
    drive(model, method, steps=5, total=6)
    pattern = {f"{n}.lora_E": v for n, v in method.rank_pattern.items()}
    state = method.state_dict(model)
    back = AdaLoRA(init_r=6, target_r=2).from_peft(method.to_peft(state), rank_pattern=pattern)
    assert back.keys() == state.keys()
    for n, t in back.items():  # PEFT's file drops the pruned triplets: they come back as zeros
        keep = torch.tensor(method.rank_pattern[n.rsplit(".", 1)[0]])
        want = state[n] * (keep[None, :] if n.endswith("adalora_b") else keep[:, None])
        assert torch.equal(t, want), n
    assert not torch.equal(back[n], state[n])  # (the training state keeps them: `folds`)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_model, peft):
    results = []
    for checkpointing in (False, True):
        model = tiny_model()
        method = applied(model, lora_dropout=0.1)
        perturb(model, method)
        if checkpointing:
            enable_checkpointing(model)
        calls: list[int] = []
        model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        model.train()
        torch.manual_seed(11)  # the adapter's dropout: recomputed with the same RNG state
        loss = loss_sum(model, peft.batch())
        (loss + method.regularization(model)).backward()
        assert len(calls) == (2 if checkpointing else 1)
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (loss0, grads0), (loss1, grads1) = results
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=1e-5)
    assert grads0.keys() == grads1.keys() and len(grads0) == 12
    for n in grads0:
        torch.testing.assert_close(grads1[n], grads0[n], rtol=0, atol=1e-6, msg=n)


def test_trainer_state_resume_is_bit_for_bit(tiny_model, peft, tmp_path):
    kw = {"init_r": 6, "target_r": 3, "tinit": 1, "tfinal": 1, "deltaT": 1}  # T = 5: final allocation at 4
    b = peft.batch(rows=2, length=16)

    def fresh():
        model = tiny_model()
        torch.manual_seed(4)
        method = applied(model, **kw)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        return model, method, opt

    straight, m1, o1 = fresh()
    train(straight, m1, range(1, 6), 5, o1, b)

    first, m2, o2 = fresh()
    train(first, m2, range(1, 3), 5, o2, b)
    save_method(first, m2, tmp_path, "tiny")
    buf = io.BytesIO()
    torch.save({"method": m2.trainer_state(), "optimizer": o2.state_dict()}, buf)
    assert m2.trainer_state()["exp_avg_ipt"] and m2.rank_pattern is not None  # mid-budgeting

    resumed, m3, o3 = fresh()
    load_method(resumed, m3, tmp_path, resume=True)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    m3.load_trainer_state(resumed, state["method"])
    o3.load_state_dict(state["optimizer"])
    train(resumed, m3, range(3, 6), 5, o3, b)
    for (n, p), (n3, p3) in zip(straight.named_parameters(), resumed.named_parameters(), strict=True):
        assert n == n3 and torch.equal(p, p3), n
    assert m3.rank_pattern == m1.rank_pattern and m3.budget == m1.budget == 3 * 4


def test_non_finite_gradients_leave_the_importance_as_it_was(tiny_model):
    model = tiny_model()
    method = applied(model, init_r=4, target_r=2, total_step=8)
    perturb(model, method)
    drive(model, method, steps=2, total=8)
    before = method.trainer_state()
    params = {n: p for n, p in model.named_parameters() if method.owns(n)}
    for p in params.values():
        p.grad = torch.ones_like(p)
    params["model.layers.0.self_attn.q_proj.adalora_e"].grad[1] = float("inf")  # GradScaler: the step was skipped
    method.after_step(model, 3, 8)
    after = method.trainer_state()
    for key in ("exp_avg_ipt", "exp_avg_unc"):
        assert all(torch.equal(after[key][n], before[key][n]) for n in params)
    assert after["budget"] == method.budget_schedule(3, 8, 4)[0] < before["budget"]  # the schedule goes on
    assert sum(map(sum, method.rank_pattern.values())) == after["budget"]


def test_packed_and_padded_batches(tiny_model):
    model = tiny_model()
    method = applied(model)
    perturb(model, method)
    a, b, c = ids(1, 5, 1), ids(1, 4, 2), ids(1, 9, 3)

    def hidden(**kw):
        with torch.no_grad():
            return model.get_decoder()(use_cache=False, **kw).last_hidden_state

    packed = torch.cat([torch.cat([a, b], 1), c], 0)  # row 0: two examples, row 1: one
    pos = torch.stack([torch.cat([torch.arange(5), torch.arange(4)]), torch.arange(9)])
    h = hidden(input_ids=packed, position_ids=pos)
    for got, x in ((h[0, :5], a), (h[0, 5:], b), (h[1], c)):
        torch.testing.assert_close(got, hidden(input_ids=x)[0], rtol=0, atol=1e-5)
    padded = torch.cat([torch.cat([a, torch.zeros(1, 4, dtype=torch.long)], 1), c], 0)  # right padded row 0
    mask = torch.ones_like(padded)
    mask[0, 5:] = 0
    h = hidden(input_ids=padded, attention_mask=mask)
    torch.testing.assert_close(h[0, :5], hidden(input_ids=a)[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(h[1], hidden(input_ids=c)[0], rtol=0, atol=1e-5)


def test_generation_with_cache_equals_recompute(tiny_model):
    model = tiny_model()
    method = applied(model)
    perturb(model, method)
    model.eval()
    x = ids(length=6)
    mask = torch.ones_like(x)
    mask[1, :2] = 0  # left padded, as qtrain.evaluate.generate
    out = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 12)
    seq, m = x, mask
    with torch.no_grad():
        for _ in range(6):
            nxt = model(input_ids=seq, attention_mask=m, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq, m = torch.cat([seq, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
    assert torch.equal(out, seq)


def test_bf16_compute_under_autocast(tiny_model, peft):
    model = tiny_model(dtype=torch.bfloat16)
    method = applied(model)
    perturb(model, method)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**peft.batch())
        reg = method.regularization(model)
    assert torch.isfinite(out.loss) and reg.dtype == torch.float32
    (out.loss + reg).backward()
    for n, p in model.named_parameters():
        if method.owns(n):
            assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), n


def test_composes_with_lora_on_other_linears(tiny_model, peft):
    model = tiny_model("llama", lora=LoRASpec(rank=4, target_modules=["gate_proj", "up_proj", "down_proj"]))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_b.weight.copy_(torch.randn(m.lora_b.weight.shape, generator=g) * 0.1)
    before = logits(model)
    method = AdaLoRA()
    method.apply(model)
    assert torch.equal(logits(model), before)
    names = mark_trainable(model, [method, LoRAParameters()])
    perturb(model, method)
    model.train()
    peft.loss_of(model, peft.batch()).backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) == (n in names), n
    assert not any(method.owns(n) for n in names if is_lora_parameter(n))


def test_remove_restores_the_base(tiny_model):
    model = tiny_model()
    before = logits(model)
    method = applied(model)
    perturb(model, method)
    assert (logits(model) - before).abs().max() > EFFECT_MIN
    method.remove(model)
    assert not any("adalora" in n for n, _ in model.named_parameters()) and torch.equal(logits(model), before)


def test_config_section_and_dict():
    m = from_dict(AdaLoRA, {"init_r": 6, "target_r": 2, "total_step": 100, "target_modules": "all-linear"}, "adalora.")
    assert m == AdaLoRA(init_r=6, target_r=2, total_step=100, target_modules="all-linear")
    data = m.config_dict()
    assert data.pop("method") == "adalora" and AdaLoRA(**data) == m
    assert json.loads(json.dumps(data)) == data  # plain JSON types only
    with pytest.raises(ConfigError, match="adalora.init_r"):
        from_dict(AdaLoRA, {"init_r": 2.5}, "adalora.")


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"init_r": 0}, "adalora.init_r"),
        ({"target_r": 13}, "adalora.target_r"),
        ({"tinit": -1}, "adalora.tinit"),
        ({"deltaT": 0}, "adalora.deltaT"),
        ({"beta1": 1.0}, "adalora.beta1"),
        ({"orth_reg_weight": -0.1}, "adalora.orth_reg_weight"),
        ({"lora_alpha": 0.0}, "adalora.lora_alpha"),
        ({"lora_dropout": 1.0}, "adalora.lora_dropout"),
        ({"total_step": 10, "tinit": 5, "tfinal": 5}, "no budgeting phase"),
        ({"total_step": 3, "tfinal": 2}, "final allocation"),
        ({"target_modules": []}, "adalora.target_modules"),
    ],
)
def test_bad_settings_are_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        AdaLoRA(**kw)


def test_errors(tiny_model):
    with pytest.raises(ValueError, match="matched no linear layer"):
        AdaLoRA(target_modules=["nope"]).apply(tiny_model())
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        AdaLoRA().apply(tiny_model(lora=LoRASpec(rank=4)))
    model = tiny_model()
    method = applied(model, tinit=8, tfinal=2)
    with pytest.raises(ValueError, match="applied twice"):
        AdaLoRA().apply(model)
    with pytest.raises(ValueError, match=r"no budgeting phase.*train.max_steps"):
        method.after_step(model, 1, 10)
    with pytest.raises(RuntimeError, match="has no gradient"):
        method.after_step(model, 1, 20)
    with pytest.raises(ValueError, match="not an AdaLoRA tensor"):
        method.from_peft({"base_model.model.model.layers.0.mlp.up_proj.lora_A": torch.zeros(2, 64)})
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    with pytest.raises(ValueError, match="needs lora_A, lora_E and lora_B"):
        method.from_peft({f"{q}.lora_A": torch.zeros(2, 64)})
    too_big = {
        f"{q}.lora_A": torch.zeros(13, 64),
        f"{q}.lora_E": torch.zeros(13, 1),
        f"{q}.lora_B": torch.zeros(64, 13),
    }
    with pytest.raises(ValueError, match="rank 13 > adalora.init_r=12"):
        method.from_peft(too_big)
    with pytest.raises(ValueError, match="rank pattern"):
        method.mask(model, {"model.layers.0.self_attn.q_proj": [True] * 12})


# ---- parity with transformers + bitsandbytes NF4 + PEFT ---------------------------------------


# PEFT 0.21.2 warns so when it loads its own AdaLoRA saves too (LoRA's rank_pattern check; AdaLoRA's is applied)
@pytest.mark.filterwarnings("ignore:The following rank_pattern keys did not match:RuntimeWarning")
@pytest.mark.parametrize("pruned", [True, False])
def test_peft_loads_our_save(tiny_checkpoint, bnb_nf4, tmp_path, pruned):
    peft = pytest.importorskip("peft")
    path = tiny_checkpoint("llama", **BNB_SHAPES)
    model = ours(path)
    method = applied(model, init_r=6, target_r=2, tinit=1, tfinal=2, total_step=8, lora_alpha=12.0)
    perturb(model, method)
    emptied = "model.layers.1.self_attn.v_proj"  # a target pruned to rank 0: PEFT keeps a [0, in] adapter
    if pruned:
        drive(model, method, steps=7, total=8)
        method.mask(model, {**method.rank_pattern, emptied: [False] * 6})
    target = save_method(model, method, tmp_path, str(path))
    assert (json.loads((target / "adapter_config.json").read_text())["rank_pattern"] is None) != pruned
    ref = peft.PeftModel.from_pretrained(bnb_nf4(path), target).eval()
    shapes = {n: tuple(p.shape) for n, p in peft_params(ref).items()}
    for name in method.adapted(model):
        kept = sum(method.rank_pattern[name]) if pruned else 6
        assert shapes[f"{name}.adalora_a"] == (kept, 64), name
    assert shapes[f"{emptied}.adalora_a"] == ((0 if pruned else 6), 64)
    want = bnb_logits(ref)
    torch.testing.assert_close(logits(model), want, **FP32_TOL)
    with ref.disable_adapter():
        assert (want - bnb_logits(ref)).abs().max() > EFFECT_MIN


def test_we_load_what_peft_saves(tiny_checkpoint, bnb_nf4, tmp_path):
    path = tiny_checkpoint("llama", **BNB_SHAPES)
    config = {"init_r": 6, "target_r": 2, "tinit": 1, "tfinal": 1, "total_step": 6, "lora_alpha": 16}
    ref = peft_adalora(bnb_nf4(path), **config)
    theirs = peft_params(ref)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for n in sorted(theirs):
            theirs[n].copy_(torch.randn(theirs[n].shape, generator=g) * (1.0 if n.endswith("adalora_e") else 0.1))
    for step in range(1, 6):  # PEFT's own allocation, through the final one
        synthetic_step([theirs], g)
        ref.base_model.update_and_allocate(step)
    ref.save_pretrained(tmp_path)
    ref.eval()
    want = bnb_logits(ref)
    saved_cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert sum(t.shape[0] for k, t in tensors.items() if k.endswith("lora_A")) == 2 * 4  # pruned to target

    method = AdaLoRA(**{k: saved_cfg[k] for k in ("target_modules", *config)})
    mine = method.peft_config(str(path))
    assert {k: saved_cfg[k] for k in mine if k not in ("target_modules", "rank_pattern")} == {
        k: v for k, v in mine.items() if k not in ("target_modules", "rank_pattern")
    }
    assert sorted(saved_cfg["target_modules"]) == mine["target_modules"]  # PEFT writes a set
    model = ours(path)
    base = logits(model)
    method.apply(model)
    for pattern in (saved_cfg["rank_pattern"], None):
        method.load_state_dict(model, method.from_peft(tensors, rank_pattern=pattern))
        got = logits(model)
        torch.testing.assert_close(got, want, **FP32_TOL)
        assert (got - base).abs().max() > EFFECT_MIN
        if pattern is not None:  # the positions and the re-save are PEFT's
            assert method.peft_config(str(path))["rank_pattern"] == saved_cfg["rank_pattern"]
            again = method.to_peft(method.state_dict(model))
            assert again.keys() == tensors.keys() and all(torch.equal(again[k], tensors[k]) for k in tensors)
