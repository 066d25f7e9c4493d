"""`m1 verify integrity`: is this checkpoint whole and is it an M1?

Checks, all from headers unless asked for more: the index against the shard headers (every name where
the index says, no extras, total_size), the inventory against the spec (missing, unexpected, shape,
dtype), the manifest's sha256 and sizes, and with `--deep` that every float tensor is finite.
Findings are collected, not raised, so one run lists everything that is wrong.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from m1.checkpoint import Checkpoint
from m1.dtypes import FLOAT_DTYPES, torch_dtype
from m1.errors import M1Error, UsageError
from m1.manifest import manifest_findings
from m1.safetensors_io import Header
from m1.schemes import companions_in
from m1.spec import Role, TensorSpec, classify, inventory


@dataclass(frozen=True)
class Finding:
    code: str  # missing-shard, corrupt-shard, missing-tensor, unexpected-tensor, shape, dtype, not-finite, ...
    message: str
    file: str | None = None
    tensor: str | None = None

    def line(self) -> str:
        where = ", ".join(p for p in (self.file and f"file {self.file}", self.tensor and f"tensor {self.tensor}") if p)
        return f"[{self.code}] {where + ': ' if where else ''}{self.message}"


@dataclass
class IntegrityReport:
    source: str
    findings: list[Finding] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.findings

    def add(self, code: str, message: str, file: str | None = None, tensor: str | None = None) -> None:
        self.findings.append(Finding(code, message, file, tensor))

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "ok": self.ok, "stats": self.stats,
                "findings": [asdict(f) for f in self.findings]}


def expected_quantized(ckpt: Checkpoint, spec: TensorSpec) -> dict[str, tuple[str, tuple[int, ...] | None]] | None:
    """For a quantized checkpoint: the tensors that stand for `spec` (name -> dtype, shape or None)."""
    qconfig = ckpt.config.quantization_config
    if qconfig is None:
        return None
    from m1.quantized import expected_tensors

    return expected_tensors(qconfig, spec, ckpt.weight_map)


def check_integrity(source: str, deep: bool = False, check_hashes: bool = True, revision: str | None = None,
                    show_progress: bool = False, layers: list[int] | None = None) -> IntegrityReport:
    """All checks on a local folder (or a Hub repo id, headers only). `layers`: only those layers' tensors
    and the shards that hold them (a partial download made by `m1 pull --layers`)."""
    report = IntegrityReport(source)
    try:
        ckpt = Checkpoint.open(source, revision=revision)
    except UsageError:
        raise
    except M1Error as exc:  # a file whose tensor infos do not tile its data section, too
        report.add("unreadable", exc.message + (f" ({exc.hint})" if exc.hint else ""), exc.file, exc.tensor)
        return report
    headers = check_checkpoint(ckpt, report, layers)
    if ckpt.storage.own_format is not None:
        _check_own_format(ckpt, report, check_hashes and layers is None)
    elif check_hashes and not ckpt.remote and layers is None:
        check_manifest(Path(ckpt.root), report)
    if deep:
        _check_finite(ckpt, headers, report, show_progress, layers)
    return report


def check_checkpoint(ckpt: Checkpoint, report: IntegrityReport, layers: list[int] | None = None) -> dict[str, Header]:
    """Shards, index and spec checks from headers; returns the headers that could be read."""
    if layers is not None:
        ckpt = _restrict(ckpt, layers, report)
    headers = _check_shards(ckpt, report)
    _check_index(ckpt, headers, report, partial=layers is not None)
    _check_spec(ckpt, headers, report, layers)
    report.stats.update(
        tensors=len(ckpt.weight_map), shards=len(ckpt.files()),
        bytes=sum(t.nbytes for h in headers.values() for t in h.tensors.values()),
        flavour=ckpt.config.flavour, layers=ckpt.config.num_hidden_layers,
    )
    return headers


def _restrict(ckpt: Checkpoint, layers: list[int], report: IntegrityReport) -> Checkpoint:
    wanted = set(layers)
    keep = {}
    for name, file in ckpt.weight_map.items():
        try:
            layer = classify(name, file).layer
        except M1Error as exc:
            report.add("unknown-tensor", exc.message, file, name)
            continue
        if layer in wanted:
            keep[name] = file
    report.stats["checked_layers"] = sorted(wanted)
    return ckpt.restricted(list(keep))


def _check_shards(ckpt: Checkpoint, report: IntegrityReport) -> dict[str, Header]:
    headers: dict[str, Header] = {}
    for file in ckpt.files():
        try:
            headers[file] = ckpt.header(file)
        except M1Error as exc:
            code = "missing-shard" if "missing" in exc.message else "corrupt-shard"
            lost = [name for name, f in ckpt.weight_map.items() if f == file]
            held = f"; the index maps {len(lost)} tensors to it, e.g. {lost[0]}" if lost and exc.tensor is None else ""
            report.add(code, exc.message + held + (f" ({exc.hint})" if exc.hint else ""), file, exc.tensor)
    return headers


def _check_index(ckpt: Checkpoint, headers: dict[str, Header], report: IntegrityReport, partial: bool = False) -> None:
    for name, file in ckpt.weight_map.items():
        header = headers.get(file)
        if header is not None and name not in header.tensors:
            report.add("index-mismatch", "the index names this tensor but the shard lacks it", file, name)
    for file, header in headers.items():
        for name in header.tensors:
            if partial and name not in ckpt.weight_map:
                continue  # another layer's tensor in a shared shard
            if ckpt.weight_map.get(name) != file:
                where = ckpt.weight_map.get(name)
                message = (f"the shard holds this tensor but the index maps it to {where}" if where
                           else "the shard holds a tensor the index lacks")
                report.add("index-mismatch", message, file, name)
    total = ckpt.index_metadata.get("total_size")
    if total is not None and not partial and len(headers) == len(ckpt.files()):
        actual = sum(t.nbytes for h in headers.values() for t in h.tensors.values())
        if int(total) != actual:
            report.add("total-size", f"index total_size {total} but the shards hold {actual} bytes of tensors",
                       ckpt.index_file)


def _check_quantization_config(ckpt: Checkpoint, report: IntegrityReport) -> bool:
    """A quantization_config must name a scheme m1 reads, and some weight must carry its tensors: a plain
    checkpoint that claims to be quantized would be loaded as one. False when the config cannot be used."""
    from m1.quantized import is_quantized
    from m1.schemes import scheme_from_config

    qc = ckpt.config.quantization_config
    if qc is None:
        return True
    config = f"{ckpt.root}/config.json"
    try:
        scheme = scheme_from_config(qc, config)
    except M1Error as exc:
        report.add("quantization-config", exc.message, config)
        return False
    if not any(is_quantized(name, ckpt.weight_map) for name in ckpt.weight_map if name.endswith(".weight")):
        report.add("quantization-config", f"config.json says {scheme.describe()}, but no weight carries its "
                   "quantization tensors (a plain checkpoint with a stray quantization_config?)", config)
        return False
    return True


def _check_spec(ckpt: Checkpoint, headers: dict[str, Header], report: IntegrityReport,
                layers: list[int] | None = None) -> None:
    cfg = ckpt.config
    if not _check_quantization_config(ckpt, report):
        return
    expected = {t.name: t for t in inventory(cfg) if layers is None or t.layer in layers}
    present: dict[str, Any] = {}
    for h in headers.values():
        present.update(h.tensors if layers is None else {n: t for n, t in h.tensors.items() if n in ckpt.weight_map})
    names = set(ckpt.weight_map) | set(present)
    covered: set[str] = set()
    float_dtypes: Counter[str] = Counter()
    quantized_groups: dict[str, dict[str, tuple[str, tuple[int, ...] | None]]] = {}
    for name in sorted(names):
        file = ckpt.weight_map.get(name) or next((f for f, h in headers.items() if name in h.tensors), None)
        try:
            c = classify(name, file)
        except M1Error as exc:
            report.add("unknown-tensor", exc.message, file, name)
            continue
        spec = expected.get(c.weight_name)
        if spec is None:
            report.add("unexpected-tensor", "not part of this config's M1 (layer or expert out of range, "
                       "or the wrong attention kind for this layer)", file, name)
            continue
        # a quantized weight: an expert, or another weight stored with companions (fp8 attention)
        quantized = spec.role == Role.EXPERT or bool(companions_in(spec.name, names))
        if c.companion is not None or (cfg.quantization_config and quantized):
            group = quantized_groups.get(spec.name)
            if group is None:
                group = expected_quantized(ckpt, spec) or {}
                quantized_groups[spec.name] = group
            if name not in group:
                if c.companion is not None and cfg.quantization_config is None:
                    report.add("unexpected-tensor", f"bitsandbytes {c.companion} but config.json has no "
                               "quantization_config", file, name)
                elif group:
                    report.add("unexpected-tensor", "not part of this quantization scheme", file, name)
                else:
                    covered.add(spec.name)  # weight kept unquantized (e.g. --keep)
                    _check_plain(spec, present.get(name), file, report, float_dtypes)
                continue
            covered.add(spec.name)
            info = present.get(name)
            dtype, shape = group[name]
            if info is not None and info.dtype != dtype:
                report.add("dtype", f"dtype {info.dtype}, the scheme stores {dtype}", file, name)
            if info is not None and shape is not None and tuple(info.shape) != tuple(shape):
                report.add("shape", f"shape {list(info.shape)}, expected {list(shape)}", file, name)
            continue
        covered.add(spec.name)
        _check_plain(spec, present.get(name), file, report, float_dtypes)
    for spec in expected.values():
        if spec.name not in covered:
            report.add("missing-tensor", f"the spec expects {spec.dtype}{list(spec.shape)} ({spec.role.value})",
                       None, spec.name)
    for weight, group in quantized_groups.items():
        for name in group:
            if name not in names and weight in covered:
                report.add("missing-tensor", "a quantized weight lacks this bitsandbytes tensor", None, name)
    # One float dtype for the whole checkpoint (the router may stay fp32): a stray dtype is damage.
    # Not where the format's type policy mixes types by design (its own findings check the types by role).
    if float_dtypes and not ckpt.storage.mixed_float_dtypes:
        main_dtype, _ = float_dtypes.most_common(1)[0]
        report.stats["dtype"] = main_dtype
        for name, info in present.items():
            try:
                c = classify(name)
            except M1Error:
                continue
            if c.companion or c.rule.role == Role.ROUTER or info.dtype not in FLOAT_DTYPES:
                continue
            if cfg.quantization_config and c.rule.role == Role.EXPERT:
                continue
            if info.dtype != main_dtype:
                report.add("dtype", f"dtype {info.dtype} where the rest of the checkpoint is {main_dtype}",
                           info.file, name)


def _check_plain(spec: TensorSpec, info: Any, file: str | None, report: IntegrityReport,
                 float_dtypes: Counter[str]) -> None:
    if info is None:
        return  # index-mismatch or missing-shard already reported
    if tuple(info.shape) != spec.shape:
        report.add("shape", f"shape {list(info.shape)}, the config implies {list(spec.shape)}", file, spec.name)
    if info.dtype not in FLOAT_DTYPES:
        report.add("dtype", f"dtype {info.dtype}, expected a float dtype (release: {spec.dtype})", file, spec.name)
    elif spec.role != Role.ROUTER:
        float_dtypes[info.dtype] += 1


def _check_own_format(ckpt: Checkpoint, report: IntegrityReport, check_hashes: bool) -> None:
    """A storage that reads its format by itself (tensor types by role, its <stem>.m1-manifest.json)."""
    for code, message, file, tensor in ckpt.storage.findings(check_hashes):
        report.add(code, message, file, tensor)
    report.stats["format"] = ckpt.storage.own_format


def check_manifest(root: Path, report: IntegrityReport) -> None:
    """Each shard the manifest under `root` lists against its recorded size and sha256, into `report`; no
    manifest is no finding (a release has none)."""
    listed, findings = manifest_findings(root)
    if listed is not None:
        report.stats["manifest"] = listed
    for code, message, file in findings:
        report.add(code, message, file)


def _check_finite(ckpt: Checkpoint, headers: dict[str, Header], report: IntegrityReport, show_progress: bool,
                  layers: list[int] | None = None) -> None:
    import torch

    from m1.progress import byte_progress

    infos = [t for h in headers.values() for t in h.tensors.values() if t.dtype in FLOAT_DTYPES
             and (layers is None or _layer_of(t.name) in layers)]
    with byte_progress(sum(t.nbytes for t in infos), "deep check", show_progress) as advance:
        for info in infos:
            dtype = torch_dtype(info.dtype)
            bad = 0
            for _, chunk in ckpt.iter_chunks(info.name, 32 << 20):
                values = torch.frombuffer(chunk, dtype=dtype) if len(chunk) else torch.empty(0)
                bad += int((~torch.isfinite(values)).sum())
                advance(len(chunk))
            if bad:
                report.add("not-finite", f"{bad} NaN/Inf values", info.file, info.name)


def _layer_of(name: str) -> int | None:
    try:
        return classify(name).layer
    except M1Error:
        return None

