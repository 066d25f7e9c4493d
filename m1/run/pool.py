"""`--workers`: processes that each write whole files, each on its own device.

`--device cuda` deals the visible GPUs round robin over the workers; a set such as `cuda:0,cuda:3` names
them. A worker reports its bytes to the progress bar in steps, commits each file it writes, and hands its
record back; the main process records it. Workers die with the main process (kill -9 included), and an
interrupt or an error in the main process kills them.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, replace
from typing import Any

from m1.errors import M1Error
from m1.ops import Timing
from m1.plan import OutputFile
from m1.run.write import Advance, WriteContext, write_unsynced
from m1.sinks import get_sink
from m1.source_check import SourceCheck

REPORT_EVERY = 16 << 20  # a worker reports progress in steps of this many bytes


class WorkerPool:
    """Worker processes that each write whole files, each on its own device; results come back as files finish."""

    def __init__(self, ctx: WriteContext, devices: list[str], fork_ok: bool = True) -> None:
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

    def results(self, advance: Advance) -> Iterator[dict[str, Any]]:
        """Each written file's {file, record, timing, device}, as it finishes; then the first error, if any."""
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

    def _drain(self, advance: Advance) -> None:
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

    def writer_devices(self) -> list[str]:
        """The device each worker took, in the order the workers started."""
        return [self.assigned[pid] for pid in sorted(self.assigned)]

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


# ---- in the worker process ---------------------------------------------------------------------------------

_WORKER: dict[str, Any] = {}  # a worker process's context and progress queue


def _init_worker(ctx: WriteContext, queue: Any, slots: Any) -> None:
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
    ctx: WriteContext = _WORKER["ctx"]
    queue = _WORKER["queue"]
    pending_bytes = [0]

    def on_bytes(n: int) -> None:
        pending_bytes[0] += n
        if pending_bytes[0] >= REPORT_EVERY:
            queue.put((ctx.device, pending_bytes[0]))
            pending_bytes[0] = 0

    timing = Timing()
    pending, rec = write_unsynced(ctx, get_sink(ctx.plan.sink), file, on_bytes, timing)
    pending.commit()
    queue.put((ctx.device, pending_bytes[0]))
    return {"file": file.name, "record": rec, "timing": asdict(timing), "device": ctx.device}
