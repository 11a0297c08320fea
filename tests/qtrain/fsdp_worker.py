"""One rank of tests/qtrain/test_fsdp.py: python fsdp_worker.py RANK WORLD PORT OUT MODES CKPT [CKPT ...].

For each tiny checkpoint: the same LoRA model twice (same seed), one kept whole as the reference, one
sharded (MODES, comma-separated: shard, loaded whole, then `qtrain.fsdp.shard_model`; load (load-dora: with DoRA): `qtrain.fsdp.load_sharded`; a -8bit suffix: bitsandbytes' AdamW on each rank's rows); rank r trains on rows [r*b, (r+1)*b) of a batch the reference
sees whole (equal lengths: the mean of the ranks' mean losses is the batch's). Writes what the test
compares to OUT/<rank>.json. Run from outside the repository (its kernels/ folder shadows a package).
"""

import json
import os
import sys

import torch
import torch.distributed as dist

torch.set_num_threads(1)


READ = [0]  # bytes this rank read from the checkpoint


def counting(read):
    def read_tensor(entry):
        READ[0] += entry.end - entry.start
        return read(entry)

    return read_tensor


def lora_model(path, sharded_load=False, dora=False):
    from torch.distributed.tensor import DTensor, distribute_tensor

    from qtrain.fsdp import load_sharded
    from qtrain.lora import LoRASpec
    from qtrain.methods.lora import LoRA
    from qtrain.model import load_model

    torch.manual_seed(0)
    spec = LoRASpec(rank=4, alpha=8, target_modules="all-linear", use_dora=dora)
    if sharded_load:
        model = load_sharded(path, [LoRA.from_spec(spec)], compute_dtype=torch.float32, backend="torch").model
    else:
        model = load_model(path, spec, compute_dtype=torch.float32, backend="torch").model
    with torch.no_grad():  # B = 0 would leave A without gradient: give B values (same on every rank)
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_b" in name:
                value = 0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name)))
                if isinstance(p, DTensor):
                    p.to_local().copy_(distribute_tensor(value, p.device_mesh, p.placements).to_local())
                else:
                    p.copy_(value)
    return model


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def nf4_same(ref, shd):
    """Whether the sharded model's NF4 codes, absmaxes and double-quant state, all-gathered, are the whole model's."""
    from qtrain.lora import LoRALinear

    whole = {n: m for n, m in ref.named_modules() if isinstance(m, LoRALinear)}
    for name, m in shd.named_modules():
        if isinstance(m, LoRALinear):
            a, b = whole[name].nf4_weight, m
            if not (torch.equal(a.packed, full(b.nf4_packed).reshape(-1)) and torch.equal(a.absmax, full(b.nf4_absmax).reshape(-1))):
                return False
            if not (torch.equal(a.absmax_scale, b.nf4_absmax_scale) and a.absmax_offset == b.nf4_absmax_offset):
                return False
    return True


def optimizers(ref, shd, bnb_adam):
    """torch AdamW for both; `bnb_adam`: bitsandbytes' AdamW8bit (its update a custom op that takes no
    DTensor), the sharded model's through `qtrain.fsdp.shard_local_optimizer` on each rank's rows."""
    params = [[p for p in m.parameters() if p.requires_grad] for m in (ref, shd)]
    if not bnb_adam:
        return [torch.optim.AdamW(ps, lr=1e-3) for ps in params]
    import bitsandbytes as bnb

    from qtrain.fsdp import shard_local_optimizer

    make = lambda groups: bnb.optim.AdamW8bit(groups, lr=1e-3)  # noqa: E731 - tiny tensors: 32-bit state, elementwise
    return [make([{"params": params[0]}]), shard_local_optimizer(make, [{"params": params[1]}])]


def compare(path, rank, world, mode):
    import qtrain.checkpoint
    from qtrain.fsdp import nf4_bytes, shard_model
    from qtrain.train import loss_sum

    dora = mode.endswith("-dora")  # DoRA: ||W||_row summed from every rank's rows at load
    ref = lora_model(path, dora=dora)
    read, qtrain.checkpoint.read_tensor = qtrain.checkpoint.read_tensor, counting(qtrain.checkpoint.read_tensor)
    READ[0] = 0
    try:
        shd = lora_model(path, sharded_load=mode.startswith("load"), dora=dora)
    finally:
        qtrain.checkpoint.read_tensor = read
    if mode.startswith("shard"):
        shard_model(shd, world)
    local, total = nf4_bytes(shd)
    ckpt = qtrain.checkpoint.SafetensorsCheckpoint(path).total_bytes()
    same = nf4_same(ref, shd)
    linear = sum(e.end - e.start for k, e in qtrain.checkpoint.SafetensorsCheckpoint(path).entries.items() if "layers." in k and k.endswith("proj.weight"))
    ids = torch.randint(3, 60, (2 * world, 12), generator=torch.Generator().manual_seed(7))
    mine = ids[2 * rank : 2 * rank + 2]
    opts = optimizers(ref, shd, mode.endswith("-8bit"))
    out = {"nf4_local": local, "nf4_total": total, "read": READ[0], "linear": linear, "ckpt": ckpt, "nf4_same": same}
    out |= {"loss": [], "grad": 0.0, "params": []}
    for step in range(3):
        # the recipe's forward: the decoder, then lm_head's weight read for the chunked loss
        loss_ref = loss_sum(ref, {"input_ids": ids, "labels": ids}) / (ids.shape[0] * (ids.shape[1] - 1))
        loss_ref.backward()
        loss = loss_sum(shd, {"input_ids": mine, "labels": mine}) / (mine.shape[0] * (mine.shape[1] - 1))
        loss.backward()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        out["loss"].append([loss_ref.item(), mean.item() / world])
        grads = dict(shd.named_parameters())
        names = [n for n, p in ref.named_parameters() if p.requires_grad]
        if step == 0:
            out["grad"] = max((full(grads[n].grad) - p.grad).abs().max().item() for n, p in ref.named_parameters() if p.requires_grad)
            out["grad_norm"] = max(p.grad.abs().max().item() for n, p in ref.named_parameters() if p.requires_grad)
            out["trainable"] = len(names)
        for opt in opts:
            opt.step()
            opt.zero_grad()
        out["params"].append(max((full(grads[n]) - p).abs().max().item() for n, p in ref.named_parameters() if p.requires_grad))
    return out


def main():
    rank, world, port, out_dir, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {f"{m} {path}": compare(path, rank, world, m) for m in mode.split(",") for path in sys.argv[6:]}
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
