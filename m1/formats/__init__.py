"""Checkpoint formats as registered modules.

A format says, as data where it can: how its config.json maps to and from the format-neutral fields of
`M1Config`, how its tensor names map to the spec's (a `NameTable`; an unmapped name is a hard error),
how it plans its files, which extra files it carries, what to warn about, and which sink writes it.
The built-in ones are imported on first use from the modules named in `BUILTIN_MODULES` (so m1.config,
which reads a config.json through this one registry, imports none of them); adding a format is one module
with a `FORMAT` object and one `register_format` call.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from m1.errors import UsageError
from m1.formats.base import Format, FormatPlan, NameTable, PlanInput, identity_table

__all__ = ["Format", "FormatPlan", "NameTable", "PlanInput", "identity_table", "register_format",
           "unregister_format", "get_format", "format_names", "all_formats", "format_of_config", "format_options",
           "format_for_path"]


_FORMATS: dict[str, Format] = {}
_BUILTIN: list[bool] = []


def register_format(fmt: Format) -> Format:
    _builtins()
    _FORMATS[fmt.name] = fmt
    return fmt


def unregister_format(name: str) -> None:
    _FORMATS.pop(name, None)


# The built-in formats by name -> the module whose FORMAT it is, imported on first use (a format's module may
# live with the rest of its trip, in its own folder).
BUILTIN_MODULES = {"release": "m1.formats.release", "hf": "m1.formats.hf", "gguf": "m1.gguf.format",
                   "compressed-tensors": "m1.formats.ct"}


def _builtins() -> None:
    if not _BUILTIN:
        _BUILTIN.append(True)
        import importlib

        for name, module in BUILTIN_MODULES.items():
            _FORMATS.setdefault(name, vars(importlib.import_module(module))["FORMAT"])


def get_format(name: str) -> Format:
    _builtins()
    try:
        return _FORMATS[name]
    except KeyError:
        raise UsageError(f"unknown format {name!r}", hint=f"use one of {', '.join(format_names())}") from None


def format_names() -> list[str]:
    _builtins()
    return list(_FORMATS)


def all_formats() -> list[Format]:
    _builtins()
    return list(_FORMATS.values())


def format_of_config(raw: dict[str, Any]) -> Format | None:
    """The format a raw config.json is in (the first that claims it), if any."""
    return next((f for f in all_formats() if f.claims(raw)), None)


def format_for_path(source: str) -> Format | None:
    """The format that reads `source` by itself (a file of its own, not a config.json folder), if any."""
    return next((f for f in all_formats() if f.open_storage is not None and f.opens(source)), None)


def format_options(name: str, dest: Path, given: Mapping[str, Any]) -> dict[str, Any]:
    """The options of output format `name` from those given (None: not given), as its request carries them; an
    option of another format is refused, naming the format it belongs to."""
    fmt = get_format(name)
    for option, value in given.items():
        if value is None or option in fmt.options:
            continue
        owner = next((f.name for f in all_formats() if option in f.options), None)
        flag = "--" + option.replace("_", "-")
        if owner is None:
            raise UsageError(f"{flag} is not an option of any format", hint=f"formats: {', '.join(format_names())}")
        raise UsageError(f"{flag} applies to {owner} output only",
                         hint=f"add --to {owner} (quantize: --format {owner})")
    if not fmt.options:
        return {}
    return fmt.make_options(dest, {k: v for k, v in given.items() if k in fmt.options})
