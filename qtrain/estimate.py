"""Will it fit? An analytic estimate of a training step's peak memory, without a GPU or weights.

The model is built on the meta device exactly as training builds it (NF4 linears, adapters on the
targets), so parameter counts are exact; the rest follows from the shapes of what the training
step keeps alive. Per token and per decoder layer, with D hidden, I intermediate, H/K query/KV
heads of size d, e bytes per compute-dtype element, a bytes per adapter activation:

    saved for the backward  4D (fp32 norm input) + 4 (rsqrt), twice       attention and MLP norms
                            eD + eD                                       normed inputs, once each
                            e(2Hd + 2Kd) + 4H                              q, k, v, output, logsumexp
                            3eI + eI                                       gate, act, up; down's input
                            Σ r·a                                          X @ A^T of each adapter
                            Σ (a + mask) · in_features                     LoRA dropout > 0: each adapter's dropped input
    under checkpointing     eD per layer (its input); one layer's saved set is rebuilt in backward

Beside them: the layer backward's gradient buffers (`layer_backward_bytes`: the residual gradient
and the worst moment of the MLP / attention backward, fused projections split with one
concatenation), and on the GPU's dequant-once path (`_nf4_path`: >= 256 tokens per micro-batch)
one compute-dtype buffer of the largest projection weight, fused gate/up included, per device.

The peak is the largest of three moments: the end of the forward (everything saved, plus the
loss), the backward of the last layer (checkpointed inputs, one recomputed layer and its gradient
buffers) and the optimizer step (gradients and state). Weights, adapters and optimizer state are
there throughout. `peak` is what `torch.cuda.max_memory_allocated` reports; `device_total` adds
the CUDA context and the allocator's slack, which that counter does not see.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn
from transformers import PretrainedConfig

from qtrain.builder import attach_methods
from qtrain.config import REFERENCE_OBJECTIVES
from qtrain.families import ALL_OPS, fused_support
from qtrain.fused import GATE_UP, QKV
from qtrain.kernels.linear_cross_entropy import default_chunk_size, linear_cross_entropy_workspace_bytes
from qtrain.kernels.nf4_dispatch import DEFAULT_CROSSOVER, GEMV_MAX_M
from qtrain.lora import LoRALinear, LoRASpec, swap_base_linears
from qtrain.methods.lora import LoRA
from qtrain.model import build_skeleton, tie_embeddings
from qtrain.moe import NF4Experts, active_intermediate, is_expert, swap_experts
from qtrain.nf4 import ABSMAX_BLOCKSIZE, BLOCKSIZE
from qtrain.preference import PAIR_OBJECTIVES, token_logps_bytes

GiB = 2**30
CUDA_CONTEXT = 512 * 2**20  # CUDA context + kernels (not in torch's allocator); 0.3-0.6 GiB in practice
ALLOCATOR_SLACK = 0.05  # caching-allocator fragmentation, as a fraction of the peak
CUBLAS_WORKSPACE = 32 * 2**20
PAGED_MIN_NUMEL = 100_000  # bitsandbytes pages optimizer state only for tensors this large
MIN_8BIT_NUMEL = 4096  # ...and keeps 32-bit state below this size in its 8-bit optimizers
CATEGORIES = ("weights", "adapters", "gradients", "optimizer", "activations", "other")


@dataclass
class Workload:
    """What a training step does, beside the model: the keys of a config that move memory."""

    batch_size: int = 1
    seq_len: int = 2048
    dtype: torch.dtype = torch.bfloat16  # compute dtype of the base
    quantize: bool = True
    backend: str = "triton"  # NF4 kernels: "triton" (CUDA, sm80+) or "torch" (dequantizes each weight)
    gradient_checkpointing: bool = True
    offload_activations: bool = False
    optimizer: str = "paged_adamw_32bit"  # adamw | paged_adamw_32bit | paged_adamw_8bit
    loss_chunk: int | None = None  # tokens per lm_head + loss chunk; None: automatic; 0: full logits
    autocast: bool = True
    attention_mask: bool = False  # padded or packed batches carry a [B, 1, S, S] mask
    device: str = "cuda"
    methods: tuple = ()  # the PEFT methods (qtrain.methods, LoRA among them): their parameters and memory facts
    objective: str = "sft"  # sft, or a preference objective: dpo/orpo/simpo run 2 rows a pair (qtrain.preference)
    reference_copy: bool = False  # a second NF4 copy of the base as DPO's reference model (the usual stack; qtrain switches the adapter off instead)
    fused: tuple = ()  # what qtrain.fused changes: "qkv", "gate_up" (an fp32 absmax each), "rms_norm", "swiglu", "varlen"
    ranks: int = 1  # processes (GPUs) of a torchrun launch; the estimate is per rank
    strategy: str = "single"  # "single" | "ddp" (everything on each rank) | "fsdp" (qtrain.fsdp: base, adapters, moments in 1/ranks)

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len


@dataclass
class Item:
    category: str
    name: str
    bytes: int
    note: str = ""


@dataclass
class Estimate:
    items: list[Item]  # what is allocated at the peak
    phase: str  # "forward end" | "backward" | "optimizer step"
    peak: int  # bytes allocated at the peak (torch.cuda.max_memory_allocated)
    paged: int = 0  # bitsandbytes paged optimizer state: CUDA unified memory, outside torch's allocator
    host: int = 0  # pinned CPU RAM holding offloaded activations
    phases: dict[str, int] = field(default_factory=dict)  # peak of each phase
    workload: Workload | None = None

    @property
    def device_total(self) -> int:
        """What the GPU must hold: the peak, paged state, cuBLAS + CUDA context and allocator slack."""
        return int(self.peak * (1 + ALLOCATOR_SLACK)) + self.paged + CUDA_CONTEXT

    def by_category(self) -> dict[str, int]:
        out = dict.fromkeys(CATEGORIES, 0)
        for item in self.items:
            out[item.category] += item.bytes
        return out

    def to_dict(self) -> dict:
        w = asdict(self.workload) if self.workload else {}
        w["dtype"] = str(w.get("dtype", "")).removeprefix("torch.")
        return {
            "phase": self.phase,
            "peak_bytes": self.peak,
            "device_total_bytes": self.device_total,
            "paged_bytes": self.paged,
            "host_bytes": self.host,
            "by_category": self.by_category(),
            "phases": self.phases,
            "items": [asdict(i) for i in self.items],
            "workload": w,
        }


# ---- the model, on meta ----


def with_lora(w: Workload, spec: LoRASpec | None) -> Workload:
    """`w` with a LoRA described by its spec first among the methods (the estimate's callers may give
    LoRA that way, beside `w.methods`); None or rank 0: `w` as it is."""
    if spec is None or not spec.rank:
        return w
    return replace(w, methods=(LoRA.from_spec(spec), *w.methods))


def meta_model(config: PretrainedConfig, spec: LoRASpec | None, w: Workload) -> nn.Module:
    """The training model without memory: skeleton + every method (copies: the objects of `w` are
    left as they are) on the meta device, attached as `qtrain.builder.build_model` attaches them (no
    weights are read; the fused modules are counted from `w.fused`)."""
    model = build_skeleton(config, w.dtype)
    tie_embeddings(model, config)  # as load_base does: a tied lm_head is no second tensor
    with torch.device("meta"):
        swap_base_linears(model, quantize_base=w.quantize, backend="torch")
        swap_experts(model, quantize_base=w.quantize, backend="torch")  # MoE experts: NF4, as loaded
        attach_methods(model, [replace(method) for method in with_lora(w, spec).methods], weights=False)
    return model


def nf4_bytes(numel: int) -> int:
    """Packed 4-bit codes, 8-bit absmax per 64, fp32 scale per 256 absmax, and the two code tables."""
    blocks = math.ceil(numel / BLOCKSIZE)
    return (numel + 1) // 2 + blocks + 4 * math.ceil(blocks / ABSMAX_BLOCKSIZE) + 4 * 16 + 4 * 256


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n:,}"


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def weight_items(model: nn.Module, w: Workload) -> list[Item]:
    """The weights' rows, in this order: the base linears (NF4, or 16-bit unquantized), the 16-bit rest
    (embeddings, lm_head, norms, routers), then DoRA's row norms and the fused projections' absmax."""
    linears = [m for m in model.modules() if isinstance(m, LoRALinear)]
    lora_params = {id(p) for p in adapter_params(model, w.methods)}
    base = sum(m.in_features * m.out_features for m in linears)
    seen, dense = set(), 0
    for p in [*model.parameters(), *model.buffers()]:
        if id(p) not in lora_params and id(p) not in seen:  # tied embeddings count once
            seen.add(id(p))
            dense += _nbytes(p)
    items = [Item("weights", "16-bit embeddings, lm_head, norms", dense, f"{str(w.dtype).removeprefix('torch.')}")]
    dora = sum(4 * m.out_features for m in linears if getattr(m, "use_dora", False))
    if dora:
        items.append(Item("weights", "DoRA: row norms of W", dora, "fp32, computed once at load"))
    groups = {"qkv": QKV, "gate_up": GATE_UP}
    fused = [
        m for n, m in model.named_modules()
        if isinstance(m, LoRALinear) and not is_expert(n) and any(n.endswith(x) for g in w.fused if g in groups for x in groups[g])
    ]  # MoE experts are never fused (qtrain.moe)
    if w.quantize and fused:  # 4 bytes per 64 weights of the fused projections
        items.append(Item("weights", "fused projections' absmax", sum(m.in_features * m.out_features for m in fused) // 16, "fp32, qtrain.fused"))
    if w.quantize:
        items.insert(0, Item("weights", "NF4 linears", sum(nf4_bytes(m.in_features * m.out_features) for m in linears), f"{_count(base)} weights, 4-bit + double-quantized absmax"))
    else:
        items.insert(0, Item("weights", "16-bit linears", base * torch.finfo(w.dtype).bits // 8, "not quantized"))
    return items


def adapter_params(model: nn.Module, methods: tuple = ()) -> list[torch.Tensor]:
    """The trainable tensors: the methods' parameters (LoRA's A, B and DoRA's magnitude, ...)."""
    return [p for n, p in model.named_parameters() if any(m.owns(n) for m in methods)]


