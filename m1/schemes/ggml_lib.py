"""ggml's own quantizers (K-quants, i-quants, ternary TQ*, legacy types), called through ctypes, never re-implemented.

llama-cpp-python ships llama.cpp's libggml; its `libggml-base` exports the public C API
`ggml_quantize_chunk(type, src, dst, start, nrows, n_per_row, imatrix)` with the type traits, so the same
bytes as `llama-quantize` come from the same code. This module loads that library from the installed
`llama_cpp` package (without importing the package, which would load libllama too) and wraps it as plain
functions over numpy arrays:

    quantize_rows(type, rows f32 [n_rows, n_per_row], imatrix f32 [n_per_row] | None) -> uint8 [n_rows, row_size]
    dequantize_rows(type, blocks uint8 [n_rows, row_size], n_per_row) -> f32 [n_rows, n_per_row]   (ggml's to_float)
    row_size(type, n_per_row), block_size(type), type_size(type), requires_imatrix(type), takes_imatrix(type)

A type is a `gguf.GGMLQuantizationType`, its ggml number, or its llama.cpp name (`q4_k`, `iq4_xs`, ...).
Inputs are checked before the call (ggml aborts the process on a failed assertion): rows that do not split
into the type's blocks (256 values for the K-quants, the i-quants but IQ4_NL, and TQ*) are a `UsageError` naming
the tensor. The i-quants' grids are built once per process (`ggml_quantize_init`) and freed at exit.

The importance matrix is per column: for one 2-D weight [rows, n_per_row] it is the mean squared input of
each column (llama.cpp's in_sum2 / counts, see m1.verify.imatrix.importance). ggml's quantizers of the
K-quants, the i-quants and q4_0/q4_1/q5_0/q5_1 use it when given; q8_0, mxfp4, tq1_0 and tq2_0 ignore it
(`takes_imatrix`). IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S and IQ3_XXS are refused without one (`needs_imatrix`:
ggml aborts for the first three, llama-quantize refuses all six).
Note that gguf-py's numpy q4_0 (the project's `m1.gguf` export) has no imatrix input at all.

Pinned: llama-cpp-python==0.3.36 (extra `m1[gguf-k]`); without it every function raises one UsageError line
saying what to install. `M1_GGML_LIB=/path/to/libggml-base.so` loads another build of the same version.
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

from m1.errors import UsageError

PINNED_VERSION = "0.3.36"
IMATRIX_COMMAND = "m1 verify imatrix SRC imatrix.gguf --corpus mr-niah"
INSTALL_HINT = f"pip install 'm1[gguf-k]' (llama-cpp-python=={PINNED_VERSION})"

Q = GGMLQuantizationType
GGMLType = GGMLQuantizationType | int | str

# The types m1 quantizes with ggml (each checked in tests/test_ggml_lib.py against ggml's own dequantizer).
K_TYPES = (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)
# The i-quants (lattice codebooks; their grids are built by ggml_quantize_init) and the ternary types.
IQ_TYPES = (Q.IQ1_S, Q.IQ1_M, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ3_XXS, Q.IQ3_S, Q.IQ4_NL, Q.IQ4_XS)
TERNARY_TYPES = (Q.TQ1_0, Q.TQ2_0)
SUPPORTED: tuple[GGMLQuantizationType, ...] = (*K_TYPES, *IQ_TYPES, *TERNARY_TYPES, Q.Q4_0, Q.Q4_1, Q.Q5_0,
                                               Q.Q5_1, Q.Q8_0, Q.MXFP4)
# ggml's quantize_q8_0, quantize_mxfp4 and quantize_tq*_0 never read quant_weights; every other type uses them.
IGNORES_IMATRIX = frozenset({Q.Q8_0, Q.MXFP4, Q.TQ1_0, Q.TQ2_0})
# llama.cpp's rule (llama-quant.cpp tensor_requires_imatrix): llama-quantize refuses these without an importance
# matrix for every tensor but token_embd and output. ggml itself aborts without one for IQ1_S, IQ2_XXS and IQ2_XS
# only (ggml_quantize_requires_imatrix, which `requires_imatrix` asks); the others would be quantized badly.
LLAMA_REQUIRES_IMATRIX = frozenset({Q.IQ1_S, Q.IQ1_M, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ3_XXS})
# Byte offsets of the f16 scales in one block (ggml-common.h's block_* structs): every other field is an
# integer, so a block whose scales are finite dequantizes to finite values. MXFP4's scale is an E8M0 byte that
# a finite input never makes NaN (0xFF); it has no entry.
SCALE_OFFSETS: dict[GGMLQuantizationType, tuple[int, ...]] = {
    Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,), Q.IQ4_XS: (0,),
    Q.IQ4_NL: (0,), Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q8_0: (0,),
    Q.IQ1_S: (0,), Q.IQ2_XXS: (0,), Q.IQ2_XS: (0,), Q.IQ2_S: (0,), Q.IQ3_XXS: (0,), Q.IQ3_S: (0,),
    Q.TQ1_0: (52,), Q.TQ2_0: (64,),  # block_tq*_0: the f16 d after the quants
}  # IQ1_M spreads its f16 scale over the top nibbles of its scales (iq1m_scale_t): no entry
F32_MAX = float(np.finfo(np.float32).max)
# ggml's weighted sums have at most 256 terms of w * max(l^2, |l x|, x^2), levels |l| <= 127 and
# w = importance * sqrt(sigma2 + x^2) <= sqrt(3) * importance * |x|max: with m = max(1, |x|max) each sum stays
# below 256 * 127^2 * sqrt(3) * importance * m^3, which must be finite in f32 (m1.gguf.imatrix checks m = 1).
SUM_TERMS = 256 * 127**2 * 3**0.5


def type_of(qtype: GGMLType) -> GGMLQuantizationType:
    """The ggml type of a `GGMLQuantizationType`, its number, or its llama.cpp name (`q4_k`, `IQ4_XS`)."""
    try:
        if isinstance(qtype, str):
            t = Q[qtype.upper()]
        else:
            t = Q(int(qtype))
    except (KeyError, ValueError):
        t = None
    if t not in SUPPORTED:
        names = ", ".join(type_name(s) for s in SUPPORTED)
        raise UsageError(f"ggml type {qtype!r} is not one m1 quantizes with ggml", hint=f"choose one of {names}")
    return t


def type_name(qtype: GGMLQuantizationType) -> str:
    return qtype.name.lower()


# ---- the library -------------------------------------------------------------------------------------------


class _TypeTraits(ctypes.Structure):  # struct ggml_type_traits (ggml.h)
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
_LIB_NAMES = ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll")


def _missing(why: str) -> UsageError:
    return UsageError(f"ggml's quantizers (K-quants, IQ4) need llama.cpp's libggml from llama-cpp-python: {why}",
                      hint=INSTALL_HINT)


def library_path() -> Path:
    """Where libggml-base is: $M1_GGML_LIB, else inside the installed llama_cpp package (not imported)."""
    override = os.environ.get("M1_GGML_LIB")
    if override:
        if not Path(override).is_file():
            raise _missing(f"M1_GGML_LIB={override} is not a file")
        return Path(override)
    import importlib.metadata
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise _missing("llama_cpp is not installed")
    try:
        version = importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    if version != PINNED_VERSION:
        raise _missing(f"version {version} is installed, m1 is tested with {PINNED_VERSION} only")
    package = Path(spec.origin).parent
    for folder in (package / "lib", package):
        for name in _LIB_NAMES:
            if (folder / name).is_file():
                return folder / name
    raise _missing(f"no libggml-base in {package / 'lib'} (a broken install?)")


@lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL:
    path = library_path()
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        raise _missing(f"cannot load {path} ({exc})") from None
    i64, size, ctype = ctypes.c_int64, ctypes.c_size_t, ctypes.c_int
    fptr = ctypes.POINTER(ctypes.c_float)
    lib.ggml_quantize_chunk.argtypes = [ctype, fptr, ctypes.c_void_p, i64, i64, i64, fptr]
    lib.ggml_quantize_chunk.restype = size
    lib.ggml_quantize_init.argtypes = [ctype]
    lib.ggml_quantize_init.restype = None
    lib.ggml_quantize_free.argtypes = []
    lib.ggml_quantize_free.restype = None
    lib.ggml_quantize_requires_imatrix.argtypes = [ctype]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_row_size.argtypes = [ctype, i64]
    lib.ggml_row_size.restype = size
    lib.ggml_type_size.argtypes = [ctype]
    lib.ggml_type_size.restype = size
    lib.ggml_blck_size.argtypes = [ctype]
    lib.ggml_blck_size.restype = i64
    lib.ggml_get_type_traits.argtypes = [ctype]
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    return lib


_INITIALISED: set[GGMLQuantizationType] = set()


def _init(lib: ctypes.CDLL, t: GGMLQuantizationType) -> None:
    """ggml_quantize_init once per type and process (the IQ grids and their neighbour maps, some MB each: ggml
    builds them under its own lock), and ggml_quantize_free at exit for all of them."""
    if t in _INITIALISED:
        return
    if not _INITIALISED:
        import atexit

        atexit.register(_free, lib)
    lib.ggml_quantize_init(int(t))
    _INITIALISED.add(t)


def _free(lib: ctypes.CDLL) -> None:
    lib.ggml_quantize_free()
    _INITIALISED.clear()


def initialised() -> frozenset[GGMLQuantizationType]:
    """The types whose tables this process has built (for tests: once each, freed at exit)."""
    return frozenset(_INITIALISED)


def available() -> bool:
    """Whether libggml can be loaded (llama-cpp-python 0.3.36 installed)."""
    try:
        _lib()
    except UsageError:
        return False
    return True


def raw_library() -> ctypes.CDLL:
    """The loaded libggml-base with its prototypes set (for benchmarks and tests that call ggml directly)."""
    return _lib()


# ---- sizes -------------------------------------------------------------------------------------------------


def block_size(qtype: GGMLType) -> int:
    """Values per block (256 for the K-quants, most i-quants and TQ*; 32 for q4_0/q8_0/iq4_nl/mxfp4)."""
    return int(_lib().ggml_blck_size(int(type_of(qtype))))


def type_size(qtype: GGMLType) -> int:
    """Bytes per block."""
    return int(_lib().ggml_type_size(int(type_of(qtype))))


def check_rows(qtype: GGMLType, n_per_row: int, tensor: str | None = None) -> None:
    """UsageError, naming the tensor, when rows of `n_per_row` values do not split into the type's blocks."""
    t = type_of(qtype)
    blck = block_size(t)
    if n_per_row < 1 or n_per_row % blck:
        kind = "super-blocks" if blck == 256 else "blocks"
        raise UsageError(f"rows of {n_per_row} values do not split into {type_name(t)} {kind} of {blck}",
                         tensor=tensor, hint="keep this tensor in another type (--keep), or choose a type with "
                                             "smaller blocks (q8_0, q4_0: 32)")


