"""`m1 inspect`: what is this checkpoint? Headers only, local or on the Hub."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from m1.checkpoint import Checkpoint
from m1.dtypes import FLOAT_DTYPES
from m1.errors import M1Error
from m1.spec import classify, inventory
from m1.units import human_bytes, human_count


def layer_ranges(indices: list[int]) -> str:
    """[7, 15, 23] -> '7,15,23'; [0,1,2,3] -> '0-3'."""
    parts: list[str] = []
    start = prev = None
    for i in indices:
        if start is None:
            start = prev = i
        elif i == prev + 1:
            prev = i
        else:
            parts.append(f"{start}-{prev}" if prev != start else f"{start}")
            start = prev = i
    if start is not None:
        parts.append(f"{start}-{prev}" if prev != start else f"{start}")
    return ",".join(parts)


def inspect_checkpoint(source: str, revision: str | None = None) -> dict[str, Any]:
    ckpt = Checkpoint.open(source, revision=revision)
    cfg = ckpt.config
    # A storage that decodes its own block types (to F32) reports its types and bytes as stored.
    storage = ckpt.storage
    decoded = 0
    by_role: dict[str, dict[str, int]] = defaultdict(lambda: {"tensors": 0, "params": 0, "bytes": 0})
    by_dtype: dict[str, dict[str, int]] = defaultdict(lambda: {"tensors": 0, "bytes": 0})
    expected = {t.name: t for t in inventory(cfg)}
    seen: set[str] = set()
    unexpected: list[str] = []
    unreadable: list[str] = []
    for file in ckpt.files():
        try:
            header = ckpt.header(file)
        except M1Error as exc:
            unreadable.append(exc.one_line())
            continue
        for info in header.tensors.values():
            try:
                c = classify(info.name, file)
            except M1Error:
                unexpected.append(info.name)
                continue
            if c.weight_name not in expected:
                unexpected.append(info.name)
                continue
            seen.add(c.weight_name)
            dtype, nbytes = storage.stored_as(info.name) or (info.dtype, info.nbytes)
            decoded += info.nbytes
            role = by_role[c.rule.role.value]
            role["tensors"] += 1
            role["bytes"] += nbytes
            if c.companion is None:
                role["params"] += expected[c.weight_name].numel
            d = by_dtype[dtype]
            d["tensors"] += 1
            d["bytes"] += nbytes
    missing = [n for n in expected if n not in seen]
    from m1.integrity import IntegrityReport, check_checkpoint

    report = IntegrityReport(str(source))  # the index against the headers, as verify integrity checks it
    check_checkpoint(ckpt, report)
    covered = ("missing-tensor", "unexpected-tensor", "unknown-tensor", "corrupt-shard", "missing-shard")
    problems = [f.line() for f in report.findings if f.code not in covered]
    kinds = cfg.layer_kinds
    qc = cfg.quantization_config
    scheme = None
    if qc is not None:  # the scheme registry reads it, as every other command does
        from m1.schemes import scheme_from_config

        try:
            scheme = scheme_from_config(qc).name
        except M1Error as exc:
            scheme = None
            unreadable.append(f"config.json quantization_config: {exc.message}")
    if storage.own_format is not None:  # its block types are its quantization, largest first
        blocks = sorted((t for t in by_dtype if t not in FLOAT_DTYPES), key=lambda t: -by_dtype[t]["bytes"])
        scheme = f"{storage.own_format} " + ", ".join(blocks) if blocks else None
    return {
        "source": str(source),
        "revision": revision,
        "flavour": cfg.flavour,
        "model_type": cfg.model_type,
        "layers": cfg.num_hidden_layers,
        "lightning_layers": kinds.count("lightning"),
        "softmax_layers": kinds.count("softmax"),
        "softmax_at": layer_ranges([i for i, k in enumerate(kinds) if k == "softmax"]),
        "experts": cfg.num_local_experts,
        "top_k": cfg.num_experts_per_tok,
        "rotary_dim": cfg.rotary_dim,
        "head_dim": cfg.head_dim,
        "quantization": scheme,
        "quantization_config": qc,
        "shards": len(ckpt.files()),
        "tensors": len(ckpt.weight_map),
        "params": sum(r["params"] for r in by_role.values()),
        "bytes": sum(r["bytes"] for r in by_role.values()),  # as stored
        "decoded_bytes": decoded,  # as read back (block types as F32)
        "by_role": dict(by_role),
        "by_dtype": dict(by_dtype),
        "missing": missing,
        "unexpected": unexpected,
        "unreadable": unreadable,
        "problems": problems,
    }


def render_inspect(info: dict[str, Any]) -> str:
    lines = [
        f"{info['source']}: MiniMax-M1 ({info['flavour']} flavour, model_type {info['model_type']})",
        f"  layers: {info['layers']} ({info['lightning_layers']} lightning, {info['softmax_layers']} softmax at "
        f"{info['softmax_at']}), {info['experts']} experts top-{info['top_k']}, "
        f"rotary {info['rotary_dim']}/{info['head_dim']}",
        f"  quantization: {info['quantization'] or 'none'}",
        f"  {info['tensors']} tensors in {info['shards']} shards, {human_count(info['params'])} parameters, "
        f"{human_bytes(info['bytes'])}" + (f" stored, {human_bytes(info['decoded_bytes'])} read back"
                                          if info["decoded_bytes"] != info["bytes"] else ""),
        "  by role:",
    ]
    for role, r in sorted(info["by_role"].items(), key=lambda kv: -kv[1]["bytes"]):
        lines.append(f"    {role:16s} {r['tensors']:6d} tensors {human_count(r['params']):>9} params "
                     f"{human_bytes(r['bytes']):>10}")
    lines.append("  by stored type:" if info["decoded_bytes"] != info["bytes"] else "  by dtype:")
    for dtype, d in sorted(info["by_dtype"].items(), key=lambda kv: -kv[1]["bytes"]):
        lines.append(f"    {dtype:16s} {d['tensors']:6d} tensors {human_bytes(d['bytes']):>10}")
    for key in ("missing", "unexpected", "unreadable", "problems"):
        items = info[key]
        if items:
            shown = ", ".join(items[:5]) + (f", ... ({len(items)} in all)" if len(items) > 5 else "")
            lines.append(f"  {key}: {shown}")
    if not (info["missing"] or info["unexpected"] or info["unreadable"] or info["problems"]):
        lines.append("  against the spec: complete, nothing unexpected")
    return "\n".join(lines)
