"""llama.cpp's split sets (`NAME-00001-of-0000N.gguf` ...): finding the files of one, and checking that they
belong together (each file's `split.no` / `split.count` agree with its name, `split.tensors.count` with the
tensors the files hold). A set is opened by its first file, or by the name it was written for (NAME.gguf)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from glob import escape as glob_escape
from pathlib import Path
from typing import TYPE_CHECKING

from m1.errors import CheckpointError
from m1.gguf.layout import RE_EXPORT, field_value

if TYPE_CHECKING:
    from gguf import GGUFReader

SPLIT_NAME = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")


def split_names(stem: str, count: int) -> list[str]:
    """llama.cpp's names of a split set: NAME-00001-of-0000N.gguf ..."""
    return [f"{stem}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]


def first_split(path: Path) -> Path:
    """`path` itself, or, where it does not exist, the first split of the set written for it (NAME.gguf ->
    NAME-00001-of-0000N.gguf, as `m1 convert ... NAME.gguf --split-max-size` and gguf-split name them)."""
    if path.exists() or not path.name.endswith(".gguf"):
        return path
    found = sorted(path.parent.glob(f"{glob_escape(path.name[:-5])}-00001-of-[0-9][0-9][0-9][0-9][0-9].gguf"))
    return found[0] if len(found) == 1 else path


def set_stem(files: list[str], path: Path) -> str:
    """NAME of a split set's files, or the stem of a single file (what its manifest is named after)."""
    m = SPLIT_NAME.match(files[0])
    return m["stem"] if m and len(files) > 1 else path.stem


@dataclass(frozen=True)
class SplitInfo:
    no: int | None
    count: int | None
    tensors: int | None


def split_info(reader: GGUFReader, display: str) -> SplitInfo:
    values = [field_value(reader, k) for k in SPLIT_KEYS]
    for key, value in zip(SPLIT_KEYS, values, strict=True):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise CheckpointError(f"{key} is {value!r}", file=display, hint=RE_EXPORT)
    return SplitInfo(*values)


def split_files(path: Path, reader: Callable[[str], GGUFReader]) -> list[str]:
    """The names of the files of the GGUF opened as `path`: itself, or every split of its set, each opened
    (`reader`, by name in path's folder) and checked against its name."""
    name, folder, root = path.name, path.parent, str(path)
    m = SPLIT_NAME.match(name)
    split = split_info(reader(name), root)
    if split.count is None or split.count <= 1 and m is None:
        if split.no not in (None, 0):
            raise CheckpointError(f"split.no is {split.no} but split.count is {split.count}", file=root,
                                  hint=RE_EXPORT)
        return [name]
    if m is None:
        raise CheckpointError(f"split.count is {split.count} but the name does not follow llama.cpp's "
                              "NAME-00001-of-0000N.gguf", file=root,
                              hint="rename the files as gguf-split names them")
    if int(m["count"]) != split.count or split.no != int(m["no"]) - 1:
        raise CheckpointError(f"the name says split {int(m['no'])} of {int(m['count'])} but its split.no and "
                              f"split.count say {split.no} (0-based) of {split.count}", file=root,
                              hint=RE_EXPORT)
    names = split_names(m["stem"], split.count)
    if split.no != 0:
        raise CheckpointError(f"split {split.no + 1} of {split.count}: a split set is opened by its first file",
                              file=root, hint=f"give {folder / names[0]}")
    for i, other in enumerate(names[1:], start=1):
        info = split_info(reader(other), str(folder / other))  # missing or unreadable: one line naming the split
        if info.no != i or info.count != split.count:
            raise CheckpointError(f"split.no {info.no} of split.count {info.count} where the name says "
                                  f"{i} (0-based) of {split.count}", file=str(folder / other),
                                  hint="the splits come from different exports; " + RE_EXPORT)
    return names


def check_split_total(first: GGUFReader, root: str, n_files: int, n_tensors: int) -> None:
    """A split set's `split.tensors.count` (in its first file) against the tensors its files hold."""
    if n_files == 1:
        return
    total = split_info(first, root).tensors
    if total is not None and total != n_tensors:
        raise CheckpointError(f"split.tensors.count is {total} but the {n_files} splits hold "
                              f"{n_tensors} tensors", file=root, hint=RE_EXPORT)
