"""The gguf format: one file (or llama.cpp's splits) for llama.cpp's `minimax-01`, written by the GGUF sink.

It brings its own ops: the experts of a layer are stacked (N:1) into the 3-D `ffn_*_exps` tensors, each
tensor gets the GGML type the type policy says (norms, router and 1-D tensors F32; attention, head and
embedding at their source precision unless asked; experts at the scheme's block type, or bf16), and
the metadata (the model's keys, the tokenizer, the chat template) travels with the plan to the sink.
The name table and the metadata are m1.gguf's, as data.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from m1.dtypes import DTYPE_OPTIONS
from m1.errors import UsageError
from m1.formats.base import ConfigView, Format, FormatOption, FormatPlan, ImatrixFile, NameTable, PlanInput, Runtime
from m1.plan import OutputFile, OutputTensor, SourceTensor, TensorOp

SPLIT_NAME = "{stem}-{i:05d}-of-{n:05d}.gguf"


def _names() -> NameTable:
    from m1.gguf.names import GGUF_NAMES

    return NameTable(tuple((r.spec, r.gguf) for r in GGUF_NAMES if not r.stacked))


def _stacks() -> NameTable:
    from m1.gguf.names import GGUF_NAMES

    return NameTable(tuple((r.spec, r.gguf) for r in GGUF_NAMES if r.stacked))


def _card_line(files: list[str]) -> str:
    """The model card's llama.cpp line: how to run the folder's GGUF, or why these safetensors are not one."""
    if files:
        return f"- **llama.cpp**: `llama-cli -m {files[0]}`"
    return ("- **llama.cpp** reads GGUF files, not these safetensors; a stock Q4_K_M GGUF would also quantize the "
            "attention, which this checkpoint keeps.")


def _selection_names() -> NameTable:
    """--keep/--only may name an expert by its layer's stacked tensor (blk.N.ffn_up_exps.weight)."""
    from m1.gguf.names import GGUF_NAMES

    return NameTable(tuple((r.spec, r.gguf) for r in GGUF_NAMES))


