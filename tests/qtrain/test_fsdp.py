"""FSDP2-QLoRA (`qtrain.fsdp`): the NF4 base sharded by rows with its absmax, on CPU with gloo.

Two processes (`fsdp_worker.py`, a subprocess each, with a timeout) shard tiny Llama and Qwen2
models (loaded whole through `qtrain.model.load_model` then sharded, or loaded sharded) and compare
them with the same model kept whole, through the recipe's forward (`qtrain.train.loss_sum`)."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qtrain.fsdp import fsdp_refusal, load_sharded, own_rows
from qtrain.fused.projection import fusable
from qtrain.lora import LoRALinear, LoRASpec
from qtrain.methods import METHODS
from qtrain.model import load_model

WORKER = Path(__file__).with_name("fsdp_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(world: int, tmp_path: Path, *args: str, timeout: float = 150) -> list[dict]:
    """Start `world` worker processes, wait (killing all on timeout), return each rank's JSON."""
    port = str(free_port())
    procs = [
        subprocess.Popen([sys.executable, str(WORKER), str(r), str(world), port, str(tmp_path), *args],
                         cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(world)
    ]  # fmt: skip
    try:
        logs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    return [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def two_ranks(tiny_checkpoint, tmp_path_factory):
    # Qwen2 with lm_head tied to the embeddings: the tied weight stays whole (`shard_decoder`)
    paths = [
        str(tiny_checkpoint("llama", hidden_size=64, intermediate_size=128, num_layers=2)),
        str(tiny_checkpoint("qwen2", hidden_size=64, intermediate_size=128, num_layers=2, tie_word_embeddings=True)),
    ]
    return [f"{mode} {path}" for mode in MODES for path in paths], run_ranks(2, tmp_path_factory.mktemp("fsdp"), ",".join(MODES), *paths)


MODES = ("shard", "load")  # a model loaded whole then `shard_model`-ed; one `load_sharded` (rows read per rank)


def test_sharded_training_equals_the_whole_model(two_ranks):
    runs, ranks = two_ranks
    for run in runs:
        for out in (r[run] for r in ranks):
            assert out["nf4_same"]  # all-gathered, the NF4 codes/absmax/double-quant state are one process's
            assert out["trainable"] == 28  # LoRA on the 7 linears of 2 layers, A and B
            for whole, sharded in out["loss"]:  # 3 AdamW steps, rank r on its half of the batch
                assert sharded == pytest.approx(whole, abs=1e-5)
            assert out["grad_norm"] > 1e-3  # the gradients compared are not all zero
            assert out["grad"] < 1e-5  # every adapter gradient, all-gathered, equals the whole model's
            assert max(out["params"]) < 1e-5  # and so do the adapters after each AdamW step


def test_each_rank_holds_half_of_the_nf4_base(two_ranks):
    runs, ranks = two_ranks
    for run in runs:
        for out in (r[run] for r in ranks):
            # codes + absmax, counted by storage: 1/2 of the whole (tiny rows split evenly: no padding)
            assert out["nf4_total"] > 30_000
            assert out["nf4_local"] == pytest.approx(out["nf4_total"] / 2, rel=0.02)


def test_each_rank_reads_only_the_rows_it_keeps(two_ranks):
    runs, ranks = two_ranks
    for run in runs:
        for out in (r[run] for r in ranks):
            if run.startswith("load"):  # the decoder linears' rows: half each; the rest whole, once
                assert out["read"] == out["ckpt"] - out["linear"] // 2
            else:
                assert out["read"] == out["ckpt"]


def test_rows_hold_the_same_nf4_weight(tiny_checkpoint):
    """`hold_nf4_in_rows` keeps the bytes (views) and the layer's output, and refuses rows that split blocks."""
    path = tiny_checkpoint("llama", hidden_size=64, intermediate_size=128, num_layers=2)
    model = load_model(str(path), LoRASpec(rank=4, target_modules="all-linear"), compute_dtype=torch.float32).model
    layer = model.model.layers[0].mlp.down_proj
    x = torch.randn(3, layer.in_features)
    before, ptr = layer(x), layer.nf4_packed.data_ptr()
    layer.hold_nf4_in_rows()
    assert isinstance(layer.nf4_packed, torch.nn.Parameter) and not layer.nf4_packed.requires_grad
    assert layer.nf4_packed.shape == (layer.out_features, layer.in_features // 2)
    assert layer.nf4_absmax.shape == (layer.out_features, layer.in_features // 64)
    assert layer.nf4_packed.data_ptr() == ptr
    assert torch.equal(layer(x), before)
    mlp = model.model.layers[0].mlp
    mlp.gate_proj.hold_nf4_in_rows()
    assert "sharded across ranks" in fusable([mlp.gate_proj, mlp.up_proj])  # no fused gate/up over sharded codes
    odd = LoRALinear(96, 8, rank=0)
    odd.set_base_weight(torch.randn(8, 96))
    with pytest.raises(ValueError, match="in_features=96 is not a multiple of the NF4 block size 64"):
        odd.hold_nf4_in_rows()


def test_fsdp_refuses_methods_that_read_parameters_outside_the_forward():
    refused = {name for name, cls in METHODS.items() if fsdp_refusal([cls()]) is not None}
    assert refused == {"adalora", "adapter_fusion"}
    message = fsdp_refusal([METHODS["lora"](), METHODS["adalora"]()])
    assert "'adalora'" in message and "fsdp" in message and "ddp" in message


def test_three_ranks_uneven_rows(tiny_checkpoint, tmp_path):
    """3 ranks: 64 output rows split 22/22/20 (FSDP pads the last shard); the rows each rank reads
    (`own_rows`) must be the ones FSDP keeps there, or the all-gathered codes would be wrong. With
    DoRA, whose row norms ||W||_row (a replicated buffer) are summed from every rank's rows."""
    path = str(tiny_checkpoint("llama", hidden_size=64, intermediate_size=128, num_layers=2))
    for out in (r[f"load-dora {path}"] for r in run_ranks(3, tmp_path, "load-dora", path)):
        assert out["trainable"] == 42  # A, B and the magnitude of 14 linears
        assert out["nf4_same"]
        assert all(sharded == pytest.approx(whole, abs=1e-5) for whole, sharded in out["loss"])
        assert out["grad"] < 1e-5 and max(out["params"]) < 1e-5
        assert out["nf4_local"] == pytest.approx(out["nf4_total"] / 3, rel=0.1)  # padded to ceil(rows / 3)


def test_bitsandbytes_adamw_steps_each_ranks_rows(tiny_checkpoint, tmp_path):
    """bitsandbytes' AdamW (the 70B config's paged 8-bit one: a custom op that takes no DTensor) on
    each rank's rows (`shard_local_optimizer`), 2 ranks: the adapters after each step are the whole
    model's under the same optimizer."""
    path = str(tiny_checkpoint("llama", hidden_size=64, intermediate_size=128, num_layers=2))
    for out in (r[f"load-8bit {path}"] for r in run_ranks(2, tmp_path, "load-8bit", path)):
        assert all(sharded == pytest.approx(whole, abs=1e-5) for whole, sharded in out["loss"])
        assert out["grad"] < 1e-5 and max(out["params"]) < 1e-5
        assert out["loss"][0] != pytest.approx(out["loss"][2], abs=1e-4)  # the steps moved the adapters


def test_own_rows_are_torch_chunk_s():
    for out, world in [(64, 3), (5, 4), (2, 3), (8192, 2)]:
        chunks = torch.arange(out).chunk(world)
        for rank in range(world):
            start, stop = own_rows(out, rank, world)
            expected = chunks[rank].tolist() if rank < len(chunks) else []
            assert list(range(start, stop)) == expected


@pytest.fixture
def one_rank():
    """A single-process gloo group in this process, torn down after the test."""
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    yield
    dist.destroy_process_group()


def test_load_sharded_refuses_methods_built_from_the_base(tiny_checkpoint, one_rank):
    """load_sharded attaches the methods to the empty (meta) model; a method whose parameters take the
    base's device there (bottleneck adapters, prompt/prefix tuning, LLaMA-Adapter) is refused by name."""
    path = str(tiny_checkpoint("llama", hidden_size=64, intermediate_size=128, num_layers=2))
    with pytest.raises(ValueError, match="method 'houlsby' makes model.layers.0.adapter_attn"):
        load_sharded(path, [METHODS["houlsby"]()], compute_dtype=torch.float32, backend="torch")


def _set_lora_b(model, seed: int = 0) -> None:
    """Give every LoRA B values (B = 0 would leave A without gradient), the same in any model."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_b" in name:
                value = 0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + len(name)))
                (p.to_local() if hasattr(p, "to_local") else p).copy_(value.to(p.device))


@pytest.mark.gpu
def test_one_rank_fsdp_on_cuda_feeds_the_triton_kernels_like_the_whole_model(tiny_checkpoint, monkeypatch):
    """The GPU check of issue 19 (two processes cannot share one GPU under NCCL): one rank of FSDP on
    CUDA, loaded sharded, runs the all-gathered NF4 codes through the Triton NF4 + LoRA kernels, as
    training calls them (bf16 autocast forward, backward outside it): the loss and every adapter
    gradient equal the unsharded model's."""
    import torch.distributed as dist

    from qtrain.methods.lora import LoRA
    from qtrain.train import loss_sum

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        path = str(tiny_checkpoint("llama", hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4))
        spec = LoRASpec(rank=8, alpha=16, target_modules="all-linear")
        torch.manual_seed(0)
        whole = load_model(path, spec, compute_dtype=torch.bfloat16, device="cuda", backend="triton").model
        torch.manual_seed(0)
        sharded = load_sharded(path, [LoRA.from_spec(spec)], torch.bfloat16, device="cuda", backend="triton").model
        ids = torch.randint(4, whole.config.vocab_size, (2, 300), generator=torch.Generator().manual_seed(0)).cuda()
        batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
        results = []
        for model in (whole, sharded):
            _set_lora_b(model)
            model.train()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = loss_sum(model, batch)
            loss.backward()
            grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).float().cpu()
                     for n, p in model.named_parameters() if p.requires_grad}  # fmt: skip
            results.append((loss.item(), grads))
        (loss_w, grads_w), (loss_s, grads_s) = results
        assert loss_s == pytest.approx(loss_w, rel=1e-3)
        assert len(grads_s) == len(grads_w) > 0
        for name, g in grads_w.items():
            torch.testing.assert_close(grads_s[name], g, rtol=2e-2, atol=1e-4, msg=name)
    finally:
        dist.destroy_process_group()
