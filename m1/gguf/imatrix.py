"""llama.cpp's GGUF imatrix file (tools/imatrix/imatrix.cpp's `save_imatrix`), read and written.

`general.type = imatrix`, `imatrix.datasets` (string array), `imatrix.chunk_count` and `imatrix.chunk_size`
(u32), and per weight, tensor names sorted, `<gguf name>.in_sum2` F32 [n_cols, n_mat] and `<gguf name>.counts`
F32 [1, n_mat] (GGUF ne order), n_mat = n_expert for the stacked `*_exps` weights and 1 otherwise, names
m1.gguf.names' (llama.cpp minimax-01). `m1 verify imatrix` collects by spec weight name (m1.verify.imatrix) and
writes it through the gguf format (`write_stats`); the ggml schemes read it (`importance`) to quantize K-quants
with it.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from m1.errors import UsageError

SUM2 = ".in_sum2"
COUNTS = ".counts"
# The largest importance (in_sum2 / counts) ggml can weigh with weights inside +-1: its K-quant and IQ4
# quantizers form sums of at most 256 terms w * l^2 (l a level, |l| <= 127; w = importance * sqrt(sigma2 + x^2)
# <= sqrt(3) * importance for |x| <= 1), so 256 * 127^2 * sqrt(3) * importance must stay below FLT_MAX (3.4e38).
# m1.schemes.ggml_lib checks the same bound against each tensor's own largest weight before calling ggml.
IMPORTANCE_MAX = float(np.finfo(np.float32).max) / (256 * 127**2 * 3**0.5)
_READ_ERRORS = (OSError, ValueError, IndexError, KeyError, TypeError, struct.error, OverflowError)


@dataclass
class Entry:
    """One weight's statistics: sums float64 [n_mat, n_cols] of squared inputs, counts int64 [n_mat] of rows."""

    name: str  # GGUF tensor name, e.g. blk.3.ffn_down_exps.weight
    sums: np.ndarray
    counts: np.ndarray

    @property
    def n_mat(self) -> int:
        return int(self.sums.shape[0])

    @property
    def n_cols(self) -> int:
        return int(self.sums.shape[1])


@dataclass
class IMatrix:
    entries: dict[str, Entry]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    seconds: float = 0.0
    source: str | None = None  # the file it was read from (for errors)

    def unseen_experts(self) -> dict[int, list[int]]:
        """layer -> the experts no calibration token was routed to (from that layer's ffn_up_exps counts)."""
        out: dict[int, list[int]] = {}
        for name, e in self.entries.items():
            if name.endswith(".ffn_up_exps.weight"):
                zero = [int(i) for i in np.flatnonzero(e.counts == 0)]
                if zero:
                    out[int(name.split(".")[1])] = zero
        return dict(sorted(out.items()))

    def routed_tokens(self, layer: int) -> np.ndarray:
        """Tokens routed to each expert of `layer` (int64 [n_expert])."""
        return self.entries[f"blk.{layer}.ffn_up_exps.weight"].counts.copy()


def from_stats(stats: Any) -> IMatrix:
    """The GGUF imatrix of statistics collected by spec weight name (m1.verify.imatrix.ImportanceStats): each
    weight under its GGUF tensor name, the experts of a layer stacked in expert order."""
    from m1.gguf.names import to_gguf

    slots: dict[str, dict[int, Any]] = {}
    for name, weight in stats.weights.items():
        target = to_gguf(name)
        slots.setdefault(target.name, {})[target.expert or 0] = weight
    entries = {}
    for name, by_slot in slots.items():
        mats = [by_slot[i] for i in range(len(by_slot))]
        entries[name] = Entry(name, np.stack([m.sums for m in mats]), np.array([m.rows for m in mats], dtype=np.int64))
    return IMatrix(dict(sorted(entries.items())), list(stats.datasets), stats.chunk_count, stats.chunk_size,
                   stats.seconds)


# ---- the file ---------------------------------------------------------------------------------------------


