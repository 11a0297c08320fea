"""The PEFT methods of the literature on the NF4 base, one module each (the paper's definition in
its docstring). `METHODS` maps the `method:` config value to its dataclass. LoRA itself (with
rsLoRA and DoRA) is built into the NF4 linear (`qtrain.lora`) and applied while loading."""

from qtrain.methods.adapters import Houlsby, ParallelAdapter, Pfeiffer
from qtrain.methods.base import PeftMethod, mark_trainable
from qtrain.methods.bitfit import BitFit
from qtrain.methods.ia3 import IA3

METHODS: dict[str, type[PeftMethod]] = {cls.name: cls for cls in (BitFit, IA3, Houlsby, Pfeiffer, ParallelAdapter)}

__all__ = ["IA3", "METHODS", "BitFit", "Houlsby", "ParallelAdapter", "PeftMethod", "Pfeiffer", "mark_trainable"]
