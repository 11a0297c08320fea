"""The PEFT methods of the literature on the NF4 base, one module each (the paper's definition in
its docstring), LoRA (with rsLoRA, DoRA, LoRA+) among them. `METHODS` maps the `method:` config
value to its dataclass; its config section, training, saving, loading and memory estimate follow
from the registration (adding a method: one module + one line here)."""

from qtrain.methods.adalora import AdaLoRA
from qtrain.methods.adapters import Houlsby, ParallelAdapter, Pfeiffer
from qtrain.methods.base import PeftMethod, mark_trainable
from qtrain.methods.bitfit import BitFit
from qtrain.methods.fusion import AdapterFusion
from qtrain.methods.ia3 import IA3
from qtrain.methods.llama_adapter import LlamaAdapter
from qtrain.methods.lora import LoRA
from qtrain.methods.p_tuning import PTuning
from qtrain.methods.prefix import PrefixTuning, PTuningV2
from qtrain.methods.prompt_tuning import PromptTuning

METHODS: dict[str, type[PeftMethod]] = {
    cls.name: cls
    for cls in (LoRA, AdaLoRA, BitFit, IA3, Houlsby, Pfeiffer, ParallelAdapter, AdapterFusion, PromptTuning, PTuning,
                PrefixTuning, PTuningV2, LlamaAdapter)
}  # fmt: skip

__all__ = [
    "IA3", "METHODS", "AdaLoRA", "AdapterFusion", "BitFit", "Houlsby", "LlamaAdapter", "LoRA", "PTuning", "PTuningV2",
    "ParallelAdapter", "PeftMethod", "Pfeiffer", "PrefixTuning", "PromptTuning", "mark_trainable",
]  # fmt: skip
