"""The typed plan of every job that writes a checkpoint: output files, each a list of tensor operations.

An operation reads source tensors and produces output tensors: copy, cast, quantize, dequantize, stack
(N:1, e.g. a layer's experts into one 3-D tensor) or rename. The plan is pure data, made before a byte
is written: `--dry-run` prints it (`lines`, `op_lines` with --verbose, `summary` as JSON), and its
fingerprint, which `--resume` checks, covers the operations and what was read to make them (each
source file's size and mtime, or the Hub commit), never the source path as typed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from m1.units import human_bytes, human_count, human_duration

OpKind = Literal["copy", "cast", "quantize", "dequantize", "stack", "rename"]


@dataclass(frozen=True)
class SourceTensor:
    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True)
class OutputTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int  # exact when `exact`, else an upper bound used for sizing files
    exact: bool = True
    piece: str = ""  # a quantize op's output: the scheme's suffix for it ("weight", "weight.absmax", ...)


@dataclass(frozen=True)
class TensorOp:
    kind: OpKind
    sources: tuple[SourceTensor, ...]
    outputs: tuple[OutputTensor, ...]
    role: str
    layer: int | None = None
    params: int = 0  # parameters this op stands for (progress, sizes by role)
    scheme: str | None = None  # quantize/dequantize: the scheme's name

    @property
    def nbytes(self) -> int:
        return sum(o.nbytes for o in self.outputs)

    @property
    def source_bytes(self) -> int:
        return sum(s.nbytes for s in self.sources)

    def line(self) -> str:
        outs = ", ".join(f"{o.name} {o.dtype}{list(o.shape)}" for o in self.outputs)
        srcs = ", ".join(f"{s.name} {s.dtype}" for s in self.sources)
        via = f" ({self.scheme})" if self.scheme else ""
        return f"{self.kind}{via}: {srcs} -> {outs}"


@dataclass(frozen=True)
class OutputFile:
    name: str
    ops: tuple[TensorOp, ...]

    @property
    def nbytes(self) -> int:
        return sum(op.nbytes for op in self.ops)

    @property
    def tensors(self) -> tuple[OutputTensor, ...]:
        return tuple(o for op in self.ops for o in op.outputs)

    @property
    def params(self) -> int:
        return sum(op.params for op in self.ops)


@dataclass
class Plan:
    """Everything a job will write, decided before a byte is written."""

    format: str  # the output format (m1.formats)
    sink: str  # what writes its files (m1.sinks)
    files: list[OutputFile]
    config: dict[str, Any]
    extra_files: list[str]  # copied from the source
    job: dict[str, Any] = field(default_factory=dict)  # what made it: command, source, options (for people)
    inputs: dict[str, Any] = field(default_factory=dict)  # what was read to plan it (for the fingerprint)
    scheme: Any = None  # the m1.schemes Scheme of the quantize ops, if any (the main one of a mix)
    schemes: dict[str, Any] = field(default_factory=dict)  # every scheme the ops name, by name (a mix has several)
    warnings: list[str] = field(default_factory=list)
    sink_data: dict[str, Any] = field(default_factory=dict)  # what the format's sink writes besides tensors
    writes_config: bool = True  # config.json and the extra files beside the weights
    stem: str | None = None  # files mode: the files are named after it in the destination's parent folder
    # small files the job itself writes beside the weights (name -> text; a mix's m1-recipe.json): written
    # before the index and the manifest, and listed in the manifest, like config.json. Not in the fingerprint:
    # they are written whole at the end of every run, so a --resume that measured again (the same mix, floats
    # that may differ in the last digit on another device) still finishes the files already there.
    written: dict[str, str] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(f.nbytes for f in self.files)

    @property
    def params(self) -> int:
        return sum(f.params for f in self.files)

    @property
    def ops(self) -> Iterator[TensorOp]:
        return (op for f in self.files for op in f.ops)

    def fingerprint(self) -> str:
        """Identifies the plan, so --resume never mixes files of two different plans or two sources."""
        obj = {"format": self.format, "config": self.config, "extra": self.extra_files, "inputs": self.inputs,
               "files": [[f.name, [asdict(op) for op in f.ops]] for f in self.files], "sink": self.sink_data,
               # how each scheme quantizes (an imatrix, GPTQ's rounding), where a format has no config.json to say
               "schemes": {name: sch.options() for name, sch in sorted(self.schemes.items())}}
        return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()

    # ---- sizes by role ----------------------------------------------------------------------------
    def by_role(self) -> dict[str, dict[str, int]]:
        roles: dict[str, dict[str, int]] = {}
        for op in self.ops:
            r = roles.setdefault(op.role, {"tensors": 0, "quantized": 0, "params": 0, "bytes_before": 0,
                                           "bytes_after": 0, "quantized_params": 0, "quantized_before": 0,
                                           "quantized_after": 0})
            r["tensors"] += 1
            r["params"] += op.params
            r["bytes_before"] += op.source_bytes
            r["bytes_after"] += op.nbytes
            if op.kind in ("quantize", "stack") and op.scheme is not None and op.role == "expert":
                # any scheme of a mix; attention a format stores at q8_0 (--attn-type) counts as kept
                r["quantized"] += 1
                r["quantized_params"] += op.params
                r["quantized_before"] += op.source_bytes
                r["quantized_after"] += op.nbytes
        return roles

    def expert_schemes(self) -> dict[str, int]:
        """Expert weights by the scheme that quantizes them ("keep": left as they are), most first: one entry
        for a uniform quantization, several for a mix."""
        out: dict[str, int] = {}
        for op in self.ops:
            if op.role == "expert":
                name = op.scheme if op.kind in ("quantize", "stack") and op.scheme is not None else "keep"
                out[name] = out.get(name, 0) + 1
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def totals(self) -> dict[str, dict[str, int]]:
        quantized = {"tensors": 0, "params": 0, "bytes_before": 0, "bytes_after": 0}
        kept = dict(quantized)
        for r in self.by_role().values():
            quantized["tensors"] += r["quantized"]
            quantized["params"] += r["quantized_params"]
            quantized["bytes_before"] += r["quantized_before"]
            quantized["bytes_after"] += r["quantized_after"]
            kept["tensors"] += r["tensors"] - r["quantized"]
            kept["params"] += r["params"] - r["quantized_params"]
            kept["bytes_before"] += r["bytes_before"] - r["quantized_before"]
            kept["bytes_after"] += r["bytes_after"] - r["quantized_after"]
        return {"quantized": quantized, "kept": kept, "total": {k: quantized[k] + kept[k] for k in quantized}}

    def quantize_seconds(self) -> dict[str, Any] | None:
        """The quantization's CPU time from each scheme's measured params/s per core (`Scheme.params_per_second`):
        {"core_seconds", "by_scheme": {name: core seconds}, "unmeasured": [names]}; None when no scheme is measured."""
        by_scheme: dict[str, float] = {}
        unmeasured: set[str] = set()
        for op in self.ops:
            if op.kind not in ("quantize", "stack") or op.scheme is None:
                continue
            scheme = self.schemes.get(op.scheme) or (self.scheme if self.scheme is not None
                                                     and self.scheme.name == op.scheme else None)
            rate = scheme.params_per_second() if scheme is not None else None
            if rate:
                by_scheme[op.scheme] = by_scheme.get(op.scheme, 0.0) + op.params / rate
            else:
                unmeasured.add(op.scheme)
        if not by_scheme:  # no scheme of this plan has measured rates (bitsandbytes): nothing to say
            return None
        return {"core_seconds": sum(by_scheme.values()), "by_scheme": by_scheme, "unmeasured": sorted(unmeasured)}

    # ---- printing ---------------------------------------------------------------------------------
    def summary(self, verbose: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format": self.format,
            "shards": len(self.files),
            "tensors": sum(len(f.tensors) for f in self.files),
            "bytes": self.total_bytes,
            "files": [{"file": f.name, "tensors": len(f.tensors), "bytes": f.nbytes} for f in self.files],
            "extra_files": self.extra_files,
        }
        if self.scheme is not None:
            out.update(scheme=self.scheme.name, **self.scheme.options(), expert_schemes=self.expert_schemes(),
                       params=self.params,
                       by_role=self.by_role(), **self.totals())
            timing = self.quantize_seconds()
            if timing is not None:
                out["quantize_time"] = timing
        if not self.writes_config:  # a format that carries its own metadata: its sizes by tensor type
            out["by_type"] = self.by_type()
            if self.sink_data.get("missing"):
                out["missing"] = self.sink_data["missing"]
        if verbose:
            out["ops"] = [{"file": f.name, **asdict(op)} for f in self.files for op in f.ops]
        return out

    def lines(self) -> Iterator[str]:
        """The summary a person reads: sizes by role (for a quantization), then the files."""
        if "source_dequantized" in self.job:
            stored, _, dense = str(self.job["source_dequantized"]).partition(" -> ")
            yield f"source: its {stored} weights are dequantized to {dense} as they are read"
        if self.scheme is not None:
            yield from self._quantize_lines()
        for f in self.files:
            yield f"{f.name}  {len(f.tensors):6d} tensors  {human_bytes(f.nbytes):>10}"
        yield (f"total: {len(self.files)} shards, {sum(len(f.tensors) for f in self.files)} tensors, "
               f"{human_bytes(self.total_bytes)}")
        for name in self.extra_files:
            yield f"copy: {name}"
        for name in self.written:
            yield f"write: {name}"
        if not self.writes_config:
            yield "by type: " + ", ".join(f"{t} {human_bytes(n)}" for t, n in self.by_type().items())
            missing = self.sink_data.get("missing")
            if missing:
                yield f"not ready to write: {missing['message']} ({missing.get('hint')})"

    def by_type(self) -> dict[str, int]:
        """Bytes by output dtype (a block type where the format stores one), largest first."""
        out: dict[str, int] = {}
        for f in self.files:
            for t in f.tensors:
                out[t.dtype] = out.get(t.dtype, 0) + t.nbytes
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def op_lines(self) -> Iterator[str]:
        for f in self.files:
            yield f"{f.name}:"
            for op in f.ops:
                yield "  " + op.line()

    def _quantize_lines(self) -> Iterator[str]:
        totals = self.totals()
        mix = {n: k for n, k in self.expert_schemes().items() if n != "keep"}
        if len(mix) > 1 or "recipe" in self.job:  # a recipe's mix, even where one scheme and keep remain
            counts = ", ".join(f"{n} {k}" for n, k in self.expert_schemes().items())
            yield f"scheme: a mix of {len(self.expert_schemes())} (expert weights: {counts})"
            for name in mix:
                yield f"  {self.schemes[name].describe()}" if name in self.schemes else f"  {name}"
        else:
            yield f"scheme: {self.scheme.describe()}"
        yield f"{'role':16s} {'tensors':>8s} {'quantized':>9s} {'params':>9s} {'before':>11s} {'after':>11s}"
        for role, r in sorted(self.by_role().items(), key=lambda kv: -kv[1]["bytes_before"]):
            yield (f"{role:16s} {r['tensors']:8d} {r['quantized']:9d} {human_count(r['params']):>9s} "
                   f"{human_bytes(r['bytes_before']):>11s} {human_bytes(r['bytes_after']):>11s}")
        q, k, t = totals["quantized"], totals["kept"], totals["total"]
        yield (f"quantized: {q['tensors']} weights, {human_count(q['params'])} params, "
               f"{human_bytes(q['bytes_before'])} -> {human_bytes(q['bytes_after'])}")
        yield f"kept:      {k['tensors']} tensors at their source dtype, {human_bytes(k['bytes_after'])}"
        yield f"total:     {human_bytes(t['bytes_before'])} -> {human_bytes(t['bytes_after'])}"
        timing = self.quantize_seconds()
        if timing is not None:
            core_s = timing["core_seconds"]
            parts = ", ".join(f"{n} {human_duration(s)}" for n, s in sorted(timing["by_scheme"].items(),
                                                                          key=lambda kv: -kv[1]))
            yield (f"quantize time (measured per-core rates): {human_duration(core_s)} on 1 core, "
                   f"{human_duration(core_s / 16)} on 16, {human_duration(core_s / 64)} on 64 ({parts})")
        if timing is not None and timing["unmeasured"]:
            yield f"quantize time: no measured rate for {', '.join(timing['unmeasured'])}"
