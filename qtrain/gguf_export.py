"""A merged Hugging Face checkpoint as one GGUF file (llama.cpp, Ollama, LM Studio), through `gguf`,
the format's own Python library, streamed: tensor infos first (shapes and types are known from the
safetensors headers), then each tensor read, converted and written one at a time.

What llama.cpp expects differs from the HF layout in a few places, as its `convert_hf_to_gguf.py`
defines per architecture (names through `gguf.get_tensor_name_map`):
    llama / mistral / mixtral   q_proj, k_proj rows permuted from HF's rotate-half to interleaved RoPE
    gemma2 / gemma3             every `*norm.weight` stored as 1 + w (llama.cpp multiplies by w)
    mixtral / qwen3_moe         the experts of a projection stacked: [n_expert, out, in]
    llama 3.x (rope_type llama3) the frequency factors as `rope_freqs.weight`
Types: F16, BF16, Q8_0 and Q4_0 (`gguf.quants` quantizes these; not Q4_K). 1-D tensors and the
MoE router stay F32 as llama.cpp keeps them; with Q4_0 the embeddings and output stay Q8_0.

The tokenizer (tokenizer.json) and the chat template go into the metadata; `modelfile` writes the
Ollama Modelfile beside it (its TEMPLATE rendered from the chat template, stop tokens included).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from qtrain.checkpoint import SafetensorsCheckpoint

GGUF_TYPES = ("f16", "bf16", "q8_0", "q4_0")
# transformers model_type -> llama.cpp architecture (gguf.MODEL_ARCH_NAMES values)
GGUF_ARCH = {
    "llama": "llama", "mistral": "llama", "mixtral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
    "qwen3_moe": "qwen3moe", "phi3": "phi3", "olmo2": "olmo2", "gemma2": "gemma2", "gemma3_text": "gemma3",
}  # fmt: skip
_PERMUTED_QK = ("llama",)  # HF rotate-half q/k rows -> llama.cpp's interleaved (non-NeoX) RoPE
_PLUS_ONE_NORMS = ("gemma2", "gemma3")
_EXPERT = re.compile(r"(.*\.experts)\.(\d+)\.(\w+)\.weight")


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError("GGUF export needs the gguf package: pip install 'qtrain[export]' (or pip install gguf)") from None
    return gguf


def gguf_arch(config: dict, where: Path) -> str:
    """llama.cpp's architecture name of a model type, or ValueError naming the model type."""
    model_type = config.get("model_type")
    if model_type not in GGUF_ARCH:
        raise ValueError(
            f"{where}: model_type {model_type!r} has no GGUF export in qtrain; supported: {', '.join(sorted(GGUF_ARCH))}. "
            "Export the merged Hugging Face checkpoint (--format hf) and convert it with llama.cpp's convert_hf_to_gguf.py"
        )
    check_llama_cpp_layout(config, model_type, where)
    return GGUF_ARCH[model_type]


# llama.cpp's Gemma-3 graph fixes what the config spells out: every 6th layer global (the others
# sliding-window) and the local layers' RoPE base 10,000, as every Gemma-3 checkpoint has them
GEMMA3_SWA_PATTERN, GEMMA3_LOCAL_ROPE_BASE = 6, 10000.0


def check_llama_cpp_layout(config: dict, model_type: str, where: Path) -> None:
    """ValueError naming the key when llama.cpp would run a different model than the config describes
    (a GGUF cannot say otherwise): a Gemma-3 whose local/global layers or local RoPE base are not
    llama.cpp's fixed ones."""
    if model_type != "gemma3_text":
        return
    layers = config.get("layer_types")
    want = ["full_attention" if (i + 1) % GEMMA3_SWA_PATTERN == 0 else "sliding_attention" for i in range(len(layers or []))]
    if layers and layers != want:
        raise ValueError(
            f"{where}: layer_types {layers} is not llama.cpp's Gemma-3 layout (every {GEMMA3_SWA_PATTERN}th layer "
            "global, the others sliding-window): llama.cpp would compute another model; export --format hf instead"
        )
    base = config.get("rope_local_base_freq", GEMMA3_LOCAL_ROPE_BASE)
    if base != GEMMA3_LOCAL_ROPE_BASE:
        raise ValueError(
            f"{where}: rope_local_base_freq {base} is not llama.cpp's fixed {GEMMA3_LOCAL_ROPE_BASE:g} for Gemma-3's "
            "local layers; export --format hf instead"
        )


# ---- tensors ----


