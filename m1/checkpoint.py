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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from m1.config import M1Config
from m1.dtypes import dtype_name, torch_dtype
from m1.errors import CheckpointError, ConfigError, UsageError
from m1.formats import get_format
from m1.index import INDEX_NAMES, SINGLE_NAMES, Index, parse_index
from m1.safetensors_io import Header, TensorInfo
from m1.schemes import companion_suffixes
from m1.spec import classify
from m1.storage import LocalStorage, Storage

if TYPE_CHECKING:
    import torch

class ReadObserver(Protocol):
    """Sees every byte range a job reads from the checkpoint (m1.source_check.SourceCheck hashes them against the
    source's manifest)."""

    def observe(self, file: str, offset: int, length: int, data: Any = None) -> None: ...


REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
CHUNK_BYTES = 64 << 20


def is_repo_id(source: str) -> bool:
    return not Path(source).exists() and bool(REPO_ID.match(source))


@dataclass
class Checkpoint:
    storage: Storage
    config: M1Config
    weight_map: dict[str, str]  # tensor name -> file relative to root
    index_file: str | None
    index_metadata: dict[str, Any] = field(default_factory=dict)
    _headers: dict[str, Header] = field(default_factory=dict, repr=False)
    _bin: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)
    _by_layer: tuple[int, dict[int | None, list[str]]] | None = field(default=None, repr=False)
    source_check: ReadObserver | None = field(default=None, repr=False)  # a job's check of what it reads

    @property
    def root(self) -> str:
        return self.storage.root

    @property
    def remote(self) -> bool:
        return self.storage.remote

    @property
    def revision(self) -> str | None:
        return self.storage.revision

    # ---- opening ---------------------------------------------------------------------------------
    @classmethod
    def open(cls, source: str | Path, revision: str | None = None) -> Checkpoint:
        from m1.formats import format_for_path
        from m1.manifest import lock_held, note_source, rewritten_error

        source = str(source)
        fmt = format_for_path(source)
        if fmt is not None and fmt.open_storage is not None:  # a format that reads its own files
            storage = fmt.open_storage(source)
            folder = Path(source).parent
            if storage is None and lock_held(folder):
                raise rewritten_error(Path(source))  # --overwrite removed it and is writing it again
            note_source(folder, refuse_if_held=False)  # the folder may hold other files being written
            if storage is not None:
                return cls.from_storage(storage)
        if is_repo_id(source):
            from m1.hub_read import HubStorage

            return cls.from_storage(viewed(HubStorage.open(source, revision)))
        if not Path(source).is_dir():
            raise UsageError("not a checkpoint folder or Hub repo id", file=source,
                             hint="give a folder holding config.json and safetensors shards, or owner/name")
        note_source(Path(source), refuse_if_held=True)
        return cls.from_storage(viewed(LocalStorage(source)))

    @classmethod
    def from_storage(cls, storage: Storage) -> Checkpoint:
        display = storage.display("config.json")
        if not storage.exists("config.json"):
            raise ConfigError("config.json not found", file=display, hint="point at a checkpoint directory")
        try:
            raw = json.loads(storage.read_bytes("config.json"))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"not valid JSON ({exc.msg} at line {exc.lineno})", file=display) from None
        except UnicodeDecodeError:
            raise ConfigError("not valid JSON (not UTF-8 text)", file=display) from None
        config = M1Config.from_dict(raw, source=display)
        ckpt = cls(storage, config, {}, None)
        index = ckpt._read_index()
        ckpt.weight_map = {ckpt._spec_name(name, file): file for name, file in index.weight_map.items()}
        ckpt.index_file, ckpt.index_metadata = index.file, index.metadata
        return ckpt

    # A format whose tensor names differ from the spec's is seen here through its name table: everything
    # above the reader (planner, integrity, engine) works with spec names only.
    def _spec_name(self, name: str, file: str | None) -> str:
        names = get_format(self.config.flavour).names
        return name if names.identity else names.to_spec(name, file, companion_suffixes())

    def _spec_header(self, header: Header) -> Header:
        if get_format(self.config.flavour).names.identity:
            return header
        infos = {}
        for t in header.tensors.values():
            name = self._spec_name(t.name, header.file)
            infos[name] = replace(t, name=name)
        return replace(header, tensors=infos)

    def _read_index(self) -> Index:
        own = self.storage.index()
        if own is not None:
            return own
        for name in INDEX_NAMES:
            if self.storage.exists(name):
                return parse_index(self.storage.read_bytes(name), self.storage.display(name), name)
        for name in SINGLE_NAMES:
            if self.storage.exists(name):
                if name.endswith(".safetensors"):  # stored names: from_storage maps them to the spec's
                    header = self.storage.header(name)
                    return Index({t: name for t in header.tensors})
                return Index({t: name for t in _load_bin(self.local_path(name))})
        raise CheckpointError("no model.safetensors(.index.json) or pytorch_model.bin(.index.json)", file=self.root,
                              hint="is this a checkpoint folder?")

    def restricted(self, names: list[str]) -> Checkpoint:
        """The same checkpoint seen through a subset of its tensors (headers shared, nothing re-read)."""
        return replace(self, weight_map={n: self.weight_map[n] for n in names}, _by_layer=None)

    def identity(self) -> dict[str, Any]:
        """What a plan read: the storage's identity of config, index and shards (for --resume)."""
        names = ["config.json", *([self.index_file] if self.index_file else []), *self.files()]
        return {"revision": self.revision, "files": self.storage.identity(names)}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_bin"] = {}  # a worker process reloads .bin tensors lazily instead of unpickling them
        state["_headers"] = {k: v for k, v in self._headers.items() if not k.endswith(".bin")}
        state["source_check"] = None  # a thread: each worker process runs its own
        return state

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
        return self.storage.local_path(file)

    def header(self, file: str) -> Header:
        if file not in self._headers:
            if file.endswith(".bin"):
                tensors = _load_bin(self.local_path(file))
                self._bin[file] = tensors
                infos = {n: TensorInfo(n, _dtype_name(t, file, n), tuple(t.shape), file, 0,
                                       t.numel() * t.element_size()) for n, t in tensors.items()}
                self._headers[file] = Header(file, infos, {}, 0, 0)
            else:
                self._headers[file] = self._spec_header(self.storage.header(file))
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

        info = self.info(name)
        if self.storage.decodes_tensors:  # a storage that decodes its own tensors (block types)
            tensor = self.storage.read_tensor(name)
            if self.source_check is not None:
                self.source_check.observe(*self.storage.stored_range(name))
            return tensor
        if info.file.endswith(".bin") and info.file not in self._bin:
            self.header(info.file)  # loads the .bin (again, in a worker process)
        if info.file in self._bin:
            return self._bin[info.file][name].clone()
        dtype = torch_dtype(info.dtype)
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=dtype)
        path = self.local_path(info.file)
        buf = np.empty(info.nbytes, dtype=np.uint8)
        with open(path, "rb", buffering=0) as f:
            f.seek(info.start)
            got = f.readinto(memoryview(buf))
        if got != info.nbytes:
            raise CheckpointError("truncated while reading", file=info.file, tensor=name, hint="re-download it")
        if self.source_check is not None:  # hashed from the page cache: the caller may change its tensor
            self.source_check.observe(info.file, info.start, info.nbytes)
        return torch.from_numpy(buf).view(dtype).reshape(info.shape)

    def iter_chunks(self, name: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[tuple[int, memoryview]]:
        """The raw bytes of a tensor in pieces of whole rows: (first row, bytes)."""
        from m1.atomic_io import tensor_bytes

        info = self.info(name)
        if self.storage.decodes_tensors:
            yield 0, tensor_bytes(self.get(name))
            return
        if info.file.endswith(".bin") and info.file not in self._bin:
            self.header(info.file)
        if info.file in self._bin:
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
                if self.source_check is not None:
                    self.source_check.observe(info.file, info.start + done, want, buf)
                yield done // row_bytes, memoryview(buf)
                done += want

    def layer_weights(self, layer: int) -> dict[str, torch.Tensor]:
        """A layer's tensors with names relative to `model.layers.{layer}.` (for the verify engine)."""
        prefix = f"model.layers.{layer}."
        return {n[len(prefix):]: self.get(n) for n in self.names_in_layer(layer)}

    def global_weights(self) -> dict[str, torch.Tensor]:
        return {n: self.get(n) for n in self.names_in_layer(None)}

    # The rest of the verify engine's WeightSource interface (m1.verify.engine), so a plain checkpoint runs in it.
    def global_weight(self, name: str) -> torch.Tensor:
        return self.get(name)

    def stacked_layer_weights(self, layer: int, dtype: torch.dtype,
                              reuse: Any = None) -> dict[str, torch.Tensor] | None:
        return None  # the engine stacks the experts itself

    def extra_files(self) -> list[str]:
        """Tokenizer, generation and remote-code files beside the weights."""
        return self.storage.extra_files()


def viewed(storage: Storage) -> Storage:
    """A storage as the format whose reader its config.json calls for sees it (compressed-tensors: its experts
    decoded), or as it is; a missing or damaged config.json is left to `Checkpoint.from_storage` to report."""
    from m1.formats import all_formats

    views = [f.view_storage for f in all_formats() if f.view_storage is not None]
    if not views or not storage.exists("config.json"):
        return storage
    try:
        raw = json.loads(storage.read_bytes("config.json"))
    except (ValueError, UnicodeDecodeError):
        return storage
    if not isinstance(raw, dict):
        return storage
    return next((v for v in (view(storage, raw) for view in views) if v is not None), storage)


def _dtype_name(t: torch.Tensor, file: str, name: str) -> str:
    try:
        return dtype_name(t.dtype)
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
