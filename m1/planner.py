"""The one planner: a checkpoint's tensors and a request in, a typed `Plan` out, nothing written.

`m1 convert` and `m1 quantize` are the same job: every tensor is copied, cast, dequantized or (with a
scheme, for the weights the policy picks) quantized, into the files of the target format. The input is
checked against the spec first (the same findings as `m1 verify integrity`), so a damaged or foreign
checkpoint is refused before anything is written.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from m1.checkpoint import Checkpoint
from m1.config import M1Config
from m1.dtypes import DTYPE_BYTES, DTYPE_OPTIONS, FLOAT_DTYPES, torch_name
from m1.errors import CheckpointError, M1Error, UsageError
from m1.formats import get_format
from m1.plan import OutputFile, OutputTensor, Plan, SourceTensor, TensorOp
from m1.policy import Policy
from m1.safetensors_io import TensorInfo
from m1.schemes import Scheme, companion_suffixes, scheme_from_config
from m1.spec import Role, classify, inventory, spec_by_name

KEEP = "keep"


@dataclass(frozen=True)
class JobRequest:
    command: str = "convert"  # convert | quantize: names the job in its record and messages
    to: str | None = None  # the output format; None keeps the source's
    dtype: str = "keep"  # keep | bf16 | fp16 | fp32 (dequantizes a quantized source)
    router_dtype: str = "keep"
    by_layer: bool = False
    shard_size: int = 5 * 10**9
    scheme: Scheme | None = None  # quantize the weights `policy` picks with it
    policy: Policy = field(default_factory=Policy)
    format_options: dict[str, Any] = field(default_factory=dict)  # the output format's own (GGUF: types, splits)
    # A measured mix: weight (spec name, or a GGUF tensor name) -> the scheme it gets instead of `scheme`;
    # KEEP leaves it unquantized. The schemes are made like --scheme (same family options).
    recipe: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class JobResult:
    """What a job planned and, unless it was a dry run, wrote."""

    dest: Path
    plan: Plan
    manifest: dict[str, Any] | None = None  # None: a dry run, nothing written
    scratch: Any = None  # with --scratch: the m1.scratch.ScratchPlan (peak disk, downloads)
    stats: dict[str, Any] = field(default_factory=dict)  # quantize: what was written and how fast
    mix: Any = None  # quantize --budget/--recipe: the m1.quantize.budget.Mix
    recipe: Path | None = None  # the mix's m1-recipe.json as written

    @property
    def dry_run(self) -> bool:
        return self.manifest is None

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        """Written files -> their size and sha256 (from the manifest); empty for a dry run."""
        return dict(self.manifest["shards"]) if self.manifest else {}


def by_layer(layout: str | None) -> bool:
    """--layout: True for by-layer (size and source pack by size; m1.scratch regroups a source-order plan)."""
    if layout not in (None, "size", "source", "by-layer"):
        raise UsageError(f"--layout must be 'size', 'by-layer' or 'source', got {layout!r}")
    return layout == "by-layer"


def ordered(cfg: M1Config, tensors: list[TensorInfo]) -> list[TensorInfo]:
    """Spec order (the release's), a quantized weight's companions right after it. Unknown names: an error."""
    position = {t.name: i for i, t in enumerate(inventory(cfg))}
    suffixes = companion_suffixes()
    keyed = []
    for t in tensors:
        c = classify(t.name, t.file)
        rank = suffixes.index(c.companion) + 1 if c.companion else 0
        keyed.append((position.get(c.weight_name, len(position)), rank, t.name, t))
    return [t for *_, t in sorted(keyed, key=lambda k: k[:3])]


def index_tensors(cfg: M1Config, weight_map: dict[str, str]) -> list[TensorInfo]:
    """The tensors from a config and an index alone (dtypes and shapes from the spec): no data, no headers."""
    specs = spec_by_name(cfg)
    out = []
    for name, file in weight_map.items():
        c = classify(name, file)
        spec = specs.get(c.weight_name)
        if spec is None:
            raise CheckpointError("not part of this config's M1 (layer or expert out of range)", file=file, tensor=name)
        out.append(TensorInfo(name, spec.dtype, spec.shape, file, 0, spec.nbytes))
    return out


# Which finding names the problem best when a plan refuses its source: unreadable files first, the
# index's total last (a damaged shard or an unknown tensor also makes the total disagree).
FINDING_ORDER = ("missing-shard", "corrupt-shard", "unknown-tensor", "unexpected-tensor", "missing-tensor", "shape",
                 "dtype", "index-mismatch", "total-size")


def checkpoint_tensors(ckpt: Checkpoint) -> list[TensorInfo]:
    """Every tensor of a checkpoint from its headers, after checking the checkpoint against the spec."""
    from m1.integrity import IntegrityReport, check_checkpoint

    report = IntegrityReport(ckpt.root)
    check_checkpoint(ckpt, report)
    if report.findings:
        rank = {code: i for i, code in enumerate(FINDING_ORDER)}
        first = min(report.findings, key=lambda f: rank.get(f.code, len(rank)))
        more = f" (and {len(report.findings) - 1} more findings)" if len(report.findings) > 1 else ""
        raise CheckpointError(f"the source does not match the M1 spec: {first.message}{more}",
                              file=first.file or ckpt.root, tensor=first.tensor,
                              hint=f"m1 verify integrity {ckpt.root} lists every problem; nothing was written")
    return [ckpt.info(name) for name in ckpt.weight_map]


def plan_checkpoint(ckpt: Checkpoint, request: JobRequest) -> Plan:
    if request.scheme is not None:  # "already quantized" says more than the spec findings it would cause
        headers = [ckpt.info(name) for name in ckpt.weight_map]
        _refuse_quantized_source(ckpt.config, headers, str(ckpt.root))
    return plan_job(ckpt.config, checkpoint_tensors(ckpt), request, source=str(ckpt.root),
                    extra_files=ckpt.extra_files(), base_model=base_model_of(ckpt), revision=ckpt.revision,
                    inputs=ckpt.identity(), ckpt=ckpt)


def base_model_of(ckpt: Checkpoint) -> str | None:
    """What the checkpoint was made from: its own manifest's base, or the repo id it was read from."""
    if ckpt.remote:
        return ckpt.root
    from m1.manifest import read_manifest

    manifest = read_manifest(Path(ckpt.root))
    job = (manifest or {}).get("job")
    return job.get("base_model") if isinstance(job, dict) else None


def plan_job(cfg: M1Config, tensors: list[TensorInfo], request: JobRequest, *, source: str,
             extra_files: list[str] | tuple[str, ...] = (), base_model: str | None = None,
             revision: str | None = None, inputs: dict[str, Any] | None = None,
             ckpt: Checkpoint | None = None) -> Plan:
    """What the job will write, with sizes; raises before anything is written."""
    for key in ("dtype", "router_dtype"):
        if getattr(request, key) not in DTYPE_OPTIONS:
            raise UsageError(f"--{key.replace('_', '-')} must be one of {', '.join(DTYPE_OPTIONS)}")
    fmt = get_format(request.to or cfg.flavour)
    scheme = request.scheme
    tensors = ordered(cfg, tensors)
    if scheme is not None:
        _refuse_quantized_source(cfg, tensors, source)
        if fmt.name not in scheme.formats:
            raise UsageError(f"{scheme.describe()} cannot be stored in the {fmt.name} format",
                             hint=f"use --format {' or '.join(scheme.formats)}")
    specs = spec_by_name(cfg)
    chosen: set[str] = set()
    if scheme is not None:  # --keep/--only may name a tensor as the output format does, too
        aliases = _stack_aliases(tensors) if fmt.plan_ops is not None else \
            {} if fmt.names.identity else {t.name: fmt.names.from_spec(t.name) for t in tensors}
        chosen = request.policy.select(((t.name, classify(t.name).rule.role) for t in tensors), source, aliases)
    mix = _mix(request, chosen)
    chosen -= {name for name, sch in mix.items() if sch is None}
    if scheme is not None:
        for sch in {id(x): x for x in [scheme, *(v for v in mix.values() if v is not None)]}.values():
            _check_chosen(sch, [t for t in tensors if t.name in chosen and mix.get(t.name, scheme) is sch])
    if fmt.plan_ops is not None:  # the format builds its own ops (GGUF: experts stacked, types per tensor)
        return _plan_by_format(fmt, cfg, tensors, request, chosen, source, ckpt, inputs, base_model, revision)
    dequantize = cfg.quantization_config is not None and request.dtype != "keep"
    stored_scheme = scheme_from_config(cfg.quantization_config, f"{source}/config.json") if dequantize else None

    suffixes = companion_suffixes()

    def rename(name: str) -> str:  # spec name -> the output format's
        return name if fmt.names.identity else fmt.names.from_spec(name, suffixes)

    ops: list[TensorOp] = []
    companions: dict[str, list[TensorInfo]] = {}
    weights: list[TensorInfo] = []
    for t in tensors:
        c = classify(t.name, t.file)
        if c.companion is None:
            weights.append(t)
        else:
            companions.setdefault(c.weight_name, []).append(t)
    for t in weights:
        c = classify(t.name, t.file)
        spec = specs.get(t.name)
        if spec is None:
            raise CheckpointError("not part of this config's M1", file=t.file, tensor=t.name)
        role, comps = c.rule.role, companions.get(t.name, [])
        out_name = rename(t.name)
        src = tuple(_source(x) for x in (t, *comps))
        common = {"role": role.value, "layer": c.layer, "params": spec.numel}
        if comps and dequantize:
            dtype = DTYPE_OPTIONS[request.dtype] or "BF16"
            out = OutputTensor(out_name, dtype, spec.shape, spec.numel * DTYPE_BYTES[dtype])
            ops.append(TensorOp("dequantize", src, (out,), scheme=stored_scheme.name, **common))
        elif comps:  # a quantized weight copied as stored, never split from its companions
            outs = tuple(OutputTensor(rename(x.name), x.dtype, tuple(x.shape), x.nbytes) for x in (t, *comps))
            ops.append(TensorOp(_kind("copy", outs, src), src, outs, **common))
        elif t.name in chosen:
            module = t.name[: -len(".weight")]
            sch = mix.get(t.name) or scheme
            outs = tuple(OutputTensor(rename(f"{module}.{p.suffix}"), p.dtype, p.shape if p.exact else (p.nbytes,),
                                      p.nbytes, p.exact, p.suffix) for p in sch.pieces(t.dtype, t.shape))
            ops.append(TensorOp("quantize", src, outs, scheme=sch.name, **common))
        else:
            dtype = _target_dtype(t.dtype, role, request)
            out = OutputTensor(out_name, dtype, t.shape, math.prod(t.shape) * DTYPE_BYTES[dtype])
            ops.append(TensorOp(_kind("copy" if dtype == t.dtype else "cast", (out,), src), src, (out,), **common))

    out_cfg = cfg
    if scheme is not None:
        kept = [t.name for t in weights if classify(t.name).rule.role == Role.EXPERT and t.name not in chosen]
        qc = scheme.quantization_config(kept)
        others = {name: sch for name, sch in mix.items() if sch is not None and sch.name != scheme.name}
        if others:  # one config block names one scheme: the others, per weight (m1.load_pretrained reads them)
            qc["m1_mix"] = {"schemes": {sch.name: sch.quantization_config([]) for sch in others.values()},
                            "weights": {name: sch.name for name, sch in sorted(others.items())}}
        out_cfg = cfg.with_raw(quantization_config=qc)
    config = out_cfg.to_dict(fmt)
    if dequantize:
        config.pop("quantization_config", None)
    if request.dtype != "keep":
        config["torch_dtype"] = torch_name(DTYPE_OPTIONS[request.dtype])
    files = pack(ops, request.shard_size, request.by_layer, fmt.single_file)
    layout = "by-layer" if request.by_layer else f"shard-size {request.shard_size}"
    if scheme is None:
        job = {"command": request.command, "source": source, "revision": revision, "to": fmt.name, "layout": layout,
               "dtype": request.dtype, "router_dtype": request.router_dtype, "base_model": base_model}
    else:
        job = {"command": request.command, "source": source, "revision": revision, "scheme": scheme.name,
               **scheme.options(), **request.policy.describe(), "layout": layout, "base_model": base_model}
    if request.recipe:
        job["recipe"] = {k: v if isinstance(v, str) else v.name for k, v in sorted(request.recipe.items())}
    return Plan(fmt.name, fmt.sink, files, config, [f for f in extra_files if fmt.extra_file(f)], job,
                inputs=inputs or {}, scheme=scheme, warnings=fmt.warnings(cfg) if request.to else [],
                schemes=_schemes_of(scheme, mix))


def _mix(request: JobRequest, chosen: set[str]) -> dict[str, Any]:
    """The recipe's weights -> their Scheme (None: kept), for weights the policy lets be quantized."""
    from m1.schemes import make_scheme

    out: dict[str, Any] = {}
    made: dict[str, Any] = {}
    for name, value in request.recipe.items():
        if name not in chosen:
            continue
        if value == KEEP:
            out[name] = None
            continue
        if not isinstance(value, str):
            out[name] = value
            continue
        if request.scheme is not None and value == request.scheme.name:
            out[name] = request.scheme
            continue
        if value not in made:
            made[value] = make_scheme(value)
        out[name] = made[value]
    return out


def _schemes_of(scheme: Scheme | None, mix: dict[str, Any]) -> dict[str, Any]:
    out = {scheme.name: scheme} if scheme is not None else {}
    for sch in mix.values():
        if sch is not None:
            out.setdefault(sch.name, sch)
    return out


def _stack_aliases(tensors: list[TensorInfo]) -> dict[str, str]:
    from m1.gguf.names import to_gguf

    return {t.name: to_gguf(t.name).name for t in tensors if classify(t.name).companion is None}


def _plan_by_format(fmt: Any, cfg: M1Config, tensors: list[TensorInfo], request: JobRequest, chosen: set[str],
                    source: str, ckpt: Checkpoint | None, inputs: dict[str, Any] | None, base_model: str | None,
                    revision: str | None) -> Plan:
    tokenizer_dir = None
    if ckpt is not None and ckpt.storage.exists("tokenizer.json"):
        tokenizer_dir = ckpt.storage.local_path("tokenizer.json").parent
    read_rows = (lambda name, start: read_rows_from(ckpt, name, start)) if ckpt is not None else None
    ops, sink_data = fmt.plan_ops(cfg, tensors, request, chosen, source, read_rows, tokenizer_dir)
    files = fmt.pack(ops, request) if fmt.pack else pack(ops, request.shard_size, request.by_layer)
    scheme = request.scheme
    job = {"command": request.command, "source": source, "revision": revision, "to": fmt.name,
           "scheme": scheme.name if scheme else None, **request.policy.describe(), "dtype": request.dtype,
           **{k: v for k, v in request.format_options.items() if k != "stem"}, "base_model": base_model}
    if request.recipe:
        job["recipe"] = dict(sorted(request.recipe.items()))
    schemes = {scheme.name: scheme} if scheme is not None else {}
    for op in ops:  # every block type a mix uses, made like the main one (its imatrix too)
        if op.scheme is not None and op.scheme not in schemes:
            from m1.schemes import make_scheme

            schemes[op.scheme] = scheme.like(op.scheme) if scheme is not None else make_scheme(op.scheme)
    return Plan(fmt.name, fmt.sink, files, {}, [], job, inputs=inputs or {}, scheme=scheme,
                warnings=list(sink_data.get("warnings", [])), sink_data=sink_data, writes_config=fmt.writes_config,
                stem=request.format_options.get("stem"), schemes=schemes)


def read_rows_from(ckpt: Checkpoint, name: str, start: int,
                   block_bytes: int = 64 << 20) -> Iterator[tuple[int, Any]]:
    """Rows [start:] of a 2-D tensor as (first row, rows) blocks of about `block_bytes`, reading only their
    bytes (the padding rows of a 200064-row embedding): never the whole tail in memory at once."""
    import torch

    from m1.dtypes import torch_dtype

    info = ckpt.info(name)
    rows = info.shape[0]
    if start >= rows:
        return
    if ckpt.storage.decodes_tensors or not info.file.endswith(".safetensors"):
        whole = ckpt.get(name)  # a reader without byte ranges: one tensor, the memory rule allows it
        yield start, whole[start:]
        return
    row_bytes = info.nbytes // rows
    step = max(1, block_bytes // max(row_bytes, 1))
    with open(ckpt.local_path(info.file), "rb") as f:
        for first in range(start, rows, step):
            n = min(step, rows - first)
            buf = bytearray(n * row_bytes)
            f.seek(info.start + first * row_bytes)
            if f.readinto(buf) != len(buf):
                raise CheckpointError("the file ends inside this tensor's data", file=str(ckpt.local_path(info.file)),
                                      tensor=name, hint="re-download the file")
            yield first, torch.frombuffer(buf, dtype=torch_dtype(info.dtype)).reshape(n, *info.shape[1:])


def _kind(kind: str, outs: tuple[OutputTensor, ...], src: tuple[SourceTensor, ...]) -> str:
    """A copy whose names change is a rename (same bytes, the output format's names)."""
    if kind == "copy" and any(o.name != s.name for o, s in zip(outs, src, strict=True)):
        return "rename"
    return kind


def _source(t: TensorInfo) -> SourceTensor:
    return SourceTensor(t.name, t.file, t.dtype, tuple(t.shape), t.nbytes)


def _target_dtype(source: str, role: Role, request: JobRequest) -> str:
    if role == Role.ROUTER and request.router_dtype == "keep":
        return source  # the router stays fp32 unless asked
    wanted = DTYPE_OPTIONS[request.router_dtype if role == Role.ROUTER else request.dtype]
    if wanted is None or source not in FLOAT_DTYPES:
        return source
    return wanted


def _refuse_quantized_source(cfg: M1Config, tensors: list[TensorInfo], source: str) -> None:
    if cfg.quantization_config is not None:
        try:
            what = scheme_from_config(cfg.quantization_config).describe()
        except M1Error:
            what = str(cfg.quantization_config.get("quant_method", "unknown method"))
        raise UsageError(f"the source is already quantized ({what}, per its quantization_config)",
                         file=f"{source}/config.json",
                         hint="quantize the original checkpoint, or dequantize first: m1 convert SRC DST --dtype bf16")
    for t in tensors:
        if classify(t.name).companion is not None:
            raise UsageError("the source holds quantization tensors: it is already quantized", file=t.file,
                             tensor=t.name, hint="quantize the original checkpoint, or dequantize it first with "
                             "m1 convert SRC DST --dtype bf16")


def _check_chosen(scheme: Scheme, chosen: list[TensorInfo]) -> None:
    import warnings

    straddling = []
    for t in chosen:
        scheme.check_weight(t.name, t.dtype, t.shape, t.file)
        if scheme.straddles_rows(t.shape):
            straddling.append(t)
    if straddling:
        rows = sorted({t.shape[-1] for t in straddling})
        warnings.warn(f"{len(straddling)} weights have rows of {'/'.join(map(str, rows))} values, not a multiple of "
                      f"--blocksize {scheme.blocksize} (e.g. {straddling[0].name}): bitsandbytes 0.50's CPU kernels "
                      "(dequantize_4bit of the 2-D shape, Linear4bit on CPU) read such blocks back wrong; CUDA and "
                      "m1 (convert --dtype, load_pretrained) read them right. A blocksize dividing the rows avoids it",
                      RowBlockWarning, stacklevel=3)


class RowBlockWarning(UserWarning):
    """4-bit blocks that span two rows: a bitsandbytes CPU-kernel limitation, not a format problem."""


def shard_name(i: int, n: int) -> str:
    width = max(5, len(str(n)))
    return f"model-{i + 1:0{width}d}-of-{n:0{width}d}.safetensors"


def pack(ops: list[TensorOp], shard_size: int | None = None, by_layer: bool = False,
         single_file: str | None = None) -> list[OutputFile]:
    """Group operations into files with standard 1-based names; an op is never split over two files.

    by_layer: the embedding alone, then one file per layer, then final norm and head, so a layer is always
    in exactly one file (what layer-streaming and pipeline loading want). Otherwise greedy packing in order
    up to `shard_size` bytes (an op larger than the size gets a file of its own).
    """
    if single_file:  # a format that is one file (or a --layout that asks for one)
        return [OutputFile(single_file, tuple(ops))]
    groups: list[list[TensorOp]] = []
    if by_layer:
        first = [op for op in ops if op.layer is None and op.role == Role.EMBED.value]
        last = [op for op in ops if op.layer is None and op.role != Role.EMBED.value]
        layers: dict[int, list[TensorOp]] = {}
        for op in ops:
            if op.layer is not None:
                layers.setdefault(op.layer, []).append(op)
        groups = [g for g in [first, *[layers[k] for k in sorted(layers)], last] if g]
    else:
        limit = shard_size or 5 * 10**9
        current: list[TensorOp] = []
        size = 0
        for op in ops:
            if current and size + op.nbytes > limit:
                groups.append(current)
                current, size = [], 0
            current.append(op)
            size += op.nbytes
        if current:
            groups.append(current)
    return [OutputFile(shard_name(i, len(groups)), tuple(g)) for i, g in enumerate(groups)]
