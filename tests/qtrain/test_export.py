"""qtrain export: merged HF checkpoints and GGUF files, proven by loading them back
(transformers for the checkpoint, gguf's reader for every GGUF tensor, llama.cpp when installed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from qtrain.adapter import save_adapter
from qtrain.cli import main
from qtrain.export import export
from qtrain.families import FAMILIES
from qtrain.lora import LoRASpec, lora_modules
from qtrain.model import load_model

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize  # noqa: E402

SHAPES = {"intermediate_size": 192}  # rows a multiple of 32 (Q8_0/Q4_0 blocks) and of 64 (NF4 on bnb's CPU path)
TYPES = ("f16", "bf16", "q8_0", "q4_0")
# Gemma-3 as every checkpoint has it and llama.cpp assumes (5 local layers to 1 global); the tiny models'
# default alternates, which llama.cpp cannot express (refused: test_gguf_refuses_a_gemma3_layout_llama_cpp_would_change)
LLAMA_CPP_LAYOUT = {"gemma3_text": {"layer_types": ["sliding_attention", "sliding_attention"]}}


def adapter_for(base: Path, out: Path, spec: LoRASpec = LoRASpec(rank=4, alpha=8), seed: int = 0) -> tuple[Path, object]:
    """A saved LoRA adapter with random lora_b (so it changes the logits), and the qtrain model it came from."""
    torch.manual_seed(seed)
    loaded = load_model(str(base), spec, compute_dtype=torch.float32)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in lora_modules(loaded.model).values():
            m.lora_b.weight.copy_(torch.randn(m.lora_b.weight.shape, generator=g) * 0.5)
    return save_adapter(loaded.model, spec, loaded.targets, str(base), out), loaded


def hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def small_adapter(base: Path, out: Path, hidden: int, layers: int) -> Path:
    """A rank-2 PEFT LoRA on every q_proj, written directly (no model loaded)."""
    from safetensors.torch import save_file

    out.mkdir()
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "base_model_name_or_path": str(base)}
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(layers):
        key = f"base_model.model.model.layers.{i}.self_attn.q_proj"
        tensors[f"{key}.lora_A.weight"] = torch.randn(2, hidden, generator=g)
        tensors[f"{key}.lora_B.weight"] = torch.randn(hidden, 2, generator=g)
    save_file(tensors, out / "adapter_model.safetensors")
    return out


# ---- merged Hugging Face checkpoint ----


def test_export_hf_loads_in_transformers_with_the_trained_logits(tiny_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    base = tiny_checkpoint("llama", **SHAPES)
    adapter, loaded = adapter_for(base, tmp_path / "adapter")
    r = export(str(base), str(adapter), tmp_path / "out", "hf", dtype=torch.float32, max_shard_bytes=200_000)
    names = {p.name for p in r.files}
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "chat_template.jinja"} <= names  # fmt: skip
    assert len([n for n in names if n.endswith(".safetensors")]) > 2  # sharded
    ids = torch.randint(4, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    merged = AutoModelForCausalLM.from_pretrained(r.out, dtype=torch.float32).eval()
    with torch.no_grad():
        want, got = loaded.model.eval()(ids).logits, merged(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)  # NF4 base: the trained model, to rounding
    assert r.logit_diff is not None and r.logit_diff < 1e-5  # what the command reports
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "out"]  # no temp folder left


def test_original_base_shifts_the_logits_and_the_report_says_so(tiny_checkpoint, tmp_path):
    base = tiny_checkpoint("llama", **SHAPES)
    adapter, _ = adapter_for(base, tmp_path / "adapter")
    r = export(str(base), str(adapter), tmp_path / "out", "hf", dtype=torch.float32, base_weights="original")
    # the original weights differ from their NF4 round trip by ~10% of a weight: logits move visibly
    assert r.logit_diff > 1e-3


def test_export_refuses_a_non_empty_out_and_unmergeable_methods(tiny_checkpoint, tmp_path):
    base = tiny_checkpoint("llama", **SHAPES)
    adapter, _ = adapter_for(base, tmp_path / "adapter", LoRASpec(rank=2, target_modules=["q_proj"]))
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an empty folder"):
        export(str(base), str(adapter), out, "hf")
    assert os.listdir(out) == ["notes.txt"]
    (adapter / "qtrain.json").write_text(json.dumps({"methods": [{"method": "prefix"}]}))
    with pytest.raises(ValueError, match="prefix"):
        export(str(base), str(adapter), tmp_path / "out2", "hf")
    assert not (tmp_path / "out2").exists() and sorted(os.listdir(tmp_path)) == ["adapter", "out"]


def test_export_into_an_empty_folder(tiny_checkpoint, tmp_path):
    base = tiny_checkpoint("llama", **SHAPES)
    (tmp_path / "out").mkdir()
    r = export(str(base), None, tmp_path / "out", "hf")
    assert (r.out / "model.safetensors").exists() and r.logit_diff is None
    mask = os.umask(0)
    os.umask(mask)
    assert r.out.stat().st_mode & 0o777 == 0o777 & ~mask  # a normal folder, not mkdtemp's private one


def test_cli_export_gguf_prints_files_and_the_logit_difference(tiny_checkpoint, tmp_path, capsys):
    base = tiny_checkpoint("llama", **SHAPES)
    adapter, _ = adapter_for(base, tmp_path / "adapter")
    rc = main(["export", "--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "g"),
               "--format", "gguf", "--gguf-type", "q8_0", "f16", "--check-tokens", "6"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0, out
    assert f"{tmp_path.name}-Q8_0.gguf" in out and "Modelfile" in out  # runs/NAME/adapter -> NAME-Q8_0.gguf
    assert "max |logit difference| merged (nf4 base) vs base + adapter" in out
    assert float(out.rsplit("adapter: ", 1)[1].split()[0]) < 0.05  # bf16 merged weights: ~bf16 rounding


def test_cli_export_help_explains_the_base_choice(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "nf4 (default): merge into the base as training saw it" in text
    assert "original: merge into the checkpoint's own 16-bit weights" in text


_PEAK_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    torch.set_num_threads(1)
    from qtrain.export import export

    def status(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024

    def run(fmt, adapter, out):
        with open("/proc/self/clear_refs", "w") as f:  # VmHWM := current RSS
            f.write("5")
        before = status("VmRSS:")
        export(sys.argv[1], adapter, out, fmt, gguf_types=("q8_0",), dtype=torch.float32, max_shard_bytes=16 << 20,
               check_tokens=0)
        return status("VmHWM:") - before

    run("hf", sys.argv[2], sys.argv[3] + "/warm-hf")  # imports and first-call set-up, not measured
    run("gguf", None, sys.argv[3] + "/warm-gguf")
    merge = run("hf", sys.argv[2], sys.argv[3] + "/hf")  # the streamed merge onto the NF4-rebuilt base
    print(json.dumps({"hf": merge, "gguf": run("gguf", None, sys.argv[3] + "/gguf")}))
    """
)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs /proc/self/clear_refs (Linux)")
def test_peak_host_memory_is_about_one_shard(tiny_checkpoint, tmp_path):
    # The loader's peak test model (shared): 16 layers of hidden 512 / intermediate 1536 in fp32,
    # ~202 MB, largest tensor 3.1 MB; the merge writes 16 MB shards. Holding the checkpoint would grow
    # RSS by > 200 MB; streaming holds one output shard + one tensor and its NF4 round trip's
    # temporaries (~50 MB for a 3 MB tensor).
    path = tiny_checkpoint("llama", hidden_size=512, intermediate_size=1536, num_layers=16, max_shard_size="64MB")
    ckpt_bytes = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    assert ckpt_bytes > 190e6
    adapter = small_adapter(path, tmp_path / "adapter", hidden=512, layers=16)
    proc = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(path), str(adapter), str(tmp_path)], cwd=tmp_path,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    growth = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"peak RSS growth for a {ckpt_bytes / 1e6:.0f} MB checkpoint: {growth}")
    assert growth["hf"] < 0.35 * ckpt_bytes, growth
    # GGUF: one tensor, its fp32 copy and gguf.quants' temporaries (measured 15-22 MB); holding one
    # 64 MB input shard, or the checkpoint, would break this
    assert growth["gguf"] < 0.20 * ckpt_bytes, growth