@dataclass
class Entry:
    """One GGUF tensor: its name, the HF keys it is built from (several: stacked experts), its shape."""

    name: str
    keys: list[str]
    shape: tuple[int, ...]
    ggml_type: object = None  # gguf.GGMLQuantizationType, chosen by `choose_type`
    plus_one: bool = False
    permute_heads: int = 0  # > 0: llama q/k permutation with this many heads


def plan(model_dir: Path, config: dict) -> list[Entry]:
    """The GGUF tensors of a merged checkpoint, in checkpoint order (expert groups at their first key)."""
    gguf = _gguf()
    arch = gguf_arch(config, model_dir)
    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_enum, config["num_hidden_layers"])
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    entries: dict[str, Entry] = {}
    for key, tensor in SafetensorsCheckpoint(model_dir).entries.items():
        shape = tuple(tensor.shape)
        if key.endswith("rotary_emb.inv_freq"):
            continue
        expert = _EXPERT.fullmatch(key)
        hf = f"{expert[1]}.{expert[3]}" if expert else key.removesuffix(".weight").removesuffix(".bias")
        name = names.get_name(hf)
        if name is None:
            raise ValueError(f"{model_dir}: tensor {key} has no GGUF name for architecture {arch}; qtrain cannot export it")
        name += ".bias" if key.endswith(".bias") else ".weight"
        if expert:
            e = entries.setdefault(name, Entry(name, [], (0, *shape)))
            e.keys.append(key)
            e.shape = (len(e.keys), *shape)
            continue
        entry = Entry(name, [key], shape, plus_one=arch in _PLUS_ONE_NORMS and key.endswith("norm.weight"))
        if arch in _PERMUTED_QK and re.search(r"\.(q|k)_proj\.(weight|bias)$", key):
            entry.permute_heads = heads if ".q_proj." in key else kv_heads
        entries[name] = entry
    return list(entries.values())


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's rotate-half row order -> llama.cpp's interleaved pairs: per head, rows (0, d/2, 1, d/2+1, ...)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def choose_type(entry: Entry, ftype: str):
    """The ggml type of one tensor in a file of type `ftype`: 1-D tensors, the MoE router and rows
    not a multiple of the block stay F32 (llama.cpp's habit); with Q4_0, embeddings and output Q8_0."""
    gguf = _gguf()
    t = gguf.GGMLQuantizationType
    if len(entry.shape) < 2 or entry.name.endswith("ffn_gate_inp.weight"):
        return t.F32
    want = {"f16": t.F16, "bf16": t.BF16, "q8_0": t.Q8_0, "q4_0": t.Q4_0}[ftype]
    if want == t.Q4_0 and entry.name.split(".")[0] in ("token_embd", "output"):
        want = t.Q8_0
    block = gguf.GGML_QUANT_SIZES[want][0]
    return want if entry.shape[-1] % block == 0 else t.F16


def tensor_data(entry: Entry, read) -> np.ndarray:
    """The tensor as GGUF stores it: converted (permute, 1 + w, stacked) in fp32, then typed."""
    gguf = _gguf()
    w = torch.stack([read(k) for k in entry.keys]) if len(entry.keys) > 1 else read(entry.keys[0])
    w = w.float()
    if entry.permute_heads:
        w = permute_qk(w, entry.permute_heads)
    if entry.plus_one:
        w = w + 1
    x = w.numpy()
    t = gguf.GGMLQuantizationType
    if entry.ggml_type == t.F32:
        return np.ascontiguousarray(x, dtype=np.float32)
    if entry.ggml_type == t.F16:
        return x.astype(np.float16)
    return gguf.quants.quantize(x, entry.ggml_type)


def extra_tensors(config: dict) -> list[tuple[str, np.ndarray]]:
    """Tensors llama.cpp needs that the checkpoint has none of: Llama 3.x's RoPE frequency factors."""
    scaling = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if scaling.get("rope_type", scaling.get("type")) != "llama3":
        return []
    base, dim = _rope_theta(config), _head_dim(config)
    factor = scaling.get("factor", 8.0)
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old = scaling.get("original_max_position_embeddings", 8192)
    factors = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * base ** (i / dim)
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return [("rope_freqs.weight", np.array(factors, dtype=np.float32))]


# ---- metadata ----


def _head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _rope(config: dict) -> dict:
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    return params.get("full_attention", params)  # Gemma-3: per layer type


def _rope_theta(config: dict) -> float:
    return float(config.get("rope_theta") or _rope(config).get("rope_theta", 10000.0))


