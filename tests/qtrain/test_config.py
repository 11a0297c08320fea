"""qtrain.config: the YAML + `key.sub=value` config, and errors that name the key."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from qtrain.config import (
    Config,
    ConfigError,
    LoRAConfig,
    SamplePrompt,
    TinyModelConfig,
    UniqueKeyLoader,
    apply_override,
    load_config,
    to_dict,
)

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").glob("*.yaml")) + sorted((REPO / "configs").glob("*.yml"))
QUICKSTART = REPO / "configs" / "quickstart.yaml"
# the ready GPU configs (QLoRA on a 7-8B model): 24 GB cards, then the 16 GB and 8 GB variants
GPU_24GB = ["llama-3.1-8b.yaml", "llama-2-7b.yaml", "mistral-7b.yaml", "qwen2.5-7b.yaml"]
GPU_16GB, GPU_8GB = "llama-3.1-8b-16gb.yaml", "llama-3.1-8b-8gb.yaml"
GPU_CONFIGS = [p for p in CONFIGS if not p.name.startswith("quickstart")]  # quickstart*.yaml: the CPU configs
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


def launch_overrides(path: Path) -> list[str]:
    """The overrides of the launch command on the file's first line, `# qtrain train configs/<name> k=v ...`
    (a multi-GPU config: `# torchrun --nproc_per_node N $(which qtrain) train configs/<name> k=v ...`)."""
    first = path.read_text().splitlines()[0]
    launcher = re.match(r"# torchrun --nproc_per_node \d+ (-m qtrain\.cli|\$\(which qtrain\)) train ", first)
    command = launcher.group(0) + f"configs/{path.name}" if launcher else f"# qtrain train configs/{path.name}"
    assert first == command or first.startswith(command + " "), f"{path.name}: first line {first!r}"
    return shlex.split(first[len(command) :])


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_opens_with_its_launch_command(path):
    overrides = launch_overrides(path)
    assert all("=" in o and not o.startswith("-") for o in overrides), overrides  # key=value only
    cfg = load_config(path, overrides)  # the keys exist and the values type-check
    cfg.validate()
    flat = _flat(to_dict(cfg))
    for override in overrides:
        key, _ = override.split("=", 1)
        assert key in flat, f"{path.name}: {override} sets a section, not a key"


def test_expected_gpu_configs_exist():
    names = {p.name for p in GPU_CONFIGS}
    for name in [*GPU_24GB, GPU_16GB, GPU_8GB]:
        assert name in names, f"configs/{name} is missing"


@pytest.mark.parametrize("path", GPU_CONFIGS, ids=lambda p: p.name)
def test_gpu_config_is_qlora_on_cuda(path):
    cfg = load_config(path)
    assert cfg.device == "cuda"
    assert cfg.model.name_or_path and cfg.model.tiny is None
    assert cfg.model.quantize is True and cfg.model.dtype == "bf16"
    assert cfg.train.gradient_checkpointing is True
    assert cfg.train.optimizer in ("paged_adamw_32bit", "paged_adamw_8bit")
    sft = cfg.objective == "sft"  # preference tuning moves a trained model: a 10x smaller lr, pair rows
    assert cfg.train.lr == pytest.approx(2e-4 if sft else 2e-5) and cfg.train.schedule == "cosine" and cfg.train.warmup_steps > 0
    assert cfg.eval.exact_match is False and cfg.eval.every > 0 and cfg.checkpoint.every > 0
    assert cfg.log.tensorboard is True
    assert cfg.data.train == ("data/train.jsonl" if sft else "data/pairs.jsonl")
    # the launch command shows where the user's data goes
    assert launch_overrides(path)[0].startswith("data.train=")
    # the header says what the memory numbers are worth
    header = path.read_text().split("\n\n", 1)[0].lower()
    assert "estimate" in header and "measured" in header


@pytest.mark.parametrize("name", GPU_24GB)
def test_24gb_configs(name):
    cfg = load_config(REPO / "configs" / name)
    assert cfg.train.optimizer == "paged_adamw_32bit"
    assert cfg.data.packing is True and cfg.data.max_length == 2048
    assert cfg.train.offload_activations is False


def test_16gb_config():
    cfg = load_config(REPO / "configs" / GPU_16GB)
    assert cfg.data.max_length == 1024
    assert cfg.model.name_or_path == load_config(REPO / "configs" / "llama-3.1-8b.yaml").model.name_or_path


def test_8gb_config_offloads_and_uses_8bit_adam():
    cfg = load_config(REPO / "configs" / GPU_8GB)
    assert cfg.train.offload_activations is True
    assert cfg.train.optimizer == "paged_adamw_8bit"
    assert cfg.data.max_length == 2048 and cfg.train.batch_size == 1  # fits 8 GiB: tests/qtrain/test_memory_cli.py
    assert cfg.model.name_or_path == load_config(REPO / "configs" / "llama-3.1-8b.yaml").model.name_or_path


def test_smaller_cards_trade_length_not_tokens_per_step():
    # each variant keeps the 24 GB config's tokens per optimizer step, so lr 2e-4 carries over
    def tokens_per_step(name: str) -> int:
        t = load_config(REPO / "configs" / name)
        return t.train.batch_size * t.train.grad_accum * t.data.max_length

    assert tokens_per_step(GPU_16GB) == tokens_per_step(GPU_8GB) == tokens_per_step("llama-3.1-8b.yaml")


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
    assert "allowed: every, exact_match, max_rows, max_new_tokens, batch_size, samples" in msg


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
        ("data.format=sharegpt", "data.format", "auto, alpaca, chat, prompt_completion, text"),
        ("data.bad_rows=ignore", "data.bad_rows", "error, skip"),
        ("train.optimizer=sgd", "train.optimizer", "auto, adamw, paged_adamw_32bit, paged_adamw_8bit"),
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


@pytest.mark.parametrize(
    "value", ["my/data.jsonl", "data.json", "rows.csv", "/abs/path/train.parquet", "tatsu-lab/alpaca", "imdb"]
)
def test_data_train_files_and_hub_ids_are_accepted(value):
    # the file is only opened when training starts: the config takes any local file or Hub id
    assert load_config(QUICKSTART, [f"data.train={value}"]).data.train == value


def test_hub_dataset_keys():
    cfg = load_config(
        QUICKSTART,
        [
            "data.train=HuggingFaceH4/ultrachat_200k",
            "data.subset=default",
            "data.train_split=train_sft",
            "data.eval=HuggingFaceH4/ultrachat_200k",
            "data.eval_split=test_sft",
            "data.format=chat",
        ],
    )
    d = cfg.data
    assert (d.subset, d.train_split, d.eval_split, d.format) == ("default", "train_sft", "test_sft", "chat")


def test_new_keys_from_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "model:\n  name_or_path: m\n"
        "data:\n  train: d.csv\n  format: prompt_completion\n  eval_fraction: 0.1\n  group_by_length: true\n"
        "  bad_rows: skip\n"
        "train:\n  optimizer: adamw\n  lora_plus_ratio: 16\n  autocast: false\n  deterministic: true\n"
        'eval:\n  every: 50\n  max_rows: 20\n  samples: ["Hi", "2 + 2 ="]\n'
        "checkpoint:\n  every: 100\n  keep_last: 1\n  resume: auto\n"
        "log:\n  tensorboard: false\n  wandb: true\n  wandb_project: p\n  plot: false\n"
    )
    cfg = load_config(path)
    d, t, e, c, lg = cfg.data, cfg.train, cfg.eval, cfg.checkpoint, cfg.log
    assert (d.format, d.eval_fraction, d.group_by_length, d.bad_rows) == ("prompt_completion", 0.1, True, "skip")
    assert (t.optimizer, t.lora_plus_ratio, t.autocast, t.deterministic) == ("adamw", 16.0, False, True)
    assert type(t.lora_plus_ratio) is float
    assert (e.every, e.max_rows, e.samples) == (50, 20, ["Hi", "2 + 2 ="])
    assert (c.every, c.keep_last, c.resume) == (100, 1, "auto")
    assert (lg.tensorboard, lg.wandb, lg.wandb_project, lg.plot) == (False, True, "p", False)


def test_new_key_defaults():
    cfg = load_config(None, MINIMAL)
    assert (cfg.data.format, cfg.data.packing, cfg.data.group_by_length, cfg.data.bad_rows) == (
        "auto",
        False,
        False,
        "error",
    )
    assert (cfg.train.optimizer, cfg.train.lora_plus_ratio, cfg.train.offload_activations) == ("auto", 1.0, False)
    assert cfg.eval.samples == [] and cfg.checkpoint.resume is None and cfg.checkpoint.every == 0


# ---- validation of the new keys -----------------------------------------------------------------


def test_packing_and_group_by_length_exclude_each_other():
    msg = error_of(["data.packing=true", "data.group_by_length=true"])
    assert "data.packing" in msg and "data.group_by_length" in msg
    assert load_config(QUICKSTART, ["data.packing=true"]).data.packing is True
    assert load_config(QUICKSTART, ["data.group_by_length=true"]).data.group_by_length is True


@pytest.mark.parametrize("optimizer", ["paged_adamw_32bit", "paged_adamw_8bit"])
def test_paged_optimizer_needs_cuda(optimizer):
    msg = error_of([f"train.optimizer={optimizer}", "device=cpu"])
    assert msg.startswith("train.optimizer:") and optimizer in msg and "device=cpu" in msg
    # device=auto is resolved (and a paged optimizer on a CPU refused) when training starts
    for device in ("cuda", "auto"):
        assert (
            load_config(QUICKSTART, [f"train.optimizer={optimizer}", f"device={device}"]).train.optimizer == optimizer
        )


@pytest.mark.parametrize("optimizer", ["auto", "adamw"])
def test_unpaged_optimizers_run_on_cpu(optimizer):
    assert load_config(QUICKSTART, [f"train.optimizer={optimizer}", "device=cpu"]).train.optimizer == optimizer


def test_offload_activations_needs_gradient_checkpointing():
    msg = error_of(["train.offload_activations=true", "train.gradient_checkpointing=false"])
    assert "train.offload_activations" in msg and "train.gradient_checkpointing" in msg
    cfg = load_config(QUICKSTART, ["train.offload_activations=true", "train.gradient_checkpointing=true"])
    assert cfg.train.offload_activations is True


@pytest.mark.parametrize("value", ["1.0", "1", "-0.1", "nan", ".nan", "inf"])
def test_eval_fraction_range(value):
    assert error_of([f"data.eval_fraction={value}"]).startswith("data.eval_fraction: must be in [0, 1)")


@pytest.mark.parametrize("value", [0.0, 0.05, 0.99])
def test_eval_fraction_in_range_is_fine(value):
    assert load_config(QUICKSTART, [f"data.eval_fraction={value}"]).data.eval_fraction == value


@pytest.mark.parametrize("fmt", ["chat", "prompt_completion", "text"])
def test_synthetic_data_is_alpaca(fmt):
    msg = error_of([f"data.format={fmt}"])  # quickstart: data.train=synthetic
    assert msg.startswith("data.format:") and "data.train=synthetic" in msg and fmt in msg
    assert load_config(QUICKSTART, ["data.train=d.jsonl", f"data.format={fmt}"]).data.format == fmt


@pytest.mark.parametrize("fmt", ["auto", "alpaca"])
def test_synthetic_data_with_alpaca_or_auto(fmt):
    assert load_config(QUICKSTART, [f"data.format={fmt}"]).data.format == fmt


@pytest.mark.parametrize(
    "key, value",
    [
        ("train.lora_plus_ratio", "0"),
        ("train.lora_plus_ratio", "-16"),
        ("train.lora_plus_ratio", "nan"),
        ("eval.max_rows", "0"),
        ("eval.max_rows", "-5"),
        ("checkpoint.keep_last", "0"),
        ("checkpoint.keep_last", "-1"),
    ],
)
def test_new_non_positive_values(key, value):
    assert error_of([f"{key}={value}"]).startswith(f"{key}: must be > 0")


@pytest.mark.parametrize("key", ["train.lr", "train.lora_plus_ratio"])
@pytest.mark.parametrize("value", [".inf", "inf"])
def test_infinite_rates_are_rejected(key, value):
    assert error_of([f"{key}={value}"]).startswith(f"{key}: must be > 0 and finite")


@pytest.mark.parametrize("override, key", [("data.num_train=-5", "data.num_train"), ("data.num_train=0", "data.num_train"), ("data.num_eval=-1", "data.num_eval")])
def test_synthetic_row_counts(override, key):
    assert error_of([override]).startswith(f"{key}: must be")


def test_eval_every_needs_eval_rows():
    msg = error_of(["data.train=rows.csv", "data.eval_fraction=0", "eval.every=50"])
    assert msg.startswith("eval.every: there are no eval rows") and "data.eval_fraction" in msg
    load_config(QUICKSTART, ["data.train=rows.csv", "data.eval=eval.csv", "data.eval_fraction=0", "eval.every=50"])


def test_empty_resume_is_rejected():
    assert error_of(["checkpoint.resume="]).startswith("checkpoint.resume: empty")


@pytest.mark.parametrize("key", ["eval.every", "checkpoint.every"])
def test_negative_every(key):
    assert error_of([f"{key}=-1"]).startswith(f"{key}: must be >= 0, got -1")
    assert getattr(load_config(QUICKSTART, [f"{key}=0"]), key.split(".")[0]).every == 0  # 0: only at the end


def test_lora_plus_ratio_accepts_the_paper_value():
    assert load_config(QUICKSTART, ["train.lora_plus_ratio=16"]).train.lora_plus_ratio == 16.0


def test_eval_samples_list_of_strings():
    cfg = load_config(QUICKSTART, ["eval.samples=['Which letter comes next? c', 'Is 12 even: or odd?', plain words]"])
    assert cfg.eval.samples == ["Which letter comes next? c", "Is 12 even: or odd?", "plain words"]
    assert load_config(QUICKSTART, ["eval.samples=[]"]).eval.samples == []


def test_eval_samples_with_inputs():
    cfg = load_config(QUICKSTART, ["eval.samples=[plain, {prompt: 'Is this number even or odd?', input: '42'}, {prompt: p}]"])
    assert cfg.eval.samples == ["plain", SamplePrompt("Is this number even or odd?", "42"), SamplePrompt("p", "")]
    assert to_dict(cfg)["eval"]["samples"][1] == {"prompt": "Is this number even or odd?", "input": "42"}


@pytest.mark.parametrize(
    "samples, message",
    [
        ("[hello, 3]", "eval.samples[1]: 3 matches none of str | {prompt, input}"),
        ("[{prompt: a, inptu: b}]", "eval.samples[0].inptu: unknown key; did you mean eval.samples[0].input? (allowed: prompt, input)"),
        ("[{input: b}]", "eval.samples[0].prompt: missing; it has no default (keys: prompt, input)"),
        ("[{prompt: a, input: 3}]", "eval.samples[0].input: expected a string, got 3"),
    ],
)
def test_eval_samples_errors_name_the_item(samples, message):
    assert error_of([f"eval.samples={samples}"]) == message


def test_eval_samples_must_be_a_list():
    assert error_of(["eval.samples=hello"]).startswith("eval.samples: expected a list")


@pytest.mark.parametrize(
    "value, expected",
    [("auto", "auto"), ("runs/x/checkpoints/step-200", "runs/x/checkpoints/step-200"), ("null", None)],
)
def test_checkpoint_resume(value, expected):
    assert load_config(QUICKSTART, [f"checkpoint.resume={value}"]).checkpoint.resume == expected


def test_checkpoint_resume_must_be_a_string():
    assert error_of(["checkpoint.resume=5"]).startswith("checkpoint.resume: expected a string")


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


@pytest.mark.parametrize(
    "text, key, lines",
    [
        ("model:\n  name_or_path: m\ntrain:\n  lr: 1.0e-4\n  max_steps: 5\n  lr: 3.0e-4\n", "train.lr", (4, 6)),
        ("model:\n  name_or_path: m\ntrain:\n  max_steps: 5\nmodel:\n  name_or_path: n\n", "model", (1, 5)),
        ("model: {name_or_path: m, name_or_path: n}\n", "model.name_or_path", (1, 1)),
        ("model:\n  name_or_path: m\nlora:\n  rank: 8\n  target_modules:\n    - {a: 1, a: 2}\n", "lora.target_modules[0].a", (6, 6)),
        ("1: a\n01: b\n", "1", (1, 2)),  # the same key written two ways
    ],
)
def test_duplicate_key_in_yaml_file(tmp_path, text, key, lines):
    """PyYAML keeps the last of two equal keys: a config that says one thing twice is an error."""
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    msg = error_of([], path)
    assert msg == f"{path}: key {key} is given twice (lines {lines[0]} and {lines[1]}); keep one"


def test_yaml_merge_keys_and_aliases_are_not_duplicates(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text(
        "base: &base {name_or_path: m, dtype: float32}\n"
        "model:\n  <<: *base\n  dtype: bfloat16\n"
        "eval:\n  sample_prompts: &p [{prompt: a}]\n"
    )
    data = yaml.load(path.read_text(), Loader=UniqueKeyLoader)
    assert data["model"] == {"name_or_path": "m", "dtype": "bfloat16"}  # the merged key overridden
    assert data["eval"]["sample_prompts"] == [{"prompt": "a"}]


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


def test_kernels_enabled_reads_yaml_on_off():
    """YAML 1.1 reads on/off as booleans: `kernels.enabled: off` must mean off, not fail; a wrong value names the choices."""
    assert load_config(None, ["model.name_or_path=x", "kernels.enabled=off"]).kernels.enabled == "off"
    assert load_config(None, ["model.name_or_path=x", "kernels.enabled=on"]).kernels.enabled == "on"
    assert load_config(None, ["model.name_or_path=x"]).kernels.enabled == "auto"
    with pytest.raises(ConfigError, match=r"kernels.enabled: 'maybe' matches none of auto \| on \| off \| bool"):
        load_config(None, ["model.name_or_path=x", "kernels.enabled=maybe"])


def test_a_section_of_a_method_the_run_does_not_use_is_checked():
    """lora.init_from without lora in `method` would be silently ignored: the LoRA section refuses it
    (`PeftMethod.check_unused`), named by its key; with LoRA in the run it is taken."""
    assert "lora.init_from: the run does not use LoRA; add lora to method" in error_of(["method=bitfit", "lora.init_from=some/adapter"])
    assert load_config(QUICKSTART, ["method=[lora, bitfit]", "lora.init_from=some/adapter"]).lora.init_from == "some/adapter"
