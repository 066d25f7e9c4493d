"""m1: convert, quantize, verify and publish MiniMax-M1 checkpoints."""

from __future__ import annotations

from typing import Any

from m1.version import __version__

__all__ = ["__version__", "load_pretrained"]


def load_pretrained(path: str, **kwargs: Any) -> Any:
    """A transformers MiniMaxForCausalLM whose experts run bitsandbytes-quantized (see quantize.loader)."""
    from m1.quantize.loader import load_pretrained as _load

    return _load(path, **kwargs)
