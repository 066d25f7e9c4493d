"""The ggml block types (q8_0, q4_0, q4_1, q5_0, q5_1, mxfp4) as schemes, for the gguf format.

Blocks are quantized and dequantized by gguf-py (`gguf.quants`, bit-exact with ggml); nothing here does
block arithmetic. A ggml weight has no companion tensors: its blocks carry their own scales. The K-quants
and IQ types need llama.cpp's own quantizer and an optional extra (see `m1.schemes.ggml_lib`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from m1.errors import UsageError
from m1.schemes import Family, Piece

BLOCK_TYPES = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "mxfp4")
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


@dataclass(frozen=True)
class GgmlScheme:
    name: str
    family = FAMILY_NAME
    formats = ("gguf",)

    @classmethod
    def make(cls, name: str, **options: Any) -> GgmlScheme:
        given = [k for k, v in options.items() if v is not None]
        if given:
            raise UsageError(f"--{given[0].replace('_', '-')} does not apply to the ggml type {name}",
                             hint="ggml block types have a fixed block size and no options")
        if name not in BLOCK_TYPES:
            raise UsageError(f"unknown ggml type {name!r}", hint=f"use one of {', '.join(BLOCK_TYPES)}")
        return cls(name)

    def describe(self) -> str:
        values, size = block_shape(self.name)
        return f"{self.name} (ggml, {values} values in {size} bytes, {8 * size / values:.2f} bits per weight)"

    def options(self) -> dict[str, Any]:
        return {}

    def check_supported(self, device: Any) -> None:
        pass  # gguf-py runs on the CPU, whatever --device says

    def check_weight(self, name: str, dtype: str, shape: tuple[int, ...], file: str | None = None) -> None:
        values, _ = block_shape(self.name)
        if dtype not in ("F32", "F16", "BF16"):
            raise UsageError(f"dtype {dtype} cannot be quantized to {self.name}", file=file, tensor=name,
                             hint="convert it to a float dtype first: m1 convert SRC DST --dtype bf16")
        if shape[-1] % values:
            raise UsageError(f"rows of {shape[-1]} values do not split into {self.name} blocks of {values}",
                             file=file, tensor=name, hint="keep this tensor with --keep, or choose another type")

    def pieces(self, dtype: str, shape: tuple[int, ...]) -> list[Piece]:
        return [Piece("weight", self.name.upper(), tuple(shape), type_nbytes(self.name, shape))]

    def quantization_config(self, kept_experts: list[str]) -> dict[str, Any]:
        return {}  # a GGUF records its types per tensor; there is no config.json

    def quantize(self, weight: Any, device: Any, name: str = "") -> list[tuple[str, Any]]:
        import torch
        from gguf.quants import quantize

        data = quantize(weight.to(torch.float32).contiguous().numpy(), _qtype(self.name))
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
