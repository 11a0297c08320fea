"""The distributed plumbing: which process this is, the process group, and the few collectives the
recipe needs. One process (no RANK/WORLD_SIZE in the environment) is `World()`: every helper is then
a no-op that returns its input, so single-process training runs exactly the code it always ran.

torchrun and `accelerate launch` both set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT;
`world_from_env` reads them, `init_world` joins the group (gloo on CPU, nccl on CUDA). The strategy
(`resolve_strategy`) says how the model spreads over the ranks: "ddp" replicates it and all-reduces
the trainable parameters' gradients; "fsdp" shards the NF4 base (`qtrain.fsdp`).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

STRATEGIES = ("auto", "ddp", "fsdp")


@dataclass(frozen=True)
class World:
    """This process's place among the ranks (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the run's files and prints; the others only compute."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


ONE_PROCESS = World()  # the default of every function that takes a world: single-process training


def world_from_env(env: Mapping[str, str] | None = None) -> World:
    """The torchrun / accelerate environment; a variable that is not an integer fails with its name."""
    env = os.environ if env is None else env
    values = {}
    for key, default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", None)):
        text = env.get(key, default if default is not None else env.get("RANK", "0"))
        try:
            values[key] = int(text)
        except ValueError:
            raise ValueError(f"environment variable {key}={text!r} is not an integer; launch with torchrun or accelerate launch") from None
    world = World(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"])
    if not 0 <= world.rank < world.size:
        raise ValueError(f"RANK={world.rank} is outside WORLD_SIZE={world.size}; launch with torchrun or accelerate launch")
    return world


def init_world(world: World, device_type: str, timeout_s: float) -> bool:
    """Join the process group (gloo on CPU, nccl on CUDA) unless one process or already joined; True
    when this call joined it (and its caller leaves it). `timeout_s` bounds every collective: a rank
    that died never leaves the others waiting forever."""
    if not world.distributed or dist.is_initialized():
        return False
    for key in ("MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise ValueError(f"WORLD_SIZE={world.size} but {key} is unset; launch with torchrun or accelerate launch")
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=world.rank, world_size=world.size, timeout=datetime.timedelta(seconds=timeout_s))
    return True


def teardown(world: World) -> None:
    """Leave the process group (after a failure too: the other ranks then see the connection close)."""
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def peer_failures(world: World):
    """A collective that fails because another rank stopped (it closed its connection, or never came
    back within distributed.timeout_s) → one line saying so: that rank's own error is the cause."""
    try:
        yield
    except RuntimeError as e:
        text = str(e)
        gone = isinstance(e, dist.DistError) or any(s in text for s in ("closed by peer", "Connection reset", "timed out", "Timeout"))
        if not world.distributed or not gone:
            raise
        raise RuntimeError(f"rank {world.rank}: another rank stopped (its own error says why); this rank stopped too ({text.splitlines()[0][:200]})") from None


def device_for(world: World, device: torch.device) -> torch.device:
    """Each rank its own GPU (cuda:LOCAL_RANK); CPU ranks share the CPU."""
    if device.type == "cuda" and world.distributed:
        torch.cuda.set_device(world.local_rank)
        return torch.device("cuda", world.local_rank)
    return device


def resolve_strategy(strategy: str, world: World, fits_one_card: Callable[[], bool]) -> str:
    """"single" for one process; "ddp" or "fsdp" as configured; "auto": ddp when the estimate says the
    model fits one card (`fits_one_card`, only asked then), else fsdp."""
    if strategy not in STRATEGIES:
        raise ValueError(f"distributed.strategy: {strategy!r}; use one of {', '.join(STRATEGIES)}")
    if not world.distributed:
        return "single"
    if strategy == "auto":
        return "ddp" if fits_one_card() else "fsdp"
    return strategy


# ---- collectives (identity on one process) ----


def _comm_device() -> torch.device:
    """Where collective tensors live: nccl needs CUDA tensors, gloo CPU ones."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(world: World, values: list[float]) -> list[float]:
    """The element-wise sum of `values` over the ranks (float64: token counts stay exact)."""
    if not world.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def any_rank(world: World, flag: bool) -> bool:
    """True on every rank when `flag` is True on any: all ranks stop at the same step."""
    return bool(all_reduce_sum(world, [float(flag)])[0] > 0)


def broadcast(world: World, obj: Any) -> Any:
    """Rank 0's `obj` on every rank (a small Python value: a run id, a path)."""
    if not world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(world: World, obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank (the per-rank RNG states for a checkpoint)."""
    if not world.distributed:
        return [obj]
    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def on_main(world: World, fn: Callable[[], Any]) -> Any:
    """`fn()` on rank 0 only (it writes or checks the run's folder); its result on every rank. When
    it raises, rank 0 re-raises and the others raise the same message (a ValueError stays one): a
    refusal or a full disk on rank 0 stops every rank, none waits for it."""
    if not world.distributed:
        return fn()
    result: tuple[str | None, Any] = (None, None)
    error: Exception | None = None
    if world.is_main:
        try:
            result = (None, fn())
        except Exception as e:  # noqa: BLE001 - any failure is sent to the other ranks, then re-raised
            error, result = e, (type(e).__name__, str(e))
    kind, value = broadcast(world, result)
    if error is not None:
        raise error
    if kind is not None:
        raise (ValueError if kind == "ValueError" else RuntimeError)(value if kind == "ValueError" else f"rank 0: {kind}: {value}")
    return value


@contextlib.contextmanager
def no_sync(module: torch.nn.Module | None, last: bool):
    """Gradients add up locally over the micro-batches before the last of an accumulation and are
    reduced once, on the last backward: DDP's `no_sync` (`module` a DistributedDataParallel), or
    FSDP2's `set_requires_gradient_sync(last)` on every FSDP unit of `module` (off: the unsharded
    gradients accumulate, no reduce-scatter; on again for the last). None: one process."""
    if module is None:
        yield
    elif isinstance(module, torch.nn.parallel.DistributedDataParallel):
        with module.no_sync() if not last else contextlib.nullcontext():
            yield
    else:
        from torch.distributed.fsdp import FSDPModule

        for unit in module.modules():
            if isinstance(unit, FSDPModule):
                unit.set_requires_gradient_sync(last, recurse=False)
        yield


def broadcast_trainable(world: World, params: list[torch.Tensor]) -> None:
    """Rank 0's trainable values on every rank (the frozen NF4 base is loaded, not sent)."""
    if not world.distributed:
        return
    with torch.no_grad():
        for p in params:
            t = p.detach().to(_comm_device())
            dist.broadcast(t, src=0)
            p.copy_(t.to(p.device))
