"""Where a run writes, and the names of its own files there.

A destination is a folder of the job's own, or, for a format whose destination names the file set itself
(`Format.file_suffix`: one file and its splits, say), the set's files in a folder that may hold other things;
the set's manifest, progress record and scratch are then named after its stem, so two sets can share a folder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from m1.formats import get_format
from m1.manifest import DestinationLock, guard_source, manifest_name, prepare_destination, prepare_files, progress_name
from m1.plan import Plan

if TYPE_CHECKING:
    from m1.checkpoint import Checkpoint

RANK_PROGRESS = re.compile(r"\.rank(\d+)\.json$")


@dataclass(frozen=True)
class Destination:
    folder: Path  # where the files are written
    stem: str | None = None  # a file set named after it in a shared folder; None: the folder is the job's own

    @classmethod
    def of(cls, plan: Plan, dest: Path) -> Destination:
        suffix = get_format(plan.format).file_suffix
        if plan.stem is not None and suffix is not None and dest.suffix == suffix:
            return cls(dest.parent, plan.stem)
        return cls(dest)

    def prepare(self, plan: Plan, ckpt: Checkpoint, inputs: tuple[Path, ...], resume: bool,
                overwrite: bool) -> DestinationLock:
        """Lock the folder and make it ready (emptied with --overwrite, kept with --resume); no job may write
        over what it reads."""
        sources = [*ckpt.storage.sources(), *inputs]
        if self.stem is None:
            guard_source([self.folder], sources)
            return prepare_destination(self.folder, resume, overwrite)
        names = [*(f.name for f in plan.files), *plan.written, manifest_name(self.stem), progress_name(self.stem)]
        guard_source([self.folder / name for name in names], sources)  # a shared folder: its own files only
        return prepare_files(self.folder, [f.name for f in plan.files], self.stem, resume, overwrite)

    @property
    def manifest(self) -> Path:
        return self.folder / manifest_name(self.stem)

    @property
    def progress(self) -> Path:
        return self.folder / progress_name(self.stem)

    def rank_progress(self, rank: int) -> Path:
        """Under torchrun each rank records its own files: `.m1-progress.rank<r>.json`."""
        return self.folder / (progress_name(self.stem)[: -len(".json")] + f".rank{rank}.json")

    def rank_progress_files(self) -> list[Path]:
        """Every rank's progress record there, of this run or an earlier one of any world size."""
        prefix = progress_name(self.stem)[: -len(".json")]
        try:
            entries = list(self.folder.iterdir())
        except OSError:
            return []
        return sorted(p for p in entries if p.name.startswith(prefix) and RANK_PROGRESS.fullmatch(p.name[len(prefix):]))

    @property
    def scratch(self) -> Path:
        """The folder a Hub source streams through (m1.scratch), beside the output."""
        return self.folder / (f".{self.stem}.m1-scratch" if self.stem is not None else ".m1-scratch")

    def temporary(self, name: str) -> Path:
        """Where a sink writes output file `name` before renaming it (a killed worker leaves it behind)."""
        return self.folder / f".{name}.tmp"
