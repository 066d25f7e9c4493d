"""llama.cpp's GGUF imatrix file (tools/imatrix/imatrix.cpp's `save_imatrix`), read and written.

`general.type = imatrix`, `imatrix.datasets` (string array), `imatrix.chunk_count` and `imatrix.chunk_size`
(u32), and per weight, tensor names sorted, `<gguf name>.in_sum2` F32 [n_cols, n_mat] and `<gguf name>.counts`
F32 [1, n_mat] (GGUF ne order), n_mat = n_expert for the stacked `*_exps` weights and 1 otherwise. `m1 verify
imatrix` writes it; the ggml schemes read it (`importance`) to quantize K-quants with it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from m1.errors import UsageError

SUM2 = ".in_sum2"
COUNTS = ".counts"


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


# ---- the file ---------------------------------------------------------------------------------------------


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
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read a GGUF imatrix ({exc})", file=str(path)) from None
    fields = {k: f.contents() for k, f in reader.fields.items()}
    if fields.get("general.type") != "imatrix":
        raise UsageError(f"not an imatrix file (general.type is {fields.get('general.type')!r})", file=str(path),
                         hint="make one with m1 verify imatrix SRC OUT.gguf")
    tensors = {t.name: t for t in reader.tensors}
    entries = {}
    for tname, t in tensors.items():
        if not tname.endswith(SUM2):
            continue
        name = tname[: -len(SUM2)]
        counts = tensors.get(name + COUNTS)
        if counts is None:
            raise UsageError(f"{tname} has no {name + COUNTS}", file=str(path))
        n_cols, n_mat = (int(d) for d in t.shape) if len(t.shape) == 2 else (int(t.shape[0]), 1)
        sums = np.asarray(t.data, dtype=np.float32).reshape(n_mat, n_cols).astype(np.float64)
        n = np.rint(np.asarray(counts.data, dtype=np.float32).reshape(-1)).astype(np.int64)
        entries[name] = Entry(name, sums, n)
    datasets = fields.get("imatrix.datasets") or []
    return IMatrix(dict(sorted(entries.items())), list(datasets), int(fields.get("imatrix.chunk_count", 0)),
                   int(fields.get("imatrix.chunk_size", 0)))


def importance(imatrix: IMatrix, gguf_name: str) -> np.ndarray:
    """What ggml's quantizer takes for `gguf_name`: f32 [n_mat, n_cols], in_sum2 / counts per matrix, 1 where a
    matrix saw no token (llama-quantize's load_imatrix). Row e is expert e's imatrix for a stacked weight."""
    try:
        e = imatrix.entries[gguf_name]
    except KeyError:
        raise UsageError(f"the imatrix has no entry for {gguf_name}", tensor=gguf_name,
                         hint="make it from the same model with m1 verify imatrix") from None
    out = np.ones_like(e.sums, dtype=np.float32)
    seen = e.counts > 0
    out[seen] = (e.sums[seen] / e.counts[seen, None]).astype(np.float32)
    return out
