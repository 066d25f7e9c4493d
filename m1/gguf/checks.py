"""What `m1 verify integrity` checks of a GGUF on top of the spec checks (GGUFStorage.findings): tensors
that llama.cpp and the export keep in F32 (norms, the router, 1-D tensors) stored otherwise, and, when an m1
manifest sits beside the file, each split's size and sha256 against it."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from m1.errors import M1Error
from m1.gguf.tensor_map import Slot

Finding = tuple[str, str, str | None, str | None]  # (code, message, file, tensor)


def type_findings(slots: Mapping[str, Slot]) -> list[Finding]:
    from gguf import GGMLQuantizationType as Q

    from m1.spec import Role, classify

    out: list[Finding] = []
    f32_roles = (Role.LAYER_NORM, Role.FINAL_NORM, Role.LIGHTNING_NORM, Role.ROUTER)
    for name, slot in slots.items():
        try:
            role = classify(name).rule.role
        except M1Error:
            continue  # the spec checks report it
        if slot.qtype != Q.F32 and (role in f32_roles or len(slot.shape) == 1):
            out.append(("gguf-type", f"stored as {slot.qtype.name} (GGUF {slot.gguf_name}); norms, the router and "
                        "1-D tensors are F32 in a minimax-01 GGUF", slot.file, name))
    return out


def manifest_findings(manifest: Path, folder: Path, files: list[str]) -> list[Finding]:
    """Each file's size and sha256 against the m1 manifest beside it (none without one)."""
    from m1.atomic_io import file_sha256

    if not manifest.is_file():
        return []
    try:
        shards = json.loads(manifest.read_text()).get("shards", {})
        if not isinstance(shards, dict):
            raise ValueError
    except (ValueError, UnicodeDecodeError, AttributeError):
        return [("manifest", "not a valid m1 manifest", manifest.name, None)]
    out: list[Finding] = []
    for file in files:
        record = shards.get(file)
        if not isinstance(record, dict):
            continue
        size = (folder / file).stat().st_size
        if size != record.get("size"):
            out.append(("sha256", f"size {size}, the manifest recorded {record.get('size')}", file, None))
        elif file_sha256(folder / file).hexdigest() != record.get("sha256"):
            out.append(("sha256", "sha256 differs from the manifest: the file changed after it was written",
                        file, None))
    return out
