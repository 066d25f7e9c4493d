"""Export an M1 checkpoint to one GGUF file for llama.cpp (`minimax-01`), streaming one tensor at a time.

Two halves, so that the pipeline can use the first and bring its own writer:

- what to write: `plan_tensors(cfg, source_dtypes, policy)` -> [TensorPlan(GGUF name, GGML type, shape,
  source names)] and `gguf_metadata(...)` -> [KV]; pure functions of the config, the source dtypes and
  the tokenizer files;
- writing it: `write_gguf(dest, kvs, plan, read)` writes header, metadata and tensor infos with
  `gguf.GGUFWriter`, then the data tensor by tensor; a stacked expert tensor is written expert by expert
  (ggml blocks never cross a row, so quantizing each expert's 2-D slice is quantizing the 3-D stack), so
  memory is one source tensor in f32 plus its encoding, whatever the model's size. The file is written
  under a temporary name, fsynced and renamed.

`export_gguf(src_folder, dest_path, expert_type=...)` is the two together.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_VERSION, GGMLQuantizationType, GGUFValueType, GGUFWriter
from gguf.quants import quant_shape_to_byte_shape, quantize

from m1.config import M1Config
from m1.errors import UsageError
from m1.gguf.metadata import KV, apply, model_metadata
from m1.gguf.names import ARCH, to_gguf
from m1.gguf.tokenizer import TokenizerFiles, base_vocab_size, read_tokenizer_files, tokenizer_metadata
from m1.gguf.types import FLOAT_TYPES, TypePolicy, block_size, type_name
from m1.spec import Role, inventory

Q = GGMLQuantizationType


@dataclass(frozen=True)
class TensorPlan:
    """One GGUF tensor: its name, GGML type, torch-order shape, and the spec tensors it is made of.

    Several sources are stacked along a new first axis (the experts of a layer, in expert order).
    """

    name: str
    type: GGMLQuantizationType
    shape: tuple[int, ...]
    sources: tuple[str, ...]
    role: Role

    @property
    def byte_shape(self) -> tuple[int, ...]:
        return tuple(quant_shape_to_byte_shape(self.shape, self.type))

    @property
    def nbytes(self) -> int:
        return math.prod(self.byte_shape)


def plan_tensors(cfg: M1Config, source_dtypes: Mapping[str, str], policy: TypePolicy) -> list[TensorPlan]:
    """Every GGUF tensor for `cfg`, in the order they are written (the release's order, experts stacked).

    source_dtypes: spec name -> safetensors dtype of the source (decides the types that keep the source).
    Raises UsageError for a block type whose block does not divide a tensor's rows.
    """
    plans: list[TensorPlan] = []
    stacks: dict[str, list[str]] = {}
    for spec in inventory(cfg):
        target = to_gguf(spec.name)
        qtype = policy.for_tensor(spec.role, len(spec.shape), source_dtypes.get(spec.name, spec.dtype))
        if spec.shape[-1] % block_size(qtype):
            raise UsageError(f"rows of {spec.shape[-1]} values do not split into {type_name(qtype)} blocks of "
                             f"{block_size(qtype)}", tensor=spec.name, hint="choose another type for it")
        if target.expert is None:
            plans.append(TensorPlan(target.name, qtype, spec.shape, (spec.name,), spec.role))
        elif target.name in stacks:
            stacks[target.name].append(spec.name)
        else:
            stacks[target.name] = [spec.name]
            plans.append(TensorPlan(target.name, qtype, spec.shape, (), spec.role))  # filled in below
    out = []
    for p in plans:
        if p.sources:
            out.append(p)
        else:
            sources = tuple(stacks[p.name])
            out.append(TensorPlan(p.name, p.type, (len(sources), *p.shape), sources, p.role))
    return out


def gguf_metadata(
    cfg: M1Config,
    tokenizer: TokenizerFiles,
    policy: TypePolicy,
    *,
    zero_rows: Iterable[int] = (),
    name: str | None = None,
    tokenizer_pre: str | None = None,
    chat_template: str | None = None,
    source: str = "config.json",
) -> tuple[list[KV], list[str]]:
    """All metadata (model, file type, tokenizer) and the warnings to show the user."""
    kvs = model_metadata(cfg, name=name, file_type=int(policy.file_type), source=source)
    if policy.experts not in FLOAT_TYPES:
        kvs.append(KV("general.quantization_version", GGML_QUANT_VERSION, GGUFValueType.UINT32))
    tok_kvs, warnings = tokenizer_metadata(tokenizer, n_rows=cfg.vocab_size, zero_rows=list(zero_rows),
                                           pre=tokenizer_pre, chat_template=chat_template)
    return kvs + tok_kvs, warnings


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


def zero_rows_of(embedding: torch.Tensor, start: int) -> list[int]:
    """Ids >= start whose embedding row is all zero (the release pads 200064 rows with zeros)."""
    rows = embedding[start:]
    if rows.numel() == 0:
        return []
    return [start + int(i) for i in torch.nonzero((rows == 0).all(dim=1)).flatten()]


@dataclass
class ExportResult:
    path: Path
    bytes: int
    tensors: int
    seconds: float
    types: dict[str, int] = field(default_factory=dict)  # GGML type name -> bytes
    warnings: list[str] = field(default_factory=list)


def export_gguf(
    src_folder: str | Path,
    dest_path: str | Path,
    expert_type: str = "bf16",
    *,
    attn_type: str | None = None,
    head_type: str | None = None,
    embed_type: str | None = None,
    tokenizer_pre: str | None = None,
    chat_template: str | None = None,
    name: str | None = None,
) -> ExportResult:
    """Export the checkpoint folder `src_folder` to the GGUF file `dest_path`.

    expert_type: the experts' GGML type (f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, mxfp4); attn_type,
    head_type, embed_type: bf16, f16, f32 or q8_0 (default: the source's own precision); norms, router and
    1-D tensors are F32. tokenizer_pre overrides the llama.cpp pre-tokenizer name; chat_template (text)
    replaces the model's template.
    """
    from m1.checkpoint import Checkpoint

    start = time.monotonic()
    ckpt = Checkpoint.open(src_folder)
    cfg = ckpt.config
    policy = TypePolicy(expert_type, attn_type, head_type, embed_type)
    tokenizer = read_tokenizer_files(src_folder)
    names = set(ckpt.names())
    expected = [t.name for t in inventory(cfg)]
    missing = [n for n in expected if n not in names]
    if missing:
        raise UsageError(f"{len(missing)} tensors missing, e.g. {missing[0]}", file=str(src_folder))
    dtypes = {n: ckpt.info(n).dtype for n in expected}
    not_float = [n for n, d in dtypes.items() if d not in ("F32", "F16", "BF16")]
    if not_float:
        raise UsageError(f"{not_float[0]} is stored as {dtypes[not_float[0]]}, not a float", file=str(src_folder),
                         hint="export a float checkpoint (dequantize with m1 convert SRC DST --dtype bf16)")
    plan = plan_tensors(cfg, dtypes, policy)
    zero_rows = zero_rows_of(ckpt.get("model.embed_tokens.weight"), base_vocab_size(tokenizer.tokenizer))
    kvs, warnings = gguf_metadata(cfg, tokenizer, policy, zero_rows=zero_rows,
                                  name=name or Path(src_folder).resolve().name, tokenizer_pre=tokenizer_pre,
                                  chat_template=chat_template, source=str(Path(src_folder) / "config.json"))
    size = write_gguf(dest_path, kvs, plan, ckpt.get)
    types: dict[str, int] = {}
    for p in plan:
        types[type_name(p.type)] = types.get(type_name(p.type), 0) + p.nbytes
    return ExportResult(Path(dest_path), size, len(plan), time.monotonic() - start, types, warnings)
