"""A job that reads an m1-made source checks each source file's sha256 against the source's manifest as its
bytes pass, and fails before its own index and manifest when one differs.

Design. The manifest holds one sha256 per whole file, and sha256 runs forward only, so each source file has one
running hash per process, fed (on a thread of its own, so copy, cast and quantize never wait for it) with the
byte ranges the job reads, in the order it reads them. A range that starts past the running position first
hashes the gap: the header and padding, or tensors that other output files or processes read (in a plan that
reads a file in order that is only its header); a range behind it was hashed already. Each source file is
completed (its tail hashed, the sum compared) by one output file, its owner: the one that reads most of its
bytes, fixed by the plan, so every process and every --resume agrees. An owner is never committed when the sum
differs, so a finished owner means its source files were checked. Bytes are hashed from the buffers the reads
filled, or (ranges the kernel copies, tensors a format decodes itself) through mmap right behind the read, from the page
cache: only the gaps are read from disk a second time.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from m1.atomic_io import FileRange, file_sha256, hash_into
from m1.errors import CheckpointError

if TYPE_CHECKING:
    from m1.checkpoint import Checkpoint
    from m1.plan import Plan

HINT = "re-download or re-make it; m1 verify integrity lists every file that changed"


@dataclass(frozen=True)
class SourceRecords:
    """What a job checks its source against (picklable: workers build their own SourceCheck from it)."""

    manifest: Path
    paths: dict[str, Path]  # source file -> where it is
    expected: dict[str, tuple[str, int]]  # source file -> (sha256, size) from the manifest
    owner: dict[str, str]  # source file -> the output file that completes its check


def source_records(ckpt: Checkpoint, plan: Plan) -> SourceRecords | None:
    """None unless m1 made the source (a manifest beside it). Sizes and the small files (config.json, the
    index, and the extra files the plan copies: tokenizer, generation config) are checked here, before anything
    is written."""
    from m1.manifest import read_manifest_file

    path = ckpt.storage.manifest_path()
    if path is None or not path.is_file():
        return None
    manifest = read_manifest_file(path)
    shards = manifest.get("shards", {})
    small = manifest.get("files", {}) if isinstance(manifest.get("files"), dict) else {}
    for name in ["config.json", *([ckpt.index_file] if ckpt.index_file else []), *plan.extra_files]:
        local = path.parent / name
        if isinstance(small.get(name), str) and local.is_file() and file_sha256(local).hexdigest() != small[name]:
            raise _changed(local, path)
    expected: dict[str, tuple[str, int]] = {}
    paths: dict[str, Path] = {}
    for file in ckpt.files():
        rec = shards.get(file)
        if not isinstance(rec, dict):
            continue
        local = ckpt.local_path(file)
        size = local.stat().st_size if local.is_file() else None
        if size != rec.get("size"):
            raise CheckpointError(f"size {size}, the source's manifest {path.name} recorded {rec.get('size')}: the "
                                  "file changed after m1 wrote it", file=str(local), hint=HINT)
        expected[file], paths[file] = (str(rec.get("sha256")), size), local
    if not expected:
        return None
    return SourceRecords(path, paths, expected, _owners(ckpt, plan, set(expected)))


def _owners(ckpt: Checkpoint, plan: Plan, files: set[str]) -> dict[str, str]:
    """Each source file's owner: the output file reading most of its bytes (the last such on a tie); a file
    no op names (companions only) goes to the last output file."""
    best: dict[str, tuple[int, str]] = {}
    for out in plan.files:
        read: dict[str, int] = {}
        for op in out.ops:
            for src in op.sources:
                info = ckpt.info(src.name)
                read[info.file] = read.get(info.file, 0) + info.nbytes
        for file, n in read.items():
            if file in files and n >= best.get(file, (-1, ""))[0]:
                best[file] = (n, out.name)
    last = plan.files[-1].name
    return {file: best[file][1] if file in best else last for file in files}


def _changed(path: Path, manifest: Path) -> CheckpointError:
    return CheckpointError(f"sha256 differs from the source's manifest {manifest.name}: the file changed after m1 "
                           "wrote it", file=str(path), hint=HINT)


class _Running:
    def __init__(self) -> None:
        self.sha = hashlib.sha256()
        self.pos = 0
        self.done = False


class SourceCheck:
    """One process's running hashes; `observe` is called by the reads, `complete` before an output's commit."""

    def __init__(self, records: SourceRecords, active: set[str]) -> None:
        self.records = records
        self.running: dict[str, _Running] = {f: _Running() for f in active if f in records.expected}
        self.error: CheckpointError | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=4)  # a few chunks in flight: memory stays bounded
        self._thread = threading.Thread(target=self._loop, daemon=True, name="m1-source-check")
        self._thread.start()

    def begin(self, output: str) -> None:
        """The files this output completes are hashed from now on (a worker learns its outputs one by one)."""
        for file, owner in self.records.owner.items():
            if owner == output and file not in self.running:
                self.running[file] = _Running()

    def observe(self, file: str, offset: int, length: int, data: Any = None) -> None:
        """Bytes [offset, offset+length) of `file` were read: `data` holds them (not changed afterwards), or
        None to hash them from the file (the page cache) behind the read."""
        if self.error is not None:
            raise self.error
        if file in self.running and length > 0:
            self._queue.put((file, offset, length, data))

    def complete(self, output: str) -> None:
        """Before `output` is committed: every source file it owns is hashed to its end and matches."""
        self._queue.join()
        for file, owner in self.records.owner.items():
            if owner == output and file in self.running:
                self._queue.put((file, None, 0, None))
        self._queue.join()
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                if self.error is None:
                    self._hash(*item)
            except OSError as exc:
                self.error = CheckpointError(f"cannot read it to check it against the manifest ({exc.strerror})",
                                             file=str(self.records.paths[item[0]]), hint=HINT)
            except CheckpointError as exc:
                self.error = exc
            finally:
                self._queue.task_done()
        self._queue.task_done()

    def _hash(self, file: str, offset: int | None, length: int, data: Any) -> None:
        run = self.running[file]
        path = self.records.paths[file]
        sha, size = self.records.expected[file]
        if run.done:
            return
        end = size if offset is None else min(offset + length, size)
        start = run.pos if offset is None else offset
        if start > run.pos:  # a gap: header, padding, or what another output (or process) reads
            hash_into(run.sha, FileRange(path, run.pos, start - run.pos))
            run.pos = start
        if end > run.pos:
            if data is None:
                hash_into(run.sha, FileRange(path, run.pos, end - run.pos))
            else:
                run.sha.update(memoryview(data).cast("B")[run.pos - start: end - start])
            run.pos = end
        if run.pos >= size:
            run.done = True
            if run.sha.hexdigest() != sha:
                raise _changed(path, self.records.manifest)
