"""qtrain.checkpoint: the one-tensor-at-a-time safetensors reader, against safetensors itself."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from qtrain.checkpoint import SafetensorsCheckpoint, read_header, read_tensor, resolve_model_dir


def all_dtype_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    f = torch.randn(3, 5, 7, generator=g)
    return {
        "f64": f.double(),
        "f32": f,
        "f16": f.half(),
        "bf16": (f * 1000).bfloat16(),  # a range fp16 could not hold
        "i64": torch.randint(-(2**62), 2**62, (4, 3), generator=g, dtype=torch.int64),
        "i32": torch.randint(-(2**31), 2**31 - 1, (5,), generator=g, dtype=torch.int32),
        "i16": torch.randint(-(2**15), 2**15 - 1, (2, 2, 2), generator=g, dtype=torch.int16),
        "i8": torch.randint(-128, 127, (9,), generator=g, dtype=torch.int8),
        "u8": torch.randint(0, 255, (3, 3), generator=g, dtype=torch.uint8),
        "bool": torch.rand(6, generator=g) > 0.5,
        "scalar": torch.tensor(3.25),
        "empty": torch.zeros(0, 4),
        "odd_bytes": torch.arange(7, dtype=torch.int8),  # 7 bytes: later tensors start unaligned
        "after_odd": torch.randn(3, generator=g, dtype=torch.float64),
    }


def assert_tensors_equal(got: torch.Tensor, ref: torch.Tensor, name: str) -> None:
    assert got.dtype == ref.dtype, name
    assert got.shape == ref.shape, name
    assert got.device.type == "cpu", name
    # compare raw bytes: also catches -0.0 vs 0.0 and NaN payloads
    assert torch.equal(
        got.reshape(-1).view(torch.uint8) if got.numel() else got,
        ref.reshape(-1).view(torch.uint8) if ref.numel() else ref,
    ), name


def test_read_header_and_tensor_all_dtypes(tmp_path):
    tensors = all_dtype_tensors()
    path = tmp_path / "model.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    ref = load_file(path)
    entries = read_header(path)
    assert set(entries) == set(ref)  # __metadata__ is not a tensor
    for name, entry in entries.items():
        assert entry.file == path
        assert entry.shape == tuple(ref[name].shape)
        assert entry.end - entry.start == ref[name].numel() * ref[name].element_size()
        assert_tensors_equal(read_tensor(entry), ref[name], name)


def test_checkpoint_single_file(tmp_path):
    tensors = all_dtype_tensors()
    save_file(tensors, tmp_path / "model.safetensors")
    save_file({"x": torch.ones(2)}, tmp_path / "adapter_model.safetensors")  # never part of the base
    ckpt = SafetensorsCheckpoint(tmp_path)
    assert set(ckpt.keys()) == set(tensors) and "x" not in ckpt and "f32" in ckpt
    for name, t in tensors.items():
        assert_tensors_equal(ckpt[name], t, name)
    assert ckpt.total_bytes() == sum(t.numel() * t.element_size() for t in tensors.values())
    with pytest.raises(KeyError):
        ckpt["nope"]


def test_checkpoint_sharded_index(tiny_checkpoint):
    path = tiny_checkpoint("llama", max_shard_size="60KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2  # really sharded
    ref = {}
    for s in shards:
        ref.update(load_file(path / s))
    ckpt = SafetensorsCheckpoint(path)
    assert set(ckpt.keys()) == set(ref) == set(index["weight_map"])
    for name, entry in ckpt.entries.items():
        assert entry.file.name == index["weight_map"][name]
    seen = []
    for name, t in ckpt.items():
        seen.append(name)
        assert_tensors_equal(t, ref[name], name)
    assert sorted(seen) == sorted(ref)  # each tensor exactly once
    # streamed shard by shard, front to back within a shard
    order = [(str(ckpt.entries[n].file), ckpt.entries[n].start) for n in seen]
    assert order == sorted(order)


def test_sharded_bf16_checkpoint(tiny_checkpoint):
    path = tiny_checkpoint("qwen2", dtype=torch.bfloat16, max_shard_size="60KB")
    ckpt = SafetensorsCheckpoint(path)
    ref = {}
    for s in set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values()):
        ref.update(load_file(path / s))
    assert any(t.dtype == torch.bfloat16 for t in ref.values())
    for name, t in ref.items():
        assert_tensors_equal(ckpt[name], t, name)


def test_items_stream_in_file_order(tmp_path):
    # A header may list tensors in any order; items() must still read each file front to back.
    path = tmp_path / "model.safetensors"
    header = {
        "z": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]},
        "m": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]},
    }
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + torch.arange(6, dtype=torch.float32).numpy().tobytes())
    ref = load_file(path)
    got = list(SafetensorsCheckpoint(tmp_path).items())
    assert [name for name, _ in got] == ["z", "m", "a"]
    for name, t in got:
        assert_tensors_equal(t, ref[name], name)
    assert got[2][1].tolist() == [4.0, 5.0]


def test_index_with_missing_shard(tmp_path):
    save_file({"a": torch.ones(2)}, tmp_path / "model-00001-of-00002.safetensors")
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        SafetensorsCheckpoint(tmp_path)


def test_directory_without_safetensors(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\0" * 16)
    with pytest.raises(FileNotFoundError, match="safetensors"):
        SafetensorsCheckpoint(tmp_path)


def test_truncated_file_names_the_file(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_file({"a": torch.randn(100), "b": torch.randn(100)}, path)
    data = path.read_bytes()
    entries = read_header(path)  # read while whole; the file is cut afterwards
    path.write_bytes(data[:-10])  # the last tensor loses its tail
    ordered = sorted(entries.values(), key=lambda e: e.start)
    read_tensor(ordered[0])  # the first tensor is still whole
    with pytest.raises(ValueError, match=r"cut\.safetensors.*truncated"):
        read_tensor(ordered[-1])


@pytest.mark.parametrize(
    "content",
    [
        b"abc",  # shorter than the 8-byte length
        b"\xff" * 64,  # absurd header length
        struct.pack("<Q", 10) + b"not json!!",  # garbage header
        struct.pack("<Q", 40) + b'{"a": {"dtype": "F32", "sh',  # file cut inside the header
        struct.pack("<Q", 2) + b"[]",  # JSON, but not an object
        b"\x89PNG\r\n\x1a\n" + b"\0" * 32,
    ],
    ids=["short", "huge-length", "garbage-json", "cut-header", "json-list", "png"],
)
def test_garbage_file_is_a_value_error_naming_the_file(tmp_path, content):
    path = tmp_path / "weird.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"weird\.safetensors"):
        read_header(path)
    with pytest.raises(ValueError, match=r"weird\.safetensors"):
        SafetensorsCheckpoint(tmp_path)


def test_byte_range_not_matching_shape(tmp_path):
    header = json.dumps({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(ValueError, match=r"bad\.safetensors.*byte range"):
        read_tensor(read_header(path)["a"])


def test_unsupported_dtype(tmp_path):
    path = tmp_path / "f8.safetensors"
    save_file({"w": torch.zeros(4, dtype=torch.float8_e4m3fn)}, path)
    with pytest.raises(ValueError, match=r"f8\.safetensors.*'w'.*F8_E4M3"):
        read_header(path)


def test_resolve_local_dir(tmp_path):
    assert resolve_model_dir(str(tmp_path)) == tmp_path


@pytest.mark.parametrize(
    "name", ["/definitely/not/here", "not_a_model", "./rel/missing", "~/qtrain_missing_dir", "a/b/c"]
)
def test_resolve_missing_local_path_never_downloads(tmp_path, monkeypatch, name):
    import huggingface_hub

    def no_network(*a, **k):
        raise AssertionError("resolve_model_dir tried to download")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        resolve_model_dir(name)


def test_resolve_file_instead_of_dir(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("download attempted"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "model").write_text("a file, not a checkpoint dir")
    with pytest.raises(FileNotFoundError):
        resolve_model_dir("org/model")


def test_resolve_hub_id_goes_to_snapshot_download(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def fake(repo_id, **kw):
        calls.append((repo_id, kw))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.chdir(tmp_path)
    assert resolve_model_dir("some-org/some-model") == tmp_path
    assert calls[0][0] == "some-org/some-model"
    assert "*.safetensors" in calls[0][1]["allow_patterns"]
    assert not any(p.endswith((".bin", ".pt", ".pth")) for p in calls[0][1]["allow_patterns"])


def write_raw(path, header: dict, data: bytes = b"\0" * 16):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize(
    "entry, needle",
    [
        ({"shape": [4], "data_offsets": [0, 16]}, "dtype"),
        ([1, 2, 3], "not a JSON object"),
        ("F32", "not a JSON object"),
        ({"dtype": "F32", "shape": [4]}, "data_offsets"),
        ({"dtype": "F32", "shape": [4], "data_offsets": [0]}, "data_offsets"),
        ({"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}, "data_offsets"),
        ({"dtype": "F32", "shape": [4], "data_offsets": ["0", "16"]}, "data_offsets"),
        ({"dtype": "F32", "shape": [4], "data_offsets": [-4, 12]}, "data_offsets"),
        ({"dtype": "F32", "data_offsets": [0, 16]}, "shape"),
        ({"dtype": "F32", "shape": 4, "data_offsets": [0, 16]}, "shape"),
        ({"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}, "shape"),
        ({"dtype": "F32", "shape": [2, 1.5], "data_offsets": [0, 12]}, "shape"),
        ({"dtype": "F32", "shape": [-2, -2], "data_offsets": [0, 16]}, "shape"),
        ({"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}, "byte range"),
        ({"dtype": "F32", "shape": [10**12], "data_offsets": [0, 4 * 10**12]}, "truncated"),
        ({"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}, "truncated"),
        ({"dtype": 7, "shape": [4], "data_offsets": [0, 16]}, "dtype"),
    ],
    ids=[
        "no-dtype", "entry-list", "entry-str", "no-offsets", "one-offset", "offsets-reversed", "offsets-str",
        "offsets-negative", "no-shape", "shape-int", "shape-negative", "shape-float", "shape-two-negatives",
        "numel-mismatch", "larger-than-file", "past-end", "dtype-int",
    ],
)  # fmt: skip
def test_bad_header_entry_is_one_value_error_naming_file_and_tensor(tmp_path, entry, needle):
    write_raw(tmp_path / "bad.safetensors", {"__metadata__": {"format": "pt"}, "w": entry})
    with pytest.raises(ValueError, match=r"bad\.safetensors") as e:
        SafetensorsCheckpoint(tmp_path)
    message = str(e.value)
    assert "'w'" in message and needle in message and "\n" not in message
    assert "re-download" in message or "re-save" in message


def test_bad_metadata_is_a_value_error(tmp_path):
    write_raw(
        tmp_path / "bad.safetensors",
        {"__metadata__": ["x"], "w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}},
    )
    with pytest.raises(ValueError, match=r"bad\.safetensors.*__metadata__"):
        SafetensorsCheckpoint(tmp_path)


def test_truncated_file_is_refused_when_the_header_is_read(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_file({"a": torch.randn(100), "b": torch.randn(100)}, path)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"cut\.safetensors.*'b'.*truncated"):
        SafetensorsCheckpoint(tmp_path)
