"""The one executor: streams a plan's operations into its format's sink, for every job that writes.

Order of writes, so that an interrupted run never looks complete: config and extra files, then each
output file (temporary name, fsync, rename, recorded in `.m1-progress.json`), then what the sink lists
them in (the index), then `m1-manifest.json` (sha256 and size of every file, hashed as the bytes passed).
`--resume` re-checks each finished file's size and sha256 before trusting it.

Files are written in this process (file i is fsynced and renamed on a thread while file i+1 is written)
or by `--workers` processes that each write whole files; workers die with the main process, and
SIGINT/SIGTERM stop the whole job and remove its temporary files.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from m1 import __version__
from m1.checkpoint import Checkpoint
from m1.errors import DestinationError, M1Error, UsageError
from m1.manifest import (
    finished_files,
    guard_source,
    manifest_name,
    prepare_destination,
    prepare_files,
    progress_name,
)
from m1.ops import OpRunner, Timing
from m1.plan import OutputFile, Plan
from m1.sinks import Sink, get_sink
from m1.streaming import PendingShard, file_sha256, write_bytes_atomic, write_json_atomic

REPORT_EVERY = 16 << 20  # a worker reports progress in steps of this many bytes


@dataclass(frozen=True)
class RunOptions:
    resume: bool = False
    overwrite: bool = False
    workers: int = 1
    threads: int | None = None  # torch threads per worker (default: CPUs / workers)
    device: str = "cpu"
    show_progress: bool = True
    label: str = "write"


@dataclass
class RunResult:
    manifest: dict[str, Any]
    written: list[str]  # files written by this run (not those a --resume found finished)
    seconds: float
    workers: int
    threads: int
    timing: Timing = field(default_factory=Timing)


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def execute(plan: Plan, dest: Path, ckpt: Checkpoint, opts: RunOptions = RunOptions()) -> RunResult:
    """Write `plan` into `dest`, reading from `ckpt`."""
    if opts.workers < 1:
        raise UsageError(f"--workers must be at least 1, got {opts.workers}")
    if opts.threads is not None and opts.threads < 1:
        raise UsageError(f"--threads must be at least 1, got {opts.threads}")
    threads = opts.threads or max(1, available_cpus() // opts.workers)
    sink = get_sink(plan.sink)
    sink.check(plan)
    stem = plan.stem if plan.stem is not None and dest.suffix == ".gguf" else None
    if stem is not None:  # a file set (a GGUF) in a folder that may hold other things
        folder = dest.parent
        if not ckpt.remote and any(dest.resolve() == (Path(ckpt.root) / f).resolve() for f in ckpt.files()):
            raise DestinationError("the destination is a file of the source", file=str(dest),
                                   hint="write to another file")
        lock = prepare_files(folder, [f.name for f in plan.files], stem, opts.resume, opts.overwrite)
    else:
        folder = dest
        if not ckpt.remote:
            guard_source(dest, [Path(ckpt.root)])
        lock = prepare_destination(dest, opts.resume, opts.overwrite)
    try:
        with _terminate_as_interrupt():
            return _run(plan, folder, ckpt, sink, opts, threads, stem)
    finally:
        lock.release()


def _run(plan: Plan, dest: Path, ckpt: Checkpoint, sink: Sink, opts: RunOptions, threads: int,
         stem: str | None) -> RunResult:
    from m1.progress import byte_progress

    fingerprint = plan.fingerprint()
    done = _verified(dest, finished_files(dest, fingerprint, stem)) if opts.resume else {}
    if plan.writes_config:
        write_json_atomic(dest / "config.json", plan.config)
        for name in plan.extra_files:
            write_bytes_atomic(dest / name, ckpt.storage.local_path(name).read_bytes())
    records = {f.name: done[f.name] for f in plan.files if f.name in done}
    todo = [f for f in plan.files if f.name not in done]
    last: list[OutputFile] = []
    if sink.first_last and todo and todo[0] is plan.files[0] and len(plan.files) > 1:
        last, todo = todo[:1], todo[1:]

    def record(name: str, rec: dict[str, Any]) -> None:
        records[name] = rec
        write_json_atomic(dest / progress_name(stem), {"fingerprint": fingerprint, "shards": records})

    timing = Timing()
    started = time.perf_counter()
    ctx = _Context(plan, ckpt, str(dest), opts.device, threads)
    parallel = opts.workers > 1 and len(todo) > 1
    pool = _WorkerPool(ctx, min(opts.workers, len(todo))) if parallel else None
    if pool is not None:
        pool.start(todo)  # before the progress bar's thread exists: fork copies only this thread
    try:
        with byte_progress(plan.total_bytes, opts.label, opts.show_progress) as advance:
            advance(sum(f.nbytes for f in plan.files if f.name in done))
            if pool is not None:
                for result in pool.results(advance):
                    record(result["file"], result["record"])
                    timing.add(result["timing"])
            with _torch_threads(threads, plan):
                _write_here(ctx, sink, ([] if pool is not None else todo) + last, record, advance, timing)
    except BaseException:
        if pool is not None:
            pool.kill()
        for f in todo + last:  # a killed worker leaves its temporary file behind
            (dest / f".{f.name}.tmp").unlink(missing_ok=True)
        raise
    finally:
        if pool is not None:
            pool.close()
    seconds = time.perf_counter() - started

    todo += last
    small = sink.finish(dest, plan)
    manifest = {
        "m1_manifest_version": 1,
        "tool": f"m1 {__version__}",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "job": plan.job,
        "fingerprint": fingerprint,
        "plan": [{"file": f.name, "tensors": [t.name for t in f.tensors]} for f in plan.files],
        "shards": {f.name: {"sha256": records[f.name]["sha256"], "size": records[f.name]["size"]}
                   for f in plan.files},
        "files": {name: file_sha256(dest / name).hexdigest()
                  for name in [*(["config.json", *plan.extra_files] if plan.writes_config else []), *small]},
    }
    write_json_atomic(dest / manifest_name(stem), manifest)
    (dest / progress_name(stem)).unlink(missing_ok=True)
    return RunResult(manifest, [f.name for f in todo], seconds, pool.size if pool else (1 if todo else 0), threads,
                     timing)


def _verified(dest: Path, done: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The finished files whose size and sha256 still match their record (anything else is written again)."""
    ok = {}
    for name, rec in done.items():
        path = dest / name
        if not isinstance(rec, dict) or not path.is_file() or path.stat().st_size != rec.get("size"):
            continue
        if file_sha256(path).hexdigest() == rec.get("sha256"):
            ok[name] = rec
    return ok