def row_size(qtype: GGMLType, n_per_row: int, tensor: str | None = None) -> int:
    """Bytes of one quantized row of `n_per_row` values (ggml_row_size); checks that the blocks fit."""
    check_rows(qtype, n_per_row, tensor)
    return int(_lib().ggml_row_size(int(type_of(qtype)), n_per_row))


def requires_imatrix(qtype: GGMLType) -> bool:
    """Whether ggml refuses to quantize this type without an importance matrix (the IQ1/IQ2 family)."""
    return bool(_lib().ggml_quantize_requires_imatrix(int(type_of(qtype))))


def needs_imatrix(qtype: GGMLType) -> bool:
    """Whether m1 refuses the type without an importance matrix: ggml's own rule (`requires_imatrix`) or
    llama-quantize's (`LLAMA_REQUIRES_IMATRIX`), whichever is stricter."""
    t = type_of(qtype)
    return t in LLAMA_REQUIRES_IMATRIX or requires_imatrix(t)


def takes_imatrix(qtype: GGMLType) -> bool:
    """Whether ggml's quantizer of this type uses an importance matrix when given one (q8_0, mxfp4 do not)."""
    return type_of(qtype) not in IGNORES_IMATRIX


# ---- quantize / dequantize ---------------------------------------------------------------------------------


