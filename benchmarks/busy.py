"""The quickstart on an idle and on a busy CPU, under each CPU-thread policy.

    python benchmarks/busy.py                                     # full quickstart: qtrain's policy and torch's (~15 min on 2 cores)
    python benchmarks/busy.py --policies qtrain torch one-thread passive short-spin --overrides train.max_steps=100

A laptop or CI machine is rarely idle. With as many OpenMP threads as cores, one other busy process
makes every parallel region wait for the thread that lost its core, and GNU OpenMP's threads spin
while they wait, taking CPU from the very thread they wait for. This runs `qtrain train
configs/quickstart.yaml` (plus --overrides, into a temporary output_dir) once with the machine idle
and once beside one competing process (a Python busy loop: one core's worth of other work), per
policy:

- `qtrain`: what `qtrain train` does by default (see `train.threads` in qtrain/config.py);
- `torch`: PyTorch's own default (one thread per core, GNU OpenMP's default spin-then-sleep wait),
  with `train.threads=0` (leave the thread count to torch) and `OMP_WAIT_POLICY` set to an empty
  value, which GNU OpenMP treats as unset;
- `one-thread`: `train.threads=1`;
- `passive`: torch's thread count with `OMP_WAIT_POLICY=PASSIVE` (waiting threads sleep at once);
- `short-spin`: torch's thread count, GNU OpenMP spinning 10,000 rounds (`GOMP_SPINCOUNT`) before it sleeps.

Reported: the wall time of the whole command (model build, exact match before and after, training)
and the training seconds it reports (result.json), idle and busy, and busy / idle. Target (issue 14):
the default policy within 2x of its idle time beside one busy process.
Writes benchmarks/results/busy-<cpu>-<date>-<commit>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
POLICIES = {  # name: (environment, overrides)
    "qtrain": ({}, []),
    "torch": ({"OMP_WAIT_POLICY": ""}, ["train.threads=0"]),
    "one-thread": ({}, ["train.threads=1"]),
    "passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, ["train.threads=0"]),
    "short-spin": ({"OMP_WAIT_POLICY": "", "GOMP_SPINCOUNT": "10000"}, ["train.threads=0"]),
}
DEFAULT_POLICIES = ["qtrain", "torch"]
BUSY_LOOP = "while True: pass"


def run_quickstart(policy: str, busy: bool, overrides: list[str], timeout: float) -> dict:
    """One `qtrain train` of the quickstart; with `busy`, beside one competing busy-loop process."""
    env_extra, policy_overrides = POLICIES[policy]
    env = os.environ | env_extra
    competitor = subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) if busy else None
    try:
        with tempfile.TemporaryDirectory(prefix="qtrain-busy-") as out:
            argv = [sys.executable, "-m", "qtrain.cli", "train", str(QUICKSTART), *overrides, *policy_overrides,
                    "log.tensorboard=false", "log.plot=false", f"output_dir={out}"]  # fmt: skip
            t0 = time.perf_counter()
            # cwd: not the repository root, whose kernels/ folder must not be importable as `kernels`
            proc = subprocess.run(argv, cwd=out, env=env, capture_output=True, text=True, timeout=timeout, check=False)
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                raise RuntimeError(f"{policy} (busy={busy}) failed with {proc.returncode}: {proc.stderr[-2000:]}")
            result = json.loads((Path(out) / "result.json").read_text())
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()
    return {"wall_seconds": wall, "train_seconds": result["train_seconds"], "loss_last": result["loss_last"],
            "exact_match_after": result.get("exact_match_after")}  # fmt: skip


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [
        f"# The quickstart idle and beside one busy process ({meta['date'][:10]}, commit {_common().describe_commit(meta)})",
        "",
        f"{meta['cpu']}, {meta['cores']} cores; overrides: {' '.join(meta['overrides']) or 'none'}.",
        "",
        "| policy | idle wall s | busy wall s | busy / idle | idle train s | busy train s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in result["policies"].items():
        idle, busy = r["idle"], r["busy"]
        lines.append(f"| {name} | {idle['wall_seconds']:.0f} | {busy['wall_seconds']:.0f} | "
                     f"{busy['wall_seconds'] / idle['wall_seconds']:.2f}x | {idle['train_seconds']:.0f} | {busy['train_seconds']:.0f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policies", nargs="+", choices=sorted(POLICIES), default=DEFAULT_POLICIES, help="default: qtrain torch")
    p.add_argument("--overrides", nargs="*", default=[], help="quickstart overrides, e.g. train.max_steps=100")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per run before it counts as failed")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    return p.parse_args(argv)


def _common():
    """benchmarks/_common.py, loaded by path (benchmarks/ is no package; the tests load this script by path)."""
    spec = importlib.util.spec_from_file_location("qtrain_benchmarks_common", Path(__file__).with_name("_common.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> int:
    args = parse_args(argv)
    common = _common()
    meta = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **common.git_state(ROOT),
            "cpu": common.cpu_name(), "cores": os.cpu_count(), "overrides": args.overrides}  # fmt: skip
    result = {"meta": meta, "policies": {}}
    for policy in args.policies:
        row = {}
        for busy in (False, True):
            row["busy" if busy else "idle"] = run_quickstart(policy, busy, args.overrides, args.timeout)
            print(f"{policy:>10} {'busy' if busy else 'idle'}: {row['busy' if busy else 'idle']['wall_seconds']:.1f} s", flush=True)
        result["policies"][policy] = row
    paths = common.write_results(result, args.out, "busy", markdown(result))
    print(markdown(result) + f"\nresults: {paths[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
