"""Preference objectives against TRL 1.16 on the same model, the same batch, fp32.

The reference side is transformers + bitsandbytes (NF4, double quant) + PEFT holding the same LoRA
weights as ours (B random, so the policy and the reference differ). DPO and KTO go through TRL's own
trainers (`DPOTrainer.compute_loss`, `KTOTrainer.compute_loss`: their collators, their fused
lm_head, their reference = adapter disabled); ORPO and SimPO, which TRL 1.16 keeps in
`trl.experimental` with the older logits-based trainers, through those trainers' loss functions
(`ORPOTrainer.odds_ratio_loss`, `CPOTrainer.cpo_loss` with loss_type="simpo", cpo_alpha=0) on
log-probs from the PEFT model's full logits. Loss and every LoRA gradient must agree.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from qtrain.adapter import save_adapter
from qtrain.lora import LoRASpec
from qtrain.methods.lora import LoRA
from qtrain.model import load_model
from qtrain.preference import PreferenceConfig, preference_loss, step_totals
from qtrain.preference_data import KTOExample, PairExample, collate_kto, collate_pairs

trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")
datasets = pytest.importorskip("datasets")
pytest.importorskip("bitsandbytes")

LOSS_ATOL = 1e-6  # fp32 on both sides (observed ~1e-7)
GRAD_RTOL = 1e-5  # relative L2 error of each LoRA gradient (observed ~3e-7)

PAIRS = [
    {"prompt": "Which letter comes next? a", "chosen": " b", "rejected": " z q"},
    {"prompt": "Is 12 even or odd?", "chosen": " even", "rejected": " odd"},
    {"prompt": "The largest digit of 381 is", "chosen": " 8", "rejected": " 1 3 and more"},
]
KTO_ROWS = [
    {"prompt": "Which letter comes next? a", "completion": " b", "label": True},
    {"prompt": "Is 12 even or odd?", "completion": " odd", "label": False},
    {"prompt": "The largest digit of 381 is", "completion": " 8", "label": True},
    {"prompt": "Write CAT in small letters:", "completion": " dog", "label": False},
]


@pytest.fixture(scope="module")
def models(tiny_checkpoint, tmp_path_factory):
    """(path, tokenizer, our model + LoRA method, a function giving a fresh PEFT copy of it)."""
    path = tiny_checkpoint("llama", hidden_size=64, intermediate_size=192, num_layers=2)
    tmp = tmp_path_factory.mktemp("pref_parity")
    spec = LoRASpec(rank=8, alpha=16, target_modules="all-linear")
    torch.manual_seed(0)
    ours = load_model(str(path), spec, compute_dtype=torch.float32)
    with torch.no_grad():  # B != 0: the policy differs from the reference
        for n, p in ours.model.named_parameters():
            if ".lora_b." in n:
                p.normal_(0, 0.05)
    save_adapter(ours.model, spec, ours.targets, str(path), tmp / "init")
    lora = LoRA(rank=8, alpha=16)
    lora._targets = ours.targets
    ours.model.train()

    def peft_copy():
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
        base = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb, dtype=torch.float32, device_map="cpu")
        for m in base.modules():  # tests/conftest.py::exact_bnb
            if hasattr(m, "support_avx512bf16_for_cpu"):
                m.support_avx512bf16_for_cpu = False
        return peft.PeftModel.from_pretrained(base, tmp / "init", is_trainable=True)

    return path, AutoTokenizer.from_pretrained(path), ours.model, lora, peft_copy, tmp


def _peft_key(name: str) -> str:
    return "base_model.model." + name.replace("lora_a.", "lora_A.default.").replace("lora_b.", "lora_B.default.")


def _same_adapter(ref, ours) -> None:
    """TRL casts a quantized model's adapter to bf16 and adds a "ref" copy of it: undo both, so that
    its reference is the adapter disabled (ours) and its policy holds our fp32 weights exactly."""
    if "ref" in ref.peft_config:
        ref.delete_adapter("ref")
    params = dict(ref.named_parameters())
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if p.requires_grad:
                target = params[_peft_key(n)]
                target.data = p.detach().clone()
    ref.train()


def _ours(model, lora, batch, objective, p):
    model.zero_grad(set_to_none=True)
    loss, _ = preference_loss(model, [lora], batch, objective, p, step_totals([batch], objective))
    loss.backward()
    return loss.item(), {n: q.grad.clone() for n, q in model.named_parameters() if q.requires_grad}


def _assert_match(ours_loss, ours_grads, ref_loss, ref) -> str:
    ref_grads = {n: q.grad for n, q in ref.named_parameters() if q.requires_grad}
    worst = max(((g - ref_grads[_peft_key(n)]).norm() / ref_grads[_peft_key(n)].norm()).item() for n, g in ours_grads.items())
    report = f"loss ours {ours_loss:.7f} TRL {ref_loss:.7f} (|Δ| {abs(ours_loss - ref_loss):.1e}); worst relative gradient error {worst:.1e}"
    print(report)
    assert abs(ours_loss - ref_loss) < LOSS_ATOL, report
    assert worst < GRAD_RTOL, report
    assert sum(g.norm() for g in ours_grads.values()) > 0, "no gradient: the comparison is of zeros"
    return report


@pytest.mark.parametrize(("loss_type", "label_smoothing"), [("sigmoid", 0.0), ("hinge", 0.0), ("ipo", 0.0), ("robust", 0.1)])
def test_dpo_matches_trl(models, tmp_path, loss_type, label_smoothing):
    path, tokenizer, ours, lora, peft_copy, _ = models
    beta = 0.5 if loss_type == "ipo" else 0.1
    args = trl.DPOConfig(output_dir=str(tmp_path), beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, report_to=[], use_cpu=True,
                         per_device_train_batch_size=len(PAIRS), max_length=None, bf16=False, fp16=False)  # fmt: skip
    trainer = trl.DPOTrainer(model=peft_copy(), args=args, train_dataset=datasets.Dataset.from_list(PAIRS), processing_class=tokenizer)
    _same_adapter(trainer.model, ours)
    rows = [trainer.train_dataset[i] for i in range(len(PAIRS))]  # TRL's tokenisation, for both sides
    ref_loss = trainer.compute_loss(trainer.model, trainer.data_collator(rows))
    ref_loss.backward()
    batch = collate_pairs([PairExample(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in rows], tokenizer.pad_token_id)
    p = PreferenceConfig(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
    _assert_match(*_ours(ours, lora, batch, "dpo", p), ref_loss.item(), trainer.model)


def test_kto_matches_trl(models, tmp_path):
    path, tokenizer, ours, lora, peft_copy, _ = models
    args = trl.KTOConfig(output_dir=str(tmp_path), beta=0.1, desirable_weight=1.0, undesirable_weight=1.5, report_to=[], use_cpu=True,
                         per_device_train_batch_size=len(KTO_ROWS), max_length=None, bf16=False, fp16=False)  # fmt: skip
    trainer = trl.KTOTrainer(model=peft_copy(), args=args, train_dataset=datasets.Dataset.from_list(KTO_ROWS), processing_class=tokenizer)
    _same_adapter(trainer.model, ours)
    rows = [trainer.train_dataset[i] for i in range(len(KTO_ROWS))]
    ref_loss = trainer.compute_loss(trainer.model, trainer.data_collator(rows))
    ref_loss.backward()
    batch = collate_kto([KTOExample(r["prompt_ids"], r["completion_ids"], bool(r["label"])) for r in rows], tokenizer.pad_token_id)
    assert [r["KL_completion_ids"] for r in rows] == [r["completion_ids"] for r in rows[-1:] + rows[:-1]]  # the same mismatched pairs
    p = PreferenceConfig(beta=0.1, desirable_weight=1.0, undesirable_weight=1.5)
    _assert_match(*_ours(ours, lora, batch, "kto", p), ref_loss.item(), trainer.model)


def _reference_logps(ref, batch, average: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TRL's `get_batch_logps` on the PEFT model's full logits: (chosen, rejected, chosen's NLL)."""
    from trl.experimental.orpo import ORPOTrainer

    logits = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # [2B, S, V]
    logps = ORPOTrainer.get_batch_logps(logits, batch["labels"], average_log_prob=average)
    b = int(batch["pairs"])
    nll = torch.nn.functional.cross_entropy(logits[:b, :-1].flatten(0, 1), batch["labels"][:b, 1:].flatten())  # TRL's ORPO NLL
    return logps[:b], logps[b:], nll


