"""m1: convert, quantize, verify and publish MiniMax-M1 checkpoints.

The jobs are functions (each is what its CLI command calls): `m1.convert(...)`, `m1.quantize(...)`,
`m1.verify.compare(...)`, `m1.verify.perplexity(...)`, and `m1.load_pretrained(...)` for a quantized checkpoint
in transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

from m1.version import __version__

__all__ = ["__version__", "convert", "load_pretrained", "quantize", "verify"]
_JOBS = ("convert", "quantize", "verify")  # the command packages, imported on first use


def load_pretrained(path: str, **kwargs: Any) -> Any:
    """A transformers MiniMaxForCausalLM whose experts run bitsandbytes-quantized (see quantize.loader)."""
    from m1.quantize.loader import load_pretrained as _load

    return _load(path, **kwargs)


def __getattr__(name: str) -> Any:
    if name in _JOBS:
        return importlib.import_module(f"m1.{name}")
    raise AttributeError(f"module 'm1' has no attribute {name!r}")