def check_rope(config: dict, where: Path) -> None:
    kind = _rope(config).get("rope_type", _rope(config).get("type", "default"))
    if kind not in ("default", "llama3", "linear"):
        raise ValueError(f"{where}: rope_type {kind!r} is not written to GGUF by qtrain yet (default, linear, llama3 are)")


def write_hparams(w, config: dict, arch: str) -> None:
    """The {arch}.* keys llama.cpp reads for this architecture."""
    gguf = _gguf()
    w.add_context_length(config.get("max_position_embeddings", 4096))
    w.add_embedding_length(config["hidden_size"])
    w.add_block_count(config["num_hidden_layers"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config.get("num_key_value_heads") or config["num_attention_heads"])
    w.add_key_length(_head_dim(config))
    w.add_value_length(_head_dim(config))
    w.add_rope_freq_base(_rope_theta(config))
    w.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    w.add_vocab_size(config["vocab_size"])
    rotary = int(_head_dim(config) * _rope(config).get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)))
    w.add_rope_dimension_count(rotary)
    rope = _rope(config)
    if rope.get("rope_type", rope.get("type")) == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    experts = config.get("num_local_experts") or config.get("num_experts")
    if experts:
        w.add_expert_count(experts)
        w.add_expert_used_count(config["num_experts_per_tok"])
    if arch == "qwen3moe":
        w.add_expert_feed_forward_length(config["moe_intermediate_size"])
    if arch in ("gemma2", "gemma3") and config.get("sliding_window"):
        w.add_sliding_window(config["sliding_window"])
    if arch == "gemma2":
        w.add_attn_logit_softcapping(config.get("attn_logit_softcapping") or 0.0)
        w.add_final_logit_softcapping(config.get("final_logit_softcapping") or 0.0)


# ---- tokenizer ----


@dataclass
class Vocab:
    """A tokenizer as GGUF holds it (tokenizer.ggml.*)."""

    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece-style)
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] = field(default_factory=list)
    pre: str = "default"
    special: dict[str, int] = field(default_factory=dict)  # bos, eos, unk, pad -> id
    add_bos: bool | None = None
    add_space_prefix: bool | None = None


_PRE_BY_MODEL_TYPE = {"llama": "llama-bpe", "qwen2": "qwen2", "qwen3": "qwen2", "qwen3_moe": "qwen2"}


def read_vocab(model_dir: Path, config: dict) -> Vocab:
    """tokenizer.json (+ tokenizer_config.json) as a GGUF vocabulary. Byte-level BPE -> gpt2 with its
    merges; BPE with byte fallback or Unigram (SentencePiece converted) -> llama with scores; a
    WordLevel vocabulary of single characters (qtrain's tiny models) -> llama, one piece per character."""
    gguf = _gguf()
    tt = gguf.TokenType
    path = model_dir / "tokenizer.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found; GGUF export embeds the tokenizer and reads it from tokenizer.json")
    tok = json.loads(path.read_text())
    cfg_path = model_dir / "tokenizer_config.json"
    tcfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    model = tok["model"]
    added = {t["content"]: t for t in tok.get("added_tokens", [])}
    if model["type"] == "Unigram":
        pieces = {p: (i, s) for i, (p, s) in enumerate(model["vocab"])}
        vocab = {p: i for p, (i, _) in pieces.items()}
    else:
        vocab = dict(model["vocab"])
    vocab |= {c: t["id"] for c, t in added.items()}
    n = max(config["vocab_size"], max(vocab.values()) + 1)
    tokens, types = [f"[PAD{i}]" for i in range(n)], [int(tt.UNUSED)] * n
    for text, i in vocab.items():
        tokens[i], types[i] = text, int(tt.NORMAL)
    for text, t in added.items():
        types[t["id"]] = int(tt.CONTROL if t.get("special") else tt.USER_DEFINED)
    out = Vocab("gpt2", tokens, types)
    if model["type"] == "BPE" and not model.get("byte_fallback"):
        out.merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        out.pre = _PRE_BY_MODEL_TYPE.get(config.get("model_type"), "default") if n >= 32000 else "default"
    elif model["type"] in ("BPE", "Unigram"):
        out.model, out.scores = "llama", [0.0] * n
        for text, i in vocab.items():
            if model["type"] == "Unigram" and text in pieces:
                out.scores[i] = float(pieces[text][1])
            elif model["type"] == "BPE":
                out.scores[i] = -float(i)  # earlier pieces are the more frequent merges
            if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
                types[i] = int(tt.BYTE)
    elif model["type"] == "WordLevel" and all(len(t) == 1 for t in vocab if t not in added):
        out.model, out.scores, out.add_space_prefix = "llama", [0.0] * n, False
        for text, i in vocab.items():
            if text not in added:
                tokens[i] = text.replace(" ", "\u2581")  # SentencePiece's space
    else:
        raise ValueError(f"{path}: a {model['type']} tokenizer has no GGUF form in qtrain (BPE, Unigram, 1-character WordLevel do)")
    unk_id = vocab.get(model.get("unk_token"), model.get("unk_id"))  # BPE/WordLevel name it, Unigram numbers it
    if unk_id is not None:
        types[unk_id] = int(tt.UNKNOWN)
    for role in ("bos", "eos", "unk", "pad"):
        value = tcfg.get(f"{role}_token")
        value = value.get("content") if isinstance(value, dict) else value
        if value in vocab:
            out.special[role] = vocab[value]
    out.add_bos = tcfg.get("add_bos_token", _post_processor_adds_bos(tok, tcfg))
    return out