def _f32_rows(data: np.ndarray, tensor: str | None) -> np.ndarray:
    if hasattr(data, "detach") and hasattr(data, "is_floating_point"):  # a torch tensor (bf16 from the release)
        if not data.is_floating_point():
            raise UsageError(f"quantize_rows takes float values, got {data.dtype}", tensor=tensor)
        import torch

        data = data.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
    rows = np.asarray(data)
    if rows.ndim == 1:
        rows = rows[None]
    if rows.ndim != 2 or rows.shape[0] == 0:
        raise UsageError(f"quantize_rows takes a 2-D array [rows, n_per_row], got shape {rows.shape}", tensor=tensor)
    if rows.dtype.kind != "f":
        raise UsageError(f"quantize_rows takes float values, got {rows.dtype}", tensor=tensor)
    return np.ascontiguousarray(rows, dtype=np.float32)


def _check_finite(values: np.ndarray, what: str, tensor: str | None) -> None:
    # One pass at memory speed with no temporary: a NaN or infinity makes the float32 sum non-finite. Only when it
    # is (an overflow of huge finite values could do that too) is every value checked.
    if not math.isfinite(float(np.add.reduce(values.reshape(-1)))) and not np.isfinite(values).all():
        raise UsageError(f"{what} holds NaN or infinite values; ggml cannot quantize them", tensor=tensor,
                         hint="check the source with m1 verify integrity --deep")


