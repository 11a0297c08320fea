"""qtrain.lora: LoRALinear (NF4 or frozen 16-bit base) and swapping it into a model."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from qtrain.lora import (
    LoRALinear,
    LoRASpec,
    PeftLoRASpec,
    is_target,
    lora_modules,
    swap_linears,
)
from qtrain.methods.lora import mark_only_lora_trainable
from qtrain.nf4 import dequantize_nf4, quantize_nf4
from qtrain.tiny import tiny_config

IN, OUT = 65, 33

# fp32 results of the same math evaluated in a different order (merged weight vs. separate
# base + adapter matmuls): K=65 products of O(0.1-1) values -> a few fp32 ulps of O(1) outputs.
FP32_TOL = {"atol": 1e-5, "rtol": 1e-5}


def linear(bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(IN, OUT, bias=bias)


def randomize_b(m: LoRALinear, seed: int = 1) -> None:
    with torch.no_grad():
        m.lora_b.weight.copy_(torch.randn(m.lora_b.weight.shape, generator=torch.Generator().manual_seed(seed)) * 0.3)


@pytest.mark.parametrize("quantize", [True, False], ids=["nf4", "frozen16"])
def test_zero_b_means_output_is_the_frozen_base(quantize):
    lin = linear()
    m = LoRALinear.from_linear(lin, rank=4, alpha=8.0, quantize_base=quantize)
    assert torch.count_nonzero(m.lora_b.weight) == 0
    assert torch.count_nonzero(m.lora_a.weight) == m.lora_a.weight.numel()
    x = torch.randn(5, IN)
    base = dequantize_nf4(quantize_nf4(lin.weight.data)) if quantize else lin.weight.data
    # bit-exact: B = 0 adds exact zeros to the base output
    assert torch.equal(m(x), x @ base.T + lin.bias.data)


def test_lora_a_is_kaiming_uniform_like_nn_linear():
    torch.manual_seed(0)
    m = LoRALinear(1024, 64, rank=256, quantize_base=False)
    a = m.lora_a.weight
    bound = 1 / math.sqrt(1024)  # kaiming_uniform(a=sqrt(5)): gain sqrt(1/3) * sqrt(3 / fan_in)
    assert a.abs().max() <= bound
    assert a.abs().max() > 0.99 * bound  # 262k samples fill U(-b, b) to its edges
    # the std of U(-b, b) is b / sqrt(3); 262k samples pin it to well within 1%
    assert abs(a.std().item() - bound / math.sqrt(3)) < 0.01 * bound / math.sqrt(3)
    assert m.lora_a.weight.dtype == m.lora_b.weight.dtype == torch.float32


@pytest.mark.parametrize(
    "rank, alpha, rslora, expected",
    [
        (4, 8.0, False, 2.0),
        (16, 32.0, False, 2.0),
        (4, 8.0, True, 4.0),
        (16, 32.0, True, 8.0),
        (3, 1.0, True, 1 / math.sqrt(3)),
    ],
)
def test_scale_plain_and_rslora(rank, alpha, rslora, expected):
    m = LoRALinear(IN, OUT, rank=rank, alpha=alpha, use_rslora=rslora, quantize_base=False)
    assert m.scale == pytest.approx(expected, rel=1e-12)
    assert LoRASpec(rank=rank, alpha=alpha, use_rslora=rslora).scale() == pytest.approx(expected, rel=1e-12)
    # and the forward uses it: y - base == scale * x A^T B^T
    m.set_base_weight(torch.randn(OUT, IN))
    randomize_b(m)
    x = torch.randn(4, IN)
    delta = m(x) - x @ m.weight.T
    torch.testing.assert_close(delta, expected * (x @ m.lora_a.weight.T) @ m.lora_b.weight.T, **FP32_TOL)


def test_rank_zero_is_a_frozen_base_without_adapter():
    lin = linear()
    m = LoRALinear.from_linear(lin, rank=0)
    assert m.lora_a is None and m.lora_b is None and m.scale == 0.0
    assert list(m.parameters()) == [m.bias] and not m.bias.requires_grad
    x = torch.randn(3, IN)
    assert torch.equal(m(x), x @ dequantize_nf4(quantize_nf4(lin.weight.data)).T + lin.bias)


@pytest.mark.parametrize("quantize", [True, False], ids=["nf4", "frozen16"])
def test_dropout_only_in_training(quantize):
    m = LoRALinear.from_linear(linear(), rank=4, alpha=8.0, dropout=0.5, quantize_base=quantize)
    randomize_b(m)
    x = torch.randn(6, IN)
    m.eval()
    y_eval = m(x)
    no_drop = m.base_weight(torch.float32)
    torch.testing.assert_close(y_eval, x @ m.merged_weight().T + m.bias, **FP32_TOL)
    assert torch.equal(m(x), y_eval)  # deterministic in eval
    m.train()
    torch.manual_seed(0)
    y1 = m(x)
    torch.manual_seed(1)
    y2 = m(x)
    assert (y1 - y_eval).abs().max() > 1e-2 and (y1 - y2).abs().max() > 1e-2
    # only the adapter input is dropped: the base part is untouched
    torch.manual_seed(0)
    mask = nn.functional.dropout(torch.ones_like(x), 0.5, training=True)
    expected = x @ no_drop.T + m.bias + m.scale * ((x * mask) @ m.lora_a.weight.T) @ m.lora_b.weight.T
    torch.testing.assert_close(y1, expected, **FP32_TOL)


@pytest.mark.parametrize("quantize", [True, False], ids=["nf4", "frozen16"])
def test_bias_is_kept_and_frozen(quantize):
    lin = linear(bias=True)
    m = LoRALinear.from_linear(lin, rank=4, quantize_base=quantize)
    assert torch.equal(m.bias, lin.bias) and m.bias.data_ptr() != lin.bias.data_ptr()  # a copy
    assert not m.bias.requires_grad
    randomize_b(m)
    x = torch.randn(5, IN, requires_grad=True)
    m(x).square().sum().backward()
    assert m.bias.grad is None
    assert m.lora_a.weight.grad is not None and m.lora_b.weight.grad is not None
    assert x.grad is not None
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {"lora_a.weight", "lora_b.weight"}


def test_first_step_gradient_reaches_b_only():
    # With B = 0, dL/dA = scale * B^T (...) = 0 and dL/dB != 0: the LoRA warm start.
    m = LoRALinear.from_linear(linear(), rank=4)
    x = torch.randn(5, IN)
    m(x).square().sum().backward()
    assert torch.count_nonzero(m.lora_a.weight.grad) == 0
    assert torch.count_nonzero(m.lora_b.weight.grad) > 0


@pytest.mark.parametrize("bias", [True, False])
def test_unquantized_base_equals_nn_linear_exactly(bias):
    lin = linear(bias=bias)
    m = LoRALinear.from_linear(lin, rank=4, alpha=8.0, quantize_base=False)
    assert m.weight is not None and not m.weight.requires_grad and torch.equal(m.weight, lin.weight)
    assert not hasattr(m, "nf4_packed")
    for shape in [(5, IN), (2, 3, IN), (1, IN)]:
        x = torch.randn(shape)
        assert torch.equal(m(x), lin(x)), shape


@pytest.mark.parametrize("quantize", [True, False], ids=["nf4", "frozen16"])
@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_merged_weight_equals_forward(quantize, rslora):
    m = LoRALinear.from_linear(linear(), rank=3, alpha=5.0, use_rslora=rslora, quantize_base=quantize).eval()
    randomize_b(m)
    merged = m.merged_weight()
    assert merged.dtype == torch.float32 and merged.shape == (OUT, IN)
    expected = m.base_weight(torch.float32) + m.scale * m.lora_b.weight @ m.lora_a.weight
    torch.testing.assert_close(merged, expected, **FP32_TOL)
    x = torch.randn(7, IN)
    torch.testing.assert_close(m(x), x @ merged.T + m.bias, **FP32_TOL)
    assert m.merged_weight(torch.bfloat16).dtype == torch.bfloat16


def test_bf16_base_keeps_its_dtype():
    lin = linear().to(torch.bfloat16)
    m = LoRALinear.from_linear(lin, rank=4, quantize_base=True)
    assert m.nf4_weight.dtype == torch.bfloat16 and m.base_weight().dtype == torch.bfloat16
    assert m.merged_weight().dtype == torch.bfloat16
    assert torch.equal(m.base_weight(), dequantize_nf4(quantize_nf4(lin.weight.data)))
    y = m(torch.randn(2, IN, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


def test_bad_arguments():
    with pytest.raises(ValueError, match="backend"):
        LoRALinear(IN, OUT, rank=4, backend="cuda-magic")
    m = LoRALinear(IN, OUT, rank=4)
    with pytest.raises(ValueError, match="shape"):
        m.set_base_weight(torch.randn(IN, OUT))
    with pytest.raises(ValueError, match="shape"):
        m.set_nf4_weight(quantize_nf4(torch.randn(OUT, IN + 1)))
    with pytest.raises(RuntimeError, match="no NF4 weight"):
        m.nf4_weight  # noqa: B018


def test_to_moves_nf4_buffers():
    m = LoRALinear.from_linear(linear(), rank=4)
    names = {"nf4_packed", "nf4_absmax", "nf4_code", "nf4_absmax_scale", "nf4_absmax_code"}
    assert names <= {n for n, _ in m.named_buffers()}
    assert m.state_dict().keys().isdisjoint(names)  # not persistent: bases are not saved with adapters
    m.to("meta")  # the only other device on a CPU-only machine; what .cuda() relies on is the same
    for n in names:
        assert getattr(m, n).device.type == "meta", n
    assert m.nf4_weight.device.type == "meta"
    assert m.lora_a.weight.device.type == "meta" and m.bias.device.type == "meta"
    assert m(torch.empty(2, IN, device="meta")).shape == (2, OUT)


def test_dtype_cast_keeps_nf4_statistics_fp32():
    m = LoRALinear.from_linear(linear(), rank=4)
    before = m.base_weight(torch.float32)
    m.to(torch.bfloat16)
    assert m.nf4_code.dtype == torch.float32
    assert torch.equal(m.base_weight(torch.float32), before)


# ---- swapping into a model ---------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(16, 16, bias=False)
        self.v_proj = nn.Linear(16, 16, bias=True)
        self.proj_out = nn.Linear(16, 16)
        self.norm = nn.LayerNorm(16)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 16)
        self.layers = nn.ModuleList([Block(), Block()])
        self.lm_head = nn.Linear(16, 10, bias=False)

    def forward(self, ids):
        h = self.embed(ids)
        for blk in self.layers:
            h = blk.norm(h + blk.proj_out(blk.q_proj(h) * blk.v_proj(h)))
        return self.lm_head(h)


def toy() -> Toy:
    torch.manual_seed(0)
    return Toy()


def test_swap_explicit_names():
    model = toy()
    v_weight = model.layers[1].v_proj.weight.detach().clone()
    targets = swap_linears(model, LoRASpec(rank=4, target_modules=["q_proj", "v_proj"]), quantize_base=False)
    assert targets == ["layers.0.q_proj", "layers.0.v_proj", "layers.1.q_proj", "layers.1.v_proj"]
    assert set(lora_modules(model)) == set(targets)
    for i in range(2):
        blk = model.layers[i]
        assert isinstance(blk.q_proj, LoRALinear) and blk.q_proj.rank == 4
        assert isinstance(blk.proj_out, LoRALinear) and blk.proj_out.rank == 0  # frozen, no adapter
        assert blk.v_proj.bias is not None and blk.q_proj.bias is None
    assert torch.equal(model.layers[1].v_proj.weight, v_weight)
    assert type(model.lm_head) is nn.Linear


def test_swap_preserves_outputs_at_init():
    model = toy()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    before = model(ids)
    swap_linears(model, LoRASpec(rank=4, alpha=8.0), quantize_base=False)
    assert torch.equal(model(ids), before)  # B = 0 and an unquantized base: bit-identical
    model_q = toy()
    swap_linears(model_q, LoRASpec(rank=4), quantize_base=True)
    # NF4 noise: the quantized model is close to, but not exactly, the original
    diff = (model_q(ids) - before).abs().max()
    assert 0 < diff < 0.5


@pytest.mark.parametrize("exclude", [["lm_head"], []])
def test_swap_all_linear_never_lm_head(exclude):
    model = toy()
    targets = swap_linears(model, LoRASpec(rank=2, target_modules="all-linear", exclude_modules=exclude))
    expected = [f"layers.{i}.{n}" for i in range(2) for n in ("q_proj", "v_proj", "proj_out")]
    assert targets == expected
    assert type(model.lm_head) is nn.Linear


def test_swap_all_linear_on_a_transformers_llama():
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama", hidden_size=32, intermediate_size=48, num_layers=2)
    model = AutoModelForCausalLM.from_config(config)
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    targets = swap_linears(model, LoRASpec(rank=2))
    assert len(targets) == n_linear - 1 == 2 * 7  # q k v o gate up down per layer; lm_head excluded
    assert not any("lm_head" in t for t in targets)
    assert type(model.lm_head) is nn.Linear
    mark_only_lora_trainable(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * len(targets)
    assert all(n.endswith((".lora_a.weight", ".lora_b.weight")) for n in trainable)
    ids = torch.tensor([[1, 5, 9]])
    out = model(ids).logits
    out.float().square().mean().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    assert model.lm_head.weight.grad is None and model.model.embed_tokens.weight.grad is None


def test_swap_name_matching_nothing_raises():
    with pytest.raises(ValueError, match="matched no linear"):
        swap_linears(toy(), LoRASpec(rank=2, target_modules=["k_proj"]))
    # matching is by whole dotted suffix: "proj" is not "q_proj"
    with pytest.raises(ValueError, match="matched no linear"):
        swap_linears(toy(), LoRASpec(rank=2, target_modules=["proj"]))
    # lm_head is skipped even when named explicitly
    with pytest.raises(ValueError, match="matched no linear"):
        swap_linears(toy(), LoRASpec(rank=2, target_modules=["lm_head"], exclude_modules=[]))


def test_is_target_rules():
    spec = LoRASpec(target_modules=["q_proj", "mlp.up_proj"], exclude_modules=["layers.0.q_proj"])
    assert is_target("layers.1.q_proj", spec)
    assert not is_target("layers.0.q_proj", spec)  # excluded
    assert is_target("layers.3.mlp.up_proj", spec)
    assert not is_target("layers.3.xmlp.up_proj", spec)
    assert not is_target("layers.1.qq_proj", spec)
    assert not is_target("lm_head", LoRASpec())


def test_mark_only_lora_trainable():
    model = toy()
    swap_linears(model, LoRASpec(rank=2, target_modules=["v_proj"]))
    for p in model.parameters():
        p.requires_grad_(True)
    mark_only_lora_trainable(model)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == [f"layers.{i}.v_proj.lora_{ab}.weight" for i in range(2) for ab in "ab"]


NAMES = [  # module names of a Llama, plus nested and odd ones
    *(f"model.layers.{i}.{m}" for i in (0, 1, 12) for m in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj")),
    "model.layers.3.block_sparse_moe.experts.1.w1",
    "layers.2.q_proj",
    "lm_head",
]
SELECTIONS = [  # PEFT LoraConfig options
    {"target_modules": ["q_proj", "up_proj"]},
    {"target_modules": ["q_proj", "w1"], "layers_to_transform": [1, 3]},
    {"target_modules": ["q_proj"], "layers_to_transform": 12},
    {"target_modules": ["q_proj", "up_proj"], "layers_to_transform": [0], "layers_pattern": "layers"},
    {"target_modules": ["q_proj"], "layers_to_transform": [2], "layers_pattern": ["blocks", "layers"]},
    {"target_modules": ["w1"], "layers_to_transform": [1], "layers_pattern": "experts"},
    {"target_modules": ["model.layers.1.mlp.up_proj", "q_proj"], "layers_to_transform": [0]},
    {"target_modules": r".*\.(1|12)\.self_attn\.(q|o)_proj"},
    {"target_modules": "q_proj"},  # a string is a full-match regex: matches no full name
    {
        "target_modules": ["q_proj", "o_proj", "up_proj"],
        "exclude_modules": ["o_proj", "model.layers.1.self_attn.q_proj"],
    },
    {"target_modules": ["q_proj", "o_proj"], "exclude_modules": r".*layers\.1\..*"},
]


@pytest.mark.parametrize("options", SELECTIONS, ids=[str(i) for i in range(len(SELECTIONS))])
def test_is_target_agrees_with_peft(options):
    peft = pytest.importorskip("peft")
    from peft.tuners.tuners_utils import check_target_module_exists

    config = peft.LoraConfig(**options)
    selection = {k: v for k, v in options.items() if k != "layers_pattern"}
    if isinstance(selection.get("layers_to_transform"), int):
        selection["layers_to_transform"] = [selection["layers_to_transform"]]
    pattern = options.get("layers_pattern")
    spec = PeftLoRASpec(**selection, layers_pattern=[pattern] if isinstance(pattern, str) else pattern)
    for name in NAMES:
        assert is_target(name, spec) == bool(check_target_module_exists(config, name)), name


def test_nf4_format_is_read_through_properties():
    """Other modules read the NF4 base's format through LoRALinear's read-only properties, which agree
    with the NF4Tensor it dequantizes from."""
    lin = linear()
    m = LoRALinear.from_linear(lin, rank=4, quantize_base=True)
    w = m.nf4_weight
    assert m.has_nf4
    assert (m.nf4_shape, m.nf4_dtype, m.nf4_blocksize) == (torch.Size((OUT, IN)), torch.float32, w.blocksize)
    assert (m.nf4_absmax_offset, m.nf4_absmax_blocksize) == (w.absmax_offset, w.absmax_blocksize)
    assert m.nf4_blocksize == 64 and m.nf4_absmax_blocksize == 256 and m.nf4_absmax_offset != 0.0
    for name in ("has_nf4", "nf4_shape", "nf4_dtype", "nf4_blocksize", "nf4_absmax_offset", "nf4_absmax_blocksize"):
        with pytest.raises(AttributeError):
            setattr(m, name, None)


@pytest.mark.parametrize("how", ["frozen16", "meta"])
def test_no_nf4_base_has_no_nf4_format(how):
    if how == "meta":
        with torch.device("meta"):
            lin = nn.Linear(IN, OUT)
        m = LoRALinear.from_linear(lin, rank=4, quantize_base=True)  # the weight comes later (load_model)
    else:
        m = LoRALinear.from_linear(linear(), rank=4, quantize_base=False)
    assert not m.has_nf4
    with pytest.raises(RuntimeError, match="no NF4 weight loaded"):
        m.nf4_shape  # noqa: B018 - the property raises