def _pairs_batch(tokenizer) -> dict:
    from qtrain.preference_data import pair_example

    return collate_pairs([pair_example(tokenizer, row, 64)[0] for row in PAIRS], tokenizer.pad_token_id)


def test_orpo_matches_trl(models):
    from trl.experimental.orpo import ORPOTrainer

    path, tokenizer, ours, lora, peft_copy, _ = models
    ref = peft_copy()
    _same_adapter(ref, ours)
    batch = _pairs_batch(tokenizer)
    c, r, nll = _reference_logps(ref, batch, average=True)
    trainer = SimpleNamespace(beta=0.2, accelerator=SimpleNamespace(device=torch.device("cpu")))
    losses = ORPOTrainer.odds_ratio_loss(trainer, c, r)[0]
    ref_loss = nll - losses.mean()  # ORPOTrainer.get_batch_loss_metrics
    ref_loss.backward()
    _assert_match(*_ours(ours, lora, batch, "orpo", PreferenceConfig(beta=0.2)), ref_loss.item(), ref)


def test_simpo_matches_trl(models):
    from trl.experimental.cpo import CPOTrainer

    path, tokenizer, ours, lora, peft_copy, _ = models
    ref = peft_copy()
    _same_adapter(ref, ours)
    batch = _pairs_batch(tokenizer)
    c, r, _ = _reference_logps(ref, batch, average=True)  # CPOTrainer averages for loss_type="simpo"
    trainer = SimpleNamespace(beta=2.0, simpo_gamma=0.5, label_smoothing=0.0, loss_type="simpo", alpha=0.0, accelerator=SimpleNamespace(device=torch.device("cpu")))
    ref_loss = CPOTrainer.cpo_loss(trainer, c, r)[0].mean()  # cpo_alpha=0: no NLL term
    ref_loss.backward()
    _assert_match(*_ours(ours, lora, batch, "simpo", PreferenceConfig(beta=2.0, simpo_gamma=0.5)), ref_loss.item(), ref)
