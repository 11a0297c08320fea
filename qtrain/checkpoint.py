"""Read Hugging Face safetensors checkpoints one tensor at a time.

A safetensors file is `u64 header length | JSON header | raw bytes`; the header gives each
tensor's dtype, shape and byte range. We read exactly one tensor's bytes with `readinto` into a
fresh tensor: no mmap of the whole shard, so peak host RAM is the largest tensor, not the model.
Sharded checkpoints list their shards in `model.safetensors.index.json`.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in `file`
    end: int


_DAMAGED = "the file is damaged or not a safetensors checkpoint; re-download or re-save it"


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Parse one .safetensors header into {name: TensorEntry}, each entry checked against the
    file: a known dtype, a shape of non-negative ints, a byte range inside the file that holds
    exactly numel * itemsize bytes."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise ValueError(f"{path}: not a safetensors file (header length {n})")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError: garbage or a cut-off header
            raise ValueError(f"{path}: not a safetensors file (unreadable header: {e})") from None
        data_bytes = os.fstat(f.fileno()).st_size - 8 - n
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a safetensors file (header is not a JSON object)")
    if not isinstance(header.get("__metadata__", {}), dict):
        raise ValueError(f"{path}: __metadata__ in the header is not a JSON object; {_DAMAGED}")
    return {
        name: _entry(path, name, info, 8 + n, data_bytes) for name, info in header.items() if name != "__metadata__"
    }


def _entry(path: Path, name: str, info: object, base: int, data_bytes: int) -> TensorEntry:
    """One header entry {"dtype", "shape", "data_offsets"} as a TensorEntry, or a ValueError naming it."""

    def bad(what: str) -> ValueError:
        return ValueError(f"{path}: tensor {name!r}: {what}; {_DAMAGED}")

    if not isinstance(info, dict):
        raise bad(f"header entry is not a JSON object (got {type(info).__name__})")
    if "dtype" not in info:
        raise bad("header entry has no dtype")
    if not isinstance(info["dtype"], str):
        raise bad(f"dtype {info['dtype']!r} is not a dtype name")
    if info["dtype"] not in _DTYPES:
        raise ValueError(
            f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}; qtrain reads {', '.join(_DTYPES)}: "
            "re-save the checkpoint in bf16, fp16 or fp32"
        )
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise bad(f"shape {shape!r} is not a list of non-negative integers")
    if not (
        isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets)) and offsets[0] <= offsets[1]
    ):
        raise bad(f"data_offsets {offsets!r} is not a [start, end] pair with 0 <= start <= end")
    start, end = offsets
    if end > data_bytes:
        raise bad(f"ends at data byte {end}, but the file holds {data_bytes} data bytes (truncated file?)")
    dtype = _DTYPES[info["dtype"]]
    nbytes = math.prod(shape) * dtype.itemsize
    if end - start != nbytes:
        raise bad(
            f"byte range of {end - start} bytes does not match dtype/shape {info['dtype']}{shape} ({nbytes} bytes)"
        )
    return TensorEntry(path, dtype, tuple(shape), base + start, base + end)


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def read_tensor(entry: TensorEntry) -> torch.Tensor:
    """Read one tensor's bytes straight into a new CPU tensor."""
    nbytes = entry.end - entry.start
    if nbytes != math.prod(entry.shape) * entry.dtype.itemsize:
        raise ValueError(f"{entry.file}: byte range does not match dtype/shape {entry.dtype}{list(entry.shape)}")
    out = torch.empty(entry.shape, dtype=entry.dtype)
    if nbytes:
        view = memoryview(out.view(-1).view(torch.uint8).numpy())
        with open(entry.file, "rb") as f:
            f.seek(entry.start)
            if f.readinto(view) != nbytes:
                raise ValueError(f"{entry.file}: truncated file (tensor bytes {entry.start}..{entry.end}); {_DAMAGED}")
    return out


def read_rows(entry: TensorEntry, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of a tensor (dim 0), reading only their bytes: rows are contiguous in the
    file (row-major), so a rank of a sharded run reads the rows it keeps and nothing else."""
    if not entry.shape or not 0 <= start <= stop <= entry.shape[0]:
        raise ValueError(f"{entry.file}: rows {start}:{stop} of a tensor of shape {list(entry.shape)}")
    row = math.prod(entry.shape[1:]) * entry.dtype.itemsize
    part = TensorEntry(entry.file, entry.dtype, (stop - start, *entry.shape[1:]), entry.start + start * row, entry.start + stop * row)
    return read_tensor(part)


CORRUPT_CHECKPOINT = "the checkpoint is corrupt; re-download or re-convert it"
CORRUPT_ADAPTER = "the adapter is corrupt (did its training diverge?); use an earlier checkpoint's adapter"


def require_finite(tensor: torch.Tensor, file: Path | str, name: str, remedy: str = CORRUPT_CHECKPOINT) -> torch.Tensor:
    """`tensor`, or a ValueError naming its file and name when it holds NaN or inf (one pass, floats only)."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{file}: tensor {name} holds NaN/inf values; {remedy}")
    return tensor


class SafetensorsCheckpoint:
    """All tensors of a (possibly sharded) checkpoint directory, read lazily by name."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        index = self.directory / "model.safetensors.index.json"
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            files = [self.directory / s for s in shards]
        else:
            files = sorted(self.directory.glob("*.safetensors"))
            files = [f for f in files if f.name != "adapter_model.safetensors"]
        if not files:
            raise FileNotFoundError(
                f"{self.directory}: no *.safetensors weights found (qtrain reads safetensors only; "
                "convert .bin checkpoints with transformers' save_pretrained(safe_serialization=True))"
            )
        self.entries: dict[str, TensorEntry] = {}
        for file in files:
            if not file.exists():
                raise FileNotFoundError(f"{file}: listed in the checkpoint index but missing")
            self.entries.update(read_header(file))

    def keys(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def __getitem__(self, name: str) -> torch.Tensor:
        return read_tensor(self.entries[name])

    def finite(self, name: str) -> torch.Tensor:
        """The tensor `name`, refused when it holds NaN or inf (a corrupt checkpoint: NF4 of it is NaN)."""
        return require_finite(self[name], self.entries[name].file, name)

    def finite_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of `name` (`read_rows`), refused when they hold NaN or inf."""
        return require_finite(read_rows(self.entries[name], start, stop), self.entries[name].file, name)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) in file order, so reads stream through each shard front to back."""
        for name, entry in sorted(self.entries.items(), key=lambda kv: (str(kv[1].file), kv[1].start)):
            yield name, read_tensor(entry)

    def total_bytes(self) -> int:
        return sum(e.end - e.start for e in self.entries.values())


def resolve_model_dir(name_or_path: str) -> Path:
    """A local directory as is; otherwise a Hub id, downloaded (safetensors + config) on demand."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1:
        raise FileNotFoundError(f"model {name_or_path!r}: no such directory, and not a Hub id of the form 'org/name'")
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(
            name_or_path,
            allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.jinja"],
        )
    )