def adamw_temporaries(params, w: Workload) -> int:
    """torch AdamW's step: two parameter-sized temporaries (sqrt of v, the update) per tensor, one
    tensor at a time on CPU, all at once on CUDA (foreach); bitsandbytes' fused kernels have none."""
    if w.optimizer != "adamw" or not params:
        return 0
    sizes = [_nbytes(p) for p in params]
    return 2 * (max(sizes) if w.device == "cpu" else sum(sizes))


def optimizer_bytes(params, name: str, device: str) -> tuple[int, int]:
    """(bytes in torch's allocator, bytes in paged memory) of Adam's two moments for `params`."""
    in_allocator, paged = 0, 0
    for p in params:
        n = p.numel()
        if name == "paged_adamw_8bit" and n >= MIN_8BIT_NUMEL:
            state, absmax = 2 * n, 2 * 4 * math.ceil(n / 256)  # uint8 moments + fp32 absmax per 256
        else:
            state, absmax = 2 * 4 * n, 0  # fp32 moments
        if name == "adamw":
            absmax = 4  # torch keeps the step count as an fp32 tensor per parameter
        if name.startswith("paged") and device == "cuda" and n >= PAGED_MIN_NUMEL:
            paged += state
            in_allocator += absmax
        else:
            in_allocator += state + absmax
    return in_allocator, paged


