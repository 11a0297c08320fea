"""Data-parallel training on CPU (gloo): N ranks launched as torchrun launches them (one process per
rank, RANK/WORLD_SIZE/MASTER_* in the environment), each running `qtrain.train.train` through the real
loading path, compared with one process on the same global batch."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qtrain.data import Batches
from qtrain.distributed import World, on_main, resolve_strategy, world_from_env

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("distributed_worker.py")
QUICKSTART = REPO / "configs" / "quickstart.yaml"
TIMEOUT = 120  # seconds for one launch: a hang fails the test instead of the suite

# a tiny fp32 model, no dropout: N ranks and one process must agree to rounding
COMMON = [
    "model.tiny=null",
    "train.warmup_steps=2",
    "data.num_train=96",
    "data.num_eval=12",
    "data.max_length=128",
    "eval.exact_match=false",
    "eval.samples=[]",
    "eval.batch_size=5",
    "log.tensorboard=false",
    "log.plot=false",
    "train.threads=1",
    "train.lr=1e-2",
    "distributed.timeout_s=60",
    "train.gradient_checkpointing=false",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Launch:
    """`ranks` processes running `runs` ({name: overrides}) one after the other (1 rank: a plain single
    process, no distributed environment); `reports()` waits (a hang fails the test) and reads them."""

    def __init__(self, tmp: Path, ranks: int, runs: dict[str, list[str]], fail: dict | None = None):
        self.ranks, self.report = ranks, tmp / f"report-{ranks}-{'-'.join(runs)}"
        self.report.mkdir(parents=True)
        runs_spec = [{"name": name, "overrides": [*COMMON, f"output_dir={tmp / name}", *o]} for name, o in runs.items()]
        spec = json.dumps({"config": str(QUICKSTART), "runs": runs_spec, "report": str(self.report), "fail": fail or {}})
        port = free_port()
        self.procs = []
        for rank in range(ranks):
            env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
            if ranks > 1:
                env |= {"RANK": str(rank), "WORLD_SIZE": str(ranks), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
            env |= {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "COLUMNS": "250"}
            cmd = [sys.executable, str(WORKER), spec]
            self.procs.append(subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))

    def reports(self, timeout: float = TIMEOUT) -> list[dict]:
        try:
            logs = [p.communicate(timeout=timeout)[0] for p in self.procs]
        except subprocess.TimeoutExpired:
            for p in self.procs:
                p.kill()
            pytest.fail(f"{self.ranks} ranks did not finish within {timeout}s (a hang)")
        out = []
        for rank, log in enumerate(logs):
            path = self.report / f"rank{rank}.json"
            assert path.exists(), f"rank {rank} wrote no report:\n{log[-3000:]}"
            out.append(json.loads(path.read_text()) | {"log": log, "code": self.procs[rank].returncode})
        return out


def model_args(tiny_checkpoint, arch: str) -> list[str]:
    path = tiny_checkpoint(arch, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, initializer_range=0.1)
    return [f"model.name_or_path={path}", "model.dtype=fp32"]


def curve(out: Path, key: str = "loss") -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in records if key in r]


def assert_close_curves(a: Path, b: Path, key: str, tol: float = 1e-5) -> None:
    ca, cb = curve(a, key), curve(b, key)
    assert [s for s, _ in ca] == [s for s, _ in cb] and ca
    worst = max(abs(x - y) for (_, x), (_, y) in zip(ca, cb))
    assert worst < tol, f"{key}: largest difference {worst:.2e} over {len(ca)} records"


def ok(reports: list[dict], *names: str) -> None:
    for rank, r in enumerate(reports):
        for name in names:
            assert "result" in r.get(name, {}), f"rank {rank}, {name}: {r.get(name)}\n{r['log'][-3000:]}"


# ---- 1. same training: N ranks x per-rank batch == one process x global batch ----------------

STRATEGIES = ["ddp", "fsdp"]
ARCHS = ["llama", "qwen2"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_ranks_train_like_one_process_on_the_same_global_batch(tmp_path, tiny_checkpoint, strategy):
    """20 steps, accumulation 2, eval every 10, on a tiny Llama and a tiny Qwen2: 2 ranks x 2 rows
    equal 1 process x 4 rows (loss, eval loss, adapter). Both launches run at once."""
    common = {arch: [*model_args(tiny_checkpoint, arch), "train.max_steps=20", "train.grad_accum=2", "eval.every=10"] for arch in ARCHS}
    one = Launch(tmp_path, 1, {f"{arch}-one": [*common[arch], "train.batch_size=4"] for arch in ARCHS})
    two = Launch(tmp_path, 2, {f"{arch}-two": [*common[arch], "train.batch_size=2", f"distributed.strategy={strategy}"] for arch in ARCHS})
    reports = two.reports()
    ok(one.reports(), *(f"{a}-one" for a in ARCHS))
    ok(reports, *(f"{a}-two" for a in ARCHS))
    for arch in ARCHS:
        a, b = tmp_path / f"{arch}-one", tmp_path / f"{arch}-two"
        assert_close_curves(a, b, "loss")
        assert_close_curves(a, b, "eval_loss")
        ta, tb = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (a, b))
        assert ta.keys() == tb.keys()
        assert max((ta[k] - tb[k]).abs().max().item() for k in ta) < 1e-4, arch  # Adam's normalised steps magnify rounding
    assert f"2 per rank on 2 ranks ({strategy})" in reports[0]["log"]


# ---- 3. data: each row once per epoch across the ranks; packing and grouping still work ------


def epoch_rows(stream: Batches) -> list[int]:
    """The example ids in one epoch of `stream`, from its batches' tokens (example i is all i+1)."""
    ids = []
    for _ in range(len(stream.plan())):
        batch = next(stream)
        for row, mask in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
            ids += [t - 1 for t, prev in zip(row, [None, *row]) if t != 0 and t != prev]  # one id per run of equal tokens
    return ids


