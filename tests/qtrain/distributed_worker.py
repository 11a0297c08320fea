"""One rank of a test's process group: `python distributed_worker.py SPEC_JSON`, launched by
tests/qtrain/test_distributed.py with the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT). Runs `qtrain.train.train` on the config the spec names and writes what
the test compares to spec["report"] (per rank): the result, or the error that stopped the rank.

spec: {"config": yaml, "runs": [{"name", "overrides"}], "report": dir, "fail": {"run": name, "rank": r, "call": n, "kind": "nan"|"error"}}
The failure is injected into `qtrain.train.loss_sum` on one rank: its n-th forward in that run returns NaN or raises.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import torch

CURRENT = {"run": None}  # the run in progress: the failure is injected into one run only


def inject(fail: dict, rank: int) -> None:
    """Make this rank's `fail["call"]`-th loss of run `fail["run"]` NaN or an exception (the other
    ranks, and the other runs, compute normally)."""
    import qtrain.train as recipe

    if fail.get("rank") != rank:
        return
    real, calls = recipe.loss_sum, [0]

    def loss_sum(*args, **kwargs):
        loss = real(*args, **kwargs)
        if CURRENT["run"] != fail["run"]:
            return loss
        calls[0] += 1
        if calls[0] == fail["call"]:
            if fail["kind"] == "error":
                raise RuntimeError("injected failure")
            return loss * float("nan")
        return loss

    recipe.loss_sum = loss_sum


def main() -> int:
    """Each run of the spec in turn, in one process group (joined once: the imports and the group are
    paid once per launch); the first failure ends the launch and leaves the group, so no rank waits."""
    torch.set_num_threads(1)
    spec = json.loads(sys.argv[1])
    from qtrain.config import load_config
    from qtrain.distributed import init_world, teardown, world_from_env
    from qtrain.train import Interrupted, train

    world = world_from_env()
    inject(spec.get("fail", {}), world.rank)
    init_world(world, "cpu", 60)
    report, code = {}, 0
    try:
        for run in spec["runs"]:
            CURRENT["run"] = run["name"]
            try:
                report[run["name"]] = {"result": train(load_config(Path(spec["config"]), run["overrides"]))}
            except Interrupted as e:
                report[run["name"]], code = {"interrupted": e.step}, 130
            except Exception as e:  # noqa: BLE001 - the test reads which error stopped each rank
                traceback.print_exc()  # into the rank's log, which a failing test shows
                report[run["name"]], code = {"error": f"{type(e).__name__}: {e}"}, 1
                if not isinstance(e, FloatingPointError):  # a NaN stops all ranks together: the group is intact
                    break
    finally:
        teardown(world)
        (Path(spec["report"]) / f"rank{world.rank}.json").write_text(json.dumps(report, default=str))
    return code


if __name__ == "__main__":
    sys.exit(main())
