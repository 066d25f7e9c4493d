"""A GGUF file's layout, checked as gguf-py parses it: what `m1.gguf.reader` opens every file with.

`open_reader(path)` is `gguf.GGUFReader` over a plain ndarray view of the memory map, which refuses, as it
parses, what cannot describe a sound file: an array longer than the file or than any M1 GGUF holds (before
its entries are parsed one by one), a tensor info of more than ggml's 4 dimensions, of a type gguf-py does
not know or of rows that are not whole blocks, and tensor infos that do not tile the data section (each
offset aligned, inside the file, no overlap, nothing unclaimed but alignment padding). Every problem is a
one-line `CheckpointError` naming the file (and the tensor).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from m1.config_checks import BOUND_FACTOR, MAX_SIZES
from m1.errors import CheckpointError

if TYPE_CHECKING:
    from gguf import GGUFReader

RE_EXPORT = "re-download or re-export the GGUF"
# The longest metadata array an M1 GGUF holds is its vocabulary (tokens, types, merges): gguf-py parses each
# entry as a numpy view of its own, so a longer one is refused by its length before it is parsed.
MAX_ARRAY_ENTRIES = MAX_SIZES["vocab_size"]
GGML_MAX_DIMS = 4
Fields = Mapping[str, Any]  # a reader's fields (gguf-py ReaderFields) by key
GGUF_READER_MESSAGES = ("GGUF magic", "version", "Duplicate", "duplicated", "alignment", "Unknown/unhandled",
                        "is not a valid", "empty")


def open_reader(path: Path) -> GGUFReader:
    """One GGUF file parsed and its layout checked; little-endian only."""
    try:
        if path.stat().st_size == 0:
            raise ValueError("the file is empty")
        reader = _plain_reader()(path)
    except FileNotFoundError:
        raise CheckpointError("missing GGUF file", file=str(path), hint=RE_EXPORT) from None
    except LayoutError as exc:
        raise CheckpointError(f"not a readable GGUF: {exc}", file=str(path), tensor=exc.tensor,
                              hint=f"the file is truncated or damaged; {RE_EXPORT}") from None
    except (ValueError, IndexError, KeyError, TypeError, OverflowError, MemoryError, OSError) as exc:
        raise CheckpointError(f"not a readable GGUF: {_reader_error(exc)}", file=str(path),
                              hint=f"the file is truncated or damaged; {RE_EXPORT}") from None
    if reader.byte_order != "I":
        raise CheckpointError("a big-endian GGUF: m1 reads little-endian GGUF only", file=str(path))
    return reader


def contents(field: Any) -> Any:
    """A metadata field's value, or None where it is absent or gguf-py cannot decode it."""
    if field is None:
        return None
    try:
        return field.contents()
    except (ValueError, IndexError, UnicodeDecodeError):
        return None


def field_value(reader: GGUFReader, key: str) -> Any:
    return contents(reader.fields.get(key))


@cache
def _plain_reader() -> type[GGUFReader]:
    """gguf.GGUFReader over a plain ndarray view of its memory map.

    The reader parses every metadata element (a 200064-token vocabulary, its types and merges: 600k elements
    for MiniMax-M1) as slices of `self.data`; slices of an `np.memmap` pay for memmap's `__array_finalize__`
    each time. The same map seen as a plain ndarray halves the open time and the memory it takes (full-size
    M1: 16.4 s -> 7.1 s, 700 -> 330 MB on this project's 2-core box); tensor data is still mapped, not read.
    """
    from gguf import GGUFReader, GGUFValueType

    class PlainGGUFReader(GGUFReader):
        """... which also refuses, as it parses, an array longer than the file or any M1 holds (before its
        entries are parsed one by one) and tensor infos that do not tile the data section (before any view of
        tensor data is made): `LayoutError`s."""

        _key = ""  # the metadata key being parsed
        _depth = 0  # 0: at a key or tensor info; >0: inside a value

        @property  # type: ignore[override]
        def data(self) -> np.ndarray:
            return self._plain

        @data.setter
        def data(self, value: np.ndarray) -> None:
            self._plain = value.view(np.ndarray)  # keeps the map alive through .base

        def _get_str(self, offset: int) -> tuple[np.ndarray, np.ndarray]:
            length, text = super()._get_str(offset)
            if self._depth == 0:
                self._key = bytes(text[:100]).decode("utf-8", "replace")
            return length, text

        def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple[int, list[np.ndarray], list[int],
                                                                           list[GGUFValueType]]:
            if raw_type == GGUFValueType.ARRAY:
                _check_array(self.data, int(orig_offs), self._key, "little" if self.byte_order == "I" else "big")
            self._depth += 1
            try:
                return super()._get_field_parts(orig_offs, raw_type)
            finally:
                self._depth -= 1

        def _build_tensors(self, start_offs: int, fields: list[Any]) -> None:
            check_layout([_extent(f) for f in fields], int(start_offs), len(self.data), int(self.alignment))
            super()._build_tensors(start_offs, fields)

    return PlainGGUFReader


class LayoutError(ValueError):
    """A GGUF header that cannot describe a sound file, found while it is parsed (tensor: the tensor it names)."""

    def __init__(self, message: str, tensor: str | None = None) -> None:
        super().__init__(message)
        self.tensor = tensor


