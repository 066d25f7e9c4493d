"""Where a checkpoint's files live, behind one interface: a local folder here, a Hub repo in `m1.hub_read`.

A reader asks a storage for small files (config.json, the index), shard headers, a local path to read
tensor bytes from (a Hub shard is downloaded on first need), the extra files beside the weights, and the
identity of what it read (sizes and mtimes, or the Hub commit) for the resume fingerprint.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Protocol

from m1.errors import CheckpointError
from m1.safetensors_io import Header, read_header

EXTRA_FILE = re.compile(
    r"^(tokenizer\.json|tokenizer_config\.json|special_tokens_map\.json|generation_config\.json|vocab\.json|"
    r"merges\.txt|.*\.tiktoken|chat_template\.(jinja|json)|added_tokens\.json|(configuration|modeling)_.*\.py|"
    r"LICENSE.*|NOTICE.*)$"
)


def is_extra_file(name: str) -> bool:
    """Tokenizer, generation and remote-code files that travel with the weights."""
    return bool(EXTRA_FILE.match(name))


class Storage(Protocol):
    root: str  # how errors and reports name the checkpoint: a folder, or a repo id
    remote: bool
    revision: str | None

    def display(self, name: str) -> str: ...
    def exists(self, name: str) -> bool: ...
    def read_bytes(self, name: str) -> bytes: ...
    def header(self, file: str) -> Header: ...
    def local_path(self, file: str) -> Path: ...
    def extra_files(self) -> list[str]: ...
    def identity(self, files: list[str]) -> dict[str, Any]: ...
    def sources(self) -> list[Path]: ...  # the local paths it reads: no job may write there (m1.manifest)
    def manifest_path(self) -> Path | None: ...  # the m1 manifest that lists its files, when m1 made it


class LocalStorage:
    remote = False
    revision = None

    def __init__(self, root: str | Path) -> None:
        self.root = str(root)
        self.path = Path(root)

    def display(self, name: str) -> str:
        return str(self.path / name)

    def exists(self, name: str) -> bool:
        return (self.path / name).is_file()

    def read_bytes(self, name: str) -> bytes:
        try:
            return (self.path / name).read_bytes()
        except FileNotFoundError:
            raise CheckpointError("missing file", file=self.display(name),
                                  hint="is this a checkpoint folder?") from None
        except IsADirectoryError:
            raise CheckpointError("a folder where a file should be", file=self.display(name)) from None

    def header(self, file: str) -> Header:
        path = self.path / file
        if path.is_dir():
            raise CheckpointError("a folder where a shard should be", file=self.display(file),
                                  hint="fix the index so it names the shard files")
        return read_header(path, self.display(file), relative=file)

    def local_path(self, file: str) -> Path:
        return self.path / file

    def sources(self) -> list[Path]:
        return [self.path]

    def manifest_path(self) -> Path | None:
        from m1.manifest import MANIFEST

        return self.path / MANIFEST

    def extra_files(self) -> list[str]:
        return sorted(p.name for p in self.path.iterdir() if p.is_file() and is_extra_file(p.name))

    def identity(self, files: list[str]) -> dict[str, Any]:
        """Each file's size and mtime: a source replaced between a run and its --resume is a new plan."""
        out: dict[str, Any] = {}
        for name in files:
            try:
                st = (self.path / name).stat()
            except OSError:
                out[name] = None
                continue
            out[name] = [st.st_size, st.st_mtime_ns]
        return out
