"""The model families qtrain supports, one registry: what each is tested for, and which fused ops run.

`FAMILIES` maps a transformers `model_type` to its `Family`. The loader (`qtrain.model`) loads
these without a word; any other decoder-only causal LM whose projections are `nn.Linear` loads
through the generic path with a one-line warning that it is untested. `fused_support(config)` is
the ONE answer to "which fused ops run on this model": the swap (`qtrain.fused.swap`) applies only
those, and the memory estimator (`qtrain.estimate.fused_groups`) counts only those, so the estimate
describes what actually runs. The README's "Supported models" table is `markdown_table()`
(tests/qtrain/test_families.py keeps the two equal, and the `tested` columns equal to the tests).

Plain data only: loading a YAML config imports this module, never transformers' modeling code.
"""

from __future__ import annotations

from dataclasses import dataclass

TESTS = ("load", "train", "merge", "peft", "parity", "fused")  # what a family can be tested for
ALL_OPS = ("rms_norm", "rope", "swiglu", "qkv", "gate_up", "varlen")  # = qtrain.fused.ops.OPS
SILU = ("silu", "swish")
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")  # a MoE's all-linear: experts only when named (qtrain.moe)


@dataclass(frozen=True)
class Family:
    """One model type: its name for people, its transformers config class (the tiny test models are
    built from it), the LoRA targets as PEFT names them (`all-linear` resolves to these), the fused
    ops whose math applies to it (empty: the stock modules stay), and what the tests check."""

    name: str
    config_class: str
    examples: str
    targets: tuple[str, ...] = LLAMA_TARGETS
    fused_ops: tuple[str, ...] = ()
    tested: tuple[str, ...] = ("load", "train", "merge", "peft", "parity")


FAMILIES: dict[str, Family] = {
    "llama": Family("Llama 3.x", "LlamaConfig", "Llama-3.1-8B, Llama-3.2-1B/3B", fused_ops=ALL_OPS, tested=TESTS),
    "mistral": Family("Mistral", "MistralConfig", "Mistral-7B-v0.3", fused_ops=ALL_OPS, tested=TESTS),
    "qwen2": Family("Qwen2 / Qwen2.5", "Qwen2Config", "Qwen2.5-7B, Qwen2.5-Coder", fused_ops=ALL_OPS, tested=TESTS),
    "qwen3": Family(
        "Qwen3", "Qwen3Config", "Qwen3-8B, Qwen3-4B", fused_ops=("rms_norm", "swiglu", "gate_up"), tested=TESTS,
    ),  # fmt: skip
    "phi3": Family(
        "Phi-3 / 3.5 / 4", "Phi3Config", "Phi-3.5-mini, Phi-4-mini",
        targets=("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
    ),  # fmt: skip
    "olmo2": Family("OLMo-2", "Olmo2Config", "OLMo-2-1124-7B, OLMo-2-0425-1B"),
    # Gemma: (1 + w) RMSNorms (four a layer), GeGLU, soft-capped (Gemma-2) or q/k-normed (Gemma-3)
    # attention: not the Llama math of the fused modules, so stock modules; the final logit soft cap
    # is applied by qtrain's own loss (`qtrain.train.loss_sum`). tests/qtrain/test_gemma.py.
    "gemma2": Family("Gemma-2", "Gemma2Config", "gemma-2-9b, gemma-2-2b"),
    "gemma3_text": Family("Gemma-3 (text)", "Gemma3TextConfig", "gemma-3-1b, gemma-3-270m"),
    "qwen3_moe": Family("Qwen3-MoE", "Qwen3MoeConfig", "Qwen3-30B-A3B", targets=ATTENTION),
    "mixtral": Family("Mixtral", "MixtralConfig", "Mixtral-8x7B-v0.1", targets=ATTENTION),
}


def family_of(model_type: str | None) -> Family | None:
    return FAMILIES.get(model_type)


def fused_support(config) -> tuple[str, ...]:
    """The fused ops (`qtrain.fused.ops.OPS` names) whose math applies to a model of this config:
    its family's, less SwiGLU when the MLP's activation is not SiLU. Unregistered model types and
    families without fused modules (Phi-3, OLMo-2, Gemma: their `fused_ops` is empty) keep the
    stock modules: (). The swap and the memory estimator both ask this, so they cannot disagree."""
    family = family_of(getattr(config, "model_type", None))
    if family is None:
        return ()
    act = getattr(config, "hidden_act", "silu")
    return tuple(op for op in family.fused_ops if op != "swiglu" or act in SILU)


def markdown_table() -> str:
    """The README's "Supported models" table, one row per family, from the registry."""
    head = ["family", "model_type", "e.g.", "LoRA targets (all-linear)", *TESTS]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model_type, f in FAMILIES.items():
        marks = ["yes" if t in f.tested else "-" for t in TESTS]
        if "fused" not in f.tested:
            marks[-1] = "stock modules"
        elif f.fused_ops != ALL_OPS:
            marks[-1] = ", ".join(f.fused_ops)
        rows.append("| " + " | ".join([f.name, f"`{model_type}`", f.examples, ", ".join(f.targets), *marks]) + " |")
    return "\n".join(rows)