# The fewest bytes one array entry takes, by GGUFValueType (UINT8 .. FLOAT64): scalars their size, a string
# (8) its uint64 length, an array (9) its element type and length.
_MIN_ENTRY = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 8: 8, 9: 12, 10: 8, 11: 8, 12: 8}


def _check_array(data: np.ndarray, offset: int, key: str, order: Literal["little", "big"] = "little") -> None:
    """An array value at `offset` (its uint32 element type, then its uint64 length) that fits the bytes left
    in the file and holds no more entries than any M1 GGUF needs; a short or unknown one gguf-py reports."""
    head = bytes(data[offset:offset + 12])
    if len(head) < 12:
        return
    entry = _MIN_ENTRY.get(int.from_bytes(head[:4], order))
    length = int.from_bytes(head[4:], order)
    if entry is None:
        return
    left = len(data) - offset - 12
    if length * entry > left:
        raise LayoutError(f"metadata {key} is an array of {length} entries, more than the {left} bytes left in the "
                          "file can hold (a damaged length)")
    if length > MAX_ARRAY_ENTRIES:
        raise LayoutError(f"metadata {key} is an array of {length} entries; m1 reads arrays of up to "
                          f"{MAX_ARRAY_ENTRIES} ({BOUND_FACTOR}x MiniMax-M1's vocabulary)")


@dataclass(frozen=True)
class Extent:
    """Where one tensor info puts its data: bytes [offset, offset + nbytes) of the data section."""

    name: str
    offset: int
    nbytes: int

    @property
    def end(self) -> int:
        return self.offset + self.nbytes


def _extent(field: Any) -> Extent:
    """A tensor info's extent, sized as ggml sizes it (blocks of its type), in Python integers (no overflow)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    _, name_data, n_dims, dims, raw_type, offset = field.parts
    name = bytes(name_data).decode("utf-8", "replace")
    if int(n_dims[0]) > GGML_MAX_DIMS:
        raise LayoutError(f"a tensor info of {int(n_dims[0])} dimensions (ggml has at most {GGML_MAX_DIMS})", name)
    try:
        qtype = GGMLQuantizationType(int(raw_type[0]))
    except ValueError:
        raise LayoutError(f"GGML type {int(raw_type[0])}, which gguf-py does not know", name) from None
    block, type_size = GGML_QUANT_SIZES[qtype]
    ne = [int(d) for d in dims]
    if ne and ne[0] % block:
        raise LayoutError(f"a row of {ne[0]} values is not a whole number of {qtype.name} blocks of {block}", name)
    n = 1
    for d in ne:
        n *= d
    return Extent(name, int(offset[0]), n // block * type_size)


def _align(n: int, alignment: int) -> int:
    return n + (-n % alignment)


def check_layout(extents: list[Extent], data_offset: int, file_size: int, alignment: int) -> None:
    """What llama.cpp's loader checks of the tensor infos, and more: each offset a multiple of the alignment,
    each extent inside the file, no two at the same bytes or overlapping, and, in offset order, nothing between
    them but alignment padding, from the start of the data section to the end of the file. A tensor count one
    short (the last info read as padding, the data section shifted) leaves the last tensor's bytes unclaimed."""
    for e in extents:
        if e.offset % alignment:
            raise LayoutError(f"its data offset {e.offset} is not a multiple of the alignment {alignment} (llama.cpp "
                              "refuses the file)", e.name)
        if data_offset + e.end > file_size:
            raise LayoutError(f"its data (bytes {e.offset}..{e.end} of the data section, which starts at byte "
                              f"{data_offset}) runs past the end of the file ({file_size} bytes: truncated, or a "
                              "damaged offset)", e.name)
    ordered = sorted(extents, key=lambda e: (e.offset, e.end, e.name))
    for prev, cur in zip(ordered, ordered[1:], strict=False):
        if cur.offset == prev.offset and (cur.nbytes or prev.nbytes):
            raise LayoutError(f"its tensor info points at the same bytes as {prev.name} (data offset {cur.offset})",
                              cur.name)
        if cur.offset < prev.end:
            raise LayoutError(f"its data (bytes {cur.offset}..{cur.end} of the data section) overlaps {prev.name}'s "
                              f"({prev.offset}..{prev.end})", cur.name)
    end, last = 0, None
    for cur in ordered:
        if cur.offset > _align(end, alignment):
            where = f"between {last.name}'s data and this tensor's" if last else "at the start of the data section"
            raise LayoutError(f"{cur.offset - end} bytes {where} that no tensor info claims (the tensor infos do not "
                              "tile the data section)", cur.name)
        end, last = max(end, cur.end), cur
    if ordered and file_size > data_offset + _align(end, alignment):
        raise LayoutError(f"{file_size - data_offset - end} bytes after the last tensor's data ({ordered[-1].name}) "
                          f"are unclaimed by any tensor info: the header's tensor count ({len(extents)}) is short, or "
                          "a tensor info was lost")


def _reader_error(exc: BaseException) -> str:
    """gguf-py's own complaints as they are; numpy's (a length or offset past the end of the map) in words."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if isinstance(exc, (ValueError, KeyError)) and any(m in text for m in GGUF_READER_MESSAGES):
        return text[:160]
    return "its header or data runs past the end of the file (truncated, or a damaged length)"
