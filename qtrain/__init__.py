"""qtrain: low-VRAM QLoRA fine-tuning on one consumer GPU (or a CPU, for small models)."""

__version__ = "0.1.0"
