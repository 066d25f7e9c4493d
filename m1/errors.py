"""Typed errors: each one carries what went wrong (file, tensor) and what to do about it.

The CLI turns them into one line and an exit code; the library raises them and never prints.
"""

from __future__ import annotations


class M1Error(Exception):
    """A problem with the input or the environment; exit code 1 (usage errors 2, bugs in m1 3)."""

    exit_code = 1

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        tensor: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.file = file
        self.tensor = tensor
        self.hint = hint

    def one_line(self) -> str:
        where = ", ".join(
            part for part in (self.file and f"file {self.file}", self.tensor and f"tensor {self.tensor}") if part
        )
        line = f"{where}: {self.message}" if where else self.message
        if self.hint:
            line += f" ({self.hint})"
        return line.replace("\n", " ")

    def __str__(self) -> str:
        return self.one_line()


class InternalError(M1Error):
    """A bug in m1 itself (not the input's fault): its own exit code, and a request to report it."""

    exit_code = 3

    def one_line(self) -> str:
        return super().one_line() + " (this is a bug in m1; please report it)"


class UsageError(M1Error):
    """Bad options or arguments; exit code 2."""

    exit_code = 2


class CheckpointError(M1Error):
    """A checkpoint that cannot be read as an M1 checkpoint (missing shard, corrupt header...)."""


class ConfigError(M1Error):
    """A config.json that is neither M1 flavour, or is inconsistent."""


class UnknownTensorError(CheckpointError):
    """A tensor name that the M1 spec does not know: always a hard error."""


class DestinationError(UsageError):
    """A destination that is not empty and neither --resume nor --overwrite was given."""


class DiskFullError(M1Error):
    """The disk filled up while writing; the partial output was removed."""
