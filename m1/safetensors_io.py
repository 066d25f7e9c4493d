"""The safetensors file format, read and written in a streaming way.

Reading parses only the header (8-byte little-endian length + JSON), so a 912 GB checkpoint is
inspected in seconds and a tensor is read as one byte range. Writing streams tensor bytes into a
temporary file behind a header computed from the plan, then fsyncs and renames: a shard either
exists whole or not at all. Reading back is checked in the tests with the safetensors library.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    pass

from m1.atomic_io import (
    ChunkSink,
    PendingShard,
    Produced,
    file_sha256,
    raise_if_disk_full,
    write_all,
)
from m1.dtypes import DTYPE_BYTES
from m1.errors import CheckpointError, InternalError

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit



@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str  # path of the shard, relative to the checkpoint root
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    file: str
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int
    file_size: int  # bytes on disk (or declared by the Hub)

    @property
    def data_end(self) -> int:
        return max((t.end for t in self.tensors.values()), default=self.data_start)


def _header_ints(value: Any, length: int | None = None) -> tuple[int, ...] | None:
    """A JSON list of integers >= 0 that fit in 64 bits (no floats, bools or strings), as the safetensors
    library requires; None if it is anything else."""
    if not isinstance(value, list) or length is not None and len(value) != length:
        return None
    if not all(type(v) is int and 0 <= v < 1 << 64 for v in value):
        return None
    return tuple(value)


def _header_metadata(value: Any, file: str) -> dict[str, str]:
    """`__metadata__`: absent, null or a string -> string map, nothing else (the library's rule)."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise CheckpointError(f"corrupt header: __metadata__ must map strings to strings, got {json.dumps(value)[:80]}",
                              file=file, hint="re-download or re-convert this shard")
    return value


