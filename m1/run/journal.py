"""The journal a run keeps in its destination: what is finished, what a --resume may trust, the manifest.

Order of writes, so that an interrupted run never looks complete: config and extra files, then each
output file (temporary name, fsync, rename, recorded in `.m1-progress.json`), then the job's own small
files and what the sink lists the files in (the index), then `m1-manifest.json` (sha256 and size of
every file, hashed as the bytes passed). `--resume` re-checks each finished file's size and sha256
before trusting it.

Under torchrun every rank records the files it writes in its own progress record,
`.m1-progress.rank<r>.json`, which any later `--resume` reads, whatever its world size; rank 0 begins
the journal (one record of what is finished, before any rank writes) and finishes it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from m1.atomic_io import file_sha256, write_bytes_atomic, write_json_atomic
from m1.manifest import CREATED_FORMAT, finished_files, manifest_document
from m1.plan import OutputFile, Plan
from m1.run.destination import Destination
from m1.version import __version__

if TYPE_CHECKING:
    from m1.checkpoint import Checkpoint
    from m1.sinks import Sink

Record = dict[str, Any]  # one finished file: {"sha256", "size", "seconds"}


class Journal:
    def __init__(self, place: Destination, fingerprint: str, rank: int | None = None) -> None:
        self.place = place
        self.fingerprint = fingerprint
        self.rank = rank  # under torchrun: this process's rank, which keeps its own progress record
        self.records: dict[str, Record] = {}  # every finished file (earlier runs', this process's, other ranks')
        self.own: dict[str, Record] = {}  # the files this process wrote
        self.progress = place.progress if rank is None else place.rank_progress(rank)

    def begin(self, plan: Plan, ckpt: Checkpoint, resume: bool) -> dict[str, Record]:
        """Rank 0 (or the only process): what earlier runs finished, the config and extra files, and the
        progress record every rank's files are added to."""
        folder = self.place.folder
        rank_files = self.place.rank_progress_files()
        done: dict[str, Record] = {}
        if resume:
            found = dict(finished_files(folder, self.fingerprint, self.place.stem))
            for path in rank_files:  # what the ranks of an earlier torchrun run finished, whatever its world size
                rec = _read_json(path)
                if isinstance(rec, dict) and rec.get("fingerprint") == self.fingerprint and isinstance(
                        rec.get("shards"), dict):
                    found.update(rec["shards"])
            done = _verified(folder, found)
        if plan.writes_config:
            write_json_atomic(folder / "config.json", plan.config)
            for name in plan.extra_files:
                write_bytes_atomic(folder / name, ckpt.storage.local_path(name).read_bytes())
        # One record of what is finished, before any file is written (by any rank): a run killed between its first
        # file's rename and that file's record still leaves a progress record, so --resume finishes it.
        write_json_atomic(self.place.progress, {"fingerprint": self.fingerprint, "shards": done})
        for path in rank_files:
            path.unlink(missing_ok=True)
        return done

    def left(self, plan: Plan, done: dict[str, Record]) -> list[OutputFile]:
        """Take `done` (what `begin` found finished) as finished; the plan's files still to write."""
        self.records = {f.name: done[f.name] for f in plan.files if f.name in done}
        return [f for f in plan.files if f.name not in done]

    def record(self, name: str, rec: Record) -> None:
        """File `name` is committed (renamed into place): only now is it in the progress record."""
        self.records[name] = rec
        self.own[name] = rec
        write_json_atomic(self.progress, {"fingerprint": self.fingerprint,
                                          "shards": self.records if self.rank is None else self.own})

    def add(self, records: dict[str, Record]) -> None:
        """What another rank finished."""
        self.records.update(records)

    def finish(self, plan: Plan, sink: Sink) -> dict[str, Any]:
        """Once every file exists: the job's own small files, what lists them (the index), then the manifest;
        progress records go."""
        folder = self.place.folder
        for name, text in plan.written.items():
            write_bytes_atomic(folder / name, text.encode())
        small = [*plan.written, *sink.finish(folder, plan)]
        manifest = manifest_document(
            plan, f"m1 {__version__}", time.strftime(CREATED_FORMAT, time.gmtime()), self.fingerprint,
            {f.name: (self.records[f.name]["sha256"], self.records[f.name]["size"]) for f in plan.files},
            {name: file_sha256(folder / name).hexdigest()
             for name in [*(["config.json", *plan.extra_files] if plan.writes_config else []), *small]})
        write_json_atomic(self.place.manifest, manifest)
        self.place.progress.unlink(missing_ok=True)
        for path in self.place.rank_progress_files():
            path.unlink(missing_ok=True)
        return manifest


def _verified(folder: Path, done: dict[str, Record]) -> dict[str, Record]:
    """The finished files whose size and sha256 still match their record (anything else is written again)."""
    ok = {}
    for name, rec in done.items():
        path = folder / name
        if not isinstance(rec, dict) or not path.is_file() or path.stat().st_size != rec.get("size"):
            continue
        if file_sha256(path).hexdigest() == rec.get("sha256"):
            ok[name] = rec
    return ok


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