def write_stats(path: str | Path, stats: Any) -> int:
    """`write_imatrix` of `from_stats(stats)`: what `m1 verify imatrix` writes."""
    return write_imatrix(path, from_stats(stats))


def write_imatrix(path: str | Path, imatrix: IMatrix) -> int:
    """Write llama.cpp's GGUF imatrix file (temp name, fsync, rename). Returns its size in bytes."""
    import gguf

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    writer = gguf.GGUFWriter(tmp, "imatrix")
    writer.kv_data[0].pop("general.architecture", None)  # llama-imatrix writes none
    try:
        writer.add_type(gguf.GGUFType.IMATRIX)
        writer.add_array(gguf.Keys.IMatrix.DATASETS, list(imatrix.datasets))
        writer.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, imatrix.chunk_count)
        writer.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, imatrix.chunk_size)
        for name in sorted(imatrix.entries):
            e = imatrix.entries[name]
            writer.add_tensor(name + SUM2, np.ascontiguousarray(e.sums, dtype=np.float32))  # ne [n_cols, n_mat]
            writer.add_tensor(name + COUNTS, e.counts.astype(np.float32).reshape(e.n_mat, 1))  # ne [1, n_mat]
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        assert writer.fout is not None
        for f in writer.fout:
            f.flush()
            os.fsync(f.fileno())
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return path.stat().st_size


