"""Writing a checkpoint: plan the shards (a pure function), then stream tensors into them.

Order of writes, so that an interrupted run never looks complete: config and tokenizer files, then
each shard (temporary name, fsync, rename, recorded in `.m1-progress.json`), then the index, then
`m1-manifest.json`. `--resume` reads the progress file, checks that the plan is the same, and skips
the shards that are already whole.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from m1 import __version__
from m1.errors import CheckpointError, DestinationError, UsageError
from m1.safetensors_io import (
    PendingShard,
    Produced,
    file_sha256,
    write_bytes_atomic,
    write_json_atomic,
    write_shard_unsynced,
)

MANIFEST = "m1-manifest.json"
PROGRESS = ".m1-progress.json"
INDEX = "model.safetensors.index.json"
SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB', '123' -> bytes (decimal units, as huggingface_hub's max_shard_size)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in SIZE_UNITS:
        raise UsageError(f"cannot read the size {text!r}", hint="write it like 5GB, 500MB or 2GiB")
    value = int(float(m.group(1)) * SIZE_UNITS[m.group(2).upper()])
    if value <= 0:
        raise UsageError(f"size must be positive, got {text!r}")
    return value


@dataclass(frozen=True)
class OutTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int  # exact when `exact`, else an upper-bound estimate used for sharding
    layer: int | None = None
    exact: bool = True


@dataclass(frozen=True)
class ShardPlan:
    file: str
    tensors: tuple[OutTensor, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass
class WritePlan:
    """Everything a job will write, decided before a byte is written; printable with --dry-run."""

    shards: list[ShardPlan]
    config: dict[str, Any]
    extra_files: list[str]  # copied from the source folder
    job: dict[str, Any] = field(default_factory=dict)  # what made it: command, source, options

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.shards)

    def fingerprint(self) -> str:
        """Identifies the plan, so --resume never mixes shards of two different plans."""
        obj = {"job": self.job, "config": self.config,
               "shards": [[s.file, [asdict(t) for t in s.tensors]] for s in self.shards]}
        return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()

    def summary(self) -> dict[str, Any]:
        return {
            "shards": len(self.shards),
            "tensors": sum(len(s.tensors) for s in self.shards),
            "bytes": self.total_bytes,
            "files": [{"file": s.file, "tensors": len(s.tensors), "bytes": s.nbytes} for s in self.shards],
            "extra_files": self.extra_files,
        }


def shard_name(i: int, n: int) -> str:
    width = max(5, len(str(n)))
    return f"model-{i + 1:0{width}d}-of-{n:0{width}d}.safetensors"


def plan_shards(tensors: list[OutTensor], shard_size: int | None = None, by_layer: bool = False) -> list[ShardPlan]:
    """Group tensors into shards with standard 1-based names.

    by_layer: the embedding alone, then one shard per layer, then final norm and head, so a layer is
    always in exactly one file (what layer-streaming and pipeline loading want). Otherwise greedy
    packing in order up to `shard_size` bytes (a tensor larger than the size gets a shard of its own).
    """
    groups: list[list[OutTensor]] = []
    if by_layer:
        first = [t for t in tensors if t.layer is None and t.name == "model.embed_tokens.weight"]
        last = [t for t in tensors if t.layer is None and t.name != "model.embed_tokens.weight"]
        layers: dict[int, list[OutTensor]] = {}
        for t in tensors:
            if t.layer is not None:
                layers.setdefault(t.layer, []).append(t)
        groups = [g for g in [first, *[layers[k] for k in sorted(layers)], last] if g]
    else:
        limit = shard_size or 5 * 10**9
        current: list[OutTensor] = []
        size = 0
        for t in tensors:
            if current and size + t.nbytes > limit:
                groups.append(current)
                current, size = [], 0
            current.append(t)
            size += t.nbytes
        if current:
            groups.append(current)
    return [ShardPlan(shard_name(i, len(groups)), tuple(g)) for i, g in enumerate(groups)]


def prepare_destination(dest: Path, resume: bool, overwrite: bool) -> None:
    if dest.exists() and not dest.is_dir():
        raise DestinationError("destination exists and is not a folder", file=str(dest))
    if dest.exists() and any(dest.iterdir()):
        if overwrite:
            shutil.rmtree(dest)
        elif not resume:
            raise DestinationError("destination is not empty", file=str(dest),
                                   hint="pass --resume to finish an interrupted run or --overwrite to replace it")
    dest.mkdir(parents=True, exist_ok=True)


def _load_progress(dest: Path, fingerprint: str) -> dict[str, dict[str, Any]]:
    path = dest / PROGRESS
    if not path.exists():
        if (dest / MANIFEST).exists():
            manifest = json.loads((dest / MANIFEST).read_text())
            if manifest.get("fingerprint") == fingerprint:
                return manifest.get("shards", {})
            raise DestinationError("--resume with a different plan than the run that wrote this destination",
                                   file=str(dest), hint="use the same options as before, or --overwrite to start again")
        if any(p.name.endswith(".safetensors") for p in dest.iterdir()):
            raise DestinationError("nothing to resume: no progress record from an m1 run", file=str(dest),
                                   hint="use --overwrite to replace its contents")
        return {}
    progress = json.loads(path.read_text())
    if progress.get("fingerprint") != fingerprint:
        raise DestinationError("--resume with a different plan than the interrupted run", file=str(dest),
                               hint="use the same options as before, or --overwrite to start again")
    return progress.get("shards", {})


def execute(
    plan: WritePlan,
    dest: Path,
    produce: Callable[[str], Produced],
    source_root: str | None = None,
    fetch_extra: Callable[[str], Path] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
    on_shard_done: Callable[[ShardPlan], None] | None = None,
) -> dict[str, Any]:
    """Write `plan` into `dest`; returns the manifest."""
    if source_root is not None:  # --overwrite would delete the source, and writing into it would mix the two
        src, out = Path(source_root).resolve(), dest.resolve()
        if out == src or out in src.parents:
            raise DestinationError("destination is the source checkpoint or a folder that holds it", file=str(dest),
                                   hint="write to another folder")
    prepare_destination(dest, resume, overwrite)
    fingerprint = plan.fingerprint()
    done = _load_progress(dest, fingerprint) if resume else {}

    write_json_atomic(dest / "config.json", plan.config)
    for name in plan.extra_files:
        src = fetch_extra(name) if fetch_extra else Path(source_root or ".") / name
        write_bytes_atomic(dest / name, Path(src).read_bytes())

    shards: dict[str, dict[str, Any]] = {}

    def commit(pending: PendingShard, shard: ShardPlan, record: dict[str, Any]) -> None:
        # fsync + rename of shard i runs while shard i+1 is written; progress only after the rename.
        pending.commit()
        shards[shard.file] = record
        write_json_atomic(dest / PROGRESS, {"fingerprint": fingerprint, "shards": shards})
        if on_shard_done:
            on_shard_done(shard)

    with ThreadPoolExecutor(max_workers=1) as committer:
        in_flight: Future | None = None
        try:
            for shard in plan.shards:
                path = dest / shard.file
                record = done.get(shard.file)
                if record and path.exists() and path.stat().st_size == record["size"]:
                    shards[shard.file] = record
                    if progress:
                        progress(shard.nbytes)
                    continue
                started = time.perf_counter()
                sha, size, pending = write_shard_unsynced(
                    path, [(t.name, t.dtype, t.shape, t.nbytes, t.exact) for t in shard.tensors], produce,
                    on_bytes=progress,
                )
                if in_flight is not None:
                    try:
                        in_flight.result()  # at most one shard waits for the disk
                    except BaseException:
                        pending.discard()
                        raise
                in_flight = committer.submit(commit, pending, shard, {
                    "sha256": sha, "size": size, "seconds": round(time.perf_counter() - started, 3)})
            if in_flight is not None:
                in_flight.result()
        except BaseException:
            if in_flight is not None:  # let the shard being committed finish (or fail) before leaving
                try:
                    in_flight.result()
                except BaseException:
                    pass
            raise

    # Sizes of inexact tensors are only known now: the index takes them from the written headers.
    from m1.safetensors_io import read_header

    weight_map: dict[str, str] = {}
    total = 0
    for shard in plan.shards:
        header = read_header(dest / shard.file)
        for t in header.tensors.values():
            weight_map[t.name] = shard.file
            total += t.nbytes
    write_json_atomic(dest / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})

    manifest = {
        "m1_manifest_version": 1,
        "tool": f"m1 {__version__}",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "job": plan.job,
        "fingerprint": fingerprint,
        "plan": [{"file": s.file, "tensors": [t.name for t in s.tensors]} for s in plan.shards],
        "shards": {k: {"sha256": v["sha256"], "size": v["size"]} for k, v in shards.items()},
        "files": {name: file_sha256(dest / name).hexdigest() for name in ["config.json", *plan.extra_files, INDEX]},
    }
    write_json_atomic(dest / MANIFEST, manifest)
    (dest / PROGRESS).unlink(missing_ok=True)
    return manifest


def read_manifest(root: Path) -> dict[str, Any] | None:
    path = root / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise CheckpointError("manifest is not valid JSON", file=str(path),
                              hint="delete it or re-run the job") from None


def iter_plan_lines(plan: WritePlan) -> Iterable[str]:
    from m1.units import human_bytes

    for s in plan.shards:
        yield f"{s.file}  {len(s.tensors):6d} tensors  {human_bytes(s.nbytes):>10}"
    yield f"total: {len(plan.shards)} shards, {sum(len(s.tensors) for s in plan.shards)} tensors, " \
          f"{human_bytes(plan.total_bytes)}"
    for name in plan.extra_files:
        yield f"copy: {name}"
