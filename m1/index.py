"""The checkpoint index (`model.safetensors.index.json`), parsed and checked in one place for every reader."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from m1.errors import CheckpointError

INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_NAMES = ("model.safetensors", "pytorch_model.bin")
SHARD_SUFFIXES = (".safetensors", ".bin")  # a folder checkpoint's weight files


def file_set_suffixes() -> tuple[str, ...]:
    """The suffixes of the file-set formats' files (m1.formats' `file_suffix`), in registry order."""
    from m1.formats import all_formats

    return tuple(dict.fromkeys(f.file_suffix for f in all_formats() if f.file_suffix is not None))


def weight_file_suffixes() -> tuple[str, ...]:
    """Every suffix a weight file may have: a folder's shards, and a file-set format's files (whose index its
    reader synthesizes)."""
    return tuple(dict.fromkeys((*SHARD_SUFFIXES, *file_set_suffixes())))


def _spelled(suffixes: tuple[str, ...]) -> str:
    """('.a', '.b', '.c') -> '.a, .b or .c'."""
    return suffixes[0] if len(suffixes) == 1 else f"{', '.join(suffixes[:-1])} or {suffixes[-1]}"


@dataclass(frozen=True)
class Index:
    weight_map: dict[str, str]  # tensor name -> file relative to the checkpoint root
    metadata: dict[str, Any] = field(default_factory=dict)
    file: str | None = None  # the index's own name; None for a single-file checkpoint


def safe_relative(name: str, index_file: str, tensor: str | None = None,
                  suffixes: tuple[str, ...] | None = None) -> str:
    """A weight_map file name must name a weight file inside the checkpoint: no '..', no absolute path."""
    p = PurePosixPath(name)
    if not name or p.is_absolute() or ".." in p.parts or "\\" in name or name.startswith("~"):
        raise CheckpointError(f"weight_map names the file {name!r}, which is outside the checkpoint", file=index_file,
                              tensor=tensor, hint="refusing it; fix the index so it names files inside the folder")
    suffixes = suffixes or weight_file_suffixes()
    if not p.parts or not name.endswith(suffixes):
        raise CheckpointError(f"weight_map names {name!r}, which is not a {_spelled(suffixes)} file",
                              file=index_file, tensor=tensor,
                              hint="fix the index so it names the shard that holds the tensor")
    return name


def parse_index(text: str | bytes, display: str, name: str | None = None) -> Index:
    """An index from its JSON text; `display` names it in errors (a path, or repo/file)."""
    try:
        obj = json.loads(text)
        weight_map = obj["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise CheckpointError("not a valid index (needs a weight_map object)", file=display) from None
    if not weight_map:
        raise CheckpointError("the index's weight_map is empty: it maps no tensor to a file", file=display,
                              hint="re-download the index, or re-run the job that wrote it")
    suffixes = weight_file_suffixes()
    for tensor, file in weight_map.items():
        if not isinstance(file, str):
            raise CheckpointError("weight_map value is not a file name", file=display, tensor=tensor)
        safe_relative(file, display, tensor, suffixes)
    metadata = obj.get("metadata")
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"the index's metadata is a {type(metadata).__name__}, not an object", file=display,
                              hint="fix or re-download the index")
    total = metadata.get("total_size")
    if total is not None and (not isinstance(total, (int, float)) or isinstance(total, bool) or total < 0):
        raise CheckpointError(f"the index's total_size {total!r} is not a byte count", file=display,
                              hint="fix or re-download the index")
    return Index(dict(weight_map), metadata, name)
