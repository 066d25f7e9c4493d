"""The plan of the formats whose files hold the spec's tensors one to one (release, hf): each source tensor is
copied, cast or dequantized into one tensor of the format's name table, or quantized into its scheme's
pieces, and the tensors are packed into shards (or the format's one file) with a config.json beside them."""

from __future__ import annotations

import math
from typing import Any

from m1.dtypes import DTYPE_BYTES, DTYPE_OPTIONS, FLOAT_DTYPES, torch_name
from m1.errors import CheckpointError, UsageError
from m1.formats.base import FormatOption, FormatPlan, PlanInput
from m1.plan import OutputFile, OutputTensor, SourceTensor, TensorOp
from m1.schemes import companion_suffixes, scheme_from_config
from m1.tensors import Role

ATTENTION_ROLES = (Role.LIGHTNING_QKV, Role.LIGHTNING_GATE, Role.LIGHTNING_OUT, Role.SOFTMAX_ATTN)
# The formats of this module take --attn-type for a scheme that quantizes the attention projections too
# (Scheme.for_attention: fp8); without it the attention keeps its source precision.
ATTN_TYPE = FormatOption("attn_type", help="fp8: the attention projections fp8 too (with --scheme fp8; default: "
                         "their source precision).")
OPTIONS = (ATTN_TYPE,)


def make_options(dest: Any, given: dict[str, Any]) -> dict[str, Any]:
    from m1.schemes import scheme_names

    value = given.get("attn_type")
    if value is not None and value not in scheme_names():
        raise UsageError(f"--attn-type {value!r} is not a scheme", hint="e.g. --scheme fp8 --attn-type fp8")
    return {"attn_type": value} if value is not None else {}


def attention_scheme(job: PlanInput) -> Any:
    """The request's scheme for the attention projections too (--attn-type), or None."""
    name, scheme = job.request.format_options.get("attn_type"), job.request.scheme
    if name is None:
        return None
    both = scheme.for_attention(name) if scheme is not None else None
    if both is None:
        raise UsageError(f"--attn-type {name} does not apply to {scheme.describe() if scheme else 'a copy'}",
                         hint=f"--attn-type {name} goes with m1 quantize --scheme {name}")
    for t in job.tensors:
        if attention_chosen(job, t.name):
            both.check_weight(t.name, t.dtype, t.shape, t.file)
    return both


def attention_chosen(job: PlanInput, name: str) -> bool:
    """An attention projection --attn-type quantizes: not a companion, not matched by --keep."""
    c = job.classified[name]
    return (c.rule.role in ATTENTION_ROLES and c.companion is None
            and not any(p.matches(name) for p in job.request.policy.keep))


def plan_by_tensor(job: PlanInput) -> FormatPlan:
    fmt, cfg, request, scheme = job.format, job.cfg, job.request, job.request.scheme
    with_attention = attention_scheme(job)
    if with_attention is not None:
        scheme = with_attention
    dequantize = cfg.quantization_config is not None and request.dtype != "keep"
    stored_scheme = scheme_from_config(cfg.quantization_config, f"{job.source}/config.json") if dequantize else None
    suffixes = companion_suffixes()

    def rename(name: str) -> str:  # spec name -> the output format's
        return name if fmt.names.identity else fmt.names.from_spec(name, suffixes)

    ops: list[TensorOp] = []
    companions: dict[str, list[Any]] = {}
    weights: list[Any] = []
    for t in job.tensors:
        c = job.classified[t.name]
        if c.companion is None:
            weights.append(t)
        else:
            companions.setdefault(c.weight_name, []).append(t)
    for t in weights:
        c = job.classified[t.name]
        spec = job.specs.get(t.name)
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
        elif t.name in job.chosen or (with_attention is not None and attention_chosen(job, t.name)):
            module = t.name[: -len(".weight")]
            sch = job.mix.get(t.name) or scheme
            outs = tuple(OutputTensor(rename(f"{module}.{p.suffix}"), p.dtype, p.shape if p.exact else (p.nbytes,),
                                      p.nbytes, p.exact, p.suffix) for p in sch.pieces(t.dtype, t.shape))
            ops.append(TensorOp("quantize", src, outs, scheme=sch.name, **common))
        else:
            dtype = _target_dtype(t.dtype, role, request)
            out = OutputTensor(out_name, dtype, t.shape, math.prod(t.shape) * DTYPE_BYTES[dtype])
            ops.append(TensorOp(_kind("copy" if dtype == t.dtype else "cast", (out,), src), src, (out,), **common))

    out_cfg = cfg
    if scheme is not None:
        kept = [t.name for t in weights if job.classified[t.name].rule.role == Role.EXPERT and t.name not in job.chosen]
        if with_attention is not None:  # the projections --keep leaves out are named, as kept experts are
            kept += [t.name for t in weights
                     if job.classified[t.name].rule.role in ATTENTION_ROLES and not attention_chosen(job, t.name)]
        qc = scheme.quantization_config(kept)
        others = {name: sch for name, sch in job.mix.items() if sch is not None and sch.name != scheme.name}
        if others:  # one config block names one scheme: the others, per weight (m1.load_pretrained reads them)
            qc["m1_mix"] = {"schemes": {sch.name: sch.quantization_config([]) for sch in others.values()},
                            "weights": {name: sch.name for name, sch in sorted(others.items())}}
        out_cfg = cfg.with_raw(quantization_config=qc)
    config = out_cfg.to_dict(fmt)
    if dequantize:
        config.pop("quantization_config", None)
    if request.dtype != "keep":
        config["torch_dtype"] = torch_name(DTYPE_OPTIONS[request.dtype])
    layout = "by-layer" if request.by_layer else f"shard-size {request.shard_size}"
    if scheme is None:
        fields = {"to": fmt.name, "layout": layout, "dtype": request.dtype, "router_dtype": request.router_dtype}
    else:
        fields = {"scheme": scheme.name, **scheme.options(), **request.policy.describe(), "layout": layout}
    files = pack(ops, request.shard_size, request.by_layer, fmt.single_file)
    return FormatPlan(files, config, fields, fmt.warnings(cfg) if request.to else [])


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


def _kind(kind: str, outs: tuple[OutputTensor, ...], src: tuple[SourceTensor, ...]) -> str:
    """A copy whose names change is a rename (same bytes, the output format's names)."""
    if kind == "copy" and any(o.name != s.name for o, s in zip(outs, src, strict=True)):
        return "rename"
    return kind


def _source(t: Any) -> SourceTensor:
    return SourceTensor(t.name, t.file, t.dtype, tuple(t.shape), t.nbytes)


def _target_dtype(source: str, role: Role, request: Any) -> str:
    if role == Role.ROUTER and request.router_dtype == "keep":
        return source  # the router stays fp32 unless asked
    wanted = DTYPE_OPTIONS[request.router_dtype if role == Role.ROUTER else request.dtype]
    if wanted is None or source not in FLOAT_DTYPES:
        return source
    return wanted