# ---- GGUF, read back ----


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's interleaved q/k rows back to HF's rotate-half order (per head: evens, then odds)."""
    d = w.shape[0] // n_head
    heads = w.reshape(n_head, d, *w.shape[1:])
    return np.concatenate([heads[:, 0::2], heads[:, 1::2]], axis=1).reshape(w.shape)


def expected_hf(name: str, source: dict[str, torch.Tensor], config: dict, arch: str) -> np.ndarray:
    """The merged-checkpoint tensor a GGUF tensor must equal, after undoing llama.cpp's layout."""
    tmap = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), config["num_hidden_layers"])
    for key in source:
        expert = key.split(".experts.")
        stem, _, suffix = key.rpartition(".")  # weight or bias
        if len(expert) == 2:
            stem = expert[0] + ".experts." + expert[1].split(".", 1)[1].removesuffix(".weight")
        if f"{tmap.get_name(stem)}.{suffix}" != name:
            continue
        if len(expert) == 2:
            index, proj = expert[1].split(".", 1)
            n = len({k.split(".experts.")[1].split(".")[0] for k in source if k.startswith(expert[0] + ".experts.")})
            return np.stack([source[f"{expert[0]}.experts.{i}.{proj}"].float().numpy() for i in range(n)])
        return source[key].float().numpy()
    raise AssertionError(f"{name}: no tensor of the merged checkpoint maps to it")


