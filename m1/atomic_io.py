"""Streaming, hashed, atomic writes: the byte-moving half of every sink.

Chunks are written and hashed on two threads while the caller produces the next (file I/O and hashlib
release the GIL); unchanged source bytes are copied in the kernel (`copy_file_range`, as `cp` does) and
hashed through mmap. A file is written under a temporary name and made durable and visible by fsync and
rename (`PendingShard.commit`), so it exists whole or not at all.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import queue
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from m1.errors import CheckpointError, DiskFullError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class FileRange:
    """Bytes of a source file, copied in the kernel (copy_file_range, as `cp` does) and hashed via mmap."""

    path: Path
    offset: int
    length: int

    def __len__(self) -> int:
        return self.length


def file_ranges(path: Path, offset: int, length: int, piece: int = 256 << 20) -> list[FileRange]:
    """A byte range in pieces, so progress moves and little is in flight."""
    return [FileRange(path, offset + o, min(piece, length - o)) for o in range(0, length, piece)]


def write_all(fd: int, chunk: memoryview | bytes | FileRange) -> None:
    if isinstance(chunk, FileRange):
        with open(chunk.path, "rb", buffering=0) as src:
            done = 0
            while done < chunk.length:
                try:
                    n = os.copy_file_range(src.fileno(), fd, chunk.length - done, chunk.offset + done)
                except OSError as exc:
                    if exc.errno not in (18, 38, 22, 95):  # EXDEV, ENOSYS, EINVAL, EOPNOTSUPP: fall back
                        raise
                    n = 0
                if n == 0:  # unsupported here, or a short source: plain reads show which
                    data = os.pread(src.fileno(), min(64 << 20, chunk.length - done), chunk.offset + done)
                    if not data:
                        raise CheckpointError("truncated while reading", file=str(chunk.path),
                                              hint="re-download it")
                    write_all(fd, data)
                    n = len(data)
                done += n
        return
    view = memoryview(chunk).cast("B")
    while view:
        view = view[os.write(fd, view):]


def hash_into(sha: hashlib._Hash, chunk: memoryview | bytes | FileRange) -> None:
    if not isinstance(chunk, FileRange):
        sha.update(chunk)
        return
    if chunk.length == 0:
        return
    start = chunk.offset - chunk.offset % mmap.ALLOCATIONGRANULARITY
    with open(chunk.path, "rb", buffering=0) as src, \
            mmap.mmap(src.fileno(), chunk.offset + chunk.length - start, offset=start, access=mmap.ACCESS_READ) as m:
        m.madvise(mmap.MADV_SEQUENTIAL)
        view = memoryview(m)
        try:
            base = chunk.offset - start
            for o in range(0, chunk.length, 16 << 20):
                sha.update(view[base + o : base + min(o + (16 << 20), chunk.length)])
        finally:
            view.release()


@dataclass
class Produced:
    """What a producer yields for one planned tensor: its final dtype/shape and its bytes in chunks."""

    dtype: str
    shape: tuple[int, ...]
    chunks: Iterable[memoryview | bytes]


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a CPU tensor (contiguous copy only if needed)."""
    t = t.detach().contiguous()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.numel() == 0:
        return memoryview(b"")
    import torch

    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


def is_disk_full(exc: OSError) -> bool:
    return exc.errno in (28, 122, 27)  # ENOSPC, EDQUOT, EFBIG


def raise_if_disk_full(exc: BaseException, path: Path) -> None:
    """A full disk while writing `path` becomes the one-line error that says how to go on (every writer's)."""
    if isinstance(exc, OSError) and is_disk_full(exc):
        raise DiskFullError("disk full while writing", file=str(path),
                            hint="free space, then run the same command with --resume") from None


@dataclass(frozen=True)
class PendingShard:
    """A shard written under its temporary name: `commit` makes it durable and visible, `discard` drops it.

    Committing (fsync, rename) can run on another thread while the next shard is written, so the wait
    for the disk overlaps with work instead of stalling it.
    """

    tmp: Path
    path: Path

    def commit(self) -> None:
        try:
            fd = os.open(self.tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(self.tmp, self.path)
        except OSError as exc:
            self.discard()
            raise_if_disk_full(exc, self.path)
            raise
        fsync_dir(self.path.parent)

    def discard(self) -> None:
        self.tmp.unlink(missing_ok=True)


class ChunkSink:
    """Writes and hashes chunks on two threads while the caller reads the next one.

    Reading, hashing and writing then overlap (file I/O and hashlib release the GIL), which is what
    brings a copy close to `cp`. Chunks must not be modified after `put` (readers yield fresh buffers);
    the queues are short, so at most a few chunks are in flight. A context manager, nested inside the file's.
    """

    def __init__(self, fd: int, sha: hashlib._Hash | None, depth: int = 2) -> None:
        self._error: BaseException | None = None
        self._queues: list[queue.Queue] = []
        self._threads: list[threading.Thread] = []
        self._start(lambda chunk: write_all(fd, chunk), depth)
        if sha is not None:
            self._start(lambda chunk: hash_into(sha, chunk), depth)

    def _start(self, consume: Callable[[bytes], object], depth: int) -> None:
        q: queue.Queue = queue.Queue(maxsize=depth)

        def loop() -> None:
            while (chunk := q.get()) is not None:
                if self._error is None:
                    try:
                        consume(chunk)
                    except BaseException as exc:  # handed to the caller at the next put/close
                        self._error = exc

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        self._queues.append(q)
        self._threads.append(thread)

    def put(self, chunk: memoryview | bytes | FileRange) -> None:
        if self._error is not None:
            self.close()
        for q in self._queues:
            q.put(chunk)

    def put_all(self, chunks: Iterable[memoryview | bytes | FileRange],
                on_bytes: Callable[[int], None] | None = None) -> int:
        """Every chunk of one tensor; returns its byte count (what the sinks check against the plan)."""
        written = 0
        for chunk in chunks:
            self.put(chunk)
            written += len(chunk)
            if on_bytes:
                on_bytes(len(chunk))
        return written

    def close(self) -> None:
        for q in self._queues:
            q.put(None)
        for thread in self._threads:
            thread.join()
        self._queues = []
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def abort(self) -> None:
        try:
            self.close()
        except BaseException:  # the original error is already on its way up
            pass

    # Use it inside the `with open(...)` of its file: leaving the block then joins the threads *before* the file
    # is closed. A writer thread still holding a closed fd number would write into whatever file the process
    # opens next under that number (a disk-full run once wrote tensor bytes into .m1-progress.json that way).
    def __enter__(self) -> ChunkSink:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def file_sha256(path: Path, chunk: int = 16 << 20) -> hashlib._Hash:
    sha = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            sha.update(view[:n])
    return sha


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Small files (config, index, manifest): temporary name, fsync, rename.

    The temporary name is this process's and thread's own, so two writers of one small file can never
    interleave into one temporary file."""
    import threading

    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise_if_disk_full(exc, path)
        raise
    fsync_dir(path.parent)


def json_text(obj: object) -> str:
    """How m1 writes its JSON files (config, index, manifest)."""
    return json.dumps(obj, indent=2) + "\n"


def write_json_atomic(path: Path, obj: object) -> None:
    write_bytes_atomic(path, json_text(obj).encode())
