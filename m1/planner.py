"""The one planner: a checkpoint's tensors and a request in, a typed `Plan` out, nothing written.

`m1 convert` and `m1 quantize` are the same job: every tensor is copied, cast, dequantized or (with a
scheme, for the weights the policy picks) quantized, into the files of the target format. The input is
checked against the spec first (the same findings as `m1 verify integrity`), so a damaged or foreign
checkpoint is refused before anything is written.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from m1.checkpoint import Checkpoint
from m1.config import M1Config
from m1.dtypes import DTYPE_OPTIONS
from m1.errors import CheckpointError, M1Error, UsageError
from m1.formats import PlanInput, get_format
from m1.formats.tensor_plan import pack  # noqa: F401 (m1.scratch packs a regrouped plan with it)
from m1.plan import OutputFile, Plan
from m1.policy import Policy
from m1.safetensors_io import TensorInfo
from m1.schemes import Scheme, companion_suffixes, make_scheme, scheme_from_config
from m1.spec import classify, inventory, spec_by_name

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
    format_options: dict[str, Any] = field(default_factory=dict)  # the output format's own (types, splits, ...)
    # A measured mix: weight (spec name, or the output format's tensor name) -> the scheme it gets instead of `scheme`;
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
    classified = {t.name: classify(t.name, t.file) for t in tensors}
    if scheme is not None:
        _refuse_quantized_source(cfg, tensors, source)
        if fmt.name not in scheme.formats:
            raise UsageError(f"{scheme.describe()} cannot be stored in the {fmt.name} format",
                             hint=f"use --format {' or '.join(scheme.formats)}")
    chosen: set[str] = set()
    if scheme is not None:  # --keep/--only may name a tensor as the output format does, too
        roles = [(t.name, classified[t.name].rule.role) for t in tensors]
        chosen = request.policy.select(roles, source, fmt.aliases(t.name for t in tensors))
    mix = _mix(request, chosen)
    chosen -= {name for name, sch in mix.items() if sch is None}
    if scheme is not None:
        for sch in {id(x): x for x in [scheme, *(v for v in mix.values() if v is not None)]}.values():
            _check_chosen(sch, [t for t in tensors if t.name in chosen and mix.get(t.name, scheme) is sch])
    tokenizer_dir = None
    if ckpt is not None and ckpt.storage.exists("tokenizer.json"):
        tokenizer_dir = ckpt.storage.local_path("tokenizer.json").parent
    read_rows = (lambda name, start: read_rows_from(ckpt, name, start)) if ckpt is not None else None
    planned = fmt.plan_ops(PlanInput(fmt, cfg, tensors, classified, spec_by_name(cfg), request, chosen, mix, source,
                                     read_rows, tokenizer_dir))
    job = {"command": request.command, "source": source, "revision": revision, **planned.job, "base_model": base_model}
    if ckpt is not None and ckpt.storage.dequantized_from is not None:
        job["source_dequantized"] = ckpt.storage.dequantized_from
    if request.recipe:
        job["recipe"] = {k: v if isinstance(v, str) else v.name for k, v in sorted(request.recipe.items())}
    return Plan(fmt.name, fmt.sink, planned.files, planned.config,
                [f for f in extra_files if fmt.writes_config and fmt.extra_file(f)], job, inputs=inputs or {},
                scheme=scheme, warnings=planned.warnings, sink_data=planned.sink_data,
                writes_config=fmt.writes_config, stem=request.format_options.get("stem"),
                schemes=_schemes_of(scheme, mix, planned.files))


def _mix(request: JobRequest, chosen: set[str]) -> dict[str, Any]:
    """The recipe's weights -> their Scheme (None: kept), for weights the policy lets be quantized."""
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


def _schemes_of(scheme: Scheme | None, mix: dict[str, Any], files: list[OutputFile]) -> dict[str, Any]:
    """Every scheme the ops write with, by name: the main one, a mix's, and those the format picks per tensor
    (a block type of a recipe, an attention type), made like the main one (its imatrix too)."""
    out = {scheme.name: scheme} if scheme is not None else {}
    for sch in mix.values():
        if sch is not None:
            out.setdefault(sch.name, sch)
    for op in (op for f in files for op in f.ops):
        if op.kind != "dequantize" and op.scheme is not None and op.scheme not in out:
            out[op.scheme] = scheme.like(op.scheme) if scheme is not None else make_scheme(op.scheme)
    return out


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
