"""qtrain.presets: architectures by name, and config.json read without ever running a folder's code."""

from __future__ import annotations

import json
import shutil

import pytest

from qtrain.presets import resolve_config


def test_custom_code_config_is_refused_without_prompt(tiny_checkpoint, tmp_path, monkeypatch):
    asked = []
    monkeypatch.setattr("builtins.input", lambda *a: asked.append(a) or "y")
    path = tmp_path / "m"
    shutil.copytree(tiny_checkpoint("llama"), path)
    config = json.loads((path / "config.json").read_text())
    config |= {"model_type": "evilnet", "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}}
    (path / "config.json").write_text(json.dumps(config))
    (path / "configuration_evil.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').close()\n")
    for name in (str(path), str(path / "config.json")):
        with pytest.raises(ValueError, match=r"config\.json.*custom code.*never runs") as e:
            resolve_config(name)
        assert "\n" not in str(e.value)
    assert asked == [] and not (tmp_path / "ran").exists()


def test_local_checkpoint_config(tiny_checkpoint):
    assert resolve_config(str(tiny_checkpoint("llama"))).hidden_size == 64