# ---- activations ----


@dataclass
class LayerShape:
    D: int
    I: int  # the intermediate size, as in the papers
    H: int
    K: int  # KV heads
    d: int  # head size
    ranks: dict[str, int]  # projection name → adapter rank (targets only)
    in_out: dict[str, tuple[int, int]]
    dora: bool = False
    dropout: float = 0.0  # the adapters' LoRA dropout (the largest): > 0 saves each projection's dropped input
    norms: int = 2  # RMSNorms per layer: Llama's 2; Gemma's 4 (pre and post attention and MLP)
    qk_norm: bool = False  # RMSNorms on q and k per head (Gemma-3)
    post_norm: bool = False  # an RMSNorm on the MLP's output (Gemma, OLMo-2): the layer's backward starts with it
    eager: bool = False  # attention in eager mode: the [H, S] score rows are saved (Gemma-2: sdpa has no soft cap)
    score_cap: bool = False  # attention logit soft-capping: its tanh output is saved too (Gemma-2)
    experts: int = 0  # routed experts per MoE layer (Qwen3-MoE, Mixtral); 0: a dense MLP
    top_k: int = 0  # experts each token is routed to (then I = top_k x the expert width)


def layer_shape(model: nn.Module, config: PretrainedConfig, methods: tuple = ()) -> LayerShape:
    c = config.get_text_config()
    layer = model.get_decoder().layers[0]
    projections = {n.rpartition(".")[2]: m for n, m in layer.named_modules() if isinstance(m, LoRALinear)}
    head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return LayerShape(
        **family_shape(model, layer, c),
        D=c.hidden_size,
        I=active_intermediate(c),
        H=c.num_attention_heads,
        K=c.num_key_value_heads,
        d=head,
        ranks={n: adapter_rank(m, methods) for n, m in projections.items() if adapter_rank(m, methods)},
        dora=any(getattr(m, "use_dora", False) for m in projections.values()),
        dropout=max((m.dropout for m in projections.values() if m.rank), default=0.0),
        in_out={n: (m.in_features, m.out_features) for n, m in projections.items()},
    )


def family_shape(model: nn.Module, layer: nn.Module, c: PretrainedConfig) -> dict:
    """What a family's stock layer keeps beyond Llama's (`LayerShape.norms`, `qk_norm`, `post_norm`,
    `eager`, `score_cap`, MoE `experts`, `top_k`), read from the (meta) model transformers built: the RMSNorms beside the layer's
    attention and MLP, the q/k norms, the attention implementation it runs."""
    norms = sum(type(m).__name__.endswith("RMSNorm") for m in layer.children())
    experts = next((m for m in layer.modules() if isinstance(m, NF4Experts)), None)
    return {
        "norms": norms or 2,
        "qk_norm": hasattr(layer.self_attn, "q_norm"),
        "post_norm": hasattr(layer, "post_feedforward_layernorm"),
        "eager": getattr(model.config, "_attn_implementation", None) == "eager",
        "score_cap": getattr(c, "attn_logit_softcapping", None) is not None,
        "experts": experts.num_experts if experts is not None else 0,
        "top_k": c.num_experts_per_tok if experts is not None else 0,
    }


def adapter_rank(m: LoRALinear, methods: tuple = ()) -> int:
    """The rank of the low-rank path on a linear: its LoRA adapter's, or the width another method put
    there (`PeftMethod.low_rank_width`: AdaLoRA's init_r, whose P·Λ·Q saves what LoRA's B·A does)."""
    return m.rank or max((method.low_rank_width(m) for method in methods), default=0)


def virtual_tokens(w: Workload) -> int:
    """Tokens the methods add to every row's decoder input (prompt tuning, P-tuning)."""
    return sum(m.virtual_tokens() for m in w.methods)


def prefix_keys(w: Workload) -> int:
    """Key/value columns the methods add to every attention (prefix tuning, P-tuning v2)."""
    return sum(m.prefix_keys() for m in w.methods)


def layer_saved_bytes(s: LayerShape, w: Workload) -> int:
    """Bytes per token one decoder layer keeps for its backward (no checkpointing)."""
    e = torch.finfo(w.dtype).bits // 8
    a = e if w.autocast and e < 4 else 4  # the adapter's X @ A^T: autocast dtype, else fp32
    has = s.ranks.keys()
    attn_in = e * s.D if has & {"q_proj", "k_proj", "v_proj", "qkv_proj"} else 0  # Phi-3: qkv_proj, gate_up_proj
    mlp_in = e * s.D * max(s.top_k, 1) if has & {"gate_proj", "up_proj", "gate_up_proj"} else 0  # MoE: each expert's gather
    down_in = e * s.I if "down_proj" in has else 0
    # the stock RMSNorm keeps an fp32 copy of x, qtrain's kernel x itself and an fp32 scale per row; the
    # stock MLP keeps gate, up and silu(gate), qtrain's SwiGLU kernel gate and up (it recomputes silu)
    norms = 2 * ((e if "rms_norm" in w.fused else 4) * s.D + 4) + (s.norms - 2) * (4 * s.D + 4)
    attention = e * (2 * s.H * s.d + 2 * s.K * s.d) + 4 * s.H + family_attention_bytes(s, w)
    mlp = (2 if "swiglu" in w.fused else 3) * e * s.I
    dora = 4 * sum(s.in_out[n][1] for n in s.ranks) if s.dora else 0  # the fp32 output DoRA rescales
    methods = sum(m.saved_bytes_per_token(s, e) for m in w.methods)
    if s.dropout > 0:  # each adapter saves its own dropped input instead of the shared one
        attn_in = mlp_in = down_in = 0
    adapters = a * sum(s.ranks.values()) + dora + methods + dropout_saved_bytes(s, w)
    return norms + attn_in + mlp_in + attention + mlp + down_in + adapters + router_saved_bytes(s, w)