def undo_layout(name: str, x: np.ndarray, config: dict, arch: str) -> np.ndarray:
    if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight", "attn_q.bias", "attn_k.bias")):
        heads = config["num_attention_heads"] if "attn_q" in name else config["num_key_value_heads"]
        return unpermute(x, heads)
    if arch in ("gemma2", "gemma3") and name.endswith("norm.weight"):
        return x - 1
    return x


def bound(want: np.ndarray, qtype) -> float:
    """The largest error a block format allows for this tensor: half a step of Q8_0 (amax/127), one
    step of Q4_0 (amax/8, its +max clips to 7 steps); plus the step's own fp16 rounding (2^-11
    relative, times up to 127 or 8 steps)."""
    t = gguf.GGMLQuantizationType
    amax = float(np.abs(want).max())
    return {t.Q8_0: amax / 127 * (0.5 + 127 * 2**-11), t.Q4_0: amax / 8 * (1 + 8 * 2**-11)}.get(qtype, 0.0)


@pytest.fixture(scope="module")
def merged_and_ggufs(tiny_checkpoint, tmp_path_factory):
    """Per family: the merged checkpoint (base + a LoRA adapter, bf16) and its four GGUFs."""
    made = {}

    def make(model_type: str):
        if model_type not in made:
            tmp = tmp_path_factory.mktemp(model_type)
            base = tiny_checkpoint(model_type, **SHAPES, **LLAMA_CPP_LAYOUT.get(model_type, {}))
            adapter, _ = adapter_for(base, tmp / "adapter")
            merged = export(str(base), str(adapter), tmp / "hf", "hf", check_tokens=0).out
            made[model_type] = merged, export(str(merged), None, tmp / "gguf", "gguf", gguf_types=TYPES).out
        return made[model_type]

    return make


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_every_gguf_tensor_equals_the_merged_weights(merged_and_ggufs, model_type):
    merged, folder = merged_and_ggufs(model_type)
    config = json.loads((merged / "config.json").read_text())
    source = hf_tensors(merged)
    experts = sum(".experts." in k for k in source)
    per_expert = config.get("num_local_experts") or config.get("num_experts") or 1
    for ftype in TYPES:
        reader = gguf.GGUFReader(folder / f"hf-{ftype.upper()}.gguf")
        arch = reader.fields["general.architecture"].contents()
        assert len(reader.tensors) == len(source) - experts + experts // per_expert
        worst = {}
        for t in reader.tensors:
            got = undo_layout(t.name, dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist()))), config, arch)
            want = expected_hf(t.name, source, config, arch)
            assert got.shape == want.shape, t.name
            err = float(np.abs(got.astype(np.float64) - want).max())
            if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.BF16):
                assert err == 0 or (arch.startswith("gemma") and err < 1e-6), (ftype, t.name, err)  # bf16 source: exact
            elif t.tensor_type == gguf.GGMLQuantizationType.F16:
                assert err <= np.abs(want).max() * 2**-11, (ftype, t.name, err)  # bf16 -> f16: within f16 rounding
            else:
                assert err <= bound(want, t.tensor_type), (ftype, t.name, err, bound(want, t.tensor_type))
            worst[t.tensor_type.name] = max(worst.get(t.tensor_type.name, 0.0), err)
        print(f"{model_type} {ftype}: max |error| per type {worst}")


