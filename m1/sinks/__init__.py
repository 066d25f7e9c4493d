"""Sinks write a plan's output files: one file at a time under a temporary name (committed by fsync and
rename), then whatever the format needs once all files exist (the safetensors index). A format names its
sink (m1.formats); adding one is a module with a `SINK` and one `register_sink` call."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from m1.errors import InternalError

if TYPE_CHECKING:
    from m1.atomic_io import PendingShard, Produced
    from m1.plan import OutputFile, Plan


class Sink(Protocol):
    name: str
    first_last: bool  # write the plan's first file after all others (it marks the set as whole)

    def check(self, plan: Plan) -> None:
        """Before anything is written: refuse what the plan could not settle."""
        ...

    def write_file(self, path: Path, file: OutputFile, produce: Callable[[str], Produced],
                   on_bytes: Callable[[int], None] | None = None, plan: Plan | None = None
                   ) -> tuple[str, int, PendingShard]:
        """Write one file under a temporary name: (sha256, size, the pending file to commit)."""
        ...

    def finish(self, dest: Path, plan: Plan) -> list[str]:
        """After every file is committed: write what lists them; returns the names written."""
        ...

    def file_bytes(self, plan: Plan, file: OutputFile) -> int:
        """At least the bytes `write_file` puts on disk for `file` (its header included), from the plan alone."""
        ...

    def finish_bytes(self, plan: Plan) -> dict[str, int]:
        """What `finish` will write: name -> at least its bytes, from the plan alone."""
        ...


_SINKS: dict[str, Sink] = {}


def register_sink(sink: Sink) -> Sink:
    _SINKS[sink.name] = sink
    return sink


def unregister_sink(name: str) -> None:
    _SINKS.pop(name, None)


# The built-in sinks by name -> the module whose SINK it is, imported on first use. A format that brings its own
# sink names its module (`Format.sink_module`, with the rest of the format's trip).
BUILTIN_MODULES = {"safetensors": "m1.sinks.safetensors"}


def _module_of(name: str) -> str | None:
    from m1.formats import all_formats

    if name in BUILTIN_MODULES:
        return BUILTIN_MODULES[name]
    return next((f.sink_module for f in all_formats() if f.sink == name and f.sink_module is not None), None)


def get_sink(name: str) -> Sink:
    module = _module_of(name) if name not in _SINKS else None
    if module is not None:
        import importlib

        _SINKS[name] = vars(importlib.import_module(module))["SINK"]
    try:
        return _SINKS[name]
    except KeyError:
        raise InternalError(f"no sink {name!r} to write this format") from None
