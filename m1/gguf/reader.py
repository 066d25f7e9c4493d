"""Reading a GGUF of MiniMax-M1 (llama.cpp's `minimax-01`) back as an M1 checkpoint, through `gguf.GGUFReader`.

`GGUFStorage(path)` is a `m1.storage.Storage` over one GGUF file or a llama.cpp split set
(`NAME-00001-of-0000N.gguf`, opened by its first file): what the rest of m1 reads from a checkpoint
folder it synthesizes from the GGUF metadata, and it decodes its own tensors (`read_tensor`), so every
command that takes a checkpoint folder takes a GGUF too (the gguf format's `open_storage` routes `.gguf`
paths here).

- `config.json`: the release-format config the metadata implies (m1.gguf.implied_config);
  `model.safetensors.index.json`: every spec tensor -> the GGUF file that holds it, the stacked `*_exps`
  tensors expanded to one spec name per expert (m1.gguf.tensor_map);
- `tokenizer.json` / `tokenizer_config.json`, rebuilt from `tokenizer.ggml.*` (m1.gguf.rebuilt_tokenizer),
  written to a cache folder when a local path is asked for;
- `header(file)`: the spec tensors of one file with the dtype they come back in: F32 for F32 and for
  every block type (dequantized), F16 and BF16 as stored;
- `read_tensor(name)`: one spec tensor in torch order ([rows, cols]: GGUF's ne reversed); an expert is
  read as its slice of the stacked tensor only. Block types go through `gguf.quants.dequantize`.

The files are opened with their layout checked (m1.gguf.layout) and the split set checked
(m1.gguf.split_set); they are memory-mapped, and nothing is read until a tensor is asked for. Problems are
one-line `CheckpointError`s naming the file (and the tensor).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from m1.errors import CheckpointError
from m1.gguf.checks import Finding, manifest_findings, type_findings
from m1.gguf.implied_config import A, check_sizes, implied_config, layer_kinds, model_fields, value
from m1.gguf.layout import RE_EXPORT, open_reader
from m1.gguf.rebuilt_tokenizer import TokenizerFiles, rebuild_tokenizer
from m1.gguf.split_set import check_split_total, first_split, set_stem, split_files
from m1.gguf.tensor_map import GGUFTensors, Slot, map_file
from m1.safetensors_io import Header, TensorInfo
from m1.storage import Storage

if TYPE_CHECKING:
    import torch
    from gguf import GGUFReader

    from m1.config import M1Config

__all__ = ["GGUFStorage", "first_split"]

CONFIG, INDEX = "config.json", "model.safetensors.index.json"
TOKENIZER, TOKENIZER_CONFIG = "tokenizer.json", "tokenizer_config.json"


class GGUFStorage(Storage):
    """A `Storage` over a GGUF file (or split set) of MiniMax-M1, decoding its own tensors."""

    decodes_tensors = True
    own_format = "gguf"
    mixed_float_dtypes = True  # F32 norms and router beside bf16 weights, by llama.cpp's type policy

    def __init__(self, path: str | Path) -> None:
        self.path = first_split(Path(path))
        self.root = str(self.path)
        self.folder = self.path.parent
        self._readers: dict[str, GGUFReader] = {}
        self._cache: Path | None = None
        self.files = split_files(self.path, self._reader)
        self.fields = model_fields(self._reader(self.files[0]), self.root)
        check_sizes(self.fields, self.root)
        self.layer_kinds = layer_kinds(self.fields, self.root)
        self.slots: dict[str, Slot] = {}
        self.gguf_tensors: GGUFTensors = {}  # GGUF name -> (file, type, shape)
        for file in self.files:
            n_experts = value(self.fields, self.root, A + "expert_count", required=True)
            map_file(file, self._reader(file), str(self.folder / file), self.layer_kinds, n_experts,
                     self.gguf_tensors, self.slots)
        check_split_total(self._reader(self.files[0]), self.root, len(self.files), len(self.gguf_tensors))
        self.raw_config = implied_config(self.fields, self.root, self.layer_kinds, self.gguf_tensors)
        self._config_obj: M1Config | None = None
        self._tokenizer: TokenizerFiles | None | bool = False  # False: not built yet

    # ---- opening -----------------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_readers"] = {}  # memory maps are reopened in a worker process, never pickled
        state["fields"] = {}  # reader fields point into the map: the values needed later are kept below
        return state

    def _reader(self, file: str) -> GGUFReader:
        reader = self._readers.get(file)
        if reader is None:
            reader = self._readers[file] = open_reader(self.folder / file)
        return reader

    # ---- the synthesized files ----------------------------------------------------------------------
    @property
    def config(self) -> M1Config:
        if self._config_obj is None:
            from m1.config import M1Config

            self._config_obj = M1Config.from_dict(self.raw_config, source=self.display(CONFIG))
        return self._config_obj

    def _index(self) -> dict[str, Any]:
        total = sum(s.nbytes for s in self.slots.values())
        return {"metadata": {"total_size": total, "format": "gguf"},
                "weight_map": {name: slot.file for name, slot in self.slots.items()}}

    def _tokenizer_files(self) -> TokenizerFiles | None:
        if self._tokenizer is False:
            fields = self.fields or model_fields(self._reader(self.files[0]), self.root)
            self._tokenizer = rebuild_tokenizer(fields, self.raw_config["max_position_embeddings"])
        return self._tokenizer  # type: ignore[return-value]

    def _synthesized(self, name: str) -> bytes | None:
        if name == CONFIG:
            return (json.dumps(self.raw_config, indent=2) + "\n").encode()
        if name == INDEX:
            return (json.dumps(self._index(), indent=2) + "\n").encode()
        if name in (TOKENIZER, TOKENIZER_CONFIG):
            files = self._tokenizer_files()
            if files is None:
                return None
            obj = files[0] if name == TOKENIZER else files[1]
            return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
        return None

    # ---- the Storage protocol -------------------------------------------------------------------------
    def display(self, name: str) -> str:
        if name in self.files:
            return str(self.folder / name)
        return f"{self.root} (its {name}, from the GGUF metadata)"

    def exists(self, name: str) -> bool:
        if name in self.files or name in (CONFIG, INDEX):
            return True
        return name in (TOKENIZER, TOKENIZER_CONFIG) and self._tokenizer_files() is not None

    def read_bytes(self, name: str) -> bytes:
        data = self._synthesized(name)
        if data is not None:
            return data
        if name in self.files:
            return (self.folder / name).read_bytes()
        raise CheckpointError("not in this GGUF", file=self.display(name))

    def header(self, file: str) -> Header:
        if file not in self.files:
            raise CheckpointError("missing GGUF file", file=str(self.folder / file), hint=RE_EXPORT)
        reader = self._reader(file)
        infos = {name: TensorInfo(name, s.dtype, s.shape, file, s.offset, s.offset + s.nbytes)
                 for name, s in self.slots.items() if s.file == file}
        return Header(file, infos, {}, int(reader.data_offset), (self.folder / file).stat().st_size)

    def local_path(self, file: str) -> Path:
        if file in self.files:
            return self.folder / file
        data = self._synthesized(file)
        if data is None:
            raise CheckpointError("not in this GGUF", file=self.display(file))
        path = self.cache_dir() / file
        if not path.is_file() or path.read_bytes() != data:
            tmp = path.with_name(f".{file}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return path

    def extra_files(self) -> list[str]:
        return [TOKENIZER, TOKENIZER_CONFIG] if self._tokenizer_files() is not None else []

    def identity(self, files: list[str]) -> dict[str, Any]:
        """Size and mtime of each GGUF file; the synthesized files have the first file's (they derive from it)."""
        out: dict[str, Any] = {}
        for name in files:
            try:
                own = name in self.files or name.endswith(".gguf")
                st = (self.folder / (name if own else self.files[0])).stat()
            except OSError:
                out[name] = None
                continue
            out[name] = [st.st_size, st.st_mtime_ns]
        return out

    def cache_dir(self) -> Path:
        """Where local_path writes the synthesized files: $XDG_CACHE_HOME/m1/gguf/<this file's identity>/."""
        if self._cache is None:
            st = self.path.stat()
            key = hashlib.sha256(f"{self.path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]
            base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
            self._cache = base / "m1" / "gguf" / f"{self.path.stem}-{key}"
            self._cache.mkdir(parents=True, exist_ok=True)
        return self._cache

    def tokenizer_folder(self) -> Path | None:
        """A folder holding the synthesized tokenizer.json and tokenizer_config.json (None without a tokenizer)."""
        if self._tokenizer_files() is None:
            return None
        for name in (TOKENIZER, TOKENIZER_CONFIG):
            self.local_path(name)
        return self.cache_dir()

    def stored_types(self) -> dict[str, dict[str, int]]:
        """GGML type -> {"tensors", "bytes"} of the GGUF tensors as stored (the headers give decoded sizes)."""
        out: dict[str, dict[str, int]] = {}
        for _file, qtype, _shape in self.gguf_tensors.values():
            out.setdefault(qtype.name, {"tensors": 0, "bytes": 0})["tensors"] += 1
        for slot in self.slots.values():
            out[slot.qtype.name]["bytes"] += slot.stored_bytes
        return out

    def stored_as(self, name: str) -> tuple[str, int] | None:
        """The GGML type and the bytes as stored of tensor `name` (of header(file)): what inspect reports, where
        the header gives the dtype and size it is read back in."""
        slot = self.slots.get(name)
        if slot is None:
            raise CheckpointError("tensor not in the GGUF", file=self.root, tensor=name)
        return slot.qtype.name, slot.stored_bytes

    # ---- tensors ------------------------------------------------------------------------------------
    def stored_range(self, name: str) -> tuple[str, int, int]:
        """Where a tensor's stored bytes are: (file, offset, length), for the source check (m1.source_check)."""
        slot = self.slots[name]
        return slot.file, slot.offset, slot.stored_bytes

    def read_tensor(self, name: str) -> torch.Tensor:
        """One spec tensor, dequantized (block types, F32) or as stored (F16, BF16), in torch order."""
        import torch
        from gguf import GGMLQuantizationType as Q
        from gguf.quants import dequantize

        slot = self.slots.get(name)
        if slot is None:
            raise CheckpointError("tensor not in the GGUF", file=self.root, tensor=name)
        display = str(self.folder / slot.file)
        where = f" (GGUF {slot.gguf_name}" + (f", expert {slot.expert})" if slot.expert is not None else ")")
        from m1.spec import spec_by_name

        spec = spec_by_name(self.config).get(name)
        if spec is not None and tuple(spec.shape) != slot.shape:
            raise CheckpointError(f"shape {list(slot.shape)}{where}, the metadata implies {list(spec.shape)}",
                                  file=display, tensor=name, hint=RE_EXPORT)
        t = self._reader(slot.file).tensors[slot.index]
        if t.name != slot.gguf_name:
            raise CheckpointError(f"the file changed since it was opened{where}", file=display, tensor=name,
                                  hint="open it again")
        data = t.data if slot.expert is None else t.data[slot.expert]
        try:
            if slot.qtype == Q.F32:
                array = np.array(data, dtype=np.float32)
            elif slot.qtype == Q.F16:
                array = np.array(data, dtype=np.float16)
            elif slot.qtype == Q.BF16:
                raw = np.ascontiguousarray(data).view(np.int16).reshape(slot.shape)
                return torch.from_numpy(raw.copy()).view(torch.bfloat16)
            else:
                array = dequantize(np.asarray(data), slot.qtype)
        except (ValueError, NotImplementedError) as exc:
            raise CheckpointError(f"cannot decode {slot.qtype.name}{where}: {exc}", file=display, tensor=name,
                                  hint=RE_EXPORT) from None
        if tuple(array.shape) != slot.shape:
            raise CheckpointError(f"decoded to shape {list(array.shape)}{where}, expected {list(slot.shape)}",
                                  file=display, tensor=name, hint=RE_EXPORT)
        return torch.from_numpy(np.ascontiguousarray(array))

    # ---- what verify integrity checks on top of the spec (m1.integrity calls it for GGUF storages) -------------
    def findings(self, check_hashes: bool = True) -> list[Finding]:
        """(code, message, file, tensor) for what a GGUF may get wrong beyond the spec checks (m1.gguf.checks)."""
        out = type_findings(self.slots)
        if check_hashes:
            out += manifest_findings(self.manifest_path(), self.folder, self.files)
        return out

    def sources(self) -> list[Path]:
        """The GGUF files and the manifest beside them (which an output of the same stem would replace)."""
        return [*(self.folder / f for f in self.files), self.manifest_path()]

    def manifest_path(self) -> Path:
        from m1.manifest import MANIFEST

        return self.folder / f"{set_stem(self.files, self.path)}.{MANIFEST}"
