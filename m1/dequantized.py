"""A quantized checkpoint (a quantization_config, companions beside its weights: fp8, bitsandbytes) seen as
the dense checkpoint it stands for, so a job whose output cannot hold the stored scheme reads it as a source:
`m1 quantize FP8/ out/ --scheme nf4`, or a convert to a format that cannot store fp8 (`Scheme.formats`).

The view is a `Storage` over the checkpoint: config.json without its quantization_config, headers with one
`<module>.weight` per quantized module (the dense dtype, the spec's shape) and no companions, and `read_tensor`
decodes through the stored scheme (m1.quantized, which checks every companion against the scheme and the
shape first). Before the view is made, the checkpoint passes the same spec checks as any source, companions
included, so damaged input is refused in one line before anything is written. compressed-tensors folders need
no view: their storage (m1.formats.ct_storage) is one already.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import TYPE_CHECKING

from m1.dtypes import DTYPE_BYTES, DTYPE_OPTIONS, FLOAT_DTYPES, torch_name
from m1.index import Index
from m1.quantized import checkpoint_scheme, dequantize_weight, is_quantized
from m1.safetensors_io import Header, TensorInfo
from m1.schemes import companions_in, scheme_from_config
from m1.spec import classify, spec_by_name
from m1.storage import StorageView

if TYPE_CHECKING:
    import torch

    from m1.checkpoint import Checkpoint

CONFIG = "config.json"


def stored_scheme_name(ckpt: Checkpoint) -> str | None:
    """The scheme a checkpoint's config.json says its weights are stored in (None: a dense checkpoint)."""
    qc = ckpt.config.quantization_config
    if qc is None:
        return None
    return scheme_from_config(qc, f"{ckpt.root}/{CONFIG}").name


def needs_dense_view(ckpt: Checkpoint, output_format: str, quantizing: bool) -> bool:
    """Whether a job reads `ckpt` dequantized: it quantizes again, or its output format cannot store the
    source's scheme (`Scheme.formats` does not name it)."""
    qc = ckpt.config.quantization_config
    if qc is None:
        return False
    return quantizing or output_format not in scheme_from_config(qc, f"{ckpt.root}/{CONFIG}").formats


def dense_view(ckpt: Checkpoint, dtype: str = "keep") -> Checkpoint:
    """`ckpt` seen dense, its quantized weights decoded in `dtype` (a --dtype value; keep: the config's
    torch_dtype, bf16 when it names none), after checking it against the spec, companions included."""
    from m1.checkpoint import Checkpoint
    from m1.planner import checkpoint_tensors

    checkpoint_tensors(ckpt)
    return Checkpoint.from_storage(DenseView(ckpt, _dense_dtype(ckpt, dtype)))


def _dense_dtype(ckpt: Checkpoint, dtype: str) -> str:
    if DTYPE_OPTIONS.get(dtype):
        return str(DTYPE_OPTIONS[dtype])
    by_torch_name = {torch_name(n): n for n in FLOAT_DTYPES}  # config.json's torch_dtype spelling
    return by_torch_name.get(str(ckpt.config.raw.get("torch_dtype")), "BF16")


class DenseView(StorageView):
    """A quantized checkpoint's storage, showing its quantized weights as dense tensors of `dtype`."""

    decodes_tensors = True

    def __init__(self, ckpt: Checkpoint, dtype: str) -> None:
        super().__init__(ckpt.storage)
        self.ckpt = ckpt
        self.dtype = dtype
        self.dequantized_from = f"{stored_scheme_name(ckpt)} -> {dtype}"
        names = ckpt.weight_map
        self.quantized = {n for n in names if classify(n).companion is None and is_quantized(n, names)}
        self.hidden = {c for n in self.quantized for c in companions_in(n, names).values()}
        self.shapes = {n: s.shape for n, s in spec_by_name(ckpt.config).items() if n in self.quantized}
        raw = {k: v for k, v in ckpt.config.raw.items() if k != "quantization_config"}
        self.config_bytes = (json.dumps(raw, indent=2) + "\n").encode()

    # ---- the dense view --------------------------------------------------------------------------------
    def read_bytes(self, name: str) -> bytes:
        return self.config_bytes if name == CONFIG else self.inner.read_bytes(name)

    def index(self) -> Index:
        weights = {n: f for n, f in self.ckpt.weight_map.items() if n not in self.hidden}
        metadata = {k: v for k, v in self.ckpt.index_metadata.items() if k != "total_size"}
        return Index(weights, metadata, self.ckpt.index_file)

    def header(self, file: str) -> Header:
        stored = self.ckpt.header(file)
        infos: dict[str, TensorInfo] = {}
        for name, info in stored.tensors.items():
            if name in self.hidden:
                continue
            if name in self.quantized:
                shape = self.shapes[name]
                info = replace(info, dtype=self.dtype, shape=shape,
                               end=info.start + DTYPE_BYTES[self.dtype] * shape[0] * shape[1])
            infos[name] = info
        return replace(stored, tensors=infos)

    def read_tensor(self, name: str) -> torch.Tensor:
        from m1.dtypes import torch_dtype

        if name not in self.quantized:
            return self.ckpt.get(name)
        return dequantize_weight(self.ckpt, name, self.shapes[name]).to(torch_dtype(self.dtype))

    def stored_range(self, name: str) -> tuple[str, int, int]:
        info = self.ckpt.info(name)
        return info.file, info.start, info.nbytes

    def stored_as(self, name: str) -> tuple[str, int] | None:
        if name not in self.quantized:
            return None
        pieces = [name, *companions_in(name, self.ckpt.weight_map).values()]
        return checkpoint_scheme(self.ckpt, name).name, sum(self.ckpt.info(n).nbytes for n in pieces)
