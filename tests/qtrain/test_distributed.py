"""Data-parallel training on CPU (gloo): N ranks launched as torchrun launches them (one process per
rank, RANK/WORLD_SIZE/MASTER_* in the environment), each running `qtrain.train.train` through the real
loading path, compared with one process on the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
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
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(ranks: int, out: Path, overrides: list[str], fail: dict | None = None, timeout: float = TIMEOUT) -> list[dict]:
    """Run `ranks` processes (1: a plain single process, no distributed environment); each rank's report."""
    report = out.parent / f"{out.name}-report"
    report.mkdir(parents=True, exist_ok=True)
    spec = {"config": str(QUICKSTART), "overrides": [*COMMON, f"output_dir={out}", *overrides], "report": str(report), "fail": fail or {}}
    port, procs = free_port(), []
    for rank in range(ranks):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
        if ranks > 1:
            env |= {"RANK": str(rank), "WORLD_SIZE": str(ranks), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        env |= {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "COLUMNS": "250"}
        cmd = [sys.executable, str(WORKER), json.dumps(spec)]
        procs.append(subprocess.Popen(cmd, cwd=out.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        logs = [p.communicate(timeout=timeout)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"{ranks} ranks did not finish within {timeout}s (a hang)")
    reports = []
    for rank, log in enumerate(logs):
        path = report / f"rank{rank}.json"
        assert path.exists(), f"rank {rank} wrote no report:\n{log[-3000:]}"
        reports.append(json.loads(path.read_text()) | {"log": log})
    return reports


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


def ok(reports: list[dict]) -> None:
    for rank, r in enumerate(reports):
        assert "result" in r, f"rank {rank}: {r.get('error') or r.get('interrupted')}\n{r['log'][-3000:]}"


# ---- 1. same training: N ranks x per-rank batch == one process x global batch ----------------

STRATEGIES = ["ddp"]  # fsdp joins here when qtrain.fsdp lands


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_two_ranks_train_like_one_process_on_the_same_global_batch(tmp_path, tiny_checkpoint, arch, strategy):
    common = [*model_args(tiny_checkpoint, arch), "train.max_steps=20", "train.grad_accum=2", "eval.every=10"]
    ok(launch(1, tmp_path / "one", [*common, "train.batch_size=4"]))
    reports = launch(2, tmp_path / "two", [*common, "train.batch_size=2", f"distributed.strategy={strategy}"])
    ok(reports)
    assert_close_curves(tmp_path / "one", tmp_path / "two", "loss")
    assert_close_curves(tmp_path / "one", tmp_path / "two", "eval_loss")
    one, two = (load_file(tmp_path / d / "adapter" / "adapter_model.safetensors") for d in ("one", "two"))
    assert one.keys() == two.keys()
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-5
    assert "2 per rank on 2 ranks (ddp)" in reports[0]["log"]