def plan_ops(job: PlanInput) -> FormatPlan:
    """The GGUF's tensors (m1.gguf.tensor_plan.plan_tensors: names, types, stacks) as ops in one file or splits, and
    the sink's metadata."""
    from m1.gguf.metadata import check_runnable
    from m1.gguf.tensor_plan import plan_tensors
    from m1.gguf.types import FLOAT_TYPES, GGML_TYPES, SOURCE_TYPES, TypePolicy, type_name
    from m1.schemes.ggml import type_nbytes
    from m1.spec import Role

    cfg, tensors, request, chosen, source = job.cfg, job.tensors, job.request, job.chosen, job.source
    check_runnable(cfg, f"{source}/config.json")
    options = request.format_options
    by_name = {t.name: t for t in tensors}
    not_float = [t for t in tensors if t.dtype not in ("F32", "F16", "BF16")]
    if not_float:
        raise UsageError(f"stored as {not_float[0].dtype}, not a float dtype: a GGUF is made from a float checkpoint",
                         file=not_float[0].file, tensor=not_float[0].name,
                         hint="dequantize first: m1 convert SRC DST --dtype bf16")
    scheme = request.scheme
    float_expert = DTYPE_OPTIONS[request.dtype]  # --dtype: the experts' float type (keep: bf16)
    experts = scheme.name if scheme is not None else SOURCE_TYPES.get(float_expert or "BF16", "bf16")
    if experts not in GGML_TYPES:
        raise UsageError(f"{experts} is not a GGUF type m1 writes", hint=f"use one of {', '.join(GGML_TYPES)}")
    policy = TypePolicy(experts, options.get("attn_type"), options.get("head_type"), options.get("embed_type"))
    ops = []
    for p in plan_tensors(cfg, {n: t.dtype for n, t in by_name.items()}, policy):
        srcs = tuple(SourceTensor(n, by_name[n].file, by_name[n].dtype, tuple(by_name[n].shape), by_name[n].nbytes)
                     for n in p.sources)
        ggml = type_name(p.type)
        if p.role == Role.EXPERT and scheme is not None and not all(n in chosen for n in p.sources):
            ggml = SOURCE_TYPES.get(srcs[0].dtype, "bf16")  # kept by --keep/--only: as it was
        elif p.role == Role.EXPERT and p.name in request.recipe:  # a measured mix: this tensor's own type
            ggml = str(request.recipe[p.name])
            if ggml == "keep":
                ggml = SOURCE_TYPES.get(srcs[0].dtype, "bf16")
            elif ggml not in GGML_TYPES:
                raise UsageError(f"the recipe gives {p.name} the type {ggml!r}", tensor=p.name,
                                 hint=f"GGUF types: {', '.join(GGML_TYPES)}")
        elif p.role != Role.EXPERT and p.name in request.recipe:  # a mix's attention, embedding or head
            ggml = _recipe_type(p, srcs[0].dtype, str(request.recipe[p.name]))
        block = ggml not in FLOAT_TYPES
        out = OutputTensor(p.name, ggml.upper(), p.shape, type_nbytes(ggml, p.shape), piece="weight")
        if p.role == Role.EXPERT:
            kind = "stack"
        elif block:
            kind = "quantize"
        else:
            kind = "copy" if out.dtype == srcs[0].dtype else "cast"
        layer = _layer(p.sources[0])
        params = sum(math.prod(s.shape) for s in srcs)
        ops.append(TensorOp(kind, srcs, (out,), p.role.value, layer, params, ggml if block else None))
    sink_data = _sink_data(cfg, policy, source, job.read_rows, job.tokenizer_dir, options)
    fields = {"to": job.format.name, "scheme": scheme.name if scheme else None, **(scheme.options() if scheme else {}),
              **request.policy.describe(),
              "dtype": request.dtype, **{k: v for k, v in options.items() if k != "stem"}}
    return FormatPlan(pack(ops, request), {}, fields, list(sink_data["warnings"]), sink_data)


def _recipe_type(p: Any, dtype: str, ggml: str) -> str:
    """A recipe's type for a tensor outside the experts: one its rows split into, never for a norm or the
    router (F32 always), keep as the source's."""
    from m1.gguf.types import FLOAT_TYPES, GGML_TYPES, SOURCE_TYPES
    from m1.schemes.ggml import block_shape
    from m1.spec import Role

    if len(p.shape) == 1 or p.role in (Role.LAYER_NORM, Role.FINAL_NORM, Role.LIGHTNING_NORM, Role.ROUTER):
        raise UsageError(f"the recipe gives {p.name} the type {ggml!r}: norms and the router are never quantized",
                         tensor=p.name, hint="a recipe replays as m1 quantize --budget wrote it")
    if ggml == "keep":
        return SOURCE_TYPES.get(dtype, "bf16")
    if ggml not in GGML_TYPES:
        raise UsageError(f"the recipe gives {p.name} the type {ggml!r}", tensor=p.name,
                         hint=f"GGUF types: {', '.join(GGML_TYPES)}")
    if ggml not in FLOAT_TYPES and p.shape[-1] % block_shape(ggml)[0]:
        raise UsageError(f"the recipe gives {p.name} {ggml}, whose blocks of {block_shape(ggml)[0]} do not split its "
                         f"rows of {p.shape[-1]}", tensor=p.name, hint="a recipe replays on the model it was made for")
    return ggml


def _layer(name: str) -> int | None:
    from m1.spec import classify

    return classify(name).layer


