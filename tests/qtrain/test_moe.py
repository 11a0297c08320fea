"""Mixture-of-experts (qtrain.moe): Qwen3-MoE and Mixtral with NF4 experts, on tiny random checkpoints
built from their transformers config classes (4 experts, top-2, hidden 64, 2 layers).

References: bitsandbytes quantizes only `nn.Linear`s, so transformers + bitsandbytes leaves a
transformers 5 MoE's 3-D expert parameters in fp32; the references hold the experts as the fp32
dequantization of our NF4 codes (`NF4Experts.dense_weights`). The 20-step loss parity with
attention-only LoRA (all-linear) against transformers + bitsandbytes + PEFT is
tests/qtrain/test_parity.py's, parametrized by the family registry; here, with the experts
targeted, the experts are a dense fp32 re-implementation with LoRA in merged-weight form
(`RefExperts`), PEFT having no per-expert modules to put LoRA on.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from qtrain.adapter import ADAPTER_CONFIG, load_adapter_weights, merge_adapter, read_adapter_config
from qtrain.cli import main
from qtrain.config import load_config
from qtrain.data import batches, synthetic_rows, tokenize_row
from qtrain.estimate import Workload, meta_model, weight_items
from qtrain.lora import LoRALinear, LoRASpec, lora_modules
from qtrain.model import enable_checkpointing, load_base, load_model, read_config
from qtrain.moe import NF4Experts, is_expert, module_key
from qtrain.tiny import char_tokenizer
from qtrain.train import train, train_step

peft = pytest.importorskip("peft")

ARCHS = ["qwen3_moe", "mixtral"]
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_layers": 2}  # rows multiples of 64 (bnb CPU dequantize)
STEPS, LR, LOSS_ATOL = 20, 2e-3, 1e-4
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
REPO = Path(__file__).resolve().parents[2]


def _batches(tokenizer, n: int, batch_size: int = 4) -> list[dict]:
    rows = synthetic_rows(n * batch_size, seed=7)
    stream = batches(
        [tokenize_row(tokenizer, r, max_length=96) for r in rows], batch_size, tokenizer.pad_token_id, seed=0
    )
    return [next(stream) for _ in range(n)]


def nf4_experts(model: nn.Module) -> dict[str, NF4Experts]:
    return {n: m for n, m in model.named_modules() if isinstance(m, NF4Experts)}


def copy_dequantized_experts(ours: nn.Module, ref: nn.Module) -> None:
    """Each transformers experts module of `ref` set to the fp32 dequantization of our NF4 experts."""
    with torch.no_grad():
        for name, experts in nf4_experts(ours).items():
            gate_up, down = experts.dense_weights(torch.float32)
            ref.get_submodule(name).gate_up_proj.copy_(gate_up)
            ref.get_submodule(name).down_proj.copy_(down)


def copy_dequantized_linears(ours: nn.Module, ref: nn.Module) -> None:
    """Every other NF4 linear of `ref` (an fp32 transformers model) set to our dequantized weight."""
    with torch.no_grad():
        for name, m in ours.named_modules():
            if isinstance(m, LoRALinear) and not is_expert(name):
                ref.get_submodule(name).weight.copy_(m.base_weight(torch.float32))


def train_losses(model: nn.Module, data: list[dict], forward) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    losses = []
    for b in data:
        loss = forward(b)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def report(ours: list[float], ref: list[float]) -> str:
    diff = max(abs(a - b) for a, b in zip(ours, ref))
    return f"max |Δloss| {diff:.2e}; ours {ours[0]:.4f}→{ours[-1]:.4f}, ref {ref[0]:.4f}→{ref[-1]:.4f}"


# ---- loading ----


@pytest.mark.parametrize("arch", ARCHS)
def test_experts_load_as_nf4_linears_and_router_stays_16_bit(tiny_checkpoint, arch):
    loaded = load_base(str(tiny_checkpoint(arch, **TINY)), torch.bfloat16)
    experts = nf4_experts(loaded.model)
    assert sorted(experts) == [f"model.layers.{i}.mlp.experts" for i in range(2)]
    linears = [m for n, m in loaded.model.named_modules() if is_expert(n)]
    assert len(linears) == 2 * 4 * 3 and all(m.has_nf4 for m in linears)
    assert not [n for n, p in loaded.model.named_parameters() if p.dim() == 3]  # no 16-bit 3-D experts left
    router = loaded.model.get_submodule("model.layers.0.mlp.gate").weight
    assert router.dtype == torch.bfloat16 and not router.requires_grad


@pytest.mark.parametrize("arch", ARCHS)
def test_nf4_logits_match_a_dequantized_fp32_reference(tiny_checkpoint, arch):
    path = tiny_checkpoint(arch, **TINY)
    ours = load_base(str(path), torch.float32).model
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    x = torch.randint(4, 100, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = (ours(input_ids=x).logits - ref(input_ids=x).logits).abs().max().item()
        copy_dequantized_experts(ours, ref)
        copy_dequantized_linears(ours, ref)
        after = (ours(input_ids=x).logits - ref(input_ids=x).logits).abs().max().item()
    assert before > 1e-3  # the reference is the NF4 one only once our codes are copied in: the test can fail
    assert after < 1e-5, after


def test_fused_3d_checkpoint_loads_as_the_per_expert_one(tiny_checkpoint, tmp_path):
    """A checkpoint in transformers 5's own layout (experts.gate_up_proj [E, 2F, D]) gives the same model."""
    path = tiny_checkpoint("qwen3_moe", **TINY)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    fused = tmp_path / "fused"
    fused.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, fused / "model.safetensors")
    (fused / "config.json").write_text((path / "config.json").read_text())
    char_tokenizer().save_pretrained(fused)
    x = torch.randint(4, 100, (1, 16))
    with torch.no_grad():
        a = load_base(str(path), torch.float32).model(input_ids=x).logits
        b = load_base(str(fused), torch.float32).model(input_ids=x).logits
    assert torch.equal(a, b)