def router_saved_bytes(s: LayerShape, w: Workload) -> int:
    """Per token, what a MoE layer's routing saves beyond its experts' MLPs (`qtrain.moe.NF4Experts`):
    the router's fp32 softmax over the E experts (4E), the top-k indices and renormalized weights
    (8k + 4k, and their sum, 4); per routed token (k of them) its int64 position (8), its fp32 weight
    (4) and two copies of the expert's output, e·D each (the product with the weight and its cast).
    Measured per saved tensor on CPU (tests/qtrain/test_estimate.py, the MoE settings)."""
    if not s.experts:
        return 0
    e = torch.finfo(w.dtype).bits // 8
    return 4 * s.experts + 12 * s.top_k + 4 + s.top_k * (12 + 2 * e * s.D)


def family_attention_bytes(s: LayerShape, w: Workload) -> int:
    """Per token, what a family's attention saves beyond the sdpa attention of the Llama formula.

    q/k norms (Gemma-3): an fp32 copy of q and k and an fp32 rsqrt per head, 4(H + K)(d + 1).
    Eager attention (Gemma-2, whose soft-capped scores sdpa cannot compute) saves q, k and v with the
    KV heads repeated to H, 3eHd, instead of sdpa's q, k, v, output and logsumexp (e(Hd + 2Kd) + 4H
    of the formula's term), and per query its row of S scores per head: the fp32 softmax (4), its
    cast to the compute dtype for `@ v` (e; none in fp32), and with soft-capping the tanh (e).
    Measured per saved tensor on CPU (tests/qtrain/test_estimate.py, the gemma settings)."""
    e = torch.finfo(w.dtype).bits // 8
    extra = 4 * (s.H + s.K) * (s.d + 1) if s.qk_norm else 0
    if s.eager:
        row = 4 + (e if e < 4 else 0) + (e if s.score_cap else 0)
        extra += 3 * e * s.H * s.d - (e * (s.H * s.d + 2 * s.K * s.d) + 4 * s.H) + s.H * (w.seq_len + prefix_keys(w)) * row
    return extra


def dropout_saved_bytes(s: LayerShape, w: Workload) -> int:
    """Per token and layer, LoRA dropout in training (`qtrain.kernels.nf4_lora.lora_delta`, also on
    the fused path, which draws each projection's mask): every adapted projection saves its dropped
    input h = dropout(x) for A's gradient (x's dtype under autocast and in the Triton backend's
    NF4LoRAFunction, else the torch backend's fp32 cast for the adapter) and dropout's mask (bool on
    CUDA's fused dropout; elsewhere `x * mask`, a mask in x's dtype)."""
    if s.dropout <= 0:
        return 0
    e = torch.finfo(w.dtype).bits // 8
    h = e if (w.autocast and e < 4) or w.backend == "triton" else 4
    mask = 1 if w.device == "cuda" else e
    return sum((h + mask) * s.in_out[n][0] for n in s.ranks)


def autocast_weight_bytes(s: LayerShape, w: Workload) -> int:
    """Per layer: autocast's cached half copies of the fp32 adapter weights (torch backend)."""
    if not (w.autocast and w.dtype != torch.float32 and w.backend == "torch"):
        return 0
    return sum(2 * r * sum(s.in_out[n]) for n, r in s.ranks.items())


def dequant_bytes(largest: int, w: Workload) -> int:
    """The torch backend's transient for the largest NF4 weight (`largest` elements): int32 codes +
    fp32 values (6 B per element), or the fp32 values and the fp32 output (8 B) in fp32. Triton
    dequantizes in tiles."""
    if not w.quantize or w.backend != "torch":
        return 0
    return largest * (8 if w.dtype == torch.float32 else 6)


GEMV_MAX_TOKENS = GEMV_MAX_M  # at most this many rows per call: the GEMV kernel (no tensor cores, no buffer)
# At least this many: dequantize once into a buffer, then cuBLAS. The estimate does not know the GPU,
# so it takes the lowest default crossover of any GPU (`nf4_dispatch.DEFAULT_CROSSOVER`): the buffer
# is counted whenever some card would allocate it (an overestimate of one weight at most elsewhere).
DEQUANT_MIN_TOKENS = min(DEFAULT_CROSSOVER.values())


def _nf4_path(tokens: int) -> str:
    """The NF4 + LoRA path the GPU dispatch (`qtrain.kernels.nf4_dispatch.choose_path`) takes for a
    projection over `tokens` rows with default thresholds: "gemv" (decode, generation), "fused" (the
    Triton kernel dequantizing in its main loop) or "dequant" (one dequantized weight per device,
    then cuBLAS)."""
    if tokens <= GEMV_MAX_TOKENS:
        return "gemv"
    return "dequant" if tokens >= DEQUANT_MIN_TOKENS else "fused"


