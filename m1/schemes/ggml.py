"""The ggml block types as schemes, for the gguf format.

q8_0, q4_0, q4_1, q5_0, q5_1 and mxfp4 are quantized by gguf-py (`gguf.quants`, bit-exact with ggml); the
K-quants (q2_k ... q6_k) and iq4_xs by llama.cpp's own ggml (`m1.schemes.ggml_lib`, the extra m1[gguf-k]),
with an importance matrix from `m1 verify imatrix` when given (`--imatrix`). gguf-py's quantizers take no
imatrix, so q4_0 and friends ignore one (a warning says so). Dequantizing is gguf-py's for every type.
Nothing here does block arithmetic. A ggml weight has no companion tensors: its blocks carry their scales.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from m1.errors import UsageError
from m1.schemes import Family, Piece, Scheme, make_scheme

NUMPY_TYPES = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "mxfp4")  # gguf.quants
GGML_LIB_TYPES = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_xs")  # llama.cpp's ggml, through ctypes
BLOCK_TYPES = NUMPY_TYPES + GGML_LIB_TYPES
FAMILY_NAME = "ggml"


def _qtype(name: str) -> Any:
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType[name.upper()]


def block_shape(name: str) -> tuple[int, int]:
    """(values per block, bytes per block) of a ggml type, from gguf-py's table."""
    from gguf import GGML_QUANT_SIZES

    return GGML_QUANT_SIZES[_qtype(name)]


