"""The config.json side of the formats: which format a config.json is in, and each format's own keys.

`M1Config` reads and writes config.json through this table, not through the full registry (m1.formats),
so reading a config never reaches the formats that write other files (GGUF and its modules, which take an
`M1Config` themselves). The built-in entries are the two config.json formats, release and hf; a format
registered with `m1.formats.register_format` is added here too.
"""

from __future__ import annotations

from typing import Any

from m1.errors import UsageError
from m1.formats.base import Format

_CONFIGS: dict[str, Format] = {}


def _builtins() -> None:
    if not _CONFIGS:
        from m1.formats import hf, release

        for fmt in (release.FORMAT, hf.FORMAT):
            _CONFIGS.setdefault(fmt.name, fmt)


def add(fmt: Format) -> None:
    _builtins()
    _CONFIGS[fmt.name] = fmt


def remove(name: str) -> None:
    _CONFIGS.pop(name, None)


def config_format(name: str) -> Format:
    """A format that reads and writes a config.json, by name."""
    _builtins()
    try:
        return _CONFIGS[name]
    except KeyError:
        raise UsageError(f"format {name!r} has no config.json", hint=f"use one of {', '.join(_CONFIGS)}") from None


def config_formats() -> list[Format]:
    _builtins()
    return list(_CONFIGS.values())


def format_of_config(raw: dict[str, Any]) -> Format | None:
    _builtins()
    return next((f for f in _CONFIGS.values() if f.claims(raw)), None)