def _post_processor_adds_bos(tok: dict, tcfg: dict) -> bool:
    """Whether tokenizer.json's post-processor (or one in its Sequence: Llama 3) puts BOS before every text."""
    bos = tcfg.get("bos_token")
    bos = bos.get("content") if isinstance(bos, dict) else bos
    post = tok.get("post_processor") or {}
    for p in post.get("processors", [post]):
        single = p.get("single") or []
        if bos is not None and single and single[0].get("SpecialToken", {}).get("id") == bos:
            return True
    return False


def chat_template(model_dir: Path) -> str | None:
    """The checkpoint's chat template: chat_template.jinja, else tokenizer_config.json's."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text()
    cfg = model_dir / "tokenizer_config.json"
    template = json.loads(cfg.read_text()).get("chat_template") if cfg.exists() else None
    if isinstance(template, list):  # named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template


def write_vocab(w, vocab: Vocab, template: str | None) -> None:
    w.add_tokenizer_model(vocab.model)
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    if vocab.scores is not None:
        w.add_token_scores(vocab.scores)
    if vocab.merges:
        w.add_token_merges(vocab.merges)
    ids = {"bos": w.add_bos_token_id, "eos": w.add_eos_token_id, "unk": w.add_unk_token_id, "pad": w.add_pad_token_id}
    for role, i in vocab.special.items():
        ids[role](i)
    if vocab.add_bos is not None:
        w.add_add_bos_token(bool(vocab.add_bos))
    if vocab.add_space_prefix is not None:
        w.add_add_space_prefix(vocab.add_space_prefix)
    if template:
        w.add_chat_template(template)


# ---- the file ----


def write_gguf(model_dir: Path, out: Path, ftype: str, name: str) -> Path:
    """Write `model_dir` (a 16-bit HF checkpoint) as a GGUF of type `ftype` at `out`, one tensor in
    memory at a time."""
    gguf = _gguf()
    if ftype not in GGUF_TYPES:
        raise ValueError(f"GGUF type {ftype!r}; choose one of {', '.join(GGUF_TYPES)}")
    config = json.loads((model_dir / "config.json").read_text())
    arch = gguf_arch(config, model_dir)
    check_rope(config, model_dir)
    entries = plan(model_dir, config)
    for e in entries:
        e.ggml_type = choose_type(e, ftype)
    extras = extra_tensors(config)
    vocab = read_vocab(model_dir, config)
    template = chat_template(model_dir)

    w = gguf.GGUFWriter(out, arch)
    w.add_name(name)
    w.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                     "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[ftype])  # fmt: skip
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_hparams(w, config, arch)
    write_vocab(w, vocab, template)
    for e in entries:
        t = e.ggml_type
        if t in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            dtype = np.float32 if t == gguf.GGMLQuantizationType.F32 else np.float16
            w.add_tensor_info(e.name, e.shape, np.dtype(dtype), math.prod(e.shape) * np.dtype(dtype).itemsize)
        else:
            byte_shape = gguf.quant_shape_to_byte_shape(e.shape, t)
            w.add_tensor_info(e.name, byte_shape, np.dtype(np.uint8), math.prod(byte_shape), raw_dtype=t)
    for n, x in extras:
        w.add_tensor_info(n, x.shape, x.dtype, x.nbytes)
    w.write_header_to_file(out)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for e, x in zip(entries, _stream(model_dir, entries)):
        w.write_tensor_data(x)
    for _, x in extras:
        w.write_tensor_data(x)
    w.close()
    return out


def _stream(model_dir: Path, entries: list[Entry]) -> Iterator[np.ndarray]:
    """Each entry's data in turn, read with plain file reads (no mmap: the pages of a mapped
    checkpoint would stay resident and count as the process's memory)."""
    ckpt = SafetensorsCheckpoint(model_dir)
    for e in entries:
        yield tensor_data(e, ckpt.finite)