@pytest.mark.parametrize("mode", ["pad", "group", "pack"])
@pytest.mark.parametrize("world", [2, 3])
def test_each_row_is_seen_once_per_epoch_across_the_ranks(mode, world):
    from qtrain.data import Example

    lengths = [5 + (7 * i) % 23 for i in range(60)]  # varied lengths: grouping and packing have work to do
    examples = [Example([i + 1] * n, [-100] + [i + 1] * (n - 1)) for i, n in enumerate(lengths)]
    single = Batches(examples, 2 * world, 0, seed=3, mode=mode, max_length=64)  # one process, the global batch
    ranks = [Batches(examples, 2, 0, seed=3, mode=mode, max_length=64, rank=r, world=world) for r in range(world)]
    seen = [epoch_rows(r) for r in ranks]
    together = sorted(i for rows in seen for i in rows)
    assert together == sorted(epoch_rows(single))  # the same rows as one process with the global batch
    assert len(together) == len(set(together))  # each at most once
    if mode != "pack":  # 60 rows, global batches of 4 or 6: every row, exactly once
        assert together == list(range(60))
    assert all(set(a).isdisjoint(b) for i, a in enumerate(seen) for b in seen[i + 1 :])
    assert len({r.state_dict()["index"] for r in ranks}) == 1  # the same position on every rank


# ---- 4. checkpoints: saved once by rank 0, per-rank RNG, bit-for-bit resume, across world sizes --


