"""One run of a job that writes, start to end: `execute(plan, dest, ckpt, opts)` streams a plan's operations
into its format's sink.

1. Check the options, join the job's processes (m1.run.ranks: alone, or a rank of a torchrun job) and
   place its files (m1.run.destination).
2. Begin: rank 0 locks and prepares the destination and begins the journal (m1.run.journal), which says
   what a --resume finds finished; every rank learns what is left.
3. Share: the files left are split over the ranks; with `--scratch` (a Hub source) they are written in
   the order that holds fewest source shards at once (m1.scratch), never more than the bound on disk.
4. Write: in this process (m1.run.write) or by `--workers` processes (m1.run.pool), each file recorded in
   the journal once committed. SIGINT/SIGTERM stop the whole job and remove its temporary files.
5. Finish: once every rank is done, rank 0 writes the file that marks the set whole, if the sink has
   one, and the journal's end: the index and the manifest.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from m1.checkpoint import Checkpoint
from m1.errors import UsageError
from m1.ops import Timing
from m1.plan import OutputFile, Plan
from m1.run.destination import Destination
from m1.run.journal import Journal
from m1.run.pool import WorkerPool
from m1.run.ranks import Crew, join
from m1.run.write import Advance, Tally, WriteContext, torch_threads, write_here
from m1.sinks import get_sink
from m1.source_check import SourceCheck, source_records

if TYPE_CHECKING:
    from m1.scratch import Scratch, ScratchPlan


@dataclass(frozen=True)
class RunOptions:
    resume: bool = False
    overwrite: bool = False
    workers: int = 1
    threads: int | None = None  # torch threads per worker (default: CPUs / workers, and / ranks on the node)
    device: str = "cpu"  # a --device value: cpu, cuda, cuda:N or a set such as cuda:0,cuda:3 (m1.devices)
    show_progress: bool = True
    label: str = "write"
    scratch: int | None = None  # --scratch: stream a Hub source through at most this many bytes of disk
    inputs: tuple[Path, ...] = ()  # files the job reads besides the checkpoint (an imatrix, a recipe)


@dataclass
class RunResult:
    manifest: dict[str, Any]
    written: list[str]  # files written by this process (not those a --resume found finished, nor other ranks')
    seconds: float
    workers: int
    threads: int
    timing: Timing = field(default_factory=Timing)
    devices: dict[str, dict[str, Any]] = field(default_factory=dict)  # per device: files, bytes, seconds, bytes/s
    rank: int = 0
    world: int = 1
    scratch: dict[str, Any] | None = None  # with --scratch: the bound, the planned and held peak, the downloads
    writer_devices: list[str] = field(default_factory=list)  # the device each writing process took


def execute(plan: Plan, dest: Path, ckpt: Checkpoint, opts: RunOptions = RunOptions()) -> RunResult:
    """Write `plan` into `dest`, reading from `ckpt` (under torchrun: this rank's share of it)."""
    run = _Run(plan, dest, ckpt, opts)
    with ExitStack() as held, _terminate_as_interrupt():  # `held`: the destination's lock, on rank 0
        todo = run.begin(held)
        result = run.write(*run.last_apart(todo))
        # every rank returns once the manifest exists
        result.manifest = run.crew.from_main(lambda: run.journal.finish(plan, run.sink))
        return result


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class _Run:
    """The parts of one run, made and checked before anything is touched."""

    def __init__(self, plan: Plan, dest: Path, ckpt: Checkpoint, opts: RunOptions) -> None:
        from m1.devices import device_set

        if opts.workers < 1:
            raise UsageError(f"--workers must be at least 1, got {opts.workers}")
        if opts.threads is not None and opts.threads < 1:
            raise UsageError(f"--threads must be at least 1, got {opts.threads}")
        if opts.scratch is not None and opts.workers > 1:
            raise UsageError("--scratch streams the source through one writer per process",
                             hint="use --workers 1 (under torchrun every rank streams its own share)")
        named = device_set(opts.device)
        self.plan, self.ckpt, self.opts = plan, ckpt, opts
        self.crew: Crew = join()
        per_node = opts.workers * self.crew.local_world  # writers sharing this node's CPUs
        self.threads = opts.threads or max(1, available_cpus() // per_node)
        self.sink = get_sink(plan.sink)
        self.sink.check(plan)
        self.place = Destination.of(plan, dest)
        if opts.scratch is not None and not opts.resume:  # refuse a bound that cannot work before touching anything
            self.share(*self.last_apart(list(plan.files)))
        self.sources = None if ckpt.remote else source_records(ckpt, plan)  # sizes checked before anything is written
        self.journal = Journal(self.place, plan.fingerprint(), self.crew.rank if self.crew.ranked else None)
        if not self.crew.ranked and len(named) > opts.workers:  # (under torchrun the other ranks take the rest)
            import warnings

            warnings.warn(f"--device names {len(named)} devices but {opts.workers} worker"
                          f"{'s' if opts.workers != 1 else ''} write: {', '.join(named[opts.workers:])} stay idle "
                          f"(use --workers {len(named)})", stacklevel=3)

    # ---- begin -------------------------------------------------------------------------------------------

    def begin(self, held: ExitStack) -> list[OutputFile]:
        """Rank 0 locks and prepares the destination and begins the journal; every rank learns what is left."""
        plan, opts = self.plan, self.opts

        def on_main() -> dict[str, Any]:
            lock = self.place.prepare(plan, self.ckpt, opts.inputs, opts.resume, opts.overwrite)
            held.callback(lock.release)
            shutil.rmtree(self.place.scratch, ignore_errors=True)  # what a killed run left
            return {"fingerprint": self.journal.fingerprint, "done": self.journal.begin(plan, self.ckpt, opts.resume)}

        begun = self.crew.from_main(on_main)
        if begun["fingerprint"] != self.journal.fingerprint:
            raise UsageError("this rank planned another job than rank 0 (other options, or a source that differs "
                             "between nodes)", hint="run the same command on every rank, over the same source")
        return self.journal.left(plan, begun["done"])

    def last_apart(self, todo: list[OutputFile]) -> tuple[list[OutputFile], list[OutputFile]]:
        """`todo` without the file that marks the set whole (a sink's first file, written after all others),
        and that file, when it is left to write."""
        files = self.plan.files
        if self.sink.first_last and todo and todo[0] is files[0] and len(files) > 1:
            return todo[1:], todo[:1]
        return todo, []

    # ---- share -------------------------------------------------------------------------------------------

    def share(self, todo: list[OutputFile], last: list[OutputFile]) -> tuple[list[OutputFile], ScratchPlan | None]:
        """This process's files in the order it writes them, and with --scratch its streaming schedule.

        Under torchrun the files (in the scratch order when streaming, so each rank reads its own stretch of
        the source) are split into contiguous runs of about equal bytes, one per rank; rank 0 also writes
        `last`. Every rank computes every rank's share, so a bound that does not fit fails them all alike.
        """
        bound, crew = self.opts.scratch, self.crew
        if bound is None:
            return crew.shares(todo)[crew.rank], None
        from m1.scratch import check_fits, ordered, schedule, source_sizes

        sizes = source_sizes(self.ckpt.storage)
        shares = crew.shares(ordered(todo, schedule(todo, sizes)))
        per_rank = bound // crew.local_world  # --scratch is per node
        plans = [schedule(share, sizes, per_rank, last if r == 0 else None) for r, share in enumerate(shares)]
        for p in plans:
            check_fits(p)
        return ordered(shares[crew.rank], plans[crew.rank]), plans[crew.rank]

    # ---- write -------------------------------------------------------------------------------------------

    def write(self, todo: list[OutputFile], last: list[OutputFile]) -> RunResult:
        """This process's share of `todo` (and `last`, on rank 0), each file recorded in the journal; every rank
        learns the others' records. The result's manifest follows once the journal is finished."""
        from m1.devices import writer_devices
        from m1.progress import lane_progress

        plan, opts, crew = self.plan, self.opts, self.crew
        mine, streaming = self.share(todo, last)
        started = time.perf_counter()
        mine_last = last if crew.main else []
        # alone, the set's last file follows the others; under torchrun rank 0 writes it once every rank is done
        in_line, after_all = ([], mine_last) if crew.ranked else (last, [])
        parallel = opts.workers > 1 and len(mine) > 1
        writers = writer_devices(opts.device, min(opts.workers, len(mine)) if parallel else 1,
                                 crew.local_rank * opts.workers)
        ctx = WriteContext(plan, self.ckpt, str(self.place.folder), writers[0], self.threads, self.sources)
        pool = WorkerPool(ctx, writers, fork_ok=not crew.ranked) if parallel else None
        here = ([] if pool is not None else mine) + in_line
        lanes = sorted(set(writers)) if len(set(writers)) > 1 else []
        total = sum(f.nbytes for f in mine + mine_last) if crew.ranked else plan.total_bytes
        tally = Tally()
        # without workers this process writes all its files: it hashes the source files they own from the first read
        with self._checking_sources([*mine, *mine_last] if pool is None else []), \
                self._streaming(streaming) as scratch:
            if pool is not None:
                pool.start(mine)  # before the progress bar's thread exists: fork copies only this thread
            with lane_progress(total, opts.label, lanes, opts.show_progress and crew.main) as advance:
                if not crew.ranked:
                    advance(sum(f.nbytes for f in plan.files if f.name in self.journal.records), None)
                error = self._write_share(ctx, pool, here, [*mine, *mine_last], advance, tally, scratch)
                for records in crew.settle(error, self.journal.own):  # the other ranks hear of an error here
                    self.journal.add(records)
                if after_all:  # the file that marks the set whole, once all the others exist
                    crew.on_main(lambda: self._write_last(ctx, after_all, advance, tally, scratch))
        report = scratch.report() if scratch is not None else None
        own = list(self.journal.own)
        return RunResult({}, own, time.perf_counter() - started, pool.size if pool else (1 if own else 0),
                         self.threads, tally.timing, tally.per_device(), crew.rank, crew.world, report,
                         pool.writer_devices() if pool is not None else [ctx.device])

    def _write_share(self, ctx: WriteContext, pool: WorkerPool | None, here: list[OutputFile],
                     files: list[OutputFile], advance: Advance, tally: Tally,
                     scratch: Scratch | None) -> Exception | None:
        """The workers' files as they finish, then those written here. An error stops the workers and drops
        the temporary files of `files`; it is returned (for the crew to settle), an interrupt raised."""
        try:
            if pool is not None:
                for result in pool.results(advance):
                    self.journal.record(result["file"], result["record"])
                    tally.timing.add(result["timing"])
                    tally.count(result["device"], result["record"])
            with torch_threads(self.threads, self.plan):
                write_here(ctx, self.sink, here, self.journal.record, advance, tally, scratch)
        except Exception as exc:
            self._discard(files, pool)
            return exc
        except BaseException:
            self._discard(files, pool)
            raise
        finally:
            if pool is not None:
                pool.close()
        return None

    def _write_last(self, ctx: WriteContext, files: list[OutputFile], advance: Advance, tally: Tally,
                    scratch: Scratch | None) -> None:
        try:
            with torch_threads(self.threads, self.plan):
                write_here(ctx, self.sink, files, self.journal.record, advance, tally, scratch)
        except BaseException:
            self._discard(files, None)
            raise

    def _discard(self, files: list[OutputFile], pool: WorkerPool | None) -> None:
        """After an error or an interrupt: stop the workers, drop this process's temporary files."""
        if pool is not None:
            pool.kill()
        for f in files:  # a killed worker leaves its temporary file behind
            self.place.temporary(f.name).unlink(missing_ok=True)
        folder = self.place.folder
        if not self.crew.ranked and not self.journal.records and not any(
                (folder / f.name).exists() for f in self.plan.files):
            self.place.progress.unlink(missing_ok=True)  # nothing finished: no run to resume, nothing left behind

    @contextmanager
    def _checking_sources(self, files: list[OutputFile]) -> Iterator[None]:
        """An m1-made source's files are hashed as they are read, those `files` own from here (a worker hashes
        those of its own files) and checked against their manifest before an output is committed."""
        if self.sources is None:
            yield
            return
        names = {f.name for f in files}
        check = SourceCheck(self.sources, {s for s, o in self.sources.owner.items() if o in names})
        self.ckpt.source_check = check
        try:
            yield
        finally:
            check.close()
            self.ckpt.source_check = None

    def _streaming(self, plan: ScratchPlan | None) -> AbstractContextManager[Scratch | None]:
        """With --scratch: the source's shards streamed through the destination's scratch folder (each rank its
        own part of it)."""
        if plan is None:
            return nullcontext()
        from m1.scratch import streaming

        root = self.place.scratch
        return streaming(self.ckpt.storage, plan, root / f"rank{self.crew.rank}" if self.crew.ranked else root, root)


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM stops the job as Ctrl-C does: workers killed, temporary files removed, exit 130."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
