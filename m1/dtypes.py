"""The one dtype table: safetensors dtype names, their sizes, and the torch dtypes they stand for.

torch is imported on first use of `torch_dtype` / `dtype_name`, so that commands that only move bytes
(convert, inspect, integrity) never pay for importing it.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# name -> (bytes per value, torch attribute)
_TABLE: dict[str, tuple[int, str]] = {
    "F64": (8, "float64"), "F32": (4, "float32"), "F16": (2, "float16"), "BF16": (2, "bfloat16"),
    "I64": (8, "int64"), "I32": (4, "int32"), "I16": (2, "int16"), "I8": (1, "int8"), "U8": (1, "uint8"),
    "BOOL": (1, "bool"), "F8_E4M3": (1, "float8_e4m3fn"), "F8_E5M2": (1, "float8_e5m2"),
}

DTYPE_BYTES: dict[str, int] = {name: size for name, (size, _) in _TABLE.items()}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})
# What --dtype and --router-dtype take -> the safetensors dtype (keep: as stored).
DTYPE_OPTIONS: dict[str, str | None] = {"keep": None, "bf16": "BF16", "fp16": "F16", "fp32": "F32"}


def torch_name(name: str) -> str:
    """The torch spelling of a dtype name (`BF16` -> `bfloat16`, as config.json's torch_dtype and a bitsandbytes
    quant state write it), without importing torch."""
    return _TABLE[name][1]


@lru_cache(maxsize=1)
def _torch_tables() -> tuple[dict[str, torch.dtype], dict[torch.dtype, str]]:
    import torch

    forward = {name: getattr(torch, attr) for name, (_, attr) in _TABLE.items()}
    return forward, {v: k for k, v in forward.items()}


def torch_dtype(name: str) -> torch.dtype:
    return _torch_tables()[0][name]


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype; KeyError for one safetensors cannot store."""
    return _torch_tables()[1][dtype]