def test_checkpoints_resume_bit_for_bit_and_across_world_sizes(tmp_path, tiny_checkpoint):
    """Dropout on (each rank's RNG matters), constant schedule: 2 ranks x (4 steps, then resumed to 8)
    equals 2 ranks x 8 steps exactly; a 2-rank checkpoint resumes in one process and a 1-process one
    on 2 ranks, each with a warning naming what changed; the adapter loads in PEFT."""
    common = [*model_args(tiny_checkpoint, "llama"), "train.batch_size=2", "lora.dropout=0.1", "train.schedule=constant"]
    half = tmp_path / "half"
    two = Launch(tmp_path, 2, {"straight": [*common, "train.max_steps=8"], "half": [*common, "train.max_steps=4"],
                              "resumed": [*common, "train.max_steps=8", f"output_dir={half}", "checkpoint.resume=auto"]})  # fmt: skip
    one = Launch(tmp_path, 1, {"one-half": [*common, "train.batch_size=4", "train.max_steps=4"]})
    ok(one.reports(), "one-half")
    ok(two.reports(), "straight", "half", "resumed")
    assert curve(half) == curve(tmp_path / "straight")  # exact: same ranks, per-rank RNG restored
    a, b = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (half, tmp_path / "straight"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    ckpt = half / "checkpoints" / "step-0000004"
    assert len(torch.load(ckpt / "trainer_state.pt", weights_only=True)["rng_ranks"]) == 2

    to_one = Launch(tmp_path, 1, {"to-one": [*common, "train.batch_size=4", "train.max_steps=6", f"checkpoint.resume={ckpt}"]})
    to_two = Launch(tmp_path, 2, {"to-two": [*common, "train.max_steps=6", f"checkpoint.resume={tmp_path / 'one-half' / 'checkpoints' / 'step-0000004'}"]})
    (r1,), (r2, _) = to_one.reports(), to_two.reports()
    ok([r1], "to-one")
    ok([r2], "to-two")
    assert "saved by 2 process(es), this run has 1" in r1["log"]
    assert "saved by 1 process(es), this run has 2" in r2["log"]
    assert [s for s, _ in curve(tmp_path / "to-two")] == [5, 6]

    import peft
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_args(tiny_checkpoint, "llama")[0].split("=", 1)[1], dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, tmp_path / "straight" / "adapter")
    loaded = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(loaded) == len(b) and all(torch.equal(loaded[k.replace(".weight", ".default.weight")], v) for k, v in b.items())


def test_fsdp_checkpoints_resume_bit_for_bit_and_in_one_process(tmp_path, tiny_checkpoint):
    """FSDP, dropout on, constant schedule: 2 ranks x (4 steps, then resumed to 8) equal 2 ranks x 8
    steps exactly (the gathered optimizer state cut into the same rows again, each rank's RNG); the
    adapter is written once, by rank 0, loads in PEFT with the trained values, and a 2-rank FSDP
    checkpoint (one process's format) resumes in one process."""
    common = [*model_args(tiny_checkpoint, "llama"), "train.batch_size=2", "lora.dropout=0.1", "train.schedule=constant", "distributed.strategy=fsdp"]
    half = tmp_path / "half"
    two = Launch(tmp_path, 2, {"straight": [*common, "train.max_steps=8"], "half": [*common, "train.max_steps=4"],
                              "resumed": [*common, "train.max_steps=8", f"output_dir={half}", "checkpoint.resume=auto"]})  # fmt: skip
    reports = two.reports()
    ok(reports, "straight", "half", "resumed")
    assert "the NF4 base sharded over 2 ranks" in reports[0]["log"]
    assert curve(half) == curve(tmp_path / "straight")  # exact
    saved = load_file(half / "adapter" / "adapter_model.safetensors")
    straight = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    assert saved.keys() == straight.keys() and all(torch.equal(saved[k], straight[k]) for k in saved)
    assert sorted(p.name for p in half.iterdir() if "adapter" in p.name) == ["adapter"]  # once: no second writer's leftovers
    state = torch.load(half / "checkpoints" / "step-0000004" / "trainer_state.pt", weights_only=True)
    moments = [s["exp_avg"] for s in state["optimizer"]["state"].values()]
    assert moments and all(type(m) is torch.Tensor for m in moments)  # whole tensors, not shards
    shapes = {k: v.shape for k, v in saved.items()}
    assert sorted(m.shape for m in moments) == sorted(shapes.values())

    ckpt = half / "checkpoints" / "step-0000004"
    (one,) = Launch(tmp_path, 1, {"to-one": [*common, "train.batch_size=4", "train.max_steps=6", f"checkpoint.resume={ckpt}"]}).reports()
    ok([one], "to-one")
    assert "saved by 2 process(es), this run has 1" in one["log"]
    assert [s for s, _ in curve(tmp_path / "to-one")] == [5, 6]

    import peft
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_args(tiny_checkpoint, "llama")[0].split("=", 1)[1], dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, tmp_path / "straight" / "adapter")
    loaded = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(loaded) == len(straight) and all(torch.equal(loaded[k.replace(".weight", ".default.weight")], v) for k, v in straight.items())