def _imatrix_row(imatrix: np.ndarray | None, t: GGMLQuantizationType, n_per_row: int,
                 tensor: str | None, file: str | None = None) -> np.ndarray | None:
    if imatrix is None:
        if needs_imatrix(t):
            raise UsageError(f"{type_name(t)} needs an importance matrix", tensor=tensor,
                             hint=f"make one with {IMATRIX_COMMAND}")
        return None
    weights = np.ascontiguousarray(np.asarray(imatrix, dtype=np.float32).reshape(-1))
    if weights.shape[0] != n_per_row:
        raise UsageError(f"the importance matrix has {weights.shape[0]} values for rows of {n_per_row}",
                         file=file, tensor=tensor, hint="an imatrix row is one value per input column of the weight")
    if not np.isfinite(weights).all():
        raise UsageError("the importance matrix holds NaN or infinite values; ggml cannot quantize with them",
                         file=file, tensor=tensor, hint="make the imatrix again with m1 verify imatrix")
    if (weights < 0).any():
        raise UsageError("the importance matrix has negative values (it is a sum of squares)", file=file,
                         tensor=tensor)
    return weights


def _check_importance_range(weights: np.ndarray, rows: np.ndarray, tensor: str | None, file: str | None) -> None:
    """That ggml's weighted sums (SUM_TERMS) stay finite for these importances and these rows."""
    top = float(weights.max()) if weights.size else 0.0
    if top == 0.0:
        return
    m = max(1.0, float(np.abs(rows).max()))
    if top * SUM_TERMS * m**3 > F32_MAX:
        raise UsageError(f"an importance of {top:.3g} with weights up to {m:.3g} overflows ggml's weighted sums "
                         f"(at most {F32_MAX / (SUM_TERMS * m**3):.3g} for these weights)", file=file, tensor=tensor,
                         hint="the importance matrix is damaged or from another model: make it again with m1 verify "
                              "imatrix, or quantize without --imatrix")


def check_blocks(qtype: GGMLType, blocks: np.ndarray, tensor: str | None = None) -> None:
    """UsageError when a quantized block's f16 scale is not finite (weights past f16's range, or an importance
    ggml could not weigh): checked on the bytes, before anything is written, without dequantizing."""
    t = type_of(qtype)
    offsets = SCALE_OFFSETS.get(t, ())
    if not offsets:
        return
    from gguf import GGML_QUANT_SIZES

    size = GGML_QUANT_SIZES[t][1]
    raw = np.ascontiguousarray(blocks).reshape(-1).view(np.uint8)
    if raw.size % size:
        raise UsageError(f"{raw.size} bytes are not whole {type_name(t)} blocks of {size} bytes", tensor=tensor)
    per_block = raw.reshape(-1, size)
    for offset in offsets:
        scales = np.ascontiguousarray(per_block[:, offset : offset + 2]).view(np.float16)
        if not np.isfinite(scales).all():
            block = int(np.flatnonzero(~np.isfinite(scales.reshape(-1)))[0])
            raise UsageError(f"block {block} of the {type_name(t)} output has a scale that is not finite (f16 "
                             "holds at most 65504): ggml would write NaN or infinite weights", tensor=tensor,
                             hint="check the source with m1 verify integrity --deep, and the imatrix if one is given")