# ---- writing files --------------------------------------------------------------------------------------


@dataclass
class _Context:
    plan: Plan
    ckpt: Checkpoint
    dest: str
    device: str
    threads: int


def _write_unsynced(ctx: _Context, sink: Sink, file: OutputFile, on_bytes: Callable[[int], None],
                    timing: Timing) -> tuple[PendingShard, dict[str, Any]]:
    started, cpu = time.perf_counter(), time.process_time()
    own = Timing()
    runner = OpRunner(ctx.ckpt, file, ctx.plan.scheme, ctx.device, own)
    try:
        sha, size, pending = sink.write_file(Path(ctx.dest) / file.name, file, runner, on_bytes, ctx.plan)
    finally:
        runner.close()
    seconds = time.perf_counter() - started
    own.write_s = max(0.0, seconds - own.read_s - own.quantize_s)
    own.cpu_s = time.process_time() - cpu
    timing.add(asdict(own))
    return pending, {"sha256": sha, "size": size, "seconds": round(seconds, 3)}


def _write_here(ctx: _Context, sink: Sink, todo: list[OutputFile], record: Callable[[str, dict[str, Any]], None],
                advance: Callable[[int], None], timing: Timing) -> None:
    """In this process; file i is committed (fsync, rename) on a thread while file i+1 is written."""

    def commit(pending: PendingShard, name: str, rec: dict[str, Any]) -> None:
        pending.commit()
        record(name, rec)  # progress only after the rename

    with ThreadPoolExecutor(max_workers=1) as committer:
        in_flight: Future | None = None
        try:
            for file in todo:
                pending, rec = _write_unsynced(ctx, sink, file, advance, timing)
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


