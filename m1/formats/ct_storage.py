"""Reading a compressed-tensors checkpoint (an hf-layout folder or Hub repo whose config.json says `quant_method:
"compressed-tensors"`) as a dense M1: a view over its storage that decodes its quantized weights.

A pack-quantized weight is stored as `<module>.weight_packed` / `weight_scale` / `weight_shape` (and
`weight_zero_point` when asymmetric), with no `<module>.weight`. The storage shows the rest of m1 what a plain
hf checkpoint would hold: config.json without its quantization_config, an index and headers with one
`<module>.weight` per quantized module (the dtype of its scales, the shape its config implies), and
`read_tensor` decodes it with compressed-tensors' own decompressor. So inspect, integrity, convert (dequantized:
`--dtype bf16`, `--to` another format), quantize to another scheme and compare read it like any checkpoint.

Companions are checked before use: a header is refused when a quantized module's tensors are missing, extra,
of another dtype or shape than the scheme stores for the weight the config implies, and `weight_shape`'s values
are checked before decoding; each is one line naming the file and the tensor.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import numpy as np

from m1.errors import CheckpointError, M1Error
from m1.index import INDEX_NAMES, Index, parse_index
from m1.manifest import manifest_findings
from m1.safetensors_io import Header, TensorInfo
from m1.schemes.ct import CtSchemes
from m1.schemes.ct_pack import COMPANIONS, PackScheme, require
from m1.storage import Storage, StorageView

if TYPE_CHECKING:
    import torch

CONFIG = "config.json"
SINGLE = "model.safetensors"
HINT = "re-run the job that wrote it, or check the folder with m1 verify integrity"


def is_ct_config(raw: object) -> bool:
    qc = raw.get("quantization_config") if isinstance(raw, dict) else None
    return isinstance(qc, dict) and qc.get("quant_method") == "compressed-tensors"


def view_storage(storage: Storage, raw: dict) -> CtStorage | None:
    """A checkpoint's storage (a local folder or a Hub repo) seen through this reader, when its config.json
    (`raw`) names compressed-tensors."""
    return CtStorage(storage) if is_ct_config(raw) else None


def _split(name: str) -> tuple[str, str | None]:
    """(spec weight name, companion suffix) of a stored name; (name, None) for a dense tensor."""
    for suffix in COMPANIONS:
        if name.endswith("." + suffix):
            return name[: -len(suffix) - 1] + ".weight", suffix
    return name, None


class CtStorage(StorageView):
    """A compressed-tensors checkpoint (a local folder or a Hub repo), seen as the dense hf checkpoint it stands
    for."""

    decodes_tensors = True
    own_format = "compressed-tensors"

    def __init__(self, inner: Storage) -> None:
        super().__init__(inner)
        require()
        from m1.config import M1Config
        from m1.spec import spec_by_name

        display = self.display(CONFIG)
        raw = json.loads(self.inner.read_bytes(CONFIG))
        schemes = CtSchemes.from_quantization_config(raw["quantization_config"], display)
        self.view_config = {k: v for k, v in raw.items() if k != "quantization_config"}
        self.shapes = {n: s.shape for n, s in spec_by_name(M1Config.from_dict(self.view_config, display)).items()}
        self.stored = self._stored_index()
        self.groups: dict[str, dict[str, str]] = {}  # weight -> suffix -> stored name
        view: dict[str, str] = {}
        for name, file in self.stored.weight_map.items():
            weight, suffix = _split(name)
            if suffix is None:
                view[name] = file
            else:
                self.groups.setdefault(weight, {})[suffix] = name
        self.scheme_of: dict[str, PackScheme] = {}  # a quantized weight -> the scheme its config group gives it
        for weight, group in self.groups.items():
            scheme = schemes.for_module(weight[: -len(".weight")])
            if scheme is None:
                raise CheckpointError("stored quantized, but no config group of config.json targets it",
                                      file=self.display(self.stored.weight_map[next(iter(group.values()))]),
                                      tensor=weight, hint=HINT)
            self.scheme_of[weight] = scheme
            if weight in view and scheme.primary == "weight":  # float-quantized: the weight is its codes
                group["weight"] = weight
            elif weight in view:
                raise CheckpointError(f"stored both dense and as {scheme.name}", file=self.display(view[weight]),
                                      tensor=weight, hint=HINT)
            view[weight] = self.stored.weight_map[group.get(scheme.primary) or next(iter(group.values()))]
        self.owner = {name: weight for weight, group in self.groups.items() for name in group.values()}
        self.view = Index(view, {k: v for k, v in self.stored.metadata.items() if k != "total_size"},
                          self.stored.file)
        self._headers: dict[str, Header] = {}

    def _stored_index(self) -> Index:
        for name in INDEX_NAMES[:1]:
            if self.exists(name):
                return parse_index(self.inner.read_bytes(name), self.display(name), name)
        if self.exists(SINGLE):
            return Index({t: SINGLE for t in self.inner.header(SINGLE).tensors})
        raise CheckpointError(f"no {INDEX_NAMES[0]} or {SINGLE}", file=self.root, hint="is this a checkpoint folder?")

    # ---- the dense view --------------------------------------------------------------------------------
    def read_bytes(self, name: str) -> bytes:
        if name == CONFIG:
            return (json.dumps(self.view_config, indent=2) + "\n").encode()
        return self.inner.read_bytes(name)

    def index(self) -> Index:
        return self.view

    def stored_header(self, file: str) -> Header:
        if file not in self._headers:
            self._headers[file] = self.inner.header(file)
        return self._headers[file]

    def stored_info(self, name: str) -> TensorInfo:
        file = self.stored.weight_map[name]
        info = self.stored_header(file).tensors.get(name)
        if info is None:
            raise CheckpointError("the index names this tensor but the shard lacks it", file=self.display(file),
                                  tensor=name, hint=HINT)
        return info

    def check_group(self, weight: str) -> dict[str, TensorInfo]:
        """A quantized weight's stored tensors, after checking their dtypes and shapes against the scheme."""
        group, scheme = self.groups[weight], self.scheme_of[weight]
        infos = {suffix: self.stored_info(name) for suffix, name in group.items()}
        first = infos.get(scheme.primary) or next(iter(infos.values()))
        file = self.display(first.file)
        shape = self.shapes.get(weight)
        if shape is None:
            raise CheckpointError("not part of this config's M1", file=file, tensor=group.get("weight_packed"))
        if len(shape) != 2:
            raise CheckpointError(f"a {len(shape)}-D tensor stored as {scheme.name}", file=file,
                                  tensor=next(iter(group.values())), hint=HINT)
        try:
            scheme.check_pieces(weight, {s: (i.dtype, i.shape) for s, i in infos.items()}, shape)
        except CheckpointError as exc:
            named = group.get(exc.tensor.rpartition(".")[2]) if exc.tensor else None
            exc.file = self.display(infos[exc.tensor.rpartition(".")[2]].file) if named else file
            raise
        return infos

    def header(self, file: str) -> Header:
        stored = self.stored_header(file)
        from m1.dtypes import DTYPE_BYTES

        infos: dict[str, TensorInfo] = {}
        for name, info in stored.tensors.items():
            weight = self.owner.get(name)
            if weight is None:
                infos[name] = info
            elif self.view.weight_map.get(weight) == file and weight not in infos:
                pieces = self.check_group(weight)
                dtype = pieces["weight_scale"].dtype
                shape = self.shapes[weight]
                start = pieces[self.scheme_of[weight].primary].start
                infos[weight] = TensorInfo(weight, dtype, shape, file, start,
                                           start + DTYPE_BYTES[dtype] * shape[0] * shape[1])
        return Header(file, infos, stored.metadata, stored.data_start, stored.file_size)

    def stored_as(self, name: str) -> tuple[str, int] | None:
        if name not in self.groups:
            return None
        return self.scheme_of[name].name, sum(self.stored_info(n).nbytes for n in self.groups[name].values())

    def stored_range(self, name: str) -> tuple[str, int, int]:
        info = self.stored_info(self.groups[name][self.scheme_of[name].primary] if name in self.groups else name)
        return info.file, info.start, info.nbytes

    def _raw(self, info: TensorInfo) -> torch.Tensor:
        import torch

        from m1.dtypes import torch_dtype

        buf = np.empty(info.nbytes, dtype=np.uint8)
        with open(self.local_path(info.file), "rb", buffering=0) as f:
            f.seek(info.start)
            if f.readinto(memoryview(buf)) != info.nbytes:
                raise CheckpointError("truncated while reading", file=self.display(info.file), tensor=info.name,
                                      hint="re-download it")
        return torch.from_numpy(buf).view(torch_dtype(info.dtype)).reshape(info.shape)

    def read_tensor(self, name: str) -> torch.Tensor:
        """A dense tensor as stored, or a quantized weight decoded by compressed-tensors."""
        if name not in self.groups:
            return self._raw(self.stored_info(name))
        infos = self.check_group(name)
        pieces = {suffix: self._raw(info) for suffix, info in infos.items()}
        try:
            return self.scheme_of[name].dequantize(pieces, "cpu", name, shape=self.shapes[name])
        except CheckpointError as exc:
            exc.file = exc.file or self.display(infos[self.scheme_of[name].primary].file)
            raise

    # ---- what verify integrity checks on top of the spec ----------------------------------------------
    def findings(self, check_hashes: bool = True) -> list[tuple[str, str, str | None, str | None]]:
        """The stored index's total, every weight_shape's values, and the manifest's sha256s (m1 made it)."""
        out: list[tuple[str, str, str | None, str | None]] = []
        total = self.stored.metadata.get("total_size")
        try:
            actual = sum(self.stored_info(n).nbytes for n in self.stored.weight_map)
        except M1Error:
            actual = None  # a missing shard or tensor: the spec checks report it
        if total is not None and actual is not None and int(total) != actual:
            out.append(("total-size", f"index total_size {total} but the shards hold {actual} bytes of tensors",
                        self.stored.file, None))
        for weight, group in self.groups.items():
            if "weight_shape" not in group:
                continue  # float-quantized: the codes have the weight's shape, checked in the header
            try:
                infos = self.check_group(weight)
                stored = [int(v) for v in self._raw(infos["weight_shape"]).tolist()]
            except M1Error:
                continue  # the header check reported it
            if tuple(stored) != tuple(self.shapes[weight]):
                out.append(("shape", f"weight_shape holds {stored}, the config implies {list(self.shapes[weight])}",
                            infos["weight_shape"].file, group["weight_shape"]))
        manifest = self.inner.manifest_path()
        if check_hashes and manifest is not None:
            out += [(code, message, file, None) for code, message, file in manifest_findings(manifest.parent)[1]]
        return out
