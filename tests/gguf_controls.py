"""A plain GGUF writer for control experiments only: files the pipeline must never write (a wrong rope
dimension, no layer pattern), to show that llama.cpp reads what the tests say it reads."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize

from m1.errors import UsageError
from m1.gguf.metadata import KV, apply
from m1.gguf.names import ARCH
from m1.gguf.tensor_plan import TensorPlan

Q = GGMLQuantizationType


def encode(tensor: torch.Tensor, qtype: GGMLQuantizationType) -> np.ndarray:
    """A 2-D (or 1-D) source tensor as GGML bytes/values of `qtype` (gguf.quants; bf16 -> BF16 copies the bits)."""
    if qtype == Q.BF16 and tensor.dtype == torch.bfloat16:
        return tensor.contiguous().view(torch.int16).numpy().view(np.uint8)
    data = tensor.to(torch.float32).contiguous().numpy()
    return quantize(data, qtype) if qtype != Q.F32 else data


def tensor_pieces(plan: TensorPlan, read: Callable[[str], torch.Tensor]) -> Iterator[np.ndarray]:
    """The encoded data of one planned tensor, one source tensor at a time."""
    for name in plan.sources:
        tensor = read(name)
        want = plan.shape[1:] if len(plan.sources) > 1 or len(plan.shape) == 3 else plan.shape
        if tuple(tensor.shape) != tuple(want):
            raise UsageError(f"shape {tuple(tensor.shape)}, the config says {tuple(want)}", tensor=name)
        yield encode(tensor, plan.type)


def write_gguf(dest: str | Path, kvs: Iterable[KV], plan: list[TensorPlan],
               read: Callable[[str], torch.Tensor]) -> int:
    """Write one GGUF file: metadata and tensor infos, then the data of each planned tensor in order.

    Written to `dest.tmp`, fsynced, then renamed to `dest`. Returns the file's size in bytes.
    """
    dest = Path(dest)
    tmp = dest.with_name(dest.name + ".tmp")
    writer = GGUFWriter(tmp, ARCH)
    try:
        apply(writer, kvs)
        for p in plan:
            writer.add_tensor_info(p.name, p.byte_shape, np.dtype(np.uint8), p.nbytes, raw_dtype=p.type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        assert writer.fout is not None and len(writer.fout) == 1
        fout = writer.fout[0]
        align = writer.data_alignment
        fout.write(b"\0" * (-fout.tell() % align))
        for p in plan:
            written = 0
            for piece in tensor_pieces(p, read):
                piece.tofile(fout)
                written += piece.nbytes
            if written != p.nbytes:
                raise RuntimeError(f"{p.name}: wrote {written} bytes, planned {p.nbytes}")
            fout.write(b"\0" * (-p.nbytes % align))
        fout.flush()
        os.fsync(fout.fileno())
        writer.close()
        os.replace(tmp, dest)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return dest.stat().st_size
