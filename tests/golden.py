"""The demo's outputs against stored ones: bytes where the bytes are deterministic, numbers within a tolerance
where they are floats.

Shards, indexes, configs and manifests hash as they did (a refactor must change no output byte). The manifest's
fields that describe the run rather than the output (`created`, `job`, `fingerprint`, `tool`) are left out. The
compare report is float arithmetic over torch kernels whose summation order depends on the CPU's vector width and
the thread count, so report.json and report.md are compared number by number (`REL_TOL`, `ABS_TOL`, and for a
printed number one unit in its last printed digit) and the plot only for being a PNG of the stored size.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from pathlib import Path
from typing import Any

RUN_FIELDS = ("created", "job", "fingerprint", "tool")
# Across CPUs (AVX2 vs AVX-512) and thread counts the report's floats agree to about 1e-5 relative; a change of
# the third significant digit (1e-3 relative at least) is a real change. KL values below 1e-7 nats carry no
# meaning and differ most between kernels, so they are compared absolutely.
REL_TOL = 2e-4
ABS_TOL = 1e-7
FLOAT_FILES = ("report.json", "report.md")
PLOT_FILES = (".png",)
NUMBER = re.compile(r"-?\d+(?:\.(\d+))?(?:e([+-]\d+))?")


def file_digest(path: Path) -> str:
    if path.name == "m1-manifest.json":
        manifest = json.loads(path.read_text())
        for key in RUN_FIELDS:
            manifest.pop(key, None)
        data = json.dumps(manifest, sort_keys=True).encode()
    else:
        data = path.read_bytes()
    return hashlib.sha256(data).hexdigest()


def is_float_output(name: str) -> bool:
    return Path(name).name in FLOAT_FILES or name.endswith(PLOT_FILES)


def tree_digests(root: Path) -> dict[str, str]:
    """sha256 of every file whose bytes are deterministic (the float outputs are compared by `close_*`)."""
    return {str(p.relative_to(root)): file_digest(p) for p in sorted(root.rglob("*"))
            if p.is_file() and not is_float_output(str(p.relative_to(root)))}


def tree_hash(root: Path) -> str:
    """One hash of a folder's names and bytes: a command that must not touch its source leaves it unchanged."""
    sha = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        sha.update(str(p.relative_to(root)).encode())
        if p.is_file():
            sha.update(p.read_bytes())
    return sha.hexdigest()


def close(a: float, b: float, ulp: float = 0.0) -> bool:
    return math.isclose(a, b, rel_tol=REL_TOL, abs_tol=max(ABS_TOL, ulp))


def json_differences(actual: Any, expected: Any, where: str = "") -> list[str]:
    """Where two JSON trees differ: same structure, same strings and integers, floats within the tolerance."""
    if isinstance(expected, dict):
        if not isinstance(actual, dict) or sorted(actual) != sorted(expected):
            return [f"{where}: keys {sorted(actual) if isinstance(actual, dict) else type(actual).__name__} "
                    f"!= {sorted(expected)}"]
        return [d for k in expected for d in json_differences(actual[k], expected[k], f"{where}.{k}")]
    if isinstance(expected, list):
        if not isinstance(actual, list) or len(actual) != len(expected):
            return [f"{where}: {actual!r} != {expected!r}"]
        return [d for i, (a, e) in enumerate(zip(actual, expected, strict=True))
                for d in json_differences(a, e, f"{where}[{i}]")]
    if isinstance(expected, float) and isinstance(actual, (int, float)) and not isinstance(actual, bool):
        return [] if close(float(actual), expected) else [f"{where}: {actual!r} != {expected!r}"]
    return [] if actual == expected and type(actual) is type(expected) else [f"{where}: {actual!r} != {expected!r}"]


def _ulp(match: re.Match[str]) -> float:
    decimals = len(match.group(1) or "")
    exponent = int(match.group(2) or 0)
    return 10.0 ** (exponent - decimals) if decimals or match.group(2) else 0.0


def text_differences(actual: str, expected: str) -> list[str]:
    """Where two texts differ: the same words, and numbers within the tolerance or one unit in the last
    printed digit (a float printed with 6 decimals may round either way of a boundary). Integers are exact."""
    diffs = []
    a_lines, e_lines = actual.splitlines(), expected.splitlines()
    if len(a_lines) != len(e_lines):
        return [f"{len(a_lines)} lines != {len(e_lines)}"]
    for n, (a, e) in enumerate(zip(a_lines, e_lines, strict=True), 1):
        a_nums, e_nums = list(NUMBER.finditer(a)), list(NUMBER.finditer(e))
        if NUMBER.sub("#", a) != NUMBER.sub("#", e) or len(a_nums) != len(e_nums):
            diffs.append(f"line {n}: {a!r} != {e!r}")
            continue
        for x, y in zip(a_nums, e_nums, strict=True):
            exact = not (y.group(1) or y.group(2))
            if (x.group() != y.group()) if exact else not close(float(x.group()), float(y.group()), _ulp(y)):
                diffs.append(f"line {n}: {x.group()} != {y.group()}")
    return diffs


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR; a ValueError if the file is not a PNG."""
    head = path.read_bytes()[:24]
    if head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise ValueError(f"{path} is not a PNG")
    return struct.unpack(">II", head[16:24])


if __name__ == "__main__":
    import sys

    print(json.dumps(tree_digests(Path(sys.argv[1])), indent=2, sort_keys=True))