def type_nbytes(name: str, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of `shape` (torch order, rows last) in ggml type `name` (also f32/f16/bf16)."""
    values, size = block_shape(name)
    return math.prod(shape[:-1]) * (shape[-1] // values) * size


_IMATRICES: dict[str, Any] = {}  # path -> m1.verify's IMatrix, read once per process


@dataclass(frozen=True)
class GgmlScheme(Scheme):
    name: str
    imatrix: str | None = None  # a GGUF imatrix file (m1 verify imatrix, or llama.cpp's llama-imatrix)
    imatrix_sha256: str | None = None  # what --resume checks: the same statistics, not just the same path
    family = FAMILY_NAME
    formats = ("gguf",)

    @classmethod
    def make(cls, name: str, imatrix: str | None = None, **options: Any) -> GgmlScheme:
        given = [k for k, v in options.items() if v is not None]
        if given:
            raise UsageError(f"--{given[0].replace('_', '-')} does not apply to the ggml type {name}",
                             hint="ggml block types have a fixed block size and no options")
        if name not in BLOCK_TYPES:
            raise UsageError(f"unknown ggml type {name!r}", hint=f"use one of {', '.join(BLOCK_TYPES)}")
        if name in GGML_LIB_TYPES:
            from m1.schemes import ggml_lib

            ggml_lib.raw_library()  # one line saying what to install, before any planning
        if imatrix is None:
            return cls(name)
        import hashlib
        from pathlib import Path

        path = Path(imatrix)
        if not path.is_file():
            raise UsageError("--imatrix is not a file", file=str(path), hint="make one with m1 verify imatrix")
        if name in NUMPY_TYPES:
            import warnings

            warnings.warn(f"{name} is quantized by gguf-py, which takes no importance matrix: --imatrix is ignored "
                          "(use a K-quant such as q4_k to use it)", stacklevel=2)
            return cls(name)
        return cls(name, str(path.resolve()), hashlib.sha256(path.read_bytes()).hexdigest())

    def _importance(self, source: str, n_cols: int) -> Any:
        """The imatrix row for one source weight (an expert's row of its stacked GGUF tensor), or None."""
        if self.imatrix is None:
            return None
        from m1.gguf.imatrix import importance_row, read_imatrix
        from m1.gguf.names import to_gguf

        if self.imatrix not in _IMATRICES:
            _IMATRICES[self.imatrix] = read_imatrix(self.imatrix)
        target = to_gguf(source)
        return importance_row(_IMATRICES[self.imatrix], target.name, target.expert or 0, n_cols)

    def describe(self) -> str:
        values, size = block_shape(self.name)
        return f"{self.name} (ggml, {values} values in {size} bytes, {8 * size / values:.2f} bits per weight)"

    def options(self) -> dict[str, Any]:
        return {"imatrix": self.imatrix, "imatrix_sha256": self.imatrix_sha256} if self.imatrix else {}

    def check_supported(self, device: Any) -> None:
        pass  # gguf-py runs on the CPU, whatever --device says

    def like(self, name: str) -> Scheme:
        return make_scheme(name, imatrix=self.imatrix) if self.imatrix else make_scheme(name)

    def check_weight(self, name: str, dtype: str, shape: tuple[int, ...], file: str | None = None) -> None:
        values, _ = block_shape(self.name)
        if dtype not in ("F32", "F16", "BF16"):
            raise UsageError(f"dtype {dtype} cannot be quantized to {self.name}", file=file, tensor=name,
                             hint="convert it to a float dtype first: m1 convert SRC DST --dtype bf16")
        if shape[-1] % values:
            raise UsageError(f"rows of {shape[-1]} values do not split into {self.name} blocks of {values}",
                             file=file, tensor=name, hint="keep this tensor with --keep, or choose another type")
        if self.imatrix is not None:
            self._importance(name, shape[-1])  # the imatrix has this weight and expert, with its column count

    def pieces(self, dtype: str, shape: tuple[int, ...]) -> list[Piece]:
        return [Piece("weight", self.name.upper(), tuple(shape), type_nbytes(self.name, shape))]

    def quantization_config(self, kept_experts: list[str]) -> dict[str, Any]:
        return {}  # a GGUF records its types per tensor; there is no config.json

    def quantize(self, weight: Any, device: Any, name: str = "") -> list[tuple[str, Any]]:
        import torch

        rows = weight.to(torch.float32).contiguous().numpy()
        if self.name in GGML_LIB_TYPES:
            from m1.schemes import ggml_lib

            data = ggml_lib.quantize_rows(self.name, rows.reshape(-1, rows.shape[-1]),
                                          self._importance(name, rows.shape[-1]), tensor=name or None,
                                          imatrix_file=self.imatrix)
        else:
            from gguf.quants import quantize

            from m1.schemes import ggml_lib

            data = quantize(rows, _qtype(self.name))
            ggml_lib.check_blocks(self.name, data, tensor=name or None)  # f16 scales overflow past 65504
        return [("weight", torch.from_numpy(data.reshape(-1)))]

    def dequantize(self, pieces: dict[str, Any], device: Any = "cpu", name: str = "",
                   shape: tuple[int, ...] | None = None) -> Any:
        import numpy as np
        import torch
        from gguf.quants import dequantize

        raw = pieces["weight"].contiguous().numpy().view(np.uint8)
        if shape is None:
            raise UsageError("a ggml tensor needs its shape to be dequantized", tensor=name)
        values, size = block_shape(self.name)
        data = raw.reshape(*shape[:-1], shape[-1] // values * size)
        return torch.from_numpy(dequantize(data, _qtype(self.name)))

    def check_pieces(self, weight: str, found: dict[str, tuple[str, tuple[int, ...]]], shape: tuple[int, ...],
                     file: str | None = None) -> None:
        extra = [s for s in found if s != "weight"]
        if extra:
            raise UsageError(f"a ggml {self.name} weight has no companion {extra[0]}", file=file, tensor=weight)


FAMILY = Family(
    name=FAMILY_NAME,
    schemes=BLOCK_TYPES,
    companions=(),
    make=GgmlScheme.make,
    claims=lambda qc: qc.get("quant_method") == "gguf",
    from_quantization_config=lambda qc, file: GgmlScheme.make(str(qc.get("type"))),
    storage_dtypes=frozenset(t.upper() for t in BLOCK_TYPES),
)
