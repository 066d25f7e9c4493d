"""One job over many processes and nodes under torchrun (RANK, WORLD_SIZE, LOCAL_RANK set).

The executor uses this to split a plan's output files over the ranks; nothing here writes a file.
Control messages (what is left to write, each rank's outcome, the manifest) go over torch.distributed
object collectives on a gloo process group (TCP: a rank that dies closes its connections, so the others
fail at once instead of waiting); a process group the caller already made (nccl, say) is used as it is.

    M1_DIST_BACKEND    the backend m1 initialises (default gloo; e.g. "cpu:gloo,cuda:nccl")
    M1_DIST_TIMEOUT_S  how long a rank waits for the others at a collective (default 4 hours: the
                       fastest rank waits there for the slowest to finish its files)
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from m1.errors import M1Error, UsageError

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 4 * 3600


class RankFailed(M1Error):
    """Another rank of the job failed or died: this one stops too (its finished files are kept)."""


@dataclass(frozen=True)
class Ranks:
    rank: int
    world: int
    local_rank: int
    local_world: int

    @property
    def main(self) -> bool:
        return self.rank == 0

    def broadcast(self, obj: T | None = None) -> T:
        """Rank 0's `obj`, on every rank."""
        import torch.distributed as dist

        box = [obj if self.main else None]
        with _collective("waiting for rank 0"):
            dist.broadcast_object_list(box, src=0)
        return box[0]  # type: ignore[return-value]

    def gather(self, obj: T) -> list[T]:
        """Every rank's `obj`, in rank order, on every rank."""
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        with _collective("waiting for the other ranks"):
            dist.all_gather_object(out, obj)
        return out


class _collective:
    """A collective that fails (a peer died, a timeout) becomes one line saying so."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, exc: BaseException | None, tb: Any) -> bool:
        if exc is not None and isinstance(exc, RuntimeError | OSError) and not isinstance(exc, M1Error):
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise RankFailed(f"another rank of this torchrun job died or stopped answering ({self.what}: {first})",
                             hint="see that rank's error above; finished files are kept: run the same command "
                                  "with --resume (any number of ranks)") from None
        return False


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"{name}={value!r} is not a number (set by torchrun)") from None


def under_torchrun() -> bool:
    return _env_int("WORLD_SIZE") is not None and _env_int("RANK") is not None


def rank_of_env() -> tuple[int, int]:
    """(rank, world) from the environment, without starting anything: (0, 1) outside torchrun."""
    if not under_torchrun():
        return 0, 1
    return _env_int("RANK") or 0, _env_int("WORLD_SIZE") or 1


def is_main_process() -> bool:
    return rank_of_env()[0] == 0


def current() -> Ranks | None:
    """This process's place in a torchrun job with more than one rank (its process group started on first
    call), or None outside torchrun and for a world of one."""
    rank, world = rank_of_env()
    if world <= 1:
        return None
    if not 0 <= rank < world:
        raise UsageError(f"RANK={rank} is not below WORLD_SIZE={world}")
    local_rank = _env_int("LOCAL_RANK") or 0
    local_world = _env_int("LOCAL_WORLD_SIZE") or world
    _init_group(rank, world)
    return Ranks(rank, world, local_rank, local_world)


def _init_group(rank: int, world: int) -> None:
    import torch.distributed as dist

    if not dist.is_available():
        raise UsageError("this torch has no torch.distributed, which torchrun jobs need")
    if dist.is_initialized():
        if dist.get_world_size() != world or dist.get_rank() != rank:
            raise UsageError(f"the process group has rank {dist.get_rank()} of {dist.get_world_size()}, the "
                             f"environment says {rank} of {world}")
        return
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise UsageError(f"RANK and WORLD_SIZE are set but {name} is not", hint="start the job with torchrun")
    backend = os.environ.get("M1_DIST_BACKEND", "gloo")
    timeout = timedelta(seconds=float(os.environ.get("M1_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S)))
    try:
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout)
    except (RuntimeError, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise M1Error(f"cannot join the torchrun job as rank {rank} of {world} ({first})",
                      hint="check MASTER_ADDR/MASTER_PORT and that every node can reach them") from None
    atexit.register(_destroy)


def _destroy() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - leaving anyway
            pass


def split(sizes: list[int], world: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) runs of items, one per rank, of about equal total size.

    Deterministic (the same sizes give the same runs on every rank, in every run) and contiguous, so
    ranks read disjoint stretches of the source. A cut is placed where the running total is nearest to
    k/world of the whole.
    """
    if len(sizes) <= world:  # one item each while they last
        return [(min(r, len(sizes)), min(r + 1, len(sizes))) for r in range(world)]
    total = sum(sizes)
    bounds = [0]
    running = 0
    cuts = iter(range(1, world))
    k = next(cuts, None)
    for i, size in enumerate(sizes):
        while k is not None and total and running + size / 2 > total * k / world:
            bounds.append(i)
            k = next(cuts, None)
        running += size
    while len(bounds) < world:
        bounds.append(len(sizes))
    bounds.append(len(sizes))
    return [(bounds[r], bounds[r + 1]) for r in range(world)]