_WORKER: dict[str, Any] = {}  # a worker process's context and progress queue


def _init_worker(ctx: _Context, queue: Any) -> None:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process stops the job; workers just die with it
    if "torch" in sys.modules or ctx.plan.scheme is not None:
        import torch

        torch.set_num_threads(ctx.threads)  # one core a worker: two workers must not fight over two cores
    _WORKER.update(ctx=ctx, queue=queue)


def _die_with_parent() -> None:
    """Linux: SIGKILL this worker when the process that started it dies (kill -9 included)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


def _write_in_worker(file: OutputFile) -> dict[str, Any]:
    ctx: _Context = _WORKER["ctx"]
    queue = _WORKER["queue"]
    pending_bytes = [0]

    def on_bytes(n: int) -> None:
        pending_bytes[0] += n
        if pending_bytes[0] >= REPORT_EVERY:
            queue.put(pending_bytes[0])
            pending_bytes[0] = 0

    timing = Timing()
    pending, rec = _write_unsynced(ctx, get_sink(ctx.plan.sink), file, on_bytes, timing)
    pending.commit()
    queue.put(pending_bytes[0])
    return {"file": file.name, "record": rec, "timing": asdict(timing)}


class _WorkerPool:
    """Worker processes that each write whole files; results come back as files finish."""

    def __init__(self, ctx: _Context, size: int) -> None:
        self.ctx = ctx
        self.size = size
        self.pool: ProcessPoolExecutor | None = None
        self.queue: Any = None
        self.futures: list[Future] = []

    def start(self, todo: list[OutputFile]) -> None:
        # fork is fast and safe when each child runs one thread (GNU OpenMP hangs in a forked child that
        # starts a thread team); otherwise, and for CUDA, a fresh interpreter per worker.
        method = "fork" if (self.ctx.threads == 1 and self.ctx.device == "cpu"
                            and "fork" in multiprocessing.get_all_start_methods()) else "spawn"
        mp = multiprocessing.get_context(method)
        self.queue = mp.Queue()
        self.pool = ProcessPoolExecutor(self.size, mp_context=mp, initializer=_init_worker,
                                        initargs=(self.ctx, self.queue))
        self.futures = [self.pool.submit(_write_in_worker, f) for f in todo]

    def results(self, advance: Callable[[int], None]) -> Iterator[dict[str, Any]]:
        pending = set(self.futures)
        error: BaseException | None = None
        while pending:
            done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            self._drain(advance)
            for future in done:
                if future.cancelled():
                    continue
                exc = future.exception()
                if exc is None:
                    yield future.result()
                elif error is None:
                    error = exc
                    for other in pending:  # files already being written finish and are recorded
                        other.cancel()
        self._drain(advance)
        if isinstance(error, BrokenProcessPool):
            raise M1Error("a worker process died (out of memory?)",
                          hint="run again with fewer --workers and --resume") from None
        if error is not None:
            raise error

    def _drain(self, advance: Callable[[int], None]) -> None:
        import queue as queue_module

        while True:
            try:
                advance(self.queue.get_nowait())
            except queue_module.Empty:
                return

    def kill(self) -> None:
        """Stop every worker now (an interrupt, or an error in this process)."""
        for child in multiprocessing.active_children():
            child.kill()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


@contextmanager
def _torch_threads(n: int, plan: Plan) -> Iterator[None]:
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
