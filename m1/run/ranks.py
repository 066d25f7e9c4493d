"""The processes one job runs in: this one alone (`Crew`), or the ranks of a torchrun job (`Ranked`).

Under torchrun (RANK, WORLD_SIZE set; m1.distributed) the same steps run on every rank: rank 0 locks and
prepares the destination and decides what is left to write, the output files are split over the ranks in
contiguous runs of about equal bytes, each rank writes its own, and once every rank is done rank 0 writes
what marks the set whole, the index and the manifest. A rank that fails or dies fails the job: an error
travels to the other ranks at the next point where they wait for each other, as its one line.

The lifecycle (m1.run.lifecycle) asks its crew at those points.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from m1.distributed import RankFailed, Ranks, current, split
from m1.errors import DestinationError, M1Error, UsageError
from m1.plan import OutputFile

T = TypeVar("T")
Records = dict[str, dict[str, Any]]


class Crew:
    """The job's processes as this one sees them. This base is a job run by this process alone (with its
    --workers, if any): each step is just the step."""

    ranked = False
    rank = 0
    world = 1
    local_rank = 0
    local_world = 1  # the writing processes on this node, per --workers
    main = True

    def from_main(self, step: Callable[[], T]) -> T:
        """`step`, run by rank 0; every rank gets its result, or fails with its error."""
        return step()

    def on_main(self, step: Callable[[], None]) -> None:
        """`step`, run by rank 0 alone; its error fails the others at their next `from_main`."""
        step()

    def shares(self, files: list[OutputFile]) -> list[list[OutputFile]]:
        """`files`, one contiguous run per rank."""
        return [files]

    def settle(self, error: Exception | None, own: Records) -> list[Records]:
        """Once this process has written its share: the records of the other ranks' shares, or, when this rank
        or another failed, that error."""
        if error is not None:
            raise error
        return []


class Ranked(Crew):
    """One rank of a torchrun job of more than one."""

    ranked = True

    def __init__(self, ranks: Ranks) -> None:
        self.ranks = ranks
        self.rank, self.world = ranks.rank, ranks.world
        self.local_rank, self.local_world = ranks.local_rank, ranks.local_world
        self.main = ranks.main

    def from_main(self, step: Callable[[], T]) -> T:
        if self.main:
            value = self._told(step)
            self.ranks.broadcast({"value": value})
            return value
        message = self.ranks.broadcast()
        if "error" in message:
            raise from_rank(message["error"], 0)
        return message["value"]

    def on_main(self, step: Callable[[], None]) -> None:
        if self.main:
            self._told(step)

    def _told(self, step: Callable[[], T]) -> T:
        try:
            return step()
        except Exception as exc:  # the other ranks wait for rank 0's next word: it is this error
            self.ranks.broadcast({"error": portable(exc)})
            raise

    def shares(self, files: list[OutputFile]) -> list[list[OutputFile]]:
        return [files[a:b] for a, b in split([f.nbytes for f in files], self.world)]

    def settle(self, error: Exception | None, own: Records) -> list[Records]:
        outcomes = self.ranks.gather({"rank": self.rank, "error": None if error is None else portable(error),
                                      "records": own})
        if error is not None:
            raise error
        failed = [o for o in outcomes if o["error"] is not None]
        if failed:
            raise from_rank(failed[0]["error"], failed[0]["rank"])
        return [o["records"] for o in outcomes]


def join() -> Crew:
    """This process's crew: a rank of the torchrun job it was started in (its process group started here),
    or alone outside torchrun and in a world of one."""
    ranks = current()
    return Crew() if ranks is None else Ranked(ranks)


def portable(exc: BaseException) -> M1Error:
    """An error another rank can unpickle and show as its one line."""
    if isinstance(exc, M1Error):
        return exc
    return M1Error(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}")


def from_rank(exc: M1Error, rank: int) -> M1Error:
    if isinstance(exc, UsageError | DestinationError):  # the same for every rank: say it as it is
        return exc
    return RankFailed(f"rank {rank} failed: {exc.one_line()}",
                      hint="finished files are kept: fix that, then run the same command with --resume")
