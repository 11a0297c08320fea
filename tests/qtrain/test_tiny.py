"""qtrain.tiny: tiny bases are built atomically and never silently reused for another model.tiny."""

from __future__ import annotations

import json

import pytest
from transformers import PreTrainedModel

from qtrain.tiny import TINY_SPEC, ensure_tiny_model

SPEC = {"arch": "llama", "hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "seed": 0}


def test_built_once_with_its_spec_then_reused(tmp_path):
    base = ensure_tiny_model(tmp_path / "base", **SPEC)
    assert json.loads((base / TINY_SPEC).read_text()) == SPEC
    assert (base / "config.json").exists() and (base / "tokenizer.json").exists()
    mtime = (base / "config.json").stat().st_mtime_ns
    assert ensure_tiny_model(tmp_path / "base", **SPEC) == base
    assert (base / "config.json").stat().st_mtime_ns == mtime  # reused, not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == ["base"]  # no temp folder left


def test_a_kill_mid_build_leaves_no_half_base(tmp_path, monkeypatch):
    real = PreTrainedModel.save_pretrained

    def killed(self, path, **kwargs):  # the weights half written, config.json already there
        real(self, path, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", killed)
    with pytest.raises(KeyboardInterrupt):
        ensure_tiny_model(tmp_path / "base", **SPEC)
    assert list(tmp_path.iterdir()) == []  # nothing under base/, no temp folder
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", real)
    assert (ensure_tiny_model(tmp_path / "base", **SPEC) / TINY_SPEC).exists()


def test_a_half_base_from_before_is_refused_not_loaded(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text("{}")  # what a kill left with the old non-atomic build
    with pytest.raises(ValueError, match=r"base: not a complete tiny base \(qtrain-tiny.json missing"):
        ensure_tiny_model(tmp_path / "base", **SPEC)


def test_another_model_tiny_for_a_built_base_is_refused(tmp_path):
    ensure_tiny_model(tmp_path / "base", **SPEC)
    with pytest.raises(ValueError, match=r"built from another model.tiny \(model.tiny.hidden_size: 32 there, 48 now\)"):
        ensure_tiny_model(tmp_path / "base", **SPEC | {"hidden_size": 48})
