"""`export_gguf`: one checkpoint folder to one GGUF file, through the pipeline (m1/gguf/format.py plans it with
m1.gguf.tensor_plan, the executor and the GGUF sink write it), for scripts and tests that want a call, not a command.
It sits above m1.gguf.tensor_plan, which the gguf format imports: that module never reaches back to the executor.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from m1.errors import UsageError


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
    """Export the checkpoint `src_folder` to the GGUF file `dest_path`, through the pipeline (`m1 convert
    --to gguf`, or `m1 quantize --format gguf --scheme TYPE` for a block type).

    expert_type: the experts' GGML type (f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, mxfp4); attn_type,
    head_type, embed_type: bf16, f16, f32 or q8_0 (default: the source's own precision); norms, router and
    1-D tensors are F32. tokenizer_pre overrides the llama.cpp pre-tokenizer name; chat_template (a file)
    replaces the model's template.
    """
    from m1.checkpoint import Checkpoint
    from m1.gguf.types import EXPERT_TYPES, FLOAT_TYPES
    from m1.planner import JobRequest, plan_checkpoint
    from m1.run import RunOptions, execute
    from m1.schemes import make_scheme

    if expert_type not in EXPERT_TYPES:
        raise UsageError(f"expert type {expert_type!r} is not one of {', '.join(EXPERT_TYPES)}")
    start = time.monotonic()
    dest = Path(dest_path)
    options = {"stem": dest.stem, "attn_type": attn_type, "head_type": head_type, "embed_type": embed_type,
               "split_max_size": None, "tokenizer_pre": tokenizer_pre, "chat_template": chat_template,
               "name": name or Path(src_folder).resolve().name}
    block = expert_type not in FLOAT_TYPES
    request = JobRequest("quantize" if block else "convert", "gguf",
                         dtype="keep" if block else {"f32": "fp32", "f16": "fp16", "bf16": "bf16"}[expert_type],
                         scheme=make_scheme(expert_type) if block else None, format_options=options)
    ckpt = Checkpoint.open(src_folder)
    plan = plan_checkpoint(ckpt, request)
    execute(plan, dest, ckpt, RunOptions(show_progress=False, label="gguf"))
    types: dict[str, int] = {}
    for t in (t for f in plan.files for t in f.tensors):
        types[t.dtype.lower()] = types.get(t.dtype.lower(), 0) + t.nbytes
    return ExportResult(dest, dest.stat().st_size, sum(len(f.tensors) for f in plan.files),
                        time.monotonic() - start, types, plan.warnings)