@pytest.mark.parametrize("model_type", ["llama", "qwen3_moe", "gemma2"])
def test_gguf_metadata_tokenizer_and_modelfile(merged_and_ggufs, model_type):
    merged, folder = merged_and_ggufs(model_type)
    config = json.loads((merged / "config.json").read_text())
    reader = gguf.GGUFReader(folder / "hf-Q8_0.gguf")
    f = {k: v.contents() for k, v in reader.fields.items() if not k.startswith("GGUF.")}
    arch = f["general.architecture"]
    assert f[f"{arch}.block_count"] == config["num_hidden_layers"]
    assert f[f"{arch}.attention.head_count_kv"] == config["num_key_value_heads"]
    assert f[f"{arch}.embedding_length"] == config["hidden_size"]
    tokenizer = json.loads((merged / "tokenizer.json").read_text())
    tokens = f["tokenizer.ggml.tokens"]
    assert len(tokens) == config["vocab_size"]
    for text, i in tokenizer["model"]["vocab"].items():
        assert tokens[i] == text.replace(" ", "\u2581"), (i, text)
    assert f["tokenizer.ggml.eos_token_id"] == 2 and f["tokenizer.ggml.bos_token_id"] == 1
    assert f["tokenizer.chat_template"] == (merged / "chat_template.jinja").read_text()
    if model_type == "qwen3_moe":
        assert (f["qwen3moe.expert_count"], f["qwen3moe.expert_used_count"]) == (4, 2)
    if model_type == "gemma2":
        assert f["gemma2.final_logit_softcapping"] == config["final_logit_softcapping"]
    modelfile = (folder / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./hf-F16.gguf\n")
    assert 'PARAMETER stop "</s>"' in modelfile
    # the Go template's pieces reproduce the Jinja template's rendering of a conversation
    assert '{{ if eq .Role "user" }}<|user|>\n{{ .Content }}\n' in modelfile.replace("{{ else if", "{{ if")
    assert '"assistant" }}<|assistant|>\n{{ .Content }}</s>\n' in modelfile


def test_byte_level_bpe_and_unigram_tokenizers(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from qtrain.gguf_export import read_vocab

    text = ["the quick brown fox jumps over the lazy dog " * 3, "hello world, hello qtrain"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))  # fmt: skip
    bpe.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    v = read_vocab(tmp_path, {"vocab_size": bpe.get_vocab_size(), "model_type": "qwen2"})
    saved = json.loads((tmp_path / "tokenizer.json").read_text())["model"]
    assert v.model == "gpt2" and len(v.merges) == len(saved["merges"]) > 10
    assert v.tokens[bpe.token_to_id("Ġthe")] == "Ġthe" and v.special["eos"] == 0 and v.types[0] == gguf.TokenType.CONTROL
    # Llama 3's post-processor: ByteLevel then a template that puts BOS first -> add_bos_token
    saved = json.loads((tmp_path / "tokenizer.json").read_text())
    saved["post_processor"] = {"type": "Sequence", "processors": [{"type": "ByteLevel"}, {"type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}]}]}  # fmt: skip
    (tmp_path / "tokenizer.json").write_text(json.dumps(saved))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|endoftext|>"}))
    assert read_vocab(tmp_path, {"vocab_size": bpe.get_vocab_size()}).add_bos is True
    uni = Tokenizer(models.Unigram())
    uni.train_from_iterator(text, trainers.UnigramTrainer(vocab_size=60, special_tokens=["<unk>"], unk_token="<unk>"))
    uni.save(str(tmp_path / "tokenizer.json"))
    v = read_vocab(tmp_path, {"vocab_size": uni.get_vocab_size()})
    pieces = json.loads((tmp_path / "tokenizer.json").read_text())["model"]["vocab"]
    assert v.model == "llama" and v.scores == [float(s) for _, s in pieces]
    assert v.types[uni.token_to_id("<unk>")] == gguf.TokenType.UNKNOWN


def test_gguf_refuses_an_unknown_family_by_name(tiny_checkpoint, tmp_path):
    from qtrain.gguf_export import gguf_arch

    with pytest.raises(ValueError, match="model_type 'gpt_bigcode' has no GGUF export"):
        gguf_arch({"model_type": "gpt_bigcode"}, tmp_path)


def test_gguf_refuses_a_gemma3_layout_llama_cpp_would_change(tiny_checkpoint, tmp_path):
    from qtrain.gguf_export import gguf_arch

    alternating = json.loads((tiny_checkpoint("gemma3_text", **SHAPES) / "config.json").read_text())
    with pytest.raises(ValueError, match=r"layer_types .* not llama.cpp's Gemma-3 layout"):
        gguf_arch(alternating, tmp_path)
    usual = alternating | {"layer_types": ["sliding_attention"] * 5 + ["full_attention"]}
    assert gguf_arch(usual, tmp_path) == "gemma3"
    with pytest.raises(ValueError, match="rope_local_base_freq 20000"):
        gguf_arch(usual | {"rope_local_base_freq": 20000.0}, tmp_path)


# ---- llama.cpp ----


@pytest.mark.llama_cpp
@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_llama_cpp_runs_the_gguf_like_transformers(merged_and_ggufs, model_type):
    """llama.cpp (llama-cpp-python) loads each family's F16 GGUF and scores a prompt as transformers
    scores the merged checkpoint: the same logits within f16 rounding, the same greedy tokens."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (it builds llama.cpp from source)")
    from transformers import AutoModelForCausalLM

    merged, folder = merged_and_ggufs(model_type)
    ids = [1, *range(40, 52)]
    hf = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0].numpy()
    llm = llama_cpp.Llama(model_path=str(folder / "hf-F16.gguf"), logits_all=True, n_ctx=64, verbose=False)
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)])
    print(f"{model_type}: llama.cpp F16 vs transformers, max |logit diff| {np.abs(got - want).max():.2e}")
    diff = np.abs(got - want).max()
    assert diff < 0.05, model_type  # f16 weights, llama.cpp's f16/f32 math
    top2 = np.sort(want, axis=-1)[:, -2:]
    decided = top2[:, 1] - top2[:, 0] > 2 * diff  # positions whose greedy token no f16 rounding can flip
    assert decided.sum() >= len(ids) // 2, model_type
    assert (got.argmax(-1) == want.argmax(-1))[decided].all(), model_type  # the same greedy tokens


FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "chat_templates"
TEMPLATES = {  # fixture: (bos, eos, the turn-ending stop token)
    "qwen2": ("<bos>", "<|im_end|>", "<|im_end|>"),
    "llama31": ("<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>"),
    "gemma2": ("<bos>", "<eos>", "<end_of_turn>"),
    "phi35": ("<s>", "<|endoftext|>", "<|end|>"),
}


def go_render(modelfile: str, messages: list[dict]) -> str:
    """What Ollama's TEMPLATE makes of `messages` + the generation prompt: the template that
    `modelfile` writes is a range over messages with one `if eq .Role` branch per role."""
    import re

    text = modelfile.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    body, _, tail = text.removeprefix("{{- range .Messages }}").rpartition("{{ end }}{{ end }}")
    branches = dict(re.findall(r'\{\{ (?:else )?if eq \.Role "(\w+)" \}\}(.*?)(?=\{\{ else if|\Z)', body, re.S))
    return "".join(branches[m["role"]].replace("{{ .Content }}", m["content"]) for m in messages) + tail


@pytest.mark.parametrize("name", TEMPLATES)
def test_modelfile_template_renders_as_the_chat_template(name):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from qtrain.gguf_export import modelfile

    bos, eos, stop = TEMPLATES[name]
    template = (FIXTURES / f"{name}.jinja").read_text()
    text = modelfile("m.gguf", template, {"bos_token": bos, "eos_token": eos})
    system = [] if name == "gemma2" else [{"role": "system", "content": "Be brief."}]
    messages = [*system, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "2+2?"}]  # fmt: skip
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    want = env.from_string(template).render(messages=messages, add_generation_prompt=True, bos_token=bos, eos_token=eos)
    assert go_render(text, messages) == want.removeprefix(bos)  # llama.cpp adds the BOS itself
    assert f'PARAMETER stop "{stop}"' in text and f'PARAMETER stop "{eos}"' in text
