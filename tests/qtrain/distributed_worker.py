"""One rank of a test's process group: `python distributed_worker.py SPEC_JSON`, launched by
tests/qtrain/test_distributed.py with the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT). Runs `qtrain.train.train` on the config the spec names and writes what
the test compares to spec["report"] (per rank): the result, or the error that stopped the rank.

spec: {"config": yaml, "overrides": [...], "report": dir, "fail": {"rank": r, "call": n, "kind": "nan"|"error"}}
The failure is injected into `qtrain.train.loss_sum` on one rank: its n-th forward returns NaN or raises.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch


def inject(fail: dict, rank: int) -> None:
    """Make this rank's `fail["call"]`-th loss NaN or an exception (the other ranks run normally)."""
    import qtrain.train as recipe

    if fail.get("rank") != rank:
        return
    real, calls = recipe.loss_sum, [0]

    def loss_sum(*args, **kwargs):
        calls[0] += 1
        loss = real(*args, **kwargs)
        if calls[0] == fail["call"]:
            if fail["kind"] == "error":
                raise RuntimeError("injected failure")
            return loss * float("nan")
        return loss

    recipe.loss_sum = loss_sum


def main() -> int:
    torch.set_num_threads(1)
    spec = json.loads(sys.argv[1])
    rank = int(os.environ.get("RANK", "0"))
    from qtrain.config import load_config
    from qtrain.train import Interrupted, train

    inject(spec.get("fail", {}), rank)
    cfg = load_config(Path(spec["config"]), spec["overrides"])
    report = Path(spec["report"]) / f"rank{rank}.json"
    try:
        result = train(cfg)
        out, code = {"result": result}, 0
    except Interrupted as e:
        out, code = {"interrupted": e.step}, 130
    except Exception as e:  # noqa: BLE001 - the test reads which error stopped each rank
        out, code = {"error": f"{type(e).__name__}: {e}"}, 1
    report.write_text(json.dumps(out, default=str))
    return code


if __name__ == "__main__":
    sys.exit(main())
