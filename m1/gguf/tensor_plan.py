"""What a GGUF of an M1 checkpoint holds, for llama.cpp's `minimax-01`: pure functions of the config, the source
dtypes and the tokenizer files.

- `plan_tensors(cfg, source_dtypes, policy)` -> [TensorPlan(GGUF name, GGML type, shape, source names)]: the
  experts of a layer stacked into one 3-D tensor (ggml blocks never cross a row, so quantizing each expert's
  2-D slice is quantizing the stack), each tensor at the type the policy gives its role;
- `gguf_metadata(...)` -> [KV]: the model's keys, the layer pattern, the tokenizer, the chat template.

The gguf format (m1.gguf.format) turns them into the plan's ops and the GGUF sink writes them;
`m1.gguf.job.export_gguf(src_folder, dest_path, expert_type=...)` runs the whole trip.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gguf import GGMLQuantizationType
from gguf.quants import quant_shape_to_byte_shape

from m1.config import M1Config
from m1.errors import UsageError
from m1.gguf.metadata import KV, model_metadata
from m1.gguf.names import to_gguf
from m1.gguf.tokenizer import TokenizerFiles, tokenizer_metadata
from m1.gguf.types import TypePolicy, block_size, type_name
from m1.spec import Role, inventory

if TYPE_CHECKING:
    import torch

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
    tok_kvs, warnings = tokenizer_metadata(tokenizer, n_rows=cfg.vocab_size, zero_rows=list(zero_rows),
                                           pre=tokenizer_pre, chat_template=chat_template)
    return kvs + tok_kvs, warnings


def zero_rows_of(embedding: torch.Tensor, start: int) -> list[int]:
    """Ids >= start whose embedding row is all zero (the release pads 200064 rows with zeros)."""
    import torch

    rows = embedding[start:]
    if rows.numel() == 0:
        return []
    return [start + int(i) for i in torch.nonzero((rows == 0).all(dim=1)).flatten()]