def read_imatrix(path: str | Path) -> IMatrix:
    """Read a GGUF imatrix (ours or llama-imatrix's)."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
        fields = {k: f.contents() for k, f in reader.fields.items()}
        tensors = {t.name: t for t in reader.tensors}
    except _READ_ERRORS as exc:  # gguf-py raises IndexError or struct.error on a truncated file
        raise UsageError(f"cannot read a GGUF imatrix ({type(exc).__name__}: {exc})", file=str(path),
                         hint="make one with m1 verify imatrix SRC OUT.gguf") from None
    if fields.get("general.type") != "imatrix":
        raise UsageError(f"not an imatrix file (general.type is {fields.get('general.type')!r})", file=str(path),
                         hint="make one with m1 verify imatrix SRC OUT.gguf")
    entries = {}
    for tname, t in tensors.items():
        if not tname.endswith(SUM2):
            continue
        name = tname[: -len(SUM2)]
        counts = tensors.get(name + COUNTS)
        if counts is None:
            raise UsageError(f"{tname} has no {name + COUNTS}", file=str(path), tensor=name)
        entries[name] = _entry(name, t, counts, str(path))
    try:
        datasets = [str(d) for d in fields.get("imatrix.datasets") or []]
        chunk_count, chunk_size = int(fields.get("imatrix.chunk_count", 0)), int(fields.get("imatrix.chunk_size", 0))
    except (TypeError, ValueError):
        raise UsageError("imatrix.datasets, chunk_count or chunk_size has the wrong type", file=str(path)) from None
    return IMatrix(dict(sorted(entries.items())), datasets, chunk_count, chunk_size, source=str(path))


def _entry(name: str, sums_t: Any, counts_t: Any, file: str) -> Entry:
    """One weight's tensors checked for what ggml can use: f32, [n_cols, n_mat] and [1, n_mat] (GGUF ne order),
    finite, not negative, whole counts, and means (in_sum2 / counts) within IMPORTANCE_MAX."""
    from gguf import GGMLQuantizationType

    for t in (sums_t, counts_t):
        if t.tensor_type != GGMLQuantizationType.F32:
            raise UsageError(f"{t.name} is {t.tensor_type.name}, an imatrix stores F32",
                             file=file, tensor=name)
    shape = [int(d) for d in sums_t.shape]
    if len(shape) not in (1, 2) or min(shape) < 1:
        raise UsageError(f"{name + SUM2} has shape {shape}, not [n_cols, n_mat]", file=file, tensor=name)
    n_cols, n_mat = (shape[0], shape[1]) if len(shape) == 2 else (shape[0], 1)
    raw_counts = np.asarray(counts_t.data, dtype=np.float32).reshape(-1)
    if raw_counts.size != n_mat:
        raise UsageError(f"{name + COUNTS} has {raw_counts.size} values for the {n_mat} matrices of {name + SUM2}",
                         file=file, tensor=name, hint="the file is damaged: make it again with m1 verify imatrix")
    sums = np.asarray(sums_t.data, dtype=np.float32).reshape(n_mat, n_cols)
    for what, values in ((SUM2, sums), (COUNTS, raw_counts)):
        if not np.isfinite(values).all() or (values < 0).any():
            raise UsageError(f"{name + what} holds negative, NaN or infinite values (sums of squares and token "
                             "counts are finite and not negative)", file=file, tensor=name,
                             hint="the file is damaged: make it again with m1 verify imatrix")
    counts = np.rint(raw_counts).astype(np.int64)
    seen = counts > 0
    means = sums[seen].astype(np.float64) / counts[seen, None]
    if means.size and float(means.max()) > IMPORTANCE_MAX:
        raise UsageError(f"{name} has an importance of {float(means.max()):.3g} (in_sum2 / counts), past the "
                         f"{IMPORTANCE_MAX:.3g} ggml's quantizers can weigh without overflowing", file=file,
                         tensor=name, hint="the file is damaged: make it again with m1 verify imatrix")
    return Entry(name, sums.astype(np.float64), counts)


# What llama-imatrix never collects by default: the embedding is a row lookup, not a product, and the head's
# input only with --process-output. llama-quantize quantizes these without an imatrix row unless the type needs one.
UNCOLLECTED = ("token_embd.weight", "output.weight")


def importance_row(imatrix: IMatrix, gguf_name: str, matrix: int, n_cols: int, required: bool = True
                   ) -> np.ndarray | None:
    """`importance` of one matrix (expert `matrix` of a stacked weight, else 0), checked against the weight:
    the imatrix has that matrix and one value per column of its rows. None for a tensor of UNCOLLECTED the file
    lacks, unless `required` (the type needs an imatrix), as llama-quantize does."""
    if not required and gguf_name in UNCOLLECTED and gguf_name not in imatrix.entries:
        return None
    e = _find(imatrix, gguf_name)
    hint = "make it from the same model with m1 verify imatrix"
    if matrix >= e.n_mat:
        raise UsageError(f"the imatrix has {e.n_mat} matrices (experts) for {gguf_name}, the model at least "
                         f"{matrix + 1}", file=imatrix.source, tensor=gguf_name, hint=hint)
    if e.n_cols != n_cols:
        raise UsageError(f"the imatrix has {e.n_cols} columns for {gguf_name}, whose rows have {n_cols} values",
                         file=imatrix.source, tensor=gguf_name, hint=hint)
    if e.counts[matrix] <= 0:  # no token reached it: every column alike, as in `importance`
        return np.ones(e.n_cols, dtype=np.float32)
    return (e.sums[matrix] / e.counts[matrix]).astype(np.float32)  # `importance`'s row, without the others


def _find(imatrix: IMatrix, gguf_name: str) -> Entry:
    try:
        return imatrix.entries[gguf_name]
    except KeyError:
        raise UsageError(f"the imatrix has no entry for {gguf_name}", file=imatrix.source, tensor=gguf_name,
                         hint="make it from the same model with m1 verify imatrix") from None


def importance(imatrix: IMatrix, gguf_name: str) -> np.ndarray:
    """What ggml's quantizer takes for `gguf_name`: f32 [n_mat, n_cols], in_sum2 / counts per matrix, 1 where a
    matrix saw no token (llama-quantize's load_imatrix). Row e is expert e's imatrix for a stacked weight."""
    e = _find(imatrix, gguf_name)
    out = np.ones_like(e.sums, dtype=np.float32)
    seen = e.counts > 0
    out[seen] = (e.sums[seen] / e.counts[seen, None]).astype(np.float32)
    return out