def test_mixtral_checkpoint_names_map_to_the_modules():
    assert (
        module_key("model.layers.3.block_sparse_moe.experts.7.w1.weight")
        == "model.layers.3.mlp.experts.7.gate_proj.weight"
    )
    assert (
        module_key("model.layers.3.block_sparse_moe.experts.7.w3.weight")
        == "model.layers.3.mlp.experts.7.up_proj.weight"
    )
    assert (
        module_key("model.layers.3.block_sparse_moe.experts.7.w2.weight")
        == "model.layers.3.mlp.experts.7.down_proj.weight"
    )
    assert module_key("model.layers.3.block_sparse_moe.gate.weight") == "model.layers.3.mlp.gate.weight"
    assert module_key("model.layers.3.mlp.experts.0.up_proj.weight") == "model.layers.3.mlp.experts.0.up_proj.weight"


# ---- memory ----


def _resident_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


@pytest.mark.parametrize("arch", ARCHS)
def test_resident_bytes_are_nf4_and_what_the_estimator_counts(tiny_checkpoint, arch):
    path = tiny_checkpoint(arch, **TINY)
    loaded = load_base(str(path), torch.bfloat16)
    experts = sum(_resident_bytes(m) for m in nf4_experts(loaded.model).values())
    expert_weights = sum(m.in_features * m.out_features for n, m in loaded.model.named_modules() if is_expert(n))
    assert (
        experts < 0.7 * expert_weights
    )  # 0.65 bytes a weight here (1 KiB of code tables per 8k-weight linear); 2 in bf16
    w = Workload(dtype=torch.bfloat16, device="cpu", backend="torch")
    estimated = sum(i.bytes for i in weight_items(meta_model(read_config(path), None, w), w))
    assert estimated == pytest.approx(_resident_bytes(loaded.model), rel=0.01)


# ---- LoRA targets ----