# ---- Ollama ----

_MARK = {"system": "\x00S\x00", "user": "\x00U1\x00", "assistant": "\x00A1\x00", "user2": "\x00U2\x00"}


def modelfile(gguf_name: str, template: str | None, tokens: dict[str, str]) -> str:
    """An Ollama Modelfile for `gguf_name` (beside it): FROM, the chat template as a Go TEMPLATE
    (each role's text before and after its content, found by rendering the Jinja template with
    marker messages) and the stop tokens (EOS and the special tokens that end a turn)."""
    lines = [f"FROM ./{gguf_name}"]
    stops = [tokens["eos_token"]] if tokens.get("eos_token") else []
    if template:
        parts = _turn_parts(template, tokens)
        go = ["{{- range .Messages }}"]
        for i, (role, (before, after)) in enumerate(parts.items()):
            go.append(("{{ if" if i == 0 else "{{ else if") + f' eq .Role "{role}" }}}}{before}{{{{ .Content }}}}{after}')
            stops += [s for s in re.findall(r"<[|/]?[\w|]+[|>]?>|</s>|<\|[^|]+\|>", after) if s not in stops]
        go.append("{{ end }}{{ end }}" + parts["assistant"][0].replace('"""', ""))
        text = "".join(go).replace('"""', "")
        lines.append(f'TEMPLATE """{text}"""')
    lines += [f'PARAMETER stop "{json.dumps(s)[1:-1]}"' for s in stops]
    return "\n".join(lines) + "\n"


def _turn_parts(template: str, tokens: dict[str, str]) -> dict[str, tuple[str, str]]:
    """{role: (text before its content, text after)} from one render of a marked conversation
    (system, user, assistant, user): between two contents stand one role's end and the next one's
    start; the user's start is what follows both the system and the assistant turn (their longest
    common suffix), the assistant's start is the generation prompt. A template that refuses or moves
    the system message (Gemma, Mistral) is rendered without one."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    tpl = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template)
    args = {k: v for k, v in tokens.items() if v is not None}

    def render(roles: list[str], gen: bool = False) -> str:
        messages = [{"role": r.removesuffix("2"), "content": _MARK[r]} for r in roles]
        return tpl.render(messages=messages, add_generation_prompt=gen, **args)

    for roles in (["system", "user", "assistant", "user2"], ["user", "assistant", "user2"]):
        try:
            text = render(roles)
        except Exception:  # noqa: BLE001 - a template may raise on a role it refuses (Gemma: no system)
            continue
        at = [text.find(_MARK[r]) for r in roles]
        if all(a >= 0 for a in at) and at == sorted(at):
            break
    else:
        raise ValueError("the chat template does not render a user/assistant conversation; write the Modelfile TEMPLATE by hand")
    seg = re.split("|".join(re.escape(_MARK[r]) for r in roles), text)  # len(roles) + 1 pieces
    seg[0] = seg[0].removeprefix(args.get("bos_token", ""))
    upto_user = roles[: roles.index("user") + 1]
    plain, prompted = render(upto_user), render(upto_user, gen=True)
    gen = prompted[len(_shared_start(plain, prompted)) :]
    i = roles.index("user")
    user_after, assistant_before = (seg[i + 1][: -len(gen)], gen) if gen and seg[i + 1].endswith(gen) else (seg[i + 1], "")
    last = render(roles[: i + 2]).partition(_MARK["assistant"])[2]  # the assistant's end (+ the conversation's)
    assistant_after = _shared_start(last, seg[i + 2])
    user_before = seg[i + 2][len(assistant_after) :]
    parts = {"user": (user_before, user_after), "assistant": (assistant_before, assistant_after)}
    if roles[0] == "system":
        system_after = seg[1][: len(seg[1]) - len(user_before)] if seg[1].endswith(user_before) else seg[1]
        parts = {"system": (seg[0], system_after)} | parts
    return parts


def _shared_start(a: str, b: str) -> str:
    """The common start of `a` and `b`, not ending inside a special token ('<|end|>\n<|' -> '<|end|>\n')."""
    p = os.path.commonprefix([a, b])
    if len(p) < min(len(a), len(b)) and "<" in p and ">" not in p[p.rindex("<") :]:
        p = p[: p.rindex("<")]
    return p
