"""Human-readable sizes and counts."""

from __future__ import annotations


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
