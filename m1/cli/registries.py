"""What the CLI generates from the format and scheme registries, so that no command names a format or scheme:
--to / --format / --scheme help, every format's own options (`with_format_options`), format examples.

A format declares its options as `m1.formats.base.FormatOption`s in `Format.options`; `with_format_options` puts
them in a command's signature, which typer reads (`__signature__`, `__annotations__`) each time it builds the
CLI, so that a format registered later (a plugin, a test) shows its flags too.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from typing import Annotated, Any

import typer

from m1.formats.base import Format, FormatOption


def label(fmt: Format) -> str:
    """A format as help text names it: its name upper-cased (HF)."""
    return fmt.name.upper()


def format_help(default: str) -> str:
    """--to / --format's help, from the format registry."""
    from m1.formats import all_formats

    return f"Output format ({default} by default): " + "; ".join(f"'{f.name}': {f.description}"
                                                                for f in all_formats()) + "."


def scheme_help() -> str:
    """--scheme's help, from the scheme registry: every family's schemes and the formats that store them."""
    from m1.schemes import families, make_scheme

    parts = []
    for family in families():
        stores = make_scheme(family.schemes[0]).formats
        parts.append(f"{family.name} {', '.join(family.schemes)} (--format {'/'.join(stores)})")
    return "The scheme for the experts: " + "; ".join(parts) + "."


def imatrix_files() -> list[tuple[Format, Any]]:
    """(format, its m1.formats.base.ImatrixFile) of every format that has an importance-matrix file."""
    from m1.formats import all_formats

    return [(f, f.imatrix) for f in all_formats() if f.imatrix is not None]


def imatrix_help() -> str:
    """quantize --imatrix's help: the importance-matrix files m1 verify imatrix writes and who weighs by them."""
    files = imatrix_files()
    if not files:
        return "An importance matrix (no registered format has one)."
    return "; ".join(f"For {file.used_by}: an importance matrix from m1 verify imatrix ({file.what})"
                     for _, file in files) + ". With --budget it weighs the candidates (no --scheme needed)."


def with_examples(doc: str, command: str) -> str:
    """`doc` with the line `{format examples}` replaced by every format's example lines for `command`, each ended
    like the lines around it (' ;')."""
    from m1.formats import all_formats

    lines = [line for f in all_formats() for cmd, line in f.examples if cmd == command]
    out = []
    for line in doc.splitlines():
        if line.strip() == "{format examples}":
            indent = line[: len(line) - len(line.lstrip())]
            out += [f"{indent}{example} ;" for example in lines]
        else:
            out.append(line)
    return "\n".join(out)


def format_cli_options() -> list[tuple[FormatOption, list[Format]]]:
    """Every registered format's options, once each (the first declaration's flag and help), with the formats
    that take it; a plain name declares an option with a flag made from it and no help."""
    from m1.formats import all_formats

    found: dict[str, tuple[FormatOption, list[Format]]] = {}
    for fmt in all_formats():
        for option in fmt.options:
            declared = option if isinstance(option, FormatOption) else FormatOption(option)
            found.setdefault(declared.name, (declared, []))[1].append(fmt)
    return list(found.values())


def option_help(option: FormatOption, formats: list[Format]) -> str:
    """The help of an option several formats may declare, each with its own help: the formats that say the same
    thing together (`A/B: ...  C: ...`)."""
    said: dict[str, list[Format]] = {}
    for fmt in formats:
        own = next((o for o in fmt.options if o == option.name), option)
        said.setdefault(own.help if isinstance(own, FormatOption) else "", []).append(fmt)
    parts = []
    for text, owners in said.items():
        names = "/".join(label(f) for f in owners)
        parts.append(f"{names}: {text}" if text else f"{names} output's {option.name}.")
    return " ".join(parts)


def _parameter(option: FormatOption, formats: list[Format]) -> inspect.Parameter:
    help_text = option_help(option, formats)
    annotation = Annotated[option.type | None, typer.Option(option.flag, help=help_text)]
    return inspect.Parameter(option.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)


class with_format_options:  # noqa: N801 - used as a decorator
    """`command` with every registered format's options in place of its `format_options` parameter; the command
    is called with the values given (None: not given) as one dict, `format_options`."""

    def __init__(self, command: Callable[..., Any]) -> None:
        self.command = command
        self.__name__ = command.__name__
        self.__qualname__ = command.__qualname__
        self.__module__ = command.__module__
        self.__doc__ = command.__doc__

    def _parameters(self) -> list[inspect.Parameter]:
        hints = typing.get_type_hints(self.command, include_extras=True)
        own = [p.replace(annotation=hints.get(p.name, p.annotation))
               for p in inspect.signature(self.command).parameters.values()]
        taken = {p.name for p in own}
        out = []
        for p in own:
            if p.name != "format_options":
                out.append(p)
                continue
            for option, formats in format_cli_options():
                if option.name in taken:
                    raise ValueError(f"format option {option.name!r} ({formats[0].name}) is also an option of "
                                     f"{self.__name__}; rename it")
                out.append(_parameter(option, formats))
        return [p.replace(kind=inspect.Parameter.POSITIONAL_OR_KEYWORD) for p in out]

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.Signature(self._parameters())

    @property
    def __annotations__(self) -> dict[str, Any]:  # what typing.get_type_hints reads
        return {p.name: p.annotation for p in self._parameters()}

    def __call__(self, **kwargs: Any) -> Any:
        names = {option.name for option, _ in format_cli_options()}
        given = {name: kwargs.pop(name) for name in list(kwargs) if name in names}
        return self.command(**kwargs, format_options=given)