def _sink_data(cfg: Any, policy: Any, source: str, read_rows: Callable[[str, int], Any] | None,
               tokenizer_dir: Any, options: dict[str, Any]) -> dict[str, Any]:
    from dataclasses import asdict

    from m1.gguf.tensor_plan import gguf_metadata, zero_rows_of
    from m1.gguf.tokenizer import base_vocab_size, read_tokenizer_files

    if tokenizer_dir is None:
        return {"kvs": [], "warnings": [], "missing": {
            "message": "no tokenizer.json: a GGUF carries its tokenizer", "file": source,
            "hint": "add the model's tokenizer.json to the checkpoint folder"}}
    try:
        tokenizer = read_tokenizer_files(tokenizer_dir)
    except UsageError as exc:
        return {"kvs": [], "warnings": [], "missing": {"message": exc.message, "file": exc.file, "hint": exc.hint}}
    base = base_vocab_size(tokenizer.tokenizer)
    zero_rows = [first + i for first, rows in (read_rows("model.embed_tokens.weight", base) if read_rows else ())
                 for i in zero_rows_of(rows, 0)]
    template = None
    if options.get("chat_template"):
        from pathlib import Path

        template = Path(options["chat_template"]).read_text(encoding="utf-8")
    kvs, warnings = gguf_metadata(cfg, tokenizer, policy, zero_rows=zero_rows, name=options.get("name"),
                                  tokenizer_pre=options.get("tokenizer_pre"), chat_template=template,
                                  source=f"{source}/config.json")
    return {"kvs": [asdict(kv) for kv in kvs], "warnings": warnings, "missing": None}


def pack(ops: list[TensorOp], request: Any) -> list[OutputFile]:
    """One file, or splits of at most --split-max-size bytes named as llama.cpp's gguf-split names them."""
    stem = request.format_options.get("stem") or "model"
    limit = request.format_options.get("split_max_size")
    if not limit:
        return [OutputFile(f"{stem}.gguf", tuple(ops))]
    groups: list[list[TensorOp]] = [[]]
    size = 0
    for op in ops:
        if groups[-1] and size + op.nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(op)
        size += op.nbytes
    n = len(groups)
    if n == 1:
        return [OutputFile(f"{stem}.gguf", tuple(groups[0]))]
    return [OutputFile(SPLIT_NAME.format(stem=stem, i=i + 1, n=n), tuple(g)) for i, g in enumerate(groups)]


def make_options(dest: Path, given: dict[str, Any]) -> dict[str, Any]:
    """GGUF's own options: the dense tensors' types, splits, the tokenizer's pre-tokenizer, a chat template."""
    from m1.gguf.types import DENSE_TYPES
    from m1.units import parse_size

    chat_template, split_max_size = given.get("chat_template"), given.get("split_max_size")
    if chat_template is not None and not Path(chat_template).is_file():
        raise UsageError("--chat-template is not a file", file=str(chat_template))
    for option in ("attn_type", "head_type", "embed_type"):
        value = given.get(option)
        if value is not None and value not in DENSE_TYPES:
            raise UsageError(f"--{option.replace('_', '-')} {value!r} is not one of {', '.join(DENSE_TYPES)}")
    return {"stem": dest.stem if dest.suffix == ".gguf" else "model", "attn_type": given.get("attn_type"),
            "head_type": given.get("head_type"), "embed_type": given.get("embed_type"),
            "split_max_size": parse_size(split_max_size) if split_max_size else None,
            "tokenizer_pre": given.get("tokenizer_pre"), "chat_template": str(chat_template) if chat_template else None,
            "name": dest.stem if dest.suffix == ".gguf" else dest.name}


def _open_storage(source: str) -> Any:
    """A GGUF file, or the split set named after its first split; None when neither is there."""
    from m1.gguf.reader import GGUFStorage, first_split

    path = Path(source)
    return GGUFStorage(source) if path.is_file() or first_split(path).is_file() else None


def _no_config(raw: dict[str, Any], source: str) -> dict[str, Any]:
    raise UsageError("a GGUF is read through m1.gguf.reader, not as a config.json", file=source)


def _write_nothing(cfg: ConfigView, out: dict[str, Any]) -> None:
    pass  # the metadata is the GGUF's own (see plan_ops); no config.json is written