def quantize_rows(qtype: GGMLType, data: np.ndarray, imatrix: np.ndarray | None = None, *,
                  tensor: str | None = None, threads: int = 1, check_finite: bool = True,
                  imatrix_file: str | None = None) -> np.ndarray:
    """ggml's quantization of rows `data` f32 [n_rows, n_per_row] (1-D: one row; a torch tensor of any float dtype
    is taken as its f32 values) -> uint8 [n_rows, row_size].

    imatrix: f32 [n_per_row] column importances for this 2-D weight (one expert's), or None. `tensor` names the
    tensor in errors. threads > 1 splits the rows over threads (ctypes releases the GIL; ggml's quantizers are
    thread-safe once initialised); the bytes do not depend on it. check_finite=False skips the NaN/inf check of
    `data` (one pass at memory speed) for a caller that has made it already. `imatrix_file` names the imatrix
    in errors. The importances are checked against the rows (`SUM_TERMS`) and the output's scales for finite
    values (`check_blocks`).
    """
    t = type_of(qtype)
    rows = _f32_rows(data, tensor)
    n_rows, n_per_row = rows.shape
    rsize = row_size(t, n_per_row, tensor)
    weights = _imatrix_row(imatrix, t, n_per_row, tensor, imatrix_file)
    if check_finite:
        _check_finite(rows, "the tensor", tensor)
    if weights is not None and takes_imatrix(t):
        _check_importance_range(weights, rows, tensor, imatrix_file)
    out = np.empty((n_rows, rsize), dtype=np.uint8)
    lib = _lib()
    _init(lib, t)
    fptr = ctypes.POINTER(ctypes.c_float)
    imat = weights.ctypes.data_as(fptr) if weights is not None else None

    def chunk(first: int, count: int) -> int:
        src = rows[first : first + count]
        return int(lib.ggml_quantize_chunk(int(t), src.ctypes.data_as(fptr), out[first:].ctypes.data, 0, count,
                                           n_per_row, imat))

    threads = max(1, min(int(threads), n_rows))
    if threads == 1:
        written = chunk(0, n_rows)
    else:
        step = -(-n_rows // threads)
        with ThreadPoolExecutor(threads) as pool:
            written = sum(pool.map(lambda first: chunk(first, min(step, n_rows - first)), range(0, n_rows, step)))
    if written != out.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes, expected {out.nbytes} ({type_name(t)})")
    check_blocks(t, out, tensor)
    return out


def dequantize_rows(qtype: GGMLType, blocks: np.ndarray, n_per_row: int) -> np.ndarray:
    """ggml's own dequantizer (type traits' to_float) of uint8 blocks [n_rows, row_size] -> f32 [n_rows, n_per_row]."""
    t = type_of(qtype)
    rsize = row_size(t, n_per_row)
    raw = np.ascontiguousarray(np.asarray(blocks, dtype=np.uint8)).reshape(-1)
    if raw.size % rsize:
        raise UsageError(f"{raw.size} bytes are not whole {type_name(t)} rows of {rsize} bytes")
    n_rows = raw.size // rsize
    out = np.empty((n_rows, n_per_row), dtype=np.float32)
    traits = _lib().ggml_get_type_traits(int(t)).contents
    if not traits.to_float:
        raise RuntimeError(f"ggml has no to_float for {type_name(t)}")
    _TO_FLOAT(traits.to_float)(raw.ctypes.data, out.ctypes.data, out.size)
    return out


def describe(types: Iterable[GGMLType] = SUPPORTED) -> list[dict[str, object]]:
    """Block size, bytes per block, bits per weight and imatrix use of each type (for plans and docs)."""
    out = []
    for qtype in types:
        t = type_of(qtype)
        blck, size = block_size(t), type_size(t)
        out.append({"type": type_name(t), "block": blck, "block_bytes": size, "bits_per_weight": 8 * size / blck,
                    "takes_imatrix": takes_imatrix(t), "requires_imatrix": requires_imatrix(t),
                    "needs_imatrix": needs_imatrix(t)})
    return out


if __name__ == "__main__":  # pragma: no cover - a quick look: python -m m1.schemes.ggml_lib
    print(library_path(), file=sys.stderr)
    for row in describe():
        print(row)