@pytest.mark.parametrize(
    ("targets", "n_experts"),
    [("all-linear", 0), (ATTENTION, 0), (["up_proj", "q_proj"], 0), ([*ATTENTION, "experts"], 24)],
)
def test_experts_get_lora_only_when_named(tiny_checkpoint, targets, n_experts):
    loaded = load_model(
        str(tiny_checkpoint("qwen3_moe", **TINY)), LoRASpec(rank=4, target_modules=targets), torch.float32
    )
    assert sum(is_expert(t) for t in loaded.targets) == n_experts
    assert sum(not is_expert(t) for t in loaded.targets) == (2 if targets[0] == "up_proj" else 8)
    assert not loaded.model.get_submodule("model.layers.0.mlp.gate").weight.requires_grad


# ---- 20-step loss parity ----


class RefExperts(nn.Module):
    """Dense fp32 experts with LoRA in merged-weight form: every token through every expert
    (W_e + s B_e A_e, gate and up fused as transformers holds them), weighted by its routing weight
    (0 for experts it was not routed to). Starts from our dequantized weights and adapter init."""

    def __init__(self, ours: NF4Experts, scale: float):
        super().__init__()
        experts = [ours.expert(e) for e in range(ours.num_experts)]
        gate_up, down = ours.dense_weights(torch.float32)
        self.register_buffer("gate_up", gate_up)
        self.register_buffer("down", down)
        self.act_fn, self.scale = ours.act_fn, scale
        for p in ("gate_proj", "up_proj", "down_proj"):
            for ab in ("lora_a", "lora_b"):
                init = torch.stack([getattr(getattr(x, p), ab).weight.detach().clone() for x in experts])
                self.register_parameter(f"{p}_{ab}", nn.Parameter(init))

    def delta(self, p: str) -> torch.Tensor:
        return self.scale * getattr(self, f"{p}_lora_b") @ getattr(self, f"{p}_lora_a")

    def forward(self, hidden, top_k_index, top_k_weights):
        gate_up = self.gate_up + torch.cat([self.delta("gate_proj"), self.delta("up_proj")], dim=1)
        down = self.down + self.delta("down_proj")
        out = torch.zeros_like(hidden)
        for e in range(gate_up.shape[0]):
            routed = (top_k_weights * (top_k_index == e)).sum(-1, keepdim=True)
            gate, up = (hidden @ gate_up[e].T).chunk(2, dim=-1)
            out = out + routed * ((self.act_fn(gate) * up) @ down[e].T)
        return out


@pytest.mark.parametrize("arch", ARCHS)
def test_expert_lora_losses_match_a_dequantized_fp32_reference(tiny_checkpoint, arch):
    """LoRA on attention and every expert vs fp32 transformers with our dequantized weights, PEFT LoRA
    on the attention and `RefExperts` for the experts, all from our initial adapter weights."""
    path = tiny_checkpoint(arch, **TINY)
    data = _batches(AutoTokenizer.from_pretrained(path), STEPS)
    spec = LoRASpec(rank=8, alpha=16, target_modules=[*ATTENTION, "experts"])
    torch.manual_seed(0)
    ours = load_model(str(path), spec, compute_dtype=torch.float32)
    assert sum(is_expert(t) for t in ours.targets) == 2 * 4 * 3

    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    copy_dequantized_linears(ours.model, base)
    for name, experts in nf4_experts(ours.model).items():
        parent, _, child = name.rpartition(".")
        setattr(base.get_submodule(parent), child, RefExperts(experts, spec.scale()))
    ref = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, target_modules=ATTENTION, lora_dropout=0.0))
    with torch.no_grad():
        for name, m in lora_modules(ours.model).items():
            if not is_expert(name):
                peft_layer = ref.base_model.model.get_submodule(name)
                peft_layer.lora_A["default"].weight.copy_(m.lora_a.weight)
                peft_layer.lora_B["default"].weight.copy_(m.lora_b.weight)
    for n, p in ref.named_parameters():  # PEFT froze everything but its own adapters
        p.requires_grad = "lora_" in n
    trainable = [p for p in ours.model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in ref.parameters() if p.requires_grad) == sum(p.numel() for p in trainable)

    enable_checkpointing(ours.model)
    ours.model.train()
    opt = torch.optim.AdamW(trainable, lr=LR, weight_decay=0.0)
    our_losses = [train_step(ours.model, [b], opt, trainable, 1.0, "cpu")[0] for b in data]
    ref.train()
    ref_losses = train_losses(ref, data, lambda b: ref(**b).loss)
    print(arch, "attention + expert LoRA vs dequantized fp32 reference:", report(our_losses, ref_losses))
    assert our_losses[-1] < our_losses[0] - 0.1, report(our_losses, ref_losses)
    assert max(abs(a - b) for a, b in zip(our_losses, ref_losses)) < LOSS_ATOL, report(our_losses, ref_losses)