def _header_entry(name: str, entry: Any, file: str) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one tensor entry, every field checked for its JSON type."""
    hint = "re-download or re-convert this shard"
    if not isinstance(entry, dict):
        raise CheckpointError(f"corrupt header entry: {json.dumps(entry)[:80]} is not an object", file=file,
                              tensor=name, hint=hint)
    for key in ("dtype", "shape", "data_offsets"):
        if key not in entry:
            raise CheckpointError(f"corrupt header entry: no {key!r}", file=file, tensor=name, hint=hint)
    dtype = entry["dtype"]
    shape = _header_ints(entry["shape"])
    offsets = _header_ints(entry["data_offsets"], 2)
    if shape is None:
        raise CheckpointError(f"corrupt header entry: shape {json.dumps(entry['shape'])[:80]} is not a list of "
                              "non-negative integers", file=file, tensor=name, hint=hint)
    if offsets is None:
        raise CheckpointError(f"corrupt header entry: data_offsets {json.dumps(entry['data_offsets'])[:80]} is not "
                              "two non-negative integers", file=file, tensor=name, hint=hint)
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise CheckpointError(f"unknown dtype {json.dumps(dtype)[:40]} (m1 reads {', '.join(DTYPE_BYTES)})",
                              file=file, tensor=name, hint=hint)
    begin, end = offsets
    if end < begin or end - begin != math.prod(shape) * DTYPE_BYTES[dtype]:
        raise CheckpointError(f"corrupt header: offsets {begin}..{end} do not fit {dtype}{list(shape)}",
                              file=file, tensor=name, hint=hint)
    return dtype, shape, begin, end


def _check_data_layout(tensors: Iterable[TensorInfo], data_start: int, file_size: int, file: str) -> None:
    """The data section is covered exactly, as the safetensors library requires: sorted by offsets, the
    tensors start at its first byte, each begins where the previous one ends (no overlap, no gap), and
    the last ends at the end of the file."""
    hint = "re-download or re-convert this shard"
    spans = sorted((t.start, t.end, t.name) for t in tensors)
    last = max(spans, key=lambda s: s[1], default=None)
    if last is not None and last[1] > file_size:
        raise CheckpointError(f"truncated: data ends at byte {last[1]} but the file has {file_size}", file=file,
                              tensor=last[2], hint=hint)
    position, previous = data_start, None
    for begin, end, name in spans:
        offsets = f"{begin - data_start}..{end - data_start}"
        if begin < position:
            raise CheckpointError(f"corrupt header: data_offsets {offsets} overlap the bytes of tensor {previous[2]} "
                                  f"({previous[0] - data_start}..{previous[1] - data_start})", file=file, tensor=name,
                                  hint=hint)
        if begin > position:
            raise CheckpointError(f"corrupt header: the {begin - position} bytes before its data_offsets {offsets} "
                                  "belong to no tensor", file=file, tensor=name, hint=hint)
        position, previous = end, (begin, end, name)
    if position != file_size:
        raise CheckpointError(f"corrupt header: the {file_size - position} bytes after the last tensor's data belong "
                              "to no tensor", file=file, tensor=previous[2] if previous else None, hint=hint)


def parse_header(raw: bytes, file: str, file_size: int, relative: str | None = None) -> Header:
    """Parse a header from the first bytes of a file (at least 8 + its declared length).

    As strict as the safetensors library: integer offsets and dims, known dtypes, a string map for
    `__metadata__`, and a data section covered exactly by the tensors (no overlap, gap or trailing bytes).
    `file` names the file in errors; `relative` (default: `file`) is the shard's path relative to the
    checkpoint root, recorded in each TensorInfo so that the reader can open it again.
    """
    if file_size < 8 or len(raw) < 8:
        raise CheckpointError("truncated: shorter than the 8-byte header length", file=file, hint="re-download it")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > MAX_HEADER_BYTES or 8 + n > file_size:
        raise CheckpointError(f"corrupt header: declares {n} header bytes in a {file_size}-byte file", file=file,
                              hint="the file is truncated or not safetensors; re-download it")
    if len(raw) < 8 + n:
        raise CheckpointError("truncated header", file=file, hint="re-download it")
    try:
        obj = json.loads(raw[8 : 8 + n].decode("utf-8"))
        if not isinstance(obj, dict):
            raise ValueError("not an object")
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"corrupt header: not valid JSON ({exc})", file=file, hint="re-download it") from None
    metadata = _header_metadata(obj.pop("__metadata__", None), file)
    data_start = 8 + n
    tensors: dict[str, TensorInfo] = {}
    for name, entry in obj.items():
        dtype, shape, begin, end = _header_entry(name, entry, file)
        tensors[name] = TensorInfo(name, dtype, shape, relative or file, data_start + begin, data_start + end)
    _check_data_layout(tensors.values(), data_start, file_size, file)
    return Header(file, tensors, metadata, data_start, file_size)


def read_header(path: Path, display: str | None = None, relative: str | None = None) -> Header:
    display = display or str(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) == 8:
                (n,) = struct.unpack("<Q", head)
                head += f.read(min(n, MAX_HEADER_BYTES))
    except FileNotFoundError:
        raise CheckpointError("missing shard", file=display, hint="download it again, or run `m1 pull`") from None
    return parse_header(head, display, size, relative)


def encode_header(entries: Iterable[tuple[str, str, tuple[int, ...], int]], metadata: dict[str, str] | None = None,
                  min_length: int = 0) -> bytes:
    """Header bytes (length prefix included) for (name, dtype, shape, nbytes) in data order."""
    obj: dict[str, object] = {}
    if metadata:
        obj["__metadata__"] = metadata
    offset = 0
    for name, dtype, shape, nbytes in entries:
        obj[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    body = json.dumps(obj, separators=(",", ":")).encode()
    length = max(len(body), min_length)
    length += -length % 8  # safetensors pads the header with spaces to 8-byte alignment
    return struct.pack("<Q", length) + body.ljust(length, b" ")


def header_bytes(planned: list[tuple[str, str, tuple[int, ...], int, bool]],
                 metadata: dict[str, str] | None = None) -> int:
    """The header's bytes (length prefix included) `write_shard_unsynced` writes for `planned`: exact, as the
    header of exact tensors is written from the plan and that of inexact ones fills the space reserved here."""
    guess = encode_header([(n, d, s, b) for n, d, s, b, _ in planned], metadata)
    if all(p[4] for p in planned):
        return len(guess)
    reserve = _reserve(len(guess), len(planned))
    return 8 + reserve + -reserve % 8


def _reserve(guess: int, tensors: int) -> int:
    return guess - 8 + 256 * tensors  # room for each inexact tensor's real shape and offsets


def write_shard(
    path: Path,
    planned: list[tuple[str, str, tuple[int, ...], int, bool]],
    produce: Callable[[str], Produced],
    metadata: dict[str, str] | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> tuple[str, int]:
    """Write one shard atomically; returns (sha256, size)."""
    sha, size, pending = write_shard_unsynced(path, planned, produce, metadata, on_bytes)
    pending.commit()
    return sha, size


def write_shard_unsynced(
    path: Path,
    planned: list[tuple[str, str, tuple[int, ...], int, bool]],
    produce: Callable[[str], Produced],
    metadata: dict[str, str] | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> tuple[str, int, PendingShard]:
    """Write one shard under a temporary name; returns (sha256, size, the pending shard to commit).

    `planned` is (name, dtype, shape, nbytes, exact) in data order. When every size is exact the header
    is written first and the hash is computed while streaming. Otherwise (quantized tensors whose small
    JSON state is only known after quantizing) header space is reserved, the header is filled in at the
    end (padded with spaces, as the format allows) and the file is hashed once more.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    exact = all(p[4] for p in planned)
    sha = hashlib.sha256()
    try:
        with open(tmp, "wb", buffering=0) as f:
            fd = f.fileno()
            if exact:
                header = encode_header([(n, d, s, b) for n, d, s, b, _ in planned], metadata)
                write_all(fd, header)
                sha.update(header)
            else:
                guess = encode_header([(n, d, s, b) for n, d, s, b, _ in planned], metadata)
                reserve = _reserve(len(guess), len(planned))
                write_all(fd, b"\0" * (8 + reserve))
            actual: list[tuple[str, str, tuple[int, ...], int]] = []
            with ChunkSink(fd, sha if exact else None) as sink:  # its threads end before `f` closes
                for name, dtype, shape, nbytes, is_exact in planned:
                    out = produce(name)
                    written = sink.put_all(out.chunks, on_bytes)
                    if is_exact and (written != nbytes or out.dtype != dtype or tuple(out.shape) != tuple(shape)):
                        raise InternalError(
                            f"produced {out.dtype}{list(out.shape)} ({written} bytes), planned {dtype}{list(shape)} "
                            f"({nbytes} bytes)", file=path.name, tensor=name)
                    actual.append((name, out.dtype, tuple(out.shape), written))
            if not exact:
                header = encode_header(actual, metadata, min_length=reserve)
                if len(header) != 8 + reserve:
                    raise InternalError("reserved header space too small", file=path.name)
                os.pwrite(fd, header, 0)
        if not exact:
            sha = file_sha256(tmp)
        size = tmp.stat().st_size
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        raise_if_disk_full(exc, path)
        raise
    return sha.hexdigest(), size, PendingShard(tmp, path)


