"""The GGUF sink: one file (or llama.cpp's `-0000i-of-0000n` splits) per plan file, streamed.

Each file is its header (metadata and tensor infos, written with gguf-py's `GGUFWriter`) and then the
tensors' data in plan order, each padded to the alignment, written and hashed as the bytes pass. The
first split carries all metadata and every split the `split.*` keys, as llama.cpp's gguf-split does.
The executor writes the first split last, so a set whose first file exists is whole.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

from m1.atomic_io import ChunkSink, PendingShard, Produced, raise_if_disk_full
from m1.errors import InternalError, UsageError
from m1.plan import OutputFile, Plan

ALIGNMENT = 32  # gguf's default


def _header(plan: Plan, file: OutputFile) -> bytes:
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter

    from m1.gguf.metadata import KV, apply
    from m1.gguf.names import ARCH
    from m1.schemes.ggml import type_nbytes

    data = plan.sink_data
    index = [f.name for f in plan.files].index(file.name)
    with tempfile.TemporaryDirectory(prefix="m1-gguf-") as tmp:
        path = Path(tmp) / "header.gguf"
        writer = GGUFWriter(path, ARCH)
        if index == 0:
            apply(writer, [KV(kv["key"], kv["value"], GGUFValueType(kv["type"]),
                              None if kv["sub_type"] is None else GGUFValueType(kv["sub_type"]))
                           for kv in data["kvs"]])
        if len(plan.files) > 1:
            writer.add_uint16("split.no", index)
            writer.add_uint16("split.count", len(plan.files))
            writer.add_int32("split.tensors.count", sum(len(f.tensors) for f in plan.files))
        for t in file.tensors:
            qtype = GGMLQuantizationType[t.dtype]
            nbytes = type_nbytes(t.dtype.lower(), t.shape)
            if nbytes != t.nbytes:
                raise InternalError(f"planned {t.nbytes} bytes, {t.dtype} needs {nbytes}", tensor=t.name)
            from gguf.quants import quant_shape_to_byte_shape

            writer.add_tensor_info(t.name, quant_shape_to_byte_shape(t.shape, qtype), np.dtype(np.uint8), nbytes,
                                   raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        writer.close()
        header = path.read_bytes()
    return header + b"\0" * (-len(header) % ALIGNMENT)


class GGUFSink:
    name = "gguf"
    first_last = True  # llama.cpp opens a split set by its first file: it appears only when the set is whole

    def write_file(self, path: Path, file: OutputFile, produce: Callable[[str], Produced],
                   on_bytes: Callable[[int], None] | None = None, plan: Plan | None = None
                   ) -> tuple[str, int, PendingShard]:
        import hashlib

        if plan is None:
            raise InternalError("the GGUF sink needs the plan", file=path.name)
        header = _header(plan, file)
        tmp = path.with_name(f".{path.name}.tmp")
        sha = hashlib.sha256()
        try:
            with open(tmp, "wb", buffering=0) as f, ChunkSink(f.fileno(), sha) as sink:  # threads end first
                sink.put(header)
                for t in file.tensors:
                    written = sink.put_all(produce(t.name).chunks, on_bytes)
                    if written != t.nbytes:
                        raise InternalError(f"produced {written} bytes, planned {t.nbytes}", file=path.name,
                                            tensor=t.name)
                    pad = -written % ALIGNMENT
                    if pad:
                        sink.put(b"\0" * pad)
            size = tmp.stat().st_size
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            raise_if_disk_full(exc, path)
            raise
        return sha.hexdigest(), size, PendingShard(tmp, path)

    def check(self, plan: Plan) -> None:
        """Before anything is written: what the plan could not settle (a missing tokenizer, say)."""
        missing = plan.sink_data.get("missing")
        if missing:
            raise UsageError(missing["message"], file=missing.get("file"), hint=missing.get("hint"))

    def finish(self, dest: Path, plan: Plan) -> list[str]:
        return []  # the files carry their own metadata: no index

    def file_bytes(self, plan: Plan, file: OutputFile) -> int:
        return len(_header(plan, file)) + sum(t.nbytes + -t.nbytes % ALIGNMENT for t in file.tensors)

    def finish_bytes(self, plan: Plan) -> dict[str, int]:
        return {}


SINK = GGUFSink()
