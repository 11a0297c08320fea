"""Parity with the standard QLoRA stack: transformers + bitsandbytes (NF4, double quant) + PEFT.

Same tiny checkpoint, same LoRA init (our step-0 adapter loaded into PEFT as trainable), same
batches, same AdamW: the losses of 20 optimizer steps must agree. Both sides compute in fp32, so
the only differences are summation order in the matmuls; we allow 1e-4 absolute on losses ~4.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from qtrain.adapter import save_adapter
from qtrain.data import batches, synthetic_rows, tokenize_row
from qtrain.families import FAMILIES
from qtrain.lora import LoRASpec
from qtrain.model import enable_checkpointing, load_model
from qtrain.train import train_step

peft = pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

STEPS = 20
LOSS_ATOL = 1e-4  # fp32 on both sides; summation order only (observed ~1e-6)
LR = 2e-3


def _batches(tokenizer, n_batches: int, batch_size: int = 4) -> list[dict]:
    rows = synthetic_rows(n_batches * batch_size, seed=7)
    examples = [tokenize_row(tokenizer, r, max_length=96) for r in rows]
    stream = batches(examples, batch_size, tokenizer.pad_token_id, seed=0)
    return [next(stream) for _ in range(n_batches)]


# every family the registry says is parity-tested (qtrain.families; the README table shows it); rsLoRA once
CASES = [("llama", True)] + [(arch, False) for arch, f in FAMILIES.items() if "parity" in f.tested]
# What a family's tiny model needs for the comparison to test its math. Gemma-2: a final logit cap of 1
# that binds (its config's 30 never does on a tiny random model: logits stay under 1); attention keeps
# its cap of 50. Gemma (both): tied and sqrt(D)-scaled embeddings, (1 + w) RMSNorms (four a layer),
# GeGLU, local layers with a 16-token window (rows reach 96); Gemma-3: q/k norms (qtrain.tiny).
PARITY_SETTINGS = {"gemma2": {"final_logit_softcapping": 1.0}}


@pytest.mark.parametrize(("arch", "use_rslora"), CASES)
def test_losses_match_transformers_bnb_peft(tiny_checkpoint, tmp_path, arch, use_rslora, bnb_exact, nf4_experts_into):
    # hidden/intermediate multiples of 64: bitsandbytes 0.50.2's native CPU dequantize is wrong
    # for rows whose length is a multiple of 16 but not 64 (tests/qtrain/test_model.py).
    path = tiny_checkpoint(arch, hidden_size=64, intermediate_size=192, num_layers=2, **PARITY_SETTINGS.get(arch, {}))
    spec = LoRASpec(rank=8, alpha=16, use_rslora=use_rslora, target_modules="all-linear")
    assert_parity(arch, *parity_losses(path, tmp_path, spec, bnb_exact, nf4_experts_into))


def parity_losses(path, tmp_path, spec: LoRASpec, bnb_exact, nf4_experts_into) -> tuple[list[float], list[float]]:
    """20 steps of qtrain (NF4 + LoRA, checkpointed, its own chunked loss) and of transformers +
    bitsandbytes + PEFT from our step-0 adapter, on the same batches: (our losses, theirs).
    `nf4_experts_into` (the conftest fixture): MoE experts of the reference set to ours."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    data = _batches(tokenizer, STEPS)
    torch.manual_seed(0)
    ours = load_model(str(path), spec, compute_dtype=torch.float32)
    save_adapter(ours.model, spec, ours.targets, str(path), tmp_path / "init")  # step-0 adapter: same init
    enable_checkpointing(ours.model)  # as the recipe trains
    ours.model.train()
    trainable = [p for p in ours.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=LR, weight_decay=0.0)
    our_losses = [train_step(ours.model, [b], opt, trainable, 1.0, "cpu")[0] for b in data]

    from transformers import BitsAndBytesConfig

    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    base = bnb_exact(AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb, dtype=torch.float32, device_map="cpu"))
    nf4_experts_into(ours.model, base)  # MoE: bitsandbytes leaves the experts unquantized; ours are NF4
    ref = peft.PeftModel.from_pretrained(base, tmp_path / "init", is_trainable=True)
    ref.train()
    ref_trainable = [p for p in ref.parameters() if p.requires_grad]
    assert sum(p.numel() for p in ref_trainable) == sum(p.numel() for p in trainable)
    ref_opt = torch.optim.AdamW(ref_trainable, lr=LR, weight_decay=0.0)
    ref_losses = []
    for b in data:
        loss = ref(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref_trainable, 1.0)
        ref_opt.step()
        ref_opt.zero_grad()
        ref_losses.append(loss.item())
    return our_losses, ref_losses


def assert_parity(arch: str, our_losses: list[float], ref_losses: list[float]) -> None:
    diffs = [abs(a - b) for a, b in zip(our_losses, ref_losses)]
    report = f"{arch}: max |Δloss| {max(diffs):.2e}; ours {our_losses[0]:.4f}→{our_losses[-1]:.4f}, ref {ref_losses[0]:.4f}→{ref_losses[-1]:.4f}"
    print(report)
    assert our_losses[-1] < our_losses[0] - 0.1, report  # training moved: the comparison is not of constants
    assert max(diffs) < LOSS_ATOL, report
