"""A lazy reader over an M1 checkpoint: a local folder (sharded or single-file safetensors, or `.bin`)
or a Hub repo id (headers over HTTP range requests; a shard is downloaded only when its data is read).

Nothing is loaded at open: the index and config are read, headers on first need, and a tensor is one
byte range read into one buffer. `iter_chunks` streams a tensor in bounded pieces for copying.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np

from m1.config import M1Config
from m1.errors import CheckpointError, UsageError
from m1.safetensors_io import TORCH_DTYPES, Header, TensorInfo, read_header
from m1.spec import classify

if TYPE_CHECKING:
    import torch

INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_NAMES = ("model.safetensors", "pytorch_model.bin")
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
CHUNK_BYTES = 64 << 20


def safe_relative(name: str, index_file: str, tensor: str | None = None) -> str:
    """A weight_map file name must stay inside the checkpoint: no '..', no absolute path."""
    p = PurePosixPath(name)
    if not name or p.is_absolute() or ".." in p.parts or "\\" in name or name.startswith("~"):
        raise CheckpointError(f"weight_map names the file {name!r}, which is outside the checkpoint", file=index_file,
                              tensor=tensor, hint="refusing it; fix the index so it names files inside the folder")
    return name


def is_repo_id(source: str) -> bool:
    return not Path(source).exists() and bool(REPO_ID.match(source))


@dataclass
class Checkpoint:
    root: str  # local folder, or repo id for a Hub checkpoint
    config: M1Config
    weight_map: dict[str, str]  # tensor name -> file relative to root
    index_file: str | None
    index_metadata: dict[str, Any] = field(default_factory=dict)
    revision: str | None = None
    remote: bool = False
    _headers: dict[str, Header] = field(default_factory=dict, repr=False)
    _bin: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)
    _local_files: dict[str, Path] = field(default_factory=dict, repr=False)
    _remote_sizes: dict[str, int | None] = field(default_factory=dict, repr=False)
    _by_layer: tuple[int, dict[int | None, list[str]]] | None = field(default=None, repr=False)

    # ---- opening ---------------------------------------------------------------------------------
    @classmethod
    def open(cls, source: str | Path, revision: str | None = None) -> Checkpoint:
        source = str(source)
        if is_repo_id(source):
            from m1.hub_read import open_remote

            return open_remote(source, revision)
        root = Path(source)
        if not root.is_dir():
            raise UsageError("not a checkpoint folder or Hub repo id", file=source,
                             hint="give a folder holding config.json and safetensors shards, or owner/name")
        config = M1Config.from_file(root / "config.json")
        weight_map, index_file, meta = cls._read_index(root)
        return cls(str(root), config, weight_map, index_file, meta)

    @staticmethod
    def _read_index(root: Path) -> tuple[dict[str, str], str | None, dict[str, Any]]:
        for name in INDEX_NAMES:
            path = root / name
            if path.exists():
                try:
                    obj = json.loads(path.read_text())
                    weight_map = obj["weight_map"]
                    if not isinstance(weight_map, dict):
                        raise TypeError
                except (ValueError, KeyError, TypeError):
                    raise CheckpointError("not a valid index (needs a weight_map object)", file=str(path)) from None
                for tensor, file in weight_map.items():
                    if not isinstance(file, str):
                        raise CheckpointError("weight_map value is not a file name", file=str(path), tensor=tensor)
                    safe_relative(file, str(path), tensor)
                return dict(weight_map), name, obj.get("metadata") or {}
        for name in SINGLE_NAMES:
            path = root / name
            if path.exists():
                if name.endswith(".safetensors"):
                    header = read_header(path, str(path))
                    return {t: name for t in header.tensors}, None, {}
                return {t: name for t in _load_bin(path)}, None, {}
        raise CheckpointError("no model.safetensors(.index.json) or pytorch_model.bin(.index.json)", file=str(root),
                              hint="is this a checkpoint folder?")

    # ---- names -------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self.weight_map)

    def files(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    def by_layer(self) -> dict[int | None, list[str]]:
        """Reverse index: layer -> tensor names (None for embedding, final norm, head); built once."""
        key = len(self.weight_map)
        if self._by_layer is None or self._by_layer[0] != key:
            out: dict[int | None, list[str]] = defaultdict(list)
            for name, file in self.weight_map.items():
                out[classify(name, file).layer].append(name)
            self._by_layer = (key, dict(out))
        return self._by_layer[1]

    def names_in_layer(self, layer: int | None) -> list[str]:
        return self.by_layer().get(layer, [])

    # ---- headers -----------------------------------------------------------------------------------
    def local_path(self, file: str) -> Path:
        if file in self._local_files:
            return self._local_files[file]
        if self.remote:
            from m1.hub_read import download_file

            path = download_file(self.root, file, self.revision)
            self._local_files[file] = path
            # Hub headers carry offsets relative to the data section; re-read the real one.
            self._headers[file] = read_header(path, f"{self.root}/{file}", relative=file)
            return path
        return Path(self.root) / file

    def header(self, file: str) -> Header:
        if file not in self._headers:
            if file.endswith(".bin"):
                tensors = _load_bin(self.local_path(file))
                self._bin[file] = tensors
                infos = {n: TensorInfo(n, _dtype_name(t, file, n), tuple(t.shape), file, 0,
                                       t.numel() * t.element_size()) for n, t in tensors.items()}
                self._headers[file] = Header(file, infos, {}, 0, 0)
            elif self.remote:
                from m1.hub_read import remote_header

                self._headers[file] = remote_header(self.root, file, self.revision, self._remote_sizes.get(file))
            else:
                self._headers[file] = read_header(self.local_path(file), f"{self.root}/{file}", relative=file)
        return self._headers[file]

    def info(self, name: str) -> TensorInfo:
        file = self.weight_map.get(name)
        if file is None:
            raise CheckpointError("tensor not in the checkpoint", file=self.root, tensor=name)
        info = self.header(file).tensors.get(name)
        if info is None:
            raise CheckpointError("the index names this tensor but the shard lacks it", file=file, tensor=name,
                                  hint="the index and shards disagree; re-download the shard or fix the index")
        return info

    # ---- data --------------------------------------------------------------------------------------
    def get(self, name: str) -> torch.Tensor:
        """The tensor, read with one copy into memory that the caller owns."""
        import torch

        if self.remote:
            self.local_path(self.weight_map.get(name, ""))
        info = self.info(name)
        if info.file in self._bin:
            return self._bin[info.file][name].clone()
        dtype = TORCH_DTYPES[info.dtype]
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=dtype)
        path = self.local_path(info.file)
        buf = np.empty(info.nbytes, dtype=np.uint8)
        with open(path, "rb", buffering=0) as f:
            f.seek(info.start)
            got = f.readinto(memoryview(buf))
        if got != info.nbytes:
            raise CheckpointError("truncated while reading", file=info.file, tensor=name, hint="re-download it")
        return torch.from_numpy(buf).view(dtype).reshape(info.shape)

    def iter_chunks(self, name: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[tuple[int, memoryview]]:
        """The raw bytes of a tensor in pieces of whole rows: (first row, bytes)."""
        if self.remote:
            self.local_path(self.weight_map.get(name, ""))
        info = self.info(name)
        if info.file in self._bin:
            from m1.safetensors_io import tensor_bytes

            yield 0, tensor_bytes(self._bin[info.file][name])
            return
        row_bytes = max(1, info.nbytes // info.shape[0]) if info.shape and info.shape[0] else max(1, info.nbytes)
        rows_per_chunk = max(1, chunk_bytes // row_bytes)
        step = rows_per_chunk * row_bytes
        with open(self.local_path(info.file), "rb", buffering=0) as f:
            f.seek(info.start)
            done = 0
            while done < info.nbytes:
                want = min(step, info.nbytes - done)
                # A fresh buffer per chunk: the writer hashes and writes it on other threads.
                buf = bytearray(want)
                got = f.readinto(buf)
                if got != want:
                    raise CheckpointError("truncated while reading", file=info.file, tensor=name, hint="re-download it")
                yield done // row_bytes, memoryview(buf)
                done += want

    def layer_weights(self, layer: int) -> dict[str, torch.Tensor]:
        """A layer's tensors with names relative to `model.layers.{layer}.` (for the verify engine)."""
        prefix = f"model.layers.{layer}."
        return {n[len(prefix):]: self.get(n) for n in self.names_in_layer(layer)}

    def global_weights(self) -> dict[str, torch.Tensor]:
        return {n: self.get(n) for n in self.names_in_layer(None)}

    def extra_files(self) -> list[str]:
        """Tokenizer, generation and remote-code files beside the weights."""
        if self.remote:
            from m1.hub_read import list_extra_files

            return list_extra_files(self.root, self.revision)
        root = Path(self.root)
        return sorted(p.name for p in root.iterdir() if p.is_file() and is_extra_file(p.name))


EXTRA_FILE = re.compile(
    r"^(tokenizer\.json|tokenizer_config\.json|special_tokens_map\.json|generation_config\.json|vocab\.json|"
    r"merges\.txt|.*\.tiktoken|chat_template\.(jinja|json)|added_tokens\.json|(configuration|modeling)_.*\.py|"
    r"LICENSE.*|NOTICE.*)$"
)


def is_extra_file(name: str) -> bool:
    return bool(EXTRA_FILE.match(name))


def _dtype_name(t: torch.Tensor, file: str, name: str) -> str:
    from m1.safetensors_io import DTYPE_NAMES

    try:
        return DTYPE_NAMES[t.dtype]
    except KeyError:
        raise CheckpointError(f"unsupported dtype {t.dtype}", file=file, tensor=name) from None


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises many types for a bad pickle
        raise CheckpointError(f"cannot load as a weights-only torch checkpoint ({type(exc).__name__})",
                              file=str(path), hint="only plain tensor state dicts are accepted") from None
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError("not a state dict of tensors", file=str(path))
    return obj