# GGUF's own options: what `m1 convert` / `m1 quantize` show as flags (m1.cli adds them from here).
OPTIONS = (
    FormatOption("attn_type", help="attention projections' type (bf16, f16, f32, q8_0; default: their source "
                 "precision)."),
    FormatOption("head_type", help="the LM head's type (default bf16 or the source's; never below q8_0)."),
    FormatOption("embed_type", help="the embedding's type."),
    FormatOption("split_max_size", help="split into llama.cpp's -0000i-of-0000n files of at most this size, e.g. 50G."),
    FormatOption("tokenizer_pre", help="llama.cpp's pre-tokenizer name, when the tokenizer's split regex is not one "
                 "it knows."),
    FormatOption("chat_template", help="a Jinja file that replaces the model's chat template.", type=Path),
)


def _imatrix_entry(spec_name: str) -> str:
    from m1.gguf.names import to_gguf

    return to_gguf(spec_name).name


def _write_imatrix(path: Path, stats: Any) -> int:
    from m1.gguf.imatrix import write_stats

    return write_stats(path, stats)


IMATRIX = ImatrixFile(
    entry=_imatrix_entry,
    write=_write_imatrix,
    example="imatrix.gguf",
    what="llama.cpp's GGUF imatrix format, which llama-imatrix writes too and llama-quantize --imatrix reads",
    used_by="llama.cpp's K-quants and IQ types (iq1_s, iq1_m, iq2_xxs, iq2_xs, iq2_s, iq3_xxs need one)",
)


def _require_llama() -> None:
    from m1.gguf.llama_run import llama_cpp

    llama_cpp()


def _run_in_llama(path: Path, windows: Any, reference: Callable[[], Any], threads: int) -> tuple[Any, Any]:
    from m1.gguf.llama_run import run_checked

    return run_checked(path, windows, reference, threads)


RUNTIME = Runtime(command="llama", name="llama.cpp", package="llama-cpp-python", example="tiny-q8.gguf",
                  require=_require_llama, run=_run_in_llama)

EXAMPLES = (
    ("convert", "m1 convert m1-40k/ m1-bf16.gguf --to gguf"),
    ("convert", "m1 convert m1-q4.gguf back/ --to release"),
    ("quantize", "m1 quantize m1-40k/ m1-q4.gguf --format gguf --scheme q4_0"),
    ("quantize", "m1 quantize m1-40k/ m1-q4k.gguf --format gguf --scheme q4_k --imatrix imatrix.gguf"),
    ("quantize", "m1 quantize m1-40k/ m1-iq2.gguf --format gguf --scheme iq2_xxs --imatrix imatrix.gguf"),
)

FORMAT = Format(
    name="gguf",
    description="llama.cpp's GGUF (minimax-01), experts stacked, one file or splits",
    model_types=(),
    claims=lambda raw: False,  # GGUF files are recognised by their suffix, not by a config.json
    read_config=_no_config,
    write_config=_write_nothing,
    config_keys=(),
    names=_names(),
    sink="gguf",
    plan_ops=plan_ops,
    selection_names=_selection_names(),
    writes_config=False,
    opens=lambda source: source.endswith(".gguf"),
    open_storage=_open_storage,
    options=OPTIONS,
    make_options=make_options,
    file_suffix=".gguf",
    sink_module="m1.gguf.sink",
    expert_stacks=_stacks(),
    mix_candidates="q4_k,q5_k,q6_k,q8_0",
    # llama.cpp runs any type on any matrix whose rows its blocks split; the head stays at q4_k's 4.5 bits or more
    # (llama-quantize gives output.weight q5_k/q6_k in its low-bit presets) unless --head-candidates asks
    mix_parts=("w13", "w2", "attn", "embed", "head"),
    mix_pins={"attn": "attn_type", "embed": "embed_type", "head": "head_type"},
    mix_head_floor=("q4_k", 4.5),
    mix_reader="GGUF stores a type per tensor: llama.cpp reads the mix",
    card_line=_card_line,
    imatrix=IMATRIX,
    runtime=RUNTIME,
    examples=EXAMPLES,
)
