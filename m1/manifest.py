"""What an m1 output folder holds besides its weights: the lock, the progress record, the manifest.

- One writer per destination: an advisory lock (flock) on the folder itself, so nothing is left behind.
- `.m1-progress.json` lists the files finished so far (sha256, size) under the plan's fingerprint;
  `m1-manifest.json`, written last, lists them all. Either one marks a folder as m1's own: `--overwrite`
  empties only such a folder, and never a source or a folder that holds one.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from m1.atomic_io import file_sha256
from m1.errors import CheckpointError, DestinationError

MANIFEST = "m1-manifest.json"
PROGRESS = ".m1-progress.json"
CREATED_FORMAT = "%Y-%m-%dT%H:%M:%SZ"  # always 20 characters
SHA256_PLACEHOLDER = "0" * 64  # a sha256's hex length, for sizing a manifest before anything is hashed


def manifest_document(plan: Any, tool: str, created: str, fingerprint: str, shards: dict[str, tuple[str, int]],
                      files: dict[str, str]) -> dict[str, Any]:
    """The manifest: the job, the plan's files with their sha256 and size (`shards`), and the small files'
    sha256 (`files`). The executor writes it last; `m1.quantize.budget` sizes it with placeholders."""
    return {
        "m1_manifest_version": 1,
        "tool": tool,
        "created": created,
        "job": plan.job,
        "fingerprint": fingerprint,
        "plan": [{"file": f.name, "tensors": [t.name for t in f.tensors]} for f in plan.files],
        "shards": {name: {"sha256": sha, "size": size} for name, (sha, size) in shards.items()},
        "files": files,
    }


def manifest_name(stem: str | None = None) -> str:
    """m1-manifest.json for a folder; <stem>.m1-manifest.json beside a file set (a file-set format's files) in a
    shared folder."""
    return MANIFEST if stem is None else f"{stem}.{MANIFEST}"


def progress_name(stem: str | None = None) -> str:
    return PROGRESS if stem is None else f".{stem}{PROGRESS}"


def read_manifest(root: Path, stem: str | None = None) -> dict[str, Any] | None:
    path = root / manifest_name(stem)
    if not path.exists():
        return None
    return _read_record(path, "manifest")


def manifest_findings(root: Path) -> tuple[bool | None, list[tuple[str, str, str | None]]]:
    """Whether `root` has an m1 manifest (None: one that cannot be read), and (code, message, file) for each
    shard it lists that is missing or differs from its recorded size and sha256."""
    try:
        manifest = read_manifest(root)
    except CheckpointError as exc:
        return None, [("manifest", exc.message, exc.file)]
    if manifest is None:
        return False, []
    out: list[tuple[str, str, str | None]] = []
    for file, record in manifest.get("shards", {}).items():
        path = root / file
        if not path.exists():
            out.append(("missing-shard", "listed in the manifest but not on disk", file))
        elif path.stat().st_size != record.get("size"):
            out.append(("sha256", f"size {path.stat().st_size}, the manifest recorded {record.get('size')}", file))
        elif file_sha256(path).hexdigest() != record.get("sha256"):
            out.append(("sha256", "sha256 differs from the manifest: the file changed after it was written", file))
    return True, out


def read_manifest_file(path: Path) -> dict[str, Any]:
    return _read_record(path, "manifest")


def read_progress(dest: Path, stem: str | None = None) -> dict[str, Any] | None:
    path = dest / progress_name(stem)
    return _read_record(path, "progress record") if path.exists() else None


def _read_record(path: Path, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(f"the {what} is not valid JSON", file=str(path),
                              hint="delete it and re-run the job with --overwrite") from None
    except IsADirectoryError:
        raise CheckpointError(f"the {what} is a folder", file=str(path), hint="remove it") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("shards", {}), dict):
        raise CheckpointError(f"the {what} is not an m1 {what}", file=str(path),
                              hint="delete it and re-run the job with --overwrite")
    return obj


def is_m1_output(dest: Path) -> bool:
    return (dest / MANIFEST).is_file() or (dest / PROGRESS).is_file()


def guard_source(dests: Iterable[Path], sources: Iterable[Path]) -> None:
    """The one rule for every command that writes (convert, quantize, verify imatrix and logits, compare's
    report): no destination may be a source, hold one or lie inside one, or --overwrite (or a plain write)
    would destroy what the job reads. Real paths are compared (symlinks resolved), and an existing file is
    also compared by identity (a hard link is the same file)."""
    real_sources = [(src, src.resolve()) for src in sources]
    for dest in dests:
        out = dest.resolve()
        for src, real in real_sources:
            if out == real or _same_file(out, real):
                what = "is the source"
            elif out in real.parents:
                what = "holds the source"
            elif real in out.parents:
                what = "lies inside the source"
            else:
                continue
            raise DestinationError(f"the destination {what} {src}", file=str(dest),
                                   hint="write to a path outside every source")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


# ---- a source that a writer holds -------------------------------------------------------------------------
# A run that --overwrite-s (or resumes into) a folder holds its lock for as long as it writes; a job that reads
# that folder meanwhile sees files vanish or change under it. The lock says so: checked when a source is opened
# (m1.checkpoint) and, for a read that fails, by the CLI before it reports the failure (rewritten_source).

_LOCKED_HERE: set[Path] = set()  # folders this process holds the destination lock of
_READING: list[Path] = []  # folders this process opened sources in


def lock_held(folder: Path) -> bool:
    """Whether another process holds `folder`'s destination lock (an m1 run is writing there)."""
    if folder.resolve() in _LOCKED_HERE:
        return False
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # drops the shared lock, if it was taken
    return False


def rewritten_error(folder: Path) -> CheckpointError:
    return CheckpointError("the source is being rewritten: another m1 run holds its destination lock", file=str(folder),
                           hint="wait for that run to finish, then run this again")


def note_source(folder: Path, refuse_if_held: bool) -> None:
    """A folder this process reads from; `refuse_if_held`: fail now if a writer holds it (a checkpoint folder,
    not a shared folder that holds a file set among other things)."""
    if refuse_if_held and lock_held(folder):
        raise rewritten_error(folder)
    _READING.append(folder)


def forget_sources() -> None:
    """A new command (tests run many in one process) starts with none."""
    _READING.clear()


def rewritten_source() -> Path | None:
    """After a read failed: the first source folder a writer now holds (its failure is that, not damage)."""
    return next((folder for folder in _READING if lock_held(folder)), None)


class DestinationLock:
    """An exclusive flock on the destination folder for the whole run; a second run is refused at once."""

    def __init__(self, dest: Path) -> None:
        self.dest = dest
        self.fd: int | None = None

    def acquire(self) -> None:
        try:
            self.fd = os.open(self.dest, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise DestinationError(f"cannot open the destination ({exc.strerror})", file=str(self.dest)) from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            self.fd = None
            raise DestinationError("another m1 run is writing to this destination", file=str(self.dest),
                                   hint="wait for it to finish (or stop it), then use --resume") from None
        _LOCKED_HERE.add(self.dest.resolve())

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None
            _LOCKED_HERE.discard(self.dest.resolve())


def prepare_destination(dest: Path, resume: bool, overwrite: bool) -> DestinationLock:
    """Create or check the destination and lock it; with --overwrite empty it, if it is m1's own."""
    if dest.exists() and not dest.is_dir():
        raise DestinationError("destination exists and is not a folder", file=str(dest))
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise DestinationError("a file is in the way of the destination folder", file=str(dest)) from None
    except NotADirectoryError:
        raise DestinationError("the destination would be inside a file", file=str(dest)) from None
    except PermissionError:
        raise DestinationError("no permission to create the destination", file=str(dest)) from None
    if not os.access(dest, os.W_OK | os.X_OK):
        raise DestinationError("the destination is not writable", file=str(dest), hint="check its permissions")
    lock = DestinationLock(dest)
    lock.acquire()
    try:
        entries = list(dest.iterdir())
        if entries and not resume:
            if not overwrite:
                raise DestinationError("destination is not empty", file=str(dest),
                                       hint="pass --resume to finish an interrupted run or --overwrite to replace it")
            if not is_m1_output(dest):
                raise DestinationError("--overwrite refused: the destination holds files that are not an m1 output "
                                       "(no m1 manifest or progress record)", file=str(dest),
                                       hint="empty or remove it yourself, or write to a new folder")
            for entry in entries:  # empty it, but keep the folder: it carries the lock
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
    except BaseException:
        lock.release()
        raise
    return lock


def prepare_files(folder: Path, names: list[str], stem: str, resume: bool, overwrite: bool) -> DestinationLock:
    """A file set (one file or its splits) in a folder that may hold other things: lock the folder, and
    refuse to replace files that are there unless --overwrite and an earlier m1 run of this stem made them."""
    prepare = prepare_destination if not folder.exists() else None
    if prepare is not None:
        return _prepare_file_set(prepare(folder, resume=False, overwrite=False), folder, names, stem, resume,
                                 overwrite)
    if not folder.is_dir():
        raise DestinationError("the destination's folder is not a folder", file=str(folder))
    lock = DestinationLock(folder)
    lock.acquire()
    return _prepare_file_set(lock, folder, names, stem, resume, overwrite)


def _prepare_file_set(lock: DestinationLock, folder: Path, names: list[str], stem: str, resume: bool,
                      overwrite: bool) -> DestinationLock:
    try:
        ours = (folder / manifest_name(stem)).is_file() or (folder / progress_name(stem)).is_file()
        present = [n for n in [*names, manifest_name(stem)] if (folder / n).exists()]
        if present and not resume:
            if not overwrite:
                raise DestinationError(f"{present[0]} exists", file=str(folder / present[0]),
                                       hint="pass --resume to finish an interrupted run or --overwrite to replace it")
            if not ours:
                raise DestinationError("--overwrite refused: no m1 manifest or progress record says an m1 run made "
                                       "it", file=str(folder / present[0]),
                                       hint="remove it yourself, or write elsewhere")
            for name in present:
                (folder / name).unlink()
            (folder / progress_name(stem)).unlink(missing_ok=True)
    except BaseException:
        lock.release()
        raise
    return lock


def finished_files(dest: Path, fingerprint: str, stem: str | None = None) -> dict[str, dict[str, Any]]:
    """For --resume: the files a run with this fingerprint recorded as finished (not yet re-checked)."""
    from m1.index import file_set_suffixes

    progress = read_progress(dest, stem)
    if progress is None:
        manifest = read_manifest(dest, stem)
        if manifest is not None:
            if manifest.get("fingerprint") == fingerprint:
                return manifest.get("shards", {})
            raise DestinationError("--resume with a different plan than the run that wrote this destination",
                                   file=str(dest), hint="use the same options as before, or --overwrite to start again")
        written = (".safetensors", *file_set_suffixes())  # the weight files m1's sinks write
        if stem is None and any(p.name.endswith(written) for p in dest.iterdir()):
            raise DestinationError("nothing to resume: no progress record from an m1 run", file=str(dest),
                                   hint="use --overwrite to replace its contents")
        return {}
    if progress.get("fingerprint") != fingerprint:
        raise DestinationError("--resume with a different plan (or a changed source) than the interrupted run",
                               file=str(dest), hint="use the same options as before, or --overwrite to start again")
    return progress.get("shards", {})
