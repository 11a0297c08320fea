"""qtrain.config: the YAML + `key.sub=value` config, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from qtrain.config import Config, ConfigError, LoRAConfig, TinyModelConfig, apply_override, load_config, to_dict

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").glob("*.yaml")) + sorted((REPO / "configs").glob("*.yml"))
QUICKSTART = REPO / "configs" / "quickstart.yaml"
# a config with only the one required choice (which model) set: everything else is the default
MINIMAL = ["model.name_or_path=some/model"]


def error_of(overrides: list[str], path: Path | None = QUICKSTART) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


# ---- the shipped configs ---------------------------------------------------------------------


def test_configs_folder_is_not_empty():
    assert QUICKSTART in CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads_and_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    cfg.validate()  # idempotent: a loaded config stays valid
    # every key of the file became a field (nothing silently dropped), checked by a round trip
    again = load_config(None, [f"{k}={v!r}" for k, v in _flat(to_dict(cfg)).items() if v is not None])
    assert to_dict(again) == to_dict(cfg)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_quickstart_values():
    cfg = load_config(QUICKSTART)
    assert cfg.model.name_or_path is None and isinstance(cfg.model.tiny, TinyModelConfig)
    assert (cfg.model.tiny.arch, cfg.model.tiny.hidden_size, cfg.model.tiny.num_layers) == ("llama", 128, 4)
    assert cfg.model.dtype == "fp32" and cfg.model.quantize is True
    assert cfg.lora.rank == 16 and cfg.lora.alpha == 32.0 and isinstance(cfg.lora.alpha, float)
    assert cfg.lora.target_modules == "all-linear"
    assert cfg.train.lr == pytest.approx(3e-3) and cfg.train.schedule == "cosine"
    assert cfg.eval.max_new_tokens == 8 and cfg.device == "auto"
    # keys the file leaves out keep their defaults
    assert cfg.train.grad_accum == 1 and cfg.data.seed == 1234
    assert cfg.model.tiny.seed == TinyModelConfig().seed


def test_defaults_need_a_model():
    assert "model.name_or_path" in error_of([], path=None)
    cfg = load_config(None, MINIMAL)
    assert cfg.model.name_or_path == "some/model" and cfg.model.tiny is None
    assert to_dict(cfg.lora) == to_dict(LoRAConfig())


# ---- overrides -------------------------------------------------------------------------------


def test_override_int_float_bool_str():
    cfg = load_config(
        QUICKSTART,
        ["train.max_steps=7", "lora.alpha=8", "train.lr=0.5", "model.quantize=false", "output_dir=/tmp/x y"],
    )
    assert cfg.train.max_steps == 7 and type(cfg.train.max_steps) is int
    assert cfg.lora.alpha == 8.0 and type(cfg.lora.alpha) is float  # an int given for a float field
    assert cfg.train.lr == 0.5
    assert cfg.model.quantize is False
    assert cfg.output_dir == "/tmp/x y"


@pytest.mark.parametrize("raw, value", [("2e-4", 2e-4), ("2.0e-4", 2e-4), ("1E-3", 1e-3), ("3", 3.0), (".5", 0.5)])
def test_override_float_forms(raw, value):
    # PyYAML (YAML 1.1) reads `2e-4` (no dot) as the string '2e-4'; float fields accept it
    cfg = load_config(QUICKSTART, [f"train.lr={raw}"])
    assert cfg.train.lr == pytest.approx(value, rel=1e-12) and type(cfg.train.lr) is float


def test_float_in_yaml_file_without_dot(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  name_or_path: m\ntrain:\n  lr: 2e-4\n  weight_decay: 1e-2\n")
    cfg = load_config(path)
    assert cfg.train.lr == pytest.approx(2e-4) and cfg.train.weight_decay == pytest.approx(1e-2)


def test_override_list_and_back_to_string():
    cfg = load_config(QUICKSTART, ["lora.target_modules=[q_proj, v_proj]"])
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    cfg = load_config(QUICKSTART, ["lora.target_modules=[q_proj, v_proj]", "lora.target_modules=all-linear"])
    assert cfg.lora.target_modules == "all-linear"  # later overrides win


def test_override_null_and_switch_model():
    # null clears an optional field: swap the tiny model for a checkpoint
    cfg = load_config(QUICKSTART, ["model.tiny=null", "model.name_or_path=/ckpt/dir"])
    assert cfg.model.tiny is None and cfg.model.name_or_path == "/ckpt/dir"
    cfg = load_config(QUICKSTART, ["data.eval=null"])
    assert cfg.data.eval is None


def test_override_creates_nested_sections():
    # neither `model` nor `model.tiny` exists without a file: the override makes both
    cfg = load_config(None, ["model.tiny.hidden_size=64", "model.tiny.arch=qwen2"])
    assert cfg.model.tiny == TinyModelConfig(hidden_size=64, arch="qwen2")
    assert cfg.model.name_or_path is None


def test_override_value_with_equals_sign_and_spaces():
    cfg = load_config(QUICKSTART, ["output_dir=runs/a=b", " train.max_steps = 5"])
    assert cfg.output_dir == "runs/a=b" and cfg.train.max_steps == 5


def test_apply_override_into_a_plain_dict():
    data: dict = {"train": {"lr": 1.0}}
    apply_override(data, "train.lr=2e-4")
    apply_override(data, "a.b.c=[1, 2]")
    assert data == {"train": {"lr": "2e-4"}, "a": {"b": {"c": [1, 2]}}}  # raw YAML; typing is from_dict's job


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.max_steps", "expected key=value"),
        ("train.lr=[1", "not valid YAML"),
        ("output_dir.sub=1", "output_dir is not a section"),
    ],
)
def test_malformed_overrides(override, needle):
    msg = error_of([override])
    assert needle in msg and override in msg


# ---- errors name the dotted key --------------------------------------------------------------


@pytest.mark.parametrize(
    "override, key, suggestion",
    [
        ("train.max_step=5", "train.max_step", "train.max_steps"),
        ("lora.rnak=4", "lora.rnak", "lora.rank"),
        ("trian.max_steps=5", "trian", "train"),
        ("model.tiny.hidden_sise=64", "model.tiny.hidden_sise", "model.tiny.hidden_size"),
    ],
)
def test_unknown_key_names_it_and_suggests(override, key, suggestion):
    msg = error_of([override])
    assert msg.startswith(f"{key}: unknown key")
    assert f"did you mean {suggestion}?" in msg


def test_unknown_key_without_close_match_lists_allowed():
    msg = error_of(["eval.zzzzzz=1"])
    assert msg.startswith("eval.zzzzzz: unknown key") and "did you mean" not in msg
    assert "allowed: exact_match, max_new_tokens, batch_size" in msg


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  name_or_path: m\nlora:\n  ranks: 8\n")
    assert error_of([], path).startswith("lora.ranks: unknown key; did you mean lora.rank?")


@pytest.mark.parametrize(
    "override, key, what",
    [
        ("train.max_steps=abc", "train.max_steps", "expected an integer, got 'abc'"),
        ("train.max_steps=1.5", "train.max_steps", "expected an integer, got 1.5"),
        ("train.batch_size=true", "train.batch_size", "expected an integer, got True"),  # bool is not an int
        ("train.lr=fast", "train.lr", "expected a number, got 'fast'"),
        ("lora.alpha=yes", "lora.alpha", "expected a number, got True"),  # YAML 1.1: yes is a bool
        ("model.quantize=1", "model.quantize", "expected true or false, got 1"),
        ("output_dir=3", "output_dir", "expected a string, got 3"),
        ("model.name_or_path=[a]", "model.name_or_path", "expected a string"),
        ("lora.target_modules=[q_proj, 3]", "lora.target_modules", "matches none of"),
        ("model.tiny.num_layers=two", "model.tiny.num_layers", "expected an integer"),
    ],
)
def test_wrong_type_names_the_key(override, key, what):
    msg = error_of([override])
    assert msg.startswith(f"{key}:") and what in msg


def test_section_given_a_scalar():
    msg = error_of(["model.tiny=5"])
    assert msg.startswith("model.tiny") and "expected a mapping" in msg and "5" in msg


def test_section_given_a_scalar_has_clean_key():
    assert error_of(["model.tiny=5"]).startswith("model.tiny: ")


@pytest.mark.parametrize(
    "override, key, choices",
    [
        ("train.schedule=step", "train.schedule", "cosine, linear, constant"),
        ("model.dtype=fp8", "model.dtype", "bf16, fp16, fp32"),
        ("device=gpu", "device", "auto, cpu, cuda"),
        ("model.tiny.arch=gpt2", "model.tiny.arch", "llama, mistral, qwen2"),
        ("model.backend=cuda", "model.backend", "auto, torch, triton"),
    ],
)
def test_literal_not_allowed_lists_choices(override, key, choices):
    msg = error_of([override])
    assert msg.startswith(f"{key}:") and "is not allowed" in msg and choices in msg


# ---- validation ------------------------------------------------------------------------------


def test_model_with_both_sources():
    msg = error_of(["model.name_or_path=/ckpt"])  # quickstart already has model.tiny
    assert "model.name_or_path" in msg and "model.tiny" in msg and "exactly one" in msg


def test_model_with_neither_source():
    msg = error_of(["model.tiny=null"])
    assert "model.name_or_path" in msg and "model.tiny" in msg and "exactly one" in msg


@pytest.mark.parametrize(
    "key",
    ["lora.rank", "train.max_steps", "train.batch_size", "train.grad_accum", "data.max_length", "train.log_every"],
)
@pytest.mark.parametrize("value", [0, -3])
def test_non_positive_ints(key, value):
    msg = error_of([f"{key}={value}"])
    assert msg.startswith(f"{key}: must be > 0, got {value}")


@pytest.mark.parametrize("value", ["0", "-1e-4"])
def test_non_positive_lr(value):
    assert error_of([f"train.lr={value}"]).startswith("train.lr: must be > 0")


@pytest.mark.parametrize("value", ["-0.1", "1", "1.5"])
def test_dropout_range(value):
    assert error_of([f"lora.dropout={value}"]).startswith("lora.dropout: must be in [0, 1)")


def test_dropout_zero_is_fine():
    assert load_config(QUICKSTART, ["lora.dropout=0"]).lora.dropout == 0.0


@pytest.mark.parametrize("value", ["q_proj", "all_linear", "'q_proj,v_proj'"])
def test_bad_target_modules_string(value):
    msg = error_of([f"lora.target_modules={value}"])
    assert msg.startswith("lora.target_modules:") and "all-linear" in msg and "[q_proj, v_proj]" in msg


@pytest.mark.parametrize("value", ["data.txt", "data.json", "train.jsonl.gz"])
def test_data_train_must_be_synthetic_or_jsonl(value):
    assert error_of([f"data.train={value}"]).startswith("data.train:")


def test_data_train_jsonl_is_accepted():
    assert load_config(QUICKSTART, ["data.train=my/data.jsonl"]).data.train == "my/data.jsonl"


def test_nan_lr_is_rejected():
    assert "train.lr" in error_of(["train.lr=nan"])


def test_zero_eval_batch_size_is_rejected():
    assert error_of(["eval.batch_size=0"]).startswith("eval.batch_size:")


# ---- files -----------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    msg = error_of([], path)
    assert str(path) in msg and "not found" in msg


def test_invalid_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: [unclosed\n")
    msg = error_of([], path)
    assert str(path) in msg and "not valid YAML" in msg


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_non_mapping_yaml(tmp_path, text):
    path = tmp_path / "list.yaml"
    path.write_text(text)
    msg = error_of([], path)
    assert str(path) in msg and "mapping" in msg


def test_empty_file_is_all_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing\n")
    cfg = load_config(path, MINIMAL)
    assert to_dict(cfg) == to_dict(load_config(None, MINIMAL))


def test_section_that_is_not_a_mapping_in_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  name_or_path: m\ntrain: 5\n")
    msg = error_of([], path)
    assert msg.startswith("train") and "expected a mapping" in msg
