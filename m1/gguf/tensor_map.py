"""Where each spec tensor of a GGUF lives: a `Slot` per spec name, an expert as its slice of the stacked
`blk.N.ffn_*_exps` tensor, with the dtype it comes back in (F32 for F32 and every block type, dequantized;
F16 and BF16 as stored). A GGUF tensor in two files, a spec tensor two GGUF tensors hold, and a GGML type
m1 cannot decode are refused here, by name."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

import numpy as np

from m1.errors import CheckpointError
from m1.gguf.layout import RE_EXPORT
from m1.gguf.names import _compiled, from_gguf

if TYPE_CHECKING:
    from gguf import GGMLQuantizationType, GGUFReader

GGUFTensors = dict[str, tuple[str, Any, tuple[int, ...]]]  # GGUF name -> (file, type, shape in torch order)


@cache
def decodable(qtype: GGMLQuantizationType) -> bool:
    """Whether m1 reads tensors of this GGML type back: F32, F16, BF16, and what gguf.quants dequantizes."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16):
        return True
    if qtype not in GGML_QUANT_SIZES or qtype in (GGMLQuantizationType.F64, GGMLQuantizationType.I8,
                                                  GGMLQuantizationType.I16, GGMLQuantizationType.I32,
                                                  GGMLQuantizationType.I64):
        return False
    _, type_size = GGML_QUANT_SIZES[qtype]
    try:
        dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def is_stacked(gguf_name: str) -> bool:
    """Whether a GGUF tensor stacks the experts of a layer (`blk.N.ffn_*_exps.weight`)."""
    return any(rule.stacked and gguf_rx.match(gguf_name) for _, gguf_rx, rule in _compiled())


def out_dtype(qtype: GGMLQuantizationType) -> str:
    """The safetensors dtype a tensor of this GGML type comes back in."""
    return {"F16": "F16", "BF16": "BF16"}.get(qtype.name, "F32")


@dataclass(frozen=True)
class Slot:
    """Where one spec tensor lives: a GGUF tensor of a file (and its index along the stacked axis)."""

    file: str
    index: int  # in the file's reader.tensors
    gguf_name: str
    expert: int | None
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # torch order, of the spec tensor (the stacked axis removed for an expert)
    offset: int  # absolute byte offset of its stored data in the file
    stored_bytes: int

    @property
    def dtype(self) -> str:
        return out_dtype(self.qtype)

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor as it comes back (dequantized)."""
        n = 1
        for d in self.shape:
            n *= d
        return n * (2 if self.dtype in ("F16", "BF16") else 4)


def map_file(file: str, reader: GGUFReader, display: str, layer_kinds: tuple[str, ...], n_experts: int,
             gguf_tensors: GGUFTensors, slots: dict[str, Slot]) -> None:
    """Add the tensors of one file of the set to `gguf_tensors` and their spec names to `slots`."""
    from gguf import GGML_QUANT_SIZES

    for index, t in enumerate(reader.tensors):
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # torch order
        if t.name in gguf_tensors:
            raise CheckpointError(f"the GGUF tensor {t.name} is also in {gguf_tensors[t.name][0]}",
                                  file=display, tensor=t.name, hint=RE_EXPORT)
        gguf_tensors[t.name] = (file, t.tensor_type, shape)
        if not decodable(t.tensor_type):
            raise CheckpointError(f"GGML type {t.tensor_type.name}, which m1 cannot read back (it reads F32, "
                                  "F16, BF16 and the block types gguf.quants dequantizes)", file=display,
                                  tensor=t.name, hint="convert it with llama-quantize to a type m1 reads")
        try:
            names = from_gguf(t.name, layer_kinds, n_experts)
        except (KeyError, ValueError, IndexError):
            names = [t.name]  # not a minimax-01 tensor: integrity names it, the planner refuses it
        if not is_stacked(t.name):
            _add(slots, names[0], Slot(file, index, t.name, None, t.tensor_type, shape, int(t.data_offset),
                                       int(t.n_bytes)), display)
            continue
        if len(shape) != 3:
            raise CheckpointError(f"a stacked expert tensor of shape {list(shape)}: expected 3-D [experts, rows, "
                                  "cols]", file=display, tensor=t.name, hint=RE_EXPORT)
        # Experts as stored (integrity reports a count that differs from expert_count).
        names = from_gguf(t.name, layer_kinds, shape[0])
        block, type_size = GGML_QUANT_SIZES[t.tensor_type]
        per_expert = shape[1] * shape[2] // block * type_size
        for e, name in enumerate(names):
            _add(slots, name, Slot(file, index, t.name, e, t.tensor_type, shape[1:],
                                   int(t.data_offset) + e * per_expert, per_expert), display)


def _add(slots: dict[str, Slot], name: str, slot: Slot, display: str) -> None:
    if name in slots:
        raise CheckpointError(f"two GGUF tensors hold it ({slots[name].gguf_name} and {slot.gguf_name})",
                              file=display, tensor=name, hint=RE_EXPORT)
    slots[name] = slot
