"""The ggml block types as schemes, for the gguf format.

q8_0, q4_0, q4_1, q5_0, q5_1 and mxfp4 are quantized by gguf-py (`gguf.quants`, bit-exact with ggml); the
K-quants (q2_k ... q6_k), the i-quants (iq1_s ... iq4_xs) and the ternary tq1_0/tq2_0 by llama.cpp's own ggml
(`m1.schemes.ggml_lib`, the extra m1[gguf-k]), with an importance matrix from `m1 verify imatrix` when given
(`--imatrix`). The types llama-quantize refuses without one (iq1_s, iq1_m, iq2_xxs, iq2_xs, iq2_s, iq3_xxs) are
refused here too, when the scheme is made: before any plan or byte. gguf-py's quantizers take no imatrix, so q4_0
and friends ignore one (a warning says so). Dequantizing is gguf-py's for every type. Nothing here does block
arithmetic. A ggml weight has no companion tensors: its blocks carry their scales. With `--rounding gptq` the
K-quants keep ggml's scales and take GPTQ's codes (m1.schemes.ggml_gptq).

`THROUGHPUT` is measured data (bench/bench_lowbit_speed.py): ggml's params/s on one core per type, from which a
dry run prints the full-scale quantization time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from m1.errors import M1Error, UsageError
from m1.schemes import Family, Piece, Scheme, make_scheme
from m1.schemes.gptq import Rounding

NUMPY_TYPES = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "mxfp4")  # gguf.quants
GGML_LIB_TYPES = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k",  # llama.cpp's ggml, through ctypes
                  "iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s", "iq4_nl", "iq4_xs",
                  "tq1_0", "tq2_0")
BLOCK_TYPES = NUMPY_TYPES + GGML_LIB_TYPES
GPTQ_TYPES = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k")  # one code per weight at fixed bits (m1.schemes.ggml_gptq)
FAMILY_NAME = "ggml"
# llama.cpp's fallback when a tensor's rows do not split into a type's blocks (llama-quant.cpp
# tensor_type_fallback): llama-quantize switches silently, m1 refuses and names it (the user decides).
FALLBACK = {"iq1_s": "iq4_nl", "iq1_m": "iq4_nl", "iq2_xxs": "iq4_nl", "iq2_xs": "iq4_nl", "iq2_s": "iq4_nl",
            "iq3_xxs": "iq4_nl", "iq3_s": "iq4_nl", "iq4_xs": "iq4_nl", "q2_k": "q4_0", "q3_k": "q4_0",
            "tq1_0": "q4_0", "tq2_0": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}

# ggml's quantization speed, millions of params per second on one core, f32 rows of 6144 (M1's expert w1/w3 row;
# the IQ types' lattice search depends on the values, not the shape), with an imatrix where the type takes one.
# Measured by `python bench/bench_lowbit_speed.py` (64 rows, one thread, best of 3), with other jobs running (load
# 2.7 on its 2 cores): a floor; a second run minutes apart differed by up to 1.9x per type (see README).
THROUGHPUT_MEASURED = "2026-12-03 on the project's 2-core shared box (x86-64, llama-cpp-python 0.3.36 wheel)"
THROUGHPUT: dict[str, float] = {
    "q8_0": 232, "q4_0": 228, "q4_1": 159, "q5_0": 190, "q5_1": 112, "mxfp4": 16, "q2_k": 7.48, "q3_k": 23.3,
    "q4_k": 8.6, "q5_k": 6.22, "q6_k": 17.8, "iq1_s": 4.86, "iq1_m": 6.51, "iq2_xxs": 2.16, "iq2_xs": 1.15,
    "iq2_s": 2.34, "iq3_xxs": 1.18, "iq3_s": 1.28, "iq4_nl": 2.59, "iq4_xs": 2.33, "tq1_0": 244, "tq2_0": 192,
}


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


_SHA256: dict[tuple[str, int, int], str] = {}  # (path, size, mtime) -> sha256: a mix makes each candidate often


def _sha256(path: Any) -> str:
    import hashlib

    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA256:
        _SHA256[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return _SHA256[key]


@dataclass(frozen=True)
class GgmlScheme(Scheme):
    name: str
    imatrix: str | None = None  # a GGUF imatrix file (m1 verify imatrix, or llama.cpp's llama-imatrix)
    imatrix_sha256: str | None = None  # what --resume checks: the same statistics, not just the same path
    rounding: Rounding = Rounding()  # how the codes are chosen within ggml's scales (the K-quants: m1.schemes.gptq)
    family = FAMILY_NAME
    formats = ("gguf",)

    @classmethod
    def make(cls, name: str, imatrix: str | None = None, rounding: Rounding | None = None,
             **options: Any) -> GgmlScheme:
        given = [k for k, v in options.items() if v is not None]
        if given:
            raise UsageError(f"--{given[0].replace('_', '-')} does not apply to the ggml type {name}",
                             hint="ggml block types have a fixed block size and no options")
        if name not in BLOCK_TYPES:
            raise UsageError(f"unknown ggml type {name!r}", hint=f"use one of {', '.join(BLOCK_TYPES)}")
        if name in GGML_LIB_TYPES:
            from m1.schemes import ggml_lib

            ggml_lib.raw_library()  # one line saying what to install, before any planning
            if imatrix is None and ggml_lib.needs_imatrix(name):
                raise M1Error(f"{name} needs an importance matrix (llama-quantize refuses it without one): make "
                              f"one with `{ggml_lib.IMATRIX_COMMAND}`, then pass --imatrix imatrix.gguf")
        how = rounding or Rounding()
        if how.gptq and name not in GPTQ_TYPES:
            raise UsageError(f"--rounding gptq does not apply to {name}", hint=f"GPTQ rounds {', '.join(GPTQ_TYPES)}")
        if imatrix is None:
            return cls(name, rounding=how)
        from pathlib import Path

        path = Path(imatrix)
        if not path.is_file():
            raise UsageError("--imatrix is not a file", file=str(path), hint="make one with m1 verify imatrix")
        if name in NUMPY_TYPES:
            import warnings

            warnings.warn(f"{name} is quantized by gguf-py, which takes no importance matrix: --imatrix is ignored "
                          "(use a K-quant such as q4_k to use it)", stacklevel=2)
            return cls(name)
        return cls(name, str(path.resolve()), _sha256(path), how)

    def _importance(self, source: str, n_cols: int) -> Any:
        """The imatrix row for one source weight (an expert's row of its stacked GGUF tensor), or None."""
        if self.imatrix is None:
            return None
        if not source:  # a weight of no model (the budget prior's Gaussian sample): every column alike
            import numpy as np

            return np.ones(n_cols, dtype=np.float32)
        from m1.gguf.imatrix import importance_row, read_imatrix
        from m1.gguf.names import to_gguf
        from m1.schemes import ggml_lib

        if self.imatrix not in _IMATRICES:
            _IMATRICES[self.imatrix] = read_imatrix(self.imatrix)
        target = to_gguf(source)
        return importance_row(_IMATRICES[self.imatrix], target.name, target.expert or 0, n_cols,
                              required=ggml_lib.needs_imatrix(self.name))

    def describe(self) -> str:
        values, size = block_shape(self.name)
        gptq = ", GPTQ rounding" if self.rounding.gptq else ""
        return f"{self.name} (ggml, {values} values in {size} bytes, {8 * size / values:.2f} bits per weight{gptq})"

    def options(self) -> dict[str, Any]:
        out = {"imatrix": self.imatrix, "imatrix_sha256": self.imatrix_sha256} if self.imatrix else {}
        return {**out, "rounding": self.rounding.record()} if self.rounding.gptq else out

    def check_supported(self, device: Any) -> None:
        pass  # gguf-py runs on the CPU, whatever --device says

    def params_per_second(self) -> float | None:
        rate = THROUGHPUT.get(self.name)
        return rate * 1e6 if rate else None

    def like(self, name: str) -> Scheme:
        # gguf-py's types take no imatrix: passing it would warn for a mix that merely includes q8_0
        return make_scheme(name, imatrix=self.imatrix) if self.imatrix and name in GGML_LIB_TYPES else make_scheme(name)

    def check_weight(self, name: str, dtype: str, shape: tuple[int, ...], file: str | None = None) -> None:
        values, _ = block_shape(self.name)
        if dtype not in ("F32", "F16", "BF16"):
            raise UsageError(f"dtype {dtype} cannot be quantized to {self.name}", file=file, tensor=name,
                             hint="convert it to a float dtype first: m1 convert SRC DST --dtype bf16")
        if shape[-1] % values:
            fallback = FALLBACK.get(self.name)
            instead = f" (llama.cpp would fall back to {fallback})" if fallback else ""
            raise UsageError(f"rows of {shape[-1]} values do not split into {self.name} blocks of {values}",
                             file=file, tensor=name, hint=f"keep this tensor with --keep, or choose another "
                                                          f"type{instead}")
        if self.imatrix is not None:
            self._importance(name, shape[-1])  # the imatrix has this weight and expert, with its column count

    def pieces(self, dtype: str, shape: tuple[int, ...]) -> list[Piece]:
        return [Piece("weight", self.name.upper(), tuple(shape), type_nbytes(self.name, shape))]

    def quantization_config(self, kept_experts: list[str]) -> dict[str, Any]:
        return {}  # a GGUF records its types per tensor; there is no config.json

    def quantize(self, weight: Any, device: Any, name: str = "") -> list[tuple[str, Any]]:
        import torch

        if self.rounding.gptq:
            from m1.schemes.gptq import load_hessian

            h, tokens = load_hessian(self.rounding.hessians, name)
            if h is not None and self.rounding.enough(tokens, weight.shape[-1]):
                from m1.schemes.ggml_gptq import quantize_gptq

                blocks, _ = quantize_gptq(self.name, weight, h, self.rounding,
                                          self._importance(name, weight.shape[-1]), name)
                return [("weight", torch.from_numpy(blocks.reshape(-1)))]
        rows = weight.to(torch.float32).contiguous().numpy()
        if self.name in GGML_LIB_TYPES:
            from m1.schemes import ggml_lib

            # the rows split over torch's intra-op threads (--threads; a worker's own share of the cores): the
            # bytes do not depend on it, and one GGUF file is one worker's, so this is what spreads a file's work
            data = ggml_lib.quantize_rows(self.name, rows.reshape(-1, rows.shape[-1]),
                                          self._importance(name, rows.shape[-1]), tensor=name or None,
                                          imatrix_file=self.imatrix, threads=torch.get_num_threads())
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
    gptq_schemes=GPTQ_TYPES,
)
