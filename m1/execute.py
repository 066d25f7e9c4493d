"""The one executor: streams a plan's operations into its format's sink, for every job that writes.

Order of writes, so that an interrupted run never looks complete: config and extra files, then each
output file (temporary name, fsync, rename, recorded in `.m1-progress.json`), then what the sink lists
them in (the index), then `m1-manifest.json` (sha256 and size of every file, hashed as the bytes passed).
`--resume` re-checks each finished file's size and sha256 before trusting it.

Files are written in this process (file i is fsynced and renamed on a thread while file i+1 is written)
or by `--workers` processes that each write whole files, each on its own device (`--device cuda`: round
robin over the visible GPUs; a set such as `cuda:0,cuda:3`); workers die with the main process, and
SIGINT/SIGTERM stop the whole job and remove its temporary files.

Under torchrun (RANK, WORLD_SIZE set; m1.distributed) the same steps run on every rank: rank 0 locks and
prepares the destination and decides what is left to write, the output files are split over the ranks in
contiguous runs of about equal bytes, each rank writes its own (recorded in its own progress file,
`.m1-progress.rank<r>.json`, which any later `--resume` reads, whatever its world size), and once every
rank is done rank 0 writes the index and the manifest. A rank that fails or dies fails the job.

With `--scratch` (a Hub source; m1.scratch) the files are written in the order that holds fewest source
shards at once, each shard downloaded once into a scratch folder beside the output and deleted after
its last read, never more than the bound on disk.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from m1.atomic_io import PendingShard, file_sha256, write_bytes_atomic, write_json_atomic
from m1.checkpoint import Checkpoint
from m1.errors import DestinationError, M1Error, UsageError
from m1.manifest import (
    CREATED_FORMAT,
    finished_files,
    guard_source,
    manifest_document,
    manifest_name,
    prepare_destination,
    prepare_files,
    progress_name,
)
from m1.ops import OpRunner, Timing
from m1.plan import OutputFile, Plan
from m1.sinks import Sink, get_sink
from m1.source_check import SourceCheck, SourceRecords, source_records
from m1.version import __version__

if TYPE_CHECKING:
    from m1.distributed import Ranks
    from m1.scratch import Scratch, ScratchPlan

REPORT_EVERY = 16 << 20  # a worker reports progress in steps of this many bytes
RANK_PROGRESS = re.compile(r"\.rank(\d+)\.json$")


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


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def execute(plan: Plan, dest: Path, ckpt: Checkpoint, opts: RunOptions = RunOptions()) -> RunResult:
    """Write `plan` into `dest`, reading from `ckpt` (under torchrun: this rank's share of it)."""
    from m1.devices import device_set
    from m1.distributed import current

    if opts.workers < 1:
        raise UsageError(f"--workers must be at least 1, got {opts.workers}")
    if opts.threads is not None and opts.threads < 1:
        raise UsageError(f"--threads must be at least 1, got {opts.threads}")
    if opts.scratch is not None and opts.workers > 1:
        raise UsageError("--scratch streams the source through one writer per process",
                         hint="use --workers 1 (under torchrun every rank streams its own share)")
    device_set(opts.device)
    ranks = current()
    per_node = opts.workers * (ranks.local_world if ranks is not None else 1)  # writers sharing this node's CPUs
    threads = opts.threads or max(1, available_cpus() // per_node)
    sink = get_sink(plan.sink)
    sink.check(plan)
    stem = plan.stem if plan.stem is not None and dest.suffix == ".gguf" else None
    folder = dest.parent if stem is not None else dest
    if opts.scratch is not None and not opts.resume:  # refuse a bound that cannot work before touching anything
        files = list(plan.files)
        last = files[:1] if sink.first_last and len(files) > 1 else []
        _share(files[len(last):], last, ckpt, opts, ranks)
    sources = None if ckpt.remote else source_records(ckpt, plan)  # sizes checked before anything is written
    lock = None
    if ranks is None or ranks.main:  # under torchrun rank 0 locks; the others wait for it in _run
        try:
            lock = _prepare(plan, dest, folder, ckpt, stem, opts)
        except Exception as exc:
            if ranks is not None:
                ranks.broadcast({"error": _portable(exc)})
            raise
    try:
        with _terminate_as_interrupt():
            return _run(plan, folder, ckpt, sink, opts, threads, stem, ranks, sources)
    finally:
        if lock is not None:
            lock.release()


def _prepare(plan: Plan, dest: Path, folder: Path, ckpt: Checkpoint, stem: str | None, opts: RunOptions) -> Any:
    sources = [*ckpt.storage.sources(), *opts.inputs]
    if stem is not None:  # a file set (a GGUF) in a folder that may hold other things: its own files only
        names = [*(f.name for f in plan.files), *plan.written, manifest_name(stem), progress_name(stem)]
        guard_source([folder / name for name in names], sources)
        return prepare_files(folder, [f.name for f in plan.files], stem, opts.resume, opts.overwrite)
    guard_source([dest], sources)
    return prepare_destination(dest, opts.resume, opts.overwrite)


def _run(plan: Plan, dest: Path, ckpt: Checkpoint, sink: Sink, opts: RunOptions, threads: int,
         stem: str | None, ranks: Ranks | None, sources: SourceRecords | None) -> RunResult:
    from m1.devices import device_set, writer_devices
    from m1.progress import lane_progress

    fingerprint = plan.fingerprint()
    main = ranks is None or ranks.main
    if main:
        try:
            done = _start(plan, dest, ckpt, stem, fingerprint, opts, ranks)
        except Exception as exc:
            if ranks is not None:
                ranks.broadcast({"error": _portable(exc)})
            raise
        if ranks is not None:
            ranks.broadcast({"fingerprint": fingerprint, "done": done})
    else:
        assert ranks is not None
        start = ranks.broadcast()
        if "error" in start:
            raise _from_rank(start["error"], 0)
        if start["fingerprint"] != fingerprint:
            raise UsageError("this rank planned another job than rank 0 (other options, or a source that differs "
                             "between nodes)", hint="run the same command on every rank, over the same source")
        done = start["done"]

    records = {f.name: done[f.name] for f in plan.files if f.name in done}
    todo = [f for f in plan.files if f.name not in done]
    last: list[OutputFile] = []
    if sink.first_last and todo and todo[0] is plan.files[0] and len(plan.files) > 1:
        last, todo = todo[:1], todo[1:]
    mine, streaming = _share(todo, last, ckpt, opts, ranks)
    mine_last = last if main else []
    own: dict[str, dict[str, Any]] = {}  # what this process wrote
    progress_file = dest / (progress_name(stem) if ranks is None else _rank_progress(stem, ranks.rank))

    def record(name: str, rec: dict[str, Any]) -> None:
        records[name] = rec
        own[name] = rec
        write_json_atomic(progress_file, {"fingerprint": fingerprint, "shards": records if ranks is None else own})

    timing = Timing()
    devices: dict[str, dict[str, Any]] = {}
    started = time.perf_counter()
    parallel = opts.workers > 1 and len(mine) > 1
    first_writer = ranks.local_rank * opts.workers if ranks is not None else 0
    writers = writer_devices(opts.device, min(opts.workers, len(mine)) if parallel else 1, first_writer)
    named = device_set(opts.device)
    if ranks is None and len(named) > opts.workers:
        import warnings

        warnings.warn(f"--device names {len(named)} devices but {opts.workers} worker"
                      f"{'s' if opts.workers != 1 else ''} write: {', '.join(named[opts.workers:])} stay idle "
                      f"(use --workers {len(named)})", stacklevel=3)
    ctx = _Context(plan, ckpt, str(dest), writers[0], threads, sources)
    pool = _WorkerPool(ctx, writers, fork_ok=ranks is None) if parallel else None
    if sources is not None:  # without workers this process writes all its files: it hashes what they own from
        mine_names = {f.name for f in [*mine, *mine_last]} if pool is None else set()  # the first read on
        ckpt.source_check = SourceCheck(sources, {s for s, o in sources.owner.items() if o in mine_names})
    scratch = _open_scratch(streaming, ckpt, dest, stem, ranks) if streaming is not None else None
    lanes = sorted(set(writers)) if len(set(writers)) > 1 else []
    here = ([] if pool is not None else mine) + (last if ranks is None else [])
    if pool is not None:
        pool.start(mine)  # before the progress bar's thread exists: fork copies only this thread
    total = plan.total_bytes if ranks is None else sum(f.nbytes for f in mine + mine_last)
    try:
        with lane_progress(total, opts.label, lanes, opts.show_progress and main) as advance:
            error: Exception | None = None
            try:
                if ranks is None:
                    advance(sum(f.nbytes for f in plan.files if f.name in done), None)
                if pool is not None:
                    for result in pool.results(advance):
                        record(result["file"], result["record"])
                        timing.add(result["timing"])
                        _count(devices, result["device"], result["record"])
                with _torch_threads(threads, plan):
                    _write_here(ctx, sink, here, record, advance, timing, devices, scratch)
            except Exception as exc:
                _discard(dest, mine + mine_last, pool)
                if ranks is None:
                    raise
                error = exc  # the other ranks hear of it at the gather, then every rank fails
            except BaseException:
                _discard(dest, mine + mine_last, pool)
                raise
            finally:
                if pool is not None:
                    pool.close()
            if ranks is not None:
                outcomes = ranks.gather({"rank": ranks.rank, "error": None if error is None else _portable(error),
                                         "records": own})
                if error is not None:
                    raise error
                failed = [o for o in outcomes if o["error"] is not None]
                if failed:
                    raise _from_rank(failed[0]["error"], failed[0]["rank"])
                for outcome in outcomes:
                    records.update(outcome["records"])
                if mine_last:  # the file that marks the set whole, once all the others exist
                    try:
                        with _torch_threads(threads, plan):
                            _write_here(ctx, sink, mine_last, record, advance, timing, devices, scratch)
                    except BaseException as exc:
                        _discard(dest, mine_last, None)
                        if isinstance(exc, Exception):
                            ranks.broadcast({"error": _portable(exc)})
                        raise
    finally:
        scratch_result = _close_scratch(scratch, ckpt, dest, stem)
        if ckpt.source_check is not None:
            ckpt.source_check.close()
            ckpt.source_check = None
    seconds = time.perf_counter() - started

    if ranks is None:
        manifest = _finish(plan, dest, sink, records, fingerprint, stem)
    elif main:
        try:
            manifest = _finish(plan, dest, sink, records, fingerprint, stem)
        except Exception as exc:
            ranks.broadcast({"error": _portable(exc)})
            raise
        ranks.broadcast({"manifest": manifest})  # every rank returns once the manifest exists
    else:
        final = ranks.broadcast()
        if "error" in final:
            raise _from_rank(final["error"], 0)
        manifest = final["manifest"]
    for stats in devices.values():
        stats["bytes_per_s"] = round(stats["bytes"] / stats["seconds"]) if stats["seconds"] > 0 else None
        stats["seconds"] = round(stats["seconds"], 3)
    taken = [pool.assigned[pid] for pid in sorted(pool.assigned)] if pool is not None else [ctx.device]
    return RunResult(manifest, list(own), seconds, pool.size if pool else (1 if own else 0), threads, timing,
                     devices, ranks.rank if ranks else 0, ranks.world if ranks else 1, scratch_result, taken)


def _start(plan: Plan, dest: Path, ckpt: Checkpoint, stem: str | None, fingerprint: str, opts: RunOptions,
           ranks: Ranks | None) -> dict[str, dict[str, Any]]:
    """Rank 0 (or the only process): what earlier runs finished, the config and extra files, and the progress
    record every rank's files are added to."""
    import shutil

    rank_files = _rank_progress_files(dest, stem)
    done: dict[str, dict[str, Any]] = {}
    if opts.resume:
        found = dict(finished_files(dest, fingerprint, stem))
        for path in rank_files:  # what the ranks of an earlier torchrun run finished, whatever its world size
            rec = _read_json(path)
            if isinstance(rec, dict) and rec.get("fingerprint") == fingerprint and isinstance(rec.get("shards"), dict):
                found.update(rec["shards"])
        done = _verified(dest, found)
    shutil.rmtree(_scratch_root(dest, stem), ignore_errors=True)  # what a killed run left
    if plan.writes_config:
        write_json_atomic(dest / "config.json", plan.config)
        for name in plan.extra_files:
            write_bytes_atomic(dest / name, ckpt.storage.local_path(name).read_bytes())
    if ranks is not None or rank_files:  # one record of what is finished, before any rank writes
        write_json_atomic(dest / progress_name(stem), {"fingerprint": fingerprint, "shards": done})
        for path in rank_files:
            path.unlink(missing_ok=True)
    return done


def _finish(plan: Plan, dest: Path, sink: Sink, records: dict[str, dict[str, Any]], fingerprint: str,
            stem: str | None) -> dict[str, Any]:
    """Once every file exists: the job's own small files, what lists them (the index), then the manifest;
    progress records go."""
    for name, text in plan.written.items():
        write_bytes_atomic(dest / name, text.encode())
    small = [*plan.written, *sink.finish(dest, plan)]
    manifest = manifest_document(
        plan, f"m1 {__version__}", time.strftime(CREATED_FORMAT, time.gmtime()), fingerprint,
        {f.name: (records[f.name]["sha256"], records[f.name]["size"]) for f in plan.files},
        {name: file_sha256(dest / name).hexdigest()
         for name in [*(["config.json", *plan.extra_files] if plan.writes_config else []), *small]})
    write_json_atomic(dest / manifest_name(stem), manifest)
    (dest / progress_name(stem)).unlink(missing_ok=True)
    for path in _rank_progress_files(dest, stem):
        path.unlink(missing_ok=True)
    return manifest


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


def _discard(dest: Path, files: list[OutputFile], pool: _WorkerPool | None) -> None:
    """After an error or an interrupt: stop the workers, drop this process's temporary files."""
    if pool is not None:
        pool.kill()
    for f in files:  # a killed worker leaves its temporary file behind
        (dest / f".{f.name}.tmp").unlink(missing_ok=True)


def _count(devices: dict[str, dict[str, Any]], device: str, rec: dict[str, Any]) -> None:
    stats = devices.setdefault(device, {"files": 0, "bytes": 0, "seconds": 0.0})
    stats["files"] += 1
    stats["bytes"] += rec["size"]
    stats["seconds"] += rec["seconds"]


# ---- torchrun: progress records per rank, errors passed between ranks -------------------------------------


def _rank_progress(stem: str | None, rank: int) -> str:
    return progress_name(stem)[: -len(".json")] + f".rank{rank}.json"


def _rank_progress_files(dest: Path, stem: str | None) -> list[Path]:
    prefix = progress_name(stem)[: -len(".json")]
    try:
        entries = list(dest.iterdir())
    except OSError:
        return []
    return sorted(p for p in entries if p.name.startswith(prefix) and RANK_PROGRESS.fullmatch(p.name[len(prefix):]))


def _read_json(path: Path) -> Any:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def _portable(exc: BaseException) -> M1Error:
    """An error another rank can unpickle and show as its one line."""
    if isinstance(exc, M1Error):
        return exc
    return M1Error(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}")


def _from_rank(exc: M1Error, rank: int) -> M1Error:
    from m1.distributed import RankFailed

    if isinstance(exc, UsageError | DestinationError):  # the same for every rank: say it as it is
        return exc
    return RankFailed(f"rank {rank} failed: {exc.one_line()}",
                      hint="finished files are kept: fix that, then run the same command with --resume")


def _share(todo: list[OutputFile], last: list[OutputFile], ckpt: Checkpoint, opts: RunOptions,
           ranks: Ranks | None) -> tuple[list[OutputFile], ScratchPlan | None]:
    """This process's files in the order it writes them, and with --scratch its streaming schedule.

    Under torchrun the files (in the scratch order when streaming, so each rank reads its own stretch of
    the source) are split into contiguous runs of about equal bytes, one per rank; rank 0 also writes
    `last`. Every rank computes every rank's share, so a bound that does not fit fails them all alike.
    """
    from m1.distributed import split

    base = todo
    sizes: dict[str, int] = {}
    if opts.scratch is not None:
        from m1.scratch import ordered, schedule, source_sizes

        sizes = source_sizes(ckpt.storage)
        base = ordered(todo, schedule(todo, sizes))
    if ranks is None:
        shares = [base]
    else:
        shares = [base[a:b] for a, b in split([f.nbytes for f in base], ranks.world)]
    rank = ranks.rank if ranks is not None else 0
    if opts.scratch is None:
        return shares[rank], None
    from m1.scratch import check_fits

    bound = opts.scratch // (ranks.local_world if ranks is not None else 1)  # --scratch is per node
    plans = [schedule(share, sizes, bound, last if r == 0 else None) for r, share in enumerate(shares)]
    for p in plans:
        check_fits(p)
    return ordered(shares[rank], plans[rank]), plans[rank]


# ---- streaming from the Hub through bounded scratch -------------------------------------------------------


def _scratch_root(dest: Path, stem: str | None) -> Path:
    return dest / (f".{stem}.m1-scratch" if stem is not None else ".m1-scratch")


def _open_scratch(streaming: ScratchPlan, ckpt: Checkpoint, dest: Path, stem: str | None,
                  ranks: Ranks | None) -> Scratch:
    from m1.scratch import Scratch

    folder = _scratch_root(dest, stem)
    if ranks is not None:
        folder = folder / f"rank{ranks.rank}"
    storage: Any = ckpt.storage
    scratch = Scratch(streaming, folder, storage.download_to)
    storage.scratch = scratch
    scratch.start()
    return scratch


def _close_scratch(scratch: Scratch | None, ckpt: Checkpoint, dest: Path, stem: str | None) -> dict[str, Any] | None:
    if scratch is None:
        return None
    storage: Any = ckpt.storage
    storage.scratch = None
    scratch.close()
    try:
        _scratch_root(dest, stem).rmdir()  # under torchrun: the last rank to finish removes it
    except OSError:
        pass
    return {"bound": scratch.bound, "needed_bytes": scratch.plan.peak, "held_peak_bytes": scratch.peak_held,
            "downloaded": list(scratch.downloaded),
            "download_bytes": sum(scratch.plan.sizes[s] for s in scratch.downloaded)}


# ---- writing files --------------------------------------------------------------------------------------


@dataclass
class _Context:
    plan: Plan
    ckpt: Checkpoint
    dest: str
    device: str
    threads: int
    sources: SourceRecords | None = None  # an m1-made source: what its files must hash to (m1.source_check)


def _write_unsynced(ctx: _Context, sink: Sink, file: OutputFile, on_bytes: Callable[[int], None],
                    timing: Timing, scratch: Scratch | None = None) -> tuple[PendingShard, dict[str, Any]]:
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


def _write_here(ctx: _Context, sink: Sink, todo: list[OutputFile], record: Callable[[str, dict[str, Any]], None],
                advance: Callable[[int, str | None], None], timing: Timing, devices: dict[str, dict[str, Any]],
                scratch: Scratch | None = None) -> None:
    """In this process; file i is committed (fsync, rename) on a thread while file i+1 is written."""

    def commit(pending: PendingShard, name: str, rec: dict[str, Any]) -> None:
        pending.commit()
        record(name, rec)  # progress only after the rename
        _count(devices, ctx.device, rec)

    def on_bytes(n: int) -> None:
        advance(n, ctx.device)

    with ThreadPoolExecutor(max_workers=1) as committer:
        in_flight: Future | None = None
        try:
            for file in todo:
                pending, rec = _write_unsynced(ctx, sink, file, on_bytes, timing, scratch)
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


def _init_worker(ctx: _Context, queue: Any, slots: Any) -> None:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process stops the job; workers just die with it
    device = slots.get(timeout=600)  # this worker's own device (--device cuda: one GPU each)
    ctx = replace(ctx, device=device)
    if ctx.sources is not None:  # this worker's own running hashes, for the files it will be given
        ctx.ckpt.source_check = SourceCheck(ctx.sources, set())
    if "torch" in sys.modules or ctx.plan.scheme is not None:
        import torch

        torch.set_num_threads(ctx.threads)  # one core a worker: two workers must not fight over two cores
        if device.startswith("cuda") and torch.cuda.is_available():
            torch.cuda.set_device(torch.device(device))
    _WORKER.update(ctx=ctx, queue=queue)
    queue.put(("ready", os.getpid(), device))


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
            queue.put((ctx.device, pending_bytes[0]))
            pending_bytes[0] = 0

    timing = Timing()
    pending, rec = _write_unsynced(ctx, get_sink(ctx.plan.sink), file, on_bytes, timing)
    pending.commit()
    queue.put((ctx.device, pending_bytes[0]))
    return {"file": file.name, "record": rec, "timing": asdict(timing), "device": ctx.device}


class _WorkerPool:
    """Worker processes that each write whole files, each on its own device; results come back as files finish."""

    def __init__(self, ctx: _Context, devices: list[str], fork_ok: bool = True) -> None:
        self.ctx = ctx
        self.devices = devices
        self.size = len(devices)
        self.fork_ok = fork_ok  # not under torchrun: the process group's threads must not be forked
        self.pool: ProcessPoolExecutor | None = None
        self.queue: Any = None
        self.futures: list[Future] = []
        self.assigned: dict[int, str] = {}  # worker pid -> the device it took

    def start(self, todo: list[OutputFile]) -> None:
        # fork is fast and safe when each child runs one thread (GNU OpenMP hangs in a forked child that
        # starts a thread team); otherwise, and for CUDA, a fresh interpreter per worker.
        method = "fork" if (self.fork_ok and self.ctx.threads == 1 and all(d == "cpu" for d in self.devices)
                            and "fork" in multiprocessing.get_all_start_methods()) else "spawn"
        mp = multiprocessing.get_context(method)
        self.queue = mp.Queue()
        slots = mp.Queue()
        for device in self.devices:
            slots.put(device)
        self.pool = ProcessPoolExecutor(self.size, mp_context=mp, initializer=_init_worker,
                                        initargs=(self.ctx, self.queue, slots))
        self.futures = [self.pool.submit(_write_in_worker, f) for f in todo]

    def results(self, advance: Callable[[int, str | None], None]) -> Iterator[dict[str, Any]]:
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

    def _drain(self, advance: Callable[[int, str | None], None]) -> None:
        import queue as queue_module

        while True:
            try:
                message = self.queue.get_nowait()
            except queue_module.Empty:
                return
            if message[0] == "ready":
                self.assigned[message[1]] = message[2]
            else:
                advance(message[1], message[0])

    def kill(self) -> None:
        """Stop every worker now (an interrupt, or an error in this process)."""
        for child in multiprocessing.active_children():
            child.kill()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
        if self.queue is not None:
            self._drain(lambda n, lane=None: None)  # the last "ready" messages


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