def largest_projection(s: LayerShape, w: Workload) -> int:
    """Elements of the largest NF4 weight one call dequantizes: a projection, or a fused group of
    `w.fused` (gate/up: 2I x D, q/k/v: (H + 2K)d x D) whose members are all there."""
    widths = [n * k for k, n in s.in_out.values()]
    for group, names in (("qkv", QKV), ("gate_up", GATE_UP)):
        if group in w.fused and all(n in s.in_out for n in names):
            widths.append(sum(s.in_out[n][1] for n in names) * s.in_out[names[0]][0])
    return max(widths, default=0)


def dequant_buffer_bytes(s: LayerShape, w: Workload) -> int:
    """The dequant-once path's buffer: ONE per device, reused by every projection (forward and the
    backward's dX), in the compute dtype, sized to the largest projection weight (fused groups
    included). Allocated at the first call with tokens >= the threshold and kept."""
    if not w.quantize or w.backend != "triton" or _nf4_path(w.tokens) != "dequant":
        return 0
    return largest_projection(s, w) * (torch.finfo(w.dtype).bits // 8)


# Bytes per token and hidden unit that the stock RMSNorm's backward adds at its worst: fp32
# temporaries of the upcast gradient, its product with the weight and the normalized input's terms.
# A norm alone allocates 20 (`qtrain.memprof.cpu_peak_bytes`, Llama's, Gemma-3's and OLMo-2's norms
# alike), its bf16 dX included; inside a layer 16 matches the measured peaks of Gemma-2, Gemma-3 and
# OLMo-2 (tests/qtrain/test_estimate.py: 0.99-1.06 of measured; 20 over-counts OLMo-2 by 10%).
POST_NORM_BACKWARD = 16


def layer_backward_bytes(s: LayerShape, w: Workload) -> int:
    """Per token: the gradients alive at the worst moment of one decoder layer's backward, beyond the
    layer's saved set (counted whole: "recomputed layer"), which each op releases as its backward ends.
    The NF4 + LoRA backward reads dY and writes dX in the compute dtype (e bytes; no fp32 copies).

    Throughout, the residual stream's gradient D (it waits for the norm's contribution). Then the
    worst of: down_proj's backward, first, the whole saved set still alive: dH, I. With fused
    gate/up, the split's backward (`qtrain.fused.columns`, one concatenation): dgate, dup and their
    concatenation, 2 x 2I, when SwiGLU's saved gate, up (2I; stock silu: 3I) and down's saved input
    (I, if adapted) are released. With fused q/k/v the same for 2 (H + 2K)d, attention's q, k, v and
    output (2(H + K)d) released. (Slicing instead of one concatenation added a zero-filled fused-
    width gradient per block.) A family with a norm on the MLP's output (Gemma, OLMo-2) starts its
    layer backward there, the whole saved set alive: the stock RMSNorm's fp32 temporaries,
    `POST_NORM_BACKWARD` bytes per hidden unit, when they exceed the above. The adapters' rank-r
    temporaries are negligible. Measured on CPU (tests/qtrain/test_estimate.py, stock and fused
    projections, every family): within the estimate's 10%."""
    e = torch.finfo(w.dtype).bits // 8
    moments = [s.I]
    if "gate_up" in w.fused:
        released = (2 if "swiglu" in w.fused else 3) * s.I + (s.I if "down_proj" in s.ranks else 0)
        moments.append(2 * 2 * s.I - released)
    if "qkv" in w.fused:
        moments.append(2 * (s.H + 2 * s.K) * s.d - 2 * (s.H + s.K) * s.d)
    post_norm = POST_NORM_BACKWARD * s.D if s.post_norm else 0
    return e * s.D + max(e * max(moments), post_norm)


@dataclass(frozen=True)
class ModelFacts:
    """What the estimate needs from the meta model (built once per config, spec, dtype, quantize)."""

    shape: LayerShape
    adapters: tuple[torch.Tensor, ...]  # meta tensors
    input_side: int  # bytes of the adapters that act before the first layer (virtual-token encoders)
    weights: tuple[Item, ...]
    largest_linear: int


_FACTS: dict[tuple, ModelFacts] = {}


def model_facts(config: PretrainedConfig, spec: LoRASpec | None, w: Workload) -> ModelFacts:
    w = with_lora(w, spec)
    key = (config.to_json_string(use_diff=False), w.dtype, w.quantize, repr(w.methods), w.fused)
    if key not in _FACTS:
        model = meta_model(config, None, w)
        linears = [m for m in model.modules() if isinstance(m, LoRALinear)]
        if len(_FACTS) > 16:
            _FACTS.clear()
        _FACTS[key] = ModelFacts(
            shape=layer_shape(model, config, w.methods),
            adapters=tuple(adapter_params(model, w.methods)),
            input_side=sum(
                _nbytes(p) for n, p in model.named_parameters() if any(m.owns(n) for m in w.methods if m.input_side)
            ),
            weights=tuple(weight_items(model, w)),
            largest_linear=max(m.in_features * m.out_features for m in linears),
        )
    return _FACTS[key]


# ---- the estimate ----


def estimate(config: PretrainedConfig, spec: LoRASpec | None, w: Workload) -> Estimate:
    """The estimate of a training step of `w` (its methods; `spec`: a LoRA beside them, see `with_lora`)."""
    asked = w = with_lora(w, spec)
    shards = w.ranks if w.strategy == "fsdp" else 1
    if shards > 1:  # sharded, the fused q/k/v and gate/up projections fall back per call (qtrain.fsdp): no fused absmax
        w = replace(w, fused=tuple(f for f in w.fused if f not in ("qkv", "gate_up")))
    if w.objective in PAIR_OBJECTIVES:  # chosen and rejected concatenated: 2B rows in one forward
        w = replace(w, batch_size=2 * w.batch_size)
    facts = model_facts(config, None, w)
    c = config.get_text_config()
    s = facts.shape
    L, T, V, e = c.num_hidden_layers, w.tokens, c.vocab_size, torch.finfo(w.dtype).bits // 8

    adapters = facts.adapters
    adapter_bytes = sum(_nbytes(p) for p in adapters)
    opt, paged = optimizer_bytes(adapters, w.optimizer, w.device)
    weights = list(facts.weights)
    if shards > 1:
        weights = fsdp_weights(weights, c, e, shards)
        adapter_bytes, opt, paged = (math.ceil(b / shards) for b in (adapter_bytes, opt, paged))
    of = f", 1/{shards} per rank" if shards > 1 else ""
    static = weights + [
        Item("adapters", "adapter parameters", adapter_bytes, f"{_count(sum(p.numel() for p in adapters))}, fp32{of}"),
        Item("optimizer", "Adam moments", opt, w.optimizer + (" (the rest is paged)" if paged else "") + of),
    ]
    if shards > 1:  # the layer computing, the one prefetched, and the prefetched one's all-gather output
        nf4_layer = facts.weights[0].bytes // L  # the base linears (`weight_items`' first item), unsharded
        gathered = 3 * (nf4_layer + (sum(_nbytes(p) for p in adapters) - facts.input_side) // L)
        static.append(Item("other", "FSDP all-gather buffers", gathered, "3 layers of NF4 + adapters, unsharded"))
    elif w.strategy == "ddp" and w.ranks > 1:
        static.append(Item("gradients", "DDP gradient buckets", adapter_bytes, "the all-reduced copy of the adapter gradients"))
    if w.reference_copy:
        static.append(Item("weights", "reference model (a second copy)", sum(i.bytes for i in facts.weights), "frozen, as the policy's base"))
    if w.device == "cuda":
        static.append(Item("other", "cuBLAS workspace", CUBLAS_WORKSPACE))
    buffer = dequant_buffer_bytes(s, w)
    if buffer:
        static.append(Item("other", "dequantized-weight buffer", buffer, f"one per device, {_count(largest_projection(s, w))} weights"))

    per_layer = layer_saved_bytes(s, w)
    S = w.seq_len + virtual_tokens(w)  # the decoder's rows: prompt tuning prepends its virtual tokens
    T_loss, T = T, w.batch_size * S
    P = prefix_keys(w)
    rope = 2 * e * s.d * (T if w.attention_mask else S)  # cos, sin; per row when packed
    # bool [B, 1, S, S (+ P)]: padded or packed rows, virtual tokens (their 2D mask makes transformers build one)
    # or a prefix (whose hook builds the mask sdpa's causal path skips)
    mask = w.batch_size * S * (S + P) if w.attention_mask or P or S > w.seq_len else 0
    host = 0
    if w.gradient_checkpointing:
        layer_inputs = L * e * s.D * T
        host = layer_inputs if w.offload_activations else 0
        where = " (offloaded: in CPU RAM)" if host else ""
        kept = [Item("activations", "checkpointed layer inputs", layer_inputs - host, f"{L} x [{w.batch_size}, {w.seq_len}, {s.D}]{where}")]
    else:
        kept = [Item("activations", "saved layer activations", L * per_layer * T, f"{L} layers x {per_layer / 1024:.1f} KiB/token")]
    per_layer_kept = [kept[0]]  # what each layer keeps (1/L of it per layer): inputs or saved sets, autocast copies
    kept.append(Item("activations", "rotary tables" + (", attention mask" if mask else ""), rope + mask))
    casts = autocast_weight_bytes(s, w) * L
    if casts:
        kept.append(Item("activations", "autocast copies of the adapters", casts, "half copies of A, B"))
        per_layer_kept.append(kept[-1])
    final_norm = Item("activations", "final norm input", (4 * s.D + 4) * T, "fp32")

    # the loss: lm_head + cross-entropy, on full logits or chunked over tokens
    if w.objective != "sft":  # sequence log-probs through the chunked lm_head (qtrain.preference.token_logps)
        note = f"log-probs of {T_loss} tokens, {'2 rows a pair' if w.objective in PAIR_OBJECTIVES else 'one row an example'}"
        saved, fwd, bwd = token_logps_bytes(T_loss, V, s.D, w.loss_chunk or None, w.dtype)
        loss_saved = Item("activations", "hidden states for the log-prob backward", saved, note)
        loss_fwd = Item("other", "lm_head log-prob chunk", fwd, note)
        loss_bwd = Item("other", "log-prob backward (dH + a chunk)", bwd, note)
    elif w.loss_chunk == 0:
        note = f"full logits [{T_loss}, {V}]"
        loss_saved = Item("activations", "log-softmax (saved)", 4 * V * T_loss, note)
        loss_fwd = Item("other", "logits and their fp32 copy", (e + 4) * V * T_loss, note)
        loss_bwd = Item("other", "logits gradients", (4 + (2 * e if e < 4 else 4)) * V * T_loss, note)
    else:
        chunk = w.loss_chunk or default_chunk_size(T_loss, V, s.D)
        note = f"{math.ceil(T_loss / chunk)} chunks of {chunk} tokens"
        loss_saved = Item("activations", "hidden-state gradient (saved)", e * s.D * T_loss, note)
        capped = getattr(c, "final_logit_softcapping", None) is not None  # Gemma-2: the cap's slope per chunk
        workspace = linear_cross_entropy_workspace_bytes(T_loss, V, s.D, chunk, w.dtype, softcap=capped) - loss_saved.bytes
        loss_fwd = Item("other", "lm_head + loss chunk", workspace, note)
        loss_bwd = None

    # Layer i's backward holds what layers 0..i keep (checkpointed inputs, autocast copies) and the
    # adapter gradients of layers i..L-1: the worse of the last layer (i = L-1) and the first (i = 0).
    # The virtual-token encoders' gradients come after the whole decoder's backward.
    grads = Item("gradients", "adapter gradients", adapter_bytes)
    layer_grads = adapter_bytes - facts.input_side
    first_layer_is_worse = layer_grads > sum(i.bytes for i in per_layer_kept) and shards == 1
    layer = "first layer's backward" if first_layer_is_worse else "last layer's backward"
    layer_backward = [
        *(replace(i, bytes=i.bytes // L) if first_layer_is_worse and i in per_layer_kept else i for i in kept),
        Item("gradients", "adapter gradients", layer_grads if first_layer_is_worse else layer_grads * shards // L),
        Item("other", "layer backward buffers", layer_backward_bytes(s, w) * T, "gradients of the layer's activations"),
        Item("other", "dequantized weight (torch backend)", dequant_bytes(facts.largest_linear, w)),
    ]
    if mask and w.device == "cpu":  # CPU sdpa expands a mask to every head: bool [B, H, S, S (+ P)]
        layer_backward.append(Item("other", "attention mask per head (CPU sdpa)", mask * s.H, "inside one layer's attention"))
    if w.gradient_checkpointing:
        recompute = per_layer * T - (4 * s.D * T if e == 4 else 0)  # fp32: the norm reads the checkpointed input
        layer_backward.append(Item("other", "recomputed layer", recompute, "one layer's saved set, rebuilt for its backward"))
    phases = {
        "loss forward": kept + [final_norm, loss_saved, loss_fwd],
        layer: layer_backward,
        "optimizer step": [grads, Item("other", "AdamW step temporaries", adamw_temporaries(adapters, w), w.optimizer)],
    }
    if loss_bwd:
        phases["loss backward"] = kept + [final_norm, loss_saved, loss_bwd]
    if w.objective in REFERENCE_OBJECTIVES:  # pi_ref under no-grad, before the policy's forward
        phases["reference forward"] = [Item("activations", "reference hidden states (no grad)", e * s.D * T_loss), loss_fwd]
    totals = {name: sum(i.bytes for i in static + items) for name, items in phases.items()}
    phase = max(totals, key=totals.get)
    return Estimate(
        items=[i for i in static + phases[phase] if i.bytes],
        phase=phase,
        peak=totals[phase],
        paged=paged,
        host=host,
        phases=totals,
        workload=asked,
    )


def fsdp_weights(weights: list[Item], c: PretrainedConfig, e: int, shards: int) -> list[Item]:
    """The weight items of one rank of `shards` under FSDP (`qtrain.fsdp`), from `weight_items`' list
    (the base linears, the 16-bit rest, then the small extras, kept whole): the base in rows,
    1/shards each; of the 16-bit tensors, lm_head (or the tied embedding it reads) whole on every
    rank (the recipe reads its weight outside a forward), the rest 1/shards."""
    linears, dense, *rest = weights
    head = c.vocab_size * c.hidden_size * e
    return [
        replace(linears, bytes=math.ceil(linears.bytes / shards), note=linears.note + f", 1/{shards} per rank"),
        replace(dense, bytes=head + math.ceil((dense.bytes - head) / shards), note=dense.note + f", lm_head whole, the rest 1/{shards}"),
        *rest,
    ]


def max_seq_len(config: PretrainedConfig, spec: LoRASpec | None, w: Workload, budget: int, limit: int = 1 << 20) -> int:
    """The longest seq_len (a multiple of 64) whose estimated device total fits in `budget` bytes; 0 if none."""
    def fits(n: int) -> bool:
        return estimate(config, spec, replace(w, seq_len=n)).device_total <= budget

    lo, hi = 0, limit // 64
    if not fits(64):
        return 0
    while lo < hi:  # largest k with fits(64 k)
        mid = (lo + hi + 1) // 2
        if fits(64 * mid):
            lo = mid
        else:
            hi = mid - 1
    return 64 * lo


# ---- from a training config; what to change when it does not fit ----


def workload_for(
    cfg, device: str = "cuda", backend: str | None = None, config: PretrainedConfig | None = None
) -> Workload:
    """The Workload of a qtrain Config on `device` ("cuda" or "cpu"). The NF4 backend is the one
    `auto` picks there (Triton on CUDA, assuming an Ampere or newer GPU), unless `backend` says.
    `config` (the model's; read from the run's model when not given) decides which fused ops run."""
    from qtrain.config import DTYPES

    t, d = cfg.train, cfg.data
    optimizer = t.optimizer if t.optimizer != "auto" else ("paged_adamw_32bit" if device == "cuda" else "adamw")
    if backend is None:
        backend = cfg.model.backend if cfg.model.backend != "auto" else ("triton" if device == "cuda" else "torch")
    methods = tuple(cfg.method_objects())
    fused = fused_groups(cfg.kernels, device, backend, methods, config if config is not None else model_config(cfg))
    return Workload(
        batch_size=t.batch_size,
        seq_len=d.max_length,
        dtype=DTYPES[cfg.model.dtype],
        quantize=cfg.model.quantize,
        backend=backend,
        gradient_checkpointing=t.gradient_checkpointing,
        offload_activations=t.offload_activations,
        optimizer=optimizer,
        loss_chunk=t.loss_chunk_tokens,
        autocast=t.autocast,
        attention_mask=carries_mask(d.packing, t.batch_size, fused),
        device=device,
        methods=methods,
        objective=cfg.objective,
        fused=fused,
    )


def model_config(cfg) -> PretrainedConfig:
    """The model config of a qtrain Config's model: the tiny one it builds, or its checkpoint's."""
    if cfg.model.tiny is not None:
        from qtrain.tiny import tiny_config

        t = cfg.model.tiny
        return tiny_config(t.arch, t.hidden_size, t.intermediate_size, t.num_layers, t.num_heads, t.num_kv_heads)
    from qtrain.presets import resolve_config

    return resolve_config(cfg.model.name_or_path)


def carries_mask(packing: bool, batch_size: int, fused: tuple) -> bool:
    """Whether batches carry a [B, 1, S, S] mask: padded rows do; packed rows too, unless
    `qtrain.fused`'s varlen path runs them without one."""
    return (packing and "varlen" not in fused) or (not packing and batch_size > 1)


def fused_groups(ops, device: str, backend: str, methods: tuple = (), config: PretrainedConfig | None = None) -> tuple:
    """What `qtrain.fused` changes for memory with these kernel settings on `device` for a model of
    `config`: the projection groups it fuses ("qkv", "gate_up"; separate projections for the torch
    NF4 backend on CUDA), the RMSNorm and SwiGLU kernels (they save less), and "varlen" when packed
    rows run without a mask (not with methods that hook the attention). Only the ops
    `qtrain.families.fused_support(config)` allows, the ones the swap applies (`config=None`: a
    Llama-like model, every op)."""
    if not ops.on_for(device):
        return ()
    support = ALL_OPS if config is None else fused_support(config)
    on = {op for op in support if getattr(ops, op)}
    groups = () if device == "cuda" and backend != "triton" else tuple(g for g in ("qkv", "gate_up") if g in on)
    hooks_attention = any(m.hooks_attention for m in methods)
    small_ops = tuple(op for op in ("rms_norm", "swiglu") if op in on)
    return groups + small_ops + (("varlen",) if "varlen" in on and not hooks_attention else ())


def suggestions(config: PretrainedConfig, spec: LoRASpec | None, w: Workload, grad_accum: int = 1, budget: int | None = None) -> list[tuple[str, int]]:
    """Config changes that need less memory, in the order to try them (the first ones keep the
    effective batch and the model's quality; the methods' own last: `PeftMethod.lighter`), each with
    the estimated GPU total it leads to."""
    w = with_lora(w, spec)
    candidates: list[tuple[str, Workload]] = []
    if w.batch_size > 1:
        b = w.batch_size // 2
        text = f"train.batch_size={b} train.grad_accum={grad_accum * 2} (same effective batch)"
        candidates.append((text, replace(w, batch_size=b)))
    if not w.gradient_checkpointing:
        candidates.append(("train.gradient_checkpointing=true", replace(w, gradient_checkpointing=True)))
    elif not w.offload_activations:
        candidates.append(("train.offload_activations=true (activations wait in CPU RAM)", replace(w, offload_activations=True)))
    if w.loss_chunk == 0:
        candidates.append(("train.loss_chunk_tokens=null (chunked lm_head + loss)", replace(w, loss_chunk=None)))
    fit = max_seq_len(config, None, w, budget, limit=w.seq_len) if budget else 0
    shorter = fit if 0 < fit < w.seq_len else w.seq_len // 2
    if shorter >= 64:
        candidates.append((f"data.max_length={shorter}", replace(w, seq_len=shorter)))
    if w.optimizer != "paged_adamw_8bit" and w.device == "cuda":
        candidates.append(("train.optimizer=paged_adamw_8bit", replace(w, optimizer="paged_adamw_8bit")))
    candidates += lighter_methods(w)
    return [(text, estimate(config, None, wl).device_total) for text, wl in candidates]


def lighter_methods(w: Workload) -> list[tuple[str, Workload]]:
    """Each method's own change that needs less memory (`PeftMethod.lighter`), the others unchanged."""
    out = []
    for i, method in enumerate(w.methods):
        change = method.lighter()
        if change is not None:
            text, lighter = change
            out.append((text, replace(w, methods=(*w.methods[:i], lighter, *w.methods[i + 1 :]))))
    return out


def fmt_gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def estimate_table(est: Estimate, title: str | None = "memory estimate"):
    """A rich Table of the estimate's items, with the totals as the last rows."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col, justify in (("category", "left"), ("item", "left"), ("size", "right"), ("note", "left")):
        table.add_column(col, justify=justify)
    for item in est.items:
        table.add_row(item.category, item.name, fmt_gib(item.bytes), item.note)
    table.add_section()
    table.add_row("", f"[bold]peak allocated[/] ({est.phase})", f"[bold]{fmt_gib(est.peak)}[/]", "what torch.cuda.max_memory_allocated reports")
    if est.paged:
        table.add_row("", "paged optimizer state", fmt_gib(est.paged), "CUDA unified memory: moves to CPU RAM under pressure")
    if est.host:
        table.add_row("", "offloaded activations", fmt_gib(est.host), "pinned CPU RAM, not GPU")
    if est.workload is None or est.workload.device == "cuda":
        table.add_row("", "[bold]GPU total[/]", f"[bold]{fmt_gib(est.device_total)}[/]", "+ CUDA context 0.5 GiB, allocator slack 5%")
    return table
