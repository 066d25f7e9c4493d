"""Running a plan's tensor operations: the bytes of each output tensor, in the order a sink asks for them.

An op runs when its first output is asked for: copy hands the sink byte ranges of the source file (copied
in the kernel, as `cp` does), cast converts row chunks, quantize and dequantize go through the scheme's
library, stack concatenates its sources (a stacked tensor's rows are its sources' rows, in order), so no
op holds more than one source tensor, and copy and cast hold only a chunk.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from m1.atomic_io import Produced, file_ranges, tensor_bytes
from m1.checkpoint import Checkpoint
from m1.dtypes import dtype_name, torch_dtype
from m1.errors import InternalError
from m1.plan import OutputFile, TensorOp

if TYPE_CHECKING:
    import torch

CAST_CHUNK = 32 << 20


@dataclass
class Timing:
    read_s: float = 0.0
    quantize_s: float = 0.0  # the scheme's library, including host<->device copies on CUDA
    write_s: float = 0.0  # writing and hashing: the file's time minus read and quantize
    cpu_s: float = 0.0  # CPU time of the writing processes (all their threads): unaffected by other load

    def add(self, other: dict[str, float]) -> None:
        for key, value in other.items():
            setattr(self, key, getattr(self, key) + value)


class OpRunner:
    """`produce(name)` for a sink writing `file`.

    On a GPU, while one weight is quantized and written, the next one of the file is read by a helper
    thread (the read releases the GIL), so the disk and the quantizer overlap. On CPU, where reading is a
    few percent of the time, it is not worth a second tensor in memory.
    """

    def __init__(self, ckpt: Checkpoint, file: OutputFile, scheme: Any, device: str = "cpu",
                 timing: Timing | None = None, schemes: dict[str, Any] | None = None) -> None:
        self.ckpt = ckpt
        self.scheme = scheme
        self.schemes = schemes or {}
        self.device = device
        self.timing = timing or Timing()
        self.op_of = {o.name: op for op in file.ops for o in op.outputs}
        self.to_quantize = [op.sources[0].name for op in file.ops if op.kind == "quantize"]
        self.pending: dict[str, Produced] = {}
        self._schemes: dict[str, Any] = {}
        self.reader: ThreadPoolExecutor | None = None
        self.ahead: tuple[str, Future] | None = None

    def __call__(self, name: str) -> Produced:
        if name not in self.pending:
            op = self.op_of.get(name)
            if op is None or op.outputs[0].name != name:
                raise InternalError(f"output {name} was asked for out of its op's order", tensor=name)
            self.pending = dict(zip((o.name for o in op.outputs), self._run(op), strict=True))
        return self.pending.pop(name)

    def close(self) -> None:
        self.ahead = None
        if self.reader is not None:
            self.reader.shutdown(wait=True, cancel_futures=True)

    # ---- the op kinds -----------------------------------------------------------------------------
    def _run(self, op: TensorOp) -> list[Produced]:
        if op.kind in ("copy", "rename"):
            return [Produced(o.dtype, o.shape, self._raw(s.name)) for s, o in zip(op.sources, op.outputs, strict=True)]
        if op.kind == "cast":
            out = op.outputs[0]
            return [Produced(out.dtype, out.shape, self._cast(op.sources[0].name, out.dtype))]
        if op.kind == "stack":  # a stacked tensor's rows are its sources' rows, in order: one source at a time
            out = op.outputs[0]
            if op.scheme is None:
                chunks = (c for s in op.sources for c in self._cast(s.name, out.dtype))
            else:
                chunks = (self._quantized(op, s.name)[0][1] for s in op.sources)
            return [Produced(out.dtype, out.shape, chunks)]
        if op.kind == "quantize":
            return self._quantize(op)
        if op.kind == "dequantize":
            from m1.quantized import dequantize_weight

            out = op.outputs[0]
            weight = dequantize_weight(self.ckpt, op.sources[0].name, out.shape).to(torch_dtype(out.dtype))
            return [Produced(dtype_name(weight.dtype), tuple(weight.shape), [tensor_bytes(weight)])]
        raise InternalError(f"unknown op kind {op.kind!r}", tensor=op.outputs[0].name)

    def _raw(self, source: str) -> Iterator[Any]:
        info = self.ckpt.info(source)
        storage = self.ckpt.storage
        if info.file.endswith(".safetensors") and storage.copy_in_kernel:
            # byte ranges: copied in the kernel, like cp (not while streaming: the shard may be gone by then)
            check = self.ckpt.source_check
            for piece in file_ranges(self.ckpt.local_path(info.file), info.start, info.nbytes):
                if check is not None:
                    check.observe(info.file, piece.offset, piece.length)
                yield piece
            return
        chunks = self.ckpt.iter_chunks(source)
        while True:
            started = time.perf_counter()
            chunk = next(chunks, None)
            self.timing.read_s += time.perf_counter() - started
            if chunk is None:
                return
            yield chunk[1]

    def _cast(self, source: str, dtype: str) -> Iterator[Any]:
        import torch

        src = torch_dtype(self.ckpt.info(source).dtype)
        if dtype == self.ckpt.info(source).dtype:
            yield from self._raw(source)
            return
        dst = torch_dtype(dtype)
        for _, chunk in self.ckpt.iter_chunks(source, CAST_CHUNK):
            yield tensor_bytes(torch.frombuffer(chunk, dtype=src).to(dst))

    def _scheme_for(self, op: TensorOp) -> Any:
        if self.scheme is not None and self.scheme.name == op.scheme:
            return self.scheme
        if op.scheme in self.schemes:  # a mix: the plan made each scheme with its options
            return self.schemes[op.scheme]
        if op.scheme not in self._schemes:  # e.g. an attention type beside the experts'
            from m1.schemes import make_scheme

            self._schemes[op.scheme] = make_scheme(op.scheme)
        return self._schemes[op.scheme]

    def _quantized(self, op: TensorOp, source: str) -> list[tuple[str, memoryview]]:
        started = time.perf_counter()
        weight = self._read(source)
        read = time.perf_counter()
        pieces = self._scheme_for(op).quantize(weight, self._torch_device(), source)
        self.timing.read_s += read - started
        self.timing.quantize_s += time.perf_counter() - read
        return [(suffix, tensor_bytes(t)) if op.kind == "stack" else (suffix, t) for suffix, t in pieces]

    def _quantize(self, op: TensorOp) -> list[Produced]:
        source = op.sources[0].name
        pieces = dict(self._quantized(op, source))
        out = []
        for o in op.outputs:
            t = pieces.pop(o.piece, None)
            if t is None:
                raise InternalError(f"the scheme did not produce {o.name}", tensor=source)
            out.append(Produced(dtype_name(t.dtype), tuple(t.shape), [tensor_bytes(t)]))
        return out

    def _torch_device(self) -> torch.device:
        import torch

        return torch.device(self.device)

    def _read(self, source: str) -> torch.Tensor:
        ahead, self.ahead = self.ahead, None
        weight = ahead[1].result() if ahead and ahead[0] == source else self.ckpt.get(source)
        if not self.device.startswith("cpu") and source in self.to_quantize:
            following = self.to_quantize.index(source) + 1
            if following < len(self.to_quantize):
                if self.reader is None:
                    self.reader = ThreadPoolExecutor(1, thread_name_prefix="m1-read-ahead")
                nxt = self.to_quantize[following]
                self.ahead = (nxt, self.reader.submit(self.ckpt.get, nxt))
        return weight