# ---- train → generate → merge, end to end ----


@pytest.mark.parametrize(("arch", "targets"), [("qwen3_moe", "all-linear"), ("mixtral", "[q_proj,v_proj,experts]")])
def test_train_generate_merge(tmp_path, capsys, arch, targets):
    out = tmp_path / "run"
    overrides = [
        f"model.tiny.arch={arch}",
        "model.tiny.hidden_size=64",
        "model.tiny.intermediate_size=128",
        "model.tiny.num_layers=2",
        "train.max_steps=4",
        "train.batch_size=4",
        "train.warmup_steps=1",
        "train.log_every=1",
        "data.num_train=16",
        "data.num_eval=4",
        "eval.exact_match=false",
        "eval.every=0",
        "checkpoint.every=0",
        "lora.rank=4",
        "lora.alpha=8",
        f"lora.target_modules={targets}",
        f"output_dir={out}",
    ]
    cfg = load_config(REPO / "configs" / "quickstart.yaml", overrides)
    result = train(cfg)
    adapter = Path(result["adapter"])
    recorded = json.loads((adapter / ADAPTER_CONFIG).read_text())["target_modules"]
    assert ("experts" in recorded) == ("experts" in targets)

    assert main(["generate", "--adapter", str(adapter), "--max-new-tokens", "6", "--json", "--prompt", "hi"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["completion"] is not None

    merged = merge_adapter(str(out / "base"), adapter, tmp_path / "merged", dtype=torch.float32)
    ours = load_model(str(out / "base"), read_adapter_config(adapter), compute_dtype=torch.float32)
    load_adapter_weights(ours.model, adapter)
    assert sum(is_expert(t) for t in ours.targets) == (24 if "experts" in targets else 0)
    x = torch.randint(4, 100, (1, 16))
    with torch.no_grad():
        want = ours.model(input_ids=x).logits
        got = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)(input_ids=x).logits
    assert (want - got).abs().max().item() < 1e-4
    if "experts" not in targets:  # an attention adapter is a PEFT adapter: equal logits through PEFT
        base = AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32)
        copy_dequantized_experts(ours.model, base)
        copy_dequantized_linears(ours.model, base)
        with torch.no_grad():
            peft_logits = peft.PeftModel.from_pretrained(base, adapter)(input_ids=x).logits
        assert (want - peft_logits).abs().max().item() < 1e-4


@pytest.mark.parametrize("method", ["IA3", "AdaLoRA", "BitFit"])
def test_other_methods_leave_the_experts_alone(tiny_checkpoint, method):
    """all-linear of the other PEFT methods reaches attention only (`base_linears` skips experts)."""
    from qtrain import methods as m

    loaded = load_base(str(tiny_checkpoint("qwen3_moe", **TINY)), torch.float32)
    chosen = getattr(m, method)(target_modules="all-linear")
    chosen.apply(loaded.model)
    trainable = m.mark_trainable(loaded.model, [chosen])
    assert trainable and not [n for n in trainable if ".experts." in n]
