"""Writing output files, one at a time, in this process or in a worker (m1.run.pool).

A file is written under a temporary name by its sink, fed by an op runner (and, streaming from the Hub,
through the scratch area's step tracker); the source files it owns are checked against their manifest
before it may be committed. In this process file i is committed (fsync, rename) on a thread while file
i+1 is written.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from m1.atomic_io import PendingShard
from m1.checkpoint import Checkpoint
from m1.ops import OpRunner, Timing
from m1.plan import OutputFile, Plan
from m1.sinks import Sink
from m1.source_check import SourceRecords

if TYPE_CHECKING:
    from m1.scratch import Scratch

Record = dict[str, Any]  # one written file: {"sha256", "size", "seconds"}
Advance = Callable[[int, str | None], None]  # (bytes, device lane) -> the progress bar moves


@dataclass
class WriteContext:
    """What a writing process needs to write any file of the plan (a worker gets a copy)."""

    plan: Plan
    ckpt: Checkpoint
    dest: str
    device: str
    threads: int
    sources: SourceRecords | None = None  # an m1-made source: what its files must hash to (m1.source_check)


@dataclass
class Tally:
    """What this process's writers took: time by stage, and per device the files, bytes and seconds."""

    timing: Timing = field(default_factory=Timing)
    devices: dict[str, dict[str, Any]] = field(default_factory=dict)

    def count(self, device: str, rec: Record) -> None:
        stats = self.devices.setdefault(device, {"files": 0, "bytes": 0, "seconds": 0.0})
        stats["files"] += 1
        stats["bytes"] += rec["size"]
        stats["seconds"] += rec["seconds"]

    def per_device(self) -> dict[str, dict[str, Any]]:
        for stats in self.devices.values():
            stats["bytes_per_s"] = round(stats["bytes"] / stats["seconds"]) if stats["seconds"] > 0 else None
            stats["seconds"] = round(stats["seconds"], 3)
        return self.devices


def write_unsynced(ctx: WriteContext, sink: Sink, file: OutputFile, on_bytes: Callable[[int], None],
                   timing: Timing, scratch: Scratch | None = None) -> tuple[PendingShard, Record]:
    """`file` written under its temporary name, not yet committed, and its record; its time added to `timing`."""
    started, cpu = time.perf_counter(), time.process_time()
    own = Timing()
    runner = OpRunner(ctx.ckpt, file, ctx.plan.scheme, ctx.device, own, ctx.plan.schemes)
    produce: Callable[[str], Any] = runner
    tracker = None
    if scratch is not None:
        from m1.scratch import StepTracker

        produce = tracker = StepTracker(runner, file, scratch)
    check = ctx.ckpt.source_check
    if check is not None:
        check.begin(file.name)
    try:
        sha, size, pending = sink.write_file(Path(ctx.dest) / file.name, file, produce, on_bytes, ctx.plan)
    except BaseException:
        if scratch is not None:
            scratch.abort()  # a read-ahead waiting for a shard must not keep runner.close() waiting
        raise
    finally:
        runner.close()
    if check is not None:
        try:
            check.complete(file.name)  # the source files this file owns match their manifest, or it is dropped
        except BaseException:
            pending.discard()
            raise
    if tracker is not None:
        tracker.finish()  # the file's bytes are all in its temporary file: its last shards may go
    seconds = time.perf_counter() - started
    own.write_s = max(0.0, seconds - own.read_s - own.quantize_s)
    own.cpu_s = time.process_time() - cpu
    timing.add(asdict(own))
    return pending, {"sha256": sha, "size": size, "seconds": round(seconds, 3)}


def write_here(ctx: WriteContext, sink: Sink, todo: list[OutputFile], record: Callable[[str, Record], None],
               advance: Advance, tally: Tally, scratch: Scratch | None = None) -> None:
    """`todo` in this process; file i is committed (fsync, rename) on a thread while file i+1 is written."""

    def commit(pending: PendingShard, name: str, rec: Record) -> None:
        pending.commit()
        record(name, rec)  # progress only after the rename
        tally.count(ctx.device, rec)

    def on_bytes(n: int) -> None:
        advance(n, ctx.device)

    with ThreadPoolExecutor(max_workers=1) as committer:
        in_flight: Future | None = None
        try:
            for file in todo:
                pending, rec = write_unsynced(ctx, sink, file, on_bytes, tally.timing, scratch)
                if in_flight is not None:
                    try:
                        in_flight.result()  # at most one file waits for the disk
                    except BaseException:
                        pending.discard()
                        raise
                in_flight = committer.submit(commit, pending, file.name, rec)
            if in_flight is not None:
                in_flight.result()
        except BaseException:
            if in_flight is not None:  # let the file being committed finish (or fail) before leaving
                try:
                    in_flight.result()
                except BaseException:
                    pass
            raise


@contextmanager
def torch_threads(n: int, plan: Plan) -> Iterator[None]:
    """torch's intra-op threads set to `n` for the block (nothing to set when the job never needs torch)."""
    if plan.scheme is None and "torch" not in sys.modules:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
