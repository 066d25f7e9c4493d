"""Where a checkpoint's files live, behind one interface: a local folder here, a Hub repo in `m1.hub_read`.

A reader asks a storage for small files (config.json, the index), shard headers, a local path to read
tensor bytes from (a Hub shard is downloaded on first need), the extra files beside the weights, and the
identity of what it read (sizes and mtimes, or the Hub commit) for the resume fingerprint.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from m1.errors import CheckpointError, InternalError
from m1.safetensors_io import Header, read_header

if TYPE_CHECKING:
    import torch

    from m1.index import Index

EXTRA_FILE = re.compile(
    r"^(tokenizer\.json|tokenizer_config\.json|special_tokens_map\.json|generation_config\.json|vocab\.json|"
    r"merges\.txt|.*\.tiktoken|chat_template\.(jinja|json)|added_tokens\.json|(configuration|modeling)_.*\.py|"
    r"LICENSE.*|NOTICE.*)$"
)


def is_extra_file(name: str) -> bool:
    """Tokenizer, generation and remote-code files that travel with the weights."""
    return bool(EXTRA_FILE.match(name))


class Storage:
    """Where a checkpoint's files live. Subclasses give the required members; the optional capabilities are
    declared here with their defaults, so no caller has to probe for them."""

    root: str  # how errors and reports name the checkpoint: a folder, or a repo id
    remote: bool = False
    revision: str | None = None
    # True: tensors come from `read_tensor` (a format that decodes its own, e.g. stacked block types), never as
    # byte ranges of a safetensors shard.
    decodes_tensors: bool = False
    # The format a storage reads by itself, checks (`findings`) and sizes, or None: the config.json says.
    own_format: str | None = None
    mixed_float_dtypes: bool = False  # its type policy mixes float dtypes by design (not damage)
    # A view that decodes a quantized checkpoint as it reads it (m1.dequantized): what it decodes, e.g.
    # "fp8 -> BF16", which the plan records; None: tensors are read as stored.
    dequantized_from: str | None = None

    def display(self, name: str) -> str:
        raise NotImplementedError

    def exists(self, name: str) -> bool:
        raise NotImplementedError

    def read_bytes(self, name: str) -> bytes:
        raise NotImplementedError

    def header(self, file: str) -> Header:
        raise NotImplementedError

    def local_path(self, file: str) -> Path:
        raise NotImplementedError

    def extra_files(self) -> list[str]:
        raise NotImplementedError

    def identity(self, files: list[str]) -> dict[str, Any]:
        raise NotImplementedError

    # ---- optional capabilities ----
    @property
    def copy_in_kernel(self) -> bool:
        """Whether a reader may hand out byte ranges of a shard to be copied later (not while a shard may be
        deleted after its last read, as when streaming through bounded scratch)."""
        return not self.decodes_tensors

    def read_tensor(self, name: str) -> torch.Tensor:
        """One spec tensor, decoded by the storage itself (only where `decodes_tensors`)."""
        raise InternalError(f"{type(self).__name__} does not decode tensors itself", tensor=name)

    def stored_range(self, name: str) -> tuple[str, int, int]:
        """(file, offset, length) of the bytes `read_tensor` decoded (only where `decodes_tensors`), so they are
        hashed against the source's manifest as they pass (m1.source_check)."""
        raise InternalError(f"{type(self).__name__} does not decode tensors itself", tensor=name)

    def findings(self, check_hashes: bool = True) -> list[tuple[str, str, str | None, str | None]]:
        """(code, message, file, tensor) for what the storage's own format may get wrong beyond the spec checks
        (`m1 verify integrity` adds them to its report)."""
        return []

    def stored_as(self, name: str) -> tuple[str, int] | None:
        """The dtype (or block type) and bytes tensor `name` is stored in, where they differ from its header's
        decoded view (block types); None: as the header says."""
        return None

    def tokenizer_folder(self) -> Path | None:
        """A local folder holding its tokenizer.json and tokenizer_config.json (a file-set format may rebuild them
        from its metadata); None where there is none."""
        return None

    def index(self) -> Index | None:
        """Its tensors -> files, where its format lists them itself (a container with its own table); None: an
        index file, or the one file's header, says."""
        return None

    def shard_sizes(self) -> dict[str, int] | None:
        """The size of every file as the remote listing gives it, for a storage that downloads (None: local)."""
        return None

    def download_to(self, file: str, folder: Path) -> Path:
        """`file` fetched into `folder` (a remote storage streaming through bounded scratch)."""
        raise InternalError(f"{type(self).__name__} has no files to download", file=file)

    def sources(self) -> list[Path]:
        """The local paths it reads: no job may write there (m1.manifest.guard_source); none for a remote one."""
        return []

    def manifest_path(self) -> Path | None:
        """The m1 manifest that lists its files, when m1 made it (its sha256s are checked as the bytes pass)."""
        return None


class LocalStorage(Storage):

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


class StorageView(Storage):
    """Another storage seen through a reader that changes what it shows (a quantized checkpoint decoded, a
    format that stores no `<module>.weight`): everything a view does not override is the inner storage's."""

    def __init__(self, inner: Storage) -> None:
        self.inner = inner
        self.root = inner.root
        self.remote = inner.remote
        self.revision = inner.revision
        self.mixed_float_dtypes = inner.mixed_float_dtypes

    def display(self, name: str) -> str:
        return self.inner.display(name)

    def exists(self, name: str) -> bool:
        return self.inner.exists(name)

    def read_bytes(self, name: str) -> bytes:
        return self.inner.read_bytes(name)

    def header(self, file: str) -> Header:
        return self.inner.header(file)

    def local_path(self, file: str) -> Path:
        return self.inner.local_path(file)

    def extra_files(self) -> list[str]:
        return self.inner.extra_files()

    def identity(self, files: list[str]) -> dict[str, Any]:
        return self.inner.identity(files)

    def tokenizer_folder(self) -> Path | None:
        return self.inner.tokenizer_folder()

    def shard_sizes(self) -> dict[str, int] | None:
        return self.inner.shard_sizes()

    def download_to(self, file: str, folder: Path) -> Path:
        return self.inner.download_to(file, folder)

    def sources(self) -> list[Path]:
        return self.inner.sources()

    def manifest_path(self) -> Path | None:
        return self.inner.manifest_path()
