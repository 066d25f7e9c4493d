"""Checkpoint formats as registered modules.

A format says, as data where it can: how its config.json maps to and from the format-neutral fields of
`M1Config`, how its tensor names map to the spec's (a `NameTable`; an unmapped name is a hard error),
which extra files it carries, what to warn about, and which sink writes it. `release` and `hf` are
built in; adding a format is one module with a `FORMAT` object and one `register_format` call.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

from m1.errors import UnknownTensorError, UsageError

if TYPE_CHECKING:
    from m1.config import M1Config


@dataclass(frozen=True)
class NameTable:
    """Spec tensor names <-> a format's names, as pattern pairs with `{layer}` / `{expert}` holes."""

    pairs: tuple[tuple[str, str], ...]  # (spec pattern, format pattern)

    @cached_property
    def _to_spec(self) -> tuple[tuple[re.Pattern[str], str], ...]:
        return tuple((_compile(theirs), ours) for ours, theirs in self.pairs)

    @cached_property
    def _from_spec(self) -> tuple[tuple[re.Pattern[str], str], ...]:
        return tuple((_compile(ours), theirs) for ours, theirs in self.pairs)

    def to_spec(self, name: str, file: str | None = None) -> str:
        return _translate(name, self._to_spec, file)

    def from_spec(self, name: str) -> str:
        return _translate(name, self._from_spec, None)


def _compile(pattern: str) -> re.Pattern[str]:
    rx = re.escape(pattern).replace(r"\{layer\}", r"(?P<layer>\d+)").replace(r"\{expert\}", r"(?P<expert>\d+)")
    return re.compile(rx + r"\Z")


def _translate(name: str, table: Iterable[tuple[re.Pattern[str], str]], file: str | None) -> str:
    for rx, target in table:
        m = rx.match(name)
        if m:
            return target.format(**m.groupdict())
    raise UnknownTensorError("no tensor of this format's name table", file=file, tensor=name,
                             hint="the checkpoint has a tensor m1 does not know; remove it or check the source model")


def identity_table() -> NameTable:
    from m1.spec import M1_TENSORS

    return NameTable(tuple((r.pattern, r.pattern) for r in M1_TENSORS))


@dataclass(frozen=True)
class Format:
    name: str
    description: str
    model_types: tuple[str, ...]  # the config.json model_type values this format reads
    claims: Callable[[dict[str, Any]], bool]  # does this raw config.json belong to the format?
    read_config: Callable[[dict[str, Any], str], dict[str, Any]]  # raw -> M1Config's format-specific fields
    # Fills a config.json (the raw config minus every format's own keys) in place, in a fixed key order.
    write_config: Callable[[M1Config, dict[str, Any]], None]
    config_keys: tuple[str, ...]  # the keys that belong to this format (dropped when converting to another)
    names: NameTable
    sink: str = "safetensors"
    extra_file: Callable[[str], bool] = lambda name: True  # which of the source's extra files to carry
    warnings: Callable[[M1Config], list[str]] = field(default=lambda cfg: [])


_FORMATS: dict[str, Format] = {}


def register_format(fmt: Format) -> Format:
    _FORMATS[fmt.name] = fmt
    return fmt


def _builtins() -> None:
    if not _FORMATS:
        from m1.formats import hf, release

        register_format(release.FORMAT)
        register_format(hf.FORMAT)


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
    _builtins()
    return next((f for f in _FORMATS.values() if f.claims(raw)), None)
