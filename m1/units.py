"""Human-readable sizes and counts."""

from __future__ import annotations

import math
import re

from m1.errors import UsageError


def _scaled(n: float, units: tuple[str, ...], sep: str) -> str:
    """n in steps of 1000 with two decimals, whole numbers below the first step."""
    step = 0
    while abs(n) >= 1000 and step < len(units) - 1:
        n /= 1000
        step += 1
    unit = units[step]
    return f"{n:.0f}{sep}{unit}" if unit == units[0] else f"{n:.2f}{sep}{unit}"


def human_bytes(n: float) -> str:
    return _scaled(n, ("B", "KB", "MB", "GB", "TB"), " ")


def human_count(n: float) -> str:
    return _scaled(n, ("", "K", "M", "B", "T"), "")


SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,  # llama.cpp's split tool's spelling (50G)
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB', '123' -> bytes (decimal units, as huggingface_hub's max_shard_size); an int is
    bytes already."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text <= 0:
            raise UsageError(f"size must be positive, got {text}")
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in SIZE_UNITS:
        raise UsageError(f"cannot read the size {text!r}", hint="write it like 5GB, 500MB or 2GiB")
    number = float(m.group(1)) * SIZE_UNITS[m.group(2).upper()]
    if not math.isfinite(number):  # 400 digits: past what a float holds
        raise UsageError(f"the size {text!r} is too large", hint="write it like 5GB, 500MB or 2GiB")
    value = int(number)
    if value <= 0:
        raise UsageError(f"size must be positive, got {text!r}")
    return value


def human_duration(seconds: float) -> str:
    """12.3 s, 4.5 min, 2.1 h, 3.2 days."""
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.1f} s"