# ---- 4. stopping: a NaN, an exception or Ctrl-C on one rank stops every rank, no hang ----------


def wait_for_step(out: Path, step: int, procs: list, timeout: float = TIMEOUT) -> None:
    """Until rank 0 has logged `step` (the run is training), or fail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (out / "metrics.jsonl").exists() and any(s >= step for s, _ in curve(out)):
            return
        assert all(p.poll() is None for p in procs), "a rank exited before training"
        time.sleep(0.2)
    pytest.fail(f"no step {step} within {timeout}s")


def test_a_nan_an_exception_or_ctrl_c_on_one_rank_stops_every_rank(tmp_path, tiny_checkpoint):
    """Two runs on 2 ranks, each with trouble on rank 1 only: its 3rd forward's loss is NaN; it gets
    Ctrl-C (SIGINT) while training. Every rank stops at the same step and the launch goes on."""
    common = [*model_args(tiny_checkpoint, "llama"), "train.batch_size=2"]
    runs = {"nan": [*common, "train.max_steps=6"], "ctrl-c": [*common, "train.max_steps=500"]}
    launch = Launch(tmp_path, 2, runs, fail={"run": "nan", "rank": 1, "call": 3, "kind": "nan"})
    wait_for_step(tmp_path / "ctrl-c", 2, launch.procs)
    launch.procs[1].send_signal(signal.SIGINT)
    reports = launch.reports()

    errors = [r["nan"].get("error", "") for r in reports]
    assert all(e.startswith("FloatingPointError: step 3: loss is nan") for e in errors), errors  # the all-reduced NaN: same step
    steps = [r["ctrl-c"].get("interrupted") for r in reports]
    assert steps[0] == steps[1] and 2 <= steps[0] < 500, reports[0]["log"][-2000:]
    assert (tmp_path / "ctrl-c" / "checkpoints" / f"step-{steps[0]:07d}" / "adapter" / "adapter_model.safetensors").exists()


def test_an_exception_on_one_rank_stops_every_rank(tmp_path, tiny_checkpoint):
    run = {"error": [*model_args(tiny_checkpoint, "llama"), "train.batch_size=2", "train.max_steps=6"]}
    reports = Launch(tmp_path, 2, run, fail={"run": "error", "rank": 1, "call": 3, "kind": "error"}).reports()
    errors = [r["error"].get("error", "") for r in reports]
    assert [r["code"] for r in reports] == [1, 1]
    assert errors[1] == "RuntimeError: injected failure"
    assert errors[0].startswith("RuntimeError: rank 0: another rank stopped (its own error says why)"), errors


# ---- 5. every PEFT method trains under DDP as in one process, or is refused before loading ------

def test_every_peft_method_trains_under_ddp_like_one_process(tmp_path, tiny_checkpoint):
    """Every method of the registry, 3 steps on 2 ranks x 2 rows and on 1 process x 4 rows: the same
    losses (AdapterFusion, last, fuses the Pfeiffer adapter its launch trained); none refused today."""
    from qtrain.methods import METHODS
    from qtrain.train import DDP_REFUSED

    names = [n for n in METHODS if n not in DDP_REFUSED and n != "adapter_fusion"] + ["adapter_fusion"]
    common = [*model_args(tiny_checkpoint, "llama"), "train.max_steps=3", "llama_adapter.adapter_layers=2", "data.num_train=24"]

    def runs(kind: str, batch: int) -> dict[str, list[str]]:
        fusion = [f"adapter_fusion.adapters=[{tmp_path / f'pfeiffer-{kind}' / 'adapter'}]"]
        return {f"{n}-{kind}": [*common, f"method={n}", f"train.batch_size={batch}", *(fusion if n == "adapter_fusion" else [])] for n in names}

    one, two = Launch(tmp_path, 1, runs("one", 4)), Launch(tmp_path, 2, runs("two", 2))
    ok(two.reports(), *(f"{n}-two" for n in names))
    ok(one.reports(), *(f"{n}-one" for n in names))
    for n in names:
        assert_close_curves(tmp_path / f"{n}-one", tmp_path / f"{n}-two", "loss")


# one method of each kind: parameters in the NF4 linears' rows (DoRA, (IA)^3: loaded sharded),
# bottleneck modules, prompt and prefix parameters (loaded whole, then `shard_model`)
FSDP_METHODS = {"dora": ["method=lora", "lora.use_dora=true"], **{n: [f"method={n}"] for n in ("ia3", "houlsby", "prompt_tuning", "prefix_tuning")}}


def test_peft_methods_train_under_fsdp_like_one_process(tmp_path, tiny_checkpoint):
    """Each kind of PEFT method FSDP runs, 3 steps on 2 ranks x 2 rows and on 1 process x 4 rows: the same losses."""
    common = [*model_args(tiny_checkpoint, "llama"), "train.max_steps=3", "llama_adapter.adapter_layers=2", "data.num_train=24"]
    one = Launch(tmp_path, 1, {f"{n}-one": [*common, *o, "train.batch_size=4"] for n, o in FSDP_METHODS.items()})
    two = Launch(tmp_path, 2, {f"{n}-two": [*common, *o, "train.batch_size=2", "distributed.strategy=fsdp"] for n, o in FSDP_METHODS.items()})
    ok(two.reports(), *(f"{n}-two" for n in FSDP_METHODS))
    ok(one.reports(), *(f"{n}-one" for n in FSDP_METHODS))
    for n in FSDP_METHODS:
        assert_close_curves(tmp_path / f"{n}-one", tmp_path / f"{n}-two", "loss")


def test_a_method_ddp_cannot_run_is_refused_before_loading(monkeypatch):
    import qtrain.train as recipe
    from qtrain.config import load_config

    monkeypatch.setitem(recipe.DDP_REFUSED, "ia3", "for this test")
    cfg = load_config(QUICKSTART, ["method=ia3"])
    with pytest.raises(ValueError, match=r"^method ia3 cannot train under distributed.strategy=ddp \(for this test\)"):
        recipe.check_strategy(cfg, "ddp", World(0, 2, 0), 0)
    recipe.check_strategy(cfg, "single", World(), 0)  # one process: nothing refused


# ---- the plumbing ------------------------------------------------------------------------------


def test_world_from_the_torchrun_environment():
    assert world_from_env({}) == World(0, 1, 0) and not World().distributed and World().is_main
    w = world_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (w.rank, w.size, w.local_rank, w.is_main, w.distributed) == (3, 4, 1, False, True)
    with pytest.raises(ValueError, match="WORLD_SIZE='two' is not an integer"):
        world_from_env({"RANK": "0", "WORLD_SIZE": "two"})
    with pytest.raises(ValueError, match="RANK=4 is outside WORLD_SIZE=4"):
        world_from_env({"RANK": "4", "WORLD_SIZE": "4"})


def test_strategy_auto_is_ddp_when_the_model_fits_one_card_else_fsdp():
    two = World(0, 2, 0)
    assert resolve_strategy("auto", World(), lambda: pytest.fail("one process asks nothing")) == "single"
    assert resolve_strategy("ddp", World(), lambda: False) == "single"
    assert resolve_strategy("auto", two, lambda: True) == "ddp"
    assert resolve_strategy("auto", two, lambda: False) == "fsdp"
    assert resolve_strategy("ddp", two, lambda: False) == "ddp"
    with pytest.raises(ValueError, match="distributed.strategy: 'zero3'"):
        resolve_strategy("zero3", two, lambda: True)


@pytest.mark.parametrize("method", ["adalora", "adapter_fusion"])
def test_a_method_fsdp_cannot_run_is_refused_before_loading(method):
    """Methods that read their parameters outside the forward (AdaLoRA's rank budget, AdapterFusion's
    regulariser) are refused in one line naming method and strategy, before anything loads (the
    config's model does not exist); DDP and one process run them."""
    from qtrain.config import load_config
    from qtrain.train import check_strategy

    fusion = ["adapter_fusion.adapters=[/nonexistent]"] if method == "adapter_fusion" else []
    cfg = load_config(QUICKSTART, [f"method={method}", "model.tiny=null", "model.name_or_path=/nonexistent", *fusion])
    with pytest.raises(ValueError, match=rf"^method '{method}' cannot run with distributed.strategy: fsdp: .*use distributed.strategy: ddp") as e:
        check_strategy(cfg, "fsdp", World(0, 2, 0), 0)
    assert "\n" not in str(e.value)
    check_strategy(cfg, "ddp", World(0, 2, 0), 0)
    check_strategy(load_config(QUICKSTART, ["method=[lora,bitfit]"]), "fsdp", World(0, 2, 0), 0)  # these shard


def test_on_main_runs_once_and_one_process_is_unchanged():
    calls = []
    assert on_main(World(), lambda: calls.append(1) or "x") == "x" and calls == [1]


def test_the_ddp_config_is_the_one_gpu_config_on_two_ranks():
    """Same settings and global batch (per-rank batch x 2 ranks x accumulation) as llama-3.1-8b.yaml,
    strategy ddp, and its header carries the torchrun line."""
    from qtrain.config import load_config, to_dict

    one, two = (load_config(REPO / "configs" / name) for name in ("llama-3.1-8b.yaml", "llama-3.1-8b-2gpu-ddp.yaml"))
    assert two.distributed.strategy == "ddp"
    assert two.train.batch_size * 2 * two.train.grad_accum == one.train.batch_size * one.train.grad_accum
    a, b = to_dict(one), to_dict(two)
    changed = {f"{s}.{k}" for s in a if isinstance(a[s], dict) for k in a[s] if a[s][k] != b[s].get(k)}
    assert changed == {"train.grad_accum", "distributed.strategy"}, changed
    assert "#   torchrun --nproc_per_node 2 $(which qtrain) train configs/llama-3.1-8b-2gpu-ddp.yaml" in (REPO / "configs" / "llama-3.1-8b-2gpu-ddp.yaml").read_text()


def test_qtrain_train_under_torchrun(tmp_path, tiny_checkpoint):
    """The README's launch line, for real: torchrun starts 2 ranks of the `qtrain` command; train()
    joins and leaves the process group itself; rank 0 alone writes the run."""
    import shutil

    qtrain = shutil.which("qtrain") or pytest.skip("the qtrain command is not installed")
    out = tmp_path / "run"
    overrides = [*COMMON, *model_args(tiny_checkpoint, "llama"), "train.max_steps=3", "train.batch_size=2", f"output_dir={out}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()), qtrain, "train", str(QUICKSTART), *overrides]
    env = os.environ | {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "COLUMNS": "250"}
    done = subprocess.run(cmd, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert [s for s, _ in curve(out)] == [1, 2, 3]
    assert json.loads((out / "result.json").read_text())["steps"] == 3
    assert done.stdout.count("2 per rank on 2 ranks (ddp)") == 1  # rank 0 prints, the others are quiet
